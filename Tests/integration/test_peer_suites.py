"""Other projects' test suites against a live mount (issue #5):

- stress-ng's filesystem stressors (Debian's stress-ng), each with --verify, on the mount;
- CPython's own regression tests for files (`python -m test`, the installed interpreter's), with
  their working directory (--tempdir) and TMPDIR on the mount.

What does not pass is excluded here by name, with its reason, and listed in docs/COMPATIBILITY.md:
either a documented limit of modelfs (non-UTF-8 names, FIFOs, FIEMAP) or a modelfs bug, which then
has a minimal reproduction below (marked xfail(strict=True) until it is fixed).
"""
from __future__ import annotations

import errno
import os
import shutil
import sys
import time

import pytest

from mfs import in_child
from test_frameworks_matrix import run_child

STRESS_NG = shutil.which("stress-ng")
STRESS_SECONDS = os.environ.get("MODELFS_STRESS_SECONDS", "3")

# stressor -> extra options (sizes kept small: the point is the syscalls, verified, not the volume)
STRESSORS = {
    "hdd": ["--hdd-bytes", "64M"],
    "seek": ["--seek-size", "64M"],
    "iomix": ["--iomix-bytes", "32M"],
    "readahead": ["--readahead-bytes", "32M"],
    "revio": ["--revio-bytes", "32M"],
    "io": [],
    "aio": [],
    "sync-file": ["--sync-file-bytes", "32M"],
    "fallocate": ["--fallocate-bytes", "16M"],
    "fpunch": [],
    "copy-file": ["--copy-file-bytes", "128M"],
    "sendfile": [],
    "splice": [],
    "mmap": ["--mmap-file", "--mmap-bytes", "16M"],
    "msync": [],
    "rename": [],
    "dir": [],
    "dirdeep": [],
    "dentry": [],
    "link": [],
    "symlink": [],
    "filename": [],
    "open": [],
    "touch": [],
    "fstat": [],
    "chmod": [],
    "chown": [],
    "utime": [],
    "xattr": [],
    "flock": [],
    "lockf": [],
    "lockofd": [],
    "locka": [],
    "fcntl": [],
    "lease": [],
    "file-ioctl": [],
    "dup": [],
    "fsize": [],
}
# Not run, with the reason (also in docs/COMPATIBILITY.md):
STRESS_EXCLUDED = {
    "fiemap": "FUSE has no FIEMAP ioctl (stress-ng skips itself: 'FS_IOC_FIEMAP not supported')",
}


@pytest.mark.skipif(STRESS_NG is None, reason="stress-ng missing: run scripts/install-framework-deps.sh")
@pytest.mark.parametrize("stressor", list(STRESSORS) + [
    pytest.param(s, marks=pytest.mark.skip(reason=f"excluded: {why}")) for s, why in STRESS_EXCLUDED.items()])
def test_stress_ng(stressor, mnt):
    d = mnt.path("stress")
    d.mkdir()
    r = run_child([STRESS_NG, f"--{stressor}", "2", *STRESSORS.get(stressor, []), "--timeout", f"{STRESS_SECONDS}s",
                   "--verify", "--temp-path", d, "--metrics-brief", "--no-rand-seed"], timeout=180)
    assert r.returncode == 0, f"stress-ng --{stressor} failed (rc={r.returncode}):\n{r.stdout[-6000:]}"
    assert "skipping stressor" not in r.stdout, r.stdout[-3000:]
    assert mnt.proc.poll() is None, "the daemon died"


# ---------------------------------------------------------------------------
# CPython's regression tests
# ---------------------------------------------------------------------------

CPYTHON_TESTS = ["test_os", "test_shutil", "test_tempfile", "test_zipfile", "test_tarfile", "test_mmap",
                 "test_fileio", "test_io", "test_fcntl", "test_posix", "test_pathlib", "test_file",
                 "test_largefile", "test_glob", "test_filecmp", "test_fileinput", "test_genericpath",
                 "test_posixpath", "test_stat", "test_dbm", "test_compileall"]
# test ids excluded from the run (glob patterns for `python -m test --ignorefile`) -> reason
CPYTHON_EXCLUDED = {
    "test.test_os.Pep383Tests.*": "non-UTF-8 file names: modelfs stores UTF-8 names only (EILSEQ, docs/SEMANTICS.md)",
    "test.test_posixpath.PosixCommonTest.test_nonascii_abspath":
        "non-UTF-8 file names: modelfs stores UTF-8 names only (EILSEQ)",
    "test.test_tarfile.TestExtractionFilters.test_pipe": "FIFOs: mkfifo is EPERM on modelfs (docs/SEMANTICS.md)",
    "test.test_compileall.HardlinkDedupTests*.test_import":
        "fails the same way in a plain local directory on this machine (opt-1.pyc stays hard-linked after "
        "`python -O -c 'import module'`): not a filesystem matter",
}


def test_cpython_regression_tests(mnt, tmp_path):
    work = mnt.path("cpython")
    tmp = mnt.path("tmp")
    work.mkdir()
    tmp.mkdir()
    ignore = tmp_path / "ignore.txt"
    ignore.write_text("\n".join(CPYTHON_EXCLUDED) + "\n")
    env = dict(os.environ, TMPDIR=str(tmp))
    r = run_child([sys.executable, "-m", "test", "--tempdir", work, "-j2", "--timeout", "600",
                   "--ignorefile", ignore, *CPYTHON_TESTS], timeout=1500, env=env, cwd=str(work))
    tail = r.stdout[-12000:]
    assert r.returncode == 0, f"CPython's tests failed on the mount (rc={r.returncode}):\n{tail}"
    assert "Tests result: SUCCESS" in r.stdout, tail
    assert mnt.proc.poll() is None, "the daemon died"


# ---------------------------------------------------------------------------
# Minimal reproductions of the modelfs bugs the peer suites found (fixed; kept as regression tests)
# ---------------------------------------------------------------------------

def test_utime_far_future_does_not_kill_the_daemon(mnt):
    p = mnt.path("f")
    p.write_bytes(b"x")
    mnt.expect_dead = True          # if it dies, the assertion below reports it, not the teardown
    outcome = None
    try:
        os.utime(p, (2**35, 2**35))     # CPython's test_compileall does this
        outcome = os.stat(p).st_mtime_ns
    except OSError as e:
        outcome = e
    # Either the time is kept exactly or refused with an errno, never a crash (a dead daemon shows as
    # ECONNABORTED/ENOTCONN here or on the next call).
    if isinstance(outcome, OSError):
        assert outcome.errno in (errno.EINVAL, errno.EOVERFLOW, errno.ERANGE), f"utime(2**35): {outcome!r}"
    else:
        assert outcome == 2**35 * 10**9, outcome
    os.stat(p)
    assert mnt.proc.poll() is None, f"the daemon died (rc={mnt.proc.returncode})"
    mnt.expect_dead = False


def test_touch_never_moves_mtime_backwards(mnt):
    back = []
    for i in range(30):
        p = mnt.path(f"t{i}")
        p.touch()
        before = os.stat(p).st_mtime_ns
        os.utime(p, None)                   # UTIME_NOW, what `touch` and pathlib.Path.touch do
        after = os.stat(p).st_mtime_ns
        if after < before:
            back.append(before - after)
    assert not back, f"{len(back)}/30 touches moved mtime backwards, by up to {max(back) / 1e6:.1f} ms"


def test_close_after_extending_a_file_is_not_proportional_to_its_size(mnt):
    def extend(path, how):
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        if how == "fallocate":
            os.posix_fallocate(fd, (2 << 30) - 1, 1)
        elif how == "ftruncate":
            os.ftruncate(fd, 2 << 30)
        else:
            os.pwrite(fd, b"x", (2 << 30) - 1)
        t = time.monotonic()
        os.close(fd)
        return time.monotonic() - t

    for how in ("ftruncate", "pwrite", "fallocate"):
        took = in_child(extend, str(mnt.path(how)), how, timeout=120)
        assert took < 1.0, f"close() after {how} to 2 GiB took {took:.1f} s"
        assert os.stat(mnt.path(how)).st_size == 2 << 30
