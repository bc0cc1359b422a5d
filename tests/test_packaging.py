"""What a user installs: the version in one place, the license, the changelog."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest

import sessionscope

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_version_is_the_one_written_in_pyproject() -> None:
    assert sessionscope.__version__ == PROJECT["version"]
    assert importlib.metadata.version("sessionscope") == PROJECT["version"]


def test_a_source_tree_that_was_never_installed_says_its_version_is_unknown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def not_installed(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)
    assert sessionscope.__version__ == "0+unknown"


def test_an_unknown_attribute_of_the_package_is_still_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'no_such_name'"):
        sessionscope.no_such_name  # noqa: B018


def test_the_license_file_is_the_license_pyproject_declares() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert PROJECT["license"] == "MIT"
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the sessionscope authors\n")


def test_the_changelog_has_an_entry_for_the_current_version_and_an_unreleased_section() -> None:
    text = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## \[([^\]]+)\]", text, re.M)
    assert headings[0] == "Unreleased"
    assert PROJECT["version"] in headings
