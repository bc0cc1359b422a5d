"""The app ``make demo`` serves: JSON logs through structlog, settings from the environment.

Run it with ``make demo`` (http://127.0.0.1:8000/docs), then ``python -m demo_app.load`` for
traffic. ``DATABASE_URL`` switches the database (default ``sqlite:///demo.db``; e.g.
``postgresql+psycopg://user@host/db`` or ``postgresql+asyncpg://user@host/db``);
``DEMO_LEAK_THRESHOLD`` sets the leak threshold in seconds (default 2). With several workers:
``make demo-workers`` (gunicorn with ``demo_app/gunicorn.conf.py``; see docs/deployment.md).
"""

from __future__ import annotations

import os

from .app import Settings, create_app
from .logs import configure_logging

__all__ = ["app", "configure_logging"]

configure_logging(os.environ.get("DEMO_LOG_LEVEL", "INFO"))
app = create_app(Settings.from_env())
