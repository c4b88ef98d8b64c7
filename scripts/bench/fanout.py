"""Fan-out in the network lab (issue #30; `scripts/bench/fanout.sh`). Two phases (`--only`):

fanout: one file on R holders, then N loader hosts load it at once, every link shaped to RATE.

- the link: one TCP stream between two hosts;
- one loader alone: a cold load of a file of the same size (its own file, so no cache helps);
- N loaders at once: when the first and the last finished, the last against one alone (the
  target: at most 1.5x; loading from the holders alone could do no better than N/R x);
- what the holders sent from their replicas, against the file's size (target: at most 2x), and
  what the loaders passed on to each other;
- every load checked bit-exact (SHA-256) after the timing;
- CPU idle through the N-loader phase (this machine's two vCPUs run every host: under 30 % idle,
  the figure is marked CPU-bound).

prefetch: a cold `safe_open(...)` + every tensor (`get_tensor`, keys in their order, numpy) of a
safetensors file on 2 holders, on a host with format-aware prefetch and on one without
(`--no-format-prefetch`), each its own file (no block in common), alternating which goes first,
`--rounds` times; the medians and their ratio (target >= 1.3). The file is written by
safetensors itself from tensors that alternate float32 and float16, so its layout (grouped by
dtype) and the loader's order (by name) differ, as in models that mix dtypes.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "Tests" / "integration"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab import PEER_PORT, Lab  # noqa: E402

from benchio import Cpu, drop_caches, read_timed, write_timed  # noqa: E402
from labbench import link_rate, make_source  # noqa: E402

MiB = 1 << 20


def metric(host, secret: str, name: str) -> float:
    req = urllib.request.Request(f"http://{host.address}:{PEER_PORT}/metrics", headers={"Authorization": f"Bearer {secret}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        body = r.read()
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--link", default="250mbit")
    ap.add_argument("--holders", type=int, default=3)
    ap.add_argument("--loaders", type=int, default=8)
    ap.add_argument("--out", default=None)
    ap.add_argument("--only", default="fanout,prefetch")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data", choices=["tmpfs", "disk"], default="tmpfs",
                    help="where the hosts keep their data: /dev/shm, or this machine's disk (/tmp)")
    a = ap.parse_args()
    text = ""
    if "fanout" in a.only.split(","):
        text += fanout(a)
    if "prefetch" in a.only.split(","):
        text += prefetch(a)
    print(text)
    if a.out:
        Path(a.out).write_text(text)


def table(title: str, res: dict, cpu_idle: float | None = None) -> str:
    lines = [title, "", "| figure | value |", "|---|---|"]
    for k, v in res.items():
        cpu_bound = " (CPU-bound: idle under 30 %)" if cpu_idle is not None and cpu_idle < 30 and "at once" in k else ""
        lines.append(f"| {k} | {v:.2f}{cpu_bound} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(lines) + "\n\n"


LOAD = r"""
import sys, time
from safetensors import safe_open
t = time.perf_counter()
with safe_open(sys.argv[1], "np") as f:
    for k in f.keys():
        f.get_tensor(k)
print(time.perf_counter() - t)
"""


def make_safetensors(path: Path, size: int, seed: int):
    """About `size` bytes of 1 MiB tensors alternating float32 and float16, saved by safetensors."""
    import numpy as np
    from safetensors.numpy import save_file
    rng = np.random.default_rng(seed)
    tensors = {}
    for i in range(size // MiB):
        dtype = np.float32 if i % 2 == 0 else np.float16
        tensors[f"model.layers.{i:04d}.weight"] = rng.integers(0, 255, MiB, dtype=np.uint8).view(dtype)
    save_file(tensors, str(path))


def prefetch(a) -> str:
    size = a.size_mib * MiB
    # Two files a round on both holders, one a round on each loader, the source.
    where = data_parent(a, size * (6 * a.rounds + 1))
    work = Path(tempfile.mkdtemp(prefix="modelfs-prefetchbench-", dir=where))
    args = ["--replicas", "2", "--ack", "2", "--lease-ttl", "5", "--heal-interval", "3600", "--heal-full-every", "3600",
            "--cache-size", f"{4 * a.size_mib * a.rounds + 1024}M", "--scrub-rate", "0", "--gc-delay", "3600", "--heal-rate-busy", "0"]
    lab = Lab(root=tempfile.mkdtemp(prefix="modelfs-lab-", dir=where), prefix="mfsp", net="10.82")
    res: dict = {"size MiB": a.size_mib, "link": a.link, "rounds": a.rounds}
    times: dict[str, list[float]] = {"with": [], "without": []}
    try:
        lab.up(4, link=a.link, host_args=args, start_hosts=False)
        for i in (1, 2):
            lab.start_host(i)
        lab.wait_all_up()
        h = lab.hosts
        res["link MB/s (one TCP stream)"] = link_rate(lab, 256 * MiB) / 1e6
        for r in range(a.rounds):
            for which in ("with", "without"):
                src = work / "src.safetensors"
                make_safetensors(src, size, seed=2 * r + (which == "with"))
                shutil.copyfile(src, h[1] / f"{which}-{r}.safetensors")
                src.unlink()
        assert h[1].sync(timeout=1800).returncode == 0
        lab.start_host(3)
        lab.start_host(4, extra=["--no-format-prefetch"])
        lab.wait_all_up()
        host = {"with": h[3], "without": h[4]}
        for r in range(a.rounds):
            for which in (("with", "without") if r % 2 == 0 else ("without", "with")):
                drop_caches()
                out = subprocess.run([sys.executable, "-c", LOAD, str(host[which] / f"{which}-{r}.safetensors")],
                                     capture_output=True, text=True, timeout=3600)
                assert out.returncode == 0, out.stderr
                times[which].append(float(out.stdout.strip().splitlines()[-1]))
        mid = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        res["cold load with prefetch: s (median)"] = mid["with"]
        res["cold load without: s (median)"] = mid["without"]
        res["without / with (target >= 1.3)"] = mid["without"] / mid["with"]
        res["every round, with / without: s"] = ", ".join(f"{w:.1f}/{o:.1f}" for w, o in zip(times["with"], times["without"]))
        totals = h[3].cluster_status()["fanout"]["totals"]
        res["prefetched MB / hits / misses (with)"] = f"{totals['prefetched'] / 1e6:.0f} / {totals['prefetchHits']} / {totals['prefetchMisses']}"
    finally:
        lab.down()
        shutil.rmtree(lab.root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return table(f"# Format-aware prefetch in the lab: safetensors, {a.size_mib} MiB, links {a.link}", res)


def data_parent(a, need: int) -> str | None:
    """Where the lab's hosts keep their data; on tmpfs, refuses a run that would not fit."""
    if a.data == "disk":
        return None   # tempfile's default: /tmp, on the disk
    free = shutil.disk_usage("/dev/shm").free
    if need > free * 0.9:
        sys.exit(f"fanout.py: the hosts would keep about {need / 2**30:.0f} GiB in /dev/shm, which has "
                 f"{free / 2**30:.0f} GiB free; pass --data disk or a smaller --size-mib")
    return "/dev/shm"


def fanout(a) -> str:
    size = a.size_mib * MiB
    # The source, two files on every holder, the first loader's two, every other loader's one.
    where = data_parent(a, size * (1 + 2 * a.holders + 2 + (a.loaders - 1)))
    work = Path(tempfile.mkdtemp(prefix="modelfs-fanoutbench-", dir=where))
    try:
        return fanout_in(a, size, work, where)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fanout_in(a, size: int, work: Path, where: str | None) -> str:
    src = work / "src"
    make_source(src, size)
    hosts = a.holders + a.loaders
    args = ["--replicas", str(a.holders), "--ack", str(a.holders), "--lease-ttl", "5", "--heal-interval", "3600",
            "--heal-full-every", "3600", "--cache-size", f"{2 * a.size_mib + 1024}M", "--scrub-rate", "0",
            "--gc-delay", "3600", "--heal-rate-busy", "0"]
    lab = Lab(root=tempfile.mkdtemp(prefix="modelfs-lab-", dir=where), prefix="mfsf", net="10.81")
    res: dict = {"size MiB": a.size_mib, "link": a.link, "holders (R)": a.holders, "loaders (N)": a.loaders}
    try:
        lab.up(hosts, link=a.link, host_args=args, start_hosts=False)
        for i in range(1, a.holders + 1):
            lab.start_host(i)
        lab.wait_all_up()
        secret = lab.secret.read_text().strip()
        h = lab.hosts
        res["link MB/s (one TCP stream)"] = link_rate(lab, 256 * MiB) / 1e6
        # Two files with no block in common: one for the loader alone, one for the N; written on
        # a holder, then on all R.
        for name, salt in (("alone", 1), ("shared", 2)):
            write_timed(src, h[1] / name, salt=salt)
            assert h[1].sync(h[1] / name, timeout=1800).returncode == 0
        want = sha256(h[1] / "shared")
        # The loaders join only now: no block is placed on them.
        for i in range(a.holders + 1, hosts + 1):
            lab.start_host(i)
        lab.wait_all_up()
        loaders = [h[i] for i in range(a.holders + 1, hosts + 1)]
        holders = [h[i] for i in range(1, a.holders + 1)]
        drop_caches()

        alone = read_timed(loaders[0] / "alone")
        res["one loader alone: s"] = alone
        res["one loader alone: MB/s"] = size / alone / 1e6

        before = sum(metric(x, secret, "modelfs_peer_served_replica_bytes_total") for x in holders)
        drop_caches()
        times: dict[str, float] = {}
        errors: list[str] = []
        go = threading.Barrier(len(loaders) + 1)

        def load(host):
            go.wait()
            try:
                times[host.node_id] = read_timed(host / "shared")
            except Exception as e:  # noqa: BLE001
                errors.append(f"{host.node_id}: {e!r}")
        threads = [threading.Thread(target=load, args=(x,)) for x in loaders]
        for t in threads:
            t.start()
        with Cpu() as cpu:
            go.wait()
            for t in threads:
                t.join()
        assert not errors, errors
        sent = sum(metric(x, secret, "modelfs_peer_served_replica_bytes_total") for x in holders) - before
        relayed = sum(x.cluster_status()["fanout"]["totals"]["fromLoaders"] for x in loaders)
        res[f"{a.loaders} at once: first done, s"] = min(times.values())
        res[f"{a.loaders} at once: last done, s"] = max(times.values())
        res[f"{a.loaders} at once: last / one alone (target <= 1.5; holders alone >= {a.loaders / a.holders:.1f})"] = max(times.values()) / alone
        res["holders sent / file size (target <= 2)"] = sent / size
        res["loaders passed on to each other / file size"] = relayed / size
        res["CPU idle % (N at once)"] = round(cpu.idle * 100, 1)
        bad = [x.node_id for x in loaders if sha256(x / "shared") != want]
        res["loads bit-exact"] = "all" if not bad else f"NOT on {bad}"
    finally:
        lab.down()
        shutil.rmtree(lab.root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return table(f"# Fan-out in the lab: {a.loaders} loaders, {a.holders} holders, links {a.link}, {a.size_mib} MiB", res,
                 res.get("CPU idle % (N at once)"))


if __name__ == "__main__":
    main()
