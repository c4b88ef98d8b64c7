#!/usr/bin/env bash
# Installs what a modelfs cluster and its tests need beyond a single node: etcd (Debian's
# etcd-server, the metadata engine's consensus) and etcdctl (etcd-client, for looking inside).
# Nothing is started here: scripts/cluster-up.sh and the tests start their own members on loopback.
set -euo pipefail

need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)
# The network lab (scripts/lab-up.sh, Tests/integration/test_lab.py): nftables cuts one pair of hosts.
command -v nft >/dev/null 2>&1 || need+=(nftables)
command -v tc >/dev/null 2>&1 || need+=(iproute2)

if [ "${#need[@]}" -gt 0 ]; then
    . "$(dirname "${BASH_SOURCE[0]}")/lib-apt.sh"
    apt_install "${need[@]}"
    # The package would start a system-wide etcd where systemd runs: modelfs starts its own.
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
        if [ "$(id -u)" = 0 ]; then systemctl disable --now etcd >/dev/null 2>&1 || true
        else sudo systemctl disable --now etcd >/dev/null 2>&1 || true; fi
    fi
fi
