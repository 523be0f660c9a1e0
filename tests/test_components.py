"""Keeping the largest components out of core gives MONAI's answer, whatever the chunking.

The oracle is MONAI's ``KeepLargestConnectedComponent`` itself.  MONAI labels
with ``skimage.measure.label``; where scikit-image is not installed, MONAI is
given a stand-in that runs what skimage runs for a boolean image
(``skimage.measure._label._label_bool``: ``scipy.ndimage.label`` with
``generate_binary_structure(ndim, connectivity)``), and the rest of MONAI's
code (ranking, ties, zeroing) runs unchanged.
"""

from __future__ import annotations

import types
from pathlib import Path

import dask
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import zarr
from distributed import get_task_stream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from monai.transforms import KeepLargestConnectedComponent

from segmentation.components import keep_largest_components
from storage.errors import ConfigError, InvalidInputError


def _skimage_measure() -> types.ModuleType | type:
    """skimage.measure when installed, else what its ``label`` does for a boolean image."""
    try:
        from skimage import measure
        return measure
    except ImportError:
        class _BoolLabel:
            @staticmethod
            def label(image, background=None, return_num=False, connectivity=None):
                assert image.dtype == bool and background in (None, 0)
                structure = ndi.generate_binary_structure(image.ndim, connectivity or image.ndim)
                result = ndi.label(image, structure=structure)
                return result if return_num else result[0]
        return _BoolLabel


@pytest.fixture(autouse=True)
def monai_label(monkeypatch):
    """MONAI's labelling backend (see the module docstring)."""
    import monai.transforms.utils as mtu

    measure = _skimage_measure()
    if not mtu.has_measure:
        monkeypatch.setattr(mtu, "measure", measure)
        monkeypatch.setattr(mtu, "has_measure", True)
    return measure


@pytest.fixture(autouse=True)
def local_scheduler(request):
    """In-memory stores live in this process: run on threads unless the test asks for the cluster.

    The session's Dask cluster, once started by another module, is every
    test's default scheduler; its workers would write into copies of a MemoryStore.
    """
    if "dask_cluster" in request.fixturenames:
        yield
        return
    with dask.config.set(scheduler="threads"):
        yield


def monai_keep(vol: np.ndarray, **kw) -> np.ndarray:
    """MONAI's answer on a whole (spatial) label map, as a single-channel, not one-hot image."""
    out = KeepLargestConnectedComponent(is_onehot=False, **kw)(torch.tensor(vol[None]))  # a copy: MONAI writes in place
    return np.asarray(out)[0]


def stored(vol: np.ndarray, chunks, path: Path | None = None, shards=None) -> zarr.Array:
    """The label map as a zarr array (on disk when ``path`` is given)."""
    store = zarr.storage.MemoryStore() if path is None else str(path)
    z = zarr.create_array(store, shape=vol.shape, chunks=tuple(chunks), shards=shards, dtype=vol.dtype)
    z[...] = vol
    return z


def random_labels(shape, seed: int, classes: int = 4, smooth: float = 0.0) -> np.ndarray:
    """Random label maps with many components of many sizes (and ties among the small ones)."""
    rng = np.random.default_rng(seed)
    if smooth:
        field = ndi.gaussian_filter(rng.random((classes, *shape)), smooth, axes=tuple(range(1, len(shape) + 1)))
        return np.argmax(field, axis=0).astype(np.uint8)
    return rng.choice(classes, size=shape, p=[0.4] + [0.6 / (classes - 1)] * (classes - 1)).astype(np.uint8)


def snake_volume() -> np.ndarray:
    """32³: a 2×2 tube snaking through 14 chunks of 8³ (448 voxels, at most 32 in any chunk) and a 5³ blob."""
    vol = np.zeros((32, 32, 32), dtype=np.uint8)
    vol[2:4, 2:4, 0:32] = 1        # along x
    vol[2:4, 2:30, 30:32] = 1      # along y at the far x end
    vol[2:4, 28:30, 0:32] = 1      # back along x
    vol[2:30, 28:30, 0:2] = 1      # along z at x = 0
    vol[12:17, 12:17, 12:17] = 1   # the blob: 125 voxels, one chunk, bigger than any chunk's piece of the tube
    return vol


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("independent", [True, False])
@pytest.mark.parametrize("connectivity", [1, None])
@pytest.mark.parametrize("shape, chunks", [((13, 14, 11), (4, 5, 6)), ((37, 29), (8, 6))])
def test_equals_monai_on_random_volumes(seed, independent, connectivity, shape, chunks):
    vol = random_labels(shape, seed)
    for num in (1, 3):
        kw = dict(applied_labels=[1, 3], independent=independent, connectivity=connectivity, num_components=num)
        expected = monai_keep(vol, **kw)
        z = stored(vol, chunks)
        summary = keep_largest_components(z, **kw)
        got = z[...]
        assert np.array_equal(got, expected)
        changed = got != vol
        assert changed.any() == any(n > num for n in summary["components"].values())
        assert summary["removed_voxels"] == {v: int((changed & (vol == v)).sum()) for v in (1, 3)}
        assert np.all(got[changed] == 0) and set(np.unique(vol[changed])) <= {1, 3}


@pytest.mark.parametrize("independent", [True, False])
def test_smooth_volume_equals_monai_and_counts_components(independent):
    vol = random_labels((24, 20, 22), seed=5, smooth=1.5)
    kw = dict(applied_labels=[1, 2], independent=independent, connectivity=2)
    z = stored(vol, (8, 8, 8))
    summary = keep_largest_components(z, **kw)
    assert np.array_equal(z[...], monai_keep(vol, **kw))
    st2 = ndi.generate_binary_structure(3, 2)
    if independent:
        assert summary["components"] == {v: ndi.label(vol == v, st2)[1] for v in (1, 2)}
    else:
        assert summary["components"] == {"union": ndi.label(np.isin(vol, [1, 2]), st2)[1]}
    assert summary["connectivity"] == 2 and summary["applied_labels"] == [1, 2]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.integers(1, 12), min_size=3, max_size=3),
       chunks=st.lists(st.integers(1, 6), min_size=3, max_size=3),
       seed=st.integers(0, 2**16), independent=st.booleans(), connectivity=st.sampled_from([1, 2, 3, None]),
       num=st.integers(1, 4))
def test_any_shape_and_chunking_equals_monai(shape, chunks, seed, independent, connectivity, num):
    vol = random_labels(tuple(shape), seed, classes=3)
    kw = dict(applied_labels=[2, 1], independent=independent, connectivity=connectivity, num_components=num)
    z = stored(vol, chunks)
    keep_largest_components(z, **kw)
    assert np.array_equal(z[...], monai_keep(vol, **kw))


def test_ties_resolved_as_monai(monai_label):
    # Eight equal 2×2 squares, several crossing chunk borders, so that block order is not raster order.
    vol = np.zeros((24, 24), dtype=np.uint8)
    for r, c in [(0, 14), (3, 3), (7, 7), (7, 20), (11, 0), (15, 15), (19, 8), (22, 22)]:
        vol[r:r + 2, c:c + 2] = 1
    for num in (1, 2, 3, 5):
        kw = dict(applied_labels=[1], connectivity=1, num_components=num)
        expected = monai_keep(vol, **kw)
        for chunks in [(8, 8), (3, 5), (24, 1)]:
            z = stored(vol, chunks)
            keep_largest_components(z, **kw)
            assert np.array_equal(z[...], expected), (num, chunks)
        assert ndi.label(expected)[1] == num
    # The premise: skimage numbers components in the C order of their first voxel.
    lab = monai_label.label(vol.astype(bool), connectivity=1)
    firsts = [np.flatnonzero(lab.ravel() == k)[0] for k in range(1, lab.max() + 1)]
    assert firsts == sorted(firsts)


@pytest.mark.parametrize("chunks", [(8, 8, 8), (16, 4, 32), (32, 32, 8)])
def test_snake_through_many_chunks_is_one_component(chunks):
    vol = snake_volume()
    tube = vol.copy()
    tube[12:17, 12:17, 12:17] = 0
    blocks = {tuple(i // 8 for i in idx) for idx in zip(*np.nonzero(tube))}
    assert len(blocks) >= 8 and max(
        tube[i * 8:i * 8 + 8, j * 8:j * 8 + 8, k * 8:k * 8 + 8].sum() for i, j, k in blocks) < 125 < tube.sum()
    z = stored(vol, chunks)
    summary = keep_largest_components(z, applied_labels=[1], connectivity=1)
    assert np.array_equal(z[...], tube)
    assert summary["components"] == {1: 2} and summary["removed_voxels"] == {1: 125}


def test_diagonal_chains_join_across_chunk_corners_only_with_full_connectivity():
    # Two 32-voxel chains of single voxels, each step diagonal, crossing chunk corners shared by 8 blocks.
    vol = np.zeros((32, 32, 32), dtype=np.uint8)
    i = np.arange(32)
    vol[i, i, i] = 1
    vol[i, 31 - i, i] = 2
    vol[20:22, 2:4, 4:9] = 1  # 20 voxels
    vol[2:4, 20:22, 24:29] = 2  # 20 voxels
    chains = np.zeros_like(vol)
    chains[i, i, i] = 1
    chains[i, 31 - i, i] = 2
    blobs = vol - chains
    for connectivity, expected in [(3, chains), (1, blobs), (2, blobs)]:
        z = stored(vol, (8, 8, 8))
        keep_largest_components(z, applied_labels=[1, 2], connectivity=connectivity)
        assert np.array_equal(z[...], expected), connectivity
        assert np.array_equal(expected, monai_keep(vol, applied_labels=[1, 2], connectivity=connectivity))


def test_nodata_voxels_untouched():
    vol = random_labels((20, 18, 16), seed=3)
    nodata = 255
    rng = np.random.default_rng(9)
    vol[rng.random(vol.shape) < 0.15] = nodata
    vol[:, :, 7] = nodata  # a wall of nodata splits components
    kw = dict(applied_labels=[1, 2, 3], independent=False, connectivity=None)
    z = stored(vol, (6, 6, 6))
    summary = keep_largest_components(z, nodata_label=nodata, **kw)
    got = z[...]
    assert np.array_equal(got == nodata, vol == nodata)
    assert np.array_equal(got, monai_keep(vol, **kw))  # nodata is neither foreground nor written
    assert nodata not in summary["removed_voxels"] and sum(summary["removed_voxels"].values()) > 0


def test_processing_chunks_and_shards_do_not_change_the_result(tmp_path):
    vol = random_labels((16, 24, 12), seed=7, smooth=1.0)
    kw = dict(applied_labels=[1, 2, 3], connectivity=1, num_components=2)
    expected = monai_keep(vol, **kw)
    for i, (chunks, shards, block) in enumerate([((4, 4, 4), None, (8, 12, 4)), ((4, 4, 4), (8, 8, 12), None),
                                                 ((4, 4, 4), (8, 8, 12), (16, 8, 12))]):
        z = stored(vol, chunks, tmp_path / f"l{i}.zarr", shards=shards)
        keep_largest_components(z, chunks=block, **kw)
        assert np.array_equal(zarr.open_array(str(tmp_path / f"l{i}.zarr"))[...], expected)


def test_on_a_distributed_cluster(tmp_path, dask_cluster):
    vol = random_labels((20, 20, 20), seed=11)
    kw = dict(applied_labels=[1, 2], connectivity=None)
    z = stored(vol, (8, 8, 8), tmp_path / "labels.zarr")
    with get_task_stream(dask_cluster) as stream:
        keep_largest_components(z, **kw)
    ran = {t["key"].split("-")[0] if isinstance(t["key"], str) else str(t["key"]) for t in stream.data}
    assert {"_block_stats", "_rewrite_block"} <= ran  # both passes ran on the cluster's workers
    assert np.array_equal(zarr.open_array(str(tmp_path / "labels.zarr"))[...], monai_keep(vol, **kw))


def test_bad_arguments_are_config_errors():
    z = stored(np.zeros((8, 8), dtype=np.uint8), (4, 4))
    for kw, words in [(dict(applied_labels=[]), "empty"), (dict(applied_labels=[0]), "background"),
                      (dict(applied_labels=[1], connectivity=3), "connectivity"),
                      (dict(applied_labels=[1], num_components=0), "num_components"),
                      (dict(applied_labels=[1, 5], nodata_label=5), "nodata"),
                      (dict(applied_labels=[300]), "dtype"),
                      (dict(applied_labels=[1], chunks=(6, 4)), "multiples")]:
        with pytest.raises(ConfigError, match=words) as err:
            keep_largest_components(z, **kw)
        assert str(z.store_path) in str(err.value)
    f = stored(np.zeros((8, 8), dtype=np.float32), (4, 4))
    with pytest.raises(InvalidInputError, match="integer"):
        keep_largest_components(f, applied_labels=[1])
