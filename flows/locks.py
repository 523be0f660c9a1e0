"""Per-input locks beside the outputs: two runs on one output folder never work on the same input at once.

Two ``segflow nightly`` runs started together (an overlapping cron, a manual
run during the nightly one) would otherwise both hash an input, both find no
ledger entry and both segment it into the same output names.  Each input's
task therefore holds ``<folder>/<name>.lock`` while it checks the ledger and
segments; the other run reports the input ``locked`` and moves on.  The name
is the input's output stem (outputs are named by stem, so two inputs with the
same stem would clash on output files too).

The lock file is a small JSON document (host, pid, the process's start time,
the lock's start and heartbeat times, a random token), made complete under a
hidden name and hard-linked into place: ``link`` fails when the name exists,
so exactly one of several racing runs (or threads) wins, and nobody ever
reads a half-written lock.  While the lock is held a heartbeat thread rewrites
the heartbeat time into the holder's own open file (never into whatever file
has the name now).

A lock is stale, and broken, when its heartbeat (the later of the recorded
time and the file's mtime) is older than ``stale_after`` seconds (default 10
minutes), or at once when it names this host and its process is gone (a
killed run).  Breaking happens under a short-lived guard file created with
``O_EXCL``: the breaker re-reads the lock under the guard and removes it only
if it is still the same file (inode) and still stale, so two breakers cannot
both win and a fresh lock taken meanwhile is never removed.  Release also
removes the lock under the guard, only when it is still the holder's own file.

Limits: the heartbeat is the only liveness signal across hosts, so every run
sharing an output folder should use the same ``stale_after``, and a host whose
clock is off by more than that can break a live lock.  It needs a file system
with ``O_EXCL`` and hard links that all runs see (local disks, NFSv3+ and most
network file systems); a folder without hard links falls back to ``O_EXCL``
alone.  A guard left by a process killed inside its few-millisecond critical
section is removed after :data:`GUARD_STALE_S`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCKS_DIR = ".segflow-locks"  # under the output folder
SCHEMA = "segflow.input-lock/1"
DEFAULT_STALE_AFTER_S = 600.0
GUARD_STALE_S = 30.0  # a guard is held for milliseconds; one this old was left by a killed process
HOST = socket.gethostname()


def lock_name(stem: str) -> str:
    """A file name for a stem: ``<stem>.lock``; a very long stem shortened with a digest (names stay < 255)."""
    safe = stem.replace(os.sep, "_").lstrip(".") or "_"
    if len(safe) > 200:
        safe = f"{safe[:150]}-{hashlib.sha256(stem.encode()).hexdigest()[:16]}"
    return f"{safe}.lock"


def _now_text() -> str:
    """UTC, fixed width: a heartbeat rewrite never changes the file's length."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_time(text: Any) -> float | None:
    try:
        return _dt.datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=_dt.timezone.utc).timestamp()
    except ValueError:
        return None


def _write_all(fd: int, data: bytes) -> None:
    """All of ``data``: a write that meets a full disk or a file size limit stores what fits and says nothing,
    which had taken a lock with half its document; the next write raises."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (Linux), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the holder."""
    fields = _proc_stat(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int, started: int | None = None) -> bool:
    """Whether process ``pid`` of this host runs (a zombie or a pid reused since ``started`` does not)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by another user
        pass
    fields = _proc_stat(pid)
    if fields:
        if fields[0] in ("Z", "X"):
            return False
        if started is not None and process_start(pid) not in (None, started):
            return False
    return True


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as its file says."""

    host: str
    pid: int | None
    started: str | None
    heartbeat_age_s: float
    input: str | None = None

    def describe(self) -> str:
        return (f"host {self.host}, pid {self.pid}, since {self.started or '?'}, "
                f"heartbeat {self.heartbeat_age_s:.0f} s ago")


def _holder(info: dict[str, Any], st: os.stat_result) -> Holder:
    beat = max(_parse_time(info.get("heartbeat")) or 0.0, st.st_mtime)
    pid = info.get("pid")
    return Holder(host=str(info.get("host") or "?"), pid=pid if isinstance(pid, int) else None,
                  started=info.get("started"), heartbeat_age_s=max(0.0, time.time() - beat),
                  input=info.get("input"))


def stale_reason(info: dict[str, Any], st: os.stat_result, stale_after: float) -> str | None:
    """Why a lock (its JSON, possibly {} when unreadable, and its stat) is stale; None when it is live."""
    holder = _holder(info, st)
    if holder.host == HOST and holder.pid is not None:
        started = info.get("pid_start")
        if not pid_alive(holder.pid, started if isinstance(started, int) else None):
            return f"its run (pid {holder.pid} on this host) has ended"
    # the holder's own timeout counts too: it beats at a quarter of it (at most every 60 s), so a run started with
    # `--lock-timeout 5` broke a live `segment`'s lock 30 s into a beat, deleted its partial store and failed it
    declared = info.get("stale_after_s")
    if isinstance(declared, (int, float)) and not isinstance(declared, bool) and declared > 0:
        stale_after = max(stale_after, float(declared))
    if holder.heartbeat_age_s > stale_after:
        return f"no heartbeat for {holder.heartbeat_age_s:.0f} s (stale after {stale_after:.0f} s)"
    return None


class InputLock:
    """``folder/<name>.lock``: :meth:`acquire` it (None, or who holds it), and :meth:`release` it in a finally."""

    def __init__(self, folder: str | os.PathLike[str], stem: str, *, stale_after: float = DEFAULT_STALE_AFTER_S,
                 heartbeat_every: float | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / lock_name(stem)
        self.guard = self.folder / f".{self.path.name}.guard"
        self.stale_after = float(stale_after)
        self.heartbeat_every = heartbeat_every or max(0.05, min(60.0, self.stale_after / 4))
        self.token = uuid.uuid4().hex
        self.broken: str | None = None  # set when acquiring broke a stale lock: whose, and why
        self.lost = False  # set when the heartbeat finds the lock broken by another run
        self._fd: int | None = None
        self._ident: tuple[int, int] | None = None
        self._info: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    # ---------------------------------------------------------------- acquire

    def acquire(self, input: str | None = None) -> Holder | None:  # noqa: A002 - what the lock file records
        """Take the lock: None when taken (a stale one is broken first), else the live holder."""
        if self.held:
            raise RuntimeError(f"{self.path} is already held by this object")
        holder: Holder | None = None
        for attempt in range(20):
            try:
                self._create(input)
                return None
            except FileExistsError:
                pass
            except FileNotFoundError:  # the folder was removed by a releasing run: make it again
                continue
            except OSError:  # a full disk, a read-only folder: the folder this made was left behind, empty
                with contextlib.suppress(OSError):
                    self.folder.rmdir()
                raise
            seen = self._read()
            if seen is None:  # released meanwhile
                continue
            info, st = seen
            holder = _holder(info, st)
            why = stale_reason(info, st, self.stale_after)
            if why is None:
                return holder
            if not self._break(st, why, holder):
                time.sleep(0.02 * (attempt + 1))
        return holder or Holder(host="?", pid=None, started=None, heartbeat_age_s=0.0, input=input)

    def _create(self, input: str | None) -> None:  # noqa: A002
        self.folder.mkdir(parents=True, exist_ok=True)
        self._info = {"schema": SCHEMA, "host": HOST, "pid": os.getpid(), "pid_start": process_start(os.getpid()),
                      "token": self.token, "input": input, "stale_after_s": self.stale_after,
                      "started": _now_text(), "heartbeat": _now_text()}
        data = self._content()
        tmp = self.folder / f".{self.path.name}.{self.token}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
            try:
                os.link(tmp, self.path)  # fails when the lock exists: the atomic test-and-set
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: O_EXCL on the name itself
                self._create_excl(fd, data)
        except BaseException:
            os.close(fd)
            raise
        finally:
            tmp.unlink(missing_ok=True)
        st = os.fstat(fd)
        self._fd, self._ident = fd, (st.st_dev, st.st_ino)
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lock-heartbeat-{self.path.name}", daemon=True)
        self._thread.start()

    def _create_excl(self, tmp_fd: int, data: bytes) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        _write_all(fd, data)
        os.fsync(fd)
        os.dup2(fd, tmp_fd)  # keep one descriptor: the lock's own file
        os.close(fd)

    def _content(self) -> bytes:
        return json.dumps(self._info, sort_keys=True).encode()

    def _read(self) -> tuple[dict[str, Any], os.stat_result] | None:
        try:
            with open(self.path, "rb") as fh:
                st = os.fstat(fh.fileno())
                raw = fh.read()
        except FileNotFoundError:
            return None
        try:
            info = json.loads(raw)
        except ValueError:  # being written (no-hard-link fallback) or damaged: judged by its mtime alone
            info = {}
        return (info if isinstance(info, dict) else {}), st

    # ---------------------------------------------------------------- break, heartbeat, release

    def _break(self, seen: os.stat_result, why: str, holder: Holder) -> bool:
        """Remove a stale lock if, under the guard, it is still that file and still stale; whether it is gone."""
        if not self._take_guard():
            return False
        try:
            now = self._read()
            if now is None:
                return True
            info, st = now
            if (st.st_dev, st.st_ino) != (seen.st_dev, seen.st_ino) or stale_reason(info, st, self.stale_after) is None:
                return False
            self.path.unlink(missing_ok=True)
            self.broken = f"took over a stale lock ({holder.describe()}): {why}"
            return True
        finally:
            self.guard.unlink(missing_ok=True)

    def _take_guard(self, wait_s: float = 2.0) -> bool:
        deadline = time.monotonic() + wait_s
        while time.monotonic() <= deadline:
            try:
                fd = os.open(self.guard, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                os.write(fd, f"{HOST} {os.getpid()}\n".encode())
                os.close(fd)
                return True
            except FileExistsError:
                try:
                    age = time.time() - os.stat(self.guard).st_mtime
                except FileNotFoundError:
                    continue
                if age > GUARD_STALE_S:
                    self.guard.unlink(missing_ok=True)
                    continue
            except FileNotFoundError:
                self.folder.mkdir(parents=True, exist_ok=True)
                continue
            time.sleep(0.01)
        return False

    def _beat(self) -> None:
        """Refresh the heartbeat in the holder's own file until released; notice when the lock was broken."""
        while not self._stop.wait(self.heartbeat_every):
            fd = self._fd
            if fd is None:
                return
            try:
                if os.fstat(fd).st_nlink == 0:
                    self.lost = True
                    return
                self._info["heartbeat"] = _now_text()
                data = self._content()
                os.pwrite(fd, data, 0)  # same length every time: a reader sees the old or the new document
                os.ftruncate(fd, len(data))
            except OSError:
                continue  # e.g. a network file system hiccup: try again at the next beat

    def still_held(self) -> bool:
        """Whether the lock's file is still this holder's (False: another run broke it, e.g. after a stall)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        return self._ident is not None and (st.st_dev, st.st_ino) == self._ident

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this holder's; the folder goes when empty."""
        if self._fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        guarded = self._take_guard()
        try:
            if self.still_held():
                self.path.unlink(missing_ok=True)
            else:  # broken by another run meanwhile (and maybe taken again): not ours to remove
                self.lost = True
        finally:
            if guarded:
                self.guard.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = self._ident = None
            with contextlib.suppress(OSError):
                self.folder.rmdir()


def clear_leftovers(out_dir: Path, stem: str) -> None:
    """Remove the temporary files a killed run of ``stem`` left in ``out_dir`` (its caller holds ``stem``'s
    lock, so no live run of it is writing them).  Skipped while another input whose stem extends this one
    (``a`` and ``a.b``) is locked: their temporary names could not be told apart."""
    from storage.atomic import leftover_temporaries

    folder = Path(out_dir) / LOCKS_DIR
    own = lock_name(stem)
    try:
        others = [p.name for p in folder.iterdir() if p.name.startswith(own[: -len(".lock")] + ".")
                  and p.name != own]
    except OSError:
        others = []
    if others:
        return
    for path in leftover_temporaries(Path(out_dir), stem):
        path.unlink(missing_ok=True)


__all__ = ["DEFAULT_STALE_AFTER_S", "Holder", "InputLock", "LOCKS_DIR", "clear_leftovers", "lock_name", "pid_alive",
           "stale_reason"]
