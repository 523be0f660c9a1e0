"""PSPNet: a dilated ResNet at output stride 8 and a pyramid pooling module.

Pooling the feature map into 1, 2, 3 and 6 bins per axis gives every pixel a
summary of the whole scene and of its quadrant, region and neighbourhood, so
local evidence is read in context (Zhao et al., 2017).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segmentation import layers
from segmentation.layers import ConvNormAct, Field, Norm


class PyramidPooling(nn.Module):
    """Adaptive average pooling to each bin count, 1×1 reduction, upsampling, concatenated with the input.

    The 1-bin branch has no norm: it holds one value per channel, which
    BatchNorm cannot normalise when training on one sample.  The other bins
    use the network's norm.
    """

    def __init__(self, spatial_dims: int, cin: int, bins: Sequence[int], branch_channels: int,
                 norm_kind: Norm = "batch") -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(layers.adaptive_avg_pool(spatial_dims, int(b)),
                          ConvNormAct(spatial_dims, cin, branch_channels, 1, norm_kind=None if b == 1 else norm_kind))
            for b in bins)
        self.spatial_dims = spatial_dims
        self.out_channels = cin + len(bins) * branch_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x] + [layers.resize(b(x), x, self.spatial_dims) for b in self.branches], 1)


class PSPNet(nn.Module):
    """PSPNet for 2-D or 3-D inputs; logits at the input's size.

    Encoder: :class:`~segmentation.layers.DilatedResNet` (basic blocks,
    widths 16-32-64-128, two blocks per stage) at ``output_stride`` 8; then
    the pyramid pooling module over ``bins`` (default (1, 2, 3, 6); empty
    turns it off), a 3×3 conv-norm-ReLU head of ``channels``, a 1×1
    classifier, and a (bi/tri)linear upsampling to the input size.  The
    paper's auxiliary loss head is not built: segflow's trainer optimises one
    output.

    Inputs must be divisible by the output stride (``input_multiple``, 8) and
    at least output stride × the largest bin per axis (``min_input_size``,
    48 by default) so that every bin pools at least one feature pixel.
    Theoretical receptive field of the convolutional path, for the defaults
    (the same per axis in 2-D and 3-D): 467 pixels.  The pyramid widens that
    to the whole input (bin 1 is a global average; bin b sees 1/b of each
    axis), so ``global_context`` is true unless ``bins`` is empty.
    """

    name = "pspnet"

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, *,
                 widths: Sequence[int] = (16, 32, 64, 128), depths: Sequence[int] = (2, 2, 2, 2),
                 block: str = "basic", output_stride: int = 8, bins: Sequence[int] = (1, 2, 3, 6),
                 branch_channels: int | None = None, channels: int = 64, norm: Norm = "batch",
                 dropout: float = 0.0) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        bins = tuple(int(b) for b in bins)
        if any(b < 1 for b in bins) or len(set(bins)) != len(bins):
            raise ValueError(f"bins must be distinct positive integers, got {bins}")
        self.encoder = layers.DilatedResNet(spatial_dims, in_channels, widths=widths, depths=depths, block=block,
                                            output_stride=output_stride, norm_kind=norm)
        cin = self.encoder.out_channels
        self.pyramid = PyramidPooling(spatial_dims, cin, bins, branch_channels or max(1, cin // max(1, len(bins))),
                                      norm)
        self.head = nn.Sequential(ConvNormAct(spatial_dims, self.pyramid.out_channels, channels, 3, norm_kind=norm),
                                  layers.dropout(spatial_dims, dropout))
        self.classifier = layers.conv(spatial_dims, channels, out_channels, 1, bias=True)
        self.spatial_dims = spatial_dims
        self.bins = bins
        self.input_multiple = output_stride
        self.min_input_size = output_stride * max(bins, default=1)
        self.global_context = layers.has_global_context(self)
        self.receptive_field = self._field().size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = layers.check_spatial(x, self.name, self.input_multiple, self.min_input_size, self.training)
        _, f = self.encoder(x)
        y = self.head(self.pyramid(f))
        return layers.resize(self.classifier(y), x, self.spatial_dims)

    def _field(self) -> Field:
        """The encoder → head → classifier path; the pooled branches reach further (see the class doc)."""
        _, f = self.encoder.fields(Field())
        return self.head[0].field(f).through(self.classifier).resample_to(Field().jump)
