"""A card's KeepLargestConnectedComponent runs on the finished label map, across chunks, as MONAI's would."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import torch
from monai.transforms import KeepLargestConnectedComponent
from scipy import ndimage

from flows.config import SegmentOptions
from flows.pipeline import segment_one
from tests.models import tiny_model


def noisy_scan(path, shape=(40, 36, 30), seed=0):
    """Speckle: a random-weight network labels it in many small pieces, spread over many chunks."""
    rng = np.random.default_rng(seed)
    data = ndimage.gaussian_filter(rng.normal(size=shape), 1.0) * 1000
    nib.save(nib.Nifti1Image(data.astype(np.int16), np.diag([1.0, 1.0, 1.5, 1.0])), path)
    return path


def test_keep_largest_equals_monai_on_the_labels_without_it(tmp_path, dask_cluster):
    scan = noisy_scan(tmp_path / "scan.nii.gz")
    plain = tiny_model(tmp_path / "plain", spatial_dims=3, channels=1, seed=4)
    keep = tiny_model(tmp_path / "keep", spatial_dims=3, channels=1, seed=4)
    card = json.loads((keep.path / "card.json").read_text())
    card["inference"]["keep_largest"] = {"applied_labels": [1, 2]}
    (keep.path / "card.json").write_text(json.dumps(card))
    from segmentation import load_model

    keep = load_model(keep.path)
    options = SegmentOptions(chunk_size=16, keep_zarr=False)
    segment_one(scan, plain, tmp_path / "a", options, dask_cluster)
    outcome = segment_one(scan, keep, tmp_path / "b", options, dask_cluster)
    before = np.asarray(nib.load(tmp_path / "a" / "scan.nii.gz").dataobj)
    after = np.asarray(nib.load(tmp_path / "b" / "scan.nii.gz").dataobj)
    pieces = {v: ndimage.label(before == v, np.ones((3, 3, 3)))[1] for v in (1, 2)}
    assert max(pieces.values()) > 1  # there was something to remove, across more than one chunk
    want = KeepLargestConnectedComponent(applied_labels=[1, 2], is_onehot=False)(  # it writes in place: a copy
        torch.from_numpy(before[None].copy()))
    assert np.array_equal(after, np.asarray(want)[0])
    for v in (1, 2):
        assert ndimage.label(after == v, np.ones((3, 3, 3)))[1] <= 1
    stats = outcome.statistics
    counts = np.bincount(after.ravel(), minlength=3)
    assert {int(k): n for k, n in stats["label_pixels"].items()} == {v: int(n) for v, n in enumerate(counts) if n}
    assert stats["label_statistics"]["classes"]["class1"]["voxels"] == counts[1]
    assert sum(stats["keep_largest"]["removed_voxels"].values()) == int((before != after).sum())
