"""Helpers for the modelfs real-mount integration suite (see conftest.py)."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODELFS_BIN = os.environ.get("MODELFS_BIN", str(REPO / ".build" / "release" / "modelfs"))
FSTYPE = "fuse.modelfs"
# Passthrough is on by default; MODELFS_TEST_PASSTHROUGH=0 mounts every single node of the suites
# with --no-passthrough (scripts/test.sh runs the core suites so too).
TEST_PASSTHROUGH = os.environ.get("MODELFS_TEST_PASSTHROUGH", "1") != "0"

MiB = 1024 * 1024

# Every Mount ever created in this session, so a crash of the test runner's
# logic never leaks a mount past the session.
_ALL_MOUNTS: list["Mount"] = []


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------

def _unescape_mountinfo(s: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and i + 4 <= len(s) and s[i + 1:i + 4].isdigit():
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def mountinfo() -> list[tuple[str, str, str]]:
    """[(mountpoint, fstype, source)] from /proc/self/mountinfo."""
    entries = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.rstrip("\n").partition(" - ")
            fields = left.split(" ")
            rfields = right.split(" ")
            if len(fields) < 5 or len(rfields) < 2:
                continue
            entries.append((_unescape_mountinfo(fields[4]), rfields[0], rfields[1]))
    return entries


def is_mounted(mp, fstype: str | None = FSTYPE) -> bool:
    mp = os.path.realpath(str(mp))
    for point, fs, _src in mountinfo():
        if point == mp and (fstype is None or fs == fstype):
            return True
    return False


def wait_until(cond, timeout: float, interval: float = 0.02, what: str = "condition"):
    """Poll cond() every `interval` s until truthy; returns its value or raises TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still "exists"; treat it as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except OSError:
        return False


def wait_pid_exit(pid: int, timeout: float) -> bool:
    try:
        wait_until(lambda: not pid_alive(pid), timeout, what=f"pid {pid} to exit")
        return True
    except TimeoutError:
        return False


def run(args, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, **kw)


def fusermount_lazy(mp) -> subprocess.CompletedProcess:
    return run(["fusermount3", "-u", "-z", str(mp)], timeout=30)


def sha256(b) -> str:
    return hashlib.sha256(b).hexdigest()


def read_file(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_file(path, data: bytes, fsync: bool = False, chunk: int = 1 * MiB):
    with open(path, "wb") as f:
        mv = memoryview(data)
        for off in range(0, len(data), chunk):
            f.write(mv[off:off + chunk])
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def pack_records(pack: Path, strict: bool = False):
    """The records of one pack file, in order: (magic, id hex, data offset, length, data).
    Formats (docs/ARCHITECTURE.md): b"MFB1" | len u32 LE | 32-byte id | data, anywhere; b"MFB2"
    has the same 40-byte header at the start of a 4 KiB page and the data from the next page,
    padded to a page; a hole (zeros) before an aligned record is stepped over. Dead records are
    b"MFBX" / b"MFX2". A record still being appended (torn tail) or a bad header ends the scan;
    with `strict` (a pack nobody is appending to) either one is an AssertionError."""
    try:
        raw = pack.read_bytes()
    except FileNotFoundError:   # a pack emptied by GC or a dropped copy, deleted as we look
        return
    page = 4096
    off = 0
    while off + 40 <= len(raw):
        magic = raw[off:off + 4]
        if magic not in (b"MFB1", b"MFBX", b"MFB2", b"MFX2") and off % page:
            nxt = (off + page - 1) // page * page
            if raw[off:nxt].count(0) == nxt - off and raw[nxt:nxt + 4] in (b"MFB2", b"MFX2"):
                off = nxt
                magic = raw[off:off + 4]
        if magic not in (b"MFB1", b"MFBX", b"MFB2", b"MFX2"):
            assert not strict, f"bad record header in {pack} at {off}"
            return
        n = int.from_bytes(raw[off + 4:off + 8], "little")
        aligned = magic in (b"MFB2", b"MFX2")
        data_off = off + (page if aligned else 40)
        end = data_off + ((n + page - 1) // page * page if aligned else n)
        if end > len(raw):
            assert not strict, f"torn record in {pack} at {off}"
            return
        yield magic, raw[off + 8:off + 40].hex(), data_off, n, raw[data_off:data_off + n]
        off = end
    assert not strict or off == len(raw), f"torn record in {pack} at {off}"


def assert_bytes_equal(actual: bytes, expected: bytes, what: str = "content"):
    """Exact byte comparison with a useful message (no multi-MB reprs)."""
    if actual == expected:
        return
    n = min(len(actual), len(expected))
    first = next((i for i in range(n) if actual[i] != expected[i]), n)
    raise AssertionError(
        f"{what}: mismatch: len(actual)={len(actual)} len(expected)={len(expected)} "
        f"first differing offset={first} "
        f"actual[{first}:+16]={bytes(actual[first:first + 16]).hex()} "
        f"expected[{first}:+16]={bytes(expected[first:first + 16]).hex()} "
        f"sha256 actual={sha256(actual)[:16]} expected={sha256(expected)[:16]}")


# --------------------------------------------------------------------------
# running code in a forked child (optionally as another uid/gid)
# --------------------------------------------------------------------------

class ChildError(Exception):
    def __init__(self, type_name, err_no, message):
        super().__init__(f"{type_name}(errno={err_no}): {message}")
        self.type_name = type_name
        self.errno = err_no
        self.message = message


def in_child(fn, *args, uid: int | None = None, gid: int | None = None, timeout: float = 60):
    """Run fn(*args) in a forked child process (as uid/gid if given).

    Returns fn's (picklable) return value; if fn raised, raises ChildError
    carrying the exception type name and errno.  The child is a separate
    process, so this is usable for cross-process lock tests and for
    permission checks by another user (the venv's python lives under /root,
    which other users cannot exec, so fork is used instead of exec).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            try:
                if gid is not None:
                    os.setgroups([])
                    os.setgid(gid)
                if uid is not None:
                    os.setuid(uid)
                res = ("ok", fn(*args))
            except BaseException as e:  # noqa: BLE001
                res = ("err", type(e).__name__, getattr(e, "errno", None), str(e))
            data = pickle.dumps(res)
            mv = memoryview(data)
            while mv:
                n = os.write(w, mv)
                mv = mv[n:]
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                raise TimeoutError(f"child {pid} running {fn.__name__} timed out after {timeout}s")
            ready, _, _ = select.select([r], [], [], min(left, 1.0))
            if ready:
                b = os.read(r, 1 << 16)
                if not b:
                    break
                chunks.append(b)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    if not chunks:
        raise RuntimeError(f"child running {fn.__name__} returned nothing")
    res = pickle.loads(b"".join(chunks))
    if res[0] == "ok":
        return res[1]
    raise ChildError(res[1], res[2], res[3])


# --------------------------------------------------------------------------
# the Mount object
# --------------------------------------------------------------------------

class Mount:
    """One modelfs mount, run in the foreground (-f) under our control."""

    def __init__(self, bin_path: str, root: Path | None = None, data: Path | None = None,
                 meta: str | None = None, options: list[str] | None = None,
                 extra_args: list[str] | None = None):
        self.bin = bin_path
        self.root = Path(root or tempfile.mkdtemp(prefix="modelfs-"))
        # mkdtemp makes 0700 dirs; other uids (tests run as uid 1000) must be
        # able to traverse down to the mountpoint.
        os.chmod(self.root, 0o755)
        self.mp = self.root / "mnt"
        self.data = Path(data) if data is not None else self.root / "data"
        self.mp.mkdir(exist_ok=True)
        self.data.mkdir(exist_ok=True)
        self.meta = meta
        self.options = options or []
        self.extra_args = extra_args or []
        self.log_path = self.root / "modelfs.log"
        self.proc: subprocess.Popen | None = None
        self.expect_dead = False  # set by kill9 so teardown does not complain
        self.cleanup_callbacks = []
        self.generation = 0
        _ALL_MOUNTS.append(self)

    # -- paths -------------------------------------------------------------
    def path(self, *parts) -> Path:
        return self.mp.joinpath(*parts)

    def __truediv__(self, other) -> Path:
        return self.mp / other

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    # -- log -----------------------------------------------------------------
    def _log(self, msg: str):
        with open(self.log_path, "a") as f:
            f.write(f"[test-harness {time.strftime('%H:%M:%S')}] {msg}\n")

    def log_tail(self, max_chars: int = 20000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - max_chars))
                return f.read().decode("utf-8", "replace")
        except OSError as e:
            return f"<no log: {e}>"

    def _log_since(self, offset: int, needle: bytes) -> bool:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return needle in f.read()
        except OSError:
            return False

    # -- lifecycle -------------------------------------------------------
    def mount_args(self) -> list[str]:
        args = [self.bin, "mount", str(self.mp), "--data", str(self.data)]
        if self.meta:
            args += ["--meta", self.meta]
        args.append("-f")
        if self.options:
            args += ["-o", ",".join(self.options)]
        extra = list(self.extra_args)
        if not TEST_PASSTHROUGH and "--passthrough" not in extra:
            extra.append("--no-passthrough")
        return args + extra

    def start(self, timeout: float = 30.0):
        assert self.proc is None or self.proc.poll() is not None, "already running"
        assert not is_mounted(self.mp, None), f"{self.mp} is already a mountpoint"
        self.generation += 1
        args = self.mount_args()
        self._log(f"start #{self.generation}: {' '.join(args)}")
        with open(self.log_path, "ab") as log:
            since = log.tell()
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.expect_dead = False
        deadline = time.monotonic() + timeout
        # Live means mounted *and* announced: the kernel shows the mount a moment before the
        # daemon saves its record and opens its control socket, then prints this line.
        while not (is_mounted(self.mp) and self._log_since(since, b"modelfs: mounted ")):
            rc = self.proc.poll()
            if rc is not None:
                raise RuntimeError(
                    f"modelfs mount exited with rc={rc} before the mount went live\n"
                    f"--- log ---\n{self.log_tail()}")
            if time.monotonic() > deadline:
                pid = self.proc.pid
                self.stop(raise_on_problem=False)
                raise RuntimeError(
                    f"mount {self.mp} not live after {timeout}s (pid {pid})\n"
                    f"--- log ---\n{self.log_tail()}")
            time.sleep(0.02)
        return self

    def umount_cmd(self, force: bool = False, timeout: float = 60) -> subprocess.CompletedProcess:
        args = [self.bin, "umount", str(self.mp)] + (["--force"] if force else [])
        r = run(args, timeout=timeout)
        self._log(f"{' '.join(args)} -> rc={r.returncode} stdout={r.stdout.strip()!r} "
                  f"stderr={r.stderr.strip()!r}")
        return r

    def unmount(self, timeout: float = 60):
        """Clean unmount (no --force); asserts it worked and the daemon exited."""
        r = self.umount_cmd(force=False, timeout=timeout)
        assert r.returncode == 0, (
            f"`modelfs umount {self.mp}` failed rc={r.returncode}: {r.stderr.strip()!r}\n"
            f"--- log ---\n{self.log_tail()}")
        assert not is_mounted(self.mp, None), f"`modelfs umount` returned 0 but {self.mp} is still mounted"
        if self.proc is not None:
            try:
                rc = self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"daemon pid {self.proc.pid} still alive 30s after umount")
            assert rc == 0, f"daemon exited with rc={rc} after clean umount\n--- log ---\n{self.log_tail()}"

    def remount(self, timeout: float = 30.0):
        """Clean unmount, then mount again on the same data dir."""
        self.unmount()
        return self.start(timeout=timeout)

    def kill9(self):
        """SIGKILL the daemon, lazily unmount the dead mount, wait for the pid."""
        assert self.proc is not None and self.proc.poll() is None, "daemon not running"
        pid = self.proc.pid
        self._log(f"kill -9 {pid}")
        self.expect_dead = True
        os.kill(pid, signal.SIGKILL)
        r = fusermount_lazy(self.mp)
        self._log(f"fusermount3 -u -z -> rc={r.returncode} {r.stderr.strip()!r}")
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"pid {pid} did not die after SIGKILL")
        wait_until(lambda: not is_mounted(self.mp, None), 10, what=f"{self.mp} to disappear")

    def stop(self, raise_on_problem: bool = True):
        """Teardown: ALWAYS leaves the mountpoint unmounted and the daemon gone."""
        problems = []
        proc = self.proc
        alive_at_start = proc is not None and proc.poll() is None
        if proc is not None and not alive_at_start and not self.expect_dead:
            rc = proc.returncode
            if rc != 0:
                problems.append(f"daemon pid {proc.pid} had died unexpectedly (rc={rc})")
        if is_mounted(self.mp, None):
            try:
                r = self.umount_cmd(force=True, timeout=60)
                if r.returncode != 0 and alive_at_start:
                    problems.append(f"`modelfs umount --force` failed rc={r.returncode}: {r.stderr.strip()!r}")
            except subprocess.TimeoutExpired:
                problems.append("`modelfs umount --force` timed out")
            if is_mounted(self.mp, None):
                if alive_at_start:
                    problems.append("mount still present after `modelfs umount --force`")
                fusermount_lazy(self.mp)
        if proc is not None and proc.poll() is None:
            # `umount --force` detaches lazily; a daemon whose files are still open
            # somewhere (e.g. leaked by a failed test) stays until they close.
            # Clean exits are checked by unmount() and the umount tests, so here
            # just SIGKILL it after a grace period.
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._log(f"daemon pid {proc.pid} still alive 10s after umount --force; SIGKILL")
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        if is_mounted(self.mp, None):
            fusermount_lazy(self.mp)
            try:
                wait_until(lambda: not is_mounted(self.mp, None), 10, what="lazy unmount")
            except TimeoutError:
                problems.append(f"could not unmount {self.mp}")
        if problems:
            self._log("teardown problems: " + "; ".join(problems))
        if problems and raise_on_problem and (alive_at_start or not self.expect_dead):
            raise AssertionError("modelfs teardown: " + "; ".join(problems)
                                 + f"\n--- log ---\n{self.log_tail()}")

    def destroy(self):
        """stop() + run cleanup callbacks + remove the temp tree (never through a live mount)."""
        err = None
        try:
            self.stop()
        except AssertionError as e:
            err = e
        for cb in reversed(self.cleanup_callbacks):
            try:
                cb()
            except Exception as e:  # noqa: BLE001
                self._log(f"cleanup callback failed: {e}")
        if not is_mounted(self.mp, None) and not any(
                p.startswith(str(self.root) + "/") for p, _, _ in mountinfo()):
            shutil.rmtree(self.root, ignore_errors=True)
        if self in _ALL_MOUNTS:
            _ALL_MOUNTS.remove(self)
        if err:
            raise err

    # -- status ----------------------------------------------------------
    def status(self) -> dict:
        # `status` of all mounts skips one that is going away (another test's); if this mount is
        # missing, ask again for a few seconds, then fail with what status said and the log.
        deadline = time.monotonic() + 5
        while True:
            r = run([self.bin, "status", "--json"], timeout=30)
            assert r.returncode == 0, f"`modelfs status --json` failed rc={r.returncode}: {r.stderr.strip()!r}"
            try:
                doc = json.loads(r.stdout)
            except json.JSONDecodeError as e:
                raise AssertionError(f"`modelfs status --json` printed non-JSON ({e}): {r.stdout[:2000]!r}")
            try:
                return _pick_status(doc, self)
            except AssertionError as e:
                if time.monotonic() >= deadline:
                    raise AssertionError(f"{e}\nstderr: {r.stderr.strip()!r}\ndaemon log:\n{self.log_tail(4000)}")
                time.sleep(0.2)


def _pick_status(doc, m: Mount) -> dict:
    """status finds mounts by itself; accept a single object, or a list/`mounts`
    wrapper from which the entry for this mount is chosen."""
    if isinstance(doc, dict) and "files" in doc:
        return doc
    items = None
    if isinstance(doc, list):
        items = doc
    elif isinstance(doc, dict):
        for k in ("mounts", "filesystems", "nodes"):
            if isinstance(doc.get(k), list):
                items = doc[k]
                break
    if not items:
        raise AssertionError(f"unexpected `status --json` shape: {json.dumps(doc)[:2000]}")
    want = {os.path.realpath(m.mp), os.path.realpath(m.data)}
    for it in items:
        if isinstance(it, dict) and any(isinstance(v, str) and os.path.realpath(v) in want
                                        for v in it.values()):
            return it
    if len(items) == 1:
        return items[0]
    raise AssertionError(f"no entry for {m.mp} in `status --json`: {json.dumps(doc)[:2000]}")




def errno_name(e: int | None) -> str:
    return errno.errorcode.get(e, str(e)) if e is not None else "None"
