"""The cluster benchmark in the network lab (issue #26; `scripts/bench/cluster.sh --lab`): hosts in
network namespaces, every link shaped to RATE, so the link is the bottleneck and the figures are
fractions of it, measured in the same run (a plain TCP stream between two hosts). CPU idle is
sampled through every phase: a figure taken while this machine's CPUs were the bottleneck (idle
under 30 %) is marked.

Phases: the link rate; a single-node write on this machine (the baseline of a K=1 close); R=3
K=1 (close, then every block at 3 verified copies), chain replication and, for the A/B, fan-out
(`--replication fanout`); R=3 K=3; a cold read on one host of a file whose blocks are all on
another; healing after a host is lost while a foreground reader runs; MooseFS with goal 3 in the
same lab (chunkservers on three hosts, the client on a fourth) as the anchor.

Where the hosts keep their data (`--data`): on tmpfs (the default), or on this machine's one
disk. Real hosts each have a disk of their own; here every host's data dir (and MooseFS's
chunkservers') would share one virtual disk, and three copies at 1 Gbit/s ask it for about
3 × 119 MB/s of writes plus the writer's reads: the disk's own ceiling (measured in the run with
parallel direct writes) is then the bottleneck, not the link. Each phase gets a fresh lab, so no
phase's data (or memory, on tmpfs) is left for the next.
"""
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
sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab import Lab, rate_bits  # noqa: E402
from mfs import MODELFS_BIN, Mount, run, wait_until  # noqa: E402

import moosefs  # noqa: E402
from benchio import Cpu, drop_caches, read_timed, write_timed  # noqa: E402

MiB = 1 << 20


def make_source(path: Path, size: int):
    """Random bytes (no block repeats another), in tmpfs so reading them costs nothing."""
    with open(path, "wb") as f:
        for _ in range(size // (64 * MiB)):
            f.write(os.urandom(64 * MiB))


STREAM = r"""
import socket, sys, time
mode, host, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "serve":
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((host, 5201)); s.listen(1)
    print("ready", flush=True)
    c, _ = s.accept(); got = 0; buf = bytearray(1 << 20)
    t = time.perf_counter()
    while True:
        n = c.recv_into(buf)
        if not n: break
        got += n
    print(got / (time.perf_counter() - t), flush=True)
else:
    c = socket.create_connection((host, 5201)); b = bytes(1 << 20); sent = 0
    while sent < size:
        c.sendall(b); sent += len(b)
    c.close()
"""


def policy_dir(d: Path, replicas: int, ack: int) -> Path:
    d.mkdir()
    r = run([MODELFS_BIN, "policy", "set", d, "--replicas", str(replicas), "--ack", str(ack)])
    assert r.returncode == 0, r.stderr
    return d


def link_rate(lab, size: int) -> float:
    """Bytes/s of one TCP stream from host 2 to host 1 across the shaped links."""
    a, b = lab.host(1), lab.host(2)
    server = subprocess.Popen(["nsenter", f"--net=/run/netns/{a.ns}", sys.executable, "-c", STREAM, "serve", a.address, "0"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        subprocess.run(["nsenter", f"--net=/run/netns/{b.ns}", sys.executable, "-c", STREAM, "send", a.address, str(size)],
                       check=True, timeout=600)
        return float(server.stdout.readline())
    finally:
        server.wait(timeout=60)


def disk_ceiling(where: Path, writers: int = 3, mib: int = 1024) -> float:
    """Bytes/s that `writers` parallel 1 MiB O_DIRECT writers get from the disk under `where`
    (dd): the most the hosts' stores on this one disk can write together."""
    files = [where / f"ceiling-{i}" for i in range(writers)]
    t = time.perf_counter()
    procs = [subprocess.Popen(["dd", "if=/dev/zero", f"of={f}", "bs=1M", f"count={mib // writers}", "oflag=direct"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for f in files]
    for p in procs:
        assert p.wait() == 0, "dd failed"
    took = time.perf_counter() - t
    for f in files:
        f.unlink()
    return writers * (mib // writers) * MiB / took


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--link", default="1gbit")
    ap.add_argument("--hosts", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-moosefs", action="store_true")
    ap.add_argument("--heal-mib", type=int, default=2048)
    ap.add_argument("--heal-link", default="250mbit",
                    help="the links of the healing phases: at 1 Gbit/s four survivors' copies (4 × 119 MB/s, "
                         "each byte hashed by its receiver) are more than these 2 vCPUs can hash")
    ap.add_argument("--data", choices=["tmpfs", "disk"], default="tmpfs",
                    help="where every host (and the single node, and MooseFS) keeps its data")
    ap.add_argument("--only", default="write,read,heal,moosefs",
                    help="the phases to run, of write (single node, K=1, K=3), read, heal, moosefs")
    a = ap.parse_args()
    want = lambda phase: phase in a.only.split(",")   # noqa: E731
    size = a.size_mib * MiB
    link_nominal = rate_bits(a.link) / 8
    work = Path(tempfile.mkdtemp(prefix="modelfs-labbench-", dir="/dev/shm"))
    data_parent = "/dev/shm" if a.data == "tmpfs" else None   # None: tempfile's (/tmp, the disk)
    src = work / "src"
    make_source(src, size)
    res: dict = {"size MiB": a.size_mib, "link": a.link, "hosts": a.hosts, "data on": a.data}
    idle: dict = {}
    args = ["--replicas", "3", "--ack", "1", "--lease-ttl", "5", "--dead-after", "10", "--heal-interval", "2",
            "--heal-full-every", "5", "--cache-size", "4G", "--scrub-rate", "0", "--gc-delay", "3600",
            "--heal-rate-busy", "0"]
    labs: list = []

    def fresh_lab(extra: list[str] | None = None, link: str | None = None):
        """A new lab for the next phase, the one before taken down with its data."""
        while labs:
            old = labs.pop()
            old.down()
            shutil.rmtree(old.root, ignore_errors=True)
        lab = Lab(root=tempfile.mkdtemp(prefix="modelfs-lab-", dir=data_parent), prefix="mfsl", net="10.80")
        labs.append(lab)
        lab.up(a.hosts, link=link or a.link, host_args=args + (extra or []))
        return lab, lab.hosts

    single = None
    try:
        if a.data == "disk":
            res["disk ceiling MB/s (3 parallel direct writers)"] = disk_ceiling(Path(tempfile.gettempdir())) / 1e6
        if want("write"):
            # The single-node baseline: this machine's own write speed through modelfs.
            single = Mount(MODELFS_BIN, root=Path(tempfile.mkdtemp(prefix="modelfs-single-", dir=data_parent)))
            single.start()
            with Cpu() as c:
                t = write_timed(src, single.path("f"), salt=1)
            res["single-node write MB/s"] = size / t / 1e6
            idle["single-node write"] = c.idle
            single.destroy()
            single = None
            drop_caches()

        lab, h = fresh_lab()
        with Cpu() as c:
            link = link_rate(lab, 1024 * MiB)
        res["link MB/s (one TCP stream)"] = link / 1e6
        res["link nominal MB/s"] = link_nominal / 1e6
        idle["link"] = c.idle

        if want("write"):
            # The same host writing one copy (R=1): the cluster node's own write path (its metadata in
            # etcd, its FUSE settings) without replication, the baseline of what replication costs.
            d = policy_dir(h[1] / "r1", 1, 1)
            with Cpu() as cw:
                wt = write_timed(src, d / "f", salt=7)
            res["R=1 on a lab host: close MB/s"] = size / wt / 1e6
            idle["R=1 on a lab host: close"] = cw.idle
            lab, h = fresh_lab()

            for mode, salt in (("chain", 2), ("fanout", 3)):
                if mode == "fanout":   # the A/B: one PUT per target
                    lab, h = fresh_lab(["--replication", "fanout"])
                d = h[1] / f"k1-{mode}"
                d.mkdir()
                with Cpu() as c:
                    t0 = time.perf_counter()
                    with Cpu() as cw:
                        wt = write_timed(src, d / "f", salt=salt)
                    idle[f"K=1 {mode}: close"] = cw.idle
                    r = h[1].sync(d, timeout=1800)
                    total = time.perf_counter() - t0
                assert r.returncode == 0, r.stderr
                res[f"K=1 {mode}: close MB/s"] = size / wt / 1e6
                res[f"K=1 {mode}: close / single-node write"] = (size / wt / 1e6) / res["single-node write MB/s"]
                res[f"K=1 {mode}: close / R=1 on a lab host"] = (size / wt / 1e6) / res["R=1 on a lab host: close MB/s"]
                res[f"K=1 {mode}: write start -> 3 copies s"] = total
                res[f"K=1 {mode}: (start -> 3 copies) / (size/link)"] = total / (size / link)
                idle[f"K=1 {mode}"] = c.idle

            # The same close on links 4x slower: the receivers hash and store a quarter as much
            # meanwhile, so the CPUs they share with the writer here are freer. If the close is
            # then near the single node's, what held it at 1 Gbit/s was those CPUs, not waiting
            # for the network (a K=1 writer never waits for its copies).
            lab, h = fresh_lab(link=a.heal_link)
            d = h[1] / "k1-slow"
            d.mkdir()
            with Cpu() as cw:
                wt = write_timed(src, d / "f", salt=6)
            res[f"K=1 chain at {a.heal_link}: close MB/s"] = size / wt / 1e6
            res[f"K=1 chain at {a.heal_link}: close / single-node write"] = (size / wt / 1e6) / res["single-node write MB/s"]
            res[f"K=1 chain at {a.heal_link}: close / R=1 on a lab host"] = (size / wt / 1e6) / res["R=1 on a lab host: close MB/s"]
            idle[f"K=1 chain at {a.heal_link}: close"] = cw.idle

            lab, h = fresh_lab()
            d = policy_dir(h[1] / "k3", 3, 3)
            with Cpu() as c:
                t = write_timed(src, d / "f", salt=4)
            res["K=3 write MB/s"] = size / t / 1e6
            res["K=3 write / link"] = size / t / link
            idle["K=3"] = c.idle

        if want("read"):
            lab, h = fresh_lab()
            d = policy_dir(h[1] / "one-copy", 1, 1)
            write_timed(src, d / "f", salt=5)
            drop_caches()
            with Cpu() as c:
                t = read_timed(h[2] / "one-copy" / "f")
            res["cold remote read MB/s"] = size / t / 1e6
            res["cold remote read / link"] = size / t / link
            idle["cold remote read"] = c.idle

        if want("heal"):
            # Healing, at --heal-link: files with R=2 written from every host (a host keeps a copy of
            # what it writes, so data written on one host alone would leave that host the only
            # source of every lost block, and healing would run at one link's rate), then a host is
            # lost (kill -9) and the survivors copy its blocks back. Twice, in fresh labs: alone, and
            # while a foreground reader on host 2 re-reads a file of host 1 (cold each time).
            per_host = a.heal_mib * MiB // a.hosts // MiB * MiB
            heal_src = work / "heal-src"
            with open(src, "rb") as f_in, open(heal_src, "wb") as f_out:
                f_out.write(f_in.read(per_host))
            res["heal link nominal MB/s"] = rate_bits(a.heal_link) / 8 / 1e6
            heal_link = None
            for loaded_run in (False, True):
                lab, h = fresh_lab(link=a.heal_link)
                if heal_link is None:
                    heal_link = link_rate(lab, 256 * MiB)
                    res["heal link MB/s (one TCP stream)"] = heal_link / 1e6
                d = policy_dir(h[1] / "heal", 2, 1)
                for i, host in h.items():
                    write_timed(heal_src, host / "heal" / f"from-h{i}", salt=10 + i)
                for host in h.values():
                    assert host.sync(host / "heal", timeout=1800).returncode == 0
                fg_size = 256 * MiB
                if loaded_run:
                    fg = policy_dir(h[1] / "fg", 1, 1)
                    with open(src, "rb") as f:
                        (fg / "f").write_bytes(f.read(fg_size))

                def fg_read() -> float:
                    drop_caches()
                    return fg_size / read_timed(h[2] / "fg" / "f")
                unloaded = sorted(fg_read() for _ in range(3))[1] if loaded_run else None
                victim = h[a.hosts]
                before = h[1].cluster_status().get("heal", {}).get("copiedBytes", 0)
                victim.kill9()
                # Timed from the host's death being declared (--dead-after, 10 s after the kill): the
                # healer's pass (its walk, a census of every node) and its copies, until the status says
                # nothing is short.
                t0 = time.perf_counter() + 10
                loaded = []
                with Cpu() as c:
                    while True:
                        st = h[1].cluster_status().get("heal") or {}
                        if st.get("underReplicatedBytes", 1) == 0 and not st.get("running") and st.get("copiedBytes", 0) > before:
                            break
                        if loaded_run:
                            loaded.append(fg_read())
                        else:
                            time.sleep(0.2)
                        if time.perf_counter() - t0 > 1800:
                            raise RuntimeError("healing did not finish in 30 min")
                st = h[1].cluster_status()["heal"]
                took = time.perf_counter() - t0
                copied = st["copiedBytes"] - before
                survivors = a.hosts - 1
                tag = "heal with a foreground reader" if loaded_run else "heal alone"
                res[f"{tag}: copied MB"] = copied / 1e6
                res[f"{tag}: s from declared dead to healed"] = took
                res[f"{tag}: MB/s (declared dead -> healed)"] = copied / took / 1e6
                res[f"{tag}: / survivors' aggregate link"] = copied / took / (survivors * heal_link)
                res[f"{tag}: the healer's copy rate / survivors' aggregate link"] = st.get("copyRate", 0) / (survivors * heal_link)
                if loaded_run:
                    res[f"{tag}: foreground read during / unloaded"] = (sum(loaded) / len(loaded)) / unloaded if loaded else None
                idle[tag] = c.idle

        if want("moosefs") and not a.no_moosefs and moosefs.available():
            lab, h = fresh_lab()
            mfs = moosefs.MooseFS(Path(tempfile.mkdtemp(prefix="moosefs-", dir=data_parent)), lab=lab)
            try:
                mfs.set_goal(mfs.mnt, 3)
                with Cpu() as c:
                    t = write_timed(src, mfs.mnt / "f", salt=60)
                    os.sync()
                res["MooseFS goal 3 write MB/s"] = size / t / 1e6
                res["MooseFS goal 3 write / link"] = size / t / link
                idle["MooseFS"] = c.idle
            finally:
                mfs.stop()
                shutil.rmtree(mfs.root, ignore_errors=True)
    finally:
        if single is not None:
            single.destroy()
        for lab in labs:
            lab.down()
            shutil.rmtree(lab.root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    res["CPU idle % per phase"] = {k: round(v * 100, 1) for k, v in idle.items()}
    lines = [f"# Cluster in the lab: {a.hosts} hosts, links {a.link}, {a.size_mib} MiB", "", "| figure | value |", "|---|---|"]
    for k, v in res.items():
        if k == "CPU idle % per phase":
            continue
        cpu_bound = ""
        for phase, share in idle.items():
            if k.startswith(phase) and share < 0.3:
                cpu_bound = " (CPU-bound: idle under 30 %)"
        lines.append(f"| {k} | {v:.2f}{cpu_bound} |" if isinstance(v, float) else f"| {k} | {v} |")
    lines.append(f"| CPU idle % per phase | {res['CPU idle % per phase']} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
