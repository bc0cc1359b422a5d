"""The generated rule files read back as exactly the data the generator built.

A YAML emitter that writes ``No``, ``Off``, ``NULL`` or ``True`` unquoted makes a reader see
a boolean or null where the generator meant a string; these tests load every generated file
with ``yaml.safe_load`` and compare it with the Python data it was written from.
"""

from __future__ import annotations

import json
from types import ModuleType
from typing import Any

import pytest
import yaml

from .prom_support import generator


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    return generator()


def test_every_generated_yaml_file_reads_back_as_the_data_the_generator_built(
    gen: ModuleType,
) -> None:
    meant = {
        gen.ALERTS_FILE: gen.alert_rules_document(),
        gen.ALERTS_TEST_FILE: gen.alert_tests_document(),
    }
    for path, data in meant.items():
        assert yaml.safe_load(path.read_text()) == data, path.name


def test_the_generated_dashboard_reads_back_as_the_model_the_generator_built(
    gen: ModuleType,
) -> None:
    built: dict[str, Any] = gen.dashboard()
    assert json.loads(gen.DASHBOARD_FILE.read_text()) == built


WORDS_YAML_READS_AS_SOMETHING_ELSE = [
    *("No", "no", "Off", "OFF", "On", "Yes", "y", "n", "True", "FALSE"),
    *("NULL", "Null", "null", "~", ""),
    *("1e3", "0o17", "0x1F", ".inf", "-.Inf", ".NaN", "12:30", "2024-01-01", "1_000"),
    *("- item", "key: value", "# comment", "{a: b}", "[a]", "*alias", "&anchor", "!tag"),
    *(" leading space", "trailing space ", "two\nlines", "'quoted'", '"quoted"', "%directive"),
]


@pytest.mark.parametrize("text", WORDS_YAML_READS_AS_SOMETHING_ELSE)
def test_a_string_that_yaml_could_read_as_another_type_reads_back_as_the_same_string(
    gen: ModuleType, text: str
) -> None:
    data = {"summary": text, "labels": {text or "empty": text}, "values": [text]}
    assert yaml.safe_load(gen.to_yaml(data)) == data
