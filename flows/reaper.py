"""A watchdog that ends what a killed command leaves running.

Prefect 3 runs its temporary API server as a child process (uvicorn).  When
``segflow nightly`` was killed (SIGKILL, the OOM killer), nothing stopped it:
reparented to init, it kept its port, its memory and the dead command's
stdout open for hours.  :func:`start_reaper` starts a small process, in a
session of its own (a Ctrl-C in the terminal does not reach it), that notes
the command's descendants every second and, once the command is gone, ends
the ones still running.  A command that exits normally has stopped them
itself, and the watchdog exits with nothing to do.  ``psutil`` tells a
descendant from a later process that reuses its pid (it compares start times).
"""

from __future__ import annotations

import os
import subprocess
import sys

POLL_S = 1.0  # how often the descendants are noted: one that lives less than this is not needed at the end

_WATCH = r"""
import os, sys, time
import psutil

parent, poll, me = int(sys.argv[1]), float(sys.argv[2]), os.getpid()
seen = {}
while True:
    try:
        proc = psutil.Process(parent)
        if proc.status() == psutil.STATUS_ZOMBIE:
            break
        for child in proc.children(recursive=True):
            if child.pid != me:  # the watchdog is the command's child too
                seen.setdefault(child.pid, child)
    except psutil.NoSuchProcess:
        break
    except psutil.Error:
        pass
    time.sleep(poll)
left = []
for child in seen.values():
    try:
        if child.is_running():
            child.terminate()
            left.append(child)
    except psutil.Error:
        pass
_, alive = psutil.wait_procs(left, timeout=5)
for child in alive:
    try:
        child.kill()
    except psutil.Error:
        pass
"""


def start_reaper(poll_s: float = POLL_S) -> subprocess.Popen:
    """Start the watchdog for this process (it ends by itself once this process has)."""
    return subprocess.Popen([sys.executable, "-c", _WATCH, str(os.getpid()), str(poll_s)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            close_fds=True, start_new_session=True)


__all__ = ["POLL_S", "start_reaper"]
