#!/usr/bin/env bash
# Space benchmark (issue #28): data-dir usage of a 3-node loopback cluster (R=3, K=1, --gc-delay
# 900) under a steady in-place rewrite of one file on one node — fsx-like rounds (open r+, 8
# random writes, fsync, close) and h5py `r+` rounds (4 chunk rows and an attribute) — with
# --gc-superseded-delay 900 (superseded versions kept as long as other garbage, as before) and
# 10 (the default): the peak and final growth of the largest node's packs over the file's size,
# and how soon it comes back.
#
#   scripts/bench/space.sh [--size-mib N] [--seconds S] [--settle S] [--workloads rewrite,h5py]
#
# Needs root (FUSE), etcd (scripts/install-cluster-deps.sh), the release binary and the venv
# (h5py). Writes bench-results/space.md (git-ignored).
exec "$(dirname "${BASH_SOURCE[0]}")/run-py.sh" space "$@"
