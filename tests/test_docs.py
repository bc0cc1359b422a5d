"""The docs site's reference pages follow the catalogue, and the catalogue follows the code."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from sessionscope.catalogue import EVENTS

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "middleware" / "sessionscope"
EVENT_NAME = re.compile(r"(db_session|db_pool|db_lifespan)\.[a-z_]+")


def generator_check(tool: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "docs" / "_tools" / tool), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_metrics_and_logs_reference_pages_are_generated_from_the_catalogue() -> None:
    done = generator_check("reference.py")
    assert done.returncode == 0, done.stderr


def test_the_performance_chart_is_drawn_from_the_benchmark_results() -> None:
    done = generator_check("performance_chart.py")
    assert done.returncode == 0, done.stderr


def test_every_event_the_library_emits_is_in_the_event_catalogue() -> None:
    emitted = {
        node.value
        for module in PACKAGE.glob("*.py")
        if module.name != "catalogue.py"
        for node in ast.walk(ast.parse(module.read_text(), str(module)))
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and EVENT_NAME.fullmatch(node.value)
    }
    assert emitted == {event.name for event in EVENTS}


def test_the_lifecycle_diagram_names_every_phase_of_a_request_session() -> None:
    from sessionscope._lifecycle import Phase

    page = (ROOT / "docs" / "lifecycle.md").read_text()
    assert [phase.name for phase in Phase if phase.name not in page] == []


def test_every_optional_event_key_is_one_of_its_keys_and_says_when() -> None:
    for event in EVENTS:
        for key, when in event.optional:
            assert key in event.fields, (event.name, key)
            assert when, (event.name, key)
    (commit_failed,) = [e for e in EVENTS if e.name == "db_session.commit_failed"]
    assert commit_failed.when_present("error") is not None
    assert commit_failed.when_present("traceback") is None


def test_the_architecture_page_names_every_module_of_the_package_and_no_other() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text()
    listed = set(re.findall(r"^- `(\w+)\.py`: \S", page, flags=re.MULTILINE))
    named = set(re.findall(r"`(\w+)\.py`", page))
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    assert modules - listed == set(), "modules without their line on docs/architecture.md"
    assert named - modules == set(), "docs/architecture.md names modules that do not exist"
