#!/usr/bin/env bash
# Generates the Python stubs (and their .pyi type stubs) of protos/ into the folder given as $1.
# The .proto files are copied beside the stubs so that the wheel ships the contract it was built from.
set -euo pipefail
out=${1:?usage: gen-proto.sh OUT_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$root/.venv}
mkdir -p "$out"
rm -rf "$out/jobstate"
PATH="$venv/bin:$PATH" "$venv/bin/python" -m grpc_tools.protoc -I"$root/protos" \
  --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" --mypy_grpc_out="$out" \
  "$root"/protos/jobstate/v1/*.proto >/dev/null
cp "$root"/protos/jobstate/v1/*.proto "$out/jobstate/v1/"
touch "$out/jobstate/v1/py.typed"
