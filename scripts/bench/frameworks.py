"""Framework benchmark (issue #5; see frameworks.sh): torch.save/torch.load and safetensors at ~1 GiB,
on a plain local directory, a single modelfs node on the same disk, and a 2-node loopback cluster,
in one run. Save (until the call returned: close() committed), warm load (page cache hot; the
fastest of three: right after the cold load, and again once the mount's flat copy is in place),
cold load (caches dropped; modelfs remounted), and cold load from peers (R=1:
every block lives on the writer, the reader has never read the file). Every load is compared with what was saved.
Mounts, etcd members and nodes are the integration suite's (Tests/integration), stopped by PID."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "Tests" / "integration"))
from cluster import EtcdCluster, Node, make_secret  # noqa: E402
from mfs import MODELFS_BIN, Mount, wait_until  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

MiB = 1 << 20


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def state(mib: int, salt: int) -> dict[str, torch.Tensor]:
    """mib MiB of fp32 in 64 MiB tensors (plus a bf16 one); salt makes every run's bytes new, so
    modelfs cannot deduplicate one target's save against another's."""
    g = torch.Generator().manual_seed(1000 + salt)
    n = max(1, mib // 64)
    sd = {f"layer{i}.weight": torch.randn(16 * MiB, generator=g) for i in range(n)}
    sd["embed.bf16"] = torch.randn(4 * MiB, generator=g).to(torch.bfloat16)
    return sd


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def load_st(p) -> dict:
    """safetensors' load_file maps the file: copy the tensors out so that every byte is really read."""
    return {k: v.clone() for k, v in load_file(str(p)).items()}


def raw_read(p) -> int:
    buf = bytearray(MiB)
    n = 0
    with open(p, "rb", buffering=0) as f:
        while (k := f.readinto(buf)):
            n += k
    return n


def timed(fn):
    t = time.perf_counter()
    r = fn()
    return time.perf_counter() - t, r


def loader(p: Path, fmt: str):
    return (lambda: torch.load(p, weights_only=True)) if fmt == "torch" else (lambda: load_st(p))


def ckpt_path(d: Path, fmt: str) -> Path:
    return d / ("ckpt.pt" if fmt == "torch" else "ckpt.safetensors")


def bench_formats(d: Path, sd: dict, cold_prep, res: dict, label: str, settle=None, beside=None):
    """Save both formats into d; warm and cold loads; records seconds under label/...
    `settle` waits for what a mount does after a first load (its flat copy); then the warm
    loads are timed again, each beside one of `beside` (the local directory and its state dict,
    saved by an earlier call), alternately, so that both see the machine alike."""
    for fmt in ("torch", "safetensors"):
        p = ckpt_path(d, fmt)
        save = (lambda: torch.save(sd, p)) if fmt == "torch" else (lambda: save_file(sd, str(p)))
        load = loader(p, fmt)
        t, _ = timed(save)
        res[f"{label} {fmt} save"] = t
        cold_prep()
        t, got = timed(load)
        assert same(got, sd), f"{label} {fmt}: cold load differs"
        res[f"{label} {fmt} cold load"] = t
        del got
        # Warm loads take well under a second, and on this shared host one of them can take
        # 2-3x another (measured: the same torch.load of a local file 0.66-2.32 s in one
        # minute): the fastest of three, for every target alike.
        best = float("inf")
        for _ in range(3):
            t, got = timed(load)
            assert same(got, sd), f"{label} {fmt}: warm load differs"
            best = min(best, t)
            del got
        res[f"{label} {fmt} warm load"] = best
        if settle is None:
            continue
        settle()
        local_dir, local_sd = beside
        pairs = [(label, load, sd), ("local", loader(ckpt_path(local_dir, fmt), fmt), local_sd)]
        bests = {who: float("inf") for who, _, _ in pairs}
        for _ in range(5):
            for who, fn, want in pairs:
                t, got = timed(fn)
                assert same(got, want), f"{who} {fmt}: warm load differs"
                bests[who] = min(bests[who], t)
                del got
        for who, b in bests.items():
            res[f"{who} {fmt} warm load, settled"] = b


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=1024, help="checkpoint size (default 1024)")
    ap.add_argument("--rounds", type=int, default=2, help="rounds; the median of each figure is reported")
    ap.add_argument("--dir", default="/var/tmp/modelfs-bench")
    ap.add_argument("--out", default=str(REPO / "bench-results" / "frameworks.md"))
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="frameworks.", dir=args.dir))
    rounds: list[dict] = []
    single = etcd = None
    nodes: list[Node] = []
    try:
        for rnd in range(args.rounds):
            res: dict[str, float] = {}
            # local directory, same disk
            local = work / f"local{rnd}"
            local.mkdir()
            local_sd = state(args.mib, salt=10 * rnd + 1)
            bench_formats(local, local_sd, drop_caches, res, "local")
            drop_caches()
            res["local raw cold read"], _ = timed(lambda: raw_read(local / "ckpt.pt"))

            # single modelfs node
            (work / f"single{rnd}").mkdir()
            single = Mount(MODELFS_BIN, root=work / f"single{rnd}")
            single.start()
            sd = state(args.mib, salt=10 * rnd + 2)

            def remount_cold():
                single.remount()
                drop_caches()

            def flat_copy_built():
                # Passthrough on: the file's flat copy, built in the background after its
                # first open, is in place (the one file this fresh mount read).
                flat = single.status()["passthrough"]
                if flat.get("on"):
                    wait_until(lambda: single.status()["passthrough"]["flat"]["built"] >= 1, 120,
                               interval=0.1, what="the flat copy")
            bench_formats(single.mp, sd, remount_cold, res, "modelfs", settle=flat_copy_built, beside=(local, local_sd))
            single.destroy()
            single = None
            shutil.rmtree(local)
            del local_sd

            # 2-node cluster, R=1: the reader fetches every block from the writer
            etcd = EtcdCluster(3)
            secret = make_secret(work)
            nodes = [Node(etcd, f"bench{rnd}", f"n{i}", secret, replicas=1, ack=1, lease_ttl=10,
                          extra=["--cache-size", f"{4 * args.mib}M"], root=work / f"node{rnd}-{i}") for i in range(2)]
            for n in nodes:
                n.start()
            a, b = nodes
            wait_until(lambda: len([x for x in a.cluster_status()["nodes"] if x["up"]]) == 2, 30, what="2 nodes up")
            sd = state(args.mib, salt=10 * rnd + 3)
            for fmt in ("torch", "safetensors"):
                pa = a / ("ckpt.pt" if fmt == "torch" else "ckpt.safetensors")
                pb = b / pa.name
                t, _ = timed((lambda: torch.save(sd, pa)) if fmt == "torch" else (lambda: save_file(sd, str(pa))))
                res[f"cluster {fmt} save"] = t
                drop_caches()
                load = loader(pb, fmt)
                t, got = timed(load)
                assert same(got, sd), f"cluster {fmt}: load on B differs"
                res[f"cluster {fmt} cold load from peers"] = t
                del got
            # The same torch.load through an O_DIRECT descriptor (no page cache on B), of another new
            # file: how much of the cold load from peers is B's page cache being filled (fresh
            # memory on this VM; COMPATIBILITY.md) rather than the blocks crossing.
            torch.save(sd_direct := state(args.mib, salt=10 * rnd + 5), a / "direct.pt")
            drop_caches()

            def load_direct():
                with open(os.open(b / "direct.pt", os.O_RDONLY | os.O_DIRECT), "rb") as f:
                    return torch.load(f, weights_only=True)
            t, got = timed(load_direct)
            assert same(got, sd_direct), "cluster torch: O_DIRECT load on B differs"
            res["cluster torch cold load from peers, O_DIRECT"] = t
            del got, sd_direct
            # the filesystem alone: a plain sequential read (1 MiB reads) of another new file of the same size
            torch.save(state(args.mib, salt=10 * rnd + 4), a / "other.pt")
            drop_caches()
            res["cluster raw cold read from peers"], _ = timed(lambda: raw_read(b / "other.pt"))
            assert b.cluster_status()["cacheStats"]["peerFetches"] > 0
            for n in nodes:
                n.destroy()
            nodes = []
            etcd.stop()
            etcd = None
            rounds.append(res)
            print(f"round {rnd + 1}: " + json.dumps({k: round(v, 2) for k, v in res.items()}), flush=True)
    finally:
        for n in nodes:
            n.destroy()
        if single:
            single.destroy()
        if etcd:
            etcd.stop()
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    gib = args.mib / 1024
    rows = []
    for fmt in ("torch", "safetensors"):
        for what, mine, base, target in (
                ("save", f"modelfs {fmt} save", f"local {fmt} save", 1.3),
                ("warm load right after the cold load", f"modelfs {fmt} warm load", f"local {fmt} warm load", None),
                ("warm load, flat copy in place", f"modelfs {fmt} warm load, settled", f"local {fmt} warm load, settled", 1.05),
                ("cold load", f"modelfs {fmt} cold load", f"local {fmt} cold load", None),
                ("save on cluster node (R=1)", f"cluster {fmt} save", f"local {fmt} save", None),
                ("cold load from peers", f"cluster {fmt} cold load from peers", f"local {fmt} cold load", 2.0),
                *([("cold load from peers, read with O_DIRECT (no page cache)",
                    "cluster torch cold load from peers, O_DIRECT", "local torch cold load", None)]
                  if fmt == "torch" else [])):
            ratio = med[mine] / med[base]
            verdict = "" if target is None else (f"≤ {target}: " + ("met" if ratio <= target else "NOT met"))
            rows.append(f"| {fmt} | {what} | {med[base]:.2f} s | {med[mine]:.2f} s | {ratio:.2f}× | {verdict} |")
    rows.append(f"| (plain read, 1 MiB reads) | cold read from peers | {med['local raw cold read']:.2f} s | "
                f"{med['cluster raw cold read from peers']:.2f} s | "
                f"{med['cluster raw cold read from peers'] / med['local raw cold read']:.2f}× | |")
    table = ("| format | operation | local dir | modelfs | ratio | target |\n|---|---|---|---|---|---|\n"
             + "\n".join(rows))
    text = (f"# framework benchmark ({gib:g} GiB checkpoint, median of {args.rounds} rounds, "
            f"{time.strftime('%Y-%m-%d %H:%M')}, load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
            f"\n\n{table}\n")
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n```json\n" + json.dumps(rounds, indent=1) + "\n```\n")


if __name__ == "__main__":
    main()
