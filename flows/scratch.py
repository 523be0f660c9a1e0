"""Scratch folders that a killed command does not leave behind for good.

``segflow train`` ingests every case of its dataset into zarr stores in a
temporary folder and removes it at the end, or on Ctrl-C.  A SIGKILL (the OOM
killer, a cluster's pre-emption) ends the process before that: each killed run
left a whole copy of its dataset in ``/tmp``, and a resumed run made a new one.
:func:`owned_scratch` writes who owns the folder (pid and start time), and
each new one removes the folders of owners that are gone, on this host.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from flows.locks import pid_alive, process_start

OWNER_FILE = "owner.json"


@contextmanager
def owned_scratch(prefix: str) -> Iterator[Path]:
    """A new temporary folder named ``<prefix>…``, removed on exit; earlier ones whose owner died, removed first."""
    sweep(prefix)
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        me = os.getpid()
        (folder / OWNER_FILE).write_text(json.dumps({"pid": me, "started": process_start(me),
                                                     "host": socket.gethostname()}))
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def sweep(prefix: str, root: str | Path | None = None) -> list[Path]:
    """Remove ``<root>/<prefix>*`` folders whose recorded owner no longer runs on this host; the ones removed.
    A folder without a readable owner file (another version's, or one being made) is left alone."""
    removed = []
    for folder in Path(root or tempfile.gettempdir()).glob(f"{prefix}*"):
        try:
            owner = json.loads((folder / OWNER_FILE).read_text())
            pid, started, host = int(owner["pid"]), owner.get("started"), owner.get("host")
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if folder.is_symlink() or host != socket.gethostname() or pid_alive(pid, started):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


__all__ = ["OWNER_FILE", "owned_scratch", "sweep"]
