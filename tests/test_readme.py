"""The README documents every metric, every test it cites exists, and its examples run."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sessionscope.catalogue import CATALOGUE

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_the_readme_starts_with_the_two_commands() -> None:
    first_block = README.split("```")[1]
    assert "make demo" in first_block
    assert "make test" in first_block


def test_every_exported_metric_is_documented_in_the_readme() -> None:
    missing = [m.exported() for m in CATALOGUE if f"`{m.exported()}`" not in README]
    assert missing == []


def test_every_error_phase_is_listed_in_the_help_text_and_the_readme() -> None:
    from sessionscope.catalogue import SESSION_ERRORS
    from sessionscope.outcome import PHASES

    row = next(line for line in README.splitlines() if "`db_session_errors_total`" in line)
    assert [p for p in PHASES if p not in SESSION_ERRORS.help] == []
    assert [p for p in PHASES if f"`{p}`" not in row] == []


def test_every_test_the_readme_cites_exists() -> None:
    cited = set(re.findall(r"`(test_[a-z0-9_]+)`", README))
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    defined = set(re.findall(r"def (test_[a-z0-9_]+)\(", sources))
    assert cited
    assert sorted(cited - defined) == []
    paths = set(re.findall(r"`(tests/[^`\s]*)`", README))
    assert paths
    assert sorted(path for path in paths if not (ROOT / path).exists()) == []


FEATURE_TABLES = ("Around the session", "Compared with the alternatives")


def section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def table_rows(text: str) -> list[list[str]]:
    """The body rows of the first Markdown table in ``text``, as stripped cells."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


@pytest.mark.parametrize("title", FEATURE_TABLES)
def test_every_feature_row_is_backed_by_a_test_named_in_its_last_column(title: str) -> None:
    rows = table_rows(section(title))
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
    r"<!-- runnable(?:: (?P<runner>pytest))? -->\n```python\n(?P<code>.*?)\n```", re.S
)
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def runnable_examples() -> list[Any]:
    """The fenced Python blocks marked ``<!-- runnable -->`` (run with python) or
    ``<!-- runnable: pytest -->`` (run as a test module) in the README and docs/."""
    return [
        pytest.param(match["runner"] or "python", match["code"], id=f"{doc.name}-{n}")
        for doc in DOCUMENTS
        for n, match in enumerate(RUNNABLE.finditer(doc.read_text()), 1)
    ]


@pytest.mark.parametrize(("runner", "code"), runnable_examples())
def test_every_runnable_example_in_the_readme_and_docs_runs(
    runner: str, code: str, tmp_path: Path
) -> None:
    if runner == "pytest":
        file = tmp_path / "test_example.py"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(file)]
    else:
        file = tmp_path / "example.py"
        command = [sys.executable, str(file)]
    file.write_text(code + "\n")
    # As a user runs it: outside this test run, its plugins loaded from their entry points.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["TMPDIR"] = str(tmp_path)
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


def test_the_logs_section_has_one_example_of_every_event_the_library_logs() -> None:
    logged = logged_event_names()
    assert {"db_session.closed", "db_pool.timeout", "db_lifespan.dispose_failed"} <= logged
    examples = [
        json.loads(line)
        for block in re.findall(r"```json\n(.*?)```", section("Logs"), re.DOTALL)
        for line in block.splitlines()
        if line.strip()
    ]
    documented = [example["event"] for example in examples]
    assert sorted(logged - set(documented)) == []
    assert sorted(set(documented) - logged) == []  # no example of an event that is gone
    assert len(documented) == len(set(documented))  # one example each
