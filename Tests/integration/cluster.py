"""Loopback clusters for the integration suite: a real etcd (Debian's etcd-server) started and
stopped by PID, and modelfs nodes as real mounts (mfs.Mount) with --meta etcd://..."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from mfs import MODELFS_BIN, Mount, pack_records, wait_until

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def distinct_ports(n: int) -> list[tuple[int, int]]:
    """n pairs of free loopback ports, no port twice."""
    seen: set[int] = set()
    while len(seen) < 2 * n:
        seen.add(free_port())
    ports = list(seen)
    return [(ports[2 * i], ports[2 * i + 1]) for i in range(n)]


class EtcdCluster:
    """N etcd members on loopback ports; data in a temp dir; stopped by PID."""

    def __init__(self, members: int = 3):
        self.root = Path(tempfile.mkdtemp(prefix="modelfs-etcd-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
        # A port picked free can be taken before a member binds it (or picked twice: each pick
        # lets its port go): a member that cannot bind exits, and the others never elect a
        # leader (a CI setup once timed out so). Such a start is stopped and made again on new
        # ports, with the member's log line that says why.
        for attempt in range(3):
            self.members = [{"name": f"m{i}", "client": p[0], "peer": p[1], "proc": None}
                            for i, p in enumerate(distinct_ports(members))]
            self.token = f"t{os.getpid()}-{self.members[0]['client']}-{attempt}"
            for i in range(members):
                self.start(i, "new")
            exited = lambda: [m for m in self.members if m["proc"] is not None and m["proc"].poll() is not None]  # noqa: E731
            try:
                wait_until(lambda: self.healthy() or exited(), 30, interval=0.1, what="etcd to elect a leader or a member to exit")
            except TimeoutError:
                pass
            if not exited() and self.healthy():
                return
            why = [f"{m['name']}: {self.log_tail(m)}" for m in (exited() or self.members)]
            self.stop(remove=False)
            if attempt == 2:
                raise AssertionError(f"etcd did not start three times (a member exited or no leader in 30 s); last: {why}")
            print(f"etcd start {attempt + 1} failed ({why}); again on new ports")

    @property
    def endpoints(self) -> str:
        return ",".join(f"127.0.0.1:{m['client']}" for m in self.members)

    def url(self, name: str) -> str:
        return f"etcd://{self.endpoints}/{name}"

    def start(self, i: int, state: str = "existing"):
        m = self.members[i]
        cluster = ",".join(f"{x['name']}=http://127.0.0.1:{x['peer']}" for x in self.members)
        args = [ETCD, "--name", m["name"], "--data-dir", str(self.root / m["name"]),
                "--listen-client-urls", f"http://127.0.0.1:{m['client']}",
                "--advertise-client-urls", f"http://127.0.0.1:{m['client']}",
                "--listen-peer-urls", f"http://127.0.0.1:{m['peer']}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{m['peer']}",
                "--initial-cluster", cluster, "--initial-cluster-state", state,
                "--initial-cluster-token", self.token, "--pre-vote", "--logger", "zap",
                "--auto-compaction-mode", "revision", "--auto-compaction-retention", "10000"]
        log = open(self.root / f"{m['name']}.log", "ab")
        m["proc"] = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def kill(self, i: int):
        p = self.members[i]["proc"]
        if p and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(timeout=30)
        self.members[i]["proc"] = None

    def _answers(self, port: int) -> bool:
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v3/kv/range", data=b'{"key":"aGVhbHRo"}',
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def healthy(self) -> bool:
        return all(m["proc"] is None or self._answers(m["client"]) for m in self.members)

    def log_tail(self, m) -> str:
        try:
            return (self.root / f"{m['name']}.log").read_text(errors="replace").strip().splitlines()[-1][-300:]
        except (OSError, IndexError):
            return "(no log)"

    def stop(self, remove: bool = True):
        for m in self.members:
            p = m["proc"]
            if p and p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=20)
            m["proc"] = None
        if remove:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            for m in self.members:
                shutil.rmtree(self.root / m["name"], ignore_errors=True)


class Node(Mount):
    """A modelfs cluster node: a real mount with --meta etcd://..., its own data dir."""

    def __init__(self, etcd: EtcdCluster, cluster: str, node_id: str, secret_file: Path,
                 replicas: int = 3, ack: int = 1, extra: list[str] | None = None, root: Path | None = None,
                 lease_ttl: int = 3):
        args = ["--secret-file", str(secret_file), "--listen", "127.0.0.1:0", "--node-id", node_id,
                "--replicas", str(replicas), "--ack", str(ack), "--lease-ttl", str(lease_ttl), "--ack-timeout", "30"]
        if root is not None:
            Path(root).mkdir(parents=True, exist_ok=True)
        super().__init__(MODELFS_BIN, root=root, meta=etcd.url(cluster), extra_args=args + (extra or []))
        self.node_id = node_id

    def cluster_status(self) -> dict:
        s = self.status()
        assert s.get("cluster"), f"status of {self.mp} has no cluster section: {s}"
        return s["cluster"]

    @property
    def peer_address(self) -> str:
        return self.cluster_status()["address"]

    def blocks(self) -> set[str]:
        """Block ids in this node's replica packs (not its cache), read from disk."""
        return pack_blocks(self.data / "packs")

    def pack_bytes(self) -> int:
        """Bytes this node's replica and cache packs take on disk."""
        total = 0
        for d in ("packs", "cache/packs"):
            for p in (self.data / d).glob("*.pack"):
                try:
                    total += p.stat().st_blocks * 512
                except FileNotFoundError:   # an emptied pack deleted as we look
                    pass
        return total

    def sync(self, path=None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([self.bin, "sync", str(path or self.mp), "--timeout", str(timeout)],
                              capture_output=True, text=True, timeout=timeout + 30)


def pack_blocks(packs: Path) -> set[str]:
    """Ids of live records in pack files (mfs.pack_records), each checked against its bytes."""
    out = set()
    for pack in sorted(packs.glob("*.pack")):
        for magic, ident, _, _, data in pack_records(pack):
            if magic in (b"MFB1", b"MFB2"):
                assert hashlib.sha256(data).hexdigest() == ident, f"bad record in {pack}"
                out.add(ident)
    return out


def make_secret(root: Path, text: str = "loopback-cluster-secret") -> Path:
    p = root / "secret"
    p.write_text(text + "\n")
    p.chmod(0o600)
    return p


def openssl(*args, cwd: Path):
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"openssl {' '.join(args)}: {r.stderr}"


def make_ca(d: Path, name: str):
    """d/NAME.pem and d/NAME.key: a self-signed CA, good for two days."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem",
            "-days", "2", "-subj", f"/CN={name}", cwd=d)


def make_cert(d: Path, ca: str, name: str, subject: str, san: str | None = None, days: int = 2):
    """d/NAME.pem and d/NAME.key (mode 600): a certificate for `subject` signed by CA d/CA.pem,
    for servers and clients both; `days` < 0 makes it already expired."""
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", subject, cwd=d)
    ext = d / f"{name}.ext"
    ext.write_text("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                   "extendedKeyUsage=serverAuth,clientAuth\n" + (f"subjectAltName={san}\n" if san else ""))
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", str(days), "-extfile", ext.name, cwd=d)
    (d / f"{name}.key").chmod(0o600)


def peer_request(address: str, method: str, path: str, secret: str | None, body: bytes | None = None):
    """(status, body) of a raw request to a node's peer server."""
    req = urllib.request.Request(f"http://{address}{path}", data=body, method=method)
    if secret is not None:
        req.add_header("Authorization", f"Bearer {secret}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
