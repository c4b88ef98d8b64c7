#!/usr/bin/env bash
# Takes down the network lab scripts/lab-up.sh made: unmounts its hosts, stops its processes by
# the PIDs it recorded, deletes its namespaces (and with them their links) and its bridge.
#   env: MODELFS_LAB_DIR (default /tmp/modelfs-lab)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
exec python3 "$here/Tests/integration/lab.py" down
