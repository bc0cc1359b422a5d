"""The README documents every metric, and every test it cites exists."""

from __future__ import annotations

import re
from pathlib import Path

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


def test_every_test_the_readme_cites_exists() -> None:
    cited = set(re.findall(r"`(test_[a-z0-9_]+)`", README))
    sources = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py"))
    defined = set(re.findall(r"def (test_[a-z0-9_]+)\(", sources))
    assert cited
    assert sorted(cited - defined) == []
