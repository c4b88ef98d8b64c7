#!/usr/bin/env bash
# Runs one Python cluster benchmark: scripts/bench/run-py.sh NAME [ARGS...] installs what it needs
# (libfuse, etcd, the venv), builds the release binary unless MODELFS_BIN is set, and runs
# scripts/bench/NAME.py --out bench-results/NAME.md ARGS... (cluster.sh, heal.sh and
# frameworks.sh are this with their NAME).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
name="$1"
shift
"$here/scripts/install-deps.sh"
"$here/scripts/install-cluster-deps.sh"
if [ -z "${MODELFS_BIN:-}" ]; then
    ( cd "$here" && swift build -c release --product modelfs 2>&1 | tail -n 1 )
    export MODELFS_BIN="$here/.build/release/modelfs"
fi
[ -x "$here/.venv/bin/python" ] || "$here/scripts/install-python-deps.sh"
mkdir -p "$here/bench-results"
exec "$here/.venv/bin/python" "$here/scripts/bench/$name.py" --out "$here/bench-results/$name.md" "$@"
