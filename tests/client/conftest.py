"""Fixtures of the client tests: ``api`` runs each test once through ``Client`` and once through ``AsyncClient``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from .apis import KINDS, Api, make_api


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def api(kind: str, server: Any) -> AsyncIterator[Api]:
    a = make_api(kind, server.target)
    yield a
    await a.close()
