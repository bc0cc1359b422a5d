"""The measured scenarios: which request, on which app (mode, database), expecting what."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .contenders import Contender, Mode
from .database import item_id
from .endpoints import CONFLICT_PATH, INSERT_PATH, NODB_PATH

Database = Literal["sqlite", "postgres"]


@dataclass(frozen=True)
class Scenario:
    """One request shape, sent to each contender's app for ``mode`` on ``database``."""

    key: str
    label: str
    mode: Mode
    database: Database
    method: str
    path: str
    """The path; ``{id}`` is replaced by a seeded row id that changes with every request."""
    status: int
    uses_db: bool = True

    def path_for(self, i: int) -> str:
        """The path of the ``i``-th request."""
        return self.path.replace("{id}", str(item_id(i))) if "{id}" in self.path else self.path

    def runs(self, contender: Contender) -> bool:
        """Whether ``contender`` takes part (bare only in the DB-less scenario)."""
        if contender.db_free:
            return not self.uses_db
        if not self.uses_db:
            return True
        return self.mode in contender.modes

    def app_mode(self, contender: Contender) -> Mode:
        """Which of ``contender``'s apps serves this scenario."""
        if self.uses_db or self.mode in contender.modes:
            return self.mode
        return next(iter(sorted(contender.modes)))


_READ = "/items/{id}"

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("nodb", "DB-less route", "sync", "sqlite", "GET", NODB_PATH, 200, uses_db=False),
    Scenario("read", "sync read", "sync", "sqlite", "GET", _READ, 200),
    Scenario("insert", "sync insert", "sync", "sqlite", "POST", INSERT_PATH, 201),
    Scenario("rollback", "sync 409 after write", "sync", "sqlite", "POST", CONFLICT_PATH, 409),
    Scenario("aread", "async read", "async", "sqlite", "GET", _READ, 200),
    Scenario("ainsert", "async insert", "async", "sqlite", "POST", INSERT_PATH, 201),
    Scenario("pg_aread", "asyncpg read", "async", "postgres", "GET", _READ, 200),
    Scenario("pg_ainsert", "asyncpg insert", "async", "postgres", "POST", INSERT_PATH, 201),
)
BY_KEY: dict[str, Scenario] = {s.key: s for s in SCENARIOS}
