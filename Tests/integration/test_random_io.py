"""Seeded random I/O on a few files, each checked against an in-memory shadow.

Reproduce a failure with MODELFS_SEED=<seed printed in the failure message>.
MODELFS_RANDOM_OPS overrides the number of operations (default 20000).
"""
from __future__ import annotations

import mmap
import os
import random
from collections import deque

import pytest

from mfs import MiB, assert_bytes_equal, read_file

SEED = int(os.environ.get("MODELFS_SEED", str(random.SystemRandom().randrange(1 << 31))))
N_OPS = int(os.environ.get("MODELFS_RANDOM_OPS", "20000"))
N_FILES = 3
MAX_SIZE = 6 * MiB


class Model:
    def __init__(self, mnt, rng):
        self.mnt, self.rng = mnt, rng
        self.paths = [mnt.path(f"rand-{i}.bin") for i in range(N_FILES)]
        self.shadow = [bytearray() for _ in range(N_FILES)]
        self.fds = [os.open(p, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644) for p in self.paths]
        self.history: deque[str] = deque(maxlen=25)
        self.counts: dict[str, int] = {}

    def _len(self) -> int:
        r = self.rng.random()
        if r < 0.45:
            return self.rng.randrange(1, 513)
        if r < 0.9:
            return self.rng.randrange(1, 16 * 1024)
        return self.rng.randrange(1, 256 * 1024)

    def _offset(self, size: int, slack: int) -> int:
        r = self.rng.random()
        if r < 0.15:
            return size  # append at EOF
        if r < 0.25:
            return self.rng.randrange(0, max(1, size // 4096 + 1)) * 4096  # page aligned
        return self.rng.randrange(0, min(size + slack, MAX_SIZE) + 1)

    def step(self, i: int):
        k = self.rng.randrange(N_FILES)
        fd, sh = self.fds[k], self.shadow[k]
        size = len(sh)
        r = self.rng.random()
        if r < 0.40:
            off = min(self._offset(size, 64 * 1024), MAX_SIZE - 1)
            n = max(1, min(self._len(), MAX_SIZE - off))
            data = self.rng.randbytes(n)
            self.note(f"pwrite f{k} off={off} n={n}")
            assert os.pwrite(fd, data, off) == n
            if off + n > len(sh):
                sh.extend(bytes(off + n - len(sh)))
            sh[off:off + n] = data
        elif r < 0.75:
            off = self._offset(size, 4096)
            n = self._len()
            self.note(f"pread f{k} off={off} n={n} (size={size})")
            got = os.pread(fd, n, off)
            assert_bytes_equal(got, bytes(sh[off:off + n]), f"pread f{k} off={off} n={n}")
        elif r < 0.79:
            new = self.rng.choice([0, self.rng.randrange(0, size + 1), self.rng.randrange(0, MAX_SIZE + 1),
                                   size + self.rng.randrange(1, 100000)])
            new = min(new, MAX_SIZE)
            self.note(f"ftruncate f{k} {size} -> {new}")
            os.ftruncate(fd, new)
            if new < len(sh):
                del sh[new:]
            else:
                sh.extend(bytes(new - len(sh)))
        elif r < 0.84:
            if size == 0:
                return
            off = self.rng.randrange(0, size)
            n = min(self._len(), size - off)
            data = self.rng.randbytes(n)
            sync = self.rng.random() < 0.3
            self.note(f"mmap-write f{k} off={off} n={n} msync={sync}")
            m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            try:
                m[off:off + n] = data
                if sync:
                    m.flush()
            finally:
                m.close()
            sh[off:off + n] = data
        elif r < 0.89:
            if size == 0:
                return
            off = self.rng.randrange(0, size)
            n = min(self._len(), size - off)
            self.note(f"mmap-read f{k} off={off} n={n}")
            m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
            try:
                got = m[off:off + n]
            finally:
                m.close()
            assert_bytes_equal(got, bytes(sh[off:off + n]), f"mmap-read f{k} off={off} n={n}")
        elif r < 0.94:
            self.note(f"fstat f{k}")
            assert os.fstat(fd).st_size == len(sh), f"fstat size {os.fstat(fd).st_size} != {len(sh)}"
        elif r < 0.96:
            self.note(f"fsync f{k}")
            os.fsync(fd)
        else:
            full = self.rng.random() < 0.3
            self.note(f"close/reopen f{k} verify={full}")
            os.close(fd)
            self.fds[k] = fd = os.open(self.paths[k], os.O_RDWR)
            assert os.stat(self.paths[k]).st_size == len(sh)
            if full:
                assert_bytes_equal(read_file(self.paths[k]), bytes(sh), f"full verify f{k}")

    def note(self, s: str):
        self.history.append(s)
        op = s.split(" ", 1)[0]
        self.counts[op] = self.counts.get(op, 0) + 1

    def close_all(self):
        for fd in self.fds:
            os.close(fd)
        self.fds = []

    def verify_all(self, when: str):
        for k, p in enumerate(self.paths):
            assert_bytes_equal(read_file(p), bytes(self.shadow[k]), f"{when}: f{k}")


@pytest.mark.parametrize("options", [[], ["writeback_cache"]], ids=["default", "writeback_cache"])
def test_random_io_against_shadow(mount_factory, options):
    mnt = mount_factory(options=options)
    rng = random.Random(SEED)
    model = Model(mnt, rng)
    i = -1
    try:
        for i in range(N_OPS):
            model.step(i)
        model.close_all()
        model.verify_all("after all ops")
        mnt.remount()
        model.verify_all("after remount")
    except BaseException as e:
        hist = "\n  ".join(model.history)
        raise AssertionError(
            f"random I/O failed at op {i}/{N_OPS} with MODELFS_SEED={SEED}: {type(e).__name__}: {e}\n"
            f"last ops:\n  {hist}") from e
    finally:
        for fd in model.fds:
            try:
                os.close(fd)
            except OSError:
                pass
    print(f"seed={SEED} ops={N_OPS} counts={model.counts}")
