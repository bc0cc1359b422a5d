"""The README and the docs pages: every metric and event documented, every test they cite
exists, every example runs, and the README's quick start serves as printed."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from sessionscope.catalogue import CATALOGUE

from .doc_setups import SETUPS, Setup
from .prom_support import free_port, http_get, stop, wait_until_up

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
DOCUMENTS = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
ALL_TEXT = "\n".join(doc.read_text() for doc in DOCUMENTS)


def page(name: str) -> str:
    return (DOCS / name).read_text()


def test_the_readme_starts_with_the_two_commands() -> None:
    first_block = README.split("```")[1]
    assert "make demo" in first_block
    assert "make test" in first_block


def test_every_exported_metric_is_explained_on_the_metrics_page() -> None:
    missing = [m.exported() for m in CATALOGUE if f"`{m.exported()}`" not in page("monitoring.md")]
    assert missing == []


def test_every_error_phase_is_listed_in_the_help_text_and_the_metrics_page() -> None:
    from sessionscope._outcome import PHASES
    from sessionscope.catalogue import SESSION_ERRORS

    row = next(
        line for line in page("monitoring.md").splitlines() if "`db_session_errors_total`" in line
    )
    assert [p for p in PHASES if p not in SESSION_ERRORS.help] == []
    assert [p for p in PHASES if f"`{p}`" not in row] == []


def test_the_readme_is_read_in_five_minutes() -> None:
    assert len(README.splitlines()) <= 300


def test_every_test_the_readme_and_docs_cite_exists() -> None:
    cited = set(re.findall(r"`(test_[a-z0-9_]+)`", ALL_TEXT))
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    defined = set(re.findall(r"def (test_[a-z0-9_]+)\(", sources))
    assert cited
    assert sorted(cited - defined) == []
    paths = set(re.findall(r"`(tests/[^`\s]*)`", ALL_TEXT))
    assert paths
    assert sorted(path for path in paths if not (ROOT / path).exists()) == []


FEATURE_TABLES = ("Around the session", "Compared with the alternatives")


def section(title: str, text: str) -> str:
    """The part of ``text`` under the heading ``title`` (any level), up to the next heading."""
    body = re.split(rf"\n#+ {re.escape(title)}\n", "\n" + text, maxsplit=1)[1]
    return re.split(r"\n#+ ", body, maxsplit=1)[0]


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the first Markdown table in ``text``, as stripped cells."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


@pytest.mark.parametrize("title", FEATURE_TABLES)
def test_every_feature_row_is_backed_by_a_test_named_in_its_last_column(title: str) -> None:
    rows = table_rows(section(title, page("comparison.md")))
    assert len(rows) >= 7
    unbacked = [
        row[0]
        for row in rows
        if not re.search(r"`test_[a-z0-9_]+`", row[-1])
        or any(
            not re.fullmatch(r"test_[a-z0-9_]+", ref) for ref in re.findall(r"`([^`]*)`", row[-1])
        )
    ]
    assert unbacked == [], "cite tests by name, not files or lists of backends"


RUNNABLE = re.compile(
    r"<!-- runnable(?:: (?P<runner>pytest))?(?: with (?P<setup>[a-z A-Z]+))? -->\n"
    r"```python\n(?P<code>.*?)\n```",
    re.S,
)
PYTHON_BLOCK = re.compile(r"(?P<before>[^\n]*)\n```python\n", re.S)


def runnable_examples() -> list[Any]:
    """The fenced Python blocks marked ``<!-- runnable -->`` (run with python) or
    ``<!-- runnable: pytest -->`` (run as a test module), optionally ``with`` a setup from
    :mod:`tests.doc_setups`, in the README and docs/."""
    return [
        pytest.param(
            match["runner"] or "python",
            match["code"],
            SETUPS[match["setup"]] if match["setup"] else Setup(),
            id=f"{doc.name}-{n}",
        )
        for doc in DOCUMENTS
        for n, match in enumerate(RUNNABLE.finditer(doc.read_text()), 1)
    ]


def test_every_python_block_in_the_readme_and_docs_is_executed() -> None:
    unmarked = [
        f"{doc.name}:{doc.read_text()[: match.start()].count(chr(10)) + 2}"
        for doc in DOCUMENTS
        for match in PYTHON_BLOCK.finditer(doc.read_text())
        if not match["before"].startswith(("<!-- runnable", "<!-- quickstart -->"))
    ]
    assert unmarked == []


@pytest.mark.parametrize(("runner", "code", "setup"), runnable_examples())
def test_every_runnable_example_in_the_readme_and_docs_runs(
    runner: str, code: str, setup: Setup, tmp_path: Path
) -> None:
    if runner == "pytest":
        file = tmp_path / "test_example.py"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(file)]
    else:
        file = tmp_path / "example.py"
        command = [sys.executable, str(file)]
    file.write_text(setup.before + code + "\n" + setup.after)
    for name, text in setup.files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    # As a user runs it: outside this test run, its plugins loaded from their entry points.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["TMPDIR"] = str(tmp_path)
    env["PYTHONPATH"] = str(tmp_path)
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


FEATURE_EXAMPLES = {
    "after-commit hooks": "on_commit(",
    "per-task sessions": "gather_with_sessions(",
    "pytest plugin": "sessionscope_bound_app",
    "SQLModel": "from sqlmodel import",
    "OpenTelemetry": "tracer_provider=",
    "lifespan": "database_lifespan(",
    "read replicas": "replica_engine=",
}


def test_every_feature_around_the_session_has_a_runnable_example() -> None:
    examples = [param.values[1] for param in runnable_examples()]
    missing = [f for f, uses in FEATURE_EXAMPLES.items() if not any(uses in e for e in examples)]
    assert missing == []


EVENT_NAME = re.compile(r"(db_session|db_pool|db_lifespan)\.[a-z_]+")


def logged_event_names() -> set[str]:
    """Every ``db_session.*``/``db_pool.*``/``db_lifespan.*`` string literal in the library."""
    return {
        node.value
        for module in (ROOT / "middleware" / "sessionscope").glob("*.py")
        for node in ast.walk(ast.parse(module.read_text(), str(module)))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and EVENT_NAME.fullmatch(node.value)
    }


def test_the_logging_page_has_one_example_of_every_event_the_library_logs() -> None:
    logged = logged_event_names()
    assert {"db_session.closed", "db_pool.timeout", "db_lifespan.dispose_failed"} <= logged
    examples = [
        json.loads(line)
        for block in re.findall(r"```json\n(.*?)```", page("logging.md"), re.DOTALL)
        for line in block.splitlines()
        if line.strip()
    ]
    documented = [example["event"] for example in examples]
    assert sorted(logged - set(documented)) == []
    assert sorted(set(documented) - logged) == []  # no example of an event that is gone
    assert len(documented) == len(set(documented))  # one example each


def http_post(url: str) -> int:
    request = urllib.request.Request(url, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_quick_start_as_printed_serves_a_commit_and_a_rollback_under_uvicorn(
    tmp_path: Path,
) -> None:
    code = re.search(r"<!-- quickstart -->\n```python\n(.*?)\n```", README, re.S)
    assert code is not None
    (tmp_path / "app.py").write_text(code.group(1) + "\n")
    port = free_port()
    log = tmp_path / "uvicorn.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    command = [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1"]
    with log.open("wb") as out:
        server = subprocess.Popen(
            [*command, "--port", str(port), "--no-access-log"],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(f"{base}/metrics/", server, log, timeout=30)
        assert http_post(f"{base}/items?name=teapot") == 201
        assert http_post(f"{base}/items?name=draft-kettle") == 422
        status, metrics = http_get(f"{base}/metrics/")
        assert status == 200
    finally:
        stop(server)
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'app.db'}")
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT name FROM items")).scalars().all() == ["teapot"]
    engine.dispose()
    text = metrics.decode()
    assert 'db_sessions_closed_total{db="default",outcome="commit",route="/items"} 1.0' in text
    assert 'db_sessions_closed_total{db="default",outcome="rollback",route="/items"} 1.0' in text
    # Nothing per request: only uvicorn's own start and stop lines.
    assert "db_session" not in log.read_text()
