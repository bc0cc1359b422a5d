from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from .support import BACKENDS, Backend, make_backend


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Backend]:
    """Each of the four databases, with empty tables; no connection may stay checked out."""
    db = make_backend(request.param, tmp_path)
    try:
        yield db
        assert db.checkedout() == 0, "a connection was left checked out after the test"
    finally:
        await db.dispose()
