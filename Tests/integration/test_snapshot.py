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
