#!/usr/bin/env bash
# Healing benchmark (issue #4), all in one run on this machine's loopback: the raw rate of
# copying SIZE between two local directories (the baseline), then on a 4-node cluster (R=2):
# re-replication after kill -9 of a node, and draining a node, each in MB/s, with a foreground
# reader and writer on another node whose speed is compared with the same work unloaded.
#
#   scripts/bench/heal.sh [--size-mib N] [--dir DIR]
#
# Needs root (drop_caches, FUSE), etcd (scripts/install-cluster-deps.sh), the release binary and
# the venv. Prints a table of ratios; writes bench-results/heal.md (git-ignored).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
"$here/scripts/install-deps.sh"
"$here/scripts/install-cluster-deps.sh"
if [ -z "${MODELFS_BIN:-}" ]; then
    ( cd "$here" && swift build -c release --product modelfs 2>&1 | tail -n 1 )
    export MODELFS_BIN="$here/.build/release/modelfs"
fi
[ -x "$here/.venv/bin/python" ] || "$here/scripts/install-python-deps.sh"
mkdir -p "$here/bench-results"
exec "$here/.venv/bin/python" "$here/scripts/bench/heal.py" --out "$here/bench-results/heal.md" "$@"
