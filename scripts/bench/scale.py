"""Scale benchmark (issue #26): a cluster in the network lab with an (almost) empty namespace, then
with N files (default 1,000,000, DCP-shaped: steps x ranks plus small files per step, built by
`modelfs debug load` through the metadata engine, sharing real blocks), measured the same way:

  - small-file create+write+close latency p50/p99 (4 KiB files on one host)
  - `ls -l` of a 5,000-entry directory, `stat` p50/p99, `statfs` p50/p99
  - idle etcd traffic per host (requests/s, bytes/s, from etcd's own metrics)
  - close() p99 while a garbage collection pass reads every manifest, against without at the
    same namespace size, each close timed against etcd's compactions
  - etcd bytes per file (the db's size in use, before and after the load)
  - a host lost (kill -9): time until the healer's pass has brought every block back to R
  - idle RSS of every daemon

Usage: scripts/bench/scale.sh [--files N] [--hosts H] [--link RATE] [--no-heal] [--out FILE]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "Tests" / "integration"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lab import Lab  # noqa: E402
from mfs import MODELFS_BIN, wait_until, write_file  # noqa: E402

from benchio import rss_mib  # noqa: E402

KiB = 1024


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def small_files(host, d: Path, n: int, tag: str, starts: list[float] | None = None, until=None) -> list[float]:
    """n 4 KiB files created, written and closed one after another: their latencies (and, into
    `starts`, the wall-clock time each began); `until()` false ends the loop early."""
    d.mkdir(exist_ok=True)
    out = []
    for i in range(n):
        if until is not None and not until():
            break
        data = os.urandom(4 * KiB)
        if starts is not None:
            starts.append(time.time())
        out.append(timed(lambda: write_file(d / f"{tag}-{i}.bin", data)))
    return out


def compactions(lab) -> list[tuple[float, float]]:
    """The etcd members' scheduled compactions so far, as (start, end) wall-clock times, from
    their logs ("finished scheduled compaction", with how long it took)."""
    out = []
    for log in lab.root.glob("etcd-*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if "finished scheduled compaction" not in line:
                continue
            try:
                e = json.loads(line)
                end = datetime.datetime.fromisoformat(e["ts"].replace("Z", "+00:00")).timestamp()
                took = e["took"]
                secs = float(took[:-2]) / 1000 if took.endswith("ms") else float(took[:-1]) if took.endswith("s") else 0.0
                out.append((end - secs, end))
            except (ValueError, KeyError):
                continue
    return out


def split_by_compaction(lab, starts: list[float], lat: list[float]) -> tuple[list[float], list[float]]:
    """Latencies of closes that overlapped an etcd compaction, and of those that did not."""
    windows = compactions(lab)
    inside, outside = [], []
    for t, d in zip(starts, lat):
        (inside if any(a <= t + d and t <= b for a, b in windows) else outside).append(d)
    return inside, outside


def ls_l(d: Path) -> float:
    def run():
        for e in os.scandir(d):
            e.stat(follow_symlinks=False)
    return timed(run)


def db_in_use(lab) -> float:
    for line in lab.etcd_metrics(1).splitlines():
        if line.startswith("etcd_mvcc_db_total_size_in_use_in_bytes"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def settle(lab):
    def quiet():
        for h in lab.hosts.values():
            s = h.status()
            if s["gc"]["running"] or (s["cluster"].get("heal") or {}).get("running"):
                return False
        return True
    wait_until(quiet, 1800, interval=1, what="garbage collection and healing to settle")


def idle(lab, seconds: float) -> dict:
    settle(lab)
    r0, s0, v0 = lab.etcd_served()
    t = time.monotonic()
    time.sleep(seconds)   # the measurement window
    r1, s1, v1 = lab.etcd_served()
    took = time.monotonic() - t
    n = len(lab.hosts)
    return {"requests/s per host": (r1 - r0) / took / n, "bytes/s per host": (s1 - s0 + v1 - v0) / took / n}


def measure(lab, work: str, label: str, results: dict, rounds: int):
    h2, h3 = lab.host(2), lab.host(3)
    r = {}
    lat = small_files(h2, h2 / work / f"small-{label}", rounds, label)
    r["create+write+close p50 ms"] = pct(lat, 50) * 1000
    r["create+write+close p99 ms"] = pct(lat, 99) * 1000
    r["scandir+lstat of 5,000 entries s"] = statistics.median(ls_l(h3 / work / "wide") for _ in range(3))
    r["GNU ls -l of 5,000 entries s"] = timed(lambda: subprocess.run(["ls", "-l", h2 / work / "wide"], check=True,
                                                                    stdout=subprocess.DEVNULL))
    # stat on a host that never listed the directory: each is a lookup (two etcd reads), not
    # an attribute readdirplus left in the kernel's cache.
    names = [e.name for e in os.scandir(h3 / work / "wide")]
    rnd = random.Random(7)
    h4 = lab.host(4)
    st = [timed(lambda p=rnd.choice(names): os.stat(h4 / work / "wide" / p)) for _ in range(rounds)]
    r["stat p50 ms"], r["stat p99 ms"] = pct(st, 50) * 1000, pct(st, 99) * 1000
    sf = [timed(lambda: os.statvfs(h2.mp)) for _ in range(100)]
    r["statfs p50 ms"], r["statfs p99 ms"] = pct(sf, 50) * 1000, pct(sf, 99) * 1000
    r.update({f"idle etcd {k}": v for k, v in idle(lab, 30).items()})
    results[label] = r
    print(f"[{label}] " + ", ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)


def manifests_read(lab) -> int:
    """Manifests read so far by every host: its own collection passes, and the scans it made
    for the others as the cluster's scanner (absent from an older daemon)."""
    n = 0
    for h in lab.hosts.values():
        s = h.status()
        n += s["gc"]["manifestsRead"] + ((s["cluster"].get("gcScans") or {}).get("manifestsRead") or 0)
    return n


def scans_yielded(lab) -> float:
    """Seconds every host's scans of the manifests waited for writers so far (its own passes'
    and, as the cluster's scanner, the others'; absent from an older daemon)."""
    t = 0.0
    for h in lab.hosts.values():
        s = h.status()
        t += s["gc"].get("scanYieldedSeconds") or 0
        t += (s["cluster"].get("gcScans") or {}).get("yieldedSeconds") or 0
    return t


def gc_pass_closes(lab, work: str, victim: Path, rounds: int, starts: list[float]) -> tuple[list[float], float, int, float]:
    """close() latencies on host 2 while its garbage collection pass (set off by deleting
    `victim`, whose blocks are older than the grace) learns that they are garbage, which takes
    reading every manifest (by each holder, or once by the cluster's scanner); the manifests
    all hosts read meanwhile, and how long their scans waited for the writers."""
    h2 = lab.host(2)
    read0 = manifests_read(lab)
    yielded0 = scans_yielded(lab)
    os.unlink(victim)
    wait_until(lambda: h2.status()["gc"]["running"], 120, interval=0.05, what="a GC pass to start")
    lat = small_files(h2, h2 / work / "during-gc", rounds, "g", starts, until=lambda: h2.status()["gc"]["running"])
    wait_until(lambda: not h2.status()["gc"]["running"], 1800, interval=1, what="the GC pass to end")
    settle(lab)   # every holder's pass
    return lat, h2.status()["gc"]["lastPassSeconds"], manifests_read(lab) - read0, scans_yielded(lab) - yielded0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=1_000_000)
    ap.add_argument("--hosts", type=int, default=5)
    ap.add_argument("--link", default="1gbit")
    ap.add_argument("--ranks", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-heal", action="store_true", help="skip losing a host (the longest phase)")
    a = ap.parse_args()
    node_args = ["--replicas", "3", "--ack", "1", "--dead-after", "20", "--heal-interval", "5",
                 "--gc-delay", "30", "--cache-size", "1G", "--scrub-rate", "0"]
    lab = Lab(prefix="mfsb", net="10.79")
    results: dict = {"files": a.files, "hosts": a.hosts, "link": a.link}
    try:
        lab.up(a.hosts, link=a.link, host_args=node_args)
        h1, h2 = lab.host(1), lab.host(2)
        work = "bench"
        os.mkdir(h1 / work)
        seed = h1 / work / "seed"
        seed.mkdir()
        for i in range(32):
            write_file(seed / f"s{i}.bin", os.urandom(512 * KiB + i))
        assert h1.sync(seed).returncode == 0
        (h2 / work / "during-gc").mkdir()
        write_file(h2 / work / "old.bin", os.urandom(8 << 20))   # deleted later: GC's candidates
        assert h2.sync(h2 / work / "old.bin").returncode == 0

        def load(dir_: str, steps: int, ranks: int, small: int, wide: int = 0) -> float:
            t = time.monotonic()
            r = h1.run_in(MODELFS_BIN, "debug", "load", "--meta", lab.meta, "--dir", f"{work}/{dir_}", "--steps", str(steps),
                          "--ranks", str(ranks), "--small", str(small), "--wide", str(wide), "--reuse", f"{work}/seed",
                          "--workers", "8", "--client-id", f"loader-{dir_ or 'wide'}", timeout=24 * 3600)
            if r.returncode != 0:
                raise RuntimeError(r.stdout + r.stderr)
            return time.monotonic() - t

        load("", 0, 1, 0, wide=5000)   # bench/wide
        db0 = db_in_use(lab)
        measure(lab, work, "small namespace", results, a.rounds)
        base_closes = small_files(h2, h2 / work / "during-gc", a.rounds, "base")

        per_step = a.ranks + 2
        steps = max(1, (a.files - 5000) // per_step)
        took = load("ns", steps, a.ranks, 2)
        loaded = steps * per_step
        results["loaded files"] = loaded
        results["load files/s"] = loaded / took
        print(f"loaded {loaded} files in {took:.0f} s", flush=True)
        settle(lab)
        results["etcd bytes per file"] = (db_in_use(lab) - db0) / loaded
        measure(lab, work, "large namespace", results, a.rounds)

        # close() without and during a GC pass, both at the full namespace, each close timed
        # against etcd's compactions (every 5 min; at millions of keys each takes etcd's CPU
        # for tens of seconds here) so the two causes can be told apart.
        settle(lab)
        base_starts: list[float] = []
        base_large = small_files(h2, h2 / work / "during-gc", a.rounds, "base-large", base_starts)
        time.sleep(35)   # old.bin's blocks older than --gc-delay (30 s): candidates for the pass
        gc_starts: list[float] = []
        gc_closes, gc_seconds, gc_read, gc_yielded = gc_pass_closes(lab, work, h2 / work / "old.bin", a.rounds, gc_starts)
        base_in, base_out = split_by_compaction(lab, base_starts, base_large)
        gc_in, gc_out = split_by_compaction(lab, gc_starts, gc_closes)
        ms = lambda xs: round(pct(xs, 99) * 1000, 1) if xs else None   # noqa: E731
        results["close() p99 ms, no GC pass: small namespace / full namespace"] = [ms(base_closes), ms(base_large)]
        results["close() p99 ms during a GC pass"] = ms(gc_closes)
        results["close() p99 ms outside etcd compactions: no GC pass / during a GC pass"] = [ms(base_out), ms(gc_out)]
        results["closes overlapping an etcd compaction: no GC pass / during a GC pass"] = [
            f"{len(base_in)} of {len(base_large)}", f"{len(gc_in)} of {len(gc_closes)}"]
        results["etcd compactions (start, seconds)"] = [(round(a0), round(b0 - a0, 1)) for a0, b0 in compactions(lab)]
        results["GC pass s on host 2 / manifests read by all hosts"] = [gc_seconds, gc_read]
        results["GC scans' waits for writers, s (all hosts)"] = round(gc_yielded, 1)
        print(f"GC pass {gc_seconds:.1f} s over {gc_read} manifests ({gc_yielded:.1f} s of waiting for writers); close() p99 {ms(gc_closes)} ms during "
              f"({len(gc_closes)} closes, {len(gc_in)} in a compaction; {ms(gc_out)} ms outside) vs {ms(base_large)} ms "
              f"without at the same size ({len(base_in)} in a compaction; {ms(base_out)} outside)", flush=True)

        settle(lab)
        results["idle RSS MiB"] = {h.node_id: rss_mib(h.pid) for h in lab.hosts.values()}

        if a.no_heal:
            print(json.dumps(results, indent=1), flush=True)
            if a.out:
                Path(a.out).write_text(json.dumps(results, indent=1))
            return
        victim = lab.host(a.hosts)
        t0 = time.monotonic()
        victim.kill9()
        first_pass = None

        def healed():
            nonlocal first_pass
            heal = h1.cluster_status().get("heal") or {}
            if first_pass is None and victim.node_id not in heal.get("waitingFor", [victim.node_id]) and heal.get("running"):
                first_pass = time.monotonic() - t0
            ok = all(int(os.getxattr(seed / f"s{i}.bin", "user.modelfs.replicas")) >= 3 for i in range(0, 32, 4))
            return heal if ok and not heal.get("running") and heal.get("underReplicatedBytes", 1) == 0 else None
        heal = wait_until(healed, 3600, interval=2, what="the lost host's blocks to be healed")
        results["host lost: healed after s"] = time.monotonic() - t0
        results["host lost: pass began after s"] = first_pass
        results["host lost: pass walked files in s"] = [heal["files"], heal["lastPassSeconds"]]
        print(json.dumps(results, indent=1), flush=True)
        if a.out:
            Path(a.out).write_text(json.dumps(results, indent=1))
    except BaseException:
        # The lab's directory goes with it: keep its daemons' and etcd's logs for a post-mortem.
        keep = Path("/tmp/modelfs-scale-logs")
        keep.mkdir(exist_ok=True)
        for log in [*lab.root.glob("h*/modelfs.log"), *lab.root.glob("etcd-*.log")]:
            shutil.copy(log, keep / f"{log.parent.name}-{log.name}")
        print(f"logs kept in {keep}", flush=True)
        raise
    finally:
        lab.down()


if __name__ == "__main__":
    main()
