"""Operating and self-healing on loopback clusters of 3-5 real nodes (issue #4): re-replication
after a node dies, rebalancing toward a node that joins, drain and remove, scrub and repair of
corrupt replicas, garbage collection across nodes, `modelfs status PATH` and the
`user.modelfs.*` xattrs, checked against what each node's store really holds."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from cluster import pack_blocks
from mfs import MODELFS_BIN, MiB, assert_bytes_equal, pack_records, read_file, run, wait_until, write_file
from test_cluster import etcd, make_nodes, payload  # noqa: F401  (fixtures)

# Fast healing for tests: a node down 2 s is dead; the healer looks every second and reads the
# whole namespace every second too (these tests wait for a pass after the copies they see).
HEAL = ["--dead-after", "2", "--heal-interval", "1", "--heal-full-every", "1", "--scrub-rate", "0"]


def copies(nodes, blocks) -> dict[str, int]:
    """Block id → how many of `nodes` hold it as a replica (read from their pack files)."""
    held = [n.blocks() for n in nodes]
    return {b: sum(b in h for h in held) for b in blocks}


def heal(node) -> dict:
    return node.cluster_status().get("heal") or {}


def fresh_pass(node, after: float) -> dict | None:
    """The healer's status once it has finished a pass that started after `after` (Unix time)."""
    h = heal(node)
    return h if h.get("lastPassAt", 0) - h.get("lastPassSeconds", 0) > after else None


def write_set(node, n: int, size: int, seed: int, sub: str = "") -> dict[str, bytes]:
    files = {}
    d = node / sub if sub else node.mp
    os.makedirs(d, exist_ok=True)
    for i in range(n):
        data = payload(size + i * 4099, seed + i)
        write_file(Path(d) / f"f{i}.bin", data)
        files[(sub + "/" if sub else "") + f"f{i}.bin"] = data
    return files


def read_all(node, files: dict[str, bytes], what: str):
    for name, data in files.items():
        assert_bytes_equal(read_file(node / name), data, f"{name} read on {node.node_id} {what}")


def test_a_dead_node_is_healed_back_to_r_copies(make_nodes):
    nodes = make_nodes(4, replicas=3, ack=1, extra=HEAL)
    a = nodes[0]
    files = write_set(a, 6, 5 * MiB, 40)
    assert a.sync().returncode == 0
    held = a.blocks()
    assert all(c >= 3 for c in copies(nodes, held).values())
    victim = nodes[1]
    victim.kill9()
    live = [n for n in nodes if n is not victim]
    # Every file stays readable from every live node while the copies are being rebuilt.
    read_all(live[2], files, "while under-replicated")
    wait_until(lambda: all(c >= 3 for c in copies(live, held).values()), 90, interval=0.5,
               what="every block to have 3 copies on the 3 live nodes")
    read_all(live[1], files, "after healing")
    # The healer's view agrees with the stores: nothing short, nothing unreadable, copies made.
    since = time.time()
    h = wait_until(lambda: fresh_pass(a, since), 30, interval=0.3, what="a healer pass after the copies")
    assert h["underReplicatedBytes"] == 0 and h["unreadableBytes"] == 0, h
    assert h["copiedBytes"] > 0 and h["files"] == 6, h


def lose_a_holder(make_nodes, extra: list[str], seed: int):
    """4 nodes with R=2: four 8 MiB files written on the first and synced, then kill -9 of another
    node holding some of their blocks. Returns (the writer, the files, the writer's blocks, the
    killed node, the live nodes)."""
    nodes = make_nodes(4, replicas=2, ack=1, extra=extra)
    a = nodes[0]
    files = write_set(a, 4, 8 * MiB, seed)
    assert a.sync().returncode == 0
    held = a.blocks()
    victim = next(n for n in nodes[1:] if n.blocks() & held)
    victim.kill9()
    return a, files, held, victim, [n for n in nodes if n is not victim]


def test_heal_rate_caps_the_copying_and_healing_still_finishes(make_nodes):
    cap = 4 * MiB
    a, files, held, victim, live = lose_a_holder(make_nodes, HEAL + ["--heal-rate", "4M"], 70)
    lost = victim.blocks() & held
    wait_until(lambda: all(c >= 2 for c in copies(live, held).values()), 120, interval=0.5,
               what="every block to have 2 copies on the live nodes")
    read_all(live[-1], files, "after capped healing")
    since = time.time()
    h = wait_until(lambda: fresh_pass(a, since), 30, interval=0.3, what="a healer pass after the copies")
    assert h["rateCap"] == cap, h
    assert h["underReplicatedBytes"] == 0 and h["copiedBytes"] >= len(lost) * 256 * 1024, h
    # The pass that copied kept under the cap (its rate counts the pacing waits).
    assert 0 < h["copyRate"] <= cap * 1.05, h


def test_a_joining_node_receives_its_share_and_nothing_becomes_unreadable(make_nodes):
    nodes = make_nodes(3, replicas=2, ack=1, extra=HEAL)
    a = nodes[0]
    files = write_set(a, 8, 4 * MiB, 60)
    assert a.sync().returncode == 0
    held = set().union(*(n.blocks() for n in nodes))
    d, = make_nodes(1, replicas=2, ack=1, extra=HEAL)
    everyone = nodes + [d]

    def settled():
        c = copies(everyone, held)
        # Never fewer than R copies of any block, at any moment we look.
        assert min(c.values()) >= 2, f"a block fell below 2 copies during rebalancing: {min(c.values())}"
        return len(d.blocks() & held) >= len(held) // 8 and max(c.values()) == 2

    wait_until(settled, 90, interval=0.5, what="the new node to hold its share and surplus copies to be dropped")
    read_all(d, files, "after rebalancing")


def test_drain_moves_every_copy_off_a_node_then_it_can_leave(make_nodes, etcd):
    nodes = make_nodes(4, replicas=2, ack=1, extra=HEAL)
    a, b, c, victim = nodes
    files = write_set(a, 6, 4 * MiB, 80)
    assert a.sync().returncode == 0
    held = set().union(*(n.blocks() for n in nodes))
    assert victim.blocks() & held, "the node to drain should hold some blocks first"
    r = run([MODELFS_BIN, "node", "drain", victim.node_id, "--mount", a.mp, "--timeout", "90"], timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (victim.blocks() & held), "a drained node still holds blocks the cluster needs"
    assert all(n >= 2 for n in copies([a, b, c], held).values())
    r = run([MODELFS_BIN, "node", "remove", victim.node_id, "--mount", a.mp])
    assert r.returncode != 0 and "up" in r.stderr, "removing a live node must be refused"
    # A file the node still holds open after its last name is gone (an orphan) when it dies: it
    # would delete it at its next start; removing the node for good deletes it instead.
    orphan = victim.mp / "open-then-deleted.bin"
    fd = os.open(orphan, os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, os.urandom(MiB))
    os.fsync(fd)
    os.unlink(orphan)
    prefix = f"/modelfs/{make_nodes.name}/o/"
    etcd_keys = lambda: subprocess.run(["etcdctl", "--endpoints", etcd.endpoints, "get", "--prefix", "--keys-only", prefix],  # noqa: E731
                                       capture_output=True, text=True, check=True).stdout.split()
    assert len(etcd_keys()) == 1, "the open, deleted file should be in the orphan index"
    victim.kill9()
    try:
        os.close(fd)
    except OSError:
        pass   # its mount is gone
    wait_until(lambda: not [n for n in a.cluster_status()["nodes"] if n["id"] == victim.node_id and n["up"]], 20,
               interval=0.2, what="the drained node to show as down")
    r = run([MODELFS_BIN, "node", "remove", victim.node_id, "--mount", a.mp])
    assert r.returncode == 0, r.stderr
    assert "the 1 deleted file(s) it still held open are gone" in r.stdout, r.stdout
    assert etcd_keys() == [], "the removed node's orphan is still indexed"
    r = run([MODELFS_BIN, "node", "list", "--mount", a.mp, "--json"])
    assert r.returncode == 0 and victim.node_id not in [n["id"] for n in json.loads(r.stdout)]
    read_all(b, files, "after the drained node left")
    r = run([MODELFS_BIN, "node", "drain", "no-such-node", "--mount", a.mp])
    assert r.returncode != 0 and "no node" in r.stderr


class BusyWriter:
    """Writes and deletes 4 MiB files on `node` in a loop until stopped: foreground work for that
    node and for the nodes receiving its copies."""

    def __init__(self, node):
        self.node, self.stop, self.rounds, self.error = node, threading.Event(), 0, None
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        try:
            data = payload(4 * MiB, 500)
            while not self.stop.is_set():
                p = self.node / f"busy-{self.rounds}.bin"
                write_file(p, data[:-8] + self.rounds.to_bytes(8, "little"))
                os.unlink(p)
                self.rounds += 1
        except BaseException as e:   # reported by the test, not lost in the thread
            self.error = e

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "the writer did not stop"
        assert self.error is None, f"the foreground writer failed: {self.error!r}"


def yielded(nodes) -> int:
    """Healing copies the nodes held back for their foreground (ForegroundYield)."""
    return sum(n.cluster_status()["healYield"]["heldCopies"] for n in nodes)


def test_a_drain_yields_to_a_busy_node_then_finishes(make_nodes):
    # 1 MB/s for healing while busy: a drain of ~16 MiB would take ~16 s with the writer on.
    nodes = make_nodes(4, replicas=2, ack=1, extra=HEAL + ["--heal-rate-busy", "1M"])
    a, b, c, victim = nodes
    files = write_set(a, 4, 8 * MiB, 90)
    assert a.sync().returncode == 0
    held = set().union(*(n.blocks() for n in nodes))
    assert victim.blocks() & held
    assert yielded(nodes) == 0
    with BusyWriter(victim) as w:
        # The drain starts once the node counts as busy: started before, it can finish at full
        # speed while the writer's thread is still getting going (a CI run under load did).
        wait_until(lambda: victim.cluster_status()["healYield"]["busy"], 30, interval=0.1, what="the writer to make the node busy")
        drain = subprocess.Popen([MODELFS_BIN, "node", "drain", victim.node_id, "--mount", str(a.mp), "--timeout", "120"],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            # The drained node sends its copies: while it writes, they wait their turn.
            wait_until(lambda: victim.cluster_status()["healYield"]["heldCopies"] > 0, 60, interval=0.2,
                       what="the busy node to hold healing copies back")
            assert victim.cluster_status()["healYield"]["busy"]
            assert drain.poll() is None, "the drain should still be running while held back"
        except BaseException:
            drain.kill()
            drain.wait()
            raise
    # The writer stopped: the drain goes at full speed and finishes.
    out, _ = drain.communicate(timeout=120)
    assert drain.returncode == 0, out
    assert w.rounds > 0
    assert not (victim.blocks() & held), "a drained node still holds blocks the cluster needs"
    assert all(n >= 2 for n in copies([a, b, c], held).values())
    read_all(b, files, "after a drain that yielded")


def test_blocks_down_to_one_copy_are_copied_at_full_speed_beside_a_busy_writer(make_nodes):
    # So slow a rate while busy that yielding copies could not finish within the test.
    a, files, held, victim, live = lose_a_holder(make_nodes, HEAL + ["--heal-rate-busy", "1K"], 110)
    # Every node that could send or receive a copy is busy: A (holder of every block) writes.
    with BusyWriter(a) as w:
        wait_until(lambda: all(c >= 2 for c in copies(live, held).values()), 60, interval=0.5,
                   what="blocks left with one copy to get their second while the writer runs")
        assert not w.stop.is_set() and w.rounds > 0
    read_all(live[-1], files, "after urgent healing")
    assert sum(n.cluster_status()["healYield"]["receivedBytes"] for n in live) >= len(victim.blocks() & held) * 256 * 1024


def corrupt_block(node, block: str) -> None:
    """Flips bytes in the middle of `block`'s record in `node`'s replica packs."""
    for pack in sorted((node.data / "packs").glob("*.pack")):
        for magic, ident, data_off, n, data in pack_records(pack):
            if magic in (b"MFB1", b"MFB2") and ident == block:
                with open(pack, "r+b") as f:
                    f.seek(data_off + n // 2)
                    f.write(bytes(b ^ 0x5A for b in data[n // 2:n // 2 + 64]))
                return
    raise AssertionError(f"block {block} not found in {node.node_id}'s packs")


def good_copy(node, block: str) -> bool:
    """True once `node` holds a verified replica of `block` (and no corrupt live record)."""
    try:
        return block in node.blocks()
    except AssertionError:   # pack_blocks found a live record that does not hash to its id
        return False


def test_a_corrupt_replica_is_never_read_and_is_repaired(make_nodes):
    a, b, c = make_nodes(3, replicas=3, ack=1, extra=HEAL)
    data = payload(12 * MiB, 90)
    write_file(a / "model.bin", data)
    assert a.sync().returncode == 0
    blocks = sorted(a.blocks())
    x, y = blocks[0], blocks[1]
    corrupt_block(b, x)
    corrupt_block(c, y)
    # B reads through its corrupt replica: correct bytes (from a peer), and B repairs it.
    assert_bytes_equal(read_file(b / "model.bin"), data, "read on the node with a corrupt replica")
    wait_until(lambda: good_copy(b, x), 30, interval=0.2, what="B's corrupt replica to be replaced")
    assert b.cluster_status()["scrub"]["repaired"] >= 1
    # `modelfs verify` re-hashes every replica on its node and repairs C's.
    r = run([MODELFS_BIN, "verify", a / "model.bin", "--json"], timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    rep = json.loads(r.stdout)
    assert rep["repaired"] >= 1 and rep["corruptUnrepaired"] == 0 and rep["ok"], rep
    assert good_copy(c, y)
    assert_bytes_equal(read_file(c / "model.bin"), data, "read on C after verify")


def test_the_background_scrubber_finds_and_repairs_corruption(make_nodes):
    a, b = make_nodes(2, replicas=2, ack=1,
                      extra=["--dead-after", "2", "--heal-interval", "1", "--scrub-rate", "1G", "--scrub-every", "1"])
    data = payload(6 * MiB, 91)
    write_file(a / "w.bin", data)
    assert a.sync().returncode == 0
    victim = sorted(b.blocks())[-1]
    corrupt_block(b, victim)
    wait_until(lambda: b.cluster_status()["scrub"]["repaired"] >= 1 and good_copy(b, victim), 30, interval=0.2,
               what="the scrubber to find and repair the corrupt replica")
    s = b.cluster_status()["scrub"]
    assert s["corruptFound"] >= 1 and s["passes"] >= 1, s
    assert_bytes_equal(read_file(b / "w.bin"), data, "read after the scrubber's repair")
    status, body = __import__("cluster").peer_request(b.peer_address, "GET", "/metrics",
                                                      make_nodes.secret.read_text().strip())
    assert status == 200 and b"modelfs_scrub_repaired_total 1" in body.replace(b".0\n", b"\n")


def test_deleting_a_large_file_gives_the_space_back_on_every_node(make_nodes):
    nodes = make_nodes(3, replicas=2, ack=1, extra=HEAL + ["--gc-delay", "3"])
    a = nodes[0]
    before = {n.node_id: n.pack_bytes() for n in nodes}
    size = 1024 * MiB
    with open(a / "big.bin", "wb") as f:
        for _ in range(size // (4 * MiB)):
            f.write(os.urandom(4 * MiB))   # no two blocks alike: nothing deduplicates
    assert a.sync(timeout=300).returncode == 0
    # B reads part of it, so a cache copy exists too.
    with open(nodes[1] / "big.bin", "rb") as f:
        f.read(64 * MiB)
    grown = {n.node_id: n.pack_bytes() - before[n.node_id] for n in nodes}
    assert sum(grown.values()) >= 2 * size * 0.95, grown
    os.unlink(a / "big.bin")
    try:
        wait_until(lambda: all(n.pack_bytes() - before[n.node_id] < 16 * MiB for n in nodes), 120, interval=0.5,
                   what="every node to give the deleted file's space back")
    except TimeoutError as e:
        raise AssertionError(f"{e}: {[(n.pack_bytes() - before[n.node_id]) // MiB for n in nodes]} MiB; "
                             f"collectors: {[n.status().get('gc') for n in nodes]}")


def test_status_path_and_xattrs_tell_the_truth(make_nodes):
    a, b, c = make_nodes(3, replicas=3, ack=1, extra=["--dead-after", "3600", "--heal-interval", "1", "--scrub-rate", "0"])
    files = write_set(a, 3, 2 * MiB, 100, sub="ckpt")
    assert a.sync().returncode == 0
    f0 = a / "ckpt" / "f0.bin"
    xa = lambda p, n: os.getxattr(p, f"user.modelfs.{n}").decode()
    assert xa(f0, "replicas") == "3" and xa(f0, "pending_bytes") == "0"
    assert xa(b / "ckpt" / "f0.bin", "policy") == "replicas=3,ack=1"
    v0 = int(xa(f0, "version"))
    write_file(f0, files["ckpt/f0.bin"][::-1])
    assert int(xa(b / "ckpt" / "f0.bin", "version")) > v0
    for name in ("replicas", "pending_bytes", "version"):
        with pytest.raises(OSError) as e:
            os.setxattr(f0, f"user.modelfs.{name}", b"9")
        assert e.value.errno == errno.EPERM
        assert f"user.modelfs.{name}" not in os.listxattr(f0)
    # A directory of single-copy files written on C: unreadable once C is gone.
    os.mkdir(c / "scratch")
    assert run([MODELFS_BIN, "policy", "set", c / "scratch", "--replicas", "1"]).returncode == 0
    write_file(c / "scratch" / "tmp.bin", payload(MiB, 7))
    assert a.sync().returncode == 0
    assert c.sync().returncode == 0
    c.kill9()
    wait_until(lambda: not [n for n in a.cluster_status()["nodes"] if n["id"] == c.node_id and n["up"]], 20,
               interval=0.2, what="C to show as down")
    # A file written now waits for its third copy: pending, with its age.
    write_file(a / "ckpt" / "new.bin", payload(3 * MiB, 8))
    r = run([MODELFS_BIN, "status", a.mp, "--json"])
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) == {"mount", "path"}
    rep = doc["path"]
    for key in ("path", "files", "bytes", "replicated", "pending", "underReplicated", "unreadable",
                "oldestPendingSeconds", "unansweredNodes", "list"):
        assert key in rep, key
    by = {f["path"].removeprefix(str(a.mp) + "/"): f for f in rep["list"]}
    assert set(by) == {"ckpt/f0.bin", "ckpt/f1.bin", "ckpt/f2.bin", "ckpt/new.bin", "scratch/tmp.bin"}
    # The truth, from the stores of the live nodes.
    live_blocks = [a.blocks(), b.blocks()]
    for path, f in by.items():
        assert set(f) >= {"path", "ino", "size", "version", "replicas", "wanted", "shortBytes", "state"}
    assert by["scratch/tmp.bin"]["state"] == "unreadable" and by["scratch/tmp.bin"]["replicas"] == 0, rep
    assert by["ckpt/new.bin"]["state"] == "pending" and by["ckpt/new.bin"]["pendingSeconds"] > 0
    assert by["ckpt/f1.bin"]["state"] == "under-replicated" and by["ckpt/f1.bin"]["wanted"] == 3
    held_everywhere = live_blocks[0] & live_blocks[1]
    assert by["ckpt/f1.bin"]["replicas"] == 2 and by["ckpt/f1.bin"]["shortBytes"] == by["ckpt/f1.bin"]["size"]
    assert rep["unreadable"] == {"files": 1, "bytes": MiB}
    assert rep["pending"]["files"] == 1 and rep["oldestPendingSeconds"] > 0
    assert rep["underReplicated"]["files"] == 3
    assert held_everywhere, "A and B should share the replicated blocks"
    # The xattrs say the same as status, on both live nodes.
    for node in (a, b):
        assert xa(node / "ckpt" / "f1.bin", "replicas") == "2"
        assert int(xa(node / "ckpt" / "f1.bin", "pending_bytes")) == by["ckpt/f1.bin"]["size"]
    # The human table.
    r = run([MODELFS_BIN, "status", a / "ckpt"])
    assert r.returncode == 0 and "under-replicated" in r.stdout and "pending" in r.stdout, r.stdout


def test_warm_prefetches_a_directory_into_the_cache(make_nodes):
    a, b = make_nodes(2, replicas=1, ack=1, extra=HEAL)
    files = write_set(a, 4, 3 * MiB, 120, sub="m")
    wanted = a.blocks()
    r = run([MODELFS_BIN, "warm", b / "m"], timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    # The last progress line is the whole: every block the writer holds was missing here.
    assert f"is on this node ({len(wanted)} fetched)" in r.stdout, r.stdout
    assert wanted <= pack_blocks(b.data / "cache" / "packs")
    fetched = b.cluster_status()["cacheStats"]["peerFetches"]
    read_all(b, files, "after warm")
    assert b.cluster_status()["cacheStats"]["peerFetches"] == fetched, "reads after warm went to the peers again"
    a.kill9()
    r = run([MODELFS_BIN, "verify", b / "m"])
    assert r.returncode == 1, "verify must fail while the only replicas are on a dead node"


def test_single_node_status_path_xattrs_and_verify(mnt):
    d = mnt.path("run")
    d.mkdir()
    data = payload(3 * MiB, 130)
    write_file(d / "a.bin", data)
    write_file(d / "b.bin", b"small")
    assert os.getxattr(d / "a.bin", "user.modelfs.replicas") == b"1"
    assert os.getxattr(d / "a.bin", "user.modelfs.pending_bytes") == b"0"
    assert os.getxattr(d / "a.bin", "user.modelfs.policy") == b"replicas=1,ack=1"
    r = run([MODELFS_BIN, "status", d, "--json"])
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)["path"]
    assert rep["files"] == 2 and rep["replicated"] == {"files": 2, "bytes": len(data) + 5}
    r = run([MODELFS_BIN, "verify", d])
    assert r.returncode == 0, r.stdout + r.stderr
    # A corrupt block on a single node cannot be repaired: verify says so and fails.
    mnt.stop()
    packs = sorted((mnt.data / "packs").glob("*.pack"))
    _, _, data_off, _, data = next(pack_records(packs[0]))
    with open(packs[0], "r+b") as f:
        f.seek(data_off + 1000)
        f.write(bytes(b ^ 0xFF for b in data[1000:1060]))
    mnt.start()
    r = run([MODELFS_BIN, "verify", mnt.path("run"), "--json"])
    assert r.returncode == 1, r.stdout + r.stderr
    assert json.loads(r.stdout)["corruptUnrepaired"] >= 1
