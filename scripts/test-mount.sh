#!/usr/bin/env bash
# Runs the real-mount integration suite (Tests/integration) against
# ${MODELFS_BIN:-.build/release/modelfs}. Needs root (or FUSE access) and the
# venv from scripts/install-python-deps.sh. Extra arguments go to pytest,
# e.g. scripts/test-mount.sh -k posix   or   scripts/test-mount.sh --lf; when the first argument is
# a test file, only the files given run (scripts/test-mount.sh Tests/integration/test_peer_suites.py)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    echo "error: .venv/bin/python missing; run scripts/install-python-deps.sh first" >&2
    exit 1
fi
if [ "$#" -gt 0 ] && [ -f "$1" ]; then
    exec .venv/bin/python -m pytest -x -q "$@"
fi
exec .venv/bin/python -m pytest -x -q Tests/integration "$@"
