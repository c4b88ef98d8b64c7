"""Real-mount integration fixtures for modelfs.

Every test here mounts the real binary (env MODELFS_BIN, default
<repo>/.build/release/modelfs) on a temporary mountpoint with FUSE and talks to
it through ordinary syscalls.  If the binary is missing the suite FAILS, unless
MODELFS_ALLOW_SKIP=1 is set, in which case it is skipped with a reason.

Fixtures:
  modelfs_bin    path of the binary (session; fails/skips if missing)
  mount_factory  callable(**kw) -> started Mount; all are torn down after the test
  mnt            one started Mount on a fresh data dir
  workdir        pathlib.Path of a fresh directory inside `mnt`
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
from pathlib import Path

import pytest

from mfs import MODELFS_BIN, Mount, _ALL_MOUNTS  # noqa: F401

# --------------------------------------------------------------------------
# pytest plumbing
# --------------------------------------------------------------------------

def _binary_problem() -> str | None:
    if not os.path.exists(MODELFS_BIN):
        return f"modelfs binary not found at {MODELFS_BIN} (run `swift build -c release` or set MODELFS_BIN)"
    if not os.access(MODELFS_BIN, os.X_OK):
        return f"modelfs binary at {MODELFS_BIN} is not executable"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "spark: Spark (pyspark, a JVM per phase): the slowest framework tests")


def pytest_collection_modifyitems(config, items):
    problem = _binary_problem()
    if problem and os.environ.get("MODELFS_ALLOW_SKIP") == "1":
        marker = pytest.mark.skip(reason=f"{problem} [MODELFS_ALLOW_SKIP=1]")
        for item in items:
            item.add_marker(marker)


@pytest.fixture(scope="session", autouse=True)
def modelfs_bin():
    problem = _binary_problem()
    if problem:
        if os.environ.get("MODELFS_ALLOW_SKIP") == "1":
            pytest.skip(problem)
        pytest.fail(problem + " (set MODELFS_ALLOW_SKIP=1 to skip instead)", pytrace=False)
    yield MODELFS_BIN
    # Session end: never leak a mount.
    for m in list(_ALL_MOUNTS):
        try:
            m.destroy()
        except Exception:  # noqa: BLE001
            pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for m in getattr(item, "_modelfs_mounts", []):
            rep.sections.append((f"modelfs daemon log ({m.root})", m.log_tail()))


@pytest.fixture
def mount_factory(request, modelfs_bin):
    mounts: list[Mount] = []
    request.node._modelfs_mounts = mounts

    def make(start: bool = True, **kw) -> Mount:
        m = Mount(modelfs_bin, **kw)
        mounts.append(m)
        if start:
            m.start()
        return m

    yield make
    errors = []
    for m in reversed(mounts):
        try:
            m.destroy()
        except AssertionError as e:
            errors.append(str(e))
    if errors:
        pytest.fail("\n".join(errors), pytrace=False)


TEST_TIMEOUT = float(os.environ.get("MODELFS_TEST_TIMEOUT", "300"))


@pytest.fixture(autouse=True)
def _hang_watchdog(request):
    """A hung FUSE call would block the suite forever: after TEST_TIMEOUT seconds
    dump all stacks and SIGKILL this test's daemons, which aborts their FUSE
    connections so blocked syscalls return ENOTCONN and the test fails."""
    def fire():
        sys.stderr.write(f"\n*** {request.node.nodeid}: no progress after {TEST_TIMEOUT}s; "
                         f"dumping stacks and killing its modelfs daemons ***\n")
        faulthandler.dump_traceback(all_threads=True)
        for m in getattr(request.node, "_modelfs_mounts", []):
            if m.proc is not None and m.proc.poll() is None:
                m._log(f"watchdog: test exceeded {TEST_TIMEOUT}s; SIGKILL {m.proc.pid}")
                os.kill(m.proc.pid, signal.SIGKILL)

    t = threading.Timer(TEST_TIMEOUT, fire)
    t.daemon = True
    t.start()
    yield
    t.cancel()


@pytest.fixture
def mnt(mount_factory) -> Mount:
    return mount_factory()


@pytest.fixture
def workdir(mnt) -> Path:
    d = mnt.path("w")
    d.mkdir()
    return d
