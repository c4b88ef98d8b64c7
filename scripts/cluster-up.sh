#!/usr/bin/env bash
# Starts a loopback modelfs cluster on this machine: a 3-member etcd and N nodes (default 3),
# each node with its own data dir, mountpoint and peer port. Prints what it started.
# Stop it with scripts/cluster-down.sh (it stops exactly what this started, by PID).
#
#   scripts/cluster-up.sh [N]
#   env: MODELFS_CLUSTER_DIR (default /tmp/modelfs-cluster), MODELFS_CLUSTER_PORT (default 23790),
#        MODELFS_REPLICAS (default min(3, N)), MODELFS_ACK (default 1), MODELFS_BIN (a built binary)
#
# In real use, run one node per machine (modelfs mount ... --meta etcd://... --advertise HOST:PORT).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
n="${1:-3}"
dir="${MODELFS_CLUSTER_DIR:-/tmp/modelfs-cluster}"
base="${MODELFS_CLUSTER_PORT:-23790}"
replicas="${MODELFS_REPLICAS:-$(( n < 3 ? n : 3 ))}"
ack="${MODELFS_ACK:-1}"

if [ -e "$dir/etcd-pids" ]; then
    echo "modelfs: a cluster is already up in $dir; stop it first with scripts/cluster-down.sh" >&2
    exit 1
fi
"$here/scripts/install-deps.sh"
"$here/scripts/install-cluster-deps.sh"
bin="${MODELFS_BIN:-}"
if [ -z "$bin" ]; then
    ( cd "$here" && swift build -c release --product modelfs 2>&1 | tail -n 3 )
    bin="$here/.build/release/modelfs"
fi
mkdir -p "$dir"
: > "$dir/etcd-pids"
: > "$dir/mounts"

cluster=""
for i in 0 1 2; do
    cluster+="${cluster:+,}e$i=http://127.0.0.1:$((base + 10 + i))"
done
endpoints=""
for i in 0 1 2; do
    client=$((base + i)); peer=$((base + 10 + i))
    endpoints+="${endpoints:+,}127.0.0.1:$client"
    etcd --name "e$i" --data-dir "$dir/etcd$i" \
        --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
        --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
        --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token "modelfs-$base" \
        --pre-vote --auto-compaction-mode revision --auto-compaction-retention 10000 \
        --quota-backend-bytes $((4 << 30)) --logger zap >"$dir/etcd$i.log" 2>&1 &
    echo $! >> "$dir/etcd-pids"
done
# Wait until a linearizable read succeeds (the cluster has a leader).
for _ in $(seq 1 150); do
    if ETCDCTL_API=3 etcdctl --endpoints "$endpoints" get /modelfs/ --prefix --keys-only >/dev/null 2>&1; then break; fi
    sleep 0.2
done
ETCDCTL_API=3 etcdctl --endpoints "$endpoints" endpoint health >/dev/null 2>&1 \
    || { echo "modelfs: etcd did not come up; see $dir/etcd*.log" >&2; exit 1; }

[ -s "$dir/secret" ] || (umask 077; head -c 32 /dev/urandom | base64 > "$dir/secret")
chmod 600 "$dir/secret"
meta="etcd://$endpoints/loopback"
for i in $(seq 1 "$n"); do
    mkdir -p "$dir/mnt$i" "$dir/node$i"
    "$bin" mount "$dir/mnt$i" --data "$dir/node$i" --meta "$meta" --secret-file "$dir/secret" \
        --listen "127.0.0.1:$((base + 100 + i))" --node-id "node$i" --replicas "$replicas" --ack "$ack" \
        --labels "zone=z$(( (i - 1) % 3 ))" --cache-size "${MODELFS_CACHE_SIZE:-1G}" >/dev/null
    echo "$dir/mnt$i" >> "$dir/mounts"
done

echo "etcd:   $endpoints (pids $(tr '\n' ' ' < "$dir/etcd-pids"))"
echo "meta:   $meta"
echo "secret: $dir/secret"
for i in $(seq 1 "$n"); do
    echo "node$i:  mounted at $dir/mnt$i, data $dir/node$i, peer 127.0.0.1:$((base + 100 + i))"
done
echo "policy: replicas=$replicas ack=$ack by default (modelfs policy set DIR --replicas R --ack K)"
echo "status: $bin status $dir/mnt1"
echo "stop:   scripts/cluster-down.sh"
