"""Device-resident regions: sent in their stored dtype, normalised, summed and reduced to labels on the device.

GPU workers take this path (``WindowPredictor.regions_on_device``, :mod:`segmentation.devicesums`); here it runs
on the CPU, forced, so the same torch code is checked against numpy's: the normalisation of each dtype a store
can hold (clipping, ``nonzero``, NaN and infinities) bit for bit, and whole stitched runs (windows past the
image's edges, a mask, blended logits, ``exact`` and ``fast``) against the host path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from segmentation import build_plan
from segmentation.inference import stored_on_device, to_device
from segmentation.normalize import Normalizer
from tests.test_stitching import tiny_net

NORMALIZERS = [
    Normalizer((0.0, 0.0), (1 / 255, 1 / 255)),
    Normalizer((1000.5, -3.0), (1e-4, 0.37)),
    Normalizer((12.0, 7.0), (0.1, 2.5), clip=(-1.0, 3.0)),
    Normalizer((5.0, 5.0), (0.5, 0.25), nonzero=True),
]


def _values(dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
    """(2, 17, 23) values spanning the dtype, zeros included; floats with NaN and infinities."""
    dtype = np.dtype(dtype)
    if not dtype.isnative:  # a big-endian store's values: made natively, then stored the other way round
        return _values(dtype.newbyteorder("="), rng).astype(dtype)
    shape = (2, 17, 23)
    if dtype.kind == "b":
        return rng.random(shape) < 0.5
    if dtype.kind == "f":
        out = (rng.standard_normal(shape) * 1e4).astype(dtype)
        out.flat[[0, 5, 9, 40]] = [np.nan, np.inf, -np.inf, 0]
        return out
    info = np.iinfo(dtype)
    out = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    out.flat[[0, 1, 2]] = [info.min, info.max, 0]
    return out


@pytest.mark.parametrize("dtype", ["bool", "uint8", "int8", "int16", "uint16", "int32", "uint32", "int64",
                                   "float16", "float32", "float64", ">u2", ">f4"])
@pytest.mark.parametrize("norm", range(len(NORMALIZERS)))
def test_torch_normalisation_equals_numpys_bit_for_bit(dtype, norm):
    normalizer = NORMALIZERS[norm]
    raw = _values(np.dtype(dtype), np.random.default_rng(norm))
    assert stored_on_device(raw.dtype)
    expected = normalizer(raw)
    got = torch.zeros(raw.shape, dtype=torch.float32)
    normalizer.apply_torch(to_device(raw, torch.device("cpu")), got)
    np.testing.assert_array_equal(got.numpy().view(np.uint32), expected.view(np.uint32))  # NaN bits too


def test_unsigned_types_keep_their_top_half():
    """uint16 and uint32 travel as the signed type of their width: values past its range must come back."""
    for dtype, top in ((np.uint16, 65535), (np.uint32, 4294967295)):
        raw = np.array([[[0, 1, top // 2 + 1, top]]], dtype=dtype)
        t = to_device(raw, torch.device("cpu"))
        assert t.tolist() == raw.astype(np.int64).tolist()


def test_a_dtype_torch_cannot_carry_stays_on_the_host():
    assert not stored_on_device(np.uint64)
    assert not stored_on_device(np.complex64)


def _store(path, values: np.ndarray, chunks) -> zarr.Array:
    arr = zarr.create_array(str(path), shape=values.shape, dtype=values.dtype, chunks=chunks)
    arr[...] = values
    return arr


@pytest.mark.parametrize("dtype,precision,masked", [("uint16", "exact", False), ("uint8", "fast", False),
                                                    ("float32", "exact", False), ("uint16", "exact", True)])
def test_a_stitched_run_is_the_same_either_way(tmp_path, dtype, precision, masked):
    """Whole runs with the stored region normalised on the device and on the host: probabilities identical (the
    same numbers reach the network), over a 77 × 90 image whose edge windows pass the image; with a mask, its
    invalid pixels are 0 for the network on both paths, whatever they hold."""
    rng = np.random.default_rng(3)
    if dtype == "float32":
        values = rng.standard_normal((2, 77, 90)).astype(np.float32)
        values[0, 5, 7], values[1, 60, 80] = np.nan, np.inf  # a float raster's nodata: 0 for the network
        normalizer = Normalizer((0.5, -0.25), (0.8, 1.3))
    else:
        info = np.iinfo(np.dtype(dtype))
        values = rng.integers(0, info.max, (2, 77, 90), dtype=dtype, endpoint=True)
        normalizer = Normalizer((float(info.max) / 2,) * 2, (2.0 / info.max,) * 2, clip=(-0.9, 0.9))
    arr = _store(tmp_path / "image.zarr", values, (2, 32, 32))
    net = tiny_net(2, 2, 3)
    mask = None
    if masked:
        mask = np.ones(values.shape[1:], bool)
        mask[20:50, 30:70] = False
    runs = {}
    for on_device in (False, True):
        plan = build_plan(arr, net, roi=(24, 24), overlap=0.4, chunks=32, precision=precision,
                          normalizer=normalizer, num_classes=3, device="cpu", mask=mask)
        plan.predictor.device_resident = on_device
        assert plan.predictor.regions_on_device is on_device
        runs[on_device] = (plan.probabilities().compute(scheduler="sync"), plan.labels().compute(scheduler="sync"))
    np.testing.assert_array_equal(runs[True][0], runs[False][0])
    np.testing.assert_array_equal(runs[True][1], runs[False][1])
    if masked:  # other values under the mask: the same result
        values[:, 20:50, 30:70] = rng.integers(0, np.iinfo(np.uint16).max, (2, 30, 40), dtype=np.uint16)
        plan = build_plan(_store(tmp_path / "other.zarr", values, (2, 32, 32)), net, roi=(24, 24), overlap=0.4,
                          chunks=32, precision=precision, normalizer=normalizer, num_classes=3, device="cpu",
                          mask=mask)
        plan.predictor.device_resident = True
        np.testing.assert_array_equal(plan.probabilities().compute(scheduler="sync"), runs[True][0])


def test_the_device_path_is_what_runs_when_asked(tmp_path, monkeypatch):
    """The switch is real: with it on, the evaluate tasks call accumulate_stored and never accumulate."""
    from segmentation.inference import WindowPredictor

    calls = {"stored": 0, "host": 0}
    stored, host = WindowPredictor.accumulate_stored, WindowPredictor.accumulate

    def count_stored(self, *a, **k):
        calls["stored"] += 1
        return stored(self, *a, **k)

    def count_host(self, *a, **k):
        calls["host"] += 1
        return host(self, *a, **k)

    from segmentation import devicesums

    device_labels = devicesums.labels

    def count_labels(*a, **k):
        calls["labels"] += 1
        return device_labels(*a, **k)

    calls["labels"] = 0
    monkeypatch.setattr(WindowPredictor, "accumulate_stored", count_stored)
    monkeypatch.setattr(WindowPredictor, "accumulate", count_host)
    monkeypatch.setattr(devicesums, "labels", count_labels)
    arr = _store(tmp_path / "i.zarr", np.random.default_rng(0).integers(0, 255, (2, 64, 64), dtype=np.uint8),
                 (2, 32, 32))
    plan = build_plan(arr, tiny_net(2, 2, 3), roi=(24, 24), chunks=32, num_classes=3, device="cpu",
                      precision="fast")
    plan.predictor.device_resident = True
    plan.labels().compute(scheduler="sync")
    assert calls["stored"] > 0 and calls["host"] == 0
    assert calls["labels"] == 4  # each of the 2 x 2 chunks' labels taken on the device, from tensor pieces
    assert WindowPredictor(tiny_net(2, 2, 3), spatial_dims=2, num_classes=3, device="cpu").regions_on_device \
        is False  # the CPU's default: numpy's normalisation


@pytest.mark.parametrize("precision,blend", [("exact", "logits"), ("fast", "probabilities")])
def test_a_masked_run_is_the_same_either_way(tmp_path, precision, blend):
    """A no-data mask, with blended logits (a bundle's softmax after the blend) or with ``fast``'s labels from the
    undivided sums: probabilities within float32 rounding of the host's (numpy's and torch's exp differ by an
    ulp), zero under the mask, labels equal."""
    rng = np.random.default_rng(5)
    values = rng.integers(0, 255, (2, 70, 83), dtype=np.uint8)
    mask = np.ones((70, 83), dtype=bool)
    mask[10:30, 40:75] = False
    arr = _store(tmp_path / "m.zarr", values, (2, 32, 32))
    runs = {}
    for on_device in (False, True):
        plan = build_plan(arr, tiny_net(2, 2, 3), roi=(24, 24), overlap=0.3, chunks=32, num_classes=3, device="cpu",
                          mask=mask, blend_outputs=blend, precision=precision,
                          normalizer=Normalizer((127.5,) * 2, (1 / 127.5,) * 2))
        plan.predictor.device_resident = on_device
        runs[on_device] = (plan.probabilities().compute(scheduler="sync"), plan.labels().compute(scheduler="sync"))
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=0, atol=2e-7)
    assert not runs[True][0][:, ~mask].any()
    np.testing.assert_array_equal(runs[True][1], runs[False][1])


def test_the_device_argmax_takes_ties_and_nan_as_the_host_does():
    """First maximum wins; a NaN after the first class never wins and stops later classes (argmax_first)."""
    from segmentation.devicesums import labels
    from storage.argmax import argmax_first

    rng = np.random.default_rng(2)
    probs = rng.integers(0, 3, (5, 40, 40)).astype(np.float32)  # many ties
    probs[2, :5] = np.nan
    probs[0, 5:8] = np.nan
    expected = argmax_first(probs, np.dtype(np.uint8))
    np.testing.assert_array_equal(labels(torch.from_numpy(probs), np.dtype(np.uint8)), expected)



@pytest.mark.parametrize("serial", [True, False])
def test_window_tasks_take_turns_on_the_device(serial):
    """Where the device is shared (a GPU worker runs two window tasks at once, ``flows.cluster.GPU_TASK_SHARE``),
    one region's windows run on it at a time: another task reads meanwhile but waits for its turn there; on the CPU
    (not serial) each thread runs its own windows."""
    import contextlib
    import threading
    import time

    from segmentation.inference import WindowPredictor, device_gate

    predictor = WindowPredictor(tiny_net(2, 2, 3), spatial_dims=2, num_classes=3, device="cpu", batch_size=1,
                                serial_device=serial)
    net, _ = predictor._network()  # prepared once, before the threads (a worker does it once, under its lock)
    calls: list[int] = []

    def logged(x, inner=net.forward):  # which thread runs each batch; slow enough for two callers to overlap
        calls.append(threading.get_ident())
        time.sleep(0.01)
        return inner(x)

    net.forward = logged
    region = np.random.default_rng(0).random((2, 40, 40), dtype=np.float32)
    windows = [(slice(y, y + 24), slice(x, x + 24)) for y in (0, 16) for x in (0, 16)]
    weights = np.ones((24, 24), np.float32)
    results = []
    threads = [threading.Thread(target=lambda: results.append(predictor.accumulate(region, windows, weights, 3)))
               for _ in range(2)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(calls) == 8 and len(results) == 2 and np.array_equal(results[0], results[1])
    switches = sum(a != b for a, b in zip(calls, calls[1:]))
    assert (switches == 1) if serial else (switches > 1)
    default = WindowPredictor(tiny_net(2, 2, 3), spatial_dims=2, num_classes=3, device="cpu")
    assert isinstance(default._turn(torch.device("cpu")), contextlib.nullcontext)  # the CPU: no turns
    assert default._turn(torch.device("cuda")) is device_gate(torch.device("cuda"))  # a GPU: one gate per device
