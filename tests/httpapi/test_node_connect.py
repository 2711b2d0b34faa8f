"""The Connect Node client (tests/node/connect_scenario.ts: @connectrpc/connect-node on the protoc-gen-es code in
web/gen/) against a real server's HTTP listener: JSON and binary unary, GET reads, Watch over Connect (store id,
resume, bookmarks, another store refused), gRPC-Web, ErrorInfo, tokens and roles."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from jobstate.v1 import job_state_service_pb2 as spb

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = ROOT / "tests" / "node" / "connect_scenario.ts"
READER = "reader-token-0123456789"
WRITER = "writer-token-0123456789"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The scenario bundled by esbuild for Node (types stripped, the Connect packages inlined)."""
    if shutil.which("node") is None:
        pytest.fail("node is not installed: the Node client test needs Node.js (see the README)")
    esbuild = ROOT / "node_modules" / ".bin" / "esbuild"
    if not esbuild.exists() or not (ROOT / "node_modules" / "@connectrpc" / "connect-node").is_dir():
        pytest.fail("node_modules is missing: run `make node-deps` (make test does)")
    out = tmp_path_factory.mktemp("node") / "connect_scenario.mjs"
    subprocess.run(
        [
            str(esbuild),
            str(SCENARIO),
            "--bundle",
            "--platform=node",
            "--format=esm",
            f"--outfile={out}",
            "--log-level=warning",
        ],
        check=True,
        cwd=ROOT,
        timeout=120,
    )
    return out


def run(bundle: Path, *args: str) -> list[str]:
    r = subprocess.run(["node", str(bundle), *args], capture_output=True, text=True, timeout=90, check=False)
    assert r.returncode == 0, f"node client failed:\n{r.stdout}\n{r.stderr}"
    lines = r.stdout.splitlines()
    assert lines[-1].endswith("checks passed"), lines
    assert int(lines[-1].split()[3]) == sum(1 for line in lines if line.startswith("ok ")) >= 10
    return lines


def test_node_connect_client(bundle: Path, http: Any) -> None:
    lines = run(bundle, http.url, "plain")
    for must in (
        "ok watch: jobstate-store-id header",
        "ok binary GET: getJob sees the write",
        "ok watch: resume by revision",
        "ok watch: resume from another store refused: OutOfRange REVISION_COMPACTED",
        "ok watch: progress bookmark",
        "ok grpc-web: watch initial state",
        "ok json: VERSION_MISMATCH says current_version 2",
    ):
        assert must in lines
    # What the Node client did is in the store, seen through gRPC.
    assert http.grpc.GetJob(spb.GetJobRequest(job_id="web-1")).job.job_id == "web-1"


def test_node_connect_client_tokens(bundle: Path, make_http: Any, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{READER} reader\n{WRITER} writer\n")
    tokens.chmod(0o600)
    http = make_http(auth_tokens_file=str(tokens))
    lines = run(bundle, http.url, "auth", READER, WRITER)
    assert "ok reader: createJob: PermissionDenied PERMISSION_DENIED" in lines
    assert "ok watch without a token: Unauthenticated UNAUTHENTICATED" in lines
    assert http.revision() == 1
