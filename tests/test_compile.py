"""``--compile``: torch.compile'd windows give the eager probabilities (to float rounding), and only when asked."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from segmentation import predict


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def test_compiled_windows_match_eager_and_the_cache_is_segflows(tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # (this may set TORCHINDUCTOR_CACHE_DIR to torch's default: cleared below)
    counters.clear()
    monkeypatch.setenv("SEGFLOW_COMPILE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    image = np.random.default_rng(0).random((3, 90, 70), dtype=np.float32)
    net = _net()
    eager = predict(image, net, roi=(32, 32), overlap=0.25, chunks=48, batch_size=3).compute(scheduler="sync")
    # 3 windows a batch over owners with 1, 2 and 4 windows: short last batches are padded, one graph serves all
    fast = predict(image, net, roi=(32, 32), overlap=0.25, chunks=48, batch_size=3,
                   compile=True).compute(scheduler="sync")
    err = float(np.abs(fast - eager).max())
    assert err <= 1e-4, err
    assert np.array_equal(fast.argmax(0), eager.argmax(0))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert any((tmp_path / "cache").rglob("*")), "inductor wrote nothing to segflow's compile cache"


def test_compile_is_part_of_a_runs_identity_only_when_on():
    from flows.config import SegmentOptions
    from flows.ledger import keyed_parameters
    from segmentation.demo_cards import landcover_card

    card = landcover_card()
    assert "compile" not in keyed_parameters(card, SegmentOptions())  # earlier runs keep their keys
    assert keyed_parameters(card, SegmentOptions(compile=True))["compile"] is True
