#!/usr/bin/env bash
# The test command (README.md; .ci/run calls it). Tiers, in order:
#   1. unit, conformance and model-based tests (swift test; no kernel). The etcd engine and the
#      peer tests start their own etcd members and peer servers on loopback.
#   2. real-mount tests: POSIX, durability (kill -9), random I/O, errors, frameworks, and
#      loopback clusters of several nodes (pytest); with them the framework matrix (torch,
#      safetensors, TensorFlow, Keras, Orbax, transformers, h5py, joblib, Spark) on one node and
#      across nodes, stress-ng and CPython's file tests on the mount (issue #5); then the core
#      suites (POSIX, random I/O, durability) again with --no-passthrough
# Needs root (FUSE mounts with allow_other, tmpfs for the disk-full test).
# Usage: scripts/test.sh [unit|mount|cluster|frameworks|tsan|all]   (default: all = unit + mount;
# `cluster` runs only the cluster suites of tier 2 (loopback clusters, healing, the network lab,
# peer and etcd TLS, frameworks across nodes); `frameworks` only the framework matrix and peer
# suites; `tsan` the unit tests built with ThreadSanitizer, in .build-tsan)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
tier="${1:-all}"
case "$tier" in unit|mount|cluster|frameworks|tsan|all) ;; *)
    echo "scripts/test.sh: no tier \"$tier\" (unit, mount, cluster, frameworks, tsan or all)" >&2; exit 2 ;;
esac


scripts/install-deps.sh
scripts/install-cluster-deps.sh

if [ "$tier" = unit ] || [ "$tier" = all ]; then
    echo "== unit, conformance and model-based tests"
    swift build --build-tests
    # A crash prints only the crashed thread's backtrace, so CI's tail of the log names it.
    SWIFT_BACKTRACE="enable=yes,threads=crashed,registers=none,images=none" swift test --skip-build
fi

if [ "$tier" = tsan ]; then
    echo "== unit tests under ThreadSanitizer"
    # -DMODELFS_TSAN: each module's Mutex is TrackedMutex, which ThreadSanitizer can see (TSan.swift).
    swift build --build-tests --sanitize=thread --scratch-path .build-tsan -Xswiftc -DMODELFS_TSAN
    # halt_on_error: the first race fails the run, with both stacks in the log.
    TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" \
        swift test --skip-build --sanitize=thread --scratch-path .build-tsan -Xswiftc -DMODELFS_TSAN
fi

if [ "$tier" = mount ] || [ "$tier" = all ] || [ "$tier" = frameworks ] || [ "$tier" = cluster ]; then
    echo "== release build"
    swift build -c release --product modelfs
    # The manual's generator (scripts/install.sh, tested by test_deploy.py).
    swift build -c release --product generate-manual
    scripts/install-python-deps.sh
    scripts/install-framework-deps.sh
fi
if [ "$tier" = mount ] || [ "$tier" = all ]; then
    echo "== real-mount tests"
    MODELFS_BIN="$PWD/.build/release/modelfs" scripts/test-mount.sh
    # Passthrough is on by default: the core suites once more with it off (today's read path).
    echo "== core real-mount tests with --no-passthrough"
    MODELFS_TEST_PASSTHROUGH=0 MODELFS_BIN="$PWD/.build/release/modelfs" scripts/test-mount.sh \
        Tests/integration/test_posix.py Tests/integration/test_posix_more.py \
        Tests/integration/test_random_io.py Tests/integration/test_durability.py
fi
if [ "$tier" = cluster ]; then
    echo "== cluster suites"
    MODELFS_BIN="$PWD/.build/release/modelfs" scripts/test-mount.sh \
        Tests/integration/test_cluster.py Tests/integration/test_heal.py Tests/integration/test_lab.py \
        Tests/integration/test_peer_tls.py Tests/integration/test_etcd_security.py Tests/integration/test_frameworks_cluster.py \
        Tests/integration/test_fanout.py
fi
if [ "$tier" = frameworks ]; then
    echo "== framework matrix and peer suites"
    MODELFS_BIN="$PWD/.build/release/modelfs" scripts/test-mount.sh \
        Tests/integration/test_frameworks*.py Tests/integration/test_peer_suites.py
fi
