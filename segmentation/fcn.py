"""FCN-8s: a VGG-style encoder whose stride-32, -16 and -8 class scores are fused coarse to fine.

The deepest scores know *what* is there, the shallower ones *where*; adding
them after upsampling gives sharper boundaries than the stride-32 prediction
alone (Long, Shelhamer & Darrell, 2015).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from segmentation import layers
from segmentation.layers import ConvNormAct, Field, Norm


class FCN(nn.Module):
    """FCN-8s for 2-D or 3-D inputs; logits at the input's size.

    Five stages of 3×3 conv-norm-ReLU blocks (VGG-16's 2-2-3-3-3 pattern,
    widths 16-32-64-128-128 by default), each ending in a 2× max-pool, then
    the "fully connected" layers as convolutions (3×3 then 1×1, no norm: at
    stride 32 a map can be a single pixel).  Class scores are taken at stride
    32, 16 and 8; the stride-16 and -8 heads start at zero, as in the paper,
    so training begins from the coarse prediction.  ``upsample="learned"``
    fuses with transposed convs initialised to bilinear interpolation (the
    paper's choice), ``"bilinear"`` with fixed interpolation.

    Inputs must be divisible by 32 (``input_multiple``).  Theoretical
    receptive field for the defaults (the same per axis in 2-D and 3-D):
    363 pixels; no branch is global.
    """

    name = "fcn"

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, *,
                 widths: Sequence[int] = (16, 32, 64, 128, 128), depths: Sequence[int] = (2, 2, 3, 3, 3),
                 fc_channels: int = 256, upsample: Literal["learned", "bilinear"] = "learned",
                 norm: Norm = "batch", dropout: float = 0.0) -> None:
        super().__init__()
        if len(widths) != 5 or len(depths) != 5:
            raise ValueError(f"widths and depths need 5 stages, got {tuple(widths)} and {tuple(depths)}")
        if any(int(w) < 1 for w in widths) or any(int(d) < 1 for d in depths):
            raise ValueError("widths and depths must be positive")
        if upsample not in ("learned", "bilinear"):
            raise ValueError(f"upsample must be 'learned' or 'bilinear', got {upsample!r}")
        stages, cin = [], in_channels
        for width, depth in zip(widths, depths):
            convs = [ConvNormAct(spatial_dims, cin if i == 0 else int(width), int(width), 3, norm_kind=norm)
                     for i in range(int(depth))]
            stages.append(nn.Sequential(*convs, layers.max_pool(spatial_dims, 2, 2)))
            cin = int(width)
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Sequential(ConvNormAct(spatial_dims, cin, fc_channels, 3, norm_kind=None),
                                layers.dropout(spatial_dims, dropout),
                                ConvNormAct(spatial_dims, fc_channels, fc_channels, 1, norm_kind=None),
                                layers.dropout(spatial_dims, dropout))
        self.score32 = layers.conv(spatial_dims, fc_channels, out_channels, 1, bias=True)
        self.score16 = layers.conv(spatial_dims, int(widths[3]), out_channels, 1, bias=True)
        self.score8 = layers.conv(spatial_dims, int(widths[2]), out_channels, 1, bias=True)
        for head in (self.score16, self.score8):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        self.up = nn.ModuleList([layers.conv_transpose(spatial_dims, out_channels, out_channels, f)
                                 for f in (2, 2, 8)]) if upsample == "learned" else None
        self.spatial_dims = spatial_dims
        self.input_multiple = 32
        self.min_input_size = 32
        self.global_context = layers.has_global_context(self)
        self.receptive_field = self._field().size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = layers.check_spatial(x, self.name, self.input_multiple, self.min_input_size, self.training,
                                 norm_stride=16)  # the fc layers at stride 32 have no norm
        f = x
        skips = []
        for stage in self.stages:
            f = stage(f)
            skips.append(f)
        pool3, pool4 = skips[2], skips[3]
        s = self.score32(self.fc(f))
        s = self._up(0, s, pool4) + self.score16(pool4)
        s = self._up(1, s, pool3) + self.score8(pool3)
        return self._up(2, s, x)

    def _up(self, i: int, s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        if self.up is None:
            return layers.resize(s, like, self.spatial_dims)
        return self.up[i](s)

    def _up_field(self, i: int, f: Field, like: Field) -> Field:
        return f.resample_to(like.jump) if self.up is None else f.through(self.up[i])

    def _field(self) -> Field:
        f, skips = Field(), []
        for stage in self.stages:
            for layer in stage:
                f = layer.field(f) if isinstance(layer, ConvNormAct) else f.through(layer)
            skips.append(f)
        pool3, pool4 = skips[2], skips[3]
        for layer in self.fc:
            if isinstance(layer, ConvNormAct):
                f = layer.field(f)
        s = f.through(self.score32)
        s = Field.merge(self._up_field(0, s, pool4), pool4.through(self.score16))
        s = Field.merge(self._up_field(1, s, pool3), pool3.through(self.score8))
        return self._up_field(2, s, Field())
