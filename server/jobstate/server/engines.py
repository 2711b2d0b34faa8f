"""Choosing the storage engine: ``open_store(config)`` builds the ``Store`` that ``ServerConfig.store`` names.

- ``memory``: everything in this process (the default);
- ``sqlite``: the in-memory engine written through to SQLite in ``data_dir`` (``jobstate.server.sqlite_store``);
- ``etcd``: state in etcd at ``etcd_endpoints`` under ``etcd_prefix`` (``jobstate.server.etcd_store``).

Engines are imported when chosen, so a server on one engine never loads another's dependencies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from jobstate.server.hub import WatchHub
from jobstate.server.store import MemoryStore, Store

if TYPE_CHECKING:
    from jobstate.server.main import ServerConfig


def _memory(config: ServerConfig) -> Store:
    return MemoryStore(_hub(config), config.limits, retention=config.retain_finished > 0)


def _sqlite(config: ServerConfig) -> Store:
    from jobstate.server.sqlite_store import SqliteStore

    if not config.data_dir:
        raise ValueError("the sqlite store needs a data dir (--data-dir)")
    return SqliteStore(config.data_dir, _hub(config), config.limits, retention=config.retain_finished > 0)


def _etcd(config: ServerConfig) -> Store:
    from jobstate.server import etcd_store

    if not config.etcd_endpoints:
        raise ValueError("the etcd store needs endpoints (--etcd-endpoints)")
    return etcd_store.open_store(config)  # it connects in Store.start


# name -> factory. A new engine is one entry here.
ENGINES: dict[str, Callable[[ServerConfig], Store]] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "etcd": _etcd,
}


def _hub(config: ServerConfig) -> WatchHub:
    return WatchHub(config.history_size, history_bytes=config.history_bytes, max_watchers=config.max_watchers)


def open_store(config: ServerConfig) -> Store:
    """The store ``config.store`` names, opened (an engine that connects elsewhere does so in ``Store.start``)."""
    factory = ENGINES.get(config.store)
    if factory is None:
        raise ValueError(f"unknown store {config.store!r}: choose one of {', '.join(ENGINES)}")
    return factory(config)
