#!/usr/bin/env bash
# Framework benchmark (issue #5): torch.save/torch.load and safetensors at ~1 GiB on a plain
# directory, a single modelfs node and a 2-node loopback cluster (cold load from peers), in one
# run; prints the ratios against the targets (save ≤ 1.3×, warm load ≤ 1.1×, cold load from
# peers ≤ 2×) and writes bench-results/frameworks.md (git-ignored).
#
#   scripts/bench/frameworks.sh [--mib N] [--rounds N] [--dir DIR]
#
# Needs root (drop_caches, FUSE), etcd (scripts/install-cluster-deps.sh), the venv with torch and
# safetensors (scripts/install-python-deps.sh), and the release binary (MODELFS_BIN, or built here).
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
exec "$here/.venv/bin/python" "$here/scripts/bench/frameworks.py" --out "$here/bench-results/frameworks.md" "$@"
