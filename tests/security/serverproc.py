"""Runs a server as its own process for the signal tests: ``python tests/security/serverproc.py CONFIG_JSON``."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from jobstate.server import rules
from jobstate.server.main import ServerConfig, serve, setup_logging


def config_of(raw: dict[str, Any]) -> ServerConfig:
    limits = raw.pop("limits", None)
    if limits is not None:
        raw["limits"] = rules.Limits(**limits)
    return ServerConfig(**raw)


def main() -> int:
    setup_logging("debug")
    asyncio.run(serve(config_of(json.loads(sys.argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
