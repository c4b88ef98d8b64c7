"""Clones and snapshots (issue #31): `cp` of 1 GiB stores no new block; `modelfs snapshot` is an
instant, read-only copy of a tree that survives deleting its source and garbage collection, and
`--delete` gives its blocks back."""
from __future__ import annotations

import errno
import json
import os
import stat
import subprocess

import pytest

from mfs import MODELFS_BIN, MiB, read_file, wait_until, write_file


def cli(*args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([MODELFS_BIN, *map(str, args)], capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, f"{args}: {r.stderr}"
    return r


def test_cp_of_a_gib_stores_no_new_block(mnt):
    data = os.urandom(MiB) * 1024       # 1 GiB: the same MiB, so writing it is quick; its blocks are few
    big = bytearray(data)
    for i in range(0, len(big), 4 * MiB):
        big[i:i + 8] = i.to_bytes(8, "little")   # every 4 MiB differs: ~256 distinct chunks at least
    big = bytes(big)
    write_file(mnt / "big.safetensors", big)
    before = mnt.status()
    subprocess.run(["cp", mnt / "big.safetensors", mnt / "x.safetensors"], check=True)
    after = mnt.status()
    assert after["clonedBytes"] - before["clonedBytes"] == len(big)
    assert after["storedBytes"] == before["storedBytes"] and after["blocks"] == before["blocks"], (before, after)
    assert read_file(mnt / "x.safetensors") == big


def test_snapshot_is_read_only_and_outlives_its_source(mnt):
    run = mnt / "run"
    os.makedirs(run / "sub")
    files = {"step-1.pt": os.urandom(3 * MiB), "sub/notes.txt": b"hello", "step-2.pt": os.urandom(2 * MiB)}
    for name, body in files.items():
        write_file(run / name, body)
    os.symlink("step-2.pt", run / "latest.pt")
    os.mkfifo(run / "fifo")
    os.chmod(run / "step-1.pt", 0o640)
    os.utime(run / "step-1.pt", (1_700_000_000, 1_700_000_000))
    cli("ckpt", "tag", run / "step-2.pt", "eval.accuracy=0.9")
    before = mnt.status()
    # The destination's name was looked up (and missed) first: the kernel must not keep the miss.
    assert not os.path.exists(mnt / "snap")
    out = json.loads(cli("snapshot", run, mnt / "snap", "--json").stdout)["outcome"]
    assert out == {"files": 3, "directories": 2, "others": 2, "bytes": sum(map(len, files.values()))}
    after = mnt.status()
    assert after["storedBytes"] == before["storedBytes"] and after["blocks"] == before["blocks"]
    snap = mnt / "snap"
    for name, body in files.items():
        assert read_file(snap / name) == body, name
    assert os.readlink(snap / "latest.pt") == "step-2.pt" and stat.S_ISFIFO(os.lstat(snap / "fifo").st_mode)
    s = os.stat(snap / "step-1.pt")
    assert stat.S_IMODE(s.st_mode) == 0o640 and s.st_mtime == 1_700_000_000
    assert os.getxattr(snap / "step-2.pt", "user.modelfs.meta.eval.accuracy") == b"0.9"
    # Read-only: every change is refused with EPERM, as for `chattr +i`.
    refused = [
        lambda: open(snap / "step-1.pt", "r+b"),
        lambda: open(snap / "step-1.pt", "wb"),
        lambda: os.truncate(snap / "step-1.pt", 0),
        lambda: os.unlink(snap / "step-1.pt"),
        lambda: os.rename(snap / "step-1.pt", snap / "moved.pt"),
        lambda: os.rename(snap / "step-1.pt", mnt / "moved.pt"),
        lambda: os.rename(mnt / "run" / "step-2.pt", snap / "step-9.pt"),
        lambda: os.chmod(snap / "step-1.pt", 0o600),
        lambda: os.utime(snap / "step-1.pt", (1, 1)),
        lambda: os.setxattr(snap / "step-1.pt", "user.x", b"1"),
        lambda: os.removexattr(snap / "step-2.pt", "user.modelfs.meta.eval.accuracy"),
        lambda: open(snap / "new.pt", "wb"),
        lambda: os.mkdir(snap / "d"),
        lambda: os.rmdir(snap / "sub"),
        lambda: os.link(snap / "step-1.pt", mnt / "hard.pt"),
        lambda: os.rename(snap, mnt / "renamed"),
    ]
    for i, change in enumerate(refused):
        with pytest.raises(OSError) as e:
            change()
        assert e.value.errno == errno.EPERM, (i, e.value)
    assert subprocess.run(["rm", "-rf", snap], capture_output=True).returncode != 0
    for name, body in files.items():
        assert read_file(snap / name) == body, name
    # The source stays writable; deleting it leaves the snapshot whole through garbage collection.
    write_file(run / "step-1.pt", b"overwritten")
    subprocess.run(["rm", "-rf", run], check=True)
    removed = json.loads(cli("debug", "gc", "--no-grace", mnt.mp).stdout)
    assert removed["blocks"] >= 1      # "overwritten" (and nothing the snapshot holds)
    assert mnt.status()["storedBytes"] >= sum(map(len, files.values()))
    for name, body in files.items():
        assert read_file(snap / name) == body, name
    # --delete removes it and its blocks are collected; it refuses what is not a snapshot.
    os.mkdir(mnt / "plain")
    r = cli("snapshot", "--delete", mnt / "plain", check=False)
    assert r.returncode == 1 and "not a snapshot" in r.stderr and os.path.isdir(mnt / "plain")
    cli("snapshot", "--delete", snap)
    assert not os.path.exists(snap)
    removed = json.loads(cli("debug", "gc", "--no-grace", mnt.mp).stdout)
    assert removed["bytes"] >= sum(map(len, files.values())), removed
    assert mnt.status()["storedBytes"] == 0


def test_snapshot_refuses_bad_requests_with_one_line(mnt):
    os.makedirs(mnt / "run" / "inner")
    write_file(mnt / "run" / "a.pt", b"x")
    for args, says in [((mnt / "run", mnt / "run"), "exists"),
                       ((mnt / "run", mnt / "run" / "inner" / "s"), "inside its own source"),
                       ((mnt / "nope", mnt / "s"), "No such file"),
                       ((mnt / "run", "/tmp/modelfs-snapshot-elsewhere"), "not in the mount"),
                       ((mnt / "run",), "expected SRC DST"),
                       (("--delete", mnt / "absent"), "No such file")]:
        r = cli("snapshot", *args, check=False)
        assert r.returncode != 0 and says in r.stderr, (args, r.stderr)
    assert sorted(os.listdir(mnt / "run")) == ["a.pt", "inner"]


def test_export_and_import_are_bit_exact_and_verified(mnt, tmp_path):
    """`modelfs export` writes a checkpoint out with a manifest of SHA-256s, modes, mtimes and
    metadata; `modelfs import` brings it back bit-exact with its metadata; a damaged export is
    refused and leaves nothing behind."""
    ck = mnt / "run" / "checkpoint-500"
    os.makedirs(ck / "sub")
    files = {"model.safetensors": os.urandom(5 * MiB + 7), "config.json": b'{"n": 1}', "sub/opt.pt": os.urandom(300_000)}
    for name, body in files.items():
        write_file(ck / name, body)
    os.symlink("model.safetensors", ck / "weights")
    os.chmod(ck / "config.json", 0o600)
    os.utime(ck / "config.json", (1_650_000_000, 1_650_000_000))
    cli("ckpt", "tag", ck, "eval.accuracy=0.88")
    cli("ckpt", "tag", ck / "model.safetensors", "dtype=bf16")
    out = tmp_path / "export"
    manifest = json.loads(cli("export", ck, out, "--json").stdout)
    import hashlib
    byname = {e["path"]: e for e in manifest["entries"]}
    for name, body in files.items():
        assert (out / name).read_bytes() == body
        assert byname[name]["sha256"] == hashlib.sha256(body).hexdigest() and byname[name]["size"] == len(body)
    assert byname["weights"]["kind"] == "symlink" and os.readlink(out / "weights") == "model.safetensors"
    assert manifest["metadata"] == {"eval.accuracy": "0.88"} and byname["model.safetensors"]["metadata"] == {"dtype": "bf16"}
    assert json.loads((out / "modelfs-manifest.json").read_text()) == manifest
    assert os.stat(out / "config.json").st_mtime == 1_650_000_000 and stat.S_IMODE(os.stat(out / "config.json").st_mode) == 0o600
    # Back in, somewhere else in the mount: the same bytes, metadata, mode and mtime.
    back = mnt / "restored"
    cli("import", out, back)
    for name, body in files.items():
        assert read_file(back / name) == body
    assert os.getxattr(back, "user.modelfs.meta.eval.accuracy") == b"0.88"
    assert os.getxattr(back / "model.safetensors", "user.modelfs.meta.dtype") == b"bf16"
    assert os.stat(back / "config.json").st_mtime == 1_650_000_000 and os.readlink(back / "weights") == "model.safetensors"
    # A TensorFlow prefix exports its own files.
    os.makedirs(mnt / "tf")
    for n in ("checkpoint", "ckpt-3.index", "ckpt-3.data-00000-of-00001", "ckpt-4.index"):
        write_file(mnt / "tf" / n, n.encode())
    m = json.loads(cli("export", mnt / "tf" / "ckpt-3", tmp_path / "tf3", "--json").stdout)
    assert sorted(e["path"] for e in m["entries"]) == ["ckpt-3.data-00000-of-00001", "ckpt-3.index"]
    # A damaged export: refused, nothing left in the mount; an existing target: refused.
    with open(out / "sub" / "opt.pt", "r+b") as f:
        f.seek(1000)
        f.write(b"X")
    r = cli("import", out, mnt / "damaged", check=False)
    assert r.returncode == 1 and "differs from the manifest" in r.stderr, r.stderr
    assert not any(n.startswith(".damaged") or n == "damaged" for n in os.listdir(mnt.mp))
    for args, says in [(("export", ck, out), "exists"), (("import", out, back), "exists"),
                       (("export", mnt / "nope", tmp_path / "x"), "No such file"),
                       (("import", tmp_path / "nope", mnt / "x"), "No such file")]:
        r = cli(*args, check=False)
        assert r.returncode != 0 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)


def _bytes_of(name: str) -> bytes:
    """A name as modelfs's JSON spells it back to its bytes: a byte that is not UTF-8 is the
    scalar U+10FF00 + byte (RawName)."""
    return b"".join(bytes([ord(c) - 0x10FF00]) if ord(c) >= 0x10FF00 else c.encode() for c in name)


def test_paths_that_are_not_utf8_work_on_the_command_line(mnt, tmp_path):
    """Linux paths are bytes (issue #28): a checkpoint directory named in Latin-1 holding a file
    whose name is not UTF-8 either is found by `status` and `ckpt list`, snapshotted, exported
    and imported, every name byte for byte (the CLI used to read its arguments as UTF-8,
    replacing such bytes, and then found no such path)."""
    def cli_b(*args):
        r = subprocess.run([os.fsencode(MODELFS_BIN), *[a if isinstance(a, bytes) else os.fsencode(str(a)) for a in args]],
                           capture_output=True, timeout=300)
        assert r.returncode == 0, f"{args}: {r.stderr.decode(errors='replace')}"
        return r
    root = os.fsencode(str(mnt.mp))
    run = root + b"/caf\xe9-run"
    os.mkdir(run)
    body = os.urandom(MiB + 5)
    with open(run + b"/model-\xff.safetensors", "wb") as f:
        f.write(body)
    assert cli_b("status", run, "--json").returncode == 0
    listed = json.loads(cli_b("ckpt", "list", run, "--json").stdout)
    paths = [_bytes_of(c["path"]) for c in listed["checkpoints"]]
    assert any(p.endswith(b"model-\xff.safetensors") for p in paths), (listed, paths)
    cli_b("snapshot", run, root + b"/snap-\xe9")
    assert open(root + b"/snap-\xe9/model-\xff.safetensors", "rb").read() == body
    out = os.fsencode(str(tmp_path)) + b"/out-\xe9"
    cli_b("export", run, out)
    assert sorted(os.listdir(out)) == [b"model-\xff.safetensors", b"modelfs-manifest.json"]
    assert open(out + b"/model-\xff.safetensors", "rb").read() == body
    cli_b("import", out, root + b"/back-\xe9")
    assert os.listdir(root + b"/back-\xe9") == [b"model-\xff.safetensors"]
    assert open(root + b"/back-\xe9/model-\xff.safetensors", "rb").read() == body
