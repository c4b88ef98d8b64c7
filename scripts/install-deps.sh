#!/usr/bin/env bash
# Installs what modelfs needs on a Debian/Ubuntu machine: libfuse3 (headers and library) and
# fuse3 (fusermount3), plus pkg-config for the Swift build. Needs root (or sudo) only when
# something is missing. Swift itself must already be installed (https://www.swift.org/install).
set -euo pipefail

need=()
dpkg -s libfuse3-dev >/dev/null 2>&1 || need+=(libfuse3-dev)
dpkg -s fuse3 >/dev/null 2>&1 || need+=(fuse3)
# OpenSSL for mutual TLS between peers (CModelFSTLS links libssl).
dpkg -s libssl-dev >/dev/null 2>&1 || need+=(libssl-dev)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)

. "$(dirname "${BASH_SOURCE[0]}")/lib-apt.sh"
apt_install "${need[@]}"

if ! command -v swift >/dev/null 2>&1; then
    echo "modelfs: the Swift toolchain is missing; install Swift 6 (https://www.swift.org/install) and retry" >&2
    exit 1
fi
if [ ! -e /dev/fuse ]; then
    echo "modelfs: /dev/fuse is missing; load the FUSE module (modprobe fuse) or run in a container with --device /dev/fuse" >&2
    exit 1
fi
