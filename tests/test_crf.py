"""The truncated dense CRF: chunk-invariant, exact at halos, mask-respecting, and it does clean noise."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import torch
from torch import nn

from segmentation import build_plan
from segmentation.crf import CRFParams, crf_dask, crf_halo, mean_field
from segmentation.metrics import dice_per_class


def random_inputs(shape: tuple[int, ...], classes: int = 3, channels: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = 2.0 * rng.standard_normal((classes, *shape)).astype(np.float32)
    probs = np.exp(logits)
    probs /= probs.sum(0)
    image = rng.standard_normal((channels, *shape)).astype(np.float32)
    mask = rng.random(shape) > 0.15
    probs[:, ~mask] = 0.0  # as the stitched probabilities are at no-data pixels
    return probs, image, mask


def chunked(probs, image, mask, params, chunks):
    c, k = probs.shape[0], image.shape[0]
    out = crf_dask(da.from_array(probs, chunks=(c, *chunks)), da.from_array(image, chunks=(k, *chunks)),
                   params, None if mask is None else da.from_array(mask, chunks=chunks))
    assert out.chunks == da.from_array(probs, chunks=(c, *chunks)).chunks  # the caller's grid comes back
    return out.compute(scheduler="sync")


@pytest.mark.parametrize("chunks", [(4, 5), (6, 6), (7, 13), (16, 40), (43, 3)])
def test_chunked_2d_equals_whole_image(chunks):
    probs, image, mask = random_inputs((43, 40))
    params = CRFParams(iterations=3, radius=2, theta_alpha=2.0, w_bilateral=3.0)
    assert crf_halo(params, 2) == (6, 6)  # several chunkings above are thinner than the halo
    whole = mean_field(probs, image, params, mask)
    np.testing.assert_allclose(chunked(probs, image, mask, params, chunks), whole, rtol=0, atol=1e-5)
    np.testing.assert_allclose(chunked(probs, image, None, params, chunks), mean_field(probs, image, params),
                               rtol=0, atol=1e-5)


@pytest.mark.parametrize("chunks", [(3, 4, 5), (9, 8, 4), (5, 17, 11)])
def test_chunked_3d_equals_whole_image(chunks):
    probs, image, mask = random_inputs((9, 17, 11), classes=3, channels=1, seed=1)
    params = CRFParams(iterations=2, radius=(1, 2, 2), theta_alpha=(1.5, 2.0, 2.0), theta_gamma=(1.0, 1.5, 1.5))
    assert crf_halo(params, 3) == (2, 4, 4)
    whole = mean_field(probs, image, params, mask)
    np.testing.assert_allclose(chunked(probs, image, mask, params, chunks), whole, rtol=0, atol=1e-5)


def test_numpy_image_and_mask_are_taken_with_dask_probabilities():
    """`predict` takes a numpy image, and the README's `crf_dask(probs, image, CRFParams(), mask)` failed with one
    ('ndarray' object has no attribute 'rechunk'), or with a numpy mask (no attribute 'name')."""
    probs, image, mask = random_inputs((43, 40))
    params = CRFParams(iterations=2, radius=2)
    whole = mean_field(probs, image, params, mask)
    lazy = da.from_array(probs, chunks=(3, 16, 16))
    for got in (crf_dask(lazy, image, params, mask), crf_dask(probs, image, params, mask)):
        np.testing.assert_allclose(got.compute(scheduler="sync"), whole, rtol=0, atol=1e-5)
    assert crf_dask(lazy, image, params, mask).chunks == lazy.chunks


def test_halo_is_needed():
    """With less than iterations × radius of context the chunk edges differ: the halo is not oversized."""
    probs, image, _ = random_inputs((40, 40), seed=2)
    params = CRFParams(iterations=3, radius=2, w_bilateral=3.0, w_spatial=2.0)
    whole = mean_field(probs, image, params)
    core = (slice(None), slice(14, 20), slice(14, 20))
    # context of 5 (< halo 6) around the block [14, 20)²
    short = mean_field(probs[:, 9:25, 9:25], image[:, 9:25, 9:25], params)[:, 5:11, 5:11]
    exact = mean_field(probs[:, 8:26, 8:26], image[:, 8:26, 8:26], params)[:, 6:12, 6:12]
    np.testing.assert_allclose(exact, whole[core], atol=1e-6)
    assert np.abs(short - whole[core]).max() > 1e-4


def test_iterations_zero_is_identity():
    probs, image, mask = random_inputs((20, 30))
    params = CRFParams(iterations=0)
    np.testing.assert_array_equal(mean_field(probs, image, params, mask), probs)
    np.testing.assert_array_equal(chunked(probs, image, mask, params, (7, 7)), probs)


def test_probabilities_stay_normalised():
    probs, image, mask = random_inputs((30, 30))
    out = mean_field(probs, image, CRFParams(), mask)
    assert out.dtype == np.float32 and out.shape == probs.shape
    np.testing.assert_allclose(out[:, mask].sum(0), 1.0, atol=1e-5)
    assert (out >= 0).all()


def test_masked_pixels_unchanged_and_silent():
    probs, image, mask = random_inputs((30, 30), seed=3)
    params = CRFParams(w_bilateral=3.0, w_spatial=2.0)
    out = mean_field(probs, image, params, mask)
    np.testing.assert_array_equal(out[:, ~mask], probs[:, ~mask])
    # whatever masked pixels hold, valid pixels get the same answer: they send no messages
    noisy, other_image = probs.copy(), image.copy()
    rng = np.random.default_rng(4)
    noisy[:, ~mask] = rng.random((probs.shape[0], int((~mask).sum())))
    other_image[:, ~mask] = 100.0 * rng.standard_normal((image.shape[0], int((~mask).sum())))
    again = mean_field(noisy, other_image, params, mask)
    np.testing.assert_array_equal(again[:, mask], out[:, mask])
    np.testing.assert_array_equal(again[:, ~mask], noisy[:, ~mask])


def test_nan_pixels_are_zero_to_the_crf_as_to_the_network_and_reach_no_neighbour():
    """A NaN nodata hole made the bilateral kernel's weights NaN: every valid pixel within the halo got NaN
    probabilities, then label 0 (2,100 pixels around a 20x20 hole through segment --crf; API probe).  NaN and
    inf pixels are 0 to the CRF, as to the network; whatever they held, valid pixels get the same answer."""
    probs, image, mask = random_inputs((30, 30), seed=5)
    params = CRFParams(w_bilateral=3.0, w_spatial=2.0)
    holed = image.copy()
    holed[:, ~mask] = np.nan
    holed[0, ~mask & (np.arange(30)[None, :] % 2 == 0)] = np.inf
    out = mean_field(probs, holed, params, mask)
    assert np.isfinite(out).all()
    zeroed = image.copy()
    zeroed[:, ~mask] = 0.0
    np.testing.assert_array_equal(out, mean_field(probs, zeroed, params, mask))
    np.testing.assert_allclose(out[:, mask].sum(0), 1.0, atol=1e-5)
    chunk = chunked(probs, holed, mask, params, (7, 13))  # chunk by chunk alike
    np.testing.assert_allclose(chunk, out, atol=1e-6)


def test_shape_and_channel_mismatches_are_said_before_dask_or_numpy_fail():
    """A numpy image of another size had failed inside dask ("Chunks do not add up to shape"), and a normaliser
    of another channel count at compute time with numpy's broadcast error (API probe)."""
    from segmentation.normalize import Normalizer

    probs, image, _ = random_inputs((30, 40))
    with pytest.raises(ValueError, match=r"image \(2, 60, 40\) and probabilities \(3, 30, 40\) differ in spatial"):
        crf_dask(probs, np.zeros((2, 60, 40), np.float32), CRFParams())
    with pytest.raises(ValueError, match="image has 2 channels, the normalizer 4"):
        crf_dask(probs, image, CRFParams(), normalizer=Normalizer((0.0,) * 4, (1.0,) * 4))


def test_potts_matrix_matches_default_and_cache_is_transparent():
    probs, image, mask = random_inputs((25, 21), classes=4)
    potts = (1.0 - np.eye(4)).tolist()
    ref = mean_field(probs, image, CRFParams(), mask)
    np.testing.assert_allclose(mean_field(probs, image, CRFParams(compatibility=potts), mask), ref, atol=1e-5)
    np.testing.assert_array_equal(mean_field(probs, image, CRFParams(), mask, cache_bytes=0), ref)


def toy(shape: tuple[int, ...], seed: int):
    """Two classes split by an intensity edge; probabilities blurred across it and salted with errors."""
    rng = np.random.default_rng(seed)
    coords = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    truth = (coords[-1] + 0.3 * coords[0] > shape[-1] / 2).astype(np.uint8)
    image = (2.0 * truth + 0.3 * rng.standard_normal(shape)).astype(np.float32)[None]
    p1 = np.where(truth == 1, 0.75, 0.25)
    flip = rng.random(shape) < 0.2  # salt: confidently wrong pixels
    p1 = np.where(flip, 1.0 - p1, p1)
    p1 = np.clip(p1 + 0.15 * rng.standard_normal(shape), 0.02, 0.98)
    probs = np.stack([1.0 - p1, p1]).astype(np.float32)
    return probs, image, truth


@pytest.mark.parametrize("shape", [(64, 64), (24, 24, 24)])
def test_crf_cleans_salt_noise_along_an_intensity_edge(shape):
    probs, image, truth = toy(shape, seed=5)
    before = dice_per_class(probs.argmax(0), truth, 2)
    params = CRFParams()
    refined = mean_field(probs, image, params)
    after = dice_per_class(refined.argmax(0), truth, 2)
    for c in (0, 1):
        assert before[c] < 0.85 and after[c] > before[c] + 0.1, (before, after)
    # and the bilateral kernel is what keeps the edge: smoothing alone does worse there
    smooth = mean_field(probs, image, CRFParams(w_bilateral=0.0, w_spatial=3.0))
    assert (smooth.argmax(0) == truth).mean() < (refined.argmax(0) == truth).mean()


def test_params_validate():
    with pytest.raises(ValueError):
        CRFParams(radius=0)
    with pytest.raises(ValueError):
        CRFParams(theta_beta=0.0)
    probs, image, _ = random_inputs((10, 10))
    with pytest.raises(ValueError, match="radius"):
        mean_field(probs, image, CRFParams(radius=(1, 2, 3)))
    with pytest.raises(ValueError, match="compatibility"):
        mean_field(probs, image, CRFParams(compatibility=[[0.0, 1.0], [1.0, 0.0]]))


def test_applies_to_stitched_probabilities_with_a_normalizer():
    """crf_dask composes with StitchPlan.probabilities() and normalises the raw image block by block."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 1)).eval()
    rng = np.random.default_rng(6)
    img = (100.0 + 20.0 * rng.standard_normal((2, 50, 70))).astype(np.float32)
    mask = np.ones((50, 70), bool)
    mask[:10, :15] = False
    plan = build_plan(img, net, roi=(32, 32), overlap=0.25, chunks=(20, 24), mask=mask)

    def norm(x: np.ndarray) -> np.ndarray:
        return (x - 100.0) / 20.0

    params = CRFParams(iterations=2)
    out = crf_dask(plan.probabilities(), plan.image, params, plan.mask, normalizer=norm)
    assert out.chunks == plan.probabilities().chunks
    probs, refined = dask.compute(plan.probabilities(), out, scheduler="sync")
    np.testing.assert_allclose(refined, mean_field(probs, norm(img), params, mask), atol=1e-5)
