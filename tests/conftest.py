from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from .support import BACKENDS, Backend, backend_for


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[Backend]:
    """Each of the four databases, with empty tables; no connection may stay checked out."""
    async with backend_for(request.param, tmp_path) as db:
        yield db
