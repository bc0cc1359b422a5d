"""Finding Prometheus' own tools: skip without them, fail when CI requires them."""

from __future__ import annotations

import os
import shutil

import pytest

REQUIRE_PROMETHEUS_ENV = "SESSIONSCOPE_REQUIRE_PROMETHEUS"


def _find(tool: str) -> str:
    path = shutil.which(tool)
    if path is not None:
        return path
    message = f"{tool} is not installed (Debian package 'prometheus')"
    if os.environ.get(REQUIRE_PROMETHEUS_ENV) == "1":
        pytest.fail(f"{REQUIRE_PROMETHEUS_ENV}=1 but {message}")
    pytest.skip(message)


def promtool() -> str:
    """The path of ``promtool``."""
    return _find("promtool")


def prometheus() -> str:
    """The path of the ``prometheus`` server."""
    return _find("prometheus")
