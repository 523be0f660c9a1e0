"""Card normalisations equal MONAI's intensity transforms, computed chunk by chunk on a dask array."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import torch
from monai.transforms import NormalizeIntensity, ScaleIntensityRangePercentiles

from segmentation.card import Normalization
from segmentation.normalize import image_percentiles, image_statistics, resolve, statistics_for


@pytest.fixture(autouse=True)
def local_scheduler():
    """Many tiny reductions: threads here (the session's Dask cluster would make each a network round trip)."""
    with dask.config.set(scheduler="threads"):
        yield


def chunked(x: np.ndarray, parts: int = 3) -> da.Array:
    return da.from_array(x, chunks=(x.shape[0],) + tuple(max(1, s // parts) for s in x.shape[1:]))


@pytest.mark.parametrize("seed", [0, 1])
def test_exact_percentiles_out_of_core(seed):
    rng = np.random.default_rng(seed)
    smooth = rng.normal(size=(1, 23, 31, 19)) * 300
    discrete = rng.integers(-3, 4, size=(2, 40, 41)).astype(np.float64)  # ties everywhere
    for x in (smooth, discrete):
        qs = [0.0, 0.5, 1.0, 37.3, 50.0, 99.0, 99.5, 100.0]
        assert image_percentiles(chunked(x), qs) == pytest.approx(np.percentile(x, qs), abs=0, rel=0)


def test_percentiles_skip_masked_pixels():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(1, 30, 30))
    mask = rng.random((30, 30)) > 0.4
    got = image_percentiles(chunked(x), [5.0, 95.0], da.from_array(mask, chunks=(10, 10)))
    assert got == pytest.approx(np.percentile(x[:, mask], [5.0, 95.0]), abs=0, rel=0)


@pytest.mark.parametrize("masked", [True, False])
def test_statistics_leave_out_nan_and_infinities(masked):
    """A float raster's nodata (NaN, ±inf) under its mask, or unmasked, takes no part in the image statistics: a
    NaN times a 0 weight had made every mean and std NaN, and the whole image normalise to NaN."""
    rng = np.random.default_rng(6)
    x = rng.normal(500.0, 80.0, size=(2, 30, 30))
    bad = np.zeros((30, 30), bool)
    bad[3:9, 4:12] = True
    x[0, bad], x[1, 3:9, 4:8], x[1, 3:9, 8:12] = np.nan, np.inf, -np.inf
    mask = ~bad if masked else None
    valid = [np.isfinite(x[c]) & (True if mask is None else mask) for c in range(2)]
    with np.errstate(all="raise"):  # no invalid arithmetic on the way (it printed a RuntimeWarning per chunk)
        mean, std = image_statistics(chunked(x), None if mask is None else da.from_array(mask, chunks=(10, 10)))
        got = image_percentiles(chunked(x), [1.0, 99.0], None if mask is None else da.from_array(mask, chunks=10))
    assert mean == pytest.approx([x[c][valid[c]].mean() for c in range(2)], rel=1e-12)
    assert std == pytest.approx([x[c][valid[c]].std() for c in range(2)], rel=1e-9)
    finite = np.concatenate([x[c][valid[c]] for c in range(2)])
    assert got == pytest.approx(np.percentile(finite, [1.0, 99.0]), abs=0, rel=0)
    # nonzero too (MONAI's NormalizeIntensity(nonzero=True) over the finite voxels)
    x[0, 20:, :] = 0.0
    mean, _ = image_statistics(chunked(x), None, nonzero=True)
    keep = np.isfinite(x[0]) & (x[0] != 0)
    assert mean[0] == pytest.approx(x[0][keep].mean(), rel=1e-12)


@pytest.mark.parametrize("relative, clip", [(False, True), (True, False), (True, True)])
def test_percentile_scaling_equals_monai(relative, clip):
    rng = np.random.default_rng(4)
    x = rng.gamma(2.0, 200.0, size=(1, 16, 18, 20)).astype(np.float32)
    norm = Normalization(mode="percentile", lower=2.0, upper=98.0, b_min=-1.0, b_max=1.0, relative=relative,
                         clip=None)
    monai = ScaleIntensityRangePercentiles(lower=2.0, upper=98.0, b_min=-1.0, b_max=1.0, clip=clip,
                                           relative=relative)(torch.from_numpy(x)).numpy()
    if clip:  # a card states the clip range literally; for relative ones it is the moved b_min..b_max
        lo, hi = (-1.0 + 2.0 * 0.02, -1.0 + 2.0 * 0.98) if relative else (-1.0, 1.0)
        norm = norm.model_copy(update={"clip": (lo, hi)})
    ours = resolve(norm, 1, statistics_for(norm, chunked(x)))(x)
    assert np.abs(ours - monai).max() < 1e-5


@pytest.mark.parametrize("nonzero", [False, True])
def test_image_zscore_equals_monai_normalize_intensity(nonzero):
    rng = np.random.default_rng(5)
    x = rng.normal(100.0, 20.0, size=(1, 12, 14, 16)).astype(np.float32)
    x[:, :4] = 0.0  # background outside the body
    norm = Normalization(mode="image_zscore", nonzero=nonzero)
    ours = resolve(norm, 1, statistics_for(norm, chunked(x)))(x)
    monai = NormalizeIntensity(nonzero=nonzero)(torch.from_numpy(x)).numpy()
    assert np.abs(ours - monai).max() < 1e-4
    if nonzero:
        assert np.all(ours[:, :4] == 0.0)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32, np.int64, np.uint64])
def test_finite_for_is_true_only_when_every_stored_integer_normalises_to_a_finite_float32(dtype):
    from segmentation.normalize import Normalizer

    info = np.iinfo(dtype)
    extremes = np.array([[info.min, info.max, 0]], dtype=dtype)
    for norm in (Normalizer((0.0,), (1 / 255,)), Normalizer((1e4,), (1e-3,)), Normalizer((0.0,), (1e30,)),
                 Normalizer((-5.0,), (3e38,))):
        finite = bool(np.isfinite(norm(extremes)).all())
        if norm.finite_for(dtype):  # the stitcher skips its NaN/Inf pass: it must be right to
            assert finite, (norm, dtype)
    assert not Normalizer((0.0,), (1.0,)).finite_for(np.float32)  # floats may hold NaN or Inf: always checked
    assert Normalizer((0.0,), (1 / 255,)).finite_for(dtype)  # the common case does skip the pass
    assert not Normalizer((-5.0,), (3e38,)).finite_for(dtype)  # a factor that overflows float32 does not


def test_a_float_nodata_that_overflows_says_nothing_on_the_terminal():
    """-3.4e38 (a float32 raster's common nodata) times a factor > 1 overflows to -inf, which the stitcher makes 0;
    numpy's 'overflow encountered in multiply' RuntimeWarning reached stderr."""
    import warnings

    from segmentation.normalize import Normalizer

    x = np.array([[[-3.4028235e38, 1.0]]], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = Normalizer((0.5,), (4.0,))(x)
    assert np.isneginf(out[0, 0, 0]) and out[0, 0, 1] == 2.0
