"""The ``jobstate`` command."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jobstate")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=50051)
    serve.add_argument("--history-size", type=int, default=100_000)
    args = parser.parse_args(argv)
    if args.command == "serve":
        from jobstate.server.main import ServerConfig, run, setup_logging

        setup_logging()
        return run(ServerConfig(host=args.host, port=args.port, history_size=args.history_size))
    return 2


if __name__ == "__main__":
    sys.exit(main())
