"""A training run killed with SIGKILL left its whole dataset, ingested, in /tmp; the next run removes it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from flows.scratch import OWNER_FILE, sweep

HOLD = """
import time
from flows.scratch import owned_scratch
with owned_scratch("segflow-test-") as folder:
    (folder / "case-0.image.zarr").mkdir()
    print(folder, flush=True)
    time.sleep(120)
"""


def _holder(tmp: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(tmp)}, cwd=Path(__file__).resolve().parents[1])
    return proc, Path(proc.stdout.readline().strip())


def test_a_killed_owners_scratch_folder_is_swept_and_a_live_ones_is_kept(tmp_path):
    live, live_folder = _holder(tmp_path)
    dead, dead_folder = _holder(tmp_path)
    try:
        dead.send_signal(signal.SIGKILL)
        dead.wait(timeout=30)
        assert dead_folder.is_dir() and (dead_folder / OWNER_FILE).is_file()  # what SIGKILL leaves
        foreign = tmp_path / "segflow-test-other"  # no owner file (another version's): left alone
        foreign.mkdir()
        assert sweep("segflow-test-", tmp_path) == [dead_folder]
        assert not dead_folder.exists() and live_folder.is_dir() and foreign.is_dir()
    finally:
        live.kill()
        live.wait(timeout=30)
