"""The network lab (issue #26): a modelfs cluster of N hosts and a 3-member etcd, every host and
every etcd member in its own network namespace, joined by one bridge, every link shaped with
`tc tbf` to a rate that is the bottleneck. Used by the lab tests (test_lab.py), the lab
benchmarks and, through scripts/lab-up.sh, lab-down.sh and lab.sh, by hand.

Layout (PREFIX defaults to "mfl", NET to "10.77"):
  bridge       PREFIX-br, address NET.255.254/16 in the root namespace (the tests' and the
               CLI's own way in: control only, e.g. etcd's status; daemons talk among hosts)
  etcd member  namespace PREFIX-eI, address NET.0.I, client port 2379, peer port 2380
  host         namespace PREFIX-hI, address NET.1.I, peer server on 7420, node id hI,
               data ROOT/hI/data, mounted at ROOT/hI/mnt
  links        a veth pair per namespace: PREFIXeI / PREFIXhI on the bridge, eth0 inside; both
               directions shaped (the host's egress inside its namespace, its ingress on the
               bridge side), so a host's link carries RATE each way.
Daemons run under `nsenter --net=/run/netns/NS` (the network namespace only), so their FUSE
mounts are in the shared mount namespace and the tests read them directly; `ip netns exec`
would give each one a mount namespace of its own.

Faults: `cut(h)` takes a host's link down (bridge side), `restore(h)` brings it back;
`cut_pair(a, b)` drops the traffic between two hosts only (an nftables set in each namespace),
`restore_pair(a, b)`; `kill9(h)` / `restart(h)`; `kill_etcd_leader()`.

Everything made is written to ROOT/lab.json as it is made (namespaces, bridge, processes with
their PIDs and command lines, mounts), so `down()` in another process (scripts/lab-down.sh)
removes exactly that: mounts, processes by PID (only while the PID still runs the recorded
command), namespaces (which takes their veth pairs and nftables with them), the bridge.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cluster import make_secret  # noqa: E402
from mfs import MODELFS_BIN, Mount, fusermount_lazy, is_mounted, pid_alive, wait_until  # noqa: E402

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
PEER_PORT = 7420


def sh(*args, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))}: rc={r.returncode} {r.stderr.strip()}")
    return r


def rate_bits(rate: str) -> int:
    """'1gbit', '500mbit', '2.5gbit', '100kbit' -> bits per second (tc's units)."""
    s = rate.strip().lower()
    for unit, mult in (("gbit", 10**9), ("mbit", 10**6), ("kbit", 10**3), ("bit", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    raise ValueError(f"link rate {rate!r}: write it as tc does, e.g. 1gbit or 500mbit")


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace").split("\0")[:-1]
    except OSError:
        return []


class LabHost(Mount):
    """A modelfs node in its own network namespace: a real mount (mfs.Mount) whose daemon runs
    under nsenter --net, so the mount itself is visible here."""

    def __init__(self, lab: "Lab", index: int, extra: list[str]):
        self.lab = lab
        self.index = index
        self.node_id = f"h{index}"
        self.ns = lab.host_ns(index)
        self.address = lab.host_addr(index)
        root = lab.root / self.node_id
        root.mkdir(parents=True, exist_ok=True)
        args = ["--secret-file", str(lab.secret), "--listen", f"{self.address}:{PEER_PORT}",
                "--advertise", f"{self.address}:{PEER_PORT}", "--node-id", self.node_id,
                "--labels", f"zone=z{(index - 1) % 3}"] + extra
        super().__init__(MODELFS_BIN, root=root, meta=lab.meta, extra_args=args)

    def mount_args(self) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.ns}"] + super().mount_args()

    def start(self, timeout: float = 30.0):
        super().start(timeout)
        self.lab.record_process(self.node_id, self.proc.pid, self.mount_args(), mount=str(self.mp))
        return self

    def status(self, timeout: float = 60) -> dict:
        """This daemon's own status, from its control socket (`modelfs status` asks every mount,
        and one cut off from etcd answers slowly). The record is written just after the mount
        goes live: a status asked at once waits for it, a few seconds at most."""
        import socket
        deadline = time.monotonic() + 10
        while True:
            found = self._status_once(timeout)
            if found is not None:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no control socket recorded for {self.mp} (pid {self.pid})")
            time.sleep(0.05)

    def _status_once(self, timeout: float) -> dict | None:
        import socket
        for rec in Path("/run/modelfs").glob("*.json"):
            try:
                r = json.loads(rec.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                continue   # another mount's record, gone (or half written) meanwhile
            if os.path.realpath(r["mountpoint"]) == os.path.realpath(self.mp) and r["pid"] == self.pid:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(timeout)
                    s.connect(r["socket"])
                    s.sendall(b"status\n")
                    data = b""
                    while not data.endswith(b"\n"):
                        chunk = s.recv(1 << 16)
                        if not chunk:
                            break
                        data += chunk
                return json.loads(data)
        return None

    def cluster_status(self) -> dict:
        s = self.status()
        assert s.get("cluster"), f"status of {self.mp} has no cluster section: {s}"
        return s["cluster"]

    def sync(self, path=None, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([self.bin, "sync", str(path or self.mp), "--timeout", str(timeout)],
                              capture_output=True, text=True, timeout=timeout + 30)

    def blocks(self) -> set[str]:
        from cluster import pack_blocks
        return pack_blocks(self.data / "packs")

    def run_in(self, *args, timeout: float = 60) -> subprocess.CompletedProcess:
        """A command in this host's network namespace (and the shared mount namespace)."""
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.ns}", *map(str, args)],
                              capture_output=True, text=True, timeout=timeout)


class Lab:
    def __init__(self, root: Path | str | None = None, prefix: str = "mfl", net: str = "10.77"):
        # A root made here goes with the lab (down() removes it, unless MODELFS_LAB_KEEP is
        # set or the teardown found problems: then it stays, with the daemons' logs).
        self.made_root = root is None
        self.root = Path(root or tempfile.mkdtemp(prefix="modelfs-lab-"))
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        self.prefix = prefix
        self.net = net
        self.bridge = f"{prefix}-br"
        self.state_path = self.root / "lab.json"
        self.hosts: dict[int, LabHost] = {}
        self.etcd: dict[int, subprocess.Popen] = {}
        self.state = {"prefix": prefix, "net": net, "bridge": None, "namespaces": [], "processes": {},
                      "link": None, "hosts": 0, "etcd": 0}
        if self.state_path.exists():   # a lab made by another process: to operate or take down
            self.state = json.loads(self.state_path.read_text())
            self.prefix, self.net, self.bridge = self.state["prefix"], self.state["net"], f"{self.state['prefix']}-br"

    # -- names ---------------------------------------------------------------------------------
    def host_ns(self, i: int) -> str: return f"{self.prefix}-h{i}"
    def etcd_ns(self, i: int) -> str: return f"{self.prefix}-e{i}"
    def host_addr(self, i: int) -> str: return f"{self.net}.1.{i}"
    def etcd_addr(self, i: int) -> str: return f"{self.net}.0.{i}"
    def switch_port(self, ns: str) -> str: return ns.replace("-", "")   # e.g. mflh3: at most 15 bytes

    @property
    def secret(self) -> Path: return self.root / "secret"

    @property
    def endpoints(self) -> str:
        return ",".join(f"{self.etcd_addr(i)}:2379" for i in range(1, self.state["etcd"] + 1))

    @property
    def meta(self) -> str: return f"etcd://{self.endpoints}/lab"

    def save(self):
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(self.state_path)

    def record_process(self, name: str, pid: int, argv: list[str], mount: str | None = None):
        self.state["processes"][name] = {"pid": pid, "argv": argv, "mount": mount}
        self.save()

    # -- the network ---------------------------------------------------------------------------
    def up(self, hosts: int, link: str = "1gbit", etcd_members: int = 3, host_args: list[str] | None = None,
           start_hosts: bool = True):
        """Makes the network, starts etcd and (with start_hosts) every host's daemon."""
        if Path(f"/sys/class/net/{self.bridge}").exists():
            raise RuntimeError(f"a lab with prefix {self.prefix} is up (bridge {self.bridge}); "
                               f"take it down first: scripts/lab-down.sh")
        rate_bits(link)
        self.state.update(link=link, hosts=hosts, etcd=etcd_members, host_args=host_args or [])
        self.save()
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        self.state["bridge"] = self.bridge
        self.save()
        sh("ip", "addr", "add", f"{self.net}.255.254/16", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for i in range(1, etcd_members + 1):
            self._add_ns(self.etcd_ns(i), self.etcd_addr(i), link)
        for i in range(1, hosts + 1):
            self._add_ns(self.host_ns(i), self.host_addr(i), link)
        make_secret(self.root, "lab-secret-" + os.urandom(8).hex())
        for i in range(1, etcd_members + 1):
            self.start_etcd(i, "new")
        wait_until(self.etcd_healthy, 60, interval=0.2, what="the lab's etcd to elect a leader")
        if start_hosts:
            for i in range(1, hosts + 1):
                self.start_host(i)
            self.wait_all_up()
        return self

    def _add_ns(self, ns: str, addr: str, link: str):
        sh("ip", "netns", "add", ns)
        self.state["namespaces"].append(ns)
        self.save()
        port = self.switch_port(ns)
        sh("ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "link", "set", port, "master", self.bridge)
        sh("ip", "link", "set", port, "up")
        sh("ip", "-n", ns, "addr", "add", f"{addr}/16", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        self.shape(ns, link)
        # The pair-cut set (empty until cut_pair): drops a listed peer's packets both ways.
        rules = ("table inet modelfs_lab {\n set cut { type ipv4_addr; }\n"
                 " chain in { type filter hook input priority 0; ip saddr @cut drop; }\n"
                 " chain out { type filter hook output priority 0; ip daddr @cut drop; }\n}\n")
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, text=True, check=True,
                       capture_output=True, timeout=30)

    def shape(self, ns: str, link: str):
        """Shapes both directions of a namespace's link to `link` (tc tbf; no netem on this kernel,
        so bandwidth only). The bucket holds 4 ms of the rate (at least 256 KiB), which lets a
        single TCP stream reach ~0.95x the rate here."""
        bits = rate_bits(link)
        burst = max(256 * 1024, bits // 8 // 250)
        for cmd in (["ip", "netns", "exec", ns, "tc"], ["tc"]):
            dev = "eth0" if len(cmd) > 1 else self.switch_port(ns)
            sh(*cmd, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", link, "burst", str(burst),
               "latency", "50ms")

    # -- etcd ----------------------------------------------------------------------------------
    def start_etcd(self, i: int, state: str = "existing"):
        ns, addr = self.etcd_ns(i), self.etcd_addr(i)
        cluster = ",".join(f"e{j}=http://{self.etcd_addr(j)}:2380" for j in range(1, self.state["etcd"] + 1))
        argv = ["nsenter", f"--net=/run/netns/{ns}", ETCD, "--name", f"e{i}", "--data-dir", str(self.root / f"etcd-e{i}"),
                "--listen-client-urls", f"http://{addr}:2379", "--advertise-client-urls", f"http://{addr}:2379",
                "--listen-peer-urls", f"http://{addr}:2380", "--initial-advertise-peer-urls", f"http://{addr}:2380",
                "--initial-cluster", cluster, "--initial-cluster-state", state,
                "--initial-cluster-token", f"modelfs-lab-{self.prefix}", "--pre-vote", "--logger", "zap",
                "--auto-compaction-mode", "revision", "--auto-compaction-retention", "10000",
                "--quota-backend-bytes", str(8 << 30)]
        log = open(self.root / f"etcd-e{i}.log", "ab")
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.etcd[i] = p
        self.record_process(f"e{i}", p.pid, argv)

    def etcd_call(self, i: int, path: str, body: dict, timeout: float = 2) -> dict | None:
        req = urllib.request.Request(f"http://{self.etcd_addr(i)}:2379{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None

    def etcd_healthy(self) -> bool:
        live = [i for i in range(1, self.state["etcd"] + 1) if self.etcd_alive(i)]
        return bool(live) and all(self.etcd_call(i, "/v3/kv/range", {"key": "aGVhbHRo"}) is not None for i in live)

    def etcd_alive(self, i: int) -> bool:
        p = self.state["processes"].get(f"e{i}")
        return bool(p) and self._runs(p)

    def etcd_leader(self) -> int | None:
        """The member that leads now (by etcd's own status), or None."""
        ids = {}
        leader = None
        for i in range(1, self.state["etcd"] + 1):
            if not self.etcd_alive(i):
                continue
            s = self.etcd_call(i, "/v3/maintenance/status", {})
            if s:
                ids[s["header"]["member_id"]] = i
                leader = s.get("leader")
        return ids.get(leader)

    def kill_etcd_leader(self) -> int:
        i = wait_until(self.etcd_leader, 30, interval=0.1, what="an etcd leader")
        self.kill_process(f"e{i}")
        return i

    def etcd_metrics(self, i: int) -> str:
        with urllib.request.urlopen(f"http://{self.etcd_addr(i)}:2379/metrics", timeout=5) as r:
            return r.read().decode()

    def etcd_served(self) -> tuple[float, float, float]:
        """Requests the live etcd members have handled, bytes they have sent to clients and
        received from them so far, from their own metrics (the JSON gateway's calls are counted
        as the gRPC calls they become)."""
        reqs = sent = received = 0.0
        for i in range(1, self.state["etcd"] + 1):
            if not self.etcd_alive(i):
                continue
            for line in self.etcd_metrics(i).splitlines():
                value = line.rsplit(" ", 1)[-1]
                if line.startswith("grpc_server_handled_total{"):
                    reqs += float(value)
                elif line.startswith("etcd_network_client_grpc_sent_bytes_total"):
                    sent += float(value)
                elif line.startswith("etcd_network_client_grpc_received_bytes_total"):
                    received += float(value)
        return reqs, sent, received

    # -- hosts ---------------------------------------------------------------------------------
    def start_host(self, i: int, extra: list[str] | None = None) -> LabHost:
        h = self.hosts.get(i)
        if h is None:
            h = LabHost(self, i, list(self.state.get("host_args", [])) + (extra or []))
            self.hosts[i] = h
        h.start()
        return h

    def wait_all_up(self, timeout: float = 60):
        hosts = list(self.hosts.values())
        wait_until(lambda: all(sum(n["up"] for n in h.cluster_status()["nodes"]) >= len(hosts) for h in hosts),
                   timeout, interval=0.2, what="every host to see the others")

    def host(self, i: int) -> LabHost: return self.hosts[i]

    def kill9(self, i: int):
        self.hosts[i].kill9()

    def restart(self, i: int):
        self.hosts[i].start()

    # -- faults --------------------------------------------------------------------------------
    def _ns_of(self, who: str) -> str:
        return f"{self.prefix}-{who}"    # "h3" -> mfl-h3, "e1" -> mfl-e1

    def cut(self, who: str):
        """Takes `who`'s link down at the switch: nothing reaches it or leaves it."""
        sh("ip", "link", "set", self.switch_port(self._ns_of(who)), "down")

    def restore(self, who: str):
        sh("ip", "link", "set", self.switch_port(self._ns_of(who)), "up")

    def _addr_of(self, who: str) -> str:
        kind, i = who[0], int(who[1:])
        return self.host_addr(i) if kind == "h" else self.etcd_addr(i)

    def cut_pair(self, a: str, b: str):
        """Drops the traffic between a and b only (silently, both ways); the rest still flows."""
        for x, y in ((a, b), (b, a)):
            sh("ip", "netns", "exec", self._ns_of(x), "nft", "add", "element", "inet", "modelfs_lab", "cut",
               f"{{ {self._addr_of(y)} }}")

    def restore_pair(self, a: str, b: str):
        for x, y in ((a, b), (b, a)):
            sh("ip", "netns", "exec", self._ns_of(x), "nft", "delete", "element", "inet", "modelfs_lab", "cut",
               f"{{ {self._addr_of(y)} }}", check=False)

    # -- processes -----------------------------------------------------------------------------
    @staticmethod
    def _runs(p: dict) -> bool:
        """The recorded process still runs the recorded command (a reused PID is someone else's)."""
        if not pid_alive(p["pid"]):
            return False
        now = cmdline(p["pid"])
        argv = p["argv"]
        # nsenter execs its command: the PID then runs argv after nsenter's own two words.
        return now in (argv, argv[2:])

    def kill_process(self, name: str, sig=signal.SIGKILL):
        p = self.state["processes"].get(name)
        if p and self._runs(p):
            os.kill(p["pid"], sig)
            proc = self.etcd.get(int(name[1:])) if name.startswith("e") else None
            if proc:
                proc.wait(timeout=30)   # reap it: a zombie would still look alive
            wait_until(lambda: not pid_alive(p["pid"]), 30, what=f"{name} (pid {p['pid']}) to exit")

    # -- teardown ------------------------------------------------------------------------------
    def down(self):
        """Removes exactly what was made: mounts, processes by PID, namespaces, the bridge."""
        problems = []
        for h in list(self.hosts.values()):
            try:
                h.destroy()
            except AssertionError as e:
                problems.append(f"{h.node_id}: {e}")
        for name, p in self.state["processes"].items():
            if p.get("mount") and is_mounted(p["mount"], None):
                bin_ = MODELFS_BIN if os.path.exists(MODELFS_BIN) else "modelfs"
                subprocess.run([bin_, "umount", "--force", p["mount"]], capture_output=True, timeout=60)
                if is_mounted(p["mount"], None):
                    fusermount_lazy(p["mount"])
            if self._runs(p):
                os.kill(p["pid"], signal.SIGTERM)
                try:
                    wait_until(lambda: not pid_alive(p["pid"]), 20, what=f"{name} to exit")
                except TimeoutError:
                    os.kill(p["pid"], signal.SIGKILL)
        for proc in self.etcd.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        for ns in self.state["namespaces"]:
            sh("ip", "netns", "del", ns, check=False)
        if self.state.get("bridge"):
            sh("ip", "link", "del", self.state["bridge"], check=False)
        self.state_path.unlink(missing_ok=True)
        if problems:
            raise AssertionError("lab teardown: " + "; ".join(problems) + f" (logs in {self.root})")
        if self.made_root and not os.environ.get("MODELFS_LAB_KEEP"):
            shutil.rmtree(self.root, ignore_errors=True)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="lab", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default=os.environ.get("MODELFS_LAB_DIR", "/tmp/modelfs-lab"))
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="make the lab and start etcd and N hosts")
    up.add_argument("hosts", type=int)
    up.add_argument("--link", default="1gbit", help="every link's rate, as tc writes it (default 1gbit)")
    up.add_argument("--prefix", default="mfl")
    up.add_argument("--net", default="10.77", help="first two octets of the lab's /16 (default 10.77)")
    up.add_argument("node_args", nargs=argparse.REMAINDER, help="after --: flags for every modelfs node")
    sub.add_parser("down", help="remove everything the lab made")
    sub.add_parser("show", help="the lab's hosts, addresses and processes")
    for name, help_ in (("cut", "take a host's (hN) or etcd member's (eN) link down"),
                        ("restore", "bring it back up"), ("kill", "kill -9 a host or etcd member"),
                        ("restart", "start a killed host or etcd member again")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("who")
    for name in ("cut-pair", "restore-pair"):
        p = sub.add_parser(name, help="drop (or let through) the traffic between two hosts only")
        p.add_argument("a")
        p.add_argument("b")
    sub.add_parser("kill-etcd-leader", help="kill -9 the etcd member that leads now")
    a = ap.parse_args(argv)
    root = Path(a.dir)
    if a.cmd == "up":
        if (root / "lab.json").exists():
            print(f"lab: a lab is recorded in {root}; take it down first (scripts/lab-down.sh)", file=sys.stderr)
            return 1
        lab = Lab(root, prefix=a.prefix, net=a.net)
        extra = [x for x in a.node_args if x != "--"]
        try:
            lab.up(a.hosts, link=a.link, host_args=extra)
        except BaseException:
            lab.down()
            raise
        show(lab)
        return 0
    if not (root / "lab.json").exists():
        print(f"lab: no lab recorded in {root}", file=sys.stderr)
        return 1 if a.cmd != "down" else 0
    lab = Lab(root)
    if a.cmd == "down":
        lab.down()
        print(f"lab: {root} taken down")
    elif a.cmd == "show":
        show(lab)
    elif a.cmd == "cut":
        lab.cut(a.who)
    elif a.cmd == "restore":
        lab.restore(a.who)
    elif a.cmd == "cut-pair":
        lab.cut_pair(a.a, a.b)
    elif a.cmd == "restore-pair":
        lab.restore_pair(a.a, a.b)
    elif a.cmd == "kill":
        lab.kill_process(a.who)
        p = lab.state["processes"].get(a.who, {})
        if p.get("mount") and is_mounted(p["mount"], None):
            fusermount_lazy(p["mount"])
    elif a.cmd == "restart":
        p = lab.state["processes"].get(a.who)
        if not p:
            print(f"lab: no process {a.who}", file=sys.stderr)
            return 1
        if lab._runs(p):
            print(f"lab: {a.who} is running (pid {p['pid']})", file=sys.stderr)
            return 1
        log = open(root / (a.who + ".restart.log") if not p.get("mount") else Path(p["mount"]).parent / "modelfs.log", "ab")
        proc = subprocess.Popen(p["argv"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        lab.record_process(a.who, proc.pid, p["argv"], mount=p.get("mount"))
        if p.get("mount"):
            wait_until(lambda: is_mounted(p["mount"]), 30, what=f"{a.who} to mount")
    elif a.cmd == "kill-etcd-leader":
        print(f"killed e{lab.kill_etcd_leader()}")
    return 0


def show(lab: Lab):
    s = lab.state
    print(f"lab:    {lab.root} (links {s['link']} each way, bridge {lab.bridge}, {lab.net}.0.0/16)")
    print(f"meta:   {lab.meta}")
    print(f"secret: {lab.secret}")
    for name, p in sorted(s["processes"].items()):
        where = f"mounted at {p['mount']}" if p.get("mount") else "etcd member"
        addr = lab._addr_of(name)
        print(f"{name:6s}  {addr:12s} pid {p['pid']:<8d} {'up' if lab._runs(p) else 'down':4s} {where}")
    print("faults: scripts/lab.sh cut|restore hN, cut-pair|restore-pair hA hB, kill|restart hN, kill-etcd-leader")
    print("down:   scripts/lab-down.sh")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
