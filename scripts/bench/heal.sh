#!/usr/bin/env bash
# Healing benchmark (issue #4), all in one run on this machine's loopback: the raw rate of
# copying SIZE between two local directories (the baseline), then on a 4-node cluster (R=2):
# re-replication after kill -9 of a node, and draining a node, each in MB/s, with a foreground
# reader and writer on another node whose speed is compared with the same work with nothing
# healing: on the whole cluster, and on the same cluster (the node down, before the healer
# starts; the node down and its copies made again, before the drain).
#
#   scripts/bench/heal.sh [--size-mib N] [--dir DIR] [--heal-rate RATE (the nodes' cap, e.g. 100M)] [--heal-rate-busy RATE (theirs while busy; 0: never yield)]
#
# Needs root (drop_caches, FUSE), etcd (scripts/install-cluster-deps.sh), the release binary and
# the venv. Prints a table of ratios; writes bench-results/heal.md (git-ignored).
exec "$(dirname "${BASH_SOURCE[0]}")/run-py.sh" heal "$@"
