"""The dashboard bundle the server ships (server/jobstate/server/static/) is exactly what `make web` builds from web/
today: pip install needs no Node, so a stale committed bundle would be what every user gets."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "server" / "jobstate" / "server" / "static"


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _build(out: Path) -> None:
    node = shutil.which("node")
    assert node, "node is needed to check the dashboard bundle"
    assert (ROOT / "node_modules" / "esbuild").is_dir(), "node_modules missing: run `make node-deps`"
    subprocess.run([node, str(ROOT / "web" / "build.mjs"), str(out)], check=True, timeout=120, cwd=ROOT)


def test_dashboard_bundle_is_not_stale(tmp_path: Path) -> None:
    _build(tmp_path)
    fresh = _files(tmp_path)
    committed = _files(STATIC)
    assert {"index.html", "app.js", "app.css"} <= set(fresh), f"the build made {sorted(fresh)}"
    assert sorted(committed) == sorted(fresh), "server/jobstate/server/static has different files: run `make web`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale dashboard bundle (run `make web`): {stale}"


def test_dashboard_build_is_deterministic(tmp_path: Path) -> None:
    # Two builds into different folders give the same bytes: the freshness check above compares like with like.
    a, b = tmp_path / "a", tmp_path / "b"
    _build(a)
    _build(b)
    assert _files(a) == _files(b)
