"""DeepLabV3+: a dilated ResNet, atrous spatial pyramid pooling, and a light decoder.

Atrous convolutions grow the field of view without losing resolution, ASPP
looks at several scales at once, and the decoder's stride-4 skip restores the
boundaries that a stride-16 prediction blurs (Chen et al., 2018).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from segmentation import layers
from segmentation.layers import ConvNormAct, Field, Norm


class ASPP(nn.Module):
    """Parallel 1×1 and atrous 3×3 convs plus an image-pooling branch, concatenated and projected.

    The image-pooling branch averages the whole map to one value per channel,
    so it has no norm: BatchNorm cannot normalise a single value per channel
    when training on one sample.  Its context is global.
    """

    def __init__(self, spatial_dims: int, cin: int, cout: int, rates: Sequence[int], *,
                 image_pooling: bool = True, norm_kind: Norm = "batch", dropout: float = 0.0) -> None:
        super().__init__()
        if any(int(r) < 1 for r in rates):
            raise ValueError(f"atrous rates must be positive integers, got {tuple(rates)}")
        self.branches = nn.ModuleList(
            [ConvNormAct(spatial_dims, cin, cout, 1, norm_kind=norm_kind)]
            + [ConvNormAct(spatial_dims, cin, cout, 3, dilation=int(r), norm_kind=norm_kind) for r in rates])
        self.pool = nn.Sequential(layers.adaptive_avg_pool(spatial_dims, 1),
                                  ConvNormAct(spatial_dims, cin, cout, 1, norm_kind=None)) if image_pooling else None
        count = len(self.branches) + (1 if image_pooling else 0)
        self.spatial_dims = spatial_dims
        self.project = nn.Sequential(ConvNormAct(spatial_dims, count * cout, cout, 1, norm_kind=norm_kind),
                                     layers.dropout(spatial_dims, dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [branch(x) for branch in self.branches]
        if self.pool is not None:
            outs.append(layers.resize(self.pool(x), x, self.spatial_dims))
        return self.project(torch.cat(outs, 1))

    def field(self, f: Field) -> Field:
        """The convolutional branches' field; the image-pooling branch (if any) sees everything."""
        return self.project[0].field(Field.merge(*(b.field(f) for b in self.branches)))


class DeepLabV3Plus(nn.Module):
    """DeepLabV3+ for 2-D or 3-D inputs; logits at the input's size.

    Encoder: :class:`~segmentation.layers.DilatedResNet` (basic blocks,
    widths 16-32-64-128, two blocks per stage by default) at ``output_stride``
    16 or 8.  ASPP rates default to (6, 12, 18) at stride 16 and twice that at
    8, so they cover the same input extent.  Decoder: the ASPP output
    upsampled to stride 4, concatenated with the stride-4 features reduced to
    ``low_channels``, two 3×3 convs, a 1×1 classifier, and a (bi/tri)linear
    upsampling to the input size.

    Inputs must be divisible by ``output_stride`` (``input_multiple``).
    Theoretical receptive field of the convolutional paths, for the defaults
    (the same per axis in 2-D and 3-D): 1067 pixels at output stride 16 (the
    rate-18 ASPP branch dominates; 1051 at output stride 8).  The image-pooling branch makes the
    context global: every output depends on every input pixel
    (``global_context``); ``image_pooling=False`` removes it.
    """

    name = "deeplabv3plus"

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, *,
                 widths: Sequence[int] = (16, 32, 64, 128), depths: Sequence[int] = (2, 2, 2, 2),
                 block: str = "basic", output_stride: int = 16, rates: Sequence[int] | None = None,
                 aspp_channels: int = 64, low_channels: int = 24, decoder_channels: int = 64,
                 image_pooling: bool = True, norm: Norm = "batch", dropout: float = 0.0) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"output_stride must be 8 or 16, got {output_stride}")
        if rates is None:
            rates = tuple(r * 16 // output_stride for r in (6, 12, 18))
        self.encoder = layers.DilatedResNet(spatial_dims, in_channels, widths=widths, depths=depths, block=block,
                                            output_stride=output_stride, norm_kind=norm)
        self.aspp = ASPP(spatial_dims, self.encoder.out_channels, aspp_channels, rates,
                         image_pooling=image_pooling, norm_kind=norm, dropout=dropout)
        self.low_proj = ConvNormAct(spatial_dims, self.encoder.low_channels, low_channels, 1, norm_kind=norm)
        self.decoder = nn.Sequential(
            ConvNormAct(spatial_dims, aspp_channels + low_channels, decoder_channels, 3, norm_kind=norm),
            ConvNormAct(spatial_dims, decoder_channels, decoder_channels, 3, norm_kind=norm),
            layers.dropout(spatial_dims, dropout))
        self.classifier = layers.conv(spatial_dims, decoder_channels, out_channels, 1, bias=True)
        self.spatial_dims = spatial_dims
        self.rates = tuple(int(r) for r in rates)
        self.input_multiple = output_stride
        self.min_input_size = output_stride
        self.global_context = layers.has_global_context(self)
        self.receptive_field = self._field().size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = layers.check_spatial(x, self.name, self.input_multiple, self.min_input_size, self.training)
        low, high = self.encoder(x)
        y = layers.resize(self.aspp(high), low, self.spatial_dims)
        y = self.decoder(torch.cat([y, self.low_proj(low)], 1))
        return layers.resize(self.classifier(y), x, self.spatial_dims)

    def _field(self) -> Field:
        low, high = self.encoder.fields(Field())
        y = Field.merge(self.aspp.field(high).resample_to(low.jump), self.low_proj.field(low))
        for layer in self.decoder:
            if isinstance(layer, ConvNormAct):
                y = layer.field(y)
        return y.through(self.classifier).resample_to(Field().jump)
