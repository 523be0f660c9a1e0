"""Small random-weight model directories for pipeline tests (generated, never committed)."""

from __future__ import annotations

from pathlib import Path

import torch

from segmentation.card import ModelCard
from segmentation.modeldir import LoadedModel, build_module, save_model


def tiny_model(path: Path, *, spatial_dims: int, channels: int, classes: int = 3, roi: list[int] | None = None,
               normalization: dict | None = None, seed: int = 0, **input_extra: object) -> LoadedModel:
    card = ModelCard.model_validate({
        "name": f"tiny-{spatial_dims}d-{channels}ch",
        "architecture": {"name": "unet", "kwargs": {"channels": [4, 8], "strides": [2], "num_res_units": 0}},
        "input": {"spatial_dims": spatial_dims, "channels": channels,
                  "normalization": normalization or {"mode": "image_zscore"}, **input_extra},
        "classes": [{"value": v, "name": f"class{v}", "color": [40 * v, 255 - 40 * v, 128]} for v in range(classes)],
        "inference": {"roi": roi or ([64, 64] if spatial_dims == 2 else [16, 16, 16]), "overlap": 0.25,
                      "batch_size": 4},
    })
    torch.manual_seed(seed)
    return save_model(path, card, build_module(card))
