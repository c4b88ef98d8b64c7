"""What every cluster benchmark measures the same way (cluster.py on loopback, labbench.py, scale.py
and fleet.py in the network lab): timed file I/O, CPU idle over a phase, a daemon's RSS."""
from __future__ import annotations

import os
import time
from pathlib import Path

MiB = 1 << 20


class Cpu:
    """Idle share (idle and iowait) of this machine's CPUs while the with-block runs (from /proc/stat)."""
    @staticmethod
    def sample():
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(f), f[3] + f[4]

    def __enter__(self):
        self.t0, self.i0 = self.sample()
        return self

    def __exit__(self, *exc):
        t1, i1 = self.sample()
        self.idle = (i1 - self.i0) / max(1, t1 - self.t0)


def rss_mib(pid: int) -> float:
    """A process's resident memory, MiB (VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def write_timed(src: Path, dst: Path, salt: int = 0) -> float:
    """Copies src to dst in 1 MiB writes; seconds until close() returned. A non-zero `salt` is
    stamped every 64 KiB (smaller than any chunk), so no block of the copy exists already:
    each phase moves all its bytes instead of deduplicating against the one before."""
    buf = bytearray(MiB)
    t = time.perf_counter()
    with open(src, "rb", buffering=0) as i, open(dst, "wb", buffering=0) as o:
        block = 0
        while True:
            n = i.readinto(buf)
            if not n:
                break
            if salt:
                for off in range(0, n - 15, 65536):
                    buf[off:off + 16] = salt.to_bytes(8, "little") + block.to_bytes(8, "little")
                    block += 1
            o.write(memoryview(buf)[:n])
    return time.perf_counter() - t


def read_timed(path: Path) -> float:
    buf = bytearray(MiB)
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t
