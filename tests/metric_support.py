"""Reading metric samples the way a scrape would."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """The sample's value, 0 when the series does not exist."""
    labels.setdefault("db", "default")
    found = registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def series(registry: CollectorRegistry) -> set[str]:
    """Every exposed sample line's name and labels."""
    text = generate_latest(registry).decode()
    return {line.rsplit(" ", 1)[0] for line in text.splitlines() if not line.startswith("#")}
