"""The way back's work array: chunks written as files by tasks, regions read back exactly."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest

from storage.workarray import ChunkFiles, stage


def test_staged_chunks_read_back_any_region_exactly(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.random((3, 70, 53), dtype=np.float32)
    array = da.from_array(data, chunks=(3, (20, 30, 20), (17, 17, 19)))
    (tmp_path / "staged").mkdir()
    (tmp_path / "staged" / "9.9.npy").write_bytes(b"an earlier run's leftover")
    target, tokens = stage(array, tmp_path / "staged")
    assert not (tmp_path / "staged").exists()  # cleared when the graph is made
    assert tokens.numblocks == (1, 3, 3)
    assert tokens.compute(scheduler="threads").all()
    files = sorted(p.name for p in (tmp_path / "staged").iterdir())
    assert files == [f"{i}.{j}.npy" for i in range(3) for j in range(3)]  # nothing half-written left beside them
    for _ in range(50):
        r0, c0 = int(rng.integers(0, 70)), int(rng.integers(0, 53))
        r1, c1 = int(rng.integers(r0, 71)), int(rng.integers(c0, 54))
        assert np.array_equal(target[:, r0:r1, c0:c1], data[:, r0:r1, c0:c1])
        assert np.array_equal(target[1, r0:r1, c0:c1], data[1, r0:r1, c0:c1])
    assert np.array_equal(target[:, :, :], data)
    # pickled to a worker, it reads the same files
    import pickle

    again = pickle.loads(pickle.dumps(target))
    assert np.array_equal(again[:, 5:60, 10:40], data[:, 5:60, 10:40])


def test_a_write_must_be_one_whole_chunk(tmp_path):
    target = ChunkFiles(tmp_path / "w", (1, 10, 10), np.float32, ((5, 5), (10,)))
    with pytest.raises(ValueError, match="not one chunk"):
        target.write(np.zeros((1, 3, 10), np.float32), (0, 3), (0, 10))
    with pytest.raises(IndexError, match="step 1"):
        target[:, ::2, :]


def test_staging_inside_a_larger_graph_waits_for_nothing_else(tmp_path):
    """Each token depends only on its own chunk: a reader that waits for the tokens under its region can run
    before the rest of the array is computed."""
    array = da.arange(2 * 40 * 40, dtype=np.float32).reshape(2, 40, 40).rechunk((2, 10, 10))
    _, tokens = stage(array, tmp_path / "s")
    graph = dict(tokens.__dask_graph__())
    key = (tokens.name, 0, 1, 2)
    deps = dask.core.get_dependencies(graph, key)
    assert len(deps) == 1
