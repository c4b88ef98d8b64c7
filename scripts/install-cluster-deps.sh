#!/usr/bin/env bash
# Installs what a modelfs cluster and its tests need beyond a single node: etcd (Debian's
# etcd-server, the metadata engine's consensus) and etcdctl (etcd-client, for looking inside).
# Nothing is started here: scripts/cluster-up.sh and the tests start their own members on loopback.
set -euo pipefail

need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || need+=(etcd-client)

if [ "${#need[@]}" -gt 0 ]; then
    sudo=""
    if [ "$(id -u)" != 0 ]; then
        if command -v sudo >/dev/null 2>&1; then sudo="sudo"; else
            echo "modelfs: missing packages ${need[*]}; install them as root: apt-get install ${need[*]}" >&2
            exit 1
        fi
    fi
    echo "installing ${need[*]}"
    $sudo apt-get update -qq
    # The package would start a system-wide etcd where systemd runs: modelfs starts its own.
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
        $sudo systemctl disable --now etcd >/dev/null 2>&1 || true
    fi
fi
