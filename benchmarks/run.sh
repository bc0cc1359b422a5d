#!/usr/bin/env bash
# `make bench`: set up the benchmark venvs, then measure everything and write RESULTS.md.
#
#   bash benchmarks/run.sh            # the full run (about 15 minutes on 2 cores)
#   bash benchmarks/run.sh --quick    # small counts everywhere
#   bash benchmarks/run.sh --help     # every option (each has a BENCH_* env variable)
#
# .bench-venv: Python 3 (PYTHON, default python3) with the repo and the pinned peers.
# benchmarks/.venv: a Python >= 3.12 venv for peers that need it (fastapi-async-sqlalchemy
# 0.8.x), made when one is found: BENCH_EXTRA_BASE_PYTHON, else python3.13 / python3.12 on
# PATH, else a pyenv-installed 3.12+. PostgreSQL comes from BENCH_POSTGRES_URL (default postgresql://postgres@127.0.0.1:5432/test);
# without it the asyncpg and end-to-end parts are skipped. The end-to-end load generator is
# wrk when installed (Debian: apt-get install wrk), else a Python client. The instruction count
# of metrics and logging needs valgrind (Debian: apt-get install valgrind); without it, skipped.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
BENCH_VENV=.bench-venv
EXTRA_VENV=benchmarks/.venv

install_venv() {  # venv-dir base-python requirements-file
    local venv="$1" base="$2" requirements="$3" stamp="$1/.bench-installed"
    if [ ! -x "$venv/bin/python" ]; then
        echo "[bench] creating $venv with $("$base" -V 2>&1)" >&2
        "$base" -m venv "$venv"
    fi
    if [ ! -f "$stamp" ] || [ "$requirements" -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ] \
        || [ benchmarks/requirements.txt -nt "$stamp" ]; then
        echo "[bench] installing into $venv" >&2
        "$venv/bin/python" -m pip install --quiet --upgrade pip
        "$venv/bin/python" -m pip install --quiet -e '.[fastapi]' -r "$requirements"
        touch "$stamp"
    fi
}

find_extra_python() {
    local candidate
    local pyenv_root
    pyenv_root="$(pyenv root 2>/dev/null || true)"
    for candidate in "${BENCH_EXTRA_BASE_PYTHON:-}" python3.13 python3.12 \
        ${pyenv_root:+"$pyenv_root"/versions/3.1[2-9]*/bin/python3}; do
        [ -n "$candidate" ] || continue
        if "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' >/dev/null 2>&1; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

install_venv "$BENCH_VENV" "$PYTHON" benchmarks/requirements.txt

if [ -z "${BENCH_EXTRA_PYTHON:-}" ]; then
    if extra_base="$(find_extra_python)"; then
        install_venv "$EXTRA_VENV" "$extra_base" benchmarks/requirements-extra.txt
        export BENCH_EXTRA_PYTHON="$EXTRA_VENV/bin/python"
    else
        echo "[bench] no Python >= 3.12 found: fastapi-async-sqlalchemy 0.8.1 is left out" \
            "(set BENCH_EXTRA_BASE_PYTHON to one)" >&2
    fi
fi

command -v wrk >/dev/null || echo "[bench] wrk not found: end to end uses the Python client" >&2

exec "$BENCH_VENV/bin/python" -m benchmarks all "$@"
