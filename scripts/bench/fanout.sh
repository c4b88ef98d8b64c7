#!/usr/bin/env bash
# Fan-out benchmark (issue #30) in the network lab: one file on R holders, N loader hosts load it
# at once over links shaped to RATE; the last loader's time against one loader alone, the bytes
# the holders sent against the file's size, every load checked bit-exact.
#
#   scripts/bench/fanout.sh [--size-mib N] [--link RATE] [--holders R] [--loaders N] [--rounds N] [--only fanout,prefetch]
# The prefetch phase: a cold safe_open + every tensor of a safetensors file with format-aware
# prefetch and without (--no-format-prefetch), medians of --rounds.
#
# Needs root (network namespaces, FUSE, drop_caches), etcd (scripts/install-cluster-deps.sh), the
# release binary and the venv (run-py.sh installs what is missing). Writes bench-results/fanout.md.
# The same figures for 100 and 1,000 loaders come from the simulation with the real trees:
#   .build/release/modelfs debug simulate-fanout --loaders 1,8,100,1000
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/run-py.sh" fanout "$@"
