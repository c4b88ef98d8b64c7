"""Crash durability: SIGKILL the daemon mid-write and check what survives.

Contract: a file is committed when it is closed (or fsync'd).  After kill -9 +
remount every committed file is bit-exact; a file being overwritten at the time
of the crash holds either its previous committed version or a complete new
version -- never a torn mix or a prefix.
"""
from __future__ import annotations

import errno
import os
import random
import threading
import time

from mfs import MiB, assert_bytes_equal, read_file, sha256, wait_until, write_file

SEED = int(os.environ.get("MODELFS_SEED", "20240611"))


class Writer(threading.Thread):
    """Writes `data` to `path` (O_CREAT|O_TRUNC) in chunks, slowly enough to be killed mid-way."""

    def __init__(self, path, data, chunk=128 * 1024, pause=0.004):
        super().__init__(daemon=True)
        self.path, self.data, self.chunk, self.pause = path, data, chunk, pause
        self.written = 0
        self.closed_ok = False
        self.error: BaseException | None = None

    def run(self):
        fd = None
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            mv = memoryview(self.data)
            while self.written < len(self.data):
                n = os.write(fd, mv[self.written:self.written + self.chunk])
                self.written += n
                time.sleep(self.pause)
            os.close(fd)
            fd = None
            self.closed_ok = True
        except BaseException as e:  # noqa: BLE001 - expected once the daemon dies
            self.error = e
        finally:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass


def _describe(got: bytes, versions: dict[str, bytes]) -> str:
    for name, v in versions.items():
        if got == v:
            return name
    for name, v in versions.items():
        if len(got) < len(v) and v[:len(got)] == got:
            return f"PREFIX of {name} ({len(got)}/{len(v)} bytes)"
    return f"UNKNOWN content (len={len(got)}, sha256={sha256(got)[:16]})"


def test_kill9_mid_write_closed_and_fsynced_files_survive(mnt):
    rng = random.Random(SEED)
    closed: dict[str, bytes] = {}
    os.mkdir(mnt.path("closed"))
    sizes = [0, 1, 4095, 4096, 4097, 65539, 1 * MiB + 17, 5 * MiB, 17 * MiB + 5, 40 * MiB]
    for i, n in enumerate(sizes):
        name = f"closed/f{i:02d}-{n}"
        data = rng.randbytes(n)
        write_file(mnt.path(name), data)
        closed[name] = data
    # overwritten in place, then closed -> the new content is committed
    write_file(mnt.path("closed/rewritten"), rng.randbytes(3 * MiB))
    new = rng.randbytes(2 * MiB + 3)
    write_file(mnt.path("closed/rewritten"), new)
    closed["closed/rewritten"] = new
    # write-temp-then-rename (how frameworks save checkpoints)
    tmp_data = rng.randbytes(6 * MiB + 1)
    write_file(mnt.path("closed/ckpt.tmp"), tmp_data)
    os.replace(mnt.path("closed/ckpt.tmp"), mnt.path("closed/ckpt.pt"))
    closed["closed/ckpt.pt"] = tmp_data

    # fsync'd but never closed before the crash
    fsynced: dict[str, bytes] = {}
    open_fds = []
    for i, n in enumerate([10, 700000, 9 * MiB + 1]):
        name = f"fsynced-{i}"
        data = rng.randbytes(n)
        fd = os.open(mnt.path(name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        mv = memoryview(data)
        for off in range(0, n, 1 * MiB):
            os.write(fd, mv[off:off + 1 * MiB])
        os.fsync(fd)
        open_fds.append(fd)
        fsynced[name] = data
    # an existing committed file patched in place and fsync'd (not closed)
    base = rng.randbytes(4 * MiB)
    write_file(mnt.path("patched"), base)
    patch = rng.randbytes(100000)
    fd = os.open(mnt.path("patched"), os.O_RDWR)
    os.pwrite(fd, patch, 1 * MiB + 5)
    os.fsync(fd)
    open_fds.append(fd)
    exp = bytearray(base)
    exp[1 * MiB + 5:1 * MiB + 5 + len(patch)] = patch
    fsynced["patched"] = bytes(exp)

    # the victim: v1 committed, then being overwritten (O_TRUNC) with v2 when the daemon dies
    v1 = rng.randbytes(24 * MiB + 11)
    v2 = rng.randbytes(32 * MiB + 7)
    write_file(mnt.path("victim"), v1)
    fresh = rng.randbytes(16 * MiB)
    w_victim = Writer(mnt.path("victim"), v2)
    w_fresh = Writer(mnt.path("fresh"), fresh)
    w_victim.start()
    w_fresh.start()
    wait_until(lambda: w_victim.written >= len(v2) // 3 or w_victim.error, 120,
               what="victim writer progress")
    assert not w_victim.closed_ok, "writer finished before the kill; make it slower"
    mnt.kill9()
    w_victim.join(60)
    w_fresh.join(60)
    assert not w_victim.is_alive() and not w_fresh.is_alive(), "writer threads hung after the daemon died"
    for fd in open_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    if w_victim.error is not None:
        assert isinstance(w_victim.error, OSError) and w_victim.error.errno in (
            errno.ENOTCONN, errno.ECONNABORTED, errno.EIO, errno.ENODEV), w_victim.error

    mnt.start()
    for name, data in closed.items():
        assert_bytes_equal(read_file(mnt.path(name)), data, f"closed file {name} after kill -9")
    for name, data in fsynced.items():
        assert_bytes_equal(read_file(mnt.path(name)), data, f"fsync'd file {name} after kill -9")
    got = read_file(mnt.path("victim"))
    state = _describe(got, {"v1": v1, "v2": v2})
    assert state in ("v1", "v2"), f"victim after kill -9 is {state}: torn write"
    if os.path.exists(mnt.path("fresh")):
        got = read_file(mnt.path("fresh"))
        assert got in (b"", fresh), f"new file after kill -9 is {_describe(got, {'fresh': fresh})}"
    assert not os.path.exists(mnt.path("closed/ckpt.tmp"))
    # the filesystem is fully usable after recovery
    write_file(mnt.path("after"), b"after recovery")
    mnt.remount()
    assert read_file(mnt.path("after")) == b"after recovery"
    for name, data in closed.items():
        assert_bytes_equal(read_file(mnt.path(name)), data, f"closed file {name} after 2nd remount")


class Churner(threading.Thread):
    """Creates, renames and deletes small files, recording what was committed."""

    def __init__(self, root, seed):
        super().__init__(daemon=True)
        self.root, self.rng = root, random.Random(seed)
        self.committed: dict[str, bytes] = {}
        self.deleted: set[str] = set()
        self.in_flight: tuple[str, bytes] | None = None
        self.error = None
        self.ops = 0

    def run(self):
        i = 0
        try:
            while True:
                i += 1
                name = f"c{i:05d}"
                data = self.rng.randbytes(self.rng.choice([0, 10, 5000, 70000, 300000]))
                self.in_flight = (name, data)
                write_file(os.path.join(self.root, name + ".tmp"), data)
                os.rename(os.path.join(self.root, name + ".tmp"), os.path.join(self.root, name))
                self.committed[name] = data
                self.in_flight = None
                if i % 3 == 0:
                    victim = self.rng.choice(sorted(self.committed))
                    self.in_flight = (victim, None)
                    os.unlink(os.path.join(self.root, victim))
                    del self.committed[victim]
                    self.deleted.add(victim)
                    self.in_flight = None
                self.ops += 1
        except BaseException as e:  # noqa: BLE001
            self.error = e


def test_kill9_during_metadata_churn_recovers_consistently(mnt):
    for rnd_no in range(2):
        d = mnt.path(f"churn{rnd_no}")
        d.mkdir()
        c = Churner(str(d), SEED + rnd_no)
        c.start()
        wait_until(lambda: c.ops >= 150 or c.error, 120, what="churn progress")
        assert c.error is None, c.error
        mnt.kill9()
        c.join(60)
        assert not c.is_alive()
        mnt.start()
        names = set(os.listdir(d))
        committed = dict(c.committed)
        flight = c.in_flight
        missing = set(committed) - names
        if flight and flight[1] is None:  # an unlink was in flight
            missing.discard(flight[0])
        assert not missing, f"round {rnd_no}: committed files lost after kill -9: {sorted(missing)[:10]}"
        for name in committed:
            if name in names:
                assert_bytes_equal(read_file(d / name), committed[name], f"round {rnd_no}: {name}")
        extra = names - set(committed)
        allowed = set()
        if flight:
            allowed |= {flight[0], flight[0] + ".tmp"}
        unexpected = extra - allowed
        assert not unexpected, f"round {rnd_no}: unexpected entries after recovery: {sorted(unexpected)[:10]}"
        for name in extra:
            got = read_file(d / name)
            if flight and flight[1] is not None and name == flight[0]:
                assert got == flight[1], f"round {rnd_no}: renamed-in file {name} is torn"
            if name.endswith(".tmp"):
                assert got in (b"", flight[1]), (
                    f"round {rnd_no}: uncommitted temp file {name} holds a partial write "
                    f"({len(got)}/{len(flight[1])} bytes)")
