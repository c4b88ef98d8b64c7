"""CLI error handling, umount refusal, corrupt blocks (EIO) and disk full (ENOSPC)."""
from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import shutil
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from mfs import (MODELFS_BIN, MiB, Mount, assert_bytes_equal, fusermount_lazy, in_child, is_mounted,
                 mountinfo, pack_records, pid_alive, read_file, run, wait_pid_exit, wait_until, write_file)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------

@pytest.fixture
def scratch():
    """A temp dir (0755) for error cases; anything left mounted under it is unmounted, and a
    daemon whose data dir is under it is stopped."""
    root = Path(tempfile.mkdtemp(prefix="modelfs-err-"))
    os.chmod(root, 0o755)
    yield root
    for point, fs, _ in mountinfo():
        if point.startswith(str(root) + "/") and fs.startswith("fuse"):
            run(["fusermount3", "-u", "-z", point], timeout=30)
    for pidfile in root.glob("**/modelfs.pid"):
        _kill_stray_daemon(pidfile.parent)
    for point, fs, _ in reversed(mountinfo()):
        if point.startswith(str(root) + "/"):
            run(["umount", "-l", point], timeout=30)
    shutil.rmtree(root, ignore_errors=True)


def _kill_stray_daemon(data_dir: Path):
    pidfile = data_dir / "modelfs.pid"
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return
    if pid_alive(pid):
        os.kill(pid, 9)
        wait_pid_exit(pid, 10)


def expect_cli_error(args, phrase: str, timeout: float = 30, **kw) -> str:
    """Run a CLI command that must fail: non-zero exit, ONE line on stderr containing phrase."""
    try:
        r = run(args, timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{' '.join(map(str, args))} hung for {timeout}s instead of failing")
    err_lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode != 0, f"expected failure, got rc=0; stdout={r.stdout!r} stderr={r.stderr!r}"
    assert err_lines, f"no message on stderr (rc={r.returncode}, stdout={r.stdout!r})"
    assert re.search(phrase, r.stderr, re.I), f"stderr lacks {phrase!r}: {r.stderr!r}"
    assert len(err_lines) == 1, f"expected exactly one line on stderr, got {len(err_lines)}: {r.stderr!r}"
    return err_lines[0]


def _ensure_unmounted(mp: Path, data: Path | None = None):
    if is_mounted(mp, None):
        fusermount_lazy(mp)
    if data is not None:
        _kill_stray_daemon(data)


# ---------------------------------------------------------------------------
# CLI errors
# ---------------------------------------------------------------------------

def test_version(modelfs_bin, mnt):
    r = run([modelfs_bin, "--version"])
    m = re.fullmatch(r"modelfs \d+\.\d+\.\d+ \(commit ([0-9a-f]{12}(\+changes)?|unknown)\)\n", r.stdout)
    assert r.returncode == 0 and m, (r.stdout, r.stderr)
    assert r.stdout.strip()[len("modelfs "):] in mnt.log_tail(), "the daemon's log names its version"
    # Built from this checkout: the commit is HEAD's (binaries built elsewhere are not checked).
    from mfs import REPO
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    # (A binary built from uncommitted changes names the commit they were made on.)
    if head.returncode == 0 and Path(modelfs_bin).resolve().is_relative_to(REPO) and not m.group(2):
        assert m.group(1) == head.stdout.strip(), f"the binary was built from {m.group(1)}, HEAD is {head.stdout.strip()}"


def test_mount_missing_mountpoint(modelfs_bin, scratch):
    data = scratch / "data"
    data.mkdir()
    mp = scratch / "no-such-dir"
    try:
        expect_cli_error([modelfs_bin, "mount", mp, "--data", data], "does not exist")
    finally:
        _ensure_unmounted(mp, data)
    assert not mp.exists()


def test_mount_mountpoint_is_a_file(modelfs_bin, scratch):
    data = scratch / "data"
    data.mkdir()
    mp = scratch / "file"
    mp.write_bytes(b"not a dir")
    try:
        expect_cli_error([modelfs_bin, "mount", mp, "--data", data], "not a directory")
    finally:
        _ensure_unmounted(mp, data)
    assert not is_mounted(mp, None)


def test_mount_already_mounted(mnt, scratch):
    other_data = scratch / "data2"
    other_data.mkdir()
    write_file(mnt.path("keep"), b"still here")
    try:
        expect_cli_error([mnt.bin, "mount", mnt.mp, "--data", other_data], "already mounted")
        # also in foreground mode it must fail rather than stack a second mount
        expect_cli_error([mnt.bin, "mount", mnt.mp, "--data", other_data, "-f"], "already mounted")
    finally:
        _kill_stray_daemon(other_data)
    stacked = [p for p, fs, _ in mountinfo() if p == str(mnt.mp)]
    assert len(stacked) == 1, f"{len(stacked)} mounts stacked on {mnt.mp}"
    assert read_file(mnt.path("keep")) == b"still here"
    assert mnt.proc.poll() is None, "the original daemon died"


def test_mount_unknown_meta_scheme(modelfs_bin, scratch):
    data, mp = scratch / "data", scratch / "mnt"
    data.mkdir()
    mp.mkdir()
    try:
        expect_cli_error([modelfs_bin, "mount", mp, "--data", data, "--meta", "foo:bar"], "unknown")
    finally:
        _ensure_unmounted(mp, data)
    assert not is_mounted(mp, None)


def test_mount_writeback_cache_refused_on_a_cluster_node(modelfs_bin, scratch):
    data, mp = scratch / "data", scratch / "mnt"
    data.mkdir()
    mp.mkdir()
    try:
        expect_cli_error([modelfs_bin, "mount", mp, "--data", data, "--meta", "etcd://127.0.0.1:2379",
                          "-o", "writeback_cache"], "single node")
    finally:
        _ensure_unmounted(mp, data)
    assert not is_mounted(mp, None)


def _exec_as_nobody():
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)


def test_mount_data_dir_not_writable_as_other_user(modelfs_bin, scratch):
    # root-owned 0755 data dir, mounted by uid 65534 -> cannot write there.
    data, mp = scratch / "data", scratch / "mnt"
    data.mkdir(mode=0o755)
    mp.mkdir()
    os.chmod(mp, 0o777)
    if not in_child(os.access, "/dev/fuse", os.R_OK | os.W_OK, uid=65534, gid=65534):
        pytest.skip("/dev/fuse is not accessible to uid 65534 here, so a non-root mount stops before "
                    "the data-dir check (covered as root by the read-only and under-a-file tests)")
    # the binary must be reachable by uid 65534 (no 0700 dir on the way)
    assert subprocess.run(["test", "-x", modelfs_bin], preexec_fn=_exec_as_nobody).returncode == 0, (
        f"{modelfs_bin} is not executable by uid 65534")
    try:
        expect_cli_error([modelfs_bin, "mount", mp, "--data", data], "not writable",
                         preexec_fn=_exec_as_nobody)
    finally:
        _ensure_unmounted(mp, data)
    assert not is_mounted(mp, None)


def test_mount_data_dir_under_regular_file(modelfs_bin, scratch):
    f = scratch / "plainfile"
    f.write_bytes(b"x")
    mp = scratch / "mnt"
    mp.mkdir()
    try:
        expect_cli_error([modelfs_bin, "mount", mp, "--data", f / "data"], "not writable|not a directory")
    finally:
        _ensure_unmounted(mp)
    assert not is_mounted(mp, None)


def test_mount_data_dir_on_readonly_fs(modelfs_bin, scratch):
    data, mp = scratch / "rodata", scratch / "mnt"
    data.mkdir()
    mp.mkdir()
    r = run(["mount", "-t", "tmpfs", "-o", "ro,size=4m", "tmpfs", data])
    assert r.returncode == 0, f"cannot mount a read-only tmpfs: {r.stderr}"
    try:
        expect_cli_error([modelfs_bin, "mount", mp, "--data", data], "not writable")
    finally:
        _ensure_unmounted(mp)
        run(["umount", data])
    assert not is_mounted(mp, None)


# ---------------------------------------------------------------------------
# daemon mode, meta backends
# ---------------------------------------------------------------------------

def test_daemon_mode_mount_and_umount(modelfs_bin, scratch):
    data, mp = scratch / "data", scratch / "mnt"
    data.mkdir()
    mp.mkdir()
    try:
        t0 = time.monotonic()
        r = run([modelfs_bin, "mount", mp, "--data", data], timeout=60)
        assert r.returncode == 0, f"daemon-mode mount failed rc={r.returncode}: {r.stderr!r}"
        assert is_mounted(mp), "mount returned 0 but the mount is not live yet"
        pid = int((data / "modelfs.pid").read_text().strip())
        assert pid_alive(pid), f"pid file names {pid}, which is not running"
        write_file(mp / "hello", b"daemonized")
        assert read_file(mp / "hello") == b"daemonized"
        assert time.monotonic() - t0 < 30
        r = run([modelfs_bin, "umount", mp], timeout=60)
        assert r.returncode == 0, f"umount failed: {r.stderr!r}"
        assert not is_mounted(mp, None)
        assert not pid_alive(pid), "umount returned before the daemon exited"
        # data persisted: mount again in the foreground and read it back
        m = Mount(modelfs_bin, root=scratch, data=data)
        m.start()
        try:
            assert read_file(m.path("hello")) == b"daemonized"
        finally:
            m.stop()
    finally:
        _ensure_unmounted(mp, data)


@pytest.mark.parametrize("scheme", ["sqlite", "memory"])
def test_meta_option(mount_factory, scheme):
    if scheme == "sqlite":
        meta_dir = Path(tempfile.mkdtemp(prefix="modelfs-meta-"))
        meta = f"sqlite:{meta_dir / 'meta.sqlite'}"
    else:
        meta_dir, meta = None, "memory:"
    try:
        m = mount_factory(meta=meta)
        data = os.urandom(3 * MiB)
        write_file(m.path("f"), data)
        assert_bytes_equal(read_file(m.path("f")), data, f"{scheme} meta")
        if scheme == "sqlite":
            assert (meta_dir / "meta.sqlite").exists(), "sqlite meta file not created at the given path"
            m.remount()
            assert_bytes_equal(read_file(m.path("f")), data, "sqlite meta after remount")
    finally:
        if meta_dir:
            shutil.rmtree(meta_dir, ignore_errors=True)


# ---------------------------------------------------------------------------
# umount with open files
# ---------------------------------------------------------------------------

def test_umount_refuses_with_open_file_then_succeeds(mnt):
    write_file(mnt.path("open-me"), b"busy")
    f = open(mnt.path("open-me"), "rb")
    try:
        r = mnt.umount_cmd(force=False)
        assert r.returncode != 0, "umount succeeded although a file was open"
        assert re.search("open", r.stderr, re.I), f"message does not mention open files: {r.stderr!r}"
        assert len([ln for ln in r.stderr.splitlines() if ln.strip()]) == 1, r.stderr
        assert is_mounted(mnt.mp), "mount is gone after a refused umount"
        assert mnt.proc.poll() is None, "daemon exited after a refused umount"
        assert f.read() == b"busy"
        write_file(mnt.path("other"), b"still writable")
    finally:
        f.close()
    # open directory handles count too? at least a cwd-less fd on a dir must not block forever
    r = mnt.umount_cmd(force=False)
    assert r.returncode == 0, f"umount after close failed: {r.stderr!r}"
    assert not is_mounted(mnt.mp, None)
    mnt.proc.wait(timeout=30)
    mnt.start()
    assert read_file(mnt.path("other")) == b"still writable"


def test_umount_and_status_on_a_machine_with_many_mounts(mnt, tmp_path):
    """With more mounts than fit in 4 KiB of /proc/self/mountinfo (any Kubernetes node; 22 lab
    hosts), `modelfs status` and `umount` still find the modelfs mount (they read only the
    first 4 KiB, and said it was not mounted by modelfs)."""
    extra = []
    try:
        while len(Path("/proc/self/mountinfo").read_bytes()) < 12 << 10:
            d = tmp_path / f"t{len(extra)}"
            d.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", d], check=True)
            extra.append(d)
        # The modelfs mount comes before the tmpfs mounts: move it past them (remount).
        mnt.stop()
        mnt.start()
        assert run([MODELFS_BIN, "status", mnt.mp]).returncode == 0
        r = mnt.umount_cmd(force=False)
        assert r.returncode == 0, f"umount with {len(extra)} more mounts: {r.stderr!r}"
        assert not is_mounted(mnt.mp, None)
        mnt.proc.wait(timeout=30)
        mnt.start()
    finally:
        for d in reversed(extra):
            subprocess.run(["umount", d], check=False)


def test_umount_force_with_open_file(mnt):
    """--force detaches at once even with a file open; the daemon keeps serving
    that open file and exits once it is closed."""
    write_file(mnt.path("f"), b"data")
    fd = os.open(mnt.path("f"), os.O_RDONLY)
    try:
        r = mnt.umount_cmd(force=True, timeout=60)
        assert r.returncode == 0, f"umount --force failed: {r.stderr!r}"
        assert not is_mounted(mnt.mp, None), "mount still present after umount --force"
        assert not os.path.exists(mnt.path("f")), "mountpoint still shows the file system"
        if mnt.proc.poll() is None:
            # lazily detached: the open file must still work (or fail cleanly)
            try:
                assert os.pread(fd, 100, 0) == b"data"
            except OSError as e:
                assert e.errno in (errno.ENOTCONN, errno.EIO, errno.ECONNABORTED), e
    finally:
        os.close(fd)
    assert wait_pid_exit(mnt.proc.pid, 10), "daemon still running 10s after the last open file was closed"
    mnt.proc.wait(timeout=10)
    mnt.start()
    assert read_file(mnt.path("f")) == b"data"


# ---------------------------------------------------------------------------
# corrupt blocks
# ---------------------------------------------------------------------------



def block_records(data_dir: Path) -> dict[str, tuple[Path, int, int]]:
    """Every block in the data dir's packs: sha256 hex -> (pack path, data offset, length)."""
    out = {}
    for pack in sorted((data_dir / "packs").glob("*.pack")):
        for magic, ident, data_off, n, data in pack_records(pack, strict=True):
            assert magic in (b"MFB1", b"MFB2"), f"dead record {ident} in {pack}"
            assert hashlib.sha256(data).hexdigest() == ident, f"record {ident} in {pack} does not match its name"
            out.setdefault(ident, (pack, data_off, n))
    return out


def flip_byte_in_record(record: tuple[Path, int, int]):
    """Flips one byte in the middle of a block's record (pack, offset, length), inside its pack."""
    pack, offset, length = record
    assert length > 0
    with open(pack, "r+b") as f:
        f.seek(offset + length // 2)
        byte = f.read(1)
        f.seek(offset + length // 2)
        f.write(bytes([byte[0] ^ 0x5A]))


def manifest_block_ids(data_dir: Path, name: str) -> list[str]:
    """The block ids (hex) of a root-level file's committed manifest, read from the SQLite
    metadata (inline manifests: tag 0, b"MFM1", count u32 LE, then 32-byte id + u32 length)."""
    db = sqlite3.connect(data_dir / "meta.db")
    try:
        row = db.execute("SELECT i.manifest FROM inodes i JOIN dentries d ON d.ino = i.ino "
                         "WHERE d.parent = 1 AND d.name = ?", (name,)).fetchone()
    finally:
        db.close()
    blob = row[0]
    assert blob[0] == 0 and blob[1:5] == b"MFM1", "expected an inline manifest"
    count = int.from_bytes(blob[5:9], "little")
    return [blob[9 + 36 * i: 9 + 36 * i + 32].hex() for i in range(count)]


def _read_until_error(path) -> tuple[bytes, OSError | None]:
    got = bytearray()
    try:
        with open(path, "rb", buffering=0) as f:
            while True:
                b = f.read(256 * 1024)
                if not b:
                    return bytes(got), None
                got += b
    except OSError as e:
        return bytes(got), e


def _pread_checked(fd, off: int, n: int, want: bytes) -> int:
    """pread [off, off+n) in as many calls as needed. A short read is allowed (the
    error comes on the next call), but every byte returned must be right and EOF
    must not come early. Returns 1 if the range hit EIO, else 0."""
    end = min(off + n, len(want))
    pos = off
    while pos < end:
        try:
            chunk = os.pread(fd, end - pos, pos)
        except OSError as e:
            assert e.errno == errno.EIO, f"pread at {pos}: expected EIO, got {e!r}"
            return 1
        assert chunk, f"premature EOF at offset {pos} (file is {len(want)} bytes)"
        assert chunk == want[pos:pos + len(chunk)], f"wrong bytes in [{pos}, {pos + len(chunk)})"
        pos += len(chunk)
    return 0


def test_corrupt_block_gives_eio_never_wrong_bytes(mnt):
    a = os.urandom(6 * MiB + 100)
    write_file(mnt.path("a"), a)
    mnt.unmount()
    blocks_a = block_records(mnt.data)
    assert blocks_a, f"no block records under {mnt.data / 'packs'}"
    mnt.start()
    b = os.urandom(5 * MiB + 7)
    write_file(mnt.path("b"), b)
    mnt.unmount()
    blocks_b = set(block_records(mnt.data)) - set(blocks_a)
    assert blocks_b, "writing a second random file created no new blocks"

    # flip one byte in the middle of a block in the middle of a, inside its pack
    ids_a = manifest_block_ids(mnt.data, "a")
    assert len(ids_a) >= 3, f"a 6 MiB file should have several blocks, has {len(ids_a)}"
    k = len(ids_a) // 2
    flip_byte_in_record(blocks_a[ids_a[k]])
    bad = sum(blocks_a[i][2] for i in ids_a[:k]) + blocks_a[ids_a[k]][2] // 2   # the flipped byte, in the file
    mnt.start()

    got, err = _read_until_error(mnt.path("a"))
    assert err is not None, f"reading a file with a corrupted block succeeded ({len(got)} of {len(a)} bytes)"
    assert err.errno == errno.EIO, f"expected EIO, got {errno.errorcode.get(err.errno, err.errno)}: {err}"
    assert got == a[:len(got)], "bytes returned before the EIO are wrong"
    # random-offset reads either fail with EIO or return correct bytes -- never wrong data
    fd = os.open(mnt.path("a"), os.O_RDONLY)
    eio = 0
    try:
        for off in range(0, len(a), 512 * 1024):
            eio += _pread_checked(fd, off, 100000, a)
    finally:
        os.close(fd)
    assert eio > 0, "no pread hit the corrupted block"
    # a 4 KiB read of the damaged piece (checked by its CRC32C, then the whole block by its hash)
    fd = os.open(mnt.path("a"), os.O_RDONLY)
    try:
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, bad // 4096 * 4096)
        assert e.value.errno == errno.EIO
    finally:
        os.close(fd)
    # a second read must not return (cached) wrong data either
    got2, err2 = _read_until_error(mnt.path("a"))
    assert err2 is not None and err2.errno == errno.EIO
    assert got2 == a[:len(got2)]
    # other files are unaffected
    assert_bytes_equal(read_file(mnt.path("b")), b, "unaffected file b")
    # the mount is still healthy
    write_file(mnt.path("c"), b"fine")
    assert read_file(mnt.path("c")) == b"fine"


def test_small_reads_check_only_the_pieces_they_touch(mount_factory):
    """Issue #27: a 4 KiB read of a block that is not in memory reads and checks (CRC32C) only
    the 8 KiB pieces it touches, not the whole block; a flipped byte in one piece is EIO for
    reads of that piece and never wrong bytes, while the block's other pieces still read."""
    mnt = mount_factory(extra_args=["--no-passthrough"])   # reads reach the daemon, not a flat copy
    a = os.urandom(8 * MiB)
    write_file(mnt.path("a"), a)
    mnt.unmount()
    blocks = block_records(mnt.data)
    ids = manifest_block_ids(mnt.data, "a")
    mnt.start()
    rng = random.Random(5)
    offsets = [rng.randrange(len(a) // 4096) * 4096 for _ in range(300)]
    fd = os.open(mnt.path("a"), os.O_RDONLY)
    try:
        for off in offsets:
            assert os.pread(fd, 4096, off) == a[off:off + 4096], f"wrong bytes at {off}"
    finally:
        os.close(fd)
    pieces = mnt.status()["pieceReads"]
    assert pieces["reads"] >= 250, pieces            # a few may follow the last read of their block
    assert pieces["bytes"] <= pieces["reads"] * 32 * 1024, pieces
    assert mnt.status()["cacheBytes"] < 4 * MiB, "small reads should not load whole blocks"

    # One byte flipped 32 KiB into a middle block (in its fifth 8 KiB piece).
    k = len(ids) // 2
    pack, data_off, length = blocks[ids[k]]
    assert length >= 8 * 16384
    start = sum(blocks[i][2] for i in ids[:k])
    mnt.unmount()
    flip_byte_in_record((pack, data_off + 2 * 16384, 2))   # the byte at +1 in that piece
    mnt.start()
    fd = os.open(mnt.path("a"), os.O_RDONLY)
    try:
        far = start + 6 * 16384
        assert os.pread(fd, 4096, far) == a[far:far + 4096], "an undamaged piece of the block"
        with pytest.raises(OSError) as e:
            os.pread(fd, 4096, start + 2 * 16384)
        assert e.value.errno == errno.EIO
        assert os.pread(fd, 100, start - 100) == a[start - 100:start], "the block before it"
    finally:
        os.close(fd)
    assert re.search(r"piece 4 in \S+ does not match its CRC32C", mnt.log_tail()), "the damaged piece is logged"


def test_missing_block_gives_eio(mnt):
    a = os.urandom(3 * MiB)
    write_file(mnt.path("a"), a)
    mnt.unmount()
    blocks = block_records(mnt.data)
    assert blocks
    # the last record of the last pack loses its tail, as if the machine died mid-append
    # (the block is then dropped from the index at start: reads of it are EIO)
    pack, offset, length = max(blocks.values(), key=lambda r: (r[0], r[1]))
    os.truncate(pack, offset + length // 2)
    mnt.start()
    got, err = _read_until_error(mnt.path("a"))
    assert err is not None and err.errno == errno.EIO, f"expected EIO, got {err!r}"
    assert got == a[:len(got)]


# ---------------------------------------------------------------------------
# disk full
# ---------------------------------------------------------------------------

def test_disk_full_enospc(mount_factory):
    root = Path(tempfile.mkdtemp(prefix="modelfs-"))
    os.chmod(root, 0o755)
    data = root / "data"
    data.mkdir()
    r = run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", data])
    assert r.returncode == 0, f"cannot mount tmpfs: {r.stderr}"
    m = mount_factory(start=False, root=root, data=data)
    m.cleanup_callbacks.append(lambda: run(["umount", str(data)]))
    m.start()

    small = os.urandom(4 * MiB)
    write_file(m.path("small"), small, fsync=True)

    big = m.path("big")
    err = None
    written = 0
    fd = os.open(big, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(100):
            # fresh random data per MiB: repeated chunks would simply dedup
            written += os.write(fd, os.urandom(1 * MiB))
        os.fsync(fd)
    except OSError as e:
        err = e
    finally:
        try:
            os.close(fd)
        except OSError as e:
            err = err or e
    assert err is not None, f"wrote {written} bytes + fsync + close into a 64 MiB data dir without an error"
    assert err.errno == errno.ENOSPC, f"expected ENOSPC, got {errno.errorcode.get(err.errno, err.errno)}: {err}"
    assert m.proc.poll() is None, "daemon died on ENOSPC"
    assert_bytes_equal(read_file(m.path("small")), small, "earlier file after ENOSPC")
    # Unmounted at once, the daemon reclaims the failed write's blocks before it exits: the
    # remount finds the space back (its preflight refuses a data dir with under 16 MiB free).
    m.remount()

    assert_bytes_equal(read_file(m.path("small")), small, "earlier file after ENOSPC and a remount")
    os.unlink(big)

    def small_write_ok():
        try:
            write_file(m.path("after"), b"z" * (1 * MiB), fsync=True)
            return read_file(m.path("after")) == b"z" * (1 * MiB)
        except OSError:
            return False

    wait_until(small_write_ok, 15, interval=0.5, what="small write to succeed after freeing space")
    m.remount()
    assert_bytes_equal(read_file(m.path("small")), small, "earlier file after ENOSPC + remount")
    assert read_file(m.path("after")) == b"z" * (1 * MiB)
