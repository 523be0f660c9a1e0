"""A failed input's tasks that still run when it is abandoned (Dask cannot stop a running task).

On a full disk one chunk write of an input failed, its partial store was removed, and the chunk writes still
running on the workers made it again: a hidden ``.scene.zarr.<id>.partial/labels/c/0/3/0`` stayed in an OUT
whose every input had failed.  ``flows.infer.wait_for_cancelled`` waits for them before anything is removed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from flows.infer import wait_for_cancelled


def _write_later(folder: str, seconds: float) -> str:
    """A chunk write that is still running when its input is abandoned."""
    time.sleep(seconds)
    path = Path(folder) / uuid.uuid4().hex
    path.write_bytes(b"chunk")
    return str(path)


def test_cancelled_tasks_still_running_are_waited_for(tmp_path, dask_cluster):
    futures = [dask_cluster.submit(_write_later, str(tmp_path), 1.5, pure=False) for _ in range(2)]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(  # both worker threads are inside their tasks
            dask_cluster.processing().values()):
        time.sleep(0.05)
    time.sleep(0.2)
    dask_cluster.cancel(futures)
    assert list(tmp_path.iterdir()) == []  # cancelled, and still running
    assert wait_for_cancelled(dask_cluster, futures)
    written = sorted(tmp_path.iterdir())
    assert len(written) == 2  # they ran to their end before the wait returned
    time.sleep(2.0)
    assert sorted(tmp_path.iterdir()) == written  # and nothing is written after it
    assert wait_for_cancelled(dask_cluster, [])  # nothing running: at once


def _tmpfs(folder: Path, size: str) -> bool:
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_a_full_disk_leaves_no_partial_store_and_no_out_folder(tmp_path):
    """Three scenes, outputs on a 3 MB file system: every input fails, each on its own line, and nothing is left
    (the probe found a partial store's chunk in OUT after such a run)."""
    from storage.samples import make_scene
    from tests.models import tiny_model

    disk = tmp_path / "small"
    if not _tmpfs(disk, "3m"):
        pytest.skip("needs root and a tmpfs mount (a full disk that a test can make and unmake)")
    try:
        model = tiny_model(tmp_path / "model", spatial_dims=2, channels=4, classes=5, roi=[64, 64])
        scenes = [make_scene(tmp_path / f"scene{i}.tif", size=(512, 512), seed=i)[0] for i in range(3)]
        proc = subprocess.run([sys.executable, "-m", "flows", "segment", *map(str, scenes), "--model",
                               str(model.path), "--out", str(disk / "o"), "--chunk-size", "128", "--probabilities",
                               "float32"],
                              capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"})
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 1 and len(errors) == 3, proc.stderr[-3000:]
        for scene in scenes:
            assert any(line.startswith(f"error: {scene}: ") for line in errors), (scene, errors)
        assert [line for line in errors if "No space left on device" in line or "no space left" in line] == errors
        left = [str(p.relative_to(disk)) for p in disk.rglob("*")]
        assert left == [], left
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
