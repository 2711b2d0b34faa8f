"""``pip install .`` gives the ``jobstate`` command and the library: build the wheel, read its contents, install
it into a fresh virtual environment and run it from there.

The build uses what is installed (no build isolation, no index), on a copy of the tree so that a build never
writes into the work tree while other tests read it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["pyproject.toml", "README.md", "client", "server", "gen"]


def _env() -> dict[str, str]:
    # Without PYTHONPATH (the Makefile sets it to the source folders): only what is installed may be imported.
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("JOBSTATE_")}


def _sh(*args: str | Path, cwd: Path | None = None, timeout: float = 120) -> str:
    p = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout, check=False
    )
    assert p.returncode == 0, f"{args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(path, src / name)
    out = tmp_path_factory.mktemp("dist")
    _sh(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", out, src)
    wheels = list(out.glob("jobstate-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_contents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()

    for stem in ("job_state", "job_state_service"):
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi", ".proto"):
            assert f"jobstate/v1/{stem}{suffix}" in names
    for package in ("jobstate/v1", "jobstate/server", "jobstate/client"):
        assert f"{package}/py.typed" in names
    assert "jobstate/__main__.py" in names
    for module in ("cli", "view", "demo", "core", "sync", "aio", "errors", "informer", "__init__"):
        assert f"jobstate/client/{module}.py" in names
    for module in ("main", "service", "store", "hub", "rules", "changes", "errors", "metrics"):
        assert f"jobstate/server/{module}.py" in names
    # The dashboard's built bundle ships with the server: pip install needs no Node.
    for asset in ("index.html", "app.js", "app.css"):
        assert f"jobstate/server/static/{asset}" in names
    # Nothing from outside the packages: no tests, benchmarks or caches.
    assert not [n for n in names if n.startswith(("tests/", "bench/")) or "__pycache__" in n]

    assert "[console_scripts]" in entry_points
    assert "jobstate = jobstate.client.cli:main" in entry_points
    assert "Requires-Dist: grpcio" in metadata
    assert "Requires-Dist: protobuf" in metadata


def test_installed_wheel_runs(wheel: Path, tmp_path: Path, server: Any) -> None:
    venv = tmp_path / "venv"
    _sh(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    _sh(sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel)
    # The dependencies (grpcio, protobuf, ...) come from this environment, after the fresh one's own packages;
    # its editable jobstate is not visible there (that needs its .pth file run, which a path entry does not).
    purelib = Path(_sh(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    (purelib / "zz_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    where = _sh(python, "-c", "import jobstate.client, jobstate.server, jobstate.v1; print(jobstate.client.__file__)")
    assert where.strip().startswith(str(purelib))
    read_proto = "import importlib.resources as r; print(r.files('jobstate.v1') / 'job_state_service.proto')"
    proto = Path(_sh(python, "-c", read_proto).strip()).read_text()
    assert "package jobstate.v1;" in proto

    jobstate = venv / "bin" / "jobstate"
    assert _sh(jobstate, "--version").strip() == "jobstate 0.1.0"
    assert "usage: jobstate" in _sh(python, "-m", "jobstate", "--help")
    out = _sh(jobstate, "--target", server.target, "create", "from-wheel", cwd=tmp_path)
    assert "created job from-wheel" in out
    assert "from-wheel" in _sh(python, "-m", "jobstate", "--target", server.target, "list", cwd=tmp_path)
