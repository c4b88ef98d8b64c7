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
import json
import os
import shutil
import sys
import time

import pytest

from mfs import MiB, in_child
from test_cluster import etcd, make_nodes  # noqa: F401  (fixtures)
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


# ---------------------------------------------------------------------------
# fio with data verification
# ---------------------------------------------------------------------------
# Each job writes with a crc32c checksum in every block (fio's `verify`), then reads every block
# back and checks it: a lost, stale, torn or misplaced write fails the job (fio exits non-zero
# with "verify: bad header / bad checksum"). The jobs cover the I/O paths trainers and data
# loaders use that the frameworks above do not: O_DIRECT with async I/O in flight, io_uring,
# stores through a shared mmap, random sizes with periodic fsync, several writers on one inode,
# and overwriting an existing file in place.

FIO = shutil.which("fio")

FIO_GLOBAL = {"verify": "crc32c", "verify_fatal": "1", "verify_backlog": "0", "group_reporting": "0", "verify_state_save": "0",
              "randrepeat": "1", "end_fsync": "1"}
FIO_JOBS = {
    # name -> (options, bytes each job must write)
    "libaio-direct-seq": ({"ioengine": "libaio", "direct": "1", "iodepth": "8", "rw": "write", "bs": "1M",
                           "size": "64M"}, 64 * MiB),
    "psync-random-sizes-fsync": ({"ioengine": "psync", "rw": "randwrite", "bsrange": "4k-64k", "bs_unaligned": "1",
                                  "size": "32M", "fsync": "16"}, 32 * MiB),
    "mmap-randwrite": ({"ioengine": "mmap", "rw": "randwrite", "bs": "16k", "size": "32M"}, 32 * MiB),
    "io_uring-randwrite": ({"ioengine": "io_uring", "iodepth": "16", "rw": "randwrite", "bs": "8k",
                            "size": "32M"}, 32 * MiB),
    # four processes, one file, each its own 8 MiB region, written concurrently
    "four-writers-one-file": ({"ioengine": "psync", "rw": "randwrite", "bs": "4k", "numjobs": "4",
                               "filename": "shared.dat", "size": "8M", "offset_increment": "8M"}, 8 * MiB),
}


def fio_job_file(path, directory, jobs: dict[str, dict], **extra) -> None:
    lines = ["[global]", f"directory={directory}", *(f"{k}={v}" for k, v in {**FIO_GLOBAL, **extra}.items())]
    for name, opts in jobs.items():
        lines += [f"[{name}]", *(f"{k}={v}" for k, v in opts.items())]
    path.write_text("\n".join(lines) + "\n")


def run_fio(job_file, out) -> list[dict]:
    """Run fio on a job file; assert it succeeded with no verification error; its per-job results."""
    r = run_child([FIO, "--output-format=json", f"--output={out}", job_file], timeout=600)
    text = out.read_text() if out.exists() else ""
    assert r.returncode == 0, f"fio failed (rc={r.returncode}):\n{r.stdout[-6000:]}\n{text[-3000:]}"
    assert "verify failed" not in r.stdout and "verify:" not in r.stdout, r.stdout[-6000:]
    report = json.loads(text[text.index("{"):])      # fio may print notices before the JSON
    for job in report["jobs"]:
        assert job["error"] == 0, f"fio job {job['jobname']}: error {job['error']}"
    return report["jobs"]


@pytest.mark.skipif(FIO is None, reason="fio missing: run scripts/install-framework-deps.sh")
@pytest.mark.parametrize("name", list(FIO_JOBS))
def test_fio_verified(name, mnt, tmp_path):
    if name.startswith("io_uring"):
        probe = run_child([FIO, "--name=probe", "--ioengine=io_uring", "--size=4k", "--rw=write",
                           f"--filename={tmp_path / 'probe'}"], timeout=60)
        if probe.returncode != 0:
            pytest.skip(f"io_uring unavailable on this kernel: {probe.stdout.strip()[-300:]}")
    d = mnt.path("fio")
    d.mkdir()
    opts, each = FIO_JOBS[name]
    fio_job_file(tmp_path / "job.fio", d, {name: opts})
    jobs = run_fio(tmp_path / "job.fio", tmp_path / "out.json")
    assert len(jobs) == int(opts.get("numjobs", 1))
    for job in jobs:
        wrote, verified = job["write"]["io_bytes"], job["read"]["io_bytes"]
        # random block sizes leave a few gaps smaller than the next pick: ≥ 90% of the region
        assert wrote >= 0.9 * each, f"{job['jobname']} wrote {wrote} of {each} bytes"
        assert verified == wrote, f"{job['jobname']} wrote {wrote} bytes, read back and verified {verified}"
    assert mnt.proc.poll() is None, "the daemon died"


@pytest.mark.skipif(FIO is None, reason="fio missing: run scripts/install-framework-deps.sh")
def test_fio_overwrite_in_place_then_verify_after_remount(mount_factory, tmp_path):
    """A file laid down sequentially, then overwritten in place at random 4-24 KiB pieces (every one
    straddling or inside a block, so each is a read-modify-write of stored data), verified; then the
    daemon is restarted and fio verifies every block again from the store (verify_only)."""
    m = mount_factory()
    d = m.path("fio")
    d.mkdir()
    base = {"ioengine": "psync", "filename": "over.dat", "size": "48M"}
    fio_job_file(tmp_path / "lay.fio", d, {"lay": {**base, "rw": "write", "bs": "1M", "do_verify": "0"}})
    run_fio(tmp_path / "lay.fio", tmp_path / "lay.json")
    over = {"over": {**base, "rw": "randwrite", "bsrange": "4k-24k", "bs_unaligned": "1", "overwrite": "1"}}
    fio_job_file(tmp_path / "over.fio", d, over)
    jobs = run_fio(tmp_path / "over.fio", tmp_path / "over.json")
    assert jobs[0]["read"]["io_bytes"] >= 0.9 * 48 * MiB
    m.remount()      # a fresh daemon: nothing of the file left in its memory or the page cache
    fio_job_file(tmp_path / "again.fio", d, over, verify_only="1")
    jobs = run_fio(tmp_path / "again.fio", tmp_path / "again.json")
    assert jobs[0]["read"]["io_bytes"] >= 0.9 * 48 * MiB, jobs[0]["read"]["io_bytes"]
    assert m.proc.poll() is None, "the daemon died"


@pytest.mark.skipif(FIO is None, reason="fio missing: run scripts/install-framework-deps.sh")
def test_fio_written_on_one_node_verified_on_another(make_nodes, tmp_path):
    """fio writes on A (checksummed blocks, no read-back there); once it has exited, B verifies every
    block (verify_only: fio replays the same offsets and sizes); then B overwrites pieces of the
    file in place and A, whose page cache held the old bytes, verifies B's version."""
    a, b = make_nodes(2, replicas=2, ack=1)
    os.makedirs(a / "fio")
    written = {
        "seq-direct": {"ioengine": "libaio", "direct": "1", "iodepth": "8", "rw": "write", "bs": "1M",
                       "size": "48M", "filename": "seq.dat"},
        "random-sizes": {"ioengine": "psync", "rw": "randwrite", "bsrange": "4k-64k", "bs_unaligned": "1",
                         "size": "24M", "fsync": "16", "filename": "rand.dat"},
    }
    fio_job_file(tmp_path / "w.fio", a / "fio", written, do_verify="0")
    run_fio(tmp_path / "w.fio", tmp_path / "w.json")
    fio_job_file(tmp_path / "v.fio", b / "fio", written, verify_only="1")
    jobs = run_fio(tmp_path / "v.fio", tmp_path / "v.json")
    assert sorted(j["jobname"] for j in jobs) == sorted(written)
    for j in jobs:
        assert j["read"]["io_bytes"] >= 0.9 * (48 if j["jobname"] == "seq-direct" else 24) * MiB, j["read"]

    over = {"over": {"ioengine": "psync", "rw": "randwrite", "bsrange": "4k-24k", "bs_unaligned": "1",
                     "size": "24M", "overwrite": "1", "filename": "rand.dat", "randseed": "77"}}
    fio_job_file(tmp_path / "o.fio", b / "fio", over, do_verify="0")
    run_fio(tmp_path / "o.fio", tmp_path / "o.json")
    fio_job_file(tmp_path / "ov.fio", a / "fio", over, verify_only="1")
    jobs = run_fio(tmp_path / "ov.fio", tmp_path / "ov.json")
    assert jobs[0]["read"]["io_bytes"] >= 0.9 * 24 * MiB, jobs[0]["read"]
    assert a.proc.poll() is None and b.proc.poll() is None, "a daemon died"
