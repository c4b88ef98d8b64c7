#!/usr/bin/env bash
# Framework benchmark (issue #5): torch.save/torch.load and safetensors at ~1 GiB on a plain
# directory, a single modelfs node and a 2-node loopback cluster (cold load from peers), in one
# run; prints the ratios against the targets (save ≤ 1.3×, warm load with the flat copy in place ≤ 1.05× (right after the cold load: reported), cold load from
# peers ≤ 2×) and writes bench-results/frameworks.md (git-ignored). One row more, for information:
# the cold torch.load from peers through an O_DIRECT descriptor (B's page cache left out).
#
#   scripts/bench/frameworks.sh [--mib N] [--rounds N] [--dir DIR]
#
# Needs root (drop_caches, FUSE), etcd, the venv with torch and safetensors and the release
# binary; scripts/bench/run-py.sh installs or builds what is missing.
exec "$(dirname "${BASH_SOURCE[0]}")/run-py.sh" frameworks "$@"
