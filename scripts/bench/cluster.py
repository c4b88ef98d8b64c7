"""The cluster benchmark (see cluster.sh). Reuses the integration suite's process helpers:
every etcd member and node is a real process, stopped by PID at the end."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "Tests" / "integration"))
from cluster import EtcdCluster, Node, make_secret  # noqa: E402
from mfs import MODELFS_BIN, Mount, run, wait_until  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import moosefs  # noqa: E402
from benchio import drop_caches, read_timed, write_timed  # noqa: E402

MiB = 1 << 20


def durable_copies_timed(src: Path, dst_dir: Path, copies: int = 3) -> float:
    """Seconds to write `copies` copies of src into dst_dir and fsync each: what three nodes
    sharing this machine's one disk must at least spend to hold three durable copies."""
    t = time.perf_counter()
    for i in range(copies):
        dst = dst_dir / f"copy{i}"
        write_timed(src, dst, salt=10 + i)
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    took = time.perf_counter() - t
    for i in range(copies):
        (dst_dir / f"copy{i}").unlink()
    return took


def peak_rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--dir", default="/var/tmp/modelfs-bench")
    ap.add_argument("--out", default=str(REPO / "bench-results" / "cluster.md"))
    ap.add_argument("--no-moosefs", action="store_true", help="skip the MooseFS goal-3 comparison")
    args = ap.parse_args()
    size = args.size_mib * MiB
    os.makedirs(args.dir, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cluster.", dir=args.dir))
    src = Path("/dev/shm") / f"modelfs-bench-{os.getpid()}.bin"
    results: dict[str, float] = {}
    etcd = None
    nodes: list[Node] = []
    single = None
    mfs = None
    try:
        with open("/dev/urandom", "rb") as r, open(src, "wb") as w:
            for _ in range(args.size_mib):
                w.write(r.read(MiB))

        # Baselines: the plain directory, and a single modelfs node (same disk).
        plain = work / "plain"
        plain.mkdir()
        results["plain write s"] = write_timed(src, plain / "f", salt=5)
        results["3 durable plain copies s"] = durable_copies_timed(src, plain)
        (work / "single").mkdir()
        single = Mount(MODELFS_BIN, root=work / "single")
        single.start()
        results["single write s"] = write_timed(src, single / "f", salt=4)
        drop_caches()
        results["single cold read s"] = read_timed(single / "f")

        # The cluster: 3 nodes, R=3.
        etcd = EtcdCluster(3)
        secret = make_secret(work)
        for i in range(3):
            nodes.append(Node(etcd, "bench", f"node{i}", secret, replicas=3, ack=1, lease_ttl=10,
                              extra=["--cache-size", "1G", "--ack-timeout", "600"], root=work / f"node{i}"))
        for n in nodes:
            n.start()
        a, b, _ = nodes
        wait_until(lambda: len([x for x in a.cluster_status()["nodes"] if x["up"]]) == 3, 30, what="3 nodes up")
        for d, r, k in (("k1", 3, 1), ("k3", 3, 3), ("r1", 1, 1)):
            os.mkdir(a / d)
            p = run([MODELFS_BIN, "policy", "set", a / d, "--replicas", r, "--ack", k])
            assert p.returncode == 0, p.stderr

        results["K=1 write s"] = write_timed(src, a / "k1" / "f", salt=1)
        t = time.perf_counter()
        s = a.sync(a / "k1", timeout=1200)
        assert s.returncode == 0, s.stderr
        results["close to 3 copies s"] = time.perf_counter() - t
        results["K=3 write s"] = write_timed(src, a / "k3" / "f", salt=2)
        assert a.sync(a / "k3", timeout=1200).returncode == 0
        results["R=1 write s"] = write_timed(src, a / "r1" / "f", salt=3)
        drop_caches()
        results["remote cold read s"] = read_timed(b / "r1" / "f")
        assert b.cluster_status()["cacheStats"]["peerFetches"] > 0
        for i, n in enumerate(nodes):
            results[f"node{i} peak RSS MiB"] = peak_rss_mib(n.pid)
        results["single peak RSS MiB"] = peak_rss_mib(single.pid)
        for n in nodes:
            n.destroy()
        nodes = []

        # MooseFS with goal 3, same bytes, same disk (its own network namespace).
        if not args.no_moosefs and moosefs.available():
            try:
                mfs = moosefs.MooseFS(work / "moosefs")
                (mfs.mnt / "g3").mkdir()
                mfs.set_goal(mfs.mnt / "g3", 3)
                results["MooseFS goal 3 write s"] = write_timed(src, mfs.mnt / "g3" / "f", salt=6)
            except Exception as e:  # noqa: BLE001 - the comparison is optional; say why it is missing
                print(f"MooseFS comparison skipped: {e}", file=sys.stderr)
    except BaseException:
        # Keep the daemons' logs of a failed run.
        keep = Path(args.out).parent / "cluster-logs"
        keep.mkdir(parents=True, exist_ok=True)
        for n in nodes:
            shutil.copy(n.log_path, keep / f"{n.node_id}.log")
        print(f"logs kept in {keep}", file=sys.stderr)
        raise
    finally:
        if mfs:
            mfs.stop()
        for n in nodes:
            n.destroy()
        if single:
            single.destroy()
        if etcd:
            etcd.stop()
        src.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)

    mb = size / 1e6
    rate = lambda k: mb / results[k]  # noqa: E731
    rows = [
        ("plain directory write", f"{rate('plain write s'):.0f} MB/s", ""),
        ("single-node write", f"{rate('single write s'):.0f} MB/s", "baseline"),
        ("single-node cold read", f"{rate('single cold read s'):.0f} MB/s", "baseline"),
        ("cluster write, R=3 K=1", f"{rate('K=1 write s'):.0f} MB/s",
         f"{results['single write s'] / results['K=1 write s']:.2f}× single-node write (target ≥ 0.9)"),
        ("close() → 3 verified copies", f"{results['close to 3 copies s']:.1f} s",
         f"{(results['K=1 write s'] + results['close to 3 copies s']) / results['single write s']:.2f}× one local write (target ≤ 2.5)"),
        ("floor here: 3 fsynced copies in a plain directory", f"{results['3 durable plain copies s']:.1f} s",
         f"{results['3 durable plain copies s'] / results['single write s']:.2f}× one local write "
         "(every node of this bench shares one disk)"),
        ("cluster write, R=3 K=3", f"{rate('K=3 write s'):.0f} MB/s",
         f"{results['single write s'] / results['K=3 write s']:.2f}× single-node write"),
        ("cold read on B, all blocks remote", f"{rate('remote cold read s'):.0f} MB/s",
         f"{results['single cold read s'] / results['remote cold read s']:.2f}× single-node cold read (target ≥ 0.6)"),
    ]
    if "MooseFS goal 3 write s" in results:
        rows.append(("MooseFS goal 3 write", f"{rate('MooseFS goal 3 write s'):.0f} MB/s",
                     f"modelfs K=3 is {results['MooseFS goal 3 write s'] / results['K=3 write s']:.2f}× it (target ≥ 2)"))
    rows += [(f"{k}", f"{v:.0f} MiB", "target ≤ 200") for k, v in results.items() if k.endswith("RSS MiB")]
    table = "| measurement | value | ratio |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    text = f"# cluster benchmark ({args.size_mib} MiB, {time.strftime('%Y-%m-%d %H:%M')})\n\n{table}\n"
    print(text)
    Path(args.out).write_text(text + "\n```json\n" + json.dumps(results, indent=1) + "\n```\n")


if __name__ == "__main__":
    main()
