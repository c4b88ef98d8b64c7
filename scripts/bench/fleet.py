"""A fleet in the network lab (issue #26): H hosts (default 16) and a 3-member etcd, each in its own
network namespace, links shaped to RATE; R=3 files written from every host. Measured:

  - idle RSS of every daemon, with an empty namespace and once the data is in;
  - a host joins: the bytes the healer moves to it, its share of the stored bytes against the
    fair 1/(H+1), the time until the rebalancing passes move nothing more;
  - a host drained (`modelfs node drain`): time, bytes moved against what it held; then it
    leaves (`modelfs node remove`);
  - a host lost (kill -9): time until every block is back at 3 copies.

All H+1 daemons share this machine's two CPUs: CPU idle is printed per phase; the movement times
are bound by the CPUs, not the links, whenever it is low.

Usage: scripts/bench/run-py.sh fleet [--hosts H] [--link RATE] [--data-mib N] [--files N]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "Tests" / "integration"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from lab import Lab  # noqa: E402
from mfs import MODELFS_BIN, run, wait_until  # noqa: E402

from benchio import Cpu, rss_mib  # noqa: E402

MiB = 1 << 20
DEAD_AFTER = 15


def rss(lab) -> dict:
    xs = [rss_mib(h.pid) for h in lab.hosts.values() if h.proc is not None and h.proc.poll() is None]
    return {"max MiB": max(xs), "median MiB": statistics.median(xs)}


def nodes(host) -> dict:
    return {n["id"]: n for n in host.cluster_status()["nodes"]}


def heal(host) -> dict:
    return host.cluster_status().get("heal") or {}


def still(host, since: float, timeout: float, what: str) -> dict:
    """Waits for a healer pass that began after `since` and did nothing (no copy, no drop, no
    rebalancing, nothing short): the cluster has come to rest."""
    seen = {"copied": heal(host).get("copiedBytes", 0), "removed": heal(host).get("removedCopies", 0)}

    def rest():
        h = heal(host)
        moved = (h.get("copiedBytes", 0), h.get("removedCopies", 0)) != (seen["copied"], seen["removed"])
        seen["copied"], seen["removed"] = h.get("copiedBytes", 0), h.get("removedCopies", 0)
        if h.get("running") or h.get("lastPassAt", 0) <= since or moved:
            return None
        if h.get("underReplicatedBytes", 1) or h.get("rebalanceCopies", 1):
            return None
        return h
    return wait_until(rest, timeout, interval=1, what=what)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=16)
    ap.add_argument("--link", default="1gbit")
    ap.add_argument("--data-mib", type=int, default=2048)
    ap.add_argument("--files", type=int, default=64)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    args = ["--replicas", "3", "--ack", "1", "--lease-ttl", "5", "--dead-after", str(DEAD_AFTER), "--heal-interval", "2",
            "--heal-full-every", "20", "--cache-size", "256M", "--scrub-rate", "0", "--gc-delay", "3600",
            "--heal-rate-busy", "0"]
    lab = Lab(prefix="mfsf", net="10.81")
    res: dict = {"hosts": a.hosts, "link": a.link, "data MiB": a.data_mib}
    idle: dict = {}
    n = a.hosts
    try:
        lab.up(n + 1, link=a.link, host_args=args, start_hosts=False)
        for i in range(1, n + 1):
            lab.start_host(i)
        lab.wait_all_up(timeout=120)
        h1 = lab.host(1)
        time.sleep(10)   # a settling window before the idle sample: nothing to wait for
        res["idle RSS, empty"] = rss(lab)

        size = a.data_mib * MiB // a.files
        with Cpu() as c:
            t = time.monotonic()
            for f in range(a.files):
                host = lab.host(f % n + 1)
                d = host / "data"
                d.mkdir(exist_ok=True)
                with open(d / f"f{f}.bin", "wb") as out:
                    for _ in range(size // MiB):
                        out.write(os.urandom(MiB))
            for i in range(1, n + 1):
                r = lab.host(i).sync(lab.host(i) / "data", timeout=1800)
                assert r.returncode == 0, r.stderr
            res["write + 3 copies s"] = time.monotonic() - t
        idle["write"] = c.idle
        still(h1, time.time(), 600, "the cluster to rest after the writes")
        time.sleep(10)
        res["idle RSS, with data"] = rss(lab)

        # A host joins.
        before = sum(x["usedBytes"] for x in nodes(h1).values())
        new = f"h{n + 1}"
        with Cpu() as c:
            t, since = time.monotonic(), time.time()
            lab.start_host(n + 1)
            lab.wait_all_up(timeout=120)
            still(h1, since, 3600, "rebalancing toward the new host to finish")
            took = time.monotonic() - t
        idle["join"] = c.idle
        ns = nodes(h1)
        stored = sum(x["usedBytes"] for x in ns.values())
        res["join: s"] = took
        res["join: bytes moved to it / stored"] = ns[new]["usedBytes"] / stored
        res["join: its share / fair (1/N)"] = ns[new]["usedBytes"] / stored * (n + 1)
        res["join: stored after / before"] = stored / before

        # Drained and lost hosts are never the healer's (its copy counters restart with it) nor h1.
        healer = heal(h1).get("healer")
        victims = [lab.host(i) for i in range(2, n + 1) if lab.host(i).node_id != healer]

        # A host drained, then removed.
        victim = victims[0]
        held = nodes(h1)[victim.node_id]["usedBytes"]
        with Cpu() as c:
            t = time.monotonic()
            r = run([MODELFS_BIN, "node", "drain", victim.node_id, "--mount", h1.mp, "--timeout", "3600"], timeout=3700)
            assert r.returncode == 0, r.stdout + r.stderr
            took = time.monotonic() - t
        idle["drain"] = c.idle
        res["drain: s"] = took
        res["drain: MB/s (its bytes / s)"] = held / took / 1e6
        victim.unmount()
        r = run([MODELFS_BIN, "node", "remove", victim.node_id, "--mount", h1.mp])
        assert r.returncode == 0, r.stdout + r.stderr

        # A host lost: the survivors' stored bytes grow back by what it held.
        lost = victims[1]
        ns = nodes(h1)
        held = ns[lost.node_id]["usedBytes"]
        others = sum(x["usedBytes"] for k, x in ns.items() if k not in (lost.node_id, victim.node_id))
        grown = lambda: sum(x["usedBytes"] for k, x in nodes(h1).items() if x["up"] and k != lost.node_id) - others
        with Cpu() as c:
            t, since = time.monotonic(), time.time()
            lost.kill9()
            still(h1, since + DEAD_AFTER, 3600, "every block to be back at 3 copies")
            took = time.monotonic() - t
        idle["lose one"] = c.idle
        res[f"lose one: healed after s (declared dead after {DEAD_AFTER} s)"] = took
        res["lose one: bytes copied / bytes it held"] = grown() / held
        res["lose one: MB/s after it was declared dead"] = grown() / (took - DEAD_AFTER) / 1e6
        res["idle RSS, after"] = rss(lab)
    finally:
        lab.down()
    lines = [f"# A fleet in the lab: {n} hosts (+1 joining), links {a.link}, {a.data_mib} MiB at R=3", "",
             "| figure | value |", "|---|---|"]
    for k, v in res.items():
        if isinstance(v, dict):
            v = ", ".join(f"{kk} {vv:.1f}" for kk, vv in v.items())
        elif isinstance(v, float):
            v = f"{v:.2f}"
        lines.append(f"| {k} | {v} |")
    lines.append(f"| CPU idle % per phase | {', '.join(f'{k} {v * 100:.0f}' for k, v in idle.items())} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
