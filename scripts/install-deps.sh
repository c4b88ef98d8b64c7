#!/usr/bin/env bash
# Installs what modelfs needs on a Debian/Ubuntu machine: libfuse3 (headers and library) and
# fuse3 (fusermount3), plus pkg-config for the Swift build. Needs root (or sudo) only when
# something is missing. Swift itself must already be installed (https://www.swift.org/install).
set -euo pipefail

need=()
dpkg -s libfuse3-dev >/dev/null 2>&1 || need+=(libfuse3-dev)
dpkg -s fuse3 >/dev/null 2>&1 || need+=(fuse3)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)

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
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

if ! command -v swift >/dev/null 2>&1; then
    echo "modelfs: the Swift toolchain is missing; install Swift 6 (https://www.swift.org/install) and retry" >&2
    exit 1
fi
if [ ! -e /dev/fuse ]; then
    echo "modelfs: /dev/fuse is missing; load the FUSE module (modprobe fuse) or run in a container with --device /dev/fuse" >&2
    exit 1
fi
