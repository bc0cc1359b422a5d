"""Everything one ``make bench`` run measured, and its JSON form for the extra-venv run."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .e2e import E2EMeasurement
from .inprocess import Measurement
from .instructions import InstructionResult, ScenarioInstructions
from .overhead import OverheadResult
from .rss import RssResult


@dataclass
class Results:
    """The figures of one run and what they were measured on."""

    machine: dict[str, Any]
    settings: dict[str, Any]
    inprocess: list[Measurement] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    extra: list[Measurement] = field(default_factory=list)
    """Measured in the extra venv (peers that need another Python), with its own baseline."""
    extra_contenders: list[str] = field(default_factory=list)
    extra_machine: dict[str, Any] | None = None
    routes: list[Measurement] = field(default_factory=list)
    open_sessions: list[Measurement] = field(default_factory=list)
    rss: RssResult | None = None
    overhead: OverheadResult | None = None
    """Metrics and logging on minus off, paired, on a hop-free database route."""
    instructions: InstructionResult | None = None
    """The same route's instructions per request under callgrind, on and off."""
    scenario_instructions: list[ScenarioInstructions] = field(default_factory=list)
    """The asyncpg scenarios' instructions per request under callgrind, per contender."""
    scaling_instructions: list[ScenarioInstructions] = field(default_factory=list)
    """The asyncpg read's instructions per request at each scaling level (``routes_500``,
    ``open_1000``, ...), per contender."""
    e2e: list[E2EMeasurement] = field(default_factory=list)
    e2e_peer: str | None = None
    postgres_version: str | None = None
    off_supported: bool = False
    notes: list[str] = field(default_factory=list)

    def median(
        self, scenario: str, contender: str, *, extra: bool = False, cpu: bool = False
    ) -> float | None:
        """The median (wall, or CPU) µs/request of ``contender`` in ``scenario``, if measured."""
        for m in self.extra if extra else self.inprocess:
            if m.scenario == scenario and m.contender == contender and m.samples:
                return m.cpu_median if cpu else m.median
        return None


def dump_measurements(
    measurements: list[Measurement], skipped: dict[str, str], machine: dict[str, Any], path: Path
) -> None:
    """Write in-process measurements as JSON (for the run in the extra venv)."""
    path.write_text(
        json.dumps(
            {
                "measurements": [asdict(m) for m in measurements],
                "skipped": skipped,
                "machine": machine,
            }
        )
    )


def load_measurements(path: Path) -> tuple[list[Measurement], dict[str, str], dict[str, Any]]:
    """Read what :func:`dump_measurements` wrote."""
    data = json.loads(path.read_text())
    measurements = [Measurement(**m) for m in data["measurements"]]
    return measurements, data["skipped"], data["machine"]
