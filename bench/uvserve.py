"""``python -m bench.uvserve ARGS``: ``jobstate serve ARGS`` on uvloop's event loop (the ``--uvloop`` experiment)."""

from __future__ import annotations

import asyncio
import sys

import uvloop

from jobstate.client.cli import main

if __name__ == "__main__":
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    sys.exit(main(["serve", *sys.argv[1:]]))
