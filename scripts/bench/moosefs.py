"""MooseFS beside modelfs in the cluster benchmark: a master, 3 chunkservers and a client mount,
all in a network namespace of their own (MooseFS refuses 127.x addresses), on Debian's
moosefs-* packages. Every process is started and stopped by PID; the namespace is deleted."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

NS = f"modelfs-mfs-{os.getpid()}"
ADDR = "10.213.77.1"


def available() -> bool:
    return all(shutil.which(b) for b in ("mfsmaster", "mfschunkserver", "mfsmount", "mfssetgoal", "ip"))


def sh(*args, check=True):
    return subprocess.run([str(a) for a in args], check=check, capture_output=True, text=True, timeout=60)


class MooseFS:
    def __init__(self, root: Path, chunkservers: int = 3):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.mnt = root / "mnt"
        self.mounted = False
        root.mkdir(parents=True, exist_ok=True)
        self.mnt.mkdir(exist_ok=True)
        sh("ip", "netns", "add", NS)
        self.ns = True
        try:
            self._setup(root, chunkservers)
        except BaseException:
            self.stop()
            raise

    def _setup(self, root: Path, chunkservers: int):
        # A non-127 address on the namespace's own loopback: no interface module needed.
        sh("ip", "netns", "exec", NS, "ip", "link", "set", "lo", "up")
        sh("ip", "netns", "exec", NS, "ip", "addr", "add", f"{ADDR}/32", "dev", "lo")
        master = root / "master"
        master.mkdir()
        shutil.copy("/var/lib/mfs/metadata.mfs.empty", master / "metadata.mfs")
        (root / "exports.cfg").write_text("* / rw,alldirs,maproot=0\n")
        (root / "master.cfg").write_text(
            f"WORKING_USER = root\nWORKING_GROUP = root\nDATA_PATH = {master}\n"
            f"EXPORTS_FILENAME = {root / 'exports.cfg'}\nMATOML_LISTEN_HOST = {ADDR}\n"
            f"MATOCS_LISTEN_HOST = {ADDR}\nMATOCL_LISTEN_HOST = {ADDR}\n")
        self._start(["mfsmaster", "-f", "-c", root / "master.cfg"], "master")
        for i in range(chunkservers):
            d = root / f"cs{i}"
            (d / "hdd").mkdir(parents=True)
            (d / "hdd.cfg").write_text(f"{d / 'hdd'}\n")
            (d / "cs.cfg").write_text(
                f"WORKING_USER = root\nWORKING_GROUP = root\nDATA_PATH = {d}\nHDD_CONF_FILENAME = {d / 'hdd.cfg'}\n"
                f"CSSERV_LISTEN_HOST = {ADDR}\nCSSERV_LISTEN_PORT = {9522 + i}\nMASTER_HOST = {ADDR}\n")
            self._start(["mfschunkserver", "-f", "-c", d / "cs.cfg"], f"cs{i}")
        time.sleep(0.5)
        self._start(["mfsmount", "-f", self.mnt, "-H", ADDR], "mount")
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mnt):
            if time.monotonic() > deadline:
                raise RuntimeError(f"mfsmount did not come up; logs in {root}")
            time.sleep(0.1)
        self.mounted = True
        # Wait until the master sees every chunkserver (a goal-3 write needs 3).
        deadline = time.monotonic() + 60
        while True:
            r = subprocess.run(["nsenter", f"--net=/var/run/netns/{NS}", "mfscli", "-H", ADDR, "-SCS", "-s", ","],
                               capture_output=True, text=True) if shutil.which("mfscli") else None
            if r is None or r.stdout.count(ADDR) >= chunkservers or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if r is None:
            time.sleep(5)

    def _start(self, args, name):
        log = open(self.root / f"{name}.log", "ab")
        # nsenter --net: the namespace's network only. (`ip netns exec` also unshares the mount
        # namespace, and a FUSE mount made there would be invisible to the benchmark.)
        self.procs.append(subprocess.Popen(["nsenter", f"--net=/var/run/netns/{NS}"] + [str(a) for a in args],
                                           stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))

    def set_goal(self, path: Path, goal: int):
        # The tool talks to the master itself: from inside the namespace.
        r = sh("nsenter", f"--net=/var/run/netns/{NS}", "mfssetgoal", "-r", str(goal), path, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"mfssetgoal failed: {r.stderr.strip() or r.stdout.strip()}")

    def stop(self):
        if self.mounted:
            subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True)
            if os.path.ismount(self.mnt):
                subprocess.run(["fusermount3", "-uz", str(self.mnt)], capture_output=True)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=30)
        if getattr(self, "ns", False):
            sh("ip", "netns", "del", NS, check=False)
