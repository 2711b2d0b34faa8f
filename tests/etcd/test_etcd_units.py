"""The etcd engine's pure parts: endpoint parsing and key ranges."""

from __future__ import annotations

import pytest

from jobstate.server.etcd_store import _prefix_end, channel_target


@pytest.mark.parametrize(
    ("endpoints", "target"),
    [
        (["http://127.0.0.1:2379"], "127.0.0.1:2379"),
        (["localhost:2379/"], "localhost:2379"),
        (["http://[::1]:2379"], "[::1]:2379"),
        (["http://127.0.0.1:1,http://127.0.0.1:2", "127.0.0.1:3"], "ipv4:127.0.0.1:1,127.0.0.1:2,127.0.0.1:3"),
        (["[::1]:1", "[::1]:2"], "ipv6:[::1]:1,[::1]:2"),
        (["localhost:1", "127.0.0.2:2"], "ipv4:127.0.0.1:1,127.0.0.2:2"),
    ],
)
def test_channel_target(endpoints: list[str], target: str) -> None:
    assert channel_target(endpoints) == target


@pytest.mark.parametrize("endpoints", [[], [""], ["https://127.0.0.1:2379"], ["127.0.0.1"], ["host:port"]])
def test_channel_target_refuses(endpoints: list[str]) -> None:
    with pytest.raises(ValueError, match=r"etcd endpoint|TLS"):
        channel_target(endpoints)


def test_prefix_end() -> None:
    assert _prefix_end(b"/p/jobs/") == b"/p/jobs0"
    assert _prefix_end(b"a\xff") == b"b"
    assert _prefix_end(b"\xff") == b"\x00"
