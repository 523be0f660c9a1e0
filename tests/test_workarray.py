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


def test_counted_chunks_are_deleted_once_every_reader_has_read_them(tmp_path):
    """With reader counts a chunk's file goes once its last reader releases it (a reader counted once however
    often it releases), a rewrite starts the count afresh, and uncounted arrays keep everything."""
    data = np.arange(2 * 20 * 20, dtype=np.float32).reshape(2, 20, 20)
    target, tokens = stage(da.from_array(data, chunks=(2, 10, 10)), tmp_path / "s")
    tokens.compute(scheduler="sync")
    target.release((0, 20), (0, 20), "x")  # not counted: nothing happens
    assert len(list((tmp_path / "s").glob("*.npy"))) == 4
    counted = target.counted({(0, 0): 2, (0, 1): 1, (1, 0): 1, (1, 1): 3})
    counted.release((0, 12), (0, 8), "a")  # reads chunks (0, 0) and (1, 0)
    counted.release((0, 12), (0, 8), "a")  # the same reader again (a task run twice): still one
    assert not (tmp_path / "s" / "1.0.npy").exists() and (tmp_path / "s" / "0.0.npy").exists()
    counted.release((0, 5), (0, 15), "b")  # chunks (0, 0) and (0, 1)
    assert not (tmp_path / "s" / "0.0.npy").exists() and not (tmp_path / "s" / "0.1.npy").exists()
    counted.release((15, 20), (15, 20), "c")
    counted.release((15, 20), (15, 20), "d")
    counted.write(data[:, 10:, 10:], (10, 20), (10, 20))  # rewritten: its earlier readers no longer count
    counted.release((15, 20), (15, 20), "e")
    assert (tmp_path / "s" / "1.1.npy").exists()
    assert np.array_equal(counted[:, 10:20, 10:20], data[:, 10:, 10:])
    counted.release((15, 20), (15, 20), "f")
    counted.release((15, 20), (15, 20), "g")
    assert not (tmp_path / "s" / "1.1.npy").exists()


def test_a_released_way_back_gives_the_same_labels_and_leaves_no_chunk(tmp_path):
    """The labels-only way back with staged chunks deleted as they are read equals the one that keeps them; at
    the end no staged chunk is left."""
    from types import SimpleNamespace

    from rasterio.transform import from_origin
    from scipy.ndimage import zoom

    from storage.rastergrid import raster_mapping
    from storage.wayback import RasterWayBack

    rng = np.random.default_rng(4)
    geometry = SimpleNamespace(transform=tuple(from_origin(500000, 6000000, 5, 5))[:6], epsg=32633, crs_wkt=None)
    m = raster_mapping(geometry, (90, 70), spacing=[10.0, 10.0], crs=None)
    coarse = rng.dirichlet(np.ones(3), size=(9, 7)).transpose(2, 0, 1)  # smooth classes: boundaries and interiors
    probs = np.stack([zoom(c, (m.model_shape[0] / 9, m.model_shape[1] / 7), order=1) for c in coarse])
    probs = (probs / probs.sum(0)).astype(np.float32)
    probs = da.from_array(probs, chunks=(3, 16, 16))
    kept = RasterWayBack(m, stage=tmp_path / "kept").labels(probs, (20, 20), "bilinear", np.uint8)
    gone = RasterWayBack(m, stage=tmp_path / "gone", release=True).labels(probs, (20, 20), "bilinear", np.uint8)
    with dask.config.set(scheduler="threads", num_workers=2):
        a, b = kept.compute(), gone.compute()
    assert np.array_equal(a, b)
    assert len(list((tmp_path / "kept").glob("*.npy"))) == 9 and not list((tmp_path / "gone").glob("*.npy"))
    # the released way back computed the input pixels straddling two model chunks apart, from the strips
    assert any(str(key[0]).endswith("-inner") for key in dict(gone.__dask_graph__()))
    # with a memory budget that three rows of model chunks fit in, it keeps whole chunks only (no strips)
    from storage import workarray

    held = RasterWayBack(m, stage=tmp_path / "held", release=True, memory=1 << 30)
    whole = held.labels(probs, (20, 20), "bilinear", np.uint8)
    assert not any(str(key[0]).endswith("-inner") for key in dict(whole.__dask_graph__()))
    with dask.config.set(scheduler="threads", num_workers=2):
        assert np.array_equal(whole.compute(), a)
    workarray.forget(tmp_path / "held")


def test_a_grouped_way_back_and_its_block_writes_equal_the_chunk_by_chunk_ones(tmp_path):
    """Labels grouped in blocks of input chunks (one task per model chunk's span) equal the chunk-by-chunk way
    back; the block writes store the wanted chunks (all of a block in one call, or some of it on resume), with
    nodata where the mask says so, and give each chunk the histogram and completion record of a chunk write."""
    import zarr
    from rasterio.transform import from_origin
    from types import SimpleNamespace

    from segmentation.chunkwrites import chunk_boxes, chunk_writes, group_writes
    from storage.rastergrid import raster_mapping
    from storage.wayback import RasterWayBack

    rng = np.random.default_rng(5)
    geometry = SimpleNamespace(transform=tuple(from_origin(500000, 6000000, 5, 5))[:6], epsg=32633, crs_wkt=None)
    m = raster_mapping(geometry, (90, 70), spacing=[10.0, 10.0], crs=None)
    probs = rng.dirichlet(np.ones(3), size=m.model_shape).transpose(2, 0, 1).astype(np.float32)
    probs = da.from_array(probs, chunks=(3, 20, 20))  # a model chunk spans two 20-pixel input chunks per side
    way = RasterWayBack(m, stage=tmp_path / "stage")
    plain = way.labels(probs, (20, 20), "bilinear", np.uint8, empty=255)
    grouped = way.labels(probs, (20, 20), "bilinear", np.uint8, empty=255, grouped=True)
    assert plain.chunks == ((20, 20, 20, 20, 10), (20, 20, 20, 10))
    assert grouped.chunks == ((40, 40, 10), (40, 30))
    with dask.config.set(scheduler="threads", num_workers=2):
        a, b = dask.compute(plain, grouped)
    assert np.array_equal(a, b)

    boxes = chunk_boxes(plain.chunks)
    mask = rng.random((90, 70)) > 0.2
    masks = {idx: mask[tuple(slice(*r) for r in box)] for idx, box in boxes.items()}
    only = [idx for idx in boxes if (idx[0] + idx[1]) % 3]  # block (2, 0) wanted whole, every other one in part
    stores, records = [], []
    for way_of_writing in (chunk_writes, group_writes):
        target = zarr.create_array(tmp_path / f"{way_of_writing.__name__}.zarr", shape=(90, 70), chunks=(20, 20),
                                   dtype="uint8", fill_value=7)
        seen: dict = {}
        if way_of_writing is chunk_writes:
            blocks = plain.to_delayed()
            writes = chunk_writes({idx: blocks[idx] for idx in boxes}, boxes, masks, 3, target, name="w-", only=only,
                                  on_written=lambda i, r, seen=seen: seen.__setitem__(i, r["histogram"]))
        else:
            writes = group_writes(grouped, boxes, masks, 3, target, name="g-", only=only,
                                  on_written=lambda i, r, seen=seen: seen.__setitem__(i, r["histogram"]))
        with dask.config.set(scheduler="threads", num_workers=2):
            results = dask.compute(*writes)
        flat = [r for res in results for r in (res if isinstance(res, list) else [res])]
        assert sorted(r["index"] for r in flat) == sorted(only) and sorted(seen) == sorted(only)
        stores.append(target[:])
        records.append(seen)
    assert np.array_equal(stores[0], stores[1]) and records[0] == records[1]
    written = np.zeros((90, 70), bool)
    for idx in only:
        written[tuple(slice(*r) for r in boxes[idx])] = True
    assert (stores[1][~written] == 7).all()  # chunks not asked for are left alone
    assert (stores[1][written & ~mask] == 255).all() and np.array_equal(stores[1][written & mask], a[written & mask])
    # blocks that cut a chunk are refused rather than leave it unwritten
    with pytest.raises(ValueError, match="do not hold whole chunks"):
        group_writes(grouped.rechunk(((30, 50, 10), (40, 30))), boxes, None, 3, target, name="x-")


def test_strips_read_like_the_chunks_and_let_a_whole_chunk_go_before_the_readers_of_its_borders(tmp_path):
    """With strips, a region that takes no more than a chunk's border rows or columns (or a corner of both)
    reads their copy: every region reads the stored values, and a counted whole chunk goes once its own
    readers have read it while its strips stay for theirs, in files or held in memory."""
    from storage import workarray

    rng = np.random.default_rng(2)
    data = rng.random((2, 20, 24)).astype(np.float32)
    for memory in (0, 1 << 20):
        path = tmp_path / f"s{memory}"
        target, tokens = stage(da.from_array(data, chunks=(2, 10, 12)), path, memory, strip=2)
        tokens.compute(scheduler="sync")
        assert target.parts_of((9, 11), (0, 12)) == [(0, 0, "bottom"), (1, 0, "top")]
        assert target.parts_of((8, 12), (11, 13)) == [(0, 0, "bottom-right"), (0, 1, "bottom-left"),
                                                      (1, 0, "top-right"), (1, 1, "top-left")]
        assert target.parts_of((0, 10), (0, 2)) == [(0, 0, "left")]
        assert target.parts_of((0, 3), (0, 12)) == [(0, 0)]  # more rows than the strip holds: the whole chunk
        for _ in range(300):
            r0, c0 = int(rng.integers(0, 20)), int(rng.integers(0, 24))
            r1, c1 = int(rng.integers(r0 + 1, 21)), int(rng.integers(c0 + 1, 25))
            assert np.array_equal(target[:, r0:r1, c0:c1], data[:, r0:r1, c0:c1]), (r0, r1, c0, c1)

        def stored(key):
            name = ".".join(map(str, key)) + ".npy"
            return (path / name).exists() if not memory else workarray._HELD.get(str(path), key) is not None

        counted = target.counted({(0, 0): 1, (0, 0, "bottom"): 1, (1, 0, "top"): 1})
        counted.release((0, 10), (0, 12), "inside")
        assert not stored((0, 0)) and stored((0, 0, "bottom"))  # the whole chunk went, its strip stays
        assert np.array_equal(counted[:, 9:11, 0:12], data[:, 9:11, 0:12])
        counted.release((9, 11), (0, 12), "across")
        assert not stored((0, 0, "bottom")) and not stored((1, 0, "top")) and stored((1, 0))
        workarray.forget(path)


def test_chunks_held_in_memory_read_back_exactly_spill_past_the_budget_and_go_when_read_or_forgotten(tmp_path):
    """With a memory budget, chunks stay in this process (no file) until the budget is reached, the rest go to
    files; any region reads the same either way; a counted chunk is dropped by its last reader; forgetting the
    array drops the rest and keeps nothing written after it (an abandoned run's late task)."""
    from storage import workarray

    rng = np.random.default_rng(3)
    data = rng.random((2, 40, 30), dtype=np.float32)
    chunk_bytes = 2 * 20 * 15 * 4
    held_before = workarray._HELD.nbytes
    target, tokens = stage(da.from_array(data, chunks=(2, 20, 15)), tmp_path / "s", memory=2 * chunk_bytes)
    tokens.compute(scheduler="sync")
    files = sorted(p.name for p in (tmp_path / "s").glob("*.npy"))
    assert len(files) == 2  # two of the four chunks held, two written
    assert workarray._HELD.nbytes - held_before == 2 * chunk_bytes
    for _ in range(30):
        r0, c0 = int(rng.integers(0, 40)), int(rng.integers(0, 30))
        r1, c1 = int(rng.integers(r0, 41)), int(rng.integers(c0, 31))
        assert np.array_equal(target[:, r0:r1, c0:c1], data[:, r0:r1, c0:c1])
    held = [(i, j) for i in range(2) for j in range(2) if f"{i}.{j}.npy" not in files]
    counted = target.counted({ij: 2 for ij in [(0, 0), (0, 1), (1, 0), (1, 1)]})
    i, j = held[0]
    box = ((i * 20, i * 20 + 20), (j * 15, j * 15 + 15))
    counted.release(*box, "a")
    assert workarray._HELD.nbytes - held_before == 2 * chunk_bytes  # one reader of two
    counted.release(*box, "b")
    assert workarray._HELD.nbytes - held_before == chunk_bytes
    with pytest.raises(FileNotFoundError):  # gone from memory, never a file
        counted[:, box[0][0]:box[0][1], box[1][0]:box[1][1]]
    workarray.forget(tmp_path / "s")
    assert workarray._HELD.nbytes == held_before
    counted.write(data[:, :20, :15], (0, 20), (0, 15))  # after the end: kept nowhere
    assert workarray._HELD.nbytes == held_before and not (tmp_path / "s" / "0.0.npy").exists()


def test_forgetting_a_runs_held_chunks_drops_them_in_the_worker_and_never_raises_after_its_cluster_died(tmp_path):
    """The run's end drops the chunks its way back held, through the client; when the run failed because its
    cluster went away, the worker's memory went with it and the cleanup must not replace the run's own error."""
    from distributed import Client, LocalCluster

    from flows.modelspace import forget_staged
    from storage import workarray
    from storage.wayback import RasterWayBack

    stage_path = tmp_path / "staged-probabilities-x"
    plan = type("Plan", (), {"way_back": RasterWayBack(None, stage=stage_path, release=True, memory=1 << 20)})()
    data = np.ones((2, 8, 8), np.float32)
    target, tokens = stage(da.from_array(data, chunks=(2, 4, 4)), stage_path, memory=1 << 20)
    tokens.compute(scheduler="sync")
    assert workarray._HELD.get(str(stage_path), (0, 0)) is not None
    with LocalCluster(n_workers=1, processes=False, dashboard_address=None) as cluster, Client(cluster) as client:
        forget_staged(plan, client)  # the in-process worker is this process: its held chunks go
        assert workarray._HELD.get(str(stage_path), (1, 1)) is None
    forget_staged(plan, client)  # closed client and cluster: nothing raised
