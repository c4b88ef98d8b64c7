#!/usr/bin/env bash
# Cluster benchmark (issue #3), all in one run on this machine's loopback:
#   a single modelfs node (the baseline), then a 3-node cluster on a real 3-member etcd:
#   write SIZE on node A with R=3 at K=1 and at K=3, time from close() to 3 verified copies,
#   cold read on node B of a file whose blocks are all remote; peak RSS of every node; and
#   MooseFS with goal 3 writing the same bytes (Debian's moosefs-* packages, installed here).
#   The floor of this machine is printed beside them: three fsynced copies written to a plain
#   directory, since the three nodes of the bench share one disk.
#
#   scripts/bench/cluster.sh [--size-mib N] [--dir DIR] [--no-moosefs]
#   scripts/bench/cluster.sh --lab [--size-mib N] [--link RATE] [--hosts H] [--no-moosefs] [--data tmpfs|disk]
#                                  [--heal-link RATE] [--heal-mib N] [--only write,read,heal,moosefs]
#
# With --lab (issue #26) it runs in the network lab instead (scripts/bench/labbench.py): hosts in
# network namespaces on links shaped to RATE (default 1gbit), every figure a fraction of the link
# rate measured in the same run, CPU idle per phase, MooseFS goal 3 on the same links.
#
# Needs root (drop_caches, FUSE, a network namespace for MooseFS), etcd
# (scripts/install-cluster-deps.sh), the release binary and the venv. Prints a table of ratios;
# writes bench-results/cluster.md (git-ignored).
set -euo pipefail
if [[ " $* " != *" --no-moosefs "* ]]; then
    need=()
    for p in mfsmaster:moosefs-master mfschunkserver:moosefs-chunkserver mfsmount:moosefs-client; do
        command -v "${p%%:*}" >/dev/null 2>&1 || need+=("${p#*:}")
    done
    if [ "${#need[@]}" -gt 0 ]; then
        . "$(dirname "${BASH_SOURCE[0]}")/../lib-apt.sh"
        apt_install "${need[@]}"
    fi
fi
if [[ " $* " == *" --lab "* ]]; then
    args=()
    for a in "$@"; do [ "$a" = --lab ] || args+=("$a"); done
    exec "$(dirname "${BASH_SOURCE[0]}")/run-py.sh" labbench "${args[@]}"
fi
exec "$(dirname "${BASH_SOURCE[0]}")/run-py.sh" cluster "$@"
