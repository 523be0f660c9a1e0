"""``fast`` on a CPU: bf16 only where the CPU has bf16 instructions (segmentation.precision).

On a CPU without them oneDNN emulates bf16 and runs slower than fp32, so there
``fast`` computes in fp32. ``SEGFLOW_CPU_BF16`` forces either path, so both are
tested on any machine.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segmentation import build_plan, predict, precision
from segmentation.inference import WindowPredictor
from storage.errors import ConfigError
from tests.test_stitching import tiny_net


@pytest.mark.parametrize("value, expected", [("1", True), ("0", False)])
def test_the_environment_overrides_the_detection(monkeypatch, value, expected):
    monkeypatch.setenv(precision.ENV, value)
    assert precision.cpu_has_bf16() is expected
    assert precision.fast_cpu_dtype() == (torch.bfloat16 if expected else None)


def test_a_misspelt_override_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(precision.ENV, "yes")
    with pytest.raises(ConfigError, match="SEGFLOW_CPU_BF16='yes'"):
        precision.cpu_has_bf16()


def test_what_a_run_computes_in_is_described_for_provenance():
    assert precision.describe("exact", "cpu", torch.bfloat16) == "float32"
    assert precision.describe("fast", "cpu", torch.bfloat16) == "bfloat16 autocast"
    assert precision.describe("fast", "cpu", None) == "float32 (this CPU has no bf16 instructions)"
    assert precision.describe("fast", "cuda", None) == "float16 autocast"


def _fast_and_exact(monkeypatch, bf16: str) -> tuple[np.ndarray, np.ndarray]:
    monkeypatch.setenv(precision.ENV, bf16)
    img = np.random.default_rng(3).random((2, 70, 60), dtype=np.float32)
    net = tiny_net(2, 2, 3)
    out = []
    for p in ("fast", "exact"):
        out.append(predict(img, net, roi=(32, 32), overlap=0.25, precision=p, probabilities=True)[1]
                   .compute(scheduler="sync"))
    return out[0], out[1]


def test_fast_without_bf16_computes_the_exact_probabilities(monkeypatch):
    fast, exact = _fast_and_exact(monkeypatch, "0")
    np.testing.assert_allclose(fast, exact, atol=1e-6)


def test_fast_with_bf16_computes_in_bf16(monkeypatch):
    """The other side: bf16 autocast rounds the logits, so the probabilities move by far more than fp32's ulps."""
    fast, exact = _fast_and_exact(monkeypatch, "1")
    assert np.abs(fast - exact).max() > 1e-4


def test_the_choice_is_the_planners_and_travels_to_the_workers(monkeypatch):
    """Made when the predictor is built, pickled with it: a worker on another CPU computes as the plan says, and
    plans made with and without bf16 never share dask keys."""
    import pickle

    net, img = tiny_net(2, 2, 3), np.zeros((2, 40, 40), np.float32)
    monkeypatch.setenv(precision.ENV, "1")
    pred = WindowPredictor(net, spatial_dims=2, num_classes=3, precision="fast")
    key_bf16 = build_plan(img, net, roi=(16, 16), precision="fast").labels().name
    assert build_plan(img, net, roi=(16, 16), precision="fast").labels().name == key_bf16  # the same plan, one key
    monkeypatch.setenv(precision.ENV, "0")
    assert pickle.loads(pickle.dumps(pred)).cpu_dtype == torch.bfloat16
    assert build_plan(img, net, roi=(16, 16), precision="fast").labels().name != key_bf16
