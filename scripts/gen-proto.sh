#!/usr/bin/env bash
# Generates the stubs of protos/:
#   - Python (grpcio stubs, .pyi type stubs, and the Connect stubs of protoc-gen-connectrpc on google.protobuf
#     messages) into the folder given as $1;
#   - TypeScript (protoc-gen-es, through `buf generate` and buf.gen.yaml) into $2/web/gen when $2 is given
#     (the repository root for `make proto`).
# The .proto files are copied beside the Python stubs so that the wheel ships the contract it was built from.
set -euo pipefail
out=${1:?usage: gen-proto.sh PY_OUT_DIR [TS_BASE_DIR]}
ts_base=${2:-}
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${VENV:-$root/.venv}
mkdir -p "$out"
rm -rf "$out/jobstate"
PATH="$venv/bin:$PATH" "$venv/bin/python" -m grpc_tools.protoc -I"$root/protos" \
  --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" --mypy_grpc_out="$out" \
  --connectrpc_out="$out" --connectrpc_opt=protobuf=google \
  "$root"/protos/jobstate/v1/*.proto >/dev/null
cp "$root"/protos/jobstate/v1/*.proto "$out/jobstate/v1/"
touch "$out/jobstate/v1/py.typed"
if [[ -n "$ts_base" ]]; then
  rm -rf "$ts_base/web/gen"
  (cd "$root" && npx --no-install buf generate --template buf.gen.yaml -o "$ts_base")
fi
