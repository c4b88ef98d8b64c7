"""Peer TLS against plain peers, in one run (issue #29): two nodes on loopback, the same work
with and without mutual TLS. Each phase moves every byte between the nodes:
  write   A writes a file with R=2, K=2: close() returns once B holds every block (PUTs to B)
  read    B reads a file A wrote with R=1, its cache cold: every block a GET from A
Reported as MiB/s and TLS/plain ratios. Run: scripts/bench/run-py.sh tls [--size-mib N].
With --lab [--link 1gbit]: the two nodes are lab hosts (a network namespace each, links shaped),
the etcd members three more, and the data on tmpfs: what TLS costs where the link is the limit."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "Tests" / "integration"))
from cluster import EtcdCluster, Node, make_ca, make_cert, make_secret  # noqa: E402
from mfs import wait_until  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchio import drop_caches, read_timed, write_timed  # noqa: E402

MiB = 1 << 20


def pki(d: Path, cluster: str):
    """A CA and the certificates of nodes a and b of `cluster` in d."""
    make_ca(d, "ca")
    for n in ("a", "b"):
        make_cert(d, "ca", n, f"/O={cluster}/CN={n}")


def cpu_seconds(pid: int) -> float:
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def measure(a, b, src: Path, rounds: int) -> dict:
    """The write and read phases between nodes a and b (both up, seeing each other)."""
    (a / "r1").mkdir()
    subprocess.run([a.bin, "policy", "set", str(a / "r1"), "--replicas", "1", "--ack", "1"], check=True, capture_output=True)
    size = src.stat().st_size
    out = {"write": [], "read": [], "write_cpu": [], "read_cpu": []}
    for r in range(rounds):
        c0 = cpu_seconds(a.pid) + cpu_seconds(b.pid)
        out["write"].append(size / MiB / write_timed(src, a / f"f{r}.bin", salt=100 + r))
        c1 = cpu_seconds(a.pid) + cpu_seconds(b.pid)
        write_timed(src, a / "r1" / f"g{r}.bin", salt=200 + r)
        wait_until(lambda: (b / "r1" / f"g{r}.bin").exists(), 30, what="the file on b")
        drop_caches()
        c2 = cpu_seconds(a.pid) + cpu_seconds(b.pid)
        out["read"].append(size / MiB / read_timed(b / "r1" / f"g{r}.bin"))
        c3 = cpu_seconds(a.pid) + cpu_seconds(b.pid)
        out["write_cpu"].append((c1 - c0) / (size / (1 << 30)))
        out["read_cpu"].append((c3 - c2) / (size / (1 << 30)))
    return {"write": max(out["write"]), "read": max(out["read"]),
            "write_cpu": min(out["write_cpu"]), "read_cpu": min(out["read_cpu"])}


def lab_phase(root: Path, src: Path, tls: bool, rounds: int, link: str) -> dict:
    from lab import Lab
    d = Path(tempfile.mkdtemp(prefix="pki-", dir=root))
    args = ["--replicas", "2", "--ack", "2", "--ack-timeout", "120", "--cache-size", "4G", "--scrub-rate", "0"]
    if tls:
        pki(d, "lab")   # the lab's cluster is named "lab"; one certificate serves both hosts here
        args += ["--tls-cert", str(d / "a.pem"), "--tls-key", str(d / "a.key"), "--tls-ca", str(d / "ca.pem")]
    lab = Lab(root=tempfile.mkdtemp(prefix="modelfs-lab-", dir="/dev/shm"), prefix="mfst", net="10.81")
    try:
        lab.up(2, link=link, host_args=args)
        return measure(lab.host(1), lab.host(2), src, rounds)
    finally:
        lab.down()
        subprocess.run(["rm", "-rf", str(lab.root)])


def phase(etcd, root: Path, src: Path, tls: bool, rounds: int) -> dict:
    name = ("tls" if tls else "plain") + uuid.uuid4().hex[:6]
    d = root / name
    d.mkdir()
    secret = make_secret(d)
    flags = {}
    if tls:
        pki(d, name)
        flags = {n: ["--tls-cert", str(d / f"{n}.pem"), "--tls-key", str(d / f"{n}.key"), "--tls-ca", str(d / "ca.pem")]
                 for n in ("a", "b")}
    nodes = [Node(etcd, name, f"{name}-{n}", secret, replicas=2, ack=2, root=d / n,
                  extra=flags.get(n, []) + ["--ack-timeout", "120", "--cache-size", "4G"]) for n in ("a", "b")]
    try:
        for n in nodes:
            n.start()
        a, b = nodes
        wait_until(lambda: len(b.cluster_status()["nodes"]) == 2, 30, interval=0.1, what="the nodes to see each other")
        return measure(a, b, src, rounds)
    finally:
        for n in nodes:
            n.destroy()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "bench-results" / "tls.md"))
    ap.add_argument("--lab", action="store_true", help="two lab hosts on shaped links instead of loopback")
    ap.add_argument("--link", default="1gbit", help="the lab's link rate")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="modelfs-bench-tls-", dir="/var/tmp"))
    src = root / "src.bin"
    with open(src, "wb") as f:
        for _ in range(args.size_mib):
            f.write(os.urandom(MiB))
    if args.lab:
        try:
            plain = lab_phase(root, src, False, args.rounds, args.link)
            tls = lab_phase(root, src, True, args.rounds, args.link)
        finally:
            subprocess.run(["rm", "-rf", str(root)])
        where = f"two lab hosts, links {args.link}, data on tmpfs"
    else:
        etcd = EtcdCluster(1)
        try:
            plain = phase(etcd, root, src, False, args.rounds)
            tls = phase(etcd, root, src, True, args.rounds)
        finally:
            etcd.stop()
            subprocess.run(["rm", "-rf", str(root)])
        where = "two nodes on loopback"
    lines = [f"# Peer TLS vs plain ({args.size_mib} MiB, best of {args.rounds}, {where}, {time.strftime('%Y-%m-%d')})", "",
             "| phase | plain MiB/s | TLS MiB/s | TLS / plain | CPU s per GiB, both daemons: plain | TLS |",
             "|---|---|---|---|---|---|"]
    for k, what in (("write", "write, R=2 K=2 (PUTs to the other node)"), ("read", "cold read on the other node (GETs)")):
        lines.append(f"| {what} | {plain[k]:.0f} | {tls[k]:.0f} | {tls[k] / plain[k]:.2f}× | {plain[k + '_cpu']:.2f} | {tls[k + '_cpu']:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
