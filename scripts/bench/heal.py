"""The healing benchmark (see heal.sh). Every etcd member and node is a real process, stopped
by PID at the end."""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "Tests" / "integration"))
sys.path.append(str(Path(__file__).resolve().parent))
from cluster import EtcdCluster, Node, make_secret, peer_request  # noqa: E402
from mfs import MODELFS_BIN, run, wait_until  # noqa: E402

# The timing helpers of the cluster benchmark (scripts/bench/cluster.py, a module named like the
# test suite's cluster.py, hence loaded by path).
_spec = importlib.util.spec_from_file_location("bench_cluster", Path(__file__).resolve().parent / "cluster.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)
drop_caches, read_timed, write_timed = bench.drop_caches, bench.read_timed, bench.write_timed

MiB = 1 << 20
# Seconds after a node's lease lapses before the healer treats it as dead: with the lease, long
# enough for a dozen foreground rounds with the node gone and nothing healing yet.
DEAD_AFTER = 3
LEASE_TTL = 3
# One salt per foreground write in the whole run: a write that repeated an earlier phase's
# bytes found every block stored already (dedup) and ran at 1.7-2x the speed of a new one.
SALTS = itertools.count(1000)


def copy_dirs(src: Path, dst: Path) -> float:
    """The raw rate's baseline: every file of src copied to dst, fsynced."""
    t = time.perf_counter()
    for f in sorted(src.iterdir()):
        with open(f, "rb", buffering=0) as i, open(dst / f.name, "wb", buffering=0) as o:
            while chunk := i.read(4 * MiB):
                o.write(chunk)
            os.fsync(o.fileno())
    return time.perf_counter() - t


def read_cold(path: Path) -> float:
    """Seconds to read a file on a node whose read cache is small (--cache-size 32M), after
    dropping its pages from the kernel's page cache: its blocks come from the peers again."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return read_timed(path)


def foreground(node: Node, src: Path, reads, stop: threading.Event, healed, at_least: int = 1) -> list[dict]:
    """On `node`: a cold read of the next file of `reads` (written elsewhere) and a write of src,
    over and over until `stop` (at least `at_least` times). One record per round: bytes and
    seconds of each, and the healing bytes the nodes received meanwhile."""
    rounds = []
    h, t = healed(), time.perf_counter()
    for i in itertools.count():
        path = next(reads, None)
        if path is None:
            break
        r = {"read s": read_cold(path), "read bytes": path.stat().st_size}
        salt = next(SALTS)
        out = node / f"fg-{salt}.bin"
        r["write s"] = write_timed(src, out, salt=salt)
        r["write bytes"] = src.stat().st_size
        # Deleted once timed: what there is to heal stays the set and the read files (and
        # the disk does not fill in a long phase; --gc-delay 5 gives the space back).
        out.unlink()
        h2, t2 = healed(), time.perf_counter()
        r["healed bytes"], r["wall s"], h, t = h2 - h, t2 - t, h2, t2
        rounds.append(r)
        if stop.is_set() and i + 1 >= at_least:
            break
    return rounds


def rates(rounds: list[dict], key: str, out: dict):
    """MB/s of the reads and writes of `rounds` (and of the healing during them) into `out`."""
    for kind in ("read", "write"):
        s = sum(r[f"{kind} s"] for r in rounds)
        out[f"{key} {kind} MB/s"] = sum(r[f"{kind} bytes"] for r in rounds) / 1e6 / s if s else 0
    s = sum(r["wall s"] for r in rounds)
    out[f"{key} healing MB/s"] = sum(r["healed bytes"] for r in rounds) / 1e6 / s if s else 0
    out[f"{key} rounds"] = len(rounds)


def split_by_healing(rounds: list[dict]):
    """The rounds before healing began, those during it (some copy received), those after."""
    busy = [i for i, r in enumerate(rounds) if r["healed bytes"] > 0]
    if not busy:
        return rounds, [], []
    return rounds[:busy[0]], rounds[busy[0]:busy[-1] + 1], rounds[busy[-1] + 1:]


class StatusPoller(threading.Thread):
    """`modelfs status MOUNT --json` every half second from the first timed phase to the last,
    loaded or not: the loaded phases wait on it for the end of healing, and a status of the
    whole namespace costs the nodes CPU (it asks each what it holds), so the baselines pay it too."""

    def __init__(self, mount: Path):
        super().__init__(daemon=True)
        self.mount, self.done = mount, threading.Event()
        self.lock = threading.Lock()
        self.replicated_at = 0.0   # start of the latest poll that found every file replicated

    def run(self):
        while not self.done.is_set():
            began = time.time()
            r = run([MODELFS_BIN, "status", self.mount, "--json"])
            if r.returncode == 0:
                p = json.loads(r.stdout)["path"]
                if p["replicated"]["files"] == p["files"]:
                    with self.lock:
                        self.replicated_at = began
            self.done.wait(0.5)

    def replicated_since(self, t: float) -> bool:
        """Every file (the set, the foreground's) had R copies on live nodes in a poll begun after t."""
        with self.lock:
            return self.replicated_at > t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--heal-rate", default="0", help="the nodes' --heal-rate (default 0: no cap)")
    ap.add_argument("--heal-rate-busy", default=None, help="the nodes' --heal-rate-busy (default: theirs, 100M; 0: never yield)")
    ap.add_argument("--dir", default="/var/tmp/modelfs-bench")
    ap.add_argument("--out", default=str(REPO / "bench-results" / "heal.md"))
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="heal.", dir=args.dir))
    results: dict[str, float] = {}
    etcd = None
    nodes: list[Node] = []
    poller = None
    try:
        # The data: SIZE in 64 MiB files of random bytes, and a 64 MiB file for the foreground.
        data = work / "data"
        data.mkdir()
        files = max(1, args.size_mib // 64)
        for k in range(files):
            (data / f"part-{k}.bin").write_bytes(os.urandom(64 * MiB))
        fg_src = work / "fg.bin"
        fg_src.write_bytes(os.urandom(64 * MiB))
        total = files * 64 * MiB

        (work / "copy").mkdir()
        drop_caches()
        results["raw copy s"] = copy_dirs(data, work / "copy")
        shutil.rmtree(work / "copy")

        etcd = EtcdCluster(3)
        secret = make_secret(work)
        for i in range(4):
            nodes.append(Node(etcd, "heal", f"node{i}", secret, replicas=2, ack=1, lease_ttl=LEASE_TTL,
                              extra=["--dead-after", str(DEAD_AFTER), "--heal-interval", "1", "--scrub-rate", "0", "--heal-rate", args.heal_rate,
                                     *(["--heal-rate-busy", args.heal_rate_busy] if args.heal_rate_busy is not None else []),
                                     "--ack-timeout", "600", "--cache-size", "32M", "--gc-delay", "5"], root=work / f"node{i}"))
        for n in nodes:
            n.start()
        a, b, c, d = nodes
        wait_until(lambda: len([x for x in a.cluster_status()["nodes"] if x["up"]]) == 4, 30, what="4 nodes up")
        os.mkdir(a / "set")
        for f in sorted(data.iterdir()):
            shutil.copyfile(f, a / "set" / f.name)
        # Files for the foreground reader on D, written on A, read over and over in turn; each
        # read cold (see read_cold), so the files need not outnumber the rounds. (Files kept on A
        # alone, R=1, would have spared them healing but had the healer move copies to the
        # other nodes, under-filled beside A.)
        os.mkdir(a / "fg")
        for k in range(12):
            write_timed(fg_src, a / "fg" / f"r{k:02d}.bin", salt=7 + k)
        fg_files = sorted((d / "fg").iterdir())
        assert a.sync(timeout=1200).returncode == 0
        rounds_left = 400   # a bound: no phase here lasts as long

        def reads():
            return itertools.islice(itertools.cycle(fg_files), rounds_left)

        def heal_state():
            return a.cluster_status().get("heal") or {}

        addresses = {n.node_id: n.peer_address for n in nodes}
        secret_text = secret.read_text().strip()

        def healed():
            """Bytes of healing copies the live nodes have received (their /metrics)."""
            got = 0.0
            for n in nodes:
                if n.expect_dead:
                    continue
                status, body = peer_request(addresses[n.node_id], "GET", "/metrics", secret_text)
                assert status == 200, body
                m = re.search(rb"^modelfs_heal_received_bytes_total (\S+)$", body, re.M)
                got += float(m.group(1)) if m else 0
            return got

        stop = threading.Event()
        fg: dict[str, float] = {}

        def baseline(files, key):
            """Six reads and six writes on D with nothing healing."""
            stop.set()
            rounds = foreground(d, fg_src, files, stop, healed, at_least=6)
            if any(r["healed bytes"] for r in rounds):
                raise SystemExit(f"healing ran during the {key} baseline")
            rates(rounds, key, fg)

        # Foreground speed on D with every node up. No drop_caches here: read_cold makes each
        # read cold on D, the peers read their packs with O_DIRECT, and the gigabytes of page
        # cache a drop freed made the next reads the only ones in the run to get memory this VM
        # had already backed (see docs/PERFORMANCE.md, Healing).
        poller = StatusPoller(a.mp)
        poller.start()
        # Not timed: every read file once and one write, to warm up (a node's first reads and
        # writes fault in memory: the unloaded rounds read at about half the speed of the
        # later ones when they were the first reads of their files on D).
        for f in fg_files:
            read_cold(f)
        write_timed(fg_src, d / "fg-warm-up.bin", salt=999)
        baseline(reads(), "unloaded")

        # Node loss: kill B, the foreground running from then until every file has R copies
        # again. Its rounds before the first healing copy are the node-down baseline (the healer
        # waits for the lease, then --dead-after), those with copies arriving the loaded ones.
        copied0 = heal_state().get("copiedBytes", 0)
        stop.clear()
        out: list = []
        th = threading.Thread(target=lambda: out.extend(foreground(d, fg_src, reads(), stop, healed)))
        b.kill9()
        t_kill = time.time()
        th.start()
        wait_until(lambda: heal_state().get("copiedBytes", 0) > copied0, 60, interval=0.2, what="re-replication to begin")
        t = time.time()
        wait_until(lambda: poller.replicated_since(t), 1200, interval=0.1, what="re-replication to finish")
        # Time from when repairs may start (lease expiry plus --dead-after) to nothing short.
        results["re-replication s"] = time.time() - (t_kill + LEASE_TTL + DEAD_AFTER)
        stop.set()
        th.join()
        before, during, _ = split_by_healing(out)
        rates(before, "node down", fg)
        rates(during, "during re-replication", fg)
        results["re-replicated bytes"] = heal_state().get("copiedBytes", 0) - copied0
        results["healer copy MB/s (re-replication)"] = heal_state().get("copyRate", 0) / 1e6

        # With B down and its copies made again: the baseline for the drain.
        baseline(reads(), "healed")

        # Drain C (its copies go to A and D), the foreground running until it is done.
        copied0 = heal_state().get("copiedBytes", 0)
        stop.clear()
        out = []
        th = threading.Thread(target=lambda: out.extend(foreground(d, fg_src, reads(), stop, healed)))
        th.start()
        t = time.time()
        r = run([MODELFS_BIN, "node", "drain", c.node_id, "--mount", a.mp, "--timeout", "1200"], timeout=1300)
        assert r.returncode == 0, r.stderr
        results["drain s"] = time.time() - t
        stop.set()
        th.join()
        rates(split_by_healing(out)[1], "during drain", fg)
        results["drained bytes"] = heal_state().get("copiedBytes", 0) - copied0
        results["healer copy MB/s (drain)"] = heal_state().get("copyRate", 0) / 1e6
        results.update(fg)
        results["set bytes"] = total
    except BaseException:
        keep = Path(args.out).parent / "heal-logs"
        keep.mkdir(parents=True, exist_ok=True)
        for n in nodes:
            shutil.copy(n.log_path, keep / f"{n.node_id}.log")
        print(f"logs kept in {keep}", file=sys.stderr)
        raise
    finally:
        if poller:
            poller.done.set()
            poller.join()
        for n in nodes:
            n.destroy()
        if etcd:
            etcd.stop()
        shutil.rmtree(work, ignore_errors=True)

    raw = results["set bytes"] / 1e6 / results["raw copy s"]
    heal_rate = results["re-replicated bytes"] / 1e6 / results["re-replication s"]
    drain_rate = results["drained bytes"] / 1e6 / results["drain s"]
    rows = [
        ("raw copy between two local directories", f"{raw:.0f} MB/s", "baseline"),
        ("re-replication: copying while the foreground ran", f"{results['during re-replication healing MB/s']:.0f} MB/s",
         f"{results['during re-replication healing MB/s'] / raw:.2f}× raw (target ≥ 0.5)"),
        ("re-replication: copying, the healer's last pass", f"{results['healer copy MB/s (re-replication)']:.0f} MB/s",
         f"{results['healer copy MB/s (re-replication)'] / raw:.2f}× raw"),
        (f"re-replication: from when repairs may start (lease {LEASE_TTL} s + --dead-after {DEAD_AFTER} s after kill -9) to R copies",
         f"{heal_rate:.0f} MB/s ({results['re-replicated bytes'] / 1e6:.0f} MB in {results['re-replication s']:.1f} s)", f"{heal_rate / raw:.2f}× raw"),
        ("drain: copying while the foreground ran", f"{results['during drain healing MB/s']:.0f} MB/s",
         f"{results['during drain healing MB/s'] / raw:.2f}× raw (target ≥ 0.5)"),
        ("drain: copying, the healer's last pass", f"{results['healer copy MB/s (drain)']:.0f} MB/s", f"{results['healer copy MB/s (drain)'] / raw:.2f}× raw"),
        ("drain: command to done", f"{drain_rate:.0f} MB/s ({results['drained bytes'] / 1e6:.0f} MB in {results['drain s']:.1f} s)", f"{drain_rate / raw:.2f}× raw"),
    ]
    # Each healing phase against the cluster with every node up, and against the same cluster
    # with nothing healing (B down before the healer starts; B down and its copies made again).
    phases = [("unloaded", "every node up, nothing healing", None),
              ("node down", "B killed, nothing healing yet", None),
              ("during re-replication", "during re-replication", "node down"),
              ("healed", "B down, its copies made again, nothing healing", None),
              ("during drain", "during the drain of C", "healed")]
    for kind in ("read", "write"):
        for key, label, same in phases:
            v = results.get(f"{key} {kind} MB/s", 0)
            if not v:
                rows.append((f"foreground {kind}, {label}", "not measured (no file left to read)", ""))
                continue
            if key == "unloaded":
                rows.append((f"foreground {kind}, {label}", f"{v:.0f} MB/s", "baseline"))
                continue
            ratio = f"{v / results[f'unloaded {kind} MB/s']:.2f}× every node up"
            if same:
                ratio += f", {v / results[f'{same} {kind} MB/s']:.2f}× {same} (target ≥ 0.8)"
            rows.append((f"foreground {kind}, {label} ({results[f'{key} rounds']} rounds)", f"{v:.0f} MB/s", ratio))
    table = "| measurement | value | ratio |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    cap = "" if args.heal_rate in ("0", "") else f", --heal-rate {args.heal_rate}"
    if args.heal_rate_busy is not None:
        cap += f", --heal-rate-busy {args.heal_rate_busy}"
    text = f"# healing benchmark ({results['set bytes'] / MiB:.0f} MiB, R=2, 4 nodes{cap}, {time.strftime('%Y-%m-%d %H:%M')})\n\n{table}\n"
    print(text)
    Path(args.out).write_text(text + "\n```json\n" + json.dumps(results, indent=1) + "\n```\n")


if __name__ == "__main__":
    main()
