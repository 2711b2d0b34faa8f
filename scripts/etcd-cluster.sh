#!/usr/bin/env bash
# Starts a 3-member etcd cluster on loopback and three jobstate servers on it, for trying out the etcd engine.
# Prints the endpoints; Ctrl-C (or SIGTERM) stops everything and removes the data (KEEP=1 keeps it).
#
#   scripts/etcd-cluster.sh                # etcd on 127.0.0.1:23791-23793, jobstate on 127.0.0.1:50061-50063
#   BASE=24000 JOBSTATE_PORT=51000 scripts/etcd-cluster.sh
#
# Needs etcd (`make etcd-deps`) and the venv (`make venv`).
set -euo pipefail
cd "$(dirname "$0")/.."

BASE=${BASE:-23790}
JOBSTATE_PORT=${JOBSTATE_PORT:-50060}
PREFIX=${PREFIX:-/jobstate}
PY=${PY:-.venv/bin/python}
ETCD=${ETCD:-$(command -v etcd || echo /usr/bin/etcd)}
[ -x "$ETCD" ] || { echo "etcd not found: run 'make etcd-deps'" >&2; exit 1; }
[ -x "$PY" ] || { echo "no venv: run 'make venv'" >&2; exit 1; }
export PYTHONPATH="$PWD/server:$PWD/client:$PWD/gen"

DATA=$(mktemp -d -t jobstate-etcd-cluster.XXXXXX)
PIDS=()
cleanup() {
  trap - INT TERM EXIT
  echo "stopping..." >&2
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  if [ -z "${KEEP:-}" ]; then rm -rf "$DATA"; else echo "data and logs kept in $DATA" >&2; fi
}
# Ctrl-C in a terminal reaches etcd and the servers too (the terminal's process group), so they exit with the
# script. The trap must exit: a handler that only cleaned up would return into the `wait -n` below, which would
# then report the stopped children as a crash. The EXIT trap does the cleanup, once.
on_signal() {
  exit "$1"
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM
trap cleanup EXIT

CLUSTER=""
for i in 1 2 3; do
  CLUSTER+="${CLUSTER:+,}m$i=http://127.0.0.1:$((BASE + 10 + i))"
done
ENDPOINTS=""
for i in 1 2 3; do
  client="http://127.0.0.1:$((BASE + i))"
  peer="http://127.0.0.1:$((BASE + 10 + i))"
  ENDPOINTS+="${ENDPOINTS:+,}$client"
  "$ETCD" --name "m$i" --data-dir "$DATA/m$i" \
    --listen-client-urls "$client" --advertise-client-urls "$client" \
    --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
    --initial-cluster "$CLUSTER" --initial-cluster-state new --initial-cluster-token jobstate-try \
    --max-request-bytes 8388608 --logger zap --log-outputs stderr --log-level warn \
    >"$DATA/m$i.log" 2>&1 &
  PIDS+=($!)
done

# Wait (at most 30 s) until the cluster has a leader and takes a read.
"$PY" - "$ENDPOINTS" <<'EOF'
import sys, time
import grpc
from aetcd import rpc
deadline = time.monotonic() + 30
for ep in sys.argv[1].split(","):
    with grpc.insecure_channel(ep.removeprefix("http://")) as channel:
        while True:
            try:
                rpc.KVStub(channel).Range(rpc.RangeRequest(key=b"/"), timeout=1)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    sys.exit(f"etcd at {ep} did not come up")
                time.sleep(0.2)
EOF

TARGETS=""
for i in 1 2 3; do
  port=$((JOBSTATE_PORT + i))
  if "$PY" -m jobstate serve --help 2>/dev/null | grep -q -- --etcd-endpoints; then
    "$PY" -m jobstate serve --host 127.0.0.1 --port "$port" \
      --store etcd --etcd-endpoints "$ENDPOINTS" --etcd-prefix "$PREFIX" >"$DATA/jobstate$i.log" 2>&1 &
  else  # a CLI without the engine flags: the same server through its Python entry point
    "$PY" -c 'import sys
from jobstate.server.main import ServerConfig, run, setup_logging
setup_logging()
sys.exit(run(ServerConfig(port=int(sys.argv[1]), store="etcd", etcd_endpoints=tuple(sys.argv[2].split(",")),
                          etcd_prefix=sys.argv[3])))' "$port" "$ENDPOINTS" "$PREFIX" >"$DATA/jobstate$i.log" 2>&1 &
  fi
  PIDS+=($!)
  TARGETS+="${TARGETS:+ }127.0.0.1:$port"
done

cat <<EOF
etcd cluster:      $ENDPOINTS
jobstate servers:  $TARGETS   (prefix $PREFIX)
logs:              $DATA/*.log

Try:  .venv/bin/python -m jobstate --target 127.0.0.1:$((JOBSTATE_PORT + 2)) watch        (in one terminal)
      .venv/bin/python -m jobstate --target 127.0.0.1:$((JOBSTATE_PORT + 1)) --help       (change jobs through another)
Ctrl-C stops everything.
EOF
wait -n "${PIDS[@]}" || true
echo "a process exited by itself; its log is in $DATA (kept)" >&2
KEEP=${KEEP:-1}
exit 1
