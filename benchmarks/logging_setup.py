"""structlog as a production app configures it: events below INFO are filtered out."""

from __future__ import annotations

import logging
import os

import structlog


def configure_production_logging() -> None:
    """Filter structlog below INFO and render what remains to ``os.devnull``.

    The rendering of the events that pass (a peer's warnings, for instance) is still paid for;
    only the terminal output is spared.
    """
    sink = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=sink),
        cache_logger_on_first_use=True,
    )
