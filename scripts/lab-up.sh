#!/usr/bin/env bash
# Starts the network lab (issue #26): N modelfs hosts and a 3-member etcd, each in its own
# network namespace on one bridge, every link shaped with tc to RATE each way. Prints the hosts,
# their addresses and mountpoints. Take it down with scripts/lab-down.sh; faults with scripts/lab.sh.
#
#   scripts/lab-up.sh N [--link RATE] [--prefix P] [--net A.B] [-- NODE FLAGS...]
#   e.g. scripts/lab-up.sh 5 --link 1gbit -- --replicas 3 --ack 1 --lease-ttl 5
#   env: MODELFS_LAB_DIR (default /tmp/modelfs-lab), MODELFS_BIN (a built binary)
# Needs root (namespaces, FUSE). See Tests/integration/lab.py for the layout.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ "$(id -u)" = 0 ] || { echo "lab-up: run as root (network namespaces, tc, FUSE)" >&2; exit 1; }
[ "$#" -ge 1 ] || { echo "usage: scripts/lab-up.sh N [--link RATE] [-- NODE FLAGS...]" >&2; exit 2; }
"$here/scripts/install-deps.sh" >/dev/null
"$here/scripts/install-cluster-deps.sh" >/dev/null
if [ -z "${MODELFS_BIN:-}" ]; then
    ( cd "$here" && swift build -c release --product modelfs 2>&1 | tail -n 3 )
    export MODELFS_BIN="$here/.build/release/modelfs"
fi
exec python3 "$here/Tests/integration/lab.py" up "$@"
