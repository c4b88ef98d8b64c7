"""Mutual TLS between nodes (issue #29): a cluster whose nodes hold certificates of the cluster's
CA writes on one node and reads on another over TLS; a peer without a certificate, with one of
another CA, an expired one or one for another cluster is refused, with a line in the log of the
side that refused and of the side that was refused."""
from __future__ import annotations

import os
import socket
import ssl
import tempfile
import uuid
from pathlib import Path

import pytest

from cluster import EtcdCluster, Node, make_ca, make_cert, make_secret
from mfs import MODELFS_BIN, MiB, assert_bytes_equal, read_file, wait_until, write_file
from test_errors import expect_cli_error


class PKI:
    """A cluster CA and the certificates the tests need, made with openssl."""

    def __init__(self, root: Path, cluster: str):
        self.d = root / "pki"
        self.d.mkdir()
        self.cluster = cluster
        for ca in ("ca", "rogue"):
            make_ca(self.d, ca)

    def cert(self, name: str, ca: str = "ca", org: str | None = None, days: int = 2) -> tuple[Path, Path]:
        make_cert(self.d, ca, name, f"/O={org or self.cluster}/CN={name}", days=days)
        return self.d / f"{name}.pem", self.d / f"{name}.key"

    def flags(self, name: str, ca: str = "ca", **kw) -> list[str]:
        cert, key = self.cert(name, ca=ca, **kw)
        return ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(self.d / f"{ca}.pem")]


@pytest.fixture(scope="module")
def etcd():
    c = EtcdCluster(1)
    yield c
    c.stop()


@pytest.fixture
def tls_cluster(etcd):
    root = Path(tempfile.mkdtemp(prefix="modelfs-tls-"))
    name = "tls" + uuid.uuid4().hex[:8]
    pki = PKI(root, name)
    secret = make_secret(root)
    made: list[Node] = []

    def make(node: str, flags: list[str], **kw) -> Node:
        n = Node(etcd, name, f"{name}-{node}", secret, extra=flags + ["--ack-timeout", "8"], **kw)
        made.append(n)
        n.start()
        return n

    make.pki, make.name, make.secret = pki, name, secret
    yield make
    for n in made:
        n.destroy()
    import shutil
    shutil.rmtree(root, ignore_errors=True)


def https_status(address: str, secret: str, ca: Path, cert: tuple[Path, Path] | None) -> str:
    """What a raw TLS client gets for GET /v1/status: 'HTTP 200', or how the server refused it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(str(ca))
    if cert:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    host, port = address.rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=10) as raw, ctx.wrap_socket(raw) as s:
            s.sendall(f"GET /v1/status HTTP/1.1\r\nAuthorization: Bearer {secret}\r\nConnection: close\r\n\r\n".encode())
            data = s.recv(200)
            return " ".join(data.split(b"\r\n")[0].decode().replace("HTTP/1.1", "HTTP").split()[:2]) if data else "closed"
    except (ssl.SSLError, ConnectionError, OSError) as e:
        return f"refused: {e}"


def test_a_tls_cluster_writes_on_one_node_and_reads_on_another(tls_cluster):
    pki = tls_cluster.pki
    a = tls_cluster("a", pki.flags("a"), replicas=2, ack=2)
    b = tls_cluster("b", pki.flags("b"), replicas=2, ack=2)
    wait_until(lambda: all(len(n.cluster_status()["nodes"]) == 2 for n in (a, b)), 20, interval=0.1,
               what="both nodes to see each other")
    data = os.urandom(9 * MiB + 5)
    write_file(a / "model.bin", data)   # ack=2: close() returned once b held every block, over TLS
    assert b.blocks(), "no block reached b"
    assert_bytes_equal(read_file(b / "model.bin"), data)
    assert "mutual TLS" in a.cluster_status()["peerTraffic"]
    assert "peer traffic: mutual TLS" in a.log_tail()
    # Plain HTTP to a TLS peer port gets nothing.
    secret = tls_cluster.secret.read_text().strip()
    assert https_status(a.peer_address, secret, pki.d / "ca.pem", pki.cert("probe")) == "HTTP 200"


@pytest.mark.parametrize("case,why", [
    ("no certificate", "certificate"),
    ("another CA", "certificate"),
    ("expired", "certificate"),
    ("another cluster", "for cluster"),
])
def test_peers_the_cluster_does_not_know_are_refused(tls_cluster, case, why):
    pki = tls_cluster.pki
    a = tls_cluster("a", pki.flags("a"), replicas=1, ack=1)
    secret = tls_cluster.secret.read_text().strip()
    cert = {
        "no certificate": None,
        "another CA": pki.cert("stranger", ca="rogue"),
        "expired": pki.cert("old", days=-1),
        "another cluster": pki.cert("neighbour", org="other-cluster"),
    }[case]
    got = https_status(a.peer_address, secret, pki.d / "ca.pem", cert)
    assert got != "HTTP 200", f"{case}: the peer server answered"
    wait_until(lambda: "peer server: refused a connection from 127.0.0.1:" in a.log_tail(), 10,
               what=f"a's log to say it refused ({case})")
    line = [ln for ln in a.log_tail().splitlines() if "refused a connection" in ln][-1]
    assert why in line, line


def test_a_node_of_another_ca_cannot_replicate_and_both_sides_say_why(tls_cluster):
    pki = tls_cluster.pki
    a = tls_cluster("a", pki.flags("a"), replicas=2, ack=1)
    # c's certificate is valid for its own CA, which a does not trust (and c does not trust a's).
    c = tls_cluster("c", pki.flags("c", ca="rogue"), replicas=2, ack=2)
    wait_until(lambda: len(c.cluster_status()["nodes"]) == 2, 20, interval=0.1, what="c to see a in etcd")
    with pytest.raises(OSError):
        write_file(c / "f.bin", os.urandom(2 * MiB))   # ack=2: no copy can reach a
    wait_until(lambda: "cannot reach peer" in c.log_tail() and "over TLS" in c.log_tail(), 20,
               what="c's log to say it could not reach a over TLS")
    wait_until(lambda: "peer server: refused a connection" in a.log_tail(), 20, what="a's log to say it refused c")


def test_tls_flags_are_checked(tmp_path, etcd):
    pki = PKI(tmp_path, "flags")
    mp = tmp_path / "mnt"
    mp.mkdir()
    secret = make_secret(tmp_path)
    base = [MODELFS_BIN, "mount", str(mp), "--data", str(tmp_path / "d"), "--meta", etcd.url("flags"),
            "--secret-file", str(secret), "--listen", "127.0.0.1:0"]
    cert, key = pki.cert("n1")
    expect_cli_error(base + ["--tls-cert", str(cert)], r"--tls-cert, --tls-key and --tls-ca go together")
    key.chmod(0o644)
    expect_cli_error(base + ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-ca", str(pki.d / "ca.pem")],
                     r"--tls-key .* is open to other users")
    key.chmod(0o600)
    other, other_key = pki.cert("n2", org="elsewhere")
    expect_cli_error(base + ["--tls-cert", str(other), "--tls-key", str(other_key), "--tls-ca", str(pki.d / "ca.pem")],
                     r'is for cluster "elsewhere" \(its subject.s O\), this node joins "flags"')
    old, old_key = pki.cert("n3", days=-1)
    expect_cli_error(base + ["--tls-cert", str(old), "--tls-key", str(old_key), "--tls-ca", str(pki.d / "ca.pem")],
                     r"has expired")
