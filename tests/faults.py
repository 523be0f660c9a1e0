"""Fault injection for the kill tests: a Dask worker plugin that SIGKILLs its own worker process, once.

Kept in its own small module so that worker processes can import it by name
(the plugin travels to them pickled by reference).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from distributed import WorkerPlugin


class KillWorkerOnce(WorkerPlugin):
    """After ``after`` tasks whose key starts with ``task`` (stitching's evaluate step) finished here, SIGKILL
    this worker process.

    ``marker`` is created first with O_EXCL, so across all workers (and the
    worker the nanny starts in place of the dead one, which gets the plugin
    again) exactly one process dies.  The kill lands right after an evaluate
    result reached the worker's memory, so the scheduler has to recompute it
    and reschedule everything that was running there.
    """

    name = "segflow-test-kill-worker-once"

    def __init__(self, marker: str, after: int = 2, task: str = "segflow_evaluate-") -> None:
        self.marker, self.after, self.task = marker, after, task
        self.seen = 0

    def setup(self, worker: Any) -> None:
        self.seen = 0

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if finish != "memory" or not str(key).startswith(self.task):
            return
        self.seen += 1
        if self.seen < self.after:
            return
        try:
            fd = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return
        os.write(fd, f"{os.getpid()} {key}\n".encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)


def executing_tasks(dask_worker: Any) -> int:
    """How many tasks a worker is running now (``client.run`` passes the worker), cancelled ones included."""
    return len(dask_worker.state.executing)


def group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is left in process group ``pgid``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False
