"""A 2-D network on images kept one slice thick: nnU-Net's X x Y x 1 NIfTI files.

nnU-Net stores 2-D images (microscopy, X-ray, a single CT slice) as NIfTI
files one slice thick, and a 2-D network is trained on their plane
(:class:`storage.datasets.arrays.OneSlice`).  segflow stores every volume as
(C, K, J, I), and its volume path (model space, stitching, the NIfTI and
DICOM SEG exports, statistics in mL) is written for that shape.  Rather than
teach each step a second shape, :func:`plane_model` shows the 2-D model to
them as a 3-D one whose windows are one slice thick: the network is wrapped
to take (N, C, 1, H, W) and give back (N, classes, 1, H, W), and the card's
window and mirrored axes gain the slice axis in front.  The windows, weights
and blending over the plane are exactly the 2-D model's, so the labels equal
a 2-D run over the slice's (J, I) plane, on the input's own voxel grid (a
2-D card's spacing is a ground sample distance in metres: refused here).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

import torch
from torch import nn

from segmentation.card import ModelCard
from segmentation.modeldir import LoadedModel
from storage.errors import IncompatibleInputError

__all__ = ["PlaneNetwork", "plane_axes", "plane_card", "plane_model"]


class PlaneNetwork(nn.Module):
    """A 2-D network fed the one slice of (N, C, 1, H, W) windows; its outputs get the slice axis back."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> Any:
        out = self.net(x[:, :, 0])
        if isinstance(out, (list, tuple)):  # deep-supervision heads
            return type(out)(o.unsqueeze(2) for o in out)
        return out.unsqueeze(2)


def plane_axes(roi: Sequence[int] | None, flips: Sequence[int] | None) -> tuple[list[int] | None, list[int] | None]:
    """A 2-D window and mirrored axes as the one-slice 3-D model takes them (the slice axis first)."""
    return (None if roi is None else [1, *roi]), (None if flips is None else [a + 1 for a in flips])


def plane_card(card: ModelCard, where: str | None = None) -> ModelCard:
    """A 2-D card as the card of a 3-D model with one-slice windows, on the input's own voxel grid.

    A 2-D card's spacing is a ground sample distance in metres and its CRS a
    map's: neither means anything on a scan's slice, so a card that applies
    them (or reflectance units) is refused (``where`` names the input).  A
    one-slice dataset trains on its own pixel grid, as this runs.
    """
    spec = card.input
    if card.in_metres:
        raise IncompatibleInputError(where, f"model {card.name!r} works on rasters in metres (its card's spacing, "
                                            "crs or units), and the input is a one-slice scan")
    roi, flips = plane_axes(card.inference.roi, card.inference.flip_tta)
    return card.model_copy(update={
        "input": spec.model_copy(update={"spatial_dims": 3, "spacing": None, "crs": None}),
        "inference": card.inference.model_copy(update={"roi": roi, "flip_tta": flips}),
    })


def plane_model(model: LoadedModel, where: str | None = None) -> LoadedModel:
    """``model`` (2-D) as a 3-D model whose windows are one slice thick; same weights, same labels."""
    if model.card.input.spatial_dims != 2:
        raise ValueError(f"model {model.name!r} is already {model.card.input.spatial_dims}-D")
    return replace(model, card=plane_card(model.card, where), module=PlaneNetwork(model.module).eval())
