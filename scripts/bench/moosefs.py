"""MooseFS beside modelfs in the cluster benchmark: a master, 3 chunkservers and a client mount,
all in a network namespace of their own (MooseFS refuses 127.x addresses), on Debian's
moosefs-* packages; or, in the network lab (`lab=`), the master beside etcd member 1, the
chunkservers on hosts 2-4 and the client on host 1, each on its host's shaped link. Every
process is started and stopped by PID; the namespace this makes is deleted."""
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
    def __init__(self, root: Path, chunkservers: int = 3, lab=None):
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.mnt = root / "mnt"
        self.mounted = False
        root.mkdir(parents=True, exist_ok=True)
        self.mnt.mkdir(exist_ok=True)
        if lab is None:
            # (namespace, address) of the master, each chunkserver and the client: one place.
            self.master = (NS, ADDR)
            self.places = [(NS, ADDR)] * chunkservers
            self.client = NS
            sh("ip", "netns", "add", NS)
            self.ns = True
        else:
            self.master = (lab.etcd_ns(1), lab.etcd_addr(1))
            self.places = [(lab.host_ns(i), lab.host_addr(i)) for i in range(2, 2 + chunkservers)]
            self.client = lab.host_ns(1)
            self.ns = False
        try:
            self._setup(root, chunkservers)
        except BaseException:
            self.stop()
            raise

    def _setup(self, root: Path, chunkservers: int):
        if self.ns:
            # A non-127 address on the namespace's own loopback: no interface module needed.
            sh("ip", "netns", "exec", NS, "ip", "link", "set", "lo", "up")
            sh("ip", "netns", "exec", NS, "ip", "addr", "add", f"{ADDR}/32", "dev", "lo")
        mns, maddr = self.master
        master = root / "master"
        master.mkdir()
        shutil.copy("/var/lib/mfs/metadata.mfs.empty", master / "metadata.mfs")
        (root / "exports.cfg").write_text("* / rw,alldirs,maproot=0\n")
        (root / "master.cfg").write_text(
            f"WORKING_USER = root\nWORKING_GROUP = root\nDATA_PATH = {master}\n"
            f"EXPORTS_FILENAME = {root / 'exports.cfg'}\nMATOML_LISTEN_HOST = {maddr}\n"
            f"MATOCS_LISTEN_HOST = {maddr}\nMATOCL_LISTEN_HOST = {maddr}\n")
        self._start(["mfsmaster", "-f", "-c", root / "master.cfg"], "master", mns)
        for i, (ns, addr) in enumerate(self.places):
            d = root / f"cs{i}"
            (d / "hdd").mkdir(parents=True)
            (d / "hdd.cfg").write_text(f"{d / 'hdd'}\n")
            (d / "cs.cfg").write_text(
                f"WORKING_USER = root\nWORKING_GROUP = root\nDATA_PATH = {d}\nHDD_CONF_FILENAME = {d / 'hdd.cfg'}\n"
                f"CSSERV_LISTEN_HOST = {addr}\nCSSERV_LISTEN_PORT = {9522 + i}\nMASTER_HOST = {maddr}\n")
            self._start(["mfschunkserver", "-f", "-c", d / "cs.cfg"], f"cs{i}", ns)
        time.sleep(0.5)
        self._start(["mfsmount", "-f", self.mnt, "-H", maddr], "mount", self.client)
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mnt):
            if time.monotonic() > deadline:
                raise RuntimeError(f"mfsmount did not come up; logs in {root}")
            time.sleep(0.1)
        self.mounted = True
        # Wait until the master sees every chunkserver (a goal-3 write needs 3).
        deadline = time.monotonic() + 60
        while True:
            r = subprocess.run(["nsenter", f"--net=/var/run/netns/{mns}", "mfscli", "-H", maddr, "-SCS", "-s", ","],
                               capture_output=True, text=True) if shutil.which("mfscli") else None
            if r is None or sum(r.stdout.count(addr) for addr in {a for _, a in self.places}) >= chunkservers \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if r is None:
            time.sleep(5)

    def _start(self, args, name, ns):
        log = open(self.root / f"{name}.log", "ab")
        # nsenter --net: the namespace's network only. (`ip netns exec` also unshares the mount
        # namespace, and a FUSE mount made there would be invisible to the benchmark.)
        self.procs.append(subprocess.Popen(["nsenter", f"--net=/var/run/netns/{ns}"] + [str(a) for a in args],
                                           stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))

    def set_goal(self, path: Path, goal: int):
        # The tool talks to the master itself: from inside the namespace.
        r = sh("nsenter", f"--net=/var/run/netns/{self.client}", "mfssetgoal", "-r", str(goal), path, check=False)
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
