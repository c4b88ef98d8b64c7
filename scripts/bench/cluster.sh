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
exec "$(dirname "${BASH_SOURCE[0]}")/run-py.sh" cluster "$@"
