#!/usr/bin/env bash
# Cluster benchmark (issue #3), all in one run on this machine's loopback:
#   a single modelfs node (the baseline), then a 3-node cluster on a real 3-member etcd:
#   write SIZE on node A with R=3 at K=1 and at K=3, time from close() to 3 verified copies,
#   cold read on node B of a file whose blocks are all remote; peak RSS of every node.
#
#   scripts/bench/cluster.sh [--size-mib N] [--dir DIR]
#
# Needs root (drop_caches, FUSE), etcd (scripts/install-cluster-deps.sh), the release binary and
# the venv. Prints a table of ratios; writes bench-results/cluster.md (git-ignored).
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
exec "$here/.venv/bin/python" "$here/scripts/bench/cluster.py" --out "$here/bench-results/cluster.md" "$@"
