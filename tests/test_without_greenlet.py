"""The base install works without greenlet; async users are told to install the extra.

SQLAlchemy 2.1 no longer installs greenlet by default, and ``sqlalchemy.ext.asyncio`` raises
``ImportError`` on import without it. A sync application must be able to import sessionscope
(and its FastAPI dependencies and pytest plugin, which pytest loads by itself) and serve
requests without greenlet. Each test runs a fresh interpreter in which greenlet cannot be
imported: a ``sitecustomize`` puts ``None`` in ``sys.modules["greenlet"]`` before anything else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BLOCK_GREENLET = """
import sys

sys.modules["greenlet"] = None  # `import greenlet` now raises ModuleNotFoundError
"""


def run_without_greenlet(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python <args>`` in ``tmp_path`` with greenlet unimportable and pytest's variables unset."""
    blocker = tmp_path / "blocker"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(BLOCK_GREENLET)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(blocker), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


SYNC_APP = """
import json
import sys

import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

import sessionscope
import sessionscope.lifespan
import sessionscope.tasks
from sessionscope import DBSessionMiddleware, session_scope
from sessionscope.fastapi import DBSession

try:
    import greenlet  # noqa: F401
except ImportError:
    pass
else:
    sys.exit("greenlet is importable: the test proves nothing")

engine = sa.create_engine(f"sqlite:///{sys.argv[1]}")
with engine.begin() as conn:
    conn.execute(sa.text("CREATE TABLE items (name TEXT)"))
app = FastAPI()
app.add_middleware(DBSessionMiddleware, engine=engine)


@app.post("/items/{name}", status_code=201)
def create_item(name: str, db: DBSession) -> None:
    db.execute(sa.text("INSERT INTO items VALUES (:name)"), {"name": name})


with TestClient(app) as client:
    status = client.post("/items/teapot").status_code
with session_scope(engine) as session:
    session.execute(sa.text("INSERT INTO items VALUES ('scoped')"))
with engine.connect() as conn:
    names = conn.scalars(sa.text("SELECT name FROM items ORDER BY name")).all()
print(json.dumps({
    "status": status,
    "names": names,
    "asyncio_imported": "sqlalchemy.ext.asyncio" in sys.modules,
}))
"""


def test_a_sync_app_imports_sessionscope_and_commits_without_greenlet(tmp_path: Path) -> None:
    (tmp_path / "app.py").write_text(SYNC_APP)
    done = run_without_greenlet(tmp_path, "app.py", str(tmp_path / "app.db"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "status": 201,
        "names": ["scoped", "teapot"],
        "asyncio_imported": False,
    }


PLUGIN_TESTS = """
import sys

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from sessionscope import DBSessionMiddleware
from sessionscope.fastapi import DBSession

engine = sa.create_engine("sqlite:///app.db")
with engine.begin() as conn:
    conn.execute(sa.text("CREATE TABLE IF NOT EXISTS items (name TEXT)"))
app = FastAPI()
app.add_middleware(DBSessionMiddleware, engine=engine)


@app.post("/items/{name}", status_code=201)
def create_item(name: str, db: DBSession) -> None:
    db.execute(sa.text("INSERT INTO items VALUES (:name)"), {"name": name})


@pytest.fixture
def sessionscope_engine() -> sa.Engine:
    return engine


@pytest.fixture
def sessionscope_app() -> FastAPI:
    return app


def test_the_plugin_was_loaded_from_its_entry_point(pytestconfig):
    assert pytestconfig.pluginmanager.has_plugin("sessionscope")
    assert "greenlet" in sys.modules and sys.modules["greenlet"] is None


def test_the_app_commits_inside_the_tests_transaction(
    sessionscope_bound_app, sessionscope_session, sessionscope_events
):
    assert TestClient(sessionscope_bound_app).post("/items/teapot").status_code == 201
    assert sessionscope_session.scalars(sa.text("SELECT name FROM items")).all() == ["teapot"]
    assert [e["outcome"] for e in sessionscope_events if e["event"] == "db_session.closed"] == [
        "commit"
    ]


def test_nothing_imported_sqlalchemys_asyncio_extension():
    assert "sqlalchemy.ext.asyncio" not in sys.modules
"""


def test_the_pytest_plugin_loads_and_works_without_greenlet(tmp_path: Path) -> None:
    (tmp_path / "test_app.py").write_text(PLUGIN_TESTS)
    done = run_without_greenlet(tmp_path, "-m", "pytest", "-q", "-p", "no:cacheprovider")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "3 passed" in done.stdout


ASYNC_OBJECTS = """
import sys

from starlette.applications import Starlette

from sessionscope import ConfigurationError, DBSessionMiddleware, session_scope
from sessionscope.lifespan import database_lifespan

# Without greenlet, `import sqlalchemy.ext.asyncio` fails half way (SQLAlchemy 2.1; 2.0 imports
# it and fails at the first query): its engine and session modules stay loaded, so
# AsyncEngine and async_sessionmaker objects can exist.
try:
    import sqlalchemy.ext.asyncio  # noqa: F401
except ImportError:
    pass
engine = sys.modules["sqlalchemy.ext.asyncio.engine"].create_async_engine("sqlite+aiosqlite://")
maker = sys.modules["sqlalchemy.ext.asyncio.session"].async_sessionmaker(engine)

attempts = {
    "engine=": lambda: DBSessionMiddleware(Starlette(), engine=engine),
    "async_sessionmaker=": lambda: DBSessionMiddleware(Starlette(), async_sessionmaker=maker),
    "session_scope": lambda: session_scope(engine),
    "database_lifespan": lambda: database_lifespan(engine),
}
for what, attempt in attempts.items():
    try:
        attempt()
    except ConfigurationError as error:
        print(f"{what}: {error}")
    else:
        print(f"{what}: accepted")
try:
    from sessionscope.fastapi import AsyncDBSession  # noqa: F401
except ImportError as error:
    print(f"AsyncDBSession: {error}")
else:
    print("AsyncDBSession: imported")
"""


def test_an_async_engine_or_sessionmaker_without_greenlet_says_what_to_install(
    tmp_path: Path,
) -> None:
    (tmp_path / "app.py").write_text(ASYNC_OBJECTS)
    done = run_without_greenlet(tmp_path, "app.py")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split(":", 1)[0] for line in lines] == [
        "engine=",
        "async_sessionmaker=",
        "session_scope",
        "database_lifespan",
        "AsyncDBSession",
    ]
    for line in lines:
        assert "greenlet" in line, line
        assert "pip install 'sessionscope[asyncio]'" in line, line


@pytest.mark.parametrize("module", ["sessionscope", "sessionscope.fastapi", "sessionscope.testing"])
def test_importing_sessionscope_does_not_import_sqlalchemys_asyncio_extension(
    module: str, tmp_path: Path
) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        import {module}
        assert "sqlalchemy.ext.asyncio" not in sys.modules, "imported"
        """
    )
    done = run_without_greenlet(tmp_path, "-c", script)
    assert done.returncode == 0, done.stdout + done.stderr
