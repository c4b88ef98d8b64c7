#!/usr/bin/env bash
# Scale benchmark (issue #26): a lab cluster with an almost empty namespace, then with N files
# (default 1,000,000) built through the metadata engine: small-file latency, ls -l, stat, statfs,
# idle etcd traffic per host, close() during a GC pass, etcd bytes per file, a host lost and healed,
# idle RSS. See scripts/bench/scale.py; results in docs/PERFORMANCE.md.
#
#   scripts/bench/scale.sh [--files N] [--hosts H] [--link RATE] [--ranks R] [--no-heal] [--out FILE]
# Needs root (network namespaces, FUSE).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
"$here/scripts/install-deps.sh" >/dev/null
"$here/scripts/install-cluster-deps.sh" >/dev/null
if [ -z "${MODELFS_BIN:-}" ]; then
    ( cd "$here" && swift build -c release --product modelfs 2>&1 | tail -n 1 )
    export MODELFS_BIN="$here/.build/release/modelfs"
fi
exec python3 "$here/scripts/bench/scale.py" "$@"
