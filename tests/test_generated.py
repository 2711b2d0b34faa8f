"""The generated stubs in gen/ (Python) and web/gen/ (TypeScript) are exactly what scripts/gen-proto.sh makes from
protos/ today (never stale)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GEN = ROOT / "gen" / "jobstate" / "v1"
WEB_GEN = ROOT / "web" / "gen"


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_stubs_are_not_stale(tmp_path: Path) -> None:
    py, ts = tmp_path / "py", tmp_path / "ts"
    subprocess.run(["bash", str(ROOT / "scripts" / "gen-proto.sh"), str(py), str(ts)], check=True, timeout=180)
    for fresh_dir, committed_dir in ((py / "jobstate" / "v1", GEN), (ts / "web" / "gen", WEB_GEN)):
        fresh = _files(fresh_dir)
        committed = _files(committed_dir)
        where = committed_dir.relative_to(ROOT)
        assert fresh, f"gen-proto.sh produced nothing for {where}"
        assert sorted(committed) == sorted(fresh), f"{where} has different files: run `make proto`"
        stale = [name for name in fresh if fresh[name] != committed[name]]
        assert not stale, f"stale generated files in {where} (run `make proto`): {stale}"
