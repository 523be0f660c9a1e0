"""CUDA paths: exact and fast (AMP) inference on a GPU, locally and on a GPU Dask worker.

Skipped where no CUDA device is present (CI); run on a GPU machine with
``python -m pytest tests/test_cuda.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segmentation import build_plan, predict
from tests.test_stitching import monai_reference, tiny_net

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def test_exact_on_cuda_matches_monai_on_cpu():
    img = np.random.default_rng(0).random((2, 131, 170), dtype=np.float32)
    net = tiny_net(2, 2, 3)
    ref = monai_reference(img, net, (48, 48), 0.25)
    probs = predict(img, net, roi=(48, 48), overlap=0.25, chunks=64, device="cuda").compute(scheduler="threads")
    np.testing.assert_allclose(probs, ref, atol=1e-4)
    assert (probs.argmax(0) == ref.argmax(0)).mean() > 0.9999  # TF32/cuDNN may flip exact ties only


def test_fast_amp_on_cuda_agrees_with_exact():
    img = np.random.default_rng(1).random((1, 40, 44, 36), dtype=np.float32)
    net = tiny_net(3, 1, 3)
    exact = predict(img, net, roi=(16, 16, 16), device="cuda", probabilities=False).compute(scheduler="threads")
    fast = predict(img, net, roi=(16, 16, 16), device="cuda", precision="fast",
                   probabilities=False).compute(scheduler="threads")
    assert (exact == fast).mean() > 0.98


def test_gpu_dask_worker(tmp_path):
    from distributed import Client, LocalCluster

    img = np.random.default_rng(2).random((3, 200, 210), dtype=np.float32)
    net = tiny_net(2, 3, 4)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        plan = build_plan(img, net, roi=(64, 64), overlap=0.25, chunks=100, device="cuda")
        probs, counts = client.compute([plan.probabilities(), plan.counts()], sync=True)
        devices = client.run(lambda: torch.cuda.is_available())
    assert all(devices.values())
    assert counts["windows_evaluated"] == len(plan.grid)
    ref = monai_reference(img, net, (64, 64), 0.25)
    np.testing.assert_allclose(probs, ref, atol=1e-4)


def test_device_resident_stored_uint16_on_cuda_matches_the_host_path_on_cpu(tmp_path):
    """A stored uint16 image on a CUDA worker: the region goes as int16 from pinned memory, is normalised,
    summed and reduced to labels on the device; against the CPU's host path."""
    import zarr

    from segmentation.normalize import Normalizer

    values = np.random.default_rng(4).integers(0, 65535, (2, 150, 170), dtype=np.uint16, endpoint=True)
    arr = zarr.create_array(str(tmp_path / "u16.zarr"), shape=values.shape, dtype="uint16", chunks=(2, 64, 64))
    arr[...] = values
    net = tiny_net(2, 2, 3)
    norm = Normalizer((32767.5,) * 2, (1 / 32767.5,) * 2)
    out = {}
    for device in ("cpu", "cuda"):
        plan = build_plan(arr, net, roi=(48, 48), overlap=0.25, chunks=64, device=device, normalizer=norm,
                          num_classes=3)
        assert plan.predictor.regions_on_device is (device == "cuda")
        out[device] = (plan.probabilities().compute(scheduler="threads"), plan.labels().compute(scheduler="threads"))
    np.testing.assert_allclose(out["cuda"][0], out["cpu"][0], atol=1e-4)
    assert (out["cuda"][1] == out["cpu"][1]).mean() > 0.9999  # TF32/cuDNN may flip exact ties only
