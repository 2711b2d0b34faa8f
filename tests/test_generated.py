"""The generated stubs in gen/ are exactly what scripts/gen-proto.sh makes from protos/ today (never stale)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GEN = ROOT / "gen" / "jobstate" / "v1"


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_generated_stubs_are_not_stale(tmp_path: Path) -> None:
    subprocess.run(["bash", str(ROOT / "scripts" / "gen-proto.sh"), str(tmp_path)], check=True, timeout=120)
    fresh = _files(tmp_path / "jobstate" / "v1")
    committed = _files(GEN)
    assert fresh, "gen-proto.sh produced nothing"
    assert sorted(committed) == sorted(fresh), "gen/jobstate/v1 has different files: run `make proto`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated files (run `make proto`): {stale}"
