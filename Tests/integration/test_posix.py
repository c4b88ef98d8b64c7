"""POSIX semantics of a live modelfs mount, checked through ordinary syscalls."""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import mmap
import os
import random
import stat
import struct
import threading
import time

import pytest

from mfs import (MiB, ChildError, assert_bytes_equal, in_child, read_file, run,
                 wait_until, write_file)

USER_UID = USER_GID = 1000


def rnd(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def expect_errno(code, fn, *args, **kw):
    with pytest.raises(OSError) as ei:
        fn(*args, **kw)
    assert ei.value.errno == code, (
        f"expected {errno.errorcode[code]}, got {errno.errorcode.get(ei.value.errno, ei.value.errno)}: {ei.value}")
    return ei.value


# ---------------------------------------------------------------------------
# open flags
# ---------------------------------------------------------------------------

def test_create_excl(workdir):
    p = workdir / "f"
    fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.write(fd, b"one")
    os.close(fd)
    expect_errno(errno.EEXIST, os.open, p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    assert read_file(p) == b"one"
    st = os.stat(p)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644 & ~_umask()


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_open_trunc(workdir):
    p = workdir / "t"
    write_file(p, b"hello world, this is long")
    fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
    assert os.fstat(fd).st_size == 0
    os.write(fd, b"abc")
    os.close(fd)
    assert read_file(p) == b"abc"
    assert os.stat(p).st_size == 3


def test_open_append(workdir):
    p = workdir / "a"
    write_file(p, b"abc")
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, b"def")
    os.lseek(fd, 1, os.SEEK_SET)
    os.write(fd, b"ghi")
    os.close(fd)
    assert read_file(p) == b"abcdefghi"
    # Two appenders interleaving: every append lands at the current end.
    fd1 = os.open(p, os.O_WRONLY | os.O_APPEND)
    fd2 = os.open(p, os.O_WRONLY | os.O_APPEND)
    for i in range(50):
        os.write(fd1 if i % 2 == 0 else fd2, b"%03d;" % i)
    os.close(fd1)
    os.close(fd2)
    assert read_file(p) == b"abcdefghi" + b"".join(b"%03d;" % i for i in range(50))


def test_open_nonexistent_enoent(workdir):
    expect_errno(errno.ENOENT, os.open, workdir / "nope", os.O_RDONLY)
    expect_errno(errno.ENOENT, os.stat, workdir / "nope")
    expect_errno(errno.ENOENT, os.open, workdir / "nodir" / "f", os.O_CREAT | os.O_WRONLY)


def test_empty_file(workdir):
    p = workdir / "empty"
    open(p, "wb").close()
    assert os.stat(p).st_size == 0
    assert read_file(p) == b""


# ---------------------------------------------------------------------------
# read / write
# ---------------------------------------------------------------------------

def test_sequential_then_random_reads(workdir):
    data = rnd(10 * MiB + 12345, 1)
    p = workdir / "seq"
    write_file(p, data)
    assert os.stat(p).st_size == len(data)
    assert_bytes_equal(read_file(p), data, "sequential read")
    r = random.Random(2)
    fd = os.open(p, os.O_RDONLY)
    try:
        for _ in range(300):
            off = r.randrange(0, len(data) + 100)
            n = r.choice([1, 7, 4096, 4097, 65536, 300000, r.randrange(1, 2 * MiB)])
            got = os.pread(fd, n, off)
            assert_bytes_equal(got, data[off:off + n], f"pread({n}, {off})")
    finally:
        os.close(fd)


def test_random_writes(workdir):
    size = 3 * MiB
    shadow = bytearray(rnd(size, 3))
    p = workdir / "rw"
    write_file(p, bytes(shadow))
    r = random.Random(4)
    fd = os.open(p, os.O_RDWR)
    try:
        for _ in range(300):
            off = r.randrange(0, size)
            n = r.choice([1, 100, 4096, 8191, r.randrange(1, 200000)])
            buf = r.randbytes(n)
            assert os.pwrite(fd, buf, off) == n
            end = off + n
            if end > len(shadow):
                shadow.extend(b"\0" * (end - len(shadow)))
            shadow[off:end] = buf
            ro = r.randrange(0, len(shadow))
            rn = r.randrange(1, 100000)
            assert_bytes_equal(os.pread(fd, rn, ro), bytes(shadow[ro:ro + rn]), "read-after-write")
    finally:
        os.close(fd)
    assert_bytes_equal(read_file(p), bytes(shadow), "after close")


def test_sparse_write_past_eof(workdir):
    p = workdir / "sparse"
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o644)
    os.pwrite(fd, b"tail", 16 * MiB)
    os.pwrite(fd, b"head", 0)
    os.close(fd)
    data = read_file(p)
    assert len(data) == 16 * MiB + 4
    assert data[:4] == b"head" and data[-4:] == b"tail"
    assert data[4:-4].count(0) == len(data) - 8, "hole does not read as zeros"


def test_concurrent_writers_different_files(workdir):
    blobs = {f"c{i}": rnd(6 * MiB + i, 100 + i) for i in range(4)}
    errors = []

    def writer(name, data):
        try:
            write_file(workdir / name, data, chunk=128 * 1024)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=writer, args=kv) for kv in blobs.items()]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not errors, errors
    for name, data in blobs.items():
        assert_bytes_equal(read_file(workdir / name), data, name)


def test_large_file_64mib_roundtrip(workdir):
    data = os.urandom(64 * MiB)
    p = workdir / "big"
    write_file(p, data, chunk=4 * MiB)
    assert os.stat(p).st_size == len(data)
    assert_bytes_equal(read_file(p), data, "64 MiB roundtrip")


# ---------------------------------------------------------------------------
# truncate / fallocate
# ---------------------------------------------------------------------------

def test_truncate_shrink_and_grow(workdir):
    data = rnd(300000, 5)
    p = workdir / "tr"
    write_file(p, data)
    os.truncate(p, 1000)
    assert os.stat(p).st_size == 1000
    assert read_file(p) == data[:1000]
    os.truncate(p, 200000)
    got = read_file(p)
    assert len(got) == 200000
    assert got[:1000] == data[:1000]
    assert got[1000:] == b"\0" * 199000, "grown region is not zeros (old data resurfaced?)"
    os.truncate(p, 0)
    assert read_file(p) == b""


def test_ftruncate_shrink_and_grow(workdir):
    data = rnd(5 * MiB, 6)
    p = workdir / "ftr"
    write_file(p, data)
    fd = os.open(p, os.O_RDWR)
    try:
        os.ftruncate(fd, 4097)
        assert os.fstat(fd).st_size == 4097
        assert os.pread(fd, 10000, 0) == data[:4097]
        os.ftruncate(fd, 3 * MiB)
        got = os.pread(fd, 3 * MiB + 10, 0)
        assert len(got) == 3 * MiB
        assert got[:4097] == data[:4097]
        assert got[4097:].count(0) == 3 * MiB - 4097, "grown region is not zeros"
        os.pwrite(fd, b"XYZ", 2 * MiB)
    finally:
        os.close(fd)
    exp = bytearray(data[:4097] + b"\0" * (3 * MiB - 4097))
    exp[2 * MiB:2 * MiB + 3] = b"XYZ"
    assert_bytes_equal(read_file(p), bytes(exp), "after ftruncate + write")


def test_posix_fallocate_extends(workdir):
    p = workdir / "fa"
    write_file(p, b"abc")
    fd = os.open(p, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, 1 * MiB)
        assert os.fstat(fd).st_size == 1 * MiB
    finally:
        os.close(fd)
    got = read_file(p)
    assert len(got) == 1 * MiB
    assert got[:3] == b"abc" and got[3:].count(0) == 1 * MiB - 3


# ---------------------------------------------------------------------------
# rename
# ---------------------------------------------------------------------------

def test_rename_file(workdir):
    a, b = workdir / "a", workdir / "b"
    write_file(a, b"AAA")
    os.rename(a, b)
    assert not a.exists()
    assert read_file(b) == b"AAA"
    assert sorted(os.listdir(workdir)) == ["b"]


def test_rename_replaces_existing_file(workdir):
    a, b = workdir / "src", workdir / "dst"
    write_file(a, rnd(2 * MiB, 7))
    write_file(b, b"old target")
    fd_old = os.open(b, os.O_RDONLY)  # an open handle keeps seeing the old file
    try:
        os.replace(a, b)
        assert not a.exists()
        assert_bytes_equal(read_file(b), rnd(2 * MiB, 7), "replaced target")
        assert os.pread(fd_old, 100, 0) == b"old target"
    finally:
        os.close(fd_old)
    assert sorted(os.listdir(workdir)) == ["dst"]


def test_rename_across_directories(workdir):
    (workdir / "d1").mkdir()
    (workdir / "d2").mkdir()
    write_file(workdir / "d1" / "f", b"moved")
    os.rename(workdir / "d1" / "f", workdir / "d2" / "g")
    assert os.listdir(workdir / "d1") == []
    assert os.listdir(workdir / "d2") == ["g"]
    assert read_file(workdir / "d2" / "g") == b"moved"


def _make_tree(root, seed):
    r = random.Random(seed)
    files = {}
    for rel in ["x", "sub/y", "sub/deeper/z", "sub/deeper/w", "other/q"]:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        data = r.randbytes(r.randrange(0, 300000))
        write_file(p, data)
        files[rel] = data
    return files


def _check_tree(root, files):
    seen = {}
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            full = os.path.join(dirpath, n)
            seen[os.path.relpath(full, root)] = read_file(full)
    assert sorted(seen) == sorted(files)
    for rel, data in files.items():
        assert_bytes_equal(seen[rel], data, rel)


def test_rename_directory_with_content(workdir):
    src = workdir / "model-v1"
    files = _make_tree(src, 8)
    os.rename(src, workdir / "model-final")
    assert not src.exists()
    _check_tree(workdir / "model-final", files)
    # and into another directory
    (workdir / "archive").mkdir()
    os.rename(workdir / "model-final", workdir / "archive" / "m")
    _check_tree(workdir / "archive" / "m", files)
    assert sorted(os.listdir(workdir)) == ["archive"]


def test_rename_directory_replaces_empty_dir(workdir):
    src, dst = workdir / "src", workdir / "dst"
    files = _make_tree(src, 9)
    dst.mkdir()
    os.rename(src, dst)
    assert not src.exists()
    _check_tree(dst, files)


def test_rename_directory_onto_nonempty_dir_enotempty(workdir):
    src, dst = workdir / "src", workdir / "dst"
    files = _make_tree(src, 10)
    dst.mkdir()
    write_file(dst / "keep", b"keep")
    expect_errno(errno.ENOTEMPTY, os.rename, src, dst)
    _check_tree(src, files)
    assert read_file(dst / "keep") == b"keep"


def test_rename_type_mismatch_errors(workdir):
    (workdir / "dir").mkdir()
    write_file(workdir / "file", b"f")
    expect_errno(errno.EISDIR, os.rename, workdir / "file", workdir / "dir")
    expect_errno(errno.ENOTDIR, os.rename, workdir / "dir", workdir / "file")
    expect_errno(errno.EINVAL, os.rename, workdir / "dir", workdir / "dir" / "inside")


def _renameat2(old, new, flags):
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    AT_FDCWD = -100
    fn = libc.renameat2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def test_renameat2_noreplace(workdir):
    RENAME_NOREPLACE = 1
    a, b, c = workdir / "a", workdir / "b", workdir / "c"
    write_file(a, b"A")
    write_file(b, b"B")
    expect_errno(errno.EEXIST, _renameat2, a, b, RENAME_NOREPLACE)
    assert read_file(a) == b"A" and read_file(b) == b"B"
    _renameat2(a, c, RENAME_NOREPLACE)
    assert not a.exists() and read_file(c) == b"A"


# ---------------------------------------------------------------------------
# unlink / mkdir / rmdir / readdir
# ---------------------------------------------------------------------------

def test_unlink(workdir):
    p = workdir / "u"
    write_file(p, b"data")
    os.unlink(p)
    assert not p.exists()
    assert os.listdir(workdir) == []
    expect_errno(errno.ENOENT, os.unlink, p)
    # re-creating the same name gives a fresh, empty file
    open(p, "wb").close()
    assert read_file(p) == b""


def test_unlink_open_file_still_readable(workdir):
    p = workdir / "uo"
    data = rnd(1 * MiB, 11)
    write_file(p, data)
    fd = os.open(p, os.O_RDONLY)
    try:
        os.unlink(p)
        assert not p.exists()
        assert_bytes_equal(os.pread(fd, 2 * MiB, 0), data, "read of unlinked open file")
    finally:
        os.close(fd)
    assert os.listdir(workdir) == []


def test_mkdir_rmdir(workdir):
    d = workdir / "d"
    os.mkdir(d, 0o755)
    assert stat.S_ISDIR(os.stat(d).st_mode)
    expect_errno(errno.EEXIST, os.mkdir, d)
    write_file(d / "f", b"x")
    expect_errno(errno.ENOTEMPTY, os.rmdir, d)
    expect_errno(errno.ENOTDIR, os.rmdir, d / "f")
    os.unlink(d / "f")
    os.rmdir(d)
    assert not d.exists()
    expect_errno(errno.ENOENT, os.rmdir, d)


def test_readdir_many_entries(workdir):
    d = workdir / "many"
    d.mkdir()
    names = [f"file-{i:05d}-{'x' * (i % 40)}" for i in range(1000)]
    for n in names:
        fd = os.open(d / n, os.O_CREAT | os.O_WRONLY, 0o644)
        os.close(fd)
    listed = os.listdir(d)
    assert len(listed) == len(set(listed)), "duplicate entries in readdir"
    assert sorted(listed) == sorted(names)
    with os.scandir(d) as it:
        entries = [(e.name, e.is_file(follow_symlinks=False)) for e in it]
    assert len(entries) == 1000 and all(isf for _, isf in entries)
    # remove half, list again
    for n in names[::2]:
        os.unlink(d / n)
    assert sorted(os.listdir(d)) == sorted(names[1::2])
    assert os.stat(d).st_nlink >= 1


def test_readdir_mixed_types(workdir):
    (workdir / "sub").mkdir()
    write_file(workdir / "file", b"x")
    os.symlink("file", workdir / "link")
    with os.scandir(workdir) as it:
        kinds = {e.name: (e.is_dir(follow_symlinks=False), e.is_file(follow_symlinks=False),
                          e.is_symlink()) for e in it}
    assert kinds == {"sub": (True, False, False), "file": (False, True, False),
                     "link": (False, False, True)}


# ---------------------------------------------------------------------------
# links
# ---------------------------------------------------------------------------

def test_symlink_readlink(workdir):
    write_file(workdir / "target", b"through the link")
    os.symlink("target", workdir / "rel")
    os.symlink(str(workdir / "target"), workdir / "abs")
    os.symlink("does/not/exist", workdir / "dangling")
    assert os.readlink(workdir / "rel") == "target"
    assert os.readlink(workdir / "abs") == str(workdir / "target")
    assert os.readlink(workdir / "dangling") == "does/not/exist"
    assert stat.S_ISLNK(os.lstat(workdir / "rel").st_mode)
    assert os.lstat(workdir / "dangling").st_size == len("does/not/exist")
    assert read_file(workdir / "rel") == b"through the link"
    assert read_file(workdir / "abs") == b"through the link"
    expect_errno(errno.ENOENT, os.stat, workdir / "dangling")
    expect_errno(errno.EEXIST, os.symlink, "x", workdir / "rel")
    long_target = "a/" * 1000 + "end"
    os.symlink(long_target, workdir / "long")
    assert os.readlink(workdir / "long") == long_target


def test_hard_links(workdir):
    a, b = workdir / "a", workdir / "b"
    write_file(a, b"shared content")
    os.link(a, b)
    sa, sb = os.stat(a), os.stat(b)
    assert sa.st_ino == sb.st_ino
    assert sa.st_nlink == 2 and sb.st_nlink == 2
    with open(b, "r+b") as f:
        f.seek(0)
        f.write(b"SHARED")
    assert read_file(a) == b"SHARED content"
    (workdir / "sub").mkdir()
    os.link(a, workdir / "sub" / "c")
    assert os.stat(a).st_nlink == 3
    os.unlink(a)
    assert os.stat(b).st_nlink == 2
    os.unlink(workdir / "sub" / "c")
    assert os.stat(b).st_nlink == 1
    assert read_file(b) == b"SHARED content"
    expect_errno(errno.EEXIST, os.link, b, b)


# ---------------------------------------------------------------------------
# attributes
# ---------------------------------------------------------------------------

def test_chmod_chown_utime(workdir):
    p = workdir / "attrs"
    write_file(p, b"x")
    os.chmod(p, 0o640)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o640
    os.chmod(p, 0o4755)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o4755
    os.chown(p, 1234, 5678)
    st = os.stat(p)
    assert (st.st_uid, st.st_gid) == (1234, 5678)
    atime_ns = 1_600_000_000_123_456_789
    mtime_ns = 1_500_000_000_987_654_321
    os.utime(p, ns=(atime_ns, mtime_ns))
    st = os.stat(p)
    assert st.st_mtime_ns == mtime_ns
    assert st.st_atime_ns == atime_ns
    # directory too
    d = workdir / "dir"
    d.mkdir()
    os.chmod(d, 0o711)
    os.chown(d, 42, 43)
    os.utime(d, ns=(atime_ns, mtime_ns))
    st = os.stat(d)
    assert stat.S_IMODE(st.st_mode) == 0o711 and (st.st_uid, st.st_gid) == (42, 43)
    assert st.st_mtime_ns == mtime_ns


def test_write_updates_mtime_and_size(workdir):
    p = workdir / "m"
    write_file(p, b"x")
    os.utime(p, ns=(1_000_000_000, 1_000_000_000))
    with open(p, "ab") as f:
        f.write(b"yz")
    st = os.stat(p)
    assert st.st_size == 3
    assert st.st_mtime_ns > 1_000_000_000, "write did not update mtime"
    assert abs(st.st_mtime - time.time()) < 120


def _create_file_as_user(path):
    with open(path, "wb") as f:
        f.write(b"mine")
    os.mkdir(path + ".d")
    st, dst = os.stat(path), os.stat(path + ".d")
    return (st.st_uid, st.st_gid, dst.st_uid, dst.st_gid)


def test_ownership_from_caller(workdir):
    shared = workdir / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    ids = in_child(_create_file_as_user, str(shared / "by-user"), uid=USER_UID, gid=USER_GID)
    assert ids == (USER_UID, USER_GID, USER_UID, USER_GID)
    st = os.stat(shared / "by-user")
    assert (st.st_uid, st.st_gid) == (USER_UID, USER_GID)
    assert read_file(shared / "by-user") == b"mine"


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _create(path):
    with open(path, "wb") as f:
        f.write(b"x")


def test_permissions_enforced_for_other_uid(workdir):
    os.chmod(workdir, 0o755)
    secret = workdir / "secret"
    write_file(secret, b"top secret")
    os.chmod(secret, 0o600)
    public = workdir / "public"
    write_file(public, b"hello")
    os.chmod(public, 0o644)
    rodir = workdir / "rodir"
    rodir.mkdir()
    os.chmod(rodir, 0o755)

    # a readable file is readable (proves the other uid can reach the mount at all)
    assert in_child(_read, str(public), uid=USER_UID, gid=USER_GID) == b"hello"
    with pytest.raises(ChildError) as ei:
        in_child(_read, str(secret), uid=USER_UID, gid=USER_GID)
    assert ei.value.type_name == "PermissionError" and ei.value.errno == errno.EACCES, ei.value
    with pytest.raises(ChildError) as ei:
        in_child(_create, str(rodir / "new"), uid=USER_UID, gid=USER_GID)
    assert ei.value.type_name == "PermissionError" and ei.value.errno == errno.EACCES, ei.value
    assert not (rodir / "new").exists()
    with pytest.raises(ChildError) as ei:
        in_child(_create, str(public), uid=USER_UID, gid=USER_GID)  # 0644 root-owned: no write
    assert ei.value.errno == errno.EACCES, ei.value
    assert read_file(public) == b"hello"


# ---------------------------------------------------------------------------
# xattrs
# ---------------------------------------------------------------------------

def test_user_xattrs(workdir):
    p = workdir / "x"
    write_file(p, b"x")
    os.setxattr(p, "user.foo", b"bar")
    os.setxattr(p, "user.bin", bytes(range(256)) * 10)
    os.setxattr(p, "user.empty", b"")
    assert os.getxattr(p, "user.foo") == b"bar"
    assert os.getxattr(p, "user.bin") == bytes(range(256)) * 10
    assert os.getxattr(p, "user.empty") == b""
    assert {"user.foo", "user.bin", "user.empty"} <= set(os.listxattr(p))
    os.setxattr(p, "user.foo", b"baz")
    assert os.getxattr(p, "user.foo") == b"baz"
    expect_errno(errno.EEXIST, os.setxattr, p, "user.foo", b"q", os.XATTR_CREATE)
    expect_errno(errno.ENODATA, os.setxattr, p, "user.missing", b"q", os.XATTR_REPLACE)
    os.removexattr(p, "user.foo")
    expect_errno(errno.ENODATA, os.getxattr, p, "user.foo")
    assert "user.foo" not in os.listxattr(p)
    expect_errno(errno.ENODATA, os.removexattr, p, "user.foo")
    # on a directory as well
    d = workdir / "xd"
    d.mkdir()
    os.setxattr(d, "user.k", b"v")
    assert os.getxattr(d, "user.k") == b"v"


@pytest.mark.parametrize("name", ["security.selinux", "system.posix_acl_access", "user.nope"])
def test_getxattr_absent_enodata(workdir, name):
    p = workdir / "plain"
    write_file(p, b"x")
    expect_errno(errno.ENODATA, os.getxattr, p, name)


# ---------------------------------------------------------------------------
# locks
# ---------------------------------------------------------------------------

def _try_flock(path):
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return "locked"
    except BlockingIOError as e:
        return ("blocked", e.errno)
    finally:
        os.close(fd)


def test_flock_conflict_between_processes(workdir):
    p = workdir / "lk"
    write_file(p, b"x")
    fd = os.open(p, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        assert in_child(_try_flock, str(p)) == ("blocked", errno.EWOULDBLOCK)
    finally:
        os.close(fd)  # releases the lock
    assert in_child(_try_flock, str(p)) == "locked"


def _try_lockf(path):
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return "locked"
    except OSError as e:
        return ("blocked", e.errno)
    finally:
        os.close(fd)


def test_posix_lock_conflict_between_processes(workdir):
    p = workdir / "plk"
    write_file(p, b"x" * 100)
    fd = os.open(p, os.O_RDWR)
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        res = in_child(_try_lockf, str(p))
        assert res[0] == "blocked" and res[1] in (errno.EAGAIN, errno.EACCES), res
    finally:
        fcntl.lockf(fd, fcntl.LOCK_UN)
    assert in_child(_try_lockf, str(p)) == "locked"
    os.close(fd)


F_OFD_GETLK, F_OFD_SETLK = 36, 37


def _flock_struct(l_type, start=0, length=0):
    # struct flock on x86_64/aarch64: short l_type, short l_whence, off_t l_start,
    # off_t l_len, pid_t l_pid (+ padding) = 32 bytes; l_pid must be 0 for OFD locks.
    return struct.pack("@hhqqi4x", l_type, os.SEEK_SET, start, length, 0)


def test_ofd_lock_conflict_between_open_file_descriptions(workdir):
    p = workdir / "ofd"
    write_file(p, b"x" * 100)
    fd1 = os.open(p, os.O_RDWR)
    fd2 = os.open(p, os.O_RDWR)
    try:
        fcntl.fcntl(fd1, F_OFD_SETLK, _flock_struct(fcntl.F_WRLCK))
        with pytest.raises(OSError) as ei:
            fcntl.fcntl(fd2, F_OFD_SETLK, _flock_struct(fcntl.F_WRLCK))
        assert ei.value.errno in (errno.EAGAIN, errno.EACCES), ei.value
        # F_OFD_GETLK from fd2 reports the conflicting write lock
        res = fcntl.fcntl(fd2, F_OFD_GETLK, _flock_struct(fcntl.F_WRLCK))
        assert struct.unpack("@hhqqi4x", res)[0] == fcntl.F_WRLCK
        fcntl.fcntl(fd1, F_OFD_SETLK, _flock_struct(fcntl.F_UNLCK))
        fcntl.fcntl(fd2, F_OFD_SETLK, _flock_struct(fcntl.F_WRLCK))
    finally:
        os.close(fd1)
        os.close(fd2)


# ---------------------------------------------------------------------------
# mmap
# ---------------------------------------------------------------------------

def test_mmap_shared_write_visible_after_close_and_remount(mnt):
    p = mnt.path("mm")
    size = 3 * MiB + 123
    base = rnd(size, 12)
    write_file(p, base)
    patch1 = rnd(70000, 13)
    patch2 = rnd(5000, 14)
    exp = bytearray(base)
    with open(p, "r+b") as f:
        m = mmap.mmap(f.fileno(), size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        m[100:100 + len(patch1)] = patch1
        m.flush()  # msync
        exp[100:100 + len(patch1)] = patch1
        m[size - 5000:size] = patch2
        exp[size - 5000:size] = patch2
        m.close()  # no msync for patch2: close/munmap + file close must still persist it
    assert_bytes_equal(read_file(p), bytes(exp), "fresh open after mmap write")
    mnt.remount()
    assert_bytes_equal(read_file(p), bytes(exp), "after remount (mmap writes reached the daemon)")


def test_mmap_private_read(workdir):
    p = workdir / "mp"
    data = rnd(2 * MiB + 1, 15)
    write_file(p, data)
    with open(p, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        assert_bytes_equal(m[:], data, "MAP_PRIVATE read")
        m[0:4] = b"PRIV"  # copy-on-write, must not reach the file
        assert m[0:4] == b"PRIV"
        m.close()
        r = mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ)
        assert_bytes_equal(r[:], data, "MAP_SHARED read-only")
        r.close()
    assert_bytes_equal(read_file(p), data, "file after private write")


# ---------------------------------------------------------------------------
# fsync / statvfs / O_DIRECT
# ---------------------------------------------------------------------------

def test_fsync_file_and_directory(workdir):
    p = workdir / "fs"
    fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"synced")
    os.fsync(fd)
    os.fdatasync(fd)
    os.close(fd)
    dfd = os.open(workdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    assert read_file(p) == b"synced"


def test_statvfs_sane(mnt):
    st = os.statvfs(mnt.mp)
    assert st.f_bsize > 0 and st.f_frsize > 0
    assert st.f_blocks > 0
    assert 0 <= st.f_bavail <= st.f_bfree <= st.f_blocks
    assert st.f_namemax >= 255
    assert st.f_blocks * st.f_frsize >= 64 * MiB, "reported capacity is implausibly small"
    # the reported free space should be about what the data dir's filesystem has
    host = os.statvfs(mnt.data)
    host_free = host.f_bavail * host.f_frsize
    ours = st.f_bavail * st.f_frsize
    assert ours <= st.f_blocks * st.f_frsize
    assert host_free == 0 or 0.25 * host_free <= ours <= 4 * host_free + (1 << 30), (ours, host_free)


def test_o_direct(workdir):
    p = workdir / "direct"
    data = rnd(1 * MiB, 16)
    write_file(p, data)
    fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, 64 * 1024)  # page-aligned buffer
        n = os.preadv(fd, [buf], 128 * 1024)
        assert n == 64 * 1024
        assert_bytes_equal(buf[:n], data[128 * 1024:192 * 1024], "O_DIRECT read")
    finally:
        os.close(fd)
    # aligned O_DIRECT write, then a normal read
    fd = os.open(p, os.O_WRONLY | os.O_DIRECT)
    try:
        wbuf = mmap.mmap(-1, 8192)
        wbuf[:] = b"D" * 8192
        assert os.pwritev(fd, [wbuf], 4096) == 8192
    finally:
        os.close(fd)
    exp = bytearray(data)
    exp[4096:4096 + 8192] = b"D" * 8192
    assert_bytes_equal(read_file(p), bytes(exp), "after O_DIRECT write")


# ---------------------------------------------------------------------------
# persistence / dedup / status
# ---------------------------------------------------------------------------

def test_everything_survives_remount(mnt):
    root = mnt.path("persist")
    files = _make_tree(root, 17)
    big = os.urandom(9 * MiB + 7)
    write_file(root / "big", big)
    open(root / "empty", "wb").close()
    os.symlink("sub/y", root / "sym")
    os.link(root / "x", root / "hard")
    os.setxattr(root / "x", "user.meta", b"value")
    os.chmod(root / "other" / "q", 0o600)
    os.chown(root / "other" / "q", 1000, 1000)
    os.utime(root / "sub" / "y", ns=(1_700_000_000_000_000_001, 1_700_000_000_000_000_002))
    (root / "emptydir").mkdir()
    ino_x = os.stat(root / "x").st_ino
    mnt.remount()
    files.update({"big": big, "empty": b"", "hard": files["x"]})
    seen = set()
    for dirpath, dirs, names in os.walk(root):
        for n in names:
            seen.add(os.path.relpath(os.path.join(dirpath, n), root))
    assert seen == set(files) | {"sym"}
    for rel, data in files.items():
        assert_bytes_equal(read_file(root / rel), data, rel)
    assert os.readlink(root / "sym") == "sub/y"
    assert os.stat(root / "x").st_nlink == 2 and os.stat(root / "hard").st_ino == os.stat(root / "x").st_ino
    assert os.stat(root / "x").st_ino == ino_x, "inode numbers are not stable across remount"
    assert os.getxattr(root / "x", "user.meta") == b"value"
    st = os.stat(root / "other" / "q")
    assert stat.S_IMODE(st.st_mode) == 0o600 and (st.st_uid, st.st_gid) == (1000, 1000)
    assert os.stat(root / "sub" / "y").st_mtime_ns == 1_700_000_000_000_000_002
    assert os.listdir(root / "emptydir") == []


def test_status_json(mnt):
    sizes = [0, 1000, 3 * MiB + 5]
    for i, n in enumerate(sizes):
        write_file(mnt.path(f"s{i}"), rnd(n, 200 + i))
    (mnt.path("dir")).mkdir()
    st = mnt.status()
    for key in ("files", "logicalBytes", "storedBytes", "blocks", "dedupRatio", "dataDirBytes"):
        assert key in st, f"status --json lacks {key!r}: {st}"
    assert st["files"] == 3, st
    assert st["logicalBytes"] == sum(sizes), st
    assert st["storedBytes"] >= 3 * MiB, st
    assert st["blocks"] >= 1, st
    assert st["dataDirBytes"] >= st["storedBytes"], st
    # plain-text status works too
    r = run([mnt.bin, "status"], timeout=30)
    assert r.returncode == 0 and r.stdout.strip(), r


def test_identical_content_dedups(mnt):
    data = os.urandom(32 * MiB)
    write_file(mnt.path("copy1"), data)
    write_file(mnt.path("copy2"), data)
    (mnt.path("sub")).mkdir()
    write_file(mnt.path("sub", "copy3"), data)

    def settled():
        st = mnt.status()
        return st if st.get("logicalBytes", 0) >= 96 * MiB else None

    st = wait_until(settled, 20, interval=0.5, what="status to account for 96 MiB")
    assert st["logicalBytes"] == 96 * MiB, st
    assert st["storedBytes"] < 0.5 * st["logicalBytes"], f"no dedup: {st}"
    assert st["storedBytes"] <= 40 * MiB, st
    assert st["dedupRatio"] >= 2.0, st
    assert_bytes_equal(read_file(mnt.path("sub", "copy3")), data, "deduped copy")
