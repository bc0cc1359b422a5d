"""The test matrix, installed the way users install: ``nox -s <session>``, or ``make matrix``.

Sessions:

- ``tests-3.11``: the whole suite, ``slow`` soak and load tests included (``make test`` runs the
  same on 3.11 in ``.venv``); ``tests-3.12``, ``tests-3.13``: the fast suite (``-m "not slow"``).
- ``lowest``: the fast suite on the lowest versions pyproject.toml allows for our direct
  dependencies, every extra's included (uv's ``--resolution lowest-direct``): the floors are true.
- ``newest``: the fast suite with every package, transitive ones too, at its newest release.
- ``wheel``: builds the wheel, installs ``sessionscope[fastapi]`` from it and uvicorn, nothing
  else, into a new venv, and serves the README's quick start as printed (``tests/wheel``) under
  uvicorn: a commit, a rollback, ``/metrics/``, and no line printed per request.

Each session installs from an exact list that uv resolves (``uv pip compile``) and then syncs the
venv to it, so a reused venv (``nox -r``) holds the same versions as a new one. The resolved
versions are printed at the start of each session. Extra arguments go to pytest:
``nox -s lowest -- tests/test_lifespan.py -x``.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.options.default_venv_backend = "uv"
nox.options.error_on_missing_interpreters = True

MAIN_PYTHON = "3.11"
PYTHONS = ["3.11", "3.12", "3.13"]
FAST = ("-m", "not slow")
ROOT = Path(__file__).resolve().parent


def sync(session: nox.Session, *resolution: str) -> None:
    """Make the session's venv hold exactly this project (editable) and all its extras, resolved."""
    requirements = Path(session.create_tmp()) / "requirements.txt"
    session.run(
        "uv",
        "pip",
        "compile",
        "--quiet",
        "--python-version",
        str(session.python),
        *resolution,
        "--all-extras",
        "--output-file",
        str(requirements),
        "--no-header",
        "--no-annotate",
        "pyproject.toml",
    )
    session.run("uv", "pip", "sync", "--quiet", str(requirements))
    session.run("uv", "pip", "install", "--quiet", "--no-deps", "-e", ".")
    session.log("installed:\n" + requirements.read_text())


def pytest(session: nox.Session, *args: str) -> None:
    """Run pytest; a run that collected no test (exit 5) fails with a message saying so."""
    code = session.run("python", "-m", "pytest", *args, *session.posargs, success_codes=[0, 5])
    if code == 5:
        session.error("pytest ran no test (exit 5): the selection matched nothing")


@nox.session(python=PYTHONS)
def tests(session: nox.Session) -> None:
    """The suite on each Python: all of it on the main one, the fast part on the others."""
    sync(session)
    pytest(session, *(() if session.python == MAIN_PYTHON else FAST))


@nox.session(python=MAIN_PYTHON)
def lowest(session: nox.Session) -> None:
    """The fast suite on the floors pyproject.toml declares."""
    sync(session, "--resolution", "lowest-direct")
    pytest(session, *FAST)


@nox.session(python=MAIN_PYTHON)
def newest(session: nox.Session) -> None:
    """The fast suite with everything at its newest release."""
    sync(session, "--upgrade")
    pytest(session, *FAST)


@nox.session(python=MAIN_PYTHON, reuse_venv=False)
def wheel(session: nox.Session) -> None:
    """The built wheel, installed as users install it, serving the README's quick start."""
    dist = Path(session.create_tmp()).resolve() / "dist"
    for old in dist.glob("sessionscope-*"):
        old.unlink()
    # The sdist first, then the wheel from it, as a release is built: the wheel holds only what
    # the sdist ships, and no build/ directory is left in the source tree.
    session.run("uv", "build", "--quiet", "--out-dir", str(dist), str(ROOT))
    (wheel_file,) = dist.glob("sessionscope-*.whl")
    session.install(f"sessionscope[fastapi] @ {wheel_file.as_uri()}", "uvicorn")
    session.run("uv", "pip", "list")
    session.run("python", "tests/wheel/check_quickstart.py")
