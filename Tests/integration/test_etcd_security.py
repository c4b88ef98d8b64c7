"""etcd over TLS with client certificates and etcd's own users (issue #29): an etcd member the
test starts with certificates it makes (openssl), auth enabled; two nodes write and read through
it; a node without the CA, without a client certificate, with a CA that did not sign the member,
without a user or with a wrong password is refused with one clear line."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

from cluster import ETCD, Node, free_port, make_ca, make_cert, make_secret
from mfs import MODELFS_BIN, MiB, assert_bytes_equal, read_file, run, wait_until, write_file
from test_errors import expect_cli_error


class SecureEtcd:
    """One etcd member: clients over TLS with client certificates, auth on, a user for modelfs
    with read-write on /modelfs/ only."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="modelfs-etcd-tls-"))
        self.pki = self.root / "pki"
        self.pki.mkdir()
        make_ca(self.pki, "ca")
        make_ca(self.pki, "rogue")
        make_cert(self.pki, "ca", "server", "/CN=server", san="IP:127.0.0.1,DNS:localhost")
        # etcd's JSON gateway refuses a client certificate with a CommonName while auth is on:
        # the nodes' have none (their subject is an organisation).
        make_cert(self.pki, "ca", "node", "/O=modelfs/OU=node")
        make_cert(self.pki, "ca", "named", "/CN=named")
        make_cert(self.pki, "rogue", "stranger", "/O=modelfs/OU=stranger")
        self.port, peer = free_port(), free_port()
        args = [ETCD, "--name", "s0", "--data-dir", str(self.root / "s0"),
                "--listen-client-urls", f"https://127.0.0.1:{self.port}",
                "--advertise-client-urls", f"https://127.0.0.1:{self.port}",
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", f"s0=http://127.0.0.1:{peer}",
                "--cert-file", str(self.pki / "server.pem"), "--key-file", str(self.pki / "server.key"),
                "--trusted-ca-file", str(self.pki / "ca.pem"), "--client-cert-auth", "--logger", "zap"]
        self.log = open(self.root / "etcd.log", "ab")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_until(lambda: self.ctl("endpoint", "health", check=False).returncode == 0, 30, interval=0.2,
                   what="the TLS etcd member to answer")
        self.ctl("user", "add", "root:root-password")
        self.ctl("user", "add", "modelfs:modelfs-password")
        self.ctl("role", "add", "modelfs-rw")
        self.ctl("role", "grant-permission", "modelfs-rw", "--prefix=true", "readwrite", "/modelfs/")
        self.ctl("user", "grant-role", "modelfs", "modelfs-rw")
        self.ctl("auth", "enable")
        self.password = self.root / "password"
        self.password.write_text("modelfs-password\n")
        self.password.chmod(0o600)

    def ctl(self, *args, check: bool = True) -> subprocess.CompletedProcess:
        user = ["--user", "root:root-password"] if args[:2] != ("endpoint", "health") and args[:1] != ("user",) \
            and args[:1] != ("role",) and args[:2] != ("auth", "enable") else []
        r = subprocess.run(["etcdctl", "--endpoints", f"https://127.0.0.1:{self.port}",
                            "--cacert", str(self.pki / "ca.pem"), "--cert", str(self.pki / "node.pem"),
                            "--key", str(self.pki / "node.key"), *user, *args],
                           capture_output=True, text=True, timeout=30, env=dict(os.environ, ETCDCTL_API="3"))
        if check:
            assert r.returncode == 0, f"etcdctl {' '.join(args)}: {r.stderr}"
        return r

    def url(self, name: str) -> str:
        return f"etcd://127.0.0.1:{self.port}/{name}"

    def flags(self, ca: str = "ca", cert: str | None = "node", user: str | None = "modelfs", password: Path | None = None):
        f = ["--etcd-ca", str(self.pki / f"{ca}.pem")] if ca else []
        if cert:
            f += ["--etcd-cert", str(self.pki / f"{cert}.pem"), "--etcd-key", str(self.pki / f"{cert}.key")]
        if user:
            f += ["--etcd-user", user, "--etcd-password-file", str(password or self.password)]
        return f

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def secure_etcd():
    e = SecureEtcd()
    yield e
    e.stop()


def test_nodes_write_and_read_through_a_tls_etcd_with_users(secure_etcd, tmp_path):
    name = "tls" + uuid.uuid4().hex[:8]
    secret = make_secret(tmp_path)
    nodes = [Node(secure_etcd, name, f"{name}-n{i}", secret, replicas=2, ack=2, extra=secure_etcd.flags())
             for i in range(2)]
    try:
        for n in nodes:
            n.start()
        a, b = nodes
        wait_until(lambda: len(b.cluster_status()["nodes"]) == 2, 20, interval=0.1, what="both nodes to see each other")
        data = os.urandom(6 * MiB + 3)
        write_file(a / "model.bin", data)
        wait_until(lambda: (b / "model.bin").exists(), 10, what="the file on the other node")
        assert_bytes_equal(read_file(b / "model.bin"), data)
        # The keys are in etcd, under this cluster's prefix, readable only with a user.
        r = secure_etcd.ctl("get", "--prefix", "--keys-only", f"/modelfs/{name}/")
        assert f"/modelfs/{name}/" in r.stdout
    finally:
        for n in nodes:
            n.destroy()


@pytest.mark.parametrize("case,phrase", [
    ("no CA", r"give its CA with --etcd-ca"),
    ("no client certificate", r"it asks for a client certificate, give one with --etcd-cert and --etcd-key"),
    ("another CA", r"TLS handshake failed: check --etcd-ca|check --etcd-ca, --etcd-cert and --etcd-key"),
    ("no user", r"etcd has users: give one with --etcd-user"),
    ("wrong password", r"check --etcd-user, --etcd-password-file"),
    ("a certificate with a CN", r"refuses a client certificate with a CommonName while auth is on"),
])
def test_a_node_etcd_does_not_take_is_refused_with_one_line(secure_etcd, tmp_path, case, phrase):
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n")
    wrong.chmod(0o600)
    flags = {
        "no CA": secure_etcd.flags(ca=None, cert=None),
        "no client certificate": secure_etcd.flags(cert=None),
        "another CA": secure_etcd.flags(ca="rogue", cert="stranger"),
        "no user": secure_etcd.flags(user=None),
        "wrong password": secure_etcd.flags(password=wrong),
        "a certificate with a CN": secure_etcd.flags(cert="named"),
    }[case]
    mp = tmp_path / "mnt"
    mp.mkdir()
    secret = make_secret(tmp_path)
    line = expect_cli_error([MODELFS_BIN, "mount", str(mp), "--data", str(tmp_path / "data"),
                             "--meta", secure_etcd.url("refused"), "--secret-file", str(secret),
                             "--listen", "127.0.0.1:0", *flags], phrase, timeout=90)
    assert "not-the-password" not in line and "modelfs-password" not in line


def test_etcd_flags_are_checked(tmp_path, secure_etcd):
    mp = tmp_path / "mnt"
    mp.mkdir()
    secret = make_secret(tmp_path)
    base = [MODELFS_BIN, "mount", str(mp), "--data", str(tmp_path / "d"), "--meta", secure_etcd.url("x"),
            "--secret-file", str(secret), "--listen", "127.0.0.1:0"]
    expect_cli_error(base + ["--etcd-cert", str(secure_etcd.pki / "node.pem")], r"--etcd-cert and --etcd-key go together")
    expect_cli_error(base + ["--etcd-user", "modelfs"], r"--etcd-user and --etcd-password-file go together")
    loose = tmp_path / "pw"
    loose.write_text("modelfs-password\n")
    loose.chmod(0o644)
    expect_cli_error(base + ["--etcd-user", "modelfs", "--etcd-password-file", str(loose)],
                     r"--etcd-password-file .* is open to other users")
    expect_cli_error(base + ["--etcd-ca", str(tmp_path / "none.pem")], r"--etcd-ca .*none\.pem: cannot read it")
