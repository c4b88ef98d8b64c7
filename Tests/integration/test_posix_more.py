"""More POSIX corners that docs/SEMANTICS.md promises: RENAME_EXCHANGE, setgid directories,
xattr create/replace flags, fallocate modes, device nodes, non-UTF-8 names."""
from __future__ import annotations

import ctypes
import errno
import os
import socket
import stat
import struct
import subprocess
import sys

import pytest

from mfs import in_child, read_file, wait_until, write_file

libc = ctypes.CDLL(None, use_errno=True)
RENAME_EXCHANGE = 2
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_ZERO_RANGE = 0x10
FALLOC_FL_PUNCH_HOLE = 2


def renameat2(old, new, flags):
    AT_FDCWD = -100
    r = libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags)
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def fallocate(fd, mode, off, length):
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    r = libc.fallocate(fd, mode, off, length)
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def test_rename_exchange_swaps_file_and_directory(workdir):
    write_file(workdir / "f", b"file")
    os.mkdir(workdir / "d")
    write_file(workdir / "d" / "inner", b"inner")
    renameat2(workdir / "f", workdir / "d", RENAME_EXCHANGE)
    assert read_file(workdir / "d") == b"file"
    assert read_file(workdir / "f" / "inner") == b"inner"
    with pytest.raises(OSError) as e:
        renameat2(workdir / "f", workdir / "missing", RENAME_EXCHANGE)
    assert e.value.errno == errno.ENOENT


def test_setgid_directory_passes_its_group_on(workdir):
    d = workdir / "shared"
    os.mkdir(d)
    os.chown(d, 0, 4242)
    os.chmod(d, 0o2777)
    write_file(d / "f", b"x")
    os.mkdir(d / "sub")
    assert os.stat(d / "f").st_gid == 4242
    assert os.stat(d / "sub").st_gid == 4242
    assert os.stat(d / "sub").st_mode & stat.S_ISGID


def test_xattr_create_and_replace_flags(workdir):
    p = workdir / "x"
    write_file(p, b"")
    with pytest.raises(OSError) as e:
        os.setxattr(p, "user.k", b"1", os.XATTR_REPLACE)
    assert e.value.errno == errno.ENODATA
    os.setxattr(p, "user.k", b"1", os.XATTR_CREATE)
    with pytest.raises(OSError) as e:
        os.setxattr(p, "user.k", b"2", os.XATTR_CREATE)
    assert e.value.errno == errno.EEXIST
    os.setxattr(p, "user.k", b"2", os.XATTR_REPLACE)
    assert os.getxattr(p, "user.k") == b"2"
    # user::rw-, user:1000:rw-, group::r--, mask::rw-, other::r-- (not expressible as a mode,
    # so the kernel passes it on): modelfs has no ACLs and says so.
    acl = b"\x02\x00\x00\x00" + b"".join(struct.pack("<HHI", tag, perm, uid) for tag, perm, uid in (
        (1, 6, 0xFFFFFFFF), (2, 6, 1000), (4, 4, 0xFFFFFFFF), (0x10, 6, 0xFFFFFFFF), (0x20, 4, 0xFFFFFFFF)))
    with pytest.raises(OSError) as e:
        os.setxattr(p, "system.posix_acl_access", acl, 0)
    assert e.value.errno == errno.EOPNOTSUPP
    # No labels or file capabilities either (so the kernel's security.capability probe before
    # every write is answered without a metadata read).
    with pytest.raises(OSError) as e:
        os.setxattr(p, "security.capability", b"\x01\x00\x00\x02" + bytes(16), 0)
    assert e.value.errno == errno.EOPNOTSUPP
    with pytest.raises(OSError) as e:
        os.getxattr(p, "security.capability")
    assert e.value.errno == errno.ENODATA


def test_fallocate_modes(workdir):
    p = workdir / "fa"
    write_file(p, b"abc")
    fd = os.open(p, os.O_RDWR)
    try:
        fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 1 << 20)
        assert os.fstat(fd).st_size == 3
        fallocate(fd, 0, 0, 1 << 20)
        assert os.fstat(fd).st_size == 1 << 20
        with pytest.raises(OSError) as e:
            fallocate(fd, FALLOC_FL_COLLAPSE_RANGE, 0, 4096)
        assert e.value.errno in (errno.EOPNOTSUPP, errno.EINVAL)
    finally:
        os.close(fd)
    data = read_file(p)
    assert data[:3] == b"abc" and data[3:] == bytes((1 << 20) - 3)


def test_punch_hole_and_zero_range(workdir, mnt):
    p = workdir / "holes"
    data = bytearray(os.urandom(6 << 20))
    write_file(p, bytes(data))
    fd = os.open(p, os.O_RDWR)
    try:
        # A hole punched in the middle (KEEP_SIZE, as Linux requires): zeros, size kept.
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, (1 << 20) + 5, 2 << 20)
        data[(1 << 20) + 5:(3 << 20) + 5] = bytes(2 << 20)
        # A zero range that runs past the end with KEEP_SIZE: zeros up to the end, size kept.
        fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, (5 << 20) + 100, 4 << 20)
        data[(5 << 20) + 100:] = bytes(len(data) - (5 << 20) - 100)
        assert os.fstat(fd).st_size == 6 << 20
        # Without KEEP_SIZE it extends the file.
        fallocate(fd, FALLOC_FL_ZERO_RANGE, 6 << 20, 4096)
        data += bytes(4096)
        assert os.fstat(fd).st_size == len(data)
        assert os.pread(fd, 64, (1 << 20) + 5) == bytes(64)
    finally:
        os.close(fd)
    assert read_file(p) == bytes(data)
    # After a remount, from the committed version.
    mnt.remount()
    assert read_file(mnt.path("w") / "holes") == bytes(data)


def copy_all(src, dst, **kw) -> int:
    """copy_file_range until the source's end (or `count` bytes); returns the bytes copied."""
    count = kw.pop("count", 1 << 62)
    n = 0
    while n < count:
        r = os.copy_file_range(src, dst, min(count - n, 1 << 30), **kw)
        if r == 0:
            break
        n += r
        if "offset_src" in kw:
            kw["offset_src"] += r
        if "offset_dst" in kw:
            kw["offset_dst"] += r
    return n


def test_copy_file_range_shares_blocks_and_copies_any_range(workdir, mnt):
    """copy_file_range (what `cp` uses) is answered by the daemon in one request; a whole-file
    copy into a new file shares the source's blocks (status: clonedBytes, no new stored bytes),
    and the copy is an independent file afterwards. Any other range is copied as bytes."""
    src = workdir / "src.bin"
    data = os.urandom(24 << 20) + b"tail"
    write_file(src, data)
    before = mnt.status()
    # `cp` itself: FICLONE is refused (EOPNOTSUPP), then copy_file_range.
    subprocess.run(["cp", src, workdir / "cp.bin"], check=True)
    after = mnt.status()
    assert after["clonedBytes"] - before["clonedBytes"] == len(data)
    assert after["storedBytes"] - before["storedBytes"] < 1 << 20
    assert read_file(workdir / "cp.bin") == data
    # The copy is its own file: writing it leaves the source as it was, and the reverse.
    with open(workdir / "cp.bin", "r+b") as f:
        f.seek(1000)
        f.write(b"changed")
    with open(src, "r+b") as f:
        f.seek(5 << 20)
        f.write(b"SOURCE")
    assert read_file(workdir / "cp.bin") == data[:1000] + b"changed" + data[1007:]
    assert read_file(src) == data[:5 << 20] + b"SOURCE" + data[(5 << 20) + 6:]
    data2 = read_file(src)
    # Ranges anywhere: from an odd offset, to an odd offset past a header, within one file.
    fi = os.open(src, os.O_RDONLY)
    fo = os.open(workdir / "ranges.bin", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fo, b"header")
        assert copy_all(fi, fo, count=3_000_001, offset_src=12_345, offset_dst=6) == 3_000_001
        # Past the source's end: only what is there.
        assert copy_all(fi, fo, offset_src=len(data2) - 10, offset_dst=3_000_007) == 10
        assert os.copy_file_range(fi, fo, 100, offset_src=len(data2) + 5, offset_dst=0) == 0
    finally:
        os.close(fi)
        os.close(fo)
    assert read_file(workdir / "ranges.bin") == b"header" + data2[12_345:12_345 + 3_000_001] + data2[-10:]
    fd = os.open(src, os.O_RDWR)
    try:
        assert copy_all(fd, fd, count=1 << 20, offset_src=0, offset_dst=len(data2)) == 1 << 20
    finally:
        os.close(fd)
    assert read_file(src) == data2 + data2[:1 << 20]
    # After a remount every copy reads the same.
    mnt.remount()
    w = mnt.path("w")
    assert read_file(w / "cp.bin") == data[:1000] + b"changed" + data[1007:]
    assert read_file(w / "ranges.bin") == b"header" + data2[12_345:12_345 + 3_000_001] + data2[-10:]
    assert read_file(w / "src.bin") == data2 + data2[:1 << 20]


def current_umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_special_files_are_inodes_the_kernel_opens(workdir):
    """FIFOs, sockets and device nodes are kept (type, mode, owner, device number) and listed
    with their type; opening one is the kernel's business: a FIFO passes bytes between two
    processes, a bound socket accepts a connection."""
    fifo, sock, null, blk = workdir / "fifo", workdir / "sock", workdir / "null", workdir / "blk"
    os.mkfifo(fifo, 0o640)
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(blk, 0o600 | stat.S_IFBLK, os.makedev(7, 200))
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock))
    server.listen(1)
    try:
        st = os.lstat(fifo)
        assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640 & ~current_umask(), oct(st.st_mode)
        st = os.lstat(null)
        assert stat.S_ISCHR(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (1, 3), st
        st = os.lstat(blk)
        assert stat.S_ISBLK(st.st_mode) and (os.major(st.st_rdev), os.minor(st.st_rdev)) == (7, 200), st
        assert stat.S_ISSOCK(os.lstat(sock).st_mode)
        kinds = {e.name: (e.is_file(), e.is_dir(), e.is_symlink()) for e in os.scandir(workdir)}
        assert kinds["fifo"] == (False, False, False) and kinds["null"] == (False, False, False), kinds
        types = {name: stat.S_IFMT(os.lstat(workdir / name).st_mode) for name in ("fifo", "sock", "null", "blk")}
        assert types == {"fifo": stat.S_IFIFO, "sock": stat.S_IFSOCK, "null": stat.S_IFCHR, "blk": stat.S_IFBLK}

        # The FIFO carries bytes from a writer process to this reader.
        child = subprocess.Popen([sys.executable, "-c", f"open({str(fifo)!r}, 'wb').write(b'through the pipe')"])
        with open(fifo, "rb") as f:
            assert f.read() == b"through the pipe"
        assert child.wait(timeout=30) == 0
        # The socket accepts a connection made by path.
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(sock))
        conn, _ = server.accept()
        client.sendall(b"hello")
        assert conn.recv(5) == b"hello"
        conn.close()
        client.close()
        # A FUSE mount is nodev unless mounted with -o dev: the device node is kept, not opened.
        with pytest.raises(PermissionError):
            open(null, "r+b")

        # They rename, link, chmod and unlink like any inode.
        os.chmod(fifo, 0o600)
        os.rename(fifo, workdir / "fifo2")
        os.link(workdir / "fifo2", workdir / "fifo3")
        assert os.lstat(workdir / "fifo3").st_nlink == 2 and stat.S_IMODE(os.lstat(workdir / "fifo3").st_mode) == 0o600
        for name in ("fifo2", "fifo3", "null", "blk", "sock"):
            os.unlink(workdir / name)
        assert not {"fifo2", "fifo3", "null", "blk", "sock"} & set(os.listdir(workdir))
    finally:
        server.close()
    # A regular file through mknod, as before.
    os.mknod(workdir / "plain", 0o644 | stat.S_IFREG)
    assert stat.S_ISREG(os.stat(workdir / "plain").st_mode)


def test_device_nodes_open_on_a_mount_with_dev(mount_factory):
    m = mount_factory(options=["dev"])
    null = m.path("null")
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    with open(null, "r+b") as f:   # the kernel's null device: takes everything, gives nothing
        assert f.write(b"gone") == 4 and f.read() == b""
    zero = m.path("zero")
    os.mknod(zero, 0o444 | stat.S_IFCHR, os.makedev(1, 5))
    with open(zero, "rb") as f:
        assert f.read(4096) == bytes(4096)


# Names the kernel may send that are not UTF-8 (Latin-1, a cut sequence, a UTF-8 surrogate, an
# overlong slash), and valid names made of the characters modelfs uses to escape such bytes.
BYTE_NAMES = [b"caf\xe9", b"\xff\xfe", b"\xe2\x82", b"\xed\xa0\x80.pt", b"\xc0\xaf",
              "\U0010ff41x".encode(), b"\xf4\x8f\xbf\xbf", bytes(range(1, 47)) + bytes(range(48, 128)),
              bytes(range(128, 256)), b"\xff" * 255]


def test_names_are_bytes(workdir, mnt):
    """Any byte but "/" and NUL, up to 255 bytes, on every path: create, lookup, readdir,
    rename, link, symlink (name and target), xattr names, unlink; kept through a remount."""
    d = os.fsencode(str(workdir))
    for i, name in enumerate(BYTE_NAMES):
        write_file(d + b"/" + name, b"%d" % i)
    assert set(os.listdir(d)) >= set(BYTE_NAMES)
    for i, name in enumerate(BYTE_NAMES):
        assert read_file(d + b"/" + name) == b"%d" % i, name
        assert os.stat(d + b"/" + name).st_size == len(b"%d" % i)
    # The escape characters and the bytes they stand for are different names.
    assert b"A" + b"x" not in os.listdir(d)
    os.mkdir(d + b"/dir\x80")
    os.rename(d + b"/caf\xe9", d + b"/dir\x80/caf\xc3\xa9")   # Latin-1 to UTF-8
    assert os.listdir(d + b"/dir\x80") == [b"caf\xc3\xa9"]
    assert os.listdir(d + b"/dir\x80") == [b"caf\xc3\xa9"]
    os.link(d + b"/\xff\xfe", d + b"/dir\x80/\xfe\xff")
    assert os.stat(d + b"/dir\x80/\xfe\xff").st_nlink == 2
    target = b"../\xff\xfe/\x80" * 10
    os.symlink(target, d + b"/ln\x81")
    assert os.readlink(d + b"/ln\x81") == target
    assert os.lstat(d + b"/ln\x81").st_size == len(target)
    os.setxattr(d + b"/\xff\xfe", b"user.\xe9t\xe9", b"\x00\xff")
    assert b"user.\xe9t\xe9" in map(os.fsencode, os.listxattr(d + b"/\xff\xfe"))
    assert os.getxattr(d + b"/\xff\xfe", b"user.\xe9t\xe9") == b"\x00\xff"
    # 255 bytes is the limit in bytes, whatever they are.
    with pytest.raises(OSError) as e:
        write_file(d + b"/" + b"\xff" * 256, b"")
    assert e.value.errno == errno.ENAMETOOLONG
    mnt.remount()
    assert set(os.listdir(d)) >= set(BYTE_NAMES[1:]) | {b"dir\x80", b"ln\x81"}
    assert read_file(d + b"/dir\x80/caf\xc3\xa9") == b"0"
    assert os.readlink(d + b"/ln\x81") == target
    for name in BYTE_NAMES[1:]:
        os.unlink(d + b"/" + name)
    assert b"\xff\xfe" not in os.listdir(d)
    assert read_file(d + b"/dir\x80/\xfe\xff") == b"1"


def test_other_user_cannot_chown_or_chmod_foreign_file(workdir):
    p = workdir / "root-owned"
    write_file(p, b"r")
    os.chmod(workdir, 0o777)

    def attempt():
        try:
            os.chmod(p, 0o777)
        except PermissionError:
            return "denied"
        return "allowed"

    assert in_child(attempt, uid=1000, gid=1000) == "denied"


def test_writes_reach_the_daemon_as_they_are_made_by_default(mnt):
    """Without the kernel's writeback cache (the default) a write() returns once the daemon has
    the bytes: they are already streamed into blocks while the file is still open."""
    wait_until(lambda: "kernel writeback cache: off" in mnt.log_tail(), 10, interval=0.05,
               what="the daemon to log the writeback cache off (when the kernel's INIT arrives)")
    before = mnt.status()["streamedBytes"]
    fd = os.open(mnt.path("stream.bin"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        assert os.write(fd, os.urandom(4 << 20)) == 4 << 20
        assert mnt.status()["streamedBytes"] - before >= 4 << 20
    finally:
        os.close(fd)


def test_writeback_cache_option(mount_factory):
    """-o writeback_cache turns the kernel's writeback cache on: write-only opens that patch
    partial pages (the kernel then reads pages back), appends and seek-back header rewrites (as
    np.savez and zipfile do) stay exact, before and after a remount."""
    m = mount_factory(options=["writeback_cache"])
    # The line is logged when the kernel's INIT arrives, which may come after the mount answers.
    wait_until(lambda: "kernel writeback cache: on" in m.log_tail(), 10, interval=0.05,
               what="the daemon to log the writeback cache on")
    p = m.path("wb.bin")
    body = os.urandom(3 * (1 << 20) + 123)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.write(fd, b"\0" * 64)
    os.write(fd, body)
    os.lseek(fd, 10, os.SEEK_SET)
    os.write(fd, b"HEADER")
    os.pwrite(fd, b"mid", 5000)
    os.close(fd)
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"tail")
    os.close(fd)
    expect = bytearray(b"\0" * 64 + body + b"tail")
    expect[10:16] = b"HEADER"
    expect[5000:5003] = b"mid"
    assert read_file(p) == bytes(expect)
    m.remount()
    assert read_file(p) == bytes(expect)


def _resident_pages(fd, size) -> int:
    """Pages of the file open as `fd` in the kernel's page cache (mincore over a read-only
    mapping; mapping, unlike opening, does not drop cached pages)."""
    page = os.sysconf("SC_PAGE_SIZE")
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    addr = libc.mmap(None, size, 1, 1, fd, 0)   # PROT_READ, MAP_SHARED
    assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    try:
        vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
        assert libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
        return sum(v & 1 for v in vec)
    finally:
        libc.munmap(addr, size)


@pytest.mark.parametrize("access,cached", [(os.O_WRONLY, False), (os.O_RDWR, True)], ids=["write-only", "read-write"])
def test_write_only_opens_bypass_the_page_cache(workdir, access, cached):
    """A write-only descriptor writes past the kernel's page cache (nothing can map or read
    it); a read-write one writes through it."""
    data = os.urandom(8 << 20)
    p = workdir / "f"
    w = os.open(p, access | os.O_CREAT | os.O_TRUNC, 0o644)
    r = os.open(p, os.O_RDONLY)
    try:
        assert os.write(w, data) == len(data)
        resident = _resident_pages(r, len(data))
        assert (resident > 0) == cached, f"{resident} pages cached"
        assert os.pread(r, len(data), 0) == data
    finally:
        os.close(r)
        os.close(w)
    assert read_file(p) == data


def test_a_direct_write_is_seen_by_open_readers(workdir):
    """Readers that cached the pages (read(), a shared mapping) see a write-only writer's bytes
    as soon as its write() returns."""
    import mmap
    p = workdir / "f"
    write_file(p, b"A" * (256 << 10))
    r = os.open(p, os.O_RDONLY)
    m = mmap.mmap(r, 256 << 10, prot=mmap.PROT_READ)
    try:
        assert os.pread(r, 4096, 8192) == b"A" * 4096 and m[0:4] == b"AAAA"
        w = os.open(p, os.O_WRONLY)
        try:
            assert os.pwrite(w, b"B" * (64 << 10), 0) == 64 << 10
            assert os.pread(r, 4096, 8192) == b"B" * 4096
            assert m[0:4] == b"BBBB" and m[70000:70004] == b"AAAA"
        finally:
            os.close(w)
    finally:
        m.close()
        os.close(r)


def test_pages_cached_during_a_direct_write_are_not_kept(workdir):
    """A reader that came and went while a write-only writer had the file open cached pages
    the writer then changed: the next open does not keep them."""
    p = workdir / "f"
    w = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(w, b"1" * 65536)
        assert read_file(p) == b"1" * 65536      # a reader opens, caches the pages, closes
        os.pwrite(w, b"2" * 65536, 0)           # nobody else has it open now
        assert read_file(p) == b"2" * 65536
    finally:
        os.close(w)
    assert read_file(p) == b"2" * 65536


@pytest.mark.parametrize("mode,after", [(0o6777, 0o0777), (0o2767, 0o2767)], ids=["setuid+setgid", "setgid-no-group-exec"])
def test_a_write_by_another_user_clears_set_id_bits(workdir, mode, after):
    """As the kernel does for writes through its page cache: a write by a caller without
    CAP_FSETID clears setuid, and setgid where the group may execute; root's write keeps them."""
    p = workdir / "s"
    write_file(p, b"x" * 10)
    os.chmod(workdir, 0o777)
    for flags in (os.O_WRONLY, os.O_RDWR):
        os.chmod(p, mode)
        def write_as_user(path, flags):
            fd = os.open(path, flags)
            os.write(fd, b"y")
            os.close(fd)
        in_child(write_as_user, str(p), flags, uid=1000, gid=1000)
        assert stat.S_IMODE(os.stat(p).st_mode) == after, f"flags {flags:#o}"
    os.chmod(p, mode)
    fd = os.open(p, os.O_WRONLY)
    os.write(fd, b"z")
    os.close(fd)
    assert stat.S_IMODE(os.stat(p).st_mode) == mode


def test_a_name_looked_up_before_it_exists_appears_however_it_is_made(workdir):
    # One node keeps "no such name" in the kernel (negative entries, docs/SEMANTICS.md): every
    # way of making the name must replace that answer at once.
    makers = {
        "create": lambda p: write_file(p, b"x"),
        "mkdir": lambda p: os.mkdir(p),
        "symlink": lambda p: os.symlink("target", p),
        "link": lambda p: os.link(workdir / "linked-from", p),
        "rename": lambda p: os.rename(workdir / "renamed-from", p),
        "mknod": lambda p: os.mknod(p, 0o644 | stat.S_IFREG),
    }
    write_file(workdir / "linked-from", b"l")
    write_file(workdir / "renamed-from", b"r")
    for kind, make in makers.items():
        p = workdir / f"later-{kind}"
        for _ in range(2):
            assert not os.path.lexists(p)
            with pytest.raises(FileNotFoundError):
                os.stat(p)
        make(p)
        assert os.path.lexists(p), f"{kind}: the name stayed hidden behind the cached negative answer"
        assert p.name in os.listdir(workdir)
    # And gone again: unlink and rename away turn it back into "no such name".
    os.unlink(workdir / "later-create")
    assert not os.path.lexists(workdir / "later-create")
    os.rename(workdir / "later-link", workdir / "moved")
    assert not os.path.lexists(workdir / "later-link") and read_file(workdir / "moved") == b"l"
    # A name missing in a directory made after the lookup of its path.
    with pytest.raises(FileNotFoundError):
        os.stat(workdir / "sub" / "f")
    os.mkdir(workdir / "sub")
    write_file(workdir / "sub" / "f", b"s")
    assert read_file(workdir / "sub" / "f") == b"s"


def test_every_operation_on_a_name_longer_than_255_bytes_is_enametoolong(workdir):
    """As on ext4: the length is checked for every operation, not only the ones that create
    (a lookup used to answer ENOENT)."""
    long = workdir / ("n" * 256)
    ok = workdir / "ok"
    write_file(ok, b"x")
    ops = {
        "stat": lambda: os.stat(long),
        "lstat": lambda: os.lstat(long),
        "open": lambda: os.open(long, os.O_RDONLY),
        "create": lambda: os.open(long, os.O_CREAT | os.O_WRONLY, 0o644),
        "mkdir": lambda: os.mkdir(long),
        "mkfifo": lambda: os.mkfifo(long),
        "symlink": lambda: os.symlink("target", long),
        "chmod": lambda: os.chmod(long, 0o600),
        "chown": lambda: os.chown(long, 0, 0),
        "truncate": lambda: os.truncate(long, 0),
        "unlink": lambda: os.unlink(long),
        "rmdir": lambda: os.rmdir(long),
        "link to": lambda: os.link(ok, long),
        "rename from": lambda: os.rename(long, ok),
        "rename to": lambda: os.rename(ok, long),
        "utime": lambda: os.utime(long),
        "getxattr": lambda: os.getxattr(long, "user.x"),
    }
    wrong = {}
    for what, op in ops.items():
        try:
            op()
            wrong[what] = "succeeded"
        except OSError as e:
            if e.errno != errno.ENAMETOOLONG:
                wrong[what] = errno.errorcode.get(e.errno, e.errno)
    assert not wrong, wrong
    assert read_file(ok) == b"x"
    # 255 bytes is fine.
    write_file(workdir / ("n" * 255), b"y")
    assert read_file(workdir / ("n" * 255)) == b"y"
    # A symlink's target is a path, not a name: components over 255 bytes and 4095 bytes in all.
    for i, target in enumerate(["t" * 256, "/".join(["c" * 127] * 32)[:4095]]):
        os.symlink(target, workdir / f"l{i}")
        assert os.readlink(workdir / f"l{i}") == target
        os.unlink(workdir / f"l{i}")
