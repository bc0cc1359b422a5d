"""The app ``make demo`` serves: JSON logs through structlog, settings from the environment.

Run it with ``make demo`` (http://127.0.0.1:8000/docs), then ``python -m demo_app.load`` for
traffic. ``DATABASE_URL`` switches the database (default ``sqlite:///demo.db``; e.g.
``postgresql+psycopg://user@host/db`` or ``postgresql+asyncpg://user@host/db``);
``DEMO_LEAK_THRESHOLD`` sets the leak threshold in seconds (default 2).
"""

from __future__ import annotations

import logging
import os
import sys

import structlog
import structlog.tracebacks

from .app import Settings, create_app


def configure_logging(level: str = "INFO") -> None:
    """One JSON object per line on stdout, for structlog events and stdlib logging alike."""
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[
            *shared,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.ExceptionRenderer(
                    structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
                ),
                structlog.processors.JSONRenderer(),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's own loggers go through the same JSON handler.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True


configure_logging(os.environ.get("DEMO_LOG_LEVEL", "INFO"))
app = create_app(Settings.from_env())
