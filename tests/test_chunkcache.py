"""A run's reads of a stored image go through decoded chunks, each decoded once and dropped after its last reader.

Real zarr stores on disk; the stitched runs are checked against MONAI's
whole-image ``sliding_window_inference`` and against the same run with the
cache off (``SEGFLOW_CHUNK_CACHE_MB=0``).
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from segmentation import build_plan, predict
from storage import chunkcache
from tests.test_stitching import monai_reference, tiny_net


def _store(path, shape, chunks, seed=0) -> tuple[zarr.Array, np.ndarray]:
    arr = zarr.create_array(str(path), shape=shape, chunks=chunks, dtype="float32", overwrite=True)
    data = np.random.default_rng(seed).random(shape, dtype=np.float32)
    arr[:] = data
    return arr, data


def _decoded(arr: zarr.Array) -> int:
    return int(np.prod([-(-n // c) for n, c in zip(arr.shape, arr.chunks)]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_cached_read_is_the_stored_values(tmp_path, data):
    arr, values = _store(tmp_path / "a.zarr", (3, 37, 29), (2, 8, 11))
    boxes = []
    for _ in range(data.draw(st.integers(1, 5))):
        box = []
        for n in arr.shape:
            lo = data.draw(st.integers(0, n - 1))
            box.append((lo, data.draw(st.integers(lo + 1, n))))
        boxes.append(tuple(box))
    counts = chunkcache.reader_counts(arr.chunks, boxes)
    token = f"t-{id(boxes)}"
    for box in boxes:
        reader = chunkcache.CachedChunks(arr, token, {i: counts[i] for i in chunkcache.chunks_of(arr.chunks, box)})
        np.testing.assert_array_equal(reader.read(box), values[tuple(slice(lo, hi) for lo, hi in box)])
    assert chunkcache.forget(token)["bytes"] == 0


def test_each_chunk_is_decoded_once_and_dropped_after_its_last_reader(tmp_path):
    arr, values = _store(tmp_path / "b.zarr", (2, 40, 40), (2, 10, 10))
    boxes = [((0, 2), (max(0, y - 3), min(40, y + 13)), (max(0, x - 3), min(40, x + 13)))
             for y in range(0, 40, 10) for x in range(0, 40, 10)]  # each chunk with a 3-pixel halo
    counts = chunkcache.reader_counts(arr.chunks, boxes)
    assert counts[(0, 1, 1)] == 9 and counts[(0, 0, 0)] == 4
    before = chunkcache.stats()
    readers = [chunkcache.CachedChunks(arr, "once", {i: counts[i] for i in chunkcache.chunks_of(arr.chunks, b)})
               for b in boxes]
    errors = []

    def work(part):
        try:
            for box, reader in part:
                np.testing.assert_array_equal(reader.read(box), values[tuple(slice(lo, hi) for lo, hi in box)])
        except AssertionError as exc:  # pragma: no cover  (reported below)
            errors.append(exc)

    pairs = list(zip(boxes, readers))
    threads = [threading.Thread(target=work, args=(pairs[k::2],)) for k in range(2)]  # two readers at once
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    after = chunkcache.stats()
    assert after["decodes"] - before["decodes"] == _decoded(arr)  # 16 chunks; 64 decodes without the cache
    assert after["hits"] - before["hits"] == sum(counts.values()) - _decoded(arr)
    assert after["bytes"] == before["bytes"]  # the last reader of each chunk dropped it


def test_the_budget_caps_what_is_held_and_zero_turns_it_off(tmp_path, monkeypatch):
    arr, values = _store(tmp_path / "c.zarr", (1, 64, 64), (1, 16, 16))  # 1 KB chunks
    box = ((0, 1), (0, 64), (0, 64))
    readers = {i: 5 for i in chunkcache.chunks_of(arr.chunks, box)}  # readers still to come: all would be kept
    monkeypatch.setenv(chunkcache.BUDGET_ENV, str(4 * 1024 / 2**20))  # four chunks
    np.testing.assert_array_equal(chunkcache.CachedChunks(arr, "capped", readers).read(box), values)
    assert chunkcache.stats()["bytes"] <= 4 * 1024
    assert chunkcache.forget("capped")["bytes"] == 0
    monkeypatch.setenv(chunkcache.BUDGET_ENV, "0")
    before = chunkcache.stats()["decodes"]
    np.testing.assert_array_equal(chunkcache.CachedChunks(arr, "off", readers).read(box), values)
    assert chunkcache.stats()["decodes"] == before  # plain zarr reads
    for nonsense in ("inf", "-inf", "nan", "abc"):  # the default, as documented ("inf" had failed every input)
        monkeypatch.setenv(chunkcache.BUDGET_ENV, nonsense)
        assert chunkcache.budget() == chunkcache.DEFAULT_BUDGET, nonsense


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_a_stitched_run_reads_each_stored_chunk_once_and_equals_monai(tmp_path, monkeypatch, precision):
    arr, data = _store(tmp_path / "img.zarr", (3, 150, 170), (3, 40, 40), seed=4)
    net = tiny_net(2, 3, 4)
    before = chunkcache.stats()
    labels = predict(arr, net, roi=(32, 32), overlap=0.25, chunks=40, precision=precision,
                     probabilities=False).compute(scheduler="threads", num_workers=2)
    after = chunkcache.stats()
    assert after["decodes"] - before["decodes"] == _decoded(arr)  # 20 chunks, read 63 times by the regions
    assert after["hits"] - before["hits"] + after["decodes"] - before["decodes"] == 63
    assert after["bytes"] == before["bytes"]
    monkeypatch.setenv(chunkcache.BUDGET_ENV, "0")
    plain = predict(arr, net, roi=(32, 32), overlap=0.25, chunks=40, precision=precision,
                    probabilities=False).compute(scheduler="threads", num_workers=2)
    assert np.array_equal(labels, plain)
    if precision == "exact":
        assert np.array_equal(labels, monai_reference(data, net, (32, 32), 0.25).argmax(0))


@pytest.mark.parametrize("precision", ["exact", "fast"])
def test_a_raster_warped_on_read_warps_each_model_chunk_once(tmp_path, monkeypatch, precision):
    """A 5 m store read by a 10 m model (storage.modelview.WarpedImage): the regions are cut from whole model
    chunks, each warped once, and the labels are those of region-by-region warps and of MONAI on the whole
    warped image."""
    from rasterio.transform import from_origin

    from storage.geometry import RasterGeometry
    from storage.modelview import WarpedImage
    from storage.rastergrid import raster_mapping
    from storage.warp import to_model

    rng = np.random.default_rng(7)
    values = rng.integers(0, 256, (3, 160, 200)).astype(np.uint16)
    arr = zarr.create_array(str(tmp_path / "five.zarr"), shape=values.shape, chunks=(3, 40, 40), dtype="uint16")
    arr[:] = values
    geometry = RasterGeometry(width=200, height=160, epsg=32633, dtype="uint16",
                              transform=tuple(from_origin(500000, 6000000, 5, 5))[:6])
    mapping = raster_mapping(geometry, values.shape[1:], spacing=[10, 10], crs=None)
    image = WarpedImage(arr, mapping, chunks=(20, 20))  # the model grid: 80 x 100, 4 x 5 chunks
    net = tiny_net(2, 3, 4)
    before = chunkcache.stats()
    labels = predict(image, net, roi=(16, 16), overlap=0.25, chunks=20, precision=precision,
                     probabilities=False).compute(scheduler="threads", num_workers=2)
    after = chunkcache.stats()
    assert after["decodes"] - before["decodes"] == 20  # each model chunk warped once for all its regions
    assert after["hits"] - before["hits"] > 0 and after["bytes"] == before["bytes"]
    monkeypatch.setenv(chunkcache.BUDGET_ENV, "0")
    plain = predict(image, net, roi=(16, 16), overlap=0.25, chunks=20, precision=precision,
                    probabilities=False).compute(scheduler="threads", num_workers=2)
    assert np.array_equal(labels, plain)
    if precision == "exact":
        import dask.array as da

        whole = to_model(da.from_array(values, chunks=(3, 40, 40)), mapping, chunks=20)[0].compute(scheduler="sync")
        assert np.array_equal(labels, monai_reference(whole, net, (16, 16), 0.25).argmax(0))


def test_a_plan_over_a_dask_image_does_not_use_the_cache(tmp_path):
    import dask.array as da

    arr, _ = _store(tmp_path / "d.zarr", (3, 64, 64), (3, 32, 32))
    plan = build_plan(da.from_zarr(arr), tiny_net(2, 3, 2), roi=(32, 32), overlap=0.25, chunks=32)
    assert plan._reader_counts([((0, 32), (0, 32))]) is None
    stored = build_plan(arr, tiny_net(2, 3, 2), roi=(32, 32), overlap=0.25, chunks=32)
    assert stored._reader_counts([((0, 40), (0, 40))]) == {(0, 0, 0): 1, (0, 0, 1): 1, (0, 1, 0): 1, (0, 1, 1): 1}


def test_a_runs_end_drops_what_a_failed_run_left(tmp_path):
    """A run that stops after some regions leaves chunks whose readers never came: the pipeline's end of run
    (``flows.infer.forget_read_chunks``, through the client, as for worker processes) drops them."""
    from distributed import Client, LocalCluster

    from flows.infer import forget_read_chunks

    arr, _ = _store(tmp_path / "e.zarr", (3, 96, 96), (3, 32, 32))
    plan = build_plan(arr, tiny_net(2, 3, 2), roi=(32, 32), overlap=0.25, chunks=32)
    counts = plan._reader_counts([((0, 40), (0, 40)), ((30, 70), (30, 70))])
    reader = chunkcache.CachedChunks(arr, plan.read_token, counts)
    held = chunkcache.stats()["bytes"]
    reader.read(((0, 3), (0, 40), (0, 40)))  # the first region only: the second never reads
    assert chunkcache.stats()["bytes"] > held
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        forget_read_chunks(plan, client)
    assert chunkcache.stats()["bytes"] == held


def test_where_other_processes_take_some_reads_a_process_keeps_three_rows_of_chunks(tmp_path):
    """Half the regions read in this process, half elsewhere (as with two worker processes): no chunk's count
    runs out here, yet what is held stays within the run's limit of three rows of chunks, not the image."""
    arr, values = _store(tmp_path / "f.zarr", (1, 160, 40), (1, 10, 10))  # 16 rows of 4 chunks, 400 bytes each
    boxes = [((0, 1), (max(0, y - 3), min(160, y + 13)), (max(0, x - 3), min(40, x + 13)))
             for y in range(0, 160, 10) for x in range(0, 40, 10)]
    counts = chunkcache.reader_counts(arr.chunks, boxes)
    assert chunkcache.run_limit(arr) == 3 * 4 * 400
    held = chunkcache.stats()["bytes"]
    most = 0
    for order, box in enumerate(boxes):
        if order % 2:
            continue  # another process reads this one
        mine = chunkcache.chunks_of(arr.chunks, box)
        reader = chunkcache.CachedChunks(arr, "shared", {i: counts[i] for i in mine}, chunkcache.run_limit(arr))
        np.testing.assert_array_equal(reader.read(box), values[tuple(slice(lo, hi) for lo, hi in box)])
        most = max(most, chunkcache.stats()["bytes"] - held)
    assert 0 < most <= 3 * 4 * 400  # of 64 chunks (25,600 bytes), most kept here for readers that never come
    assert chunkcache.forget("shared")["bytes"] == held
