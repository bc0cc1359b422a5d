"""What the figures were measured on: cores, CPU, Python, package versions, servers."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata
from typing import Any

PACKAGES = (
    "sessionscope",
    "fastapi",
    "starlette",
    "SQLAlchemy",
    "pydantic",
    "anyio",
    "uvicorn",
    "structlog",
    "prometheus-client",
    "aiosqlite",
    "asyncpg",
    "psycopg",
    "fastapi-sqla",
    "FastAPI-SQLAlchemy",
    "fastapi-async-sqlalchemy",
    "advanced-alchemy",
)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _command_version(command: list[str]) -> str | None:
    if shutil.which(command[0]) is None:
        return None
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (result.stdout or result.stderr).strip().splitlines()
    return text[0] if text else None


def describe() -> dict[str, Any]:
    """The machine and this interpreter's packages."""
    return {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "packages": {name: v for name in PACKAGES if (v := _version(name)) is not None},
        "wrk": _command_version(["wrk", "--version"]),
    }


def postgres_version(sync_url: str) -> str | None:
    """``SHOW server_version`` of the benchmark server, if it answers."""
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(sync_url, poolclass=sa.NullPool)
        with engine.connect() as conn:
            version = conn.execute(sa.text("show server_version")).scalar()
        engine.dispose()
    except Exception:  # no server
        return None
    return str(version)
