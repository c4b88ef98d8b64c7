"""Storage tiers (issue #31) on two real filesystems (ext4 images on loop devices): the data dir
is the fast tier, `--tier hdd:DIR` the slow one. New blocks land on the fast tier; older files'
blocks move down (`--tier-age`, `modelfs policy tier`); a full fast tier spills to the slow one
without failing the writer; a lost slow disk loses only the files whose blocks were there."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from mfs import MODELFS_BIN, MiB, read_file, wait_until, write_file


@pytest.fixture
def tier_disks():
    """Two ext4 filesystems on loop devices: fast (160 MiB) and slow (600 MiB)."""
    root = Path(tempfile.mkdtemp(prefix="modelfs-tiers-"))
    mounted = []
    try:
        for name, size in (("fast", "160M"), ("slow", "600M")):
            img, d = root / f"{name}.img", root / name
            d.mkdir()
            subprocess.run(["truncate", "-s", size, img], check=True)
            subprocess.run(["mkfs.ext4", "-q", "-F", img], check=True)
            subprocess.run(["mount", "-o", "loop", img, d], check=True)
            mounted.append(d)
        (root / "slow" / "blocks").mkdir()
        yield root / "fast" / "data", root / "slow" / "blocks"
    finally:
        for d in reversed(mounted):
            subprocess.run(["umount", d], check=False)
        shutil.rmtree(root, ignore_errors=True)


def cli(*args, check=True) -> subprocess.CompletedProcess:
    r = subprocess.run([MODELFS_BIN, *map(str, args)], capture_output=True, text=True, timeout=300)
    if check:
        assert r.returncode == 0, f"{args}: {r.stderr}"
    return r


def tiers(m) -> dict[str, dict]:
    return {t["name"]: t for t in m.status()["tiers"]}


def test_placement_demotion_promotion_and_spill(tier_disks, mount_factory):
    fast, slow = tier_disks
    m = mount_factory(data=fast, extra_args=["--tier", f"hdd:{slow}", "--tier-age", "3600"])
    os.makedirs(m / "old")
    os.makedirs(m / "new")
    new, old = os.urandom(40 * MiB), os.urandom(30 * MiB)
    write_file(m / "new" / "a.safetensors", new)
    write_file(m / "old" / "b.safetensors", old)
    t = tiers(m)
    assert t["fast"]["bytes"] == len(new) + len(old) and t["hdd"]["bytes"] == 0
    # Demotion by age: the file last written two days ago goes down, the new one stays.
    os.utime(m / "old" / "b.safetensors", (time.time() - 2 * 86400,) * 2)
    p = json.loads(cli("debug", "tier", m.mp).stdout)
    assert p["demotedBytes"] == len(old) and p["promotedBytes"] == 0
    t = tiers(m)
    assert t["fast"]["bytes"] == len(new) and t["hdd"]["bytes"] == len(old)
    assert read_file(m / "old" / "b.safetensors") == old
    # Rules: slow moves a young file down, fast brings it back (and keeps it there).
    cli("policy", "tier", m / "new", "slow")
    assert cli("policy", "tier", m / "new" ).stdout.startswith("slow")
    cli("debug", "tier", m.mp)
    assert tiers(m)["fast"]["bytes"] == 0
    assert read_file(m / "new" / "a.safetensors") == new
    cli("policy", "tier", m / "new", "fast")
    cli("debug", "tier", m.mp)
    t = tiers(m)
    assert t["fast"]["bytes"] == len(new) and t["hdd"]["bytes"] == len(old)
    # A block shared by a fast file and an old one stays fast.
    subprocess.run(["cp", m / "new" / "a.safetensors", m / "old" / "copy.safetensors"], check=True)
    os.utime(m / "old" / "copy.safetensors", (time.time() - 2 * 86400,) * 2)
    cli("debug", "tier", m.mp)
    assert tiers(m)["fast"]["bytes"] == len(new)
    # Reads bring a slow file's bytes up: a flat copy on the data dir (the fast tier) serves the
    # next opens (passthrough; files within the flat-copy budget).
    if m.status()["passthrough"]["on"]:
        small = os.urandom(6 * MiB)
        os.makedirs(m / "cold")
        write_file(m / "cold" / "s.bin", small)
        cli("policy", "tier", m / "cold", "slow")
        cli("debug", "tier", m.mp)
        before = m.status()["passthrough"]["flat"]
        assert read_file(m / "cold" / "s.bin") == small

        def built():
            return m.status()["passthrough"]["flat"]["built"] > before["built"]
        wait_until(built, 30, interval=0.1, what="a flat copy of the slow file")
        assert read_file(m / "cold" / "s.bin") == small
        assert m.status()["passthrough"]["flat"]["hits"] > before["hits"]
    # A full fast tier: the writer is not failed, the rest lands on the slow tier.
    big = os.urandom(150 * MiB)
    write_file(m / "new" / "big.bin", big)
    t = tiers(m)
    assert t["hdd"]["bytes"] > len(old) + 40 * MiB, t
    assert read_file(m / "new" / "big.bin") == big
    # Promotion stops at the full tier and says so.
    p = json.loads(cli("debug", "tier", m.mp).stdout)
    assert "full" in (p.get("lastProblem") or ""), p
    human = cli("status").stdout
    assert "tier hdd" in human and "tier fast" in human
    # Across a restart every block is found on its tier.
    m.remount()
    assert read_file(m / "old" / "b.safetensors") == old and read_file(m / "new" / "a.safetensors") == new


def test_losing_the_slow_disk_loses_only_what_was_there(tier_disks, mount_factory):
    fast, slow = tier_disks
    m = mount_factory(data=fast, extra_args=["--tier", f"hdd:{slow}", "--tier-age", "3600", "--no-passthrough"])
    keep, lose = os.urandom(8 * MiB), os.urandom(8 * MiB)
    os.makedirs(m / "archive")
    write_file(m / "keep.bin", keep)
    write_file(m / "archive" / "old.bin", lose)
    cli("policy", "tier", m / "archive", "slow")
    assert json.loads(cli("debug", "tier", m.mp).stdout)["demotedBytes"] == len(lose)
    m.unmount()
    # The slow disk is replaced by an empty one.
    shutil.rmtree(slow / "packs")
    m.start()
    assert read_file(m / "keep.bin") == keep
    with pytest.raises(OSError) as e:
        read_file(m / "archive" / "old.bin")
    assert e.value.errno == 5   # EIO, never wrong bytes
    r = cli("verify", m.mp, check=False)
    assert r.returncode == 1 and "no good copy" in r.stdout, r.stdout


def test_tier_flags_are_checked(tier_disks, mount_factory):
    fast, slow = tier_disks
    m = mount_factory(start=False, data=fast)
    for extra, says in [(["--tier", "nocolon"], "expected CLASS:DIR"),
                        (["--tier", f"a b:{slow}"], "a class is letters"),
                        (["--tier", f"hdd:{slow}/missing"], "is not a directory"),
                        (["--tier", f"hdd:{fast}"], "overlaps"),
                        (["--tier", f"hdd:{slow}", "--tier", f"hdd:{slow.parent}/x"], "already")]:
        r = subprocess.run([MODELFS_BIN, "mount", m.mp, "--data", fast, *extra], capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, (extra, r.stderr)
