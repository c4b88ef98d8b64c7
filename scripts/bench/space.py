"""The space benchmark (see space.sh): data-dir usage on a 3-node cluster under a steady
in-place rewrite. Every etcd member and node is a real process, stopped by PID at the end."""
from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "Tests" / "integration"))
from cluster import EtcdCluster, Node, make_secret  # noqa: E402
from mfs import wait_until  # noqa: E402

MiB = 1 << 20


def rewrite_rounds(path: Path, size: int, rng: random.Random, stop: threading.Event) -> tuple[int, int]:
    """fsx-like: open r+, 8 writes of 512 B-64 KiB at random offsets, fsync, close; again until
    `stop`. Returns (rounds, bytes written)."""
    rounds = written = 0
    while not stop.is_set():
        with open(path, "r+b") as f:
            for _ in range(8):
                n = rng.randrange(512, 65536)
                f.seek(rng.randrange(0, size - n))
                f.write(rng.randbytes(n))
                written += n
            f.flush()
            os.fsync(f.fileno())
        rounds += 1
    return rounds, written


def h5py_rounds(path: Path, size: int, rng: random.Random, stop: threading.Event) -> tuple[int, int]:
    """h5py `r+`: a chunked float32 dataset (1 MiB chunks), each round rewrites 4 random rows of
    chunks and an attribute, then closes the file. Returns (rounds, bytes written)."""
    import h5py
    import numpy as np
    rows = size // MiB
    rounds = written = 0
    while not stop.is_set():
        with h5py.File(path, "r+") as f:
            d = f["w"]
            for _ in range(4):
                r = rng.randrange(rows)
                d[r] = np.frombuffer(rng.randbytes(MiB), dtype=np.float32)
                written += MiB
            d.attrs["step"] = rounds
        rounds += 1
    return rounds, written


def make_file(path: Path, workload: str, size: int, rng: random.Random):
    if workload == "h5py":
        import h5py
        import numpy as np
        rows = size // MiB
        with h5py.File(path, "w") as f:
            f.create_dataset("w", data=np.frombuffer(rng.randbytes(size), dtype=np.float32).reshape(rows, MiB // 4),
                             chunks=(1, MiB // 4))
    else:
        path.write_bytes(rng.randbytes(size))


def run_case(etcd: EtcdCluster, root: Path, workload: str, delay: int, size: int, seconds: float, settle: float) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    secret = make_secret(root)
    name = "s" + uuid.uuid4().hex[:8]
    nodes = [Node(etcd, name, f"{name}-n{i}", secret, replicas=3, ack=1,
                  extra=["--gc-delay", "900", "--gc-superseded-delay", str(delay)], root=root / f"n{i}") for i in range(3)]
    try:
        for n in nodes:
            n.start()
        wait_until(lambda: all(len(x.cluster_status()["nodes"]) == 3 for x in nodes), 30, interval=0.1, what="3 nodes")
        a = nodes[0]
        rng = random.Random(28)
        path = a / f"model.{workload}"
        make_file(path, workload, size, rng)
        assert a.sync(timeout=300).returncode == 0
        live = path.stat().st_size
        base = [n.pack_bytes() for n in nodes]
        peak = [0] * 3
        stop = threading.Event()
        out: dict = {}

        def work():
            out["rounds"], out["written"] = (h5py_rounds if workload == "h5py" else rewrite_rounds)(path, size, rng, stop)

        t = threading.Thread(target=work)
        t0 = time.monotonic()
        t.start()
        while time.monotonic() - t0 < seconds:
            for i, n in enumerate(nodes):
                peak[i] = max(peak[i], n.pack_bytes() - base[i])
            time.sleep(0.5)
        stop.set()
        t.join()
        assert a.sync(timeout=300).returncode == 0
        at_stop = [n.pack_bytes() - base[i] for i, n in enumerate(nodes)]
        t1 = time.monotonic()
        back = None
        while time.monotonic() - t1 < settle:
            now = [n.pack_bytes() - base[i] for i, n in enumerate(nodes)]
            peak = [max(p, x) for p, x in zip(peak, now)]
            if back is None and max(now) <= max(4 * MiB, live // 10):
                back = time.monotonic() - t1
            time.sleep(0.5)
        final = [n.pack_bytes() - base[i] for i, n in enumerate(nodes)]
        removed = sum((n.status().get("gc") or {}).get("removedBytes", 0) for n in nodes)
        return {"workload": workload, "delay": delay, "live": live, "rounds": out["rounds"], "written": out["written"],
                "seconds": seconds, "peak": max(peak), "at_stop": max(at_stop), "final": max(final), "back": back,
                "removed": removed}
    finally:
        for n in nodes:
            n.destroy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--settle", type=float, default=40, help="seconds watched after the workload stops")
    ap.add_argument("--workloads", default="rewrite,h5py")
    ap.add_argument("--out", default=str(REPO / "bench-results" / "space.md"))
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="modelfs-space-bench-"))
    etcd = EtcdCluster(3)
    rows = []
    try:
        for workload in args.workloads.split(","):
            for delay in (900, 10):
                r = run_case(etcd, root / f"{workload}-{delay}", workload, delay, args.size_mib * MiB, args.seconds, args.settle)
                rows.append(r)
                print(r, flush=True)
    finally:
        etcd.stop()
        shutil.rmtree(root, ignore_errors=True)
    m = lambda b: f"{b / MiB:,.0f}"
    lines = [f"# Space under in-place rewrites, 3 nodes, R=3, K=1, --gc-delay 900 ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"Workload {args.seconds:.0f} s, then watched {args.settle:.0f} s. Growth of the largest node's packs "
             "(replicas + cache) over the file's own copy, MiB.", "",
             "| workload | --gc-superseded-delay | file MiB | rounds | written MiB | peak growth | at stop | final | back within | removed MiB (3 nodes) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        back = f"{r['back']:.1f} s" if r["back"] is not None else f"> {args.settle:.0f} s"
        lines.append(f"| {r['workload']} | {r['delay']} s | {m(r['live'])} | {r['rounds']} | {m(r['written'])} | {m(r['peak'])} "
                     f"({r['peak'] / r['live']:.1f}× the file) | {m(r['at_stop'])} | {m(r['final'])} | {back} | {m(r['removed'])} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
