"""gunicorn settings for the demo with several uvicorn workers and merged Prometheus metrics.

    PROMETHEUS_MULTIPROC_DIR=/tmp/demo-metrics \\
        gunicorn -c demo_app/gunicorn.conf.py demo_app.main:app

Every worker writes its metric values to files in ``PROMETHEUS_MULTIPROC_DIR`` and ``/metrics``
merges the files of all workers (``demo_app.app.metrics_app``). Without the variable this file
makes a fresh temporary directory (removed when gunicorn exits): the variable must be set
before any worker imports prometheus_client, and gunicorn loads this file in the master,
before the workers exist.
Command-line options override what is set here (``-b``, ``-w``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

bind = ["127.0.0.1:8000"]
"""Loopback only; ``-b 0.0.0.0:8000`` to serve other hosts (gunicorn alone would follow $PORT)."""
workers = int(os.environ.get("WEB_CONCURRENCY", "3"))
worker_class = "uvicorn_worker.UvicornWorker"
"""The uvicorn worker for gunicorn (package ``uvicorn-worker``; ``uvicorn.workers`` is the
deprecated copy of the same class)."""

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
MADE_HERE_ENV = "DEMO_PROMETHEUS_MULTIPROC_DIR_MADE"
if not os.environ.get(MULTIPROC_ENV):
    os.environ[MULTIPROC_ENV] = os.environ[MADE_HERE_ENV] = tempfile.mkdtemp(
        prefix="prometheus-multiproc-"
    )
# The files prometheus_client writes: counter_<pid>.db, gauge_livesum_<pid>.db, histogram_...
METRIC_FILES = ("counter_*.db", "gauge_*.db", "histogram_*.db", "summary_*.db")


def on_starting(server: Any) -> None:
    """Once, in the master, before the first worker: empty the metrics directory.

    Files left by a previous run would add its counters to this run's, and the live gauges of its
    workers (never marked dead: their master is gone) would stay in the sums for ever. A reload
    (SIGHUP) does not run this hook, so the counters survive it.
    """
    directory = Path(os.environ[MULTIPROC_ENV])
    directory.mkdir(parents=True, exist_ok=True)
    stale = [path for pattern in METRIC_FILES for path in directory.glob(pattern)]
    for path in stale:
        path.unlink()
    server.log.info(
        "prometheus multiprocess directory %s (%d stale files removed)", directory, len(stale)
    )


def child_exit(server: Any, worker: Any) -> None:
    """In the master, when a worker exits for any reason (a ``kill -9`` included): drop its live
    gauges (open sessions, pool connections) from the merged figures; its counters stay."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server: Any) -> None:
    """When the master exits: remove the directory this file made, if it made one."""
    made = os.environ.get(MADE_HERE_ENV)
    if made and made == os.environ.get(MULTIPROC_ENV):
        shutil.rmtree(made)
