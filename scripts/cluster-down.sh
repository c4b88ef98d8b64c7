#!/usr/bin/env bash
# Stops the loopback cluster scripts/cluster-up.sh started: unmounts its nodes, then stops its
# etcd members by the PIDs it recorded. --purge also deletes its data.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="${MODELFS_CLUSTER_DIR:-/tmp/modelfs-cluster}"
bin="${MODELFS_BIN:-$here/.build/release/modelfs}"
[ -e "$dir/mounts" ] || { echo "modelfs: no cluster recorded in $dir" >&2; exit 0; }

while read -r mp; do
    [ -n "$mp" ] || continue
    if grep -q " $mp fuse.modelfs " /proc/mounts; then
        "$bin" umount "$mp" >/dev/null 2>&1 || "$bin" umount --force "$mp" >/dev/null 2>&1 || fusermount3 -uz "$mp"
    fi
done < "$dir/mounts"
if [ -e "$dir/etcd-pids" ]; then
    while read -r pid; do
        [ -n "$pid" ] && kill "$pid" 2>/dev/null
    done < "$dir/etcd-pids"
    while read -r pid; do
        [ -n "$pid" ] || continue
        for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    done < "$dir/etcd-pids"
fi
rm -f "$dir/etcd-pids" "$dir/mounts"
if [ "${1:-}" = "--purge" ]; then rm -rf "$dir"; fi
echo "modelfs: cluster in $dir stopped"
