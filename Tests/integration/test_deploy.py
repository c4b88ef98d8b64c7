"""Deployability (issue #29): a config file and `modelfs config check`, mount(8) and /etc/fstab,
the systemd unit and its readiness protocol, log levels and rotation, secret-file permissions,
JSON output, completions, the manual and scripts/install.sh."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from mfs import MODELFS_BIN, REPO, MiB, assert_bytes_equal, is_mounted, read_file, run, wait_pid_exit, write_file
from test_errors import expect_cli_error, scratch  # noqa: F401 (a fixture)

GiB = 1 << 30


def umount_and_wait(mp: Path, data: Path):
    pid = int((data / "modelfs.pid").read_text().strip())
    r = run([MODELFS_BIN, "umount", str(mp)], timeout=120)
    assert r.returncode == 0, r.stderr
    assert wait_pid_exit(pid, 30), f"daemon {pid} still alive after umount"
    assert not is_mounted(mp, None)


def private(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


# ---------------------------------------------------------------------------
# the config file
# ---------------------------------------------------------------------------

def test_a_config_file_sets_the_flags_and_the_command_line_wins(mount_factory, tmp_path):
    cfg = tmp_path / "node.yaml"
    cfg.write_text("# a single node\nflat-size: 1G\nlog_level: warning\noptions: [allow_other]\n")
    m = mount_factory(extra_args=["--config", str(cfg), "--flat-size", "2G"])
    payload = os.urandom(3 * MiB)
    write_file(m / "a.bin", payload)
    assert_bytes_equal(read_file(m / "a.bin"), payload)
    # --flat-size on the command line beat the file's; the file's log level held.
    assert m.status()["passthrough"]["flatBudget"] == 2 * GiB
    m.unmount()
    log = m.log_path.read_text()
    assert " info mounted " not in log, "log-level: warning from the config file was not applied"


def test_config_check_explains_each_problem_with_its_line(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("0123456789abcdef\n")
    secret.chmod(0o644)
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("meta: etcd://127.0.0.1:2379/x\n"
                   "replicaz: 2\n"
                   f"secret-file: {secret}\n"
                   "ack: many\n")
    r = run([MODELFS_BIN, "config", "check", str(cfg)])
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert any(re.search(rf"{cfg}:2: unknown key replicaz \(did you mean replicas\?\)", ln) for ln in lines), lines
    assert any(re.search(rf"{cfg}:4: ack: .*many", ln) for ln in lines), lines
    # With the keys fixed, the checks of `modelfs mount` itself, pinned to their lines.
    cfg.write_text("meta: etcd://127.0.0.1:2379/x\n"
                   "replicas: 2\n"
                   f"secret-file: {secret}\n"
                   "ack: 3\n"
                   "advertise: 127.0.0.1:7420\n")
    r = run([MODELFS_BIN, "config", "check", str(cfg)])
    assert r.returncode == 1
    assert re.search(rf"{cfg}:3: --secret-file {secret} is open to other users \(mode 644\); make it private with: chmod 600",
                     r.stderr), r.stderr
    secret.chmod(0o600)
    r = run([MODELFS_BIN, "config", "check", str(cfg)])
    assert r.returncode == 1 and re.search(rf"{cfg}:2: --replicas 2 --ack 3: need 1 <= ack <= replicas", r.stderr), r.stderr
    cfg.write_text(cfg.read_text().replace("ack: 3", "ack: 2"))
    r = run([MODELFS_BIN, "config", "check", str(cfg)])
    assert r.returncode == 0, r.stderr
    assert "--replicas 2" in r.stdout and f"--secret-file {secret}" in r.stdout and "--ack 2" in r.stdout


@pytest.mark.parametrize("text,phrase", [
    ("a: [1\n", r":2: not valid YAML"),
    ("- data\n", r":1: expected `key: value` lines"),
    ("foreground: true\n", r":1: foreground: .*pass -f"),
    ("data: {a: 1}\n", r":1: data: expected a value or a list"),
    ("replicas: 2\nreplicas: 3\n", r"set twice"),
])
def test_config_check_refuses_malformed_files(tmp_path, text, phrase):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    expect_cli_error([MODELFS_BIN, "config", "check", str(cfg)], phrase)


def test_a_mount_with_a_bad_config_fails_with_one_line_and_mounts_nothing(scratch):
    mp, data = scratch / "mnt", scratch / "data"
    mp.mkdir()
    cfg = scratch / "c.yaml"
    cfg.write_text(f"data: {data}\nflat-sise: 1G\n")
    expect_cli_error([MODELFS_BIN, "mount", str(mp), "--config", str(cfg)], r"c\.yaml:2: unknown key flat-sise \(did you mean flat-size\?\)")
    expect_cli_error([MODELFS_BIN, "mount", str(mp), "--config", str(scratch / "none.yaml")], r"none\.yaml: no such file")
    assert not is_mounted(mp, None)
    assert not data.exists()


def test_a_group_readable_secret_file_is_refused(scratch):
    mp = scratch / "mnt"
    mp.mkdir()
    secret = scratch / "secret"
    secret.write_text("0123456789abcdef\n")
    secret.chmod(0o640)
    line = expect_cli_error([MODELFS_BIN, "mount", str(mp), "--data", str(scratch / "d"), "--meta", "etcd://127.0.0.1:1/x",
                             "--secret-file", str(secret), "--advertise", "127.0.0.1:7420"], r"open to other users \(mode 640\)")
    assert "0123456789abcdef" not in line, "the secret itself was printed"


# ---------------------------------------------------------------------------
# mount(8), /etc/fstab
# ---------------------------------------------------------------------------

HELPER = Path("/usr/sbin/mount.fuse.modelfs")


@pytest.fixture
def mount_helper():
    """/usr/sbin/mount.fuse.modelfs pointing at the binary under test (as scripts/install.sh makes
    it), put back as it was afterwards."""
    before = os.readlink(HELPER) if HELPER.is_symlink() else None
    if HELPER.exists() and before is None:
        pytest.fail(f"{HELPER} is a file, not install.sh's link; not touching it")
    if before != MODELFS_BIN:
        if before is not None:
            HELPER.unlink()
        HELPER.symlink_to(MODELFS_BIN)
    try:
        yield HELPER
    finally:
        if before != MODELFS_BIN:
            HELPER.unlink()
            if before is not None:
                HELPER.symlink_to(before)


def test_fstab_mount_and_umount(scratch, mount_helper):
    mp, data = scratch / "ckpt", scratch / "data"
    mp.mkdir()
    fstab = scratch / "fstab"
    fstab.write_text(f"# modelfs\n{data} {mp} fuse.modelfs defaults,_netdev,nofail,x-systemd.after=network-online.target,"
                     f"log_level=debug,flat_size=1G,allow_other 0 0\n")
    r = run(["mount", "-T", str(fstab), str(mp)], timeout=60)
    assert r.returncode == 0, f"mount -T failed: {r.stdout} {r.stderr}"
    assert is_mounted(mp)
    payload = os.urandom(5 * MiB + 17)
    write_file(mp / "model.bin", payload, fsync=True)
    st = json.loads(run([MODELFS_BIN, "status", str(mp), "--json"]).stdout)
    mount = st["mount"] if "mount" in st else st[0]
    assert mount["dataDir"] == str(data) and mount["passthrough"]["flatBudget"] == GiB
    pid = int((data / "modelfs.pid").read_text().strip())
    r = run(["umount", str(mp)], timeout=60)
    assert r.returncode == 0, r.stderr
    assert wait_pid_exit(pid, 30), "the daemon did not exit after umount(8)"
    assert not is_mounted(mp, None)
    # From fstab again: the file is there.
    r = run(["mount", "-T", str(fstab), str(mp)], timeout=60)
    assert r.returncode == 0, r.stderr
    assert_bytes_equal(read_file(mp / "model.bin"), payload)
    umount_and_wait(mp, data)


def test_mount_t_fuse_modelfs_takes_cluster_flags_as_options(scratch, mount_helper):
    """A cluster node's line: the etcd URL as the source, the flags as options. The secret file
    here is group-readable, so the mount must refuse it, naming the flag: the option reached
    `modelfs mount` as --secret-file."""
    mp = scratch / "ckpt"
    mp.mkdir()
    secret = scratch / "secret"
    secret.write_text("0123456789abcdef\n")
    secret.chmod(0o644)
    r = run(["mount", "-t", "fuse.modelfs", "etcd://127.0.0.1:1/lab", str(mp), "-o",
             f"_netdev,secret_file={secret},advertise=127.0.0.1:7420,replicas=3,ack=2,data={scratch / 'd'}"], timeout=60)
    assert r.returncode != 0 and "--secret-file" in r.stderr and "chmod 600" in r.stderr, r.stderr
    assert not is_mounted(mp, None)


def test_the_mount_fuse3_form_mounts_a_data_dir(scratch):
    """Without the link, /sbin/mount.fuse runs `modelfs SOURCE DIR -o OPTIONS`: the same call."""
    mp, data = scratch / "m", scratch / "data"
    mp.mkdir()
    r = run([MODELFS_BIN, str(data), str(mp), "-o", "rw,dev,suid,_netdev,nofail,log_level=info"], timeout=60)
    assert r.returncode == 0, r.stderr
    assert is_mounted(mp)
    write_file(mp / "x", b"hello")
    umount_and_wait(mp, data)
    expect_cli_error([MODELFS_BIN, str(data), str(mp), "-o", "data=/elsewhere"], r"the source .* is the data dir")


# ---------------------------------------------------------------------------
# systemd
# ---------------------------------------------------------------------------

def test_the_systemd_unit_verifies(tmp_path):
    unit = (REPO / "contrib" / "systemd" / "modelfs@.service").read_text()
    assert "/usr/local/bin/modelfs" in unit
    (tmp_path / "modelfs@ckpt.service").write_text(unit.replace("/usr/local/bin/modelfs", MODELFS_BIN))
    r = run(["systemd-analyze", "verify", "--man=no", str(tmp_path / "modelfs@ckpt.service")], timeout=60)
    problems = [ln for ln in (r.stdout + r.stderr).splitlines() if "modelfs@ckpt.service" in ln]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr
    # The unit's ExecStart is a command line this binary accepts.
    example = REPO / "contrib" / "modelfs.example.yaml"
    r = run([MODELFS_BIN, "config", "check", str(example)])
    assert "unknown key" not in r.stderr and "not valid YAML" not in r.stderr, r.stderr


def test_the_daemon_tells_systemd_when_it_is_mounted_and_stops_on_sigterm(scratch):
    """Type=notify: READY=1 once the directory is mounted; SIGTERM (systemctl stop) unmounts,
    says STOPPING=1 and exits 0."""
    mp, data = scratch / "m", scratch / "data"
    mp.mkdir()
    sock_path = scratch / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(60)
    env = dict(os.environ, NOTIFY_SOCKET=str(sock_path))
    with open(scratch / "out.log", "wb") as out:
        proc = subprocess.Popen([MODELFS_BIN, "mount", "-f", str(mp), "--data", str(data)], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        msg = sock.recv(4096).decode()
        assert "READY=1" in msg and f"MAINPID={proc.pid}" in msg, msg
        assert is_mounted(mp), "READY=1 came before the directory was mounted"
        write_file(mp / "f", b"x" * 100_000)
        proc.send_signal(signal.SIGTERM)
        msg = sock.recv(4096).decode()
        assert "STOPPING=1" in msg, msg
        assert proc.wait(timeout=60) == 0, (scratch / "out.log").read_text()
        assert not is_mounted(mp, None)
    finally:
        sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------------------
# the log
# ---------------------------------------------------------------------------

def test_the_log_rotates_within_its_bound_and_keeps_its_level(scratch):
    mp, data = scratch / "m", scratch / "data"
    mp.mkdir()
    r = run([MODELFS_BIN, "mount", str(mp), "--data", str(data), "--log-level", "debug",
             "--log-max-size", "16K", "--log-keep", "2"], timeout=60)
    assert r.returncode == 0, r.stderr
    try:
        write_file(mp / "f", b"x")
        # Each getxattr of a missing attribute is an ENODATA answer: one debug line.
        for i in range(2000):
            try:
                os.getxattr(mp / "f", f"user.missing{i}")
            except OSError:
                pass
        logs = sorted(p.name for p in data.glob("modelfs.log*"))
        assert logs == ["modelfs.log", "modelfs.log.1", "modelfs.log.2"], logs
        for name in logs:
            assert (data / name).stat().st_size < 16 * 1024 + 1024, (name, (data / name).stat().st_size)
        assert "debug getxattr" in (data / "modelfs.log.1").read_text()
    finally:
        umount_and_wait(mp, data)
    # At the default level the same traffic writes nothing.
    before = (data / "modelfs.log").stat().st_size
    r = run([MODELFS_BIN, "mount", str(mp), "--data", str(data)], timeout=60)
    assert r.returncode == 0, r.stderr
    for i in range(200):
        try:
            os.getxattr(mp / "f", f"user.missing{i}")
        except OSError:
            pass
    umount_and_wait(mp, data)
    text = (data / "modelfs.log").read_bytes()[before:].decode()
    assert "debug" not in text and "mounted" in text, text
    expect_cli_error([MODELFS_BIN, "mount", str(mp), "--data", str(data), "--log-level", "chatty"],
                     r"--log-level chatty: use debug, info, warning or error")


# ---------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int, token: str | None = None) -> tuple[int, str]:
    import urllib.error
    import urllib.request
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_a_single_node_serves_metrics_of_its_fuse_operations(mount_factory, tmp_path):
    port = free_port()
    token = private(tmp_path / "token", "scrape-token-1234\n")
    m = mount_factory(extra_args=["--metrics-listen", f"127.0.0.1:{port}", "--metrics-token-file", str(token)])
    status, _ = scrape(port)
    assert status == 401
    status, _ = scrape(port, "wrong-token-0000")
    assert status == 401
    status, before = scrape(port, "scrape-token-1234")
    assert status == 200
    write_file(m / "f", os.urandom(4 * MiB))
    for i in range(37):
        try:
            os.getxattr(m / "f", f"user.none{i}")
        except OSError:
            pass
    status, after = scrape(port, "scrape-token-1234")
    assert status == 200
    enodata = 'modelfs_fuse_errors_total{errno="ENODATA"}'
    assert metric(after, enodata) - metric(before, enodata) == 37
    getx = 'modelfs_fuse_op_seconds_count{op="getxattr"}'
    assert metric(after, getx) - metric(before, getx) == 37
    writes = 'modelfs_fuse_op_seconds_count{op="write"}'
    assert metric(after, writes) >= 4, after[:2000]
    assert metric(after, 'modelfs_fuse_op_seconds_bucket{op="write",le="+Inf"}') == metric(after, writes)
    assert metric(after, "modelfs_stored_bytes") >= 4 * MiB


def test_metrics_flags_are_checked(scratch):
    mp = scratch / "m"
    mp.mkdir()
    base = [MODELFS_BIN, "mount", str(mp), "--data", str(scratch / "d")]
    expect_cli_error(base + ["--metrics-listen", "0.0.0.0:9567"], r"reachable from other machines: give it a token")
    loose = scratch / "token"
    loose.write_text("scrape-token-1234\n")
    loose.chmod(0o604)
    expect_cli_error(base + ["--metrics-listen", "127.0.0.1:9567", "--metrics-token-file", str(loose)],
                     r"--metrics-token-file .* is open to other users")
    expect_cli_error(base + ["--metrics-listen", "nowhere"], r"--metrics-listen nowhere: expected IPv4:PORT")
    assert not is_mounted(mp, None)


# ---------------------------------------------------------------------------
# the control socket under garbage
# ---------------------------------------------------------------------------

def test_the_control_socket_survives_garbage(mount_factory):
    """Seeded garbage on the daemon's control socket (the CLI's way in): every request is answered
    or closed, the daemon stays up and its status still answers. MODELFS_FUZZ_SEED replays."""
    import random
    m = mount_factory()
    write_file(m / "f", b"x" * 10000)
    records = [json.loads(p.read_text()) for p in Path("/run/modelfs").glob("*.json")]
    sock_path = next(r["socket"] for r in records if r["mountpoint"] == str(m.mp))
    seed = int(os.environ.get("MODELFS_FUZZ_SEED", "20261206"))
    rng = random.Random(seed)
    corpus = [b"status", b"files /", b"files " + str(m.mp).encode() + b"/f", b"warm /", b"sync 1", b"verify /",
              b"drain x", b"files", b"sync", b"sync -1 1,2,3", b"status extra words"]
    for i in range(400):
        line = bytearray(rng.choice(corpus))
        for _ in range(rng.randrange(0, 4)):
            at = rng.randrange(0, len(line) + 1)
            op = rng.randrange(4)
            if op == 0 and line:
                line[min(at, len(line) - 1)] ^= rng.randrange(1, 256)
            elif op == 1:
                line[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
            elif op == 2:
                del line[at:at + rng.randrange(1, 10)]
            else:
                line[at:at] = rng.choice([b" ", b"../" * 50, b"\x00", b"%s%n", b"9" * 40, "\u00e9\u10ff00".encode()])
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as c:
            c.settimeout(30)
            c.connect(sock_path)
            c.sendall(bytes(line) + b"\n")
            c.shutdown(socket.SHUT_WR)
            try:
                while c.recv(65536):
                    pass
            except socket.timeout:
                raise AssertionError(f"seed {seed}, case {i}: no answer to {bytes(line)!r}")
        assert m.proc.poll() is None, f"seed {seed}, case {i}: the daemon died on {bytes(line)!r}\n{m.log_tail()}"
    assert m.status()["files"] >= 1
    assert read_file(m / "f") == b"x" * 10000


# ---------------------------------------------------------------------------
# JSON, completions, manual, install.sh
# ---------------------------------------------------------------------------

def test_json_output_keeps_slashes_and_quotes_any_path(mount_factory):
    m = mount_factory()
    odd = m / 'a "quoted"\\dir'
    odd.mkdir()
    write_file(odd / "f", b"x" * 1000)
    r = run([MODELFS_BIN, "status", str(odd / "f"), "--json"])
    assert r.returncode == 0, r.stderr
    assert "\\/" not in r.stdout, "slashes escaped in --json"
    doc = json.loads(r.stdout)
    assert doc["mount"]["mountpoint"] == str(m.mp)


def test_completions_and_the_manual_are_generated_and_installed(tmp_path):
    for shell, word in (("bash", "--replicas"), ("zsh", "--replicas"), ("fish", "replicas")):
        r = run([MODELFS_BIN, "--generate-completion-script", shell])
        assert r.returncode == 0 and word in r.stdout and "mount" in r.stdout, (shell, r.stderr)
    root = tmp_path / "root"
    env = dict(os.environ, PATH=os.environ.get("PATH", "") + ":/opt/swift/usr/bin")
    r = run([str(REPO / "scripts" / "install.sh"), "--destdir", str(root)], timeout=900, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert os.access(root / "usr/local/bin/modelfs", os.X_OK)
    assert os.readlink(root / "usr/sbin/mount.fuse.modelfs") == "/usr/local/bin/modelfs"
    assert "ExecStart=/usr/local/bin/modelfs mount -f" in (root / "etc/systemd/system/modelfs@.service").read_text()
    man = (root / "usr/local/share/man/man1/modelfs.1").read_text()
    assert ".Nm modelfs" in man or "modelfs" in man.split("\n", 5)[0] + man
    assert "mount" in man and "umount" in man
    assert "--replicas" in (root / "usr/share/bash-completion/completions/modelfs").read_text()
    assert (root / "etc/modelfs/modelfs.example.yaml").exists()
