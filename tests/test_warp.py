"""The separable warp (storage.separable via storage.warp.warp) against GDAL's whole-image ``reproject``.

Same CRS, north-up grids: the warp is per-axis weights reproducing GDAL's
kernels.  The oracle is ``rasterio.warp.reproject`` of the whole image with
the mask as an alpha band; the fast path, chunked two ways, must match it
within 1e-5 on values in [0, 1) (bit for bit where the grids' ratio is a
power of two; elsewhere GDAL's pixel coordinates round differently in the
last bits, a few float32 ulps at most), and the labels-only way back must
equal the argmax of the full way back, ties included.
"""

from __future__ import annotations

import math

import dask.array as da
import numpy as np
import pytest
import zarr
from affine import Affine
from rasterio.enums import Resampling
from rasterio.warp import reproject

from storage.resample import argmax_first
from storage.rastergrid import RasterGrid
from storage.warp import separable_axes, warp

CRS = "EPSG:32633"


def _grids(res: float, gsd: float, shape: tuple[int, int]) -> tuple[RasterGrid, RasterGrid]:
    src = RasterGrid(crs=CRS, transform=tuple(Affine(res, 0, 500000, 0, -res, 6000000))[:6], height=shape[0],
                     width=shape[1])
    h, w = (max(1, math.ceil(n * res / gsd - 1e-9)) for n in shape)
    dst = RasterGrid(crs=CRS, transform=tuple(Affine(gsd, 0, 500000, 0, -gsd, 6000000))[:6], height=h, width=w)
    return src, dst


def _gdal(image: np.ndarray, valid: np.ndarray, src: RasterGrid, dst: RasterGrid, kernel: str,
          scale: float) -> np.ndarray:
    """Whole-image GDAL warp, the mask as an alpha band (its warped plane dropped)."""
    bands = np.concatenate([image, (valid * 255).astype(np.float32)[None]])
    out = np.zeros((bands.shape[0], *dst.shape), np.float32)
    reproject(bands, out, src_transform=src.affine, src_crs=CRS, dst_transform=dst.affine, dst_crs=CRS,
              resampling=getattr(Resampling, kernel), src_alpha=bands.shape[0], XSCALE=scale, YSCALE=scale)
    return out[:-1]


@pytest.mark.parametrize("res,gsd,kernel", [(5.0, 10.0, "average"), (20.0, 10.0, "bilinear"),
                                            (7.5, 10.0, "average"), (10.0, 5.0, "bilinear"),
                                            (5.0, 10.0, "nearest")])
def test_the_separable_warp_equals_gdal_on_the_whole_image(res, gsd, kernel):
    rng = np.random.default_rng(int(res * 10 + gsd))
    shape = (101, 87)  # not multiples of the ratio: the last destination pixels reach past the source
    image = rng.random((3, *shape)).astype(np.float32)
    valid = rng.random(shape) > 0.2
    image[:, ~valid] = np.nan  # what invalid pixels hold must never matter
    src, dst = _grids(res, gsd, shape)
    scale = res / gsd
    assert separable_axes(src, dst, kernel, (scale, scale)) is not None  # the fast path, not GDAL
    ref = _gdal(np.nan_to_num(image, nan=123.0), valid, src, dst, kernel, scale)
    ours = [warp(da.from_array(image, chunks=(3, c, c)), src, dst, kernel, (scale, scale), k,
                 valid=da.from_array(valid, chunks=c)).compute(scheduler="sync") for c, k in ((19, 23), (64, 50))]
    assert np.array_equal(ours[0], ours[1])  # chunk invariance
    assert np.array_equal(ours[0] == 0, ref == 0)  # the same pixels left empty
    err = float(np.abs(ours[0] - ref).max())
    assert err <= 1e-5, f"{res} m -> {gsd} m {kernel}: max |ours - GDAL| = {err:.2e}"
    if kernel != "average" or res / gsd in (0.5, 2.0):
        assert np.array_equal(ours[0], ref)  # exact weights: bit for bit
    # no mask at all: the plain kernel (GDAL without alpha)
    clean = np.nan_to_num(image, nan=0.5)
    plain = np.zeros((3, *dst.shape), np.float32)
    reproject(clean, plain, src_transform=src.affine, src_crs=CRS, dst_transform=dst.affine, dst_crs=CRS,
              resampling=getattr(Resampling, kernel), XSCALE=scale, YSCALE=scale)
    got = warp(da.from_array(clean, chunks=(3, 30, 30)), src, dst, kernel, (scale, scale), 40).compute()
    assert float(np.abs(got - plain).max()) <= 1e-5


def test_the_model_mask_plane_and_a_stored_source_match(tmp_path):
    """with_mask: the last plane is GDAL's own destination alpha for the kernel (average: a model pixel with any
    valid input pixel under it has a value), and the values equal GDAL's where it has one; a zarr source read
    region by region gives the same values as the dask graph."""
    rng = np.random.default_rng(7)
    shape = (90, 70)
    image = rng.random((2, *shape)).astype(np.float32)
    valid = rng.random(shape) > 0.3
    src, dst = _grids(5.0, 10.0, shape)
    both = warp(da.from_array(image, chunks=(2, 32, 32)), src, dst, "average", (0.5, 0.5), 16,
                valid=da.from_array(valid, chunks=32), with_mask=True).compute()
    gdal = np.zeros((3, *dst.shape), np.float32)  # the image with the mask as its alpha band, as GDAL warps it
    reproject(np.concatenate([image, valid[None].astype(np.float32) * 255]), gdal, src_transform=src.affine,
              src_crs=CRS, dst_transform=dst.affine, dst_crs=CRS, resampling=Resampling.average, src_alpha=3,
              dst_alpha=3)
    alpha = gdal[2] > 0
    assert np.array_equal(both[-1] > 0, alpha)
    assert alpha.sum() > (valid[::2, ::2]).sum()  # more than the pixels under the centres: the old rule's
    assert np.array_equal(np.where(alpha, both[:2], 0), np.where(alpha, gdal[:2], 0))
    z = zarr.open_array(str(tmp_path / "i.zarr"), mode="w", shape=image.shape, chunks=(2, 32, 32), dtype="float32")
    z[:] = image
    m = zarr.open_array(str(tmp_path / "m.zarr"), mode="w", shape=shape, chunks=(32, 32), dtype="bool")
    m[:] = valid
    stored = warp(z, src, dst, "average", (0.5, 0.5), 16, valid=m, with_mask=True).compute()
    assert np.array_equal(stored, both)


def _probabilities(shape: tuple[int, int], classes: int, seed: int) -> np.ndarray:
    """Softmax of rough random logits: many label boundaries, and exact ties (quantised values) in places."""
    from scipy.ndimage import zoom

    rng = np.random.default_rng(seed)
    logits = np.stack([zoom(rng.normal(size=(shape[0] // 12 + 1, shape[1] // 12 + 1)), 12, order=1)
                       [:shape[0], :shape[1]] for _ in range(classes)]) * 4
    p = np.exp(logits - logits.max(0))
    p /= p.sum(0)
    p = np.round(p, 3)
    tied = (rng.random(shape) < 0.01) & (np.argmax(p, 0) <= 1)
    p[0, tied] = p[1, tied] = np.maximum(p[0, tied], p[1, tied])  # exact ties: the first maximum wins on both paths
    return p.astype(np.float32)


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("res,gsd,kernel,mode", [(5.0, 10.0, "bilinear", "bilinear"),
                                                 (20.0, 10.0, "average", "bilinear"),
                                                 (5.0, 10.0, "nearest", "nearest")])
def test_labels_only_way_back_equals_the_full_way_back(res, gsd, kernel, mode, masked):
    """The labels path (argmax on the model grid, interpolation near boundaries only) gives the argmax of the
    warped probabilities, pixel for pixel, with ties, with a model mask and without one (every pixel inside:
    the path that skips the keep mask)."""
    inp, model = _grids(res, gsd, (203, 181))
    probs = _probabilities(model.shape, 4, seed=int(res))
    valid = np.ones(model.shape, bool)
    valid[:, -3:] = False  # model pixels past the input's footprint
    valid[40:44, 10:30] = False
    scale = (gsd / res, gsd / res)
    assert separable_axes(model, inp, kernel, scale) is not None
    p = da.from_array(probs, chunks=(4, 33, 33))
    v = da.from_array(valid, chunks=33) if masked else None
    full = warp(p, model, inp, kernel, scale, 47, valid=v).compute(scheduler="sync")
    labels = warp(p, model, inp, kernel, scale, 47, valid=v, argmax=True, dtype=np.uint8).compute(scheduler="sync")
    expected = argmax_first(full, np.uint8)
    assert np.array_equal(labels, expected), f"{(labels != expected).sum()} labels differ"
    changes = np.count_nonzero(np.diff(expected.astype(int), axis=1))
    assert changes > 500 and len(np.unique(expected)) == 4  # many boundaries: the test has teeth
    if not masked:
        return
    # where no valid model pixel reaches an input pixel (every warped class 0), the labels say so
    marked = warp(p, model, inp, kernel, scale, 47, valid=v, argmax=True, dtype=np.uint8,
                  empty=255).compute(scheduler="sync")
    reached = full.max(axis=0) > 0
    assert np.count_nonzero(~reached) > 100  # the masked model pixels leave input pixels empty
    assert np.array_equal(marked, np.where(reached, expected, 255))


def test_crs_changes_and_rotations_keep_gdal():
    a, b = _grids(5.0, 10.0, (20, 20))
    assert separable_axes(a, b, "average", (0.5, 0.5)) is not None
    other = RasterGrid(crs="EPSG:32634", transform=b.transform, height=b.height, width=b.width)
    assert separable_axes(a, other, "average", (0.5, 0.5)) is None
    rotated = RasterGrid(crs=CRS, transform=(10.0, 1.0, 500000.0, 1.0, -10.0, 6000000.0), height=9, width=9)
    assert separable_axes(a, rotated, "average", (0.5, 0.5)) is None
    assert separable_axes(a, b, "bilinear", (0.5, 0.5)) is None  # GDAL widens bilinear when coarsening
    assert separable_axes(a, b, "cubic", (0.5, 0.5)) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype,res,gsd,shape", [(np.uint16, 5.0, 10.0, (96, 80)), (np.uint8, 2.5, 10.0, (64, 48)),
                                                 (np.int16, 5.0, 10.0, (101, 87))])
def test_integer_cells_average_like_gdal_bit_for_bit(dtype, res, gsd, shape):
    """The whole-cell fast path of ``average`` (integers, k×k cells, no mask) equals GDAL and the general path."""
    from storage.separable import MEAN_SLAB, Taps, _block_mean, separable_block

    rng = np.random.default_rng(7)
    info = np.iinfo(dtype)
    image = rng.integers(info.min, info.max, size=(3, *shape), endpoint=True).astype(dtype)
    src, dst = _grids(res, gsd, shape)
    scale = res / gsd
    ref = np.zeros((3, *dst.shape), np.float32)
    reproject(image.astype(np.float32), ref, src_transform=src.affine, src_crs=CRS, dst_transform=dst.affine,
              dst_crs=CRS, resampling=Resampling.average)
    got = warp(da.from_array(image, chunks=(3, 32, 32)), src, dst, "average", (scale, scale), 8).compute()
    assert np.array_equal(got, ref)
    # the fast path did run on whole chunks, and agrees with the general running mean there
    ay, ax = separable_axes(src, dst, "average", (scale, scale))
    ty, tx = ay.taps("average", 0, 8), ax.taps("average", 0, 8)
    fast = _block_mean(image, ty, tx, (0, 0))
    assert fast is not None
    k = int(gsd / res)
    general = separable_block(image.astype(np.float64), None, ty, tx, (0, 0), "average", np.dtype(np.float32))
    assert np.array_equal(fast, general)
    assert np.array_equal(fast, image[:, :8 * k, :8 * k].reshape(3, 8, k, 8, k).astype(np.float64).mean((2, 4)))
    # a block of more rows than one slab of the sums (storage.separable.MEAN_SLAB), from an offset source
    n = MEAN_SLAB + 5
    big = rng.integers(info.min, info.max, size=(2, n * k + 3, 9 * k + 2), endpoint=True).astype(dtype)
    ty = Taps(np.arange(n)[:, None] * k + 3 + np.arange(k), np.ones((n, k)), np.ones(n, bool), np.full(n, -1))
    tx = Taps(np.arange(9)[:, None] * k + 2 + np.arange(k), np.ones((9, k)), np.ones(9, bool), np.full(9, -1))
    fast = _block_mean(big, ty, tx, (0, 0))
    assert fast is not None and fast.shape == (2, n, 9)
    assert np.array_equal(fast, big[:, 3:, 2:].reshape(2, n, k, 9, k).astype(np.float64).mean((2, 4)))


def test_bilinear_pixels_alone_equal_their_chunk_bit_for_bit():
    """The labels' boundary pixels are computed alone (2×2 taps each); they must equal the chunk's values."""
    from storage.separable import _bilinear_grid, _bilinear_points, pixel_grid

    inp, model = _grids(5.0, 10.0, (90, 70))
    ay, ax = separable_axes(model, inp, "bilinear", (2.0, 2.0))
    ty, tx = ay.taps("bilinear", 0, 90), ax.taps("bilinear", 0, 70)
    data = np.random.default_rng(3).random((4, *model.shape))
    rows, cols = pixel_grid(ty, tx)
    whole = _bilinear_grid(data, ty, tx, rows, cols, (0, 0))
    r, c = np.nonzero(np.random.default_rng(4).random((90, 70)) < 0.3)
    alone = _bilinear_points(data, ty, tx, r, c, (0, 0))
    assert r.size > 1000 and np.array_equal(alone, whole[:, r, c])



def test_bilinear_pixels_of_a_sub_block_are_read_through_its_base_bit_for_bit():
    """A way-back region cut from its block's region is gathered through the block (no copy of the region): the
    same values as from a contiguous copy, for a sub-block of every class, of some classes (read through the base
    from a later plane) and of a base that is itself a view (copied)."""
    from storage.separable import _bilinear_points, _flat_rows

    inp, model = _grids(5.0, 10.0, (90, 70))
    ay, ax = separable_axes(model, inp, "bilinear", (2.0, 2.0))
    ty, tx = ay.taps("bilinear", 0, 90), ax.taps("bilinear", 0, 70)
    r, c = np.nonzero(np.random.default_rng(4).random((90, 70)) < 0.3)
    block = np.random.default_rng(5).random((6, model.shape[0] + 9, model.shape[1] + 13)).astype(np.float32)
    for region, through_base in ((block[:, 4:4 + model.shape[0], 7:7 + model.shape[1]], True),
                                 (block[2:6, 3:3 + model.shape[0], 1:1 + model.shape[1]], True),
                                 (block[:, ::-1][:, 2:2 + model.shape[0], :model.shape[1]], False)):
        flat, pitch, start = _flat_rows(region)
        assert (flat.base is not None and pitch == block.shape[2]) == through_base
        alone = _bilinear_points(region, ty, tx, r, c, (0, 0))
        assert np.array_equal(alone, _bilinear_points(np.ascontiguousarray(region), ty, tx, r, c, (0, 0)))

@pytest.mark.parametrize("res,gsd,kernel,masked", [(5.0, 10.0, "average", False), (5.0, 10.0, "average", True),
                                                   (10.0, 5.0, "bilinear", True), (7.5, 10.0, "average", True)])
def test_a_large_region_read_in_bands_of_rows_equals_one_read(tmp_path, monkeypatch, res, gsd, kernel, masked):
    """A stored source's region bigger than storage.warp.BAND_BYTES is read and warped in bands of destination
    rows (each band's source rows within one chunk row where they can): the values, and the mask plane, equal
    one read of the whole region, bit for bit, for integer cells (the fast block mean) and the general path."""
    import storage.warp as warp_module
    from storage.warp import warp_region

    rng = np.random.default_rng(3)
    shape = (203, 171)
    image = rng.integers(0, 10000, (3, *shape)).astype(np.uint16)
    valid = rng.random(shape) > 0.2 if masked else None
    z = zarr.open_array(str(tmp_path / "i.zarr"), mode="w", shape=image.shape, chunks=(3, 40, 64), dtype="uint16")
    z[:] = image
    m = None
    if masked:
        m = zarr.open_array(str(tmp_path / "m.zarr"), mode="w", shape=shape, chunks=(40, 64), dtype="bool")
        m[:] = valid
    src, dst = _grids(res, gsd, shape)
    scale = (res / gsd, res / gsd)
    box = ((3, dst.height - 2), (1, dst.width))
    whole = warp_region(z, m, src, dst, kernel, scale, box)
    planes = warp(z, src, dst, kernel, scale, 24, valid=m, with_mask=masked and kernel == "average").compute()
    calls = []
    monkeypatch.setattr(warp_module, "BAND_BYTES", 3 * 64 * 2 * 12)  # about 12 source rows a band
    real = warp_module._band
    monkeypatch.setattr(warp_module, "_band", lambda job, a, b: calls.append((a, b)) or real(job, a, b))
    banded = warp_region(z, m, src, dst, kernel, scale, box)
    assert len(calls) > 3
    assert np.array_equal(banded, whole)
    again = warp(z, src, dst, kernel, scale, 24, valid=m, with_mask=masked and kernel == "average").compute()
    assert np.array_equal(again, planes)


def test_a_stored_warps_graph_leaves_the_taps_to_its_tasks(tmp_path):
    """Each task of a stored warp makes its own taps from its box: the graph holds boxes and windows only (at
    16384² the way back's taps were 21.6 MB of graph), and the values are those of the in-graph warp."""
    import pickle

    from storage.warp import chunk_bounds as _per_axis, chunk_jobs as _jobs

    rng = np.random.default_rng(11)
    image = rng.random((2, 600, 520)).astype(np.float32)
    src, dst = _grids(5.0, 10.0, image.shape[1:])
    z = zarr.open_array(str(tmp_path / "i.zarr"), mode="w", shape=image.shape, chunks=(2, 128, 128), dtype="float32")
    z[:] = image
    stored = warp(z, src, dst, "average", (0.5, 0.5), 64)
    graph = len(pickle.dumps(dict(stored.__dask_graph__())))
    taps = len(pickle.dumps(_jobs(src, dst, "average", (0.5, 0.5), _per_axis(dst, 64), False)))
    assert graph < taps / 4, (graph, taps)
    assert np.array_equal(stored.compute(scheduler="sync"),
                          warp(da.from_array(image, chunks=(2, 128, 128)), src, dst, "average", (0.5, 0.5), 64)
                          .compute(scheduler="sync"))


@pytest.mark.parametrize("seed", range(6))
def test_outer_take_equals_numpy_outer_indexing_in_any_order(seed):
    """One take per axis, shrinking axes first, then from the last axis: the same as ``np.ix_`` indexing, with
    indexes that repeat (refining), skip (coarsening), step evenly (strided views) or go back."""
    from storage.separable import outer_take

    rng = np.random.default_rng(seed)
    data = rng.integers(0, 7, tuple(rng.integers(1, 9, size=3)), dtype=np.uint8)
    indexes = {}
    for axis in rng.choice(3, size=int(rng.integers(1, 4)), replace=False):
        n = data.shape[axis]
        kind = seed % 3
        idx = (np.sort(rng.integers(0, n, size=int(rng.integers(1, 2 * n + 2)))) if kind == 0 else
               np.arange(0, n, 2) if kind == 1 else rng.integers(0, n, size=n))
        indexes[int(axis)] = idx
    full = tuple(indexes.get(a, np.arange(data.shape[a])) for a in range(3))
    got = outer_take(data, indexes)
    assert np.array_equal(got, data[np.ix_(*full)]) and not np.shares_memory(got, data)  # the caller may write it
    assert np.array_equal(outer_take(data, indexes, views=True), data[np.ix_(*full)])
