"""Reads through FUSE passthrough (on by default; `--no-passthrough` turns it off): read-only opens
pass straight to a flat copy of the version they read, which the daemon builds from verified
blocks after the first open that finds none (docs/ARCHITECTURE.md "Reads through passthrough")."""
from __future__ import annotations

import errno
import mmap
import os
import time

import pytest

from mfs import read_file, run, wait_until, write_file
from test_errors import _read_until_error, block_records, flip_byte_in_record, manifest_block_ids

MiB = 1 << 20


def passthrough(m) -> dict:
    p = m.status().get("passthrough")
    assert p is not None, "status has no passthrough section on a --passthrough mount"
    return p


def flat_copy_of(m, path, before: int):
    """Opens `path` read-only (a miss asks for a copy) until the copy is built. One open may not
    ask: the kernel sends a writer's RELEASE asynchronously, so an open right after close() can
    still find the write session, and reads through it."""
    def built():
        with open(path, "rb") as f:
            f.read(1)
        return passthrough(m)["flat"]["built"] > before
    wait_until(built, 60, interval=0.1, what="the flat copy to be built")


@pytest.fixture
def pt(mount_factory):
    m = mount_factory(extra_args=["--passthrough"])
    p = passthrough(m)
    if not p["offered"]:
        pytest.skip("this kernel does not offer FUSE passthrough (6.9 and later)")
    assert p["on"], p
    return m


def test_reads_and_maps_pass_through_to_a_verified_flat_copy(pt):
    data = os.urandom(32 * MiB + 12345)
    write_file(pt.path("model.bin"), data)
    flat_copy_of(pt, pt.path("model.bin"), 0)
    p0 = passthrough(pt)
    assert p0["flat"]["copies"] == 1 and p0["flat"]["bytes"] == len(data), p0
    # The copy is a plain file named by the content, holding exactly the version's bytes.
    copies = [c for c in os.listdir(pt.data / "flat") if not c.startswith(".")]
    assert len(copies) == 1 and (pt.data / "flat" / copies[0]).read_bytes() == data
    assert read_file(pt.path("model.bin")) == data
    with open(pt.path("model.bin"), "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        assert m[:] == data
        assert m[len(data) - 7:] == data[-7:]
        m.close()
        f.seek(20 * MiB)
        assert f.read(5) == data[20 * MiB:20 * MiB + 5]
    p1 = passthrough(pt)
    assert p1["opens"] >= p0["opens"] + 2 and p1["flat"]["hits"] >= p0["flat"]["hits"] + 2, (p0, p1)
    # Those reads never reached the daemon: the kernel read the copy itself.
    assert p1["daemonReads"] == p0["daemonReads"], (p0, p1)
    # A file with the same bytes shares the copy.
    write_file(pt.path("same.bin"), data)
    assert read_file(pt.path("same.bin")) == data
    assert passthrough(pt)["flat"]["copies"] == 1
    # Through a remount the copy is still there and used.
    pt.remount()
    before = passthrough(pt)["opens"]
    assert read_file(pt.path("model.bin")) == data
    assert passthrough(pt)["opens"] == before + 1


def test_a_new_version_written_while_a_reader_passes_through(pt):
    """A reader holding the old version keeps it; a writer (and readers of the new version
    meanwhile) go through the daemon; once they all close, the new version passes through."""
    p = pt.path("ckpt.pt")
    old = os.urandom(8 * MiB)
    write_file(p, old)
    flat_copy_of(pt, p, 0)
    a = open(p, "rb")
    try:
        assert a.read(4096) == old[:4096]
        new = os.urandom(5 * MiB)
        write_file(p, new)                   # O_WRONLY|O_TRUNC on an inode that passes through
        with open(p, "rb") as b:
            assert b.read() == new
        with open(p, "r+b") as rw:           # an in-place update too
            rw.seek(100)
            rw.write(b"patched")
        new = new[:100] + b"patched" + new[107:]
        assert read_file(p) == new
        a.seek(8 * MiB - 10)
        assert a.read() == old[-10:], "the reader opened before the writes keeps its version"
    finally:
        a.close()
    built = passthrough(pt)["flat"]["built"]
    flat_copy_of(pt, p, built)
    opens = passthrough(pt)["opens"]
    with open(p, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        assert m[:] == new
        m.close()
    assert passthrough(pt)["opens"] == opens + 1


def test_a_page_cache_reader_keeps_new_opens_off_passthrough(pt):
    p = pt.path("shared.bin")
    data = os.urandom(4 * MiB)
    write_file(p, data)
    flat_copy_of(pt, p, 0)
    os.unlink(pt.data / "flat" / next(c for c in os.listdir(pt.data / "flat") if not c.startswith(".")))
    pt.remount()                              # the copy is gone: the next open is a miss
    with open(p, "rb") as cached:            # the miss: a page-cache open, and a build
        wait_until(lambda: passthrough(pt)["flat"]["built"] >= 1, 60, interval=0.1, what="the flat copy")
        opens = passthrough(pt)["opens"]
        with open(p, "rb") as second:         # the kernel forbids mixing: this one is cached too
            assert second.read() == data
        assert cached.read() == data
        assert passthrough(pt)["opens"] == opens
    assert read_file(p) == data
    assert passthrough(pt)["opens"] == opens + 1


def test_flat_copies_keep_to_their_budget(mount_factory):
    m = mount_factory(extra_args=["--passthrough", "--flat-size", "5M"])
    if not passthrough(m)["offered"]:
        pytest.skip("this kernel does not offer FUSE passthrough")
    files = {f"f{i}": os.urandom(2 * MiB + i) for i in range(5)}
    for name, data in files.items():
        write_file(m.path(name), data)
    for built, name in enumerate(files):
        flat_copy_of(m, m.path(name), built)
        p = passthrough(m)
        assert p["flat"]["bytes"] <= 5 * MiB, p
    p = passthrough(m)
    assert p["flat"]["evicted"] >= 3 and p["flat"]["copies"] <= 2, p
    for name, data in files.items():
        assert read_file(m.path(name)) == data
    # A file over half the budget is never copied: it reads through the daemon.
    big = os.urandom(3 * MiB)
    write_file(m.path("big"), big)
    for _ in range(2):
        assert read_file(m.path("big")) == big
    # (Reading the evicted files again above asks for their copies again; none is `big`'s.)
    sizes = [os.path.getsize(m.data / "flat" / c) for c in os.listdir(m.data / "flat") if not c.startswith(".")]
    assert len(big) not in sizes, sizes
    assert passthrough(m)["flat"]["bytes"] <= 5 * MiB


def test_a_half_built_copy_is_never_used(mount_factory):
    m = mount_factory(extra_args=["--passthrough"])
    data = os.urandom(MiB)
    write_file(m.path("x"), data)
    m.unmount()
    flat = m.data / "flat"
    (flat / ".tmp-deadbeef").write_bytes(b"half")
    m.start()
    assert not (flat / ".tmp-deadbeef").exists()
    assert read_file(m.path("x")) == data


def test_a_build_yields_to_readers_and_gives_up_on_a_deleted_file(pt):
    """A flat copy's build waits while the daemon serves reads fast (a cold random reader), and
    a build whose file was deleted meanwhile stops instead of writing a copy nobody can open."""
    data = os.urandom(256 * MiB)
    write_file(pt.path("big"), data)
    pt.unmount()
    pt.start()
    fd = os.open(pt.path("big"), os.O_RDONLY)     # the first open asks for a copy
    try:
        import random
        rng = random.Random(3)
        deadline = time.monotonic() + 2.0
        n = 0
        while time.monotonic() < deadline:
            off = rng.randrange(len(data) // 4096) * 4096
            assert os.pread(fd, 4096, off) == data[off:off + 4096]
            n += 1
            if n == 200:
                os.unlink(pt.path("big"))
        assert n > 400, f"only {n} reads in 2 s"
        assert passthrough(pt)["flat"]["built"] == 0, "the build went on beside a busy reader"
    finally:
        os.close(fd)
    wait_until(lambda: "not made: stopped: the file was deleted or changed" in pt.log_tail(), 60,
               what="the build of the deleted file to stop")
    assert passthrough(pt)["flat"]["built"] == 0 and passthrough(pt)["flat"]["copies"] == 0


def test_copies_outlive_a_clean_unmount_and_are_dropped_after_a_crash(pt):
    """Copies are not synced as they are built: a clean unmount flushes them and leaves the
    marker that the next start trusts them by; after kill -9 the next start drops every copy
    (its pages may never have reached the disk) and the file reads right, rebuilt on demand."""
    data = os.urandom(8 * MiB + 4321)
    write_file(pt.path("w.bin"), data)
    flat_copy_of(pt, pt.path("w.bin"), 0)
    pt.remount()
    assert (pt.data / "flat" / ".clean").exists() is False, "the marker goes at start"
    assert passthrough(pt)["flat"]["copies"] == 1
    assert read_file(pt.path("w.bin")) == data
    assert passthrough(pt)["flat"]["hits"] >= 1
    pt.kill9()
    assert not (pt.data / "flat" / ".clean").exists()
    pt.start()
    assert passthrough(pt)["flat"]["copies"] == 0
    assert [c for c in os.listdir(pt.data / "flat") if not c.startswith(".")] == []
    assert read_file(pt.path("w.bin")) == data
    flat_copy_of(pt, pt.path("w.bin"), 0)
    assert read_file(pt.path("w.bin")) == data


def test_passthrough_flags_are_checked(mount_factory, tmp_path):
    m = mount_factory(start=False)
    mp = tmp_path / "mp"
    mp.mkdir()
    r = run([m.bin, "mount", mp, "--data", tmp_path / "d", "--passthrough", "--flat-size", "lots"])
    assert r.returncode != 0 and "--flat-size lots: expected a size" in r.stderr, r.stderr
    r = run([m.bin, "mount", mp, "--data", tmp_path / "d", "--passthrough", "-o", "writeback_cache"])
    assert r.returncode != 0 and "do not go together" in r.stderr, r.stderr
    assert not os.path.ismount(mp)


def test_a_copy_in_use_is_never_evicted(mount_factory):
    m = mount_factory(extra_args=["--passthrough", "--flat-size", "4M"])
    if not passthrough(m)["offered"]:
        pytest.skip("this kernel does not offer FUSE passthrough")
    held = os.urandom(2 * MiB)
    write_file(m.path("held"), held)
    flat_copy_of(m, m.path("held"), 0)
    with open(m.path("held"), "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        key = [c for c in os.listdir(m.data / "flat") if not c.startswith(".")]
        for i in range(3):                      # each would need the held copy's room
            write_file(m.path(f"o{i}"), os.urandom(2 * MiB - i - 1))
            flat_copy_of(m, m.path(f"o{i}"), passthrough(m)["flat"]["built"])
            assert set(key) <= set(os.listdir(m.data / "flat")), "the copy an open file reads was evicted"
        assert mapped[:] == held and f.read() == held
        mapped.close()
    assert passthrough(m)["flat"]["bytes"] <= 4 * MiB


def test_a_corrupt_block_is_eio_and_never_copied(mount_factory):
    m = mount_factory(extra_args=["--passthrough"])
    a = os.urandom(6 * MiB + 100)
    write_file(m.path("a"), a)
    m.unmount()
    blocks = block_records(m.data)
    ids = manifest_block_ids(m.data, "a")
    flip_byte_in_record(blocks[ids[len(ids) // 2]])
    m.start()
    for _ in range(3):                            # opens that ask for a copy, and read
        got, err = _read_until_error(m.path("a"))
        assert err is not None and err.errno == errno.EIO, err
        assert got == a[:len(got)]
    wait_until(lambda: passthrough(m)["flat"]["failed"] >= 1, 30, interval=0.1, what="the copy's build to fail")
    assert [c for c in os.listdir(m.data / "flat") if not c.startswith(".tmp")] == []
    assert passthrough(m)["opens"] == 0


def test_passthrough_is_on_by_default_and_falls_back_with_a_reason(mount_factory):
    on = mount_factory(extra_args=[])
    p = passthrough(on)
    if not p["offered"]:
        assert not p["on"] and "kernel" in p.get("off", ""), p
        pytest.skip("this kernel does not offer FUSE passthrough")
    if "--no-passthrough" in on.mount_args():
        pytest.skip("MODELFS_TEST_PASSTHROUGH=0")
    assert p["on"] and p.get("off") is None, p
    assert "passthrough on" in on.log_tail()
    for args, options, why in ((["--no-passthrough"], [], "--no-passthrough"),
                               ([], ["writeback_cache"], "writeback_cache")):
        m = mount_factory(extra_args=args, options=options)
        p = passthrough(m)
        assert not p["on"] and why in p.get("off", ""), p
        data = os.urandom(MiB)
        write_file(m.path("f"), data)
        for _ in range(3):
            assert read_file(m.path("f")) == data
        p = passthrough(m)
        assert p["opens"] == 0 and p["flat"]["copies"] == 0, p
        # (The writeback cache keeps what was written in the page cache: no READ reaches the daemon.)
        assert p["daemonReads"] > 0 or options, p
        assert not (m.data / "flat").exists()
        r = run([m.bin, "status", m.mp])
        assert f"passthrough     off: " in r.stdout, r.stdout
