#!/usr/bin/env bash
# Faults and a look inside the network lab (scripts/lab-up.sh):
#   scripts/lab.sh show                      hosts, addresses, PIDs, up or down
#   scripts/lab.sh cut hN | restore hN       a host's link down / up (also eN: an etcd member)
#   scripts/lab.sh cut-pair hA hB            drop the traffic between two hosts only
#   scripts/lab.sh restore-pair hA hB
#   scripts/lab.sh kill hN | restart hN      kill -9 a host (or eN) / start it again
#   scripts/lab.sh kill-etcd-leader          kill -9 the etcd member that leads now
#   scripts/lab.sh exec hN CMD...            run CMD in host N's network namespace
#   env: MODELFS_LAB_DIR (default /tmp/modelfs-lab)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ "${1:-}" = exec ]; then
    shift
    prefix="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["prefix"])' "${MODELFS_LAB_DIR:-/tmp/modelfs-lab}/lab.json")"
    who="$1"; shift
    exec nsenter --net="/run/netns/$prefix-$who" "$@"
fi
exec python3 "$here/Tests/integration/lab.py" "$@"
