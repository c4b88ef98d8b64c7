"""The healing benchmark (see heal.sh). Every etcd member and node is a real process, stopped
by PID at the end."""
from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "Tests" / "integration"))
sys.path.append(str(Path(__file__).resolve().parent))
from cluster import EtcdCluster, Node, make_secret  # noqa: E402
from mfs import MODELFS_BIN, run, wait_until  # noqa: E402

# The timing helpers of the cluster benchmark (scripts/bench/cluster.py, a module named like the
# test suite's cluster.py, hence loaded by path).
_spec = importlib.util.spec_from_file_location("bench_cluster", Path(__file__).resolve().parent / "cluster.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)
drop_caches, read_timed, write_timed = bench.drop_caches, bench.read_timed, bench.write_timed

MiB = 1 << 20
# Seconds after a node's lease lapses before the healer treats it as dead: long enough for the
# foreground to be timed with the node gone and nothing healing yet.
DEAD_AFTER = 6
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


def foreground(node: Node, src: Path, reads, out: dict, key: str, stop: threading.Event, at_least: int = 1):
    """On `node`: a cold read of the next file of `reads` (written elsewhere, never read here)
    and a write of src, over and over until `stop` (at least `at_least` times); MB/s of each."""
    rd = wr = 0.0
    nr = nw = 0
    for i in itertools.count():
        path = next(reads, None)
        if path is None:
            break
        rd += read_timed(path)
        nr += path.stat().st_size
        wr += write_timed(src, node / f"fg-{key.replace(' ', '-')}-{i}.bin", salt=next(SALTS))
        nw += src.stat().st_size
        if stop.is_set() and i + 1 >= at_least:
            break
    out[f"{key} read MB/s"] = nr / 1e6 / rd if rd else 0
    out[f"{key} write MB/s"] = nw / 1e6 / wr if wr else 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=2048)
    ap.add_argument("--heal-rate", default="0", help="the nodes' --heal-rate (default 0: no cap)")
    ap.add_argument("--dir", default="/var/tmp/modelfs-bench")
    ap.add_argument("--out", default=str(REPO / "bench-results" / "heal.md"))
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="heal.", dir=args.dir))
    results: dict[str, float] = {}
    etcd = None
    nodes: list[Node] = []
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
                                     "--ack-timeout", "600"], root=work / f"node{i}"))
        for n in nodes:
            n.start()
        a, b, c, d = nodes
        wait_until(lambda: len([x for x in a.cluster_status()["nodes"] if x["up"]]) == 4, 30, what="4 nodes up")
        os.mkdir(a / "set")
        for f in sorted(data.iterdir()):
            shutil.copyfile(f, a / "set" / f.name)
        # Files for the foreground reader on D, each read once, cold: one to warm the reading
        # path up (with one write: a node's first reads and writes fault in its buffers); six for each unloaded
        # baseline (one 64 MiB read alone moved 206-466 MB/s between runs); 12 and 20 for the
        # two healing phases (a phase that used up a shared list left the next one nothing).
        os.mkdir(a / "fg")
        for k in range(51):
            write_timed(fg_src, a / "fg" / f"r{k:02d}.bin", salt=7 + k)
        fg_files = sorted((d / "fg").iterdir())
        assert a.sync(timeout=1200).returncode == 0

        stop = threading.Event()
        fg: dict[str, float] = {}

        def baseline(files, key):
            """Six reads and six writes on D with nothing healing."""
            stop.set()
            foreground(d, fg_src, iter(files), fg, key, stop, at_least=6)

        # Foreground speed on D with every node up. No drop_caches here: the files are cold
        # without it (never read on D; their blocks went to the packs with O_DIRECT), and the
        # gigabytes of page cache it freed made the next reads the only ones in the run to get
        # memory this VM had already backed (see docs/PERFORMANCE.md, Healing).
        read_timed(fg_files[0])
        write_timed(fg_src, d / "fg-warm-up.bin", salt=999)
        baseline(fg_files[1:7], "unloaded")

        def heal_state():
            return a.cluster_status().get("heal") or {}

        def all_replicated():
            """Every file (the set, the foreground's) has R copies on live nodes (modelfs status)."""
            r = run([MODELFS_BIN, "status", a.mp, "--json"])
            if r.returncode != 0:
                return False
            p = json.loads(r.stdout)["path"]
            return p["replicated"]["files"] == p["files"]

        # Node loss: kill B. Half the blocks D reads now have one live copy instead of two, so
        # the foreground is timed again with B gone and nothing healing yet (the healer waits
        # for the lease, 3 s, then --dead-after), then while the healer copies.
        copied0 = heal_state().get("copiedBytes", 0)
        b.kill9()
        t_kill = time.time()
        baseline(fg_files[7:13], "node down")
        if heal_state().get("copiedBytes", 0) != copied0:
            raise SystemExit("healing began while the node-down baseline was timed: raise DEAD_AFTER")
        wait_until(lambda: heal_state().get("copiedBytes", 0) > copied0, 60, interval=0.05, what="re-replication to begin")
        stop.clear()
        th = threading.Thread(target=foreground, args=(d, fg_src, iter(fg_files[13:25]), fg, "during re-replication", stop))
        th.start()
        wait_until(all_replicated, 1200, interval=0.2, what="re-replication to finish")
        # Time from when repairs may start (lease expiry plus --dead-after) to nothing short.
        results["re-replication s"] = time.time() - (t_kill + LEASE_TTL + DEAD_AFTER)
        stop.set()
        th.join()
        results["re-replicated bytes"] = heal_state().get("copiedBytes", 0) - copied0
        results["healer copy MB/s (re-replication)"] = heal_state().get("copyRate", 0) / 1e6
        results.update(fg)

        # With B down and its copies made again: the baseline for the drain.
        baseline(fg_files[25:31], "healed")

        # Drain C: its copies go to A and D.
        copied0 = heal_state().get("copiedBytes", 0)
        stop.clear()
        th = threading.Thread(target=foreground, args=(d, fg_src, iter(fg_files[31:]), fg, "during drain", stop))
        th.start()
        t = time.time()
        r = run([MODELFS_BIN, "node", "drain", c.node_id, "--mount", a.mp, "--timeout", "1200"], timeout=1300)
        assert r.returncode == 0, r.stderr
        results["drain s"] = time.time() - t
        stop.set()
        th.join()
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
        ("re-replication after kill -9: copying", f"{results['healer copy MB/s (re-replication)']:.0f} MB/s",
         f"{results['healer copy MB/s (re-replication)'] / raw:.2f}× raw (target ≥ 0.5)"),
        (f"re-replication: from when repairs may start (lease {LEASE_TTL} s + --dead-after {DEAD_AFTER} s after kill -9) to R copies",
         f"{heal_rate:.0f} MB/s ({results['re-replicated bytes'] / 1e6:.0f} MB in {results['re-replication s']:.1f} s)", f"{heal_rate / raw:.2f}× raw"),
        ("drain of a node: copying", f"{results['healer copy MB/s (drain)']:.0f} MB/s", f"{results['healer copy MB/s (drain)'] / raw:.2f}× raw (target ≥ 0.5)"),
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
            rows.append((f"foreground {kind}, {label}", f"{v:.0f} MB/s", ratio))
    table = "| measurement | value | ratio |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows)
    cap = "" if args.heal_rate in ("0", "") else f", --heal-rate {args.heal_rate}"
    text = f"# healing benchmark ({results['set bytes'] / MiB:.0f} MiB, R=2, 4 nodes{cap}, {time.strftime('%Y-%m-%d %H:%M')})\n\n{table}\n"
    print(text)
    Path(args.out).write_text(text + "\n```json\n" + json.dumps(results, indent=1) + "\n```\n")


if __name__ == "__main__":
    main()
