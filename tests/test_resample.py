"""Model space for volumes: storage.grids and storage.resample against MONAI itself.

MONAI's ``Orientationd`` + ``Spacingd`` (its defaults: bilinear, border,
align_corners=False, float64) and ``Invertd`` run on real MetaTensors (and once
on a NIfTI written with nibabel, read by ``LoadImaged``); segflow's chunked
``to_model`` / ``to_input`` must give the same grids and values, whatever the
chunking, while each task reads only its own source region.  Interpolation
runs in float32 (values within 1e-5 of MONAI's float64, relative to the value
range; nearest neighbour exactly equal).  ``argmax_to_input``, the labels-only
way back, must equal the argmax of ``to_input`` on every voxel, ties included.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import dask
import dask.array as da
import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, Invertd, LoadImaged, Orientationd, Spacingd
from scipy.ndimage import gaussian_filter

from storage.errors import InvalidInputError
from storage.grids import GridMapping, model_grid
from storage import resample
from storage.resample import argmax_to_input, to_input, to_model
from segmentation.chunkwrites import labels_of

FLOAT32_RTOL = 1e-5  # float32 interpolation against MONAI's float64, relative to the values' range


def rotation(axis: int, degrees: float) -> np.ndarray:
    """A 3x3 rotation about one world axis."""
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    r = np.eye(3)
    i, j = [(1, 2), (0, 2), (0, 1)][axis]
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def affine(linear: np.ndarray, origin=(3.0, -7.0, 11.0)) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = linear
    a[:3, 3] = origin
    return a


def smooth_volume(channels: int, shape: tuple[int, ...], seed: int, sigma: float = 1.5) -> np.ndarray:
    """A smooth random (C, *shape) float64 volume in [0, 100]-ish: interpolation differences show, noise does not."""
    rng = np.random.default_rng(seed)
    return np.stack([gaussian_filter(rng.random(shape), sigma) for _ in range(channels)]) * 100.0


# name: (affine, shape (K, J, I), axcodes, pixdim (i, j, k) of the oriented axes)
CASES = {
    "ras_upsample_2_to_0.7": (affine(np.diag([2.0, 2.0, 2.0])), (7, 8, 9), "RAS", (0.7, 0.7, 0.7)),
    "lps_to_ras": (affine(np.diag([-0.8, -0.9, 1.2])), (12, 13, 14), "RAS", (1.5, 1.5, 1.5)),
    "las_to_ras": (affine(np.diag([-1.0, 1.0, 2.0])), (10, 12, 9), "RAS", (1.0, 1.0, 1.0)),
    "permuted_axes": (affine(np.array([[0, 0, 1.3], [-0.9, 0, 0], [0, 1.1, 0]])), (10, 12, 9), "RAS", (1.0, 2.0, 1.0)),
    "oblique": (affine(rotation(0, 20) @ rotation(2, 10) @ np.diag([0.9, 1.1, 1.3])), (12, 11, 10), "RAS",
                (1.5, 1.5, 1.5)),
    "anisotropic_0.6x0.6x5_to_1.5": (affine(np.diag([0.6, 0.6, 5.0])), (6, 40, 42), "RAS", (1.5, 1.5, 1.5)),
    "lps_kept_nonpositive_pixdim": (affine(np.diag([-0.8, -0.9, 1.2])), (12, 13, 14), "LPS", (1.5, -1.0, 0.0)),
    "to_lps_no_spacing": (affine(np.diag([0.8, 0.9, 1.2])), (5, 6, 7), "LPS", None),
}


def monai_transform(axcodes: str | None, pixdim) -> Compose:
    steps = []
    if axcodes is not None:
        steps.append(Orientationd("img", axcodes=axcodes))
    if pixdim is not None:
        steps.append(Spacingd("img", pixdim=pixdim))  # MONAI's defaults: bilinear, border, align_corners=False
    return Compose(steps)


def monai_forward(image_ckji: np.ndarray, aff: np.ndarray, axcodes, pixdim) -> tuple[Compose, MetaTensor]:
    """MONAI on the same volume, loaded as MONAI loads it: (C, I, J, K) with the same affine."""
    tensor = MetaTensor(torch.as_tensor(image_ckji.transpose(0, 3, 2, 1).copy()), affine=torch.as_tensor(aff))
    transform = monai_transform(axcodes, pixdim)
    return transform, transform({"img": tensor})["img"]


def to_storage(t: torch.Tensor) -> np.ndarray:
    return np.asarray(t.detach().cpu().numpy()).transpose(0, 3, 2, 1)


@pytest.fixture(scope="module")
def monai_results() -> dict:
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            aff, shape, axcodes, pixdim = CASES[name]
            image = smooth_volume(2, shape, seed=len(name))
            transform, out = monai_forward(image, aff, axcodes, pixdim)
            cache[name] = (image, transform, out)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(CASES))
def test_model_grid_equals_monai(name, monai_results):
    aff, shape, axcodes, pixdim = CASES[name]
    _, _, out = monai_results(name)
    mapping = model_grid(aff, shape, axcodes=axcodes, pixdim_ijk=pixdim)
    assert mapping.model_shape == tuple(out.shape[1:])[::-1]
    np.testing.assert_allclose(mapping.model_affine, out.affine.numpy(), rtol=0, atol=1e-6)
    assert not mapping.is_identity


@pytest.mark.parametrize("name", list(CASES))
def test_to_model_equals_monai(name, monai_results):
    aff, shape, axcodes, pixdim = CASES[name]
    image, _, out = monai_results(name)
    mapping = model_grid(aff, shape, axcodes=axcodes, pixdim_ijk=pixdim)
    ours = to_model(da.from_array(image, chunks=(2, 4, 5, 3)), mapping, chunks=5).compute(scheduler="sync")
    ref = to_storage(out)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    value_range = float(image.max() - image.min())
    assert np.abs(ours - ref).max() <= FLOAT32_RTOL * value_range


@pytest.mark.parametrize("name", ["lps_to_ras", "permuted_axes", "anisotropic_0.6x0.6x5_to_1.5"])
def test_to_model_nearest_equals_monai_exactly(name):
    """Nearest neighbour picks the same voxels as MONAI, .5 ties included: equal once MONAI's float64 is float32."""
    aff, shape, axcodes, pixdim = CASES[name]
    image = smooth_volume(1, shape, seed=4)
    tensor = MetaTensor(torch.as_tensor(image.transpose(0, 3, 2, 1).copy()), affine=torch.as_tensor(aff))
    out = Compose([Orientationd("img", axcodes=axcodes), Spacingd("img", pixdim=pixdim, mode="nearest")])(
        {"img": tensor})["img"]
    mapping = model_grid(aff, shape, axcodes=axcodes, pixdim_ijk=pixdim)
    ours = to_model(da.from_array(image, chunks=(1, 4, 5, 3)), mapping, chunks=5, mode="nearest").compute(
        scheduler="sync")
    assert np.array_equal(ours, to_storage(out).astype(np.float32))


@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("name", list(CASES))
def test_to_input_equals_invertd(name, mode, monai_results):
    aff, shape, axcodes, pixdim = CASES[name]
    _, transform, out = monai_results(name)
    mapping = model_grid(aff, shape, axcodes=axcodes, pixdim_ijk=pixdim)
    probs = smooth_volume(3, mapping.model_shape, seed=7, sigma=1.0) / 100.0  # a multi-channel "probability"
    pred = MetaTensor(torch.as_tensor(probs.transpose(0, 3, 2, 1).copy()), affine=out.affine,
                      applied_operations=out.applied_operations)
    inverter = Invertd("pred", transform=transform, orig_keys="img", nearest_interp=(mode == "nearest"))
    ref = to_storage(inverter({"pred": pred, "img": out})["pred"])
    ours = to_input(da.from_array(probs, chunks=(3, 3, 4, 5)), mapping, chunks=4, mode=mode).compute(scheduler="sync")
    assert ours.shape == ref.shape == (3, *shape)
    if mode == "nearest":
        assert np.array_equal(ours, ref.astype(np.float32))
    else:
        assert np.abs(ours - ref).max() <= FLOAT32_RTOL * float(np.ptp(probs))


def test_to_model_equals_monai_on_a_nifti_file(tmp_path: Path):
    """The file convention end to end: nibabel (I, J, K) data is segflow's image[c, k, j, i]."""
    aff, shape, axcodes, pixdim = CASES["permuted_axes"]
    data_ijk = smooth_volume(1, shape[::-1], seed=3)[0].astype(np.float32)
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(data_ijk, aff), str(path))
    transform = Compose([LoadImaged("img", image_only=False), EnsureChannelFirstd("img"),
                         Orientationd("img", axcodes=axcodes), Spacingd("img", pixdim=pixdim)])
    out = transform({"img": str(path)})["img"]
    stored_affine = nib.load(str(path)).affine  # float32 on disk: the grid as the file really has it
    mapping = model_grid(stored_affine, shape, axcodes=axcodes, pixdim_ijk=pixdim)
    image = data_ijk.transpose(2, 1, 0)[None]
    ours = to_model(da.from_array(image, chunks=(1, 3, 5, 4)), mapping, chunks=(4, 3, 6)).compute(scheduler="sync")
    assert mapping.model_shape == tuple(out.shape[1:])[::-1]
    np.testing.assert_allclose(mapping.model_affine, out.affine.numpy(), rtol=0, atol=1e-6)
    assert np.abs(ours - to_storage(out)).max() <= FLOAT32_RTOL * float(np.ptp(data_ijk))


@pytest.mark.parametrize("name", ["permuted_axes", "anisotropic_0.6x0.6x5_to_1.5", "lps_to_ras"])
def test_results_do_not_depend_on_chunking(name):
    aff, shape, axcodes, pixdim = CASES[name]
    mapping = model_grid(aff, shape, axcodes=axcodes, pixdim_ijk=pixdim)
    image = smooth_volume(2, shape, seed=11)
    probs = smooth_volume(3, mapping.model_shape, seed=12) / 100.0
    with dask.config.set(scheduler="sync"):
        for mode in ("bilinear", "nearest"):
            forward = [to_model(da.from_array(image, chunks=ic), mapping, chunks=oc, mode=mode).compute()
                       for ic in [(2, 3, 4, 5), (1, 7, 5, 11)] for oc in [4, (7, 3, 5)]]
            backward = [to_input(da.from_array(probs, chunks=ic), mapping, chunks=oc, mode=mode).compute()
                        for ic in [(3, 2, 3, 4), (1, 5, 7, 3)] for oc in [3, (5, 4, 6)]]
            for results in (forward, backward):
                assert all(np.array_equal(results[0], r) for r in results[1:])
    # the output chunks asked for are the ones produced
    assert to_model(da.from_array(image), mapping, chunks=(7, 3, 5)).chunksize[1:] == tuple(
        min(c, n) for c, n in zip((7, 3, 5), mapping.model_shape))
    assert to_input(da.from_array(probs), mapping, chunks=(5, 4, 6)).chunks[1:] == da.empty(
        shape, chunks=(5, 4, 6)).chunks


@pytest.mark.parametrize("axcodes, pixdim, spacing", [
    ("RAS", (1.0, 1.0, 1.0), (1.0, 1.0, 1.0)),
    (None, None, (0.7, 0.8, 3.0)),
    ("RAS", (0.7, 0.8, 3.0), (0.7, 0.8, 3.0)),
    ("RAS", (0.7, 0.8, 3.0), (0.7002, 0.8, 3.0)),  # within MONAI's AFFINE_TOL: MONAI does not resample either
])
def test_matching_grid_is_the_identity(axcodes, pixdim, spacing):
    aff = affine(np.diag(spacing))
    shape = (5, 6, 7)
    mapping = model_grid(aff, shape, axcodes=axcodes, pixdim_ijk=pixdim)
    assert mapping.is_identity
    assert mapping.model_shape == shape
    image = (np.arange(2 * 5 * 6 * 7, dtype=np.float32).reshape(2, *shape) * 1.37) % 101
    x = da.from_array(image, chunks=(2, 2, 3, 4))
    ours = to_model(x, mapping).compute(scheduler="sync")
    assert ours.dtype == np.float32 and np.array_equal(ours, image)
    assert to_model(x, mapping).chunks == x.chunks
    assert np.array_equal(to_input(x, mapping).compute(scheduler="sync"), image)
    # what MONAI does on the same grid: values as they were, affine kept
    _, out = monai_forward(image.astype(np.float64), aff, axcodes, pixdim)
    assert np.array_equal(to_storage(out), image)
    np.testing.assert_allclose(mapping.model_affine, out.affine.numpy(), atol=1e-12)


class RecordingVolume:
    """An array-like that records every region dask reads from it."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape, self.dtype, self.ndim = array, array.shape, array.dtype, array.ndim
        self.reads: list[tuple[slice, ...]] = []

    def __getitem__(self, key):
        self.reads.append(key)
        return self.array[key]


@pytest.mark.parametrize("name, chunk", [("anisotropic_0.6x0.6x5_to_1.5", 8), ("ras_upsample_2_to_0.7", 5)])
def test_each_task_reads_only_its_source_region(name, chunk, monkeypatch):
    aff, shape, axcodes, pixdim = CASES[name]
    mapping = model_grid(aff, shape, axcodes=axcodes, pixdim_ijk=pixdim)
    assert all(a.source_axis == s and not a.flip for s, a in enumerate(mapping.axes))  # regions in storage order
    volume = RecordingVolume(smooth_volume(1, shape, seed=5))
    in_chunks = (1, 2, 7, 6)
    regions: list[tuple[int, ...]] = []
    real_block = resample._resample_block

    def recording_block(src, *args, **kwargs):  # the real interpolation, noting the region each task was given
        regions.append(src.shape)
        return real_block(src, *args, **kwargs)

    monkeypatch.setattr(resample, "_resample_block", recording_block)
    out = to_model(da.from_array(volume, chunks=in_chunks, asarray=False), mapping, chunks=chunk)
    result = out.compute(scheduler="sync")
    assert len(regions) == np.prod(out.numblocks)
    for region in regions:
        for s, a in enumerate(mapping.axes):
            # one chunk's outputs span (chunk - 1) * scale source voxels; linear adds one each side at most
            assert region[s + 1] <= math.ceil((chunk - 1) * a.scale) + 2
    # the source is read chunk by chunk, never whole, and each chunk once
    reads = [k for k in volume.reads if all(s.stop > s.start for s in k)]  # dask's zero-size meta probe aside
    assert all(k[a].stop - k[a].start <= in_chunks[a] for k in reads for a in range(4))
    assert len(reads) == len(set(map(str, reads)))
    monkeypatch.undo()
    assert np.array_equal(result, to_model(da.from_array(volume.array), mapping, chunks=chunk).compute())


def test_to_json_records_both_grids():
    aff, shape, axcodes, pixdim = CASES["permuted_axes"]
    mapping = model_grid(aff, shape, axcodes=axcodes, pixdim_ijk=pixdim)
    record = json.loads(json.dumps(mapping.to_json()))
    assert record["input"]["shape_kji"] == list(shape)
    assert record["model"]["shape_kji"] == list(mapping.model_shape)
    np.testing.assert_array_equal(record["model"]["affine"], mapping.model_affine)
    assert [a["source_axis"] for a in record["axes"]] == [1, 2, 0]
    assert record["identity"] is False
    assert isinstance(mapping, GridMapping)


def test_sheared_affine_and_bad_axcodes_are_refused():
    sheared = affine(np.array([[1.0, 0.4, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    with pytest.raises(InvalidInputError, match="^scan.nii.gz: .*sheared"):
        model_grid(sheared, (8, 8, 8), axcodes="RAS", pixdim_ijk=(1.5, 1.5, 1.5), name="scan.nii.gz")
    with pytest.raises(InvalidInputError, match="axcodes"):
        model_grid(affine(np.eye(3)), (8, 8, 8), axcodes="RAX", pixdim_ijk=None)


# --- the labels-only way back ----------------------------------------------------------------------------------------

def class_probabilities(classes: int, shape: tuple[int, ...], seed: int, kind: str) -> np.ndarray:
    """(classes, *shape) float32 probabilities: ``random`` (a label per voxel), ``smooth`` (label regions with
    boundaries, as a network gives) or ``ties`` (smooth, quantised to 1/8 so that many voxels tie exactly at the
    top, with blocks where a later class equals an earlier one and near-ties one float32 step apart)."""
    rng = np.random.default_rng(seed)
    if kind == "random":
        logits = rng.normal(size=(classes, *shape)) * 2.0
    else:
        sigma = min(2.0, min(shape) / 4)  # a few label regions even on the smallest grids
        logits = np.stack([gaussian_filter(rng.normal(size=shape), sigma, mode="wrap") for _ in range(classes)])
        logits *= 3.0 / logits.std()
    p = np.exp(logits - logits.max(axis=0))
    p = (p / p.sum(axis=0)).astype(np.float32)
    if kind == "ties":
        p = np.round(p * 8.0) / np.float32(8.0)
        p[2, ::3] = p[0, ::3]  # exact ties between an early and a late class
        p[1, 1::3, ::2] = np.nextafter(p[0, 1::3, ::2], np.float32(1.0))  # class 1 one float32 step above class 0
        p[2, 2::3, 1::2] = np.nextafter(p[1, 2::3, 1::2], np.float32(0.0))  # class 2 one step below class 1
    return p.astype(np.float32)


def full_labels(probs: np.ndarray, mapping: GridMapping, mode: str) -> np.ndarray:
    """The reference: every class interpolated everywhere, then the pipeline's argmax."""
    back = to_input(da.from_array(probs, chunks=(probs.shape[0], 3, 4, 5)), mapping, chunks=4, mode=mode)
    return labels_of(back.compute(scheduler="sync"), None, probs.shape[0])


@pytest.mark.parametrize("kind", ["random", "smooth", "ties"])
@pytest.mark.parametrize("name, boundary_only", [
    ("ras_upsample_2_to_0.7", True), ("lps_to_ras", True), ("permuted_axes", True), ("oblique", True),
    ("anisotropic_0.6x0.6x5_to_1.5", True), ("to_lps_no_spacing", True), ("oblique", False)])
def test_argmax_to_input_equals_the_full_path(name, boundary_only, kind, monkeypatch):
    """Labels copied where the interpolation cell is uniform, interpolated elsewhere: identical to the full path."""
    if boundary_only:  # never fall back to whole-chunk interpolation: the boundary path must carry every chunk
        monkeypatch.setattr(resample, "FULL_FRACTION", 1.0)
    aff, shape, axcodes, pixdim = CASES[name]
    mapping = model_grid(aff, shape, axcodes=axcodes, pixdim_ijk=pixdim)
    probs = class_probabilities(4, mapping.model_shape, seed=len(name), kind=kind)
    for mode in ("bilinear", "nearest"):
        expected = full_labels(probs, mapping, mode)
        for in_chunks, out_chunks in [((4, 3, 4, 5), 4), ((4, 7, 2, 6), (5, 3, 7))]:
            ours = argmax_to_input(da.from_array(probs, chunks=in_chunks), mapping, chunks=out_chunks,
                                   mode=mode).compute(scheduler="sync")
            assert ours.dtype == np.uint8 and ours.shape == tuple(shape)
            assert np.array_equal(ours, expected), f"{mode}: {(ours != expected).sum()} voxels differ"
    assert len(np.unique(expected)) >= 2


def test_the_shortcut_copies_most_labels_and_interpolates_the_ties():
    """On smooth probabilities most cells are uniform (copied); a tie at the top is never trusted."""
    aff, shape, axcodes, pixdim = CASES["ras_upsample_2_to_0.7"]
    mapping = model_grid(aff, shape, axcodes=axcodes, pixdim_ijk=pixdim)
    probs = class_probabilities(3, mapping.model_shape, seed=2, kind="smooth")
    mark = np.iinfo(np.uint8).max
    cells = resample._uniform_cells(probs, [0, 1, 2], np.dtype(np.uint8))
    assert (cells != mark).mean() > 0.5
    tied = probs.copy()
    tied[1] = tied[0] = np.maximum(tied[0], tied[1])  # classes 0 and 1 tie at the top wherever either led
    tied_cells = resample._uniform_cells(tied, [0, 1, 2], np.dtype(np.uint8))
    top = labels_of(tied, None, 3)
    assert np.all(tied_cells[top == 0] == mark) and (top == 0).any()
    assert np.all(np.isin(tied_cells[tied_cells != mark], [2]))
