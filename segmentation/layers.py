"""Dimension-generic building blocks shared by segflow's own networks.

Every factory takes ``spatial_dims`` (2 or 3) so one network definition serves
rasters and volumes.  :class:`Field` is the receptive-field arithmetic the
networks use to report their theoretical field from their actual layers, and
:func:`check_spatial` is the forward-time size check, kept traceable by
torch.fx so BatchNorm folding still works on networks that call it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Norm = Literal["batch", "group", "instance"]
NORMS: tuple[str, ...] = ("batch", "group", "instance")


def _dims(spatial_dims: int) -> int:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return spatial_dims


def conv(spatial_dims: int, cin: int, cout: int, kernel: int = 3, *, stride: int = 1, dilation: int = 1,
         bias: bool = False) -> nn.Module:
    """A 'same'-padded convolution (odd kernels): the output size is ceil(input / stride)."""
    cls = nn.Conv2d if _dims(spatial_dims) == 2 else nn.Conv3d
    return cls(cin, cout, kernel, stride=stride, padding=dilation * (kernel - 1) // 2, dilation=dilation, bias=bias)


def conv_transpose(spatial_dims: int, cin: int, cout: int, factor: int, *, bilinear_init: bool = True) -> nn.Module:
    """Learned ×factor upsampling (kernel 2·factor) whose output is exactly factor × the input size.

    Initialised to (bi/tri)linear interpolation per channel, as FCN does, so
    training starts from a smooth upsampling rather than noise.
    """
    cls = nn.ConvTranspose2d if _dims(spatial_dims) == 2 else nn.ConvTranspose3d
    k = 2 * factor
    layer = cls(cin, cout, k, stride=factor, padding=factor // 2, bias=False)
    if bilinear_init:
        centre = (k - 1) / 2
        tri = 1 - (torch.arange(k, dtype=torch.float32) - centre).abs() / factor
        kernel = tri
        for _ in range(spatial_dims - 1):
            kernel = kernel.unsqueeze(-1) * tri
        with torch.no_grad():
            layer.weight.zero_()
            for c in range(min(cin, cout)):
                layer.weight[c, c] = kernel
    return layer


def norm(kind: Norm | None, spatial_dims: int, channels: int) -> nn.Module:
    """BatchNorm (folds into the conv for inference, local in eval) or a per-sample norm.

    Group and instance norm couple every pixel of a window, so they make the
    field of view global and predictions depend on the window; that is why
    batch is the default everywhere here.
    """
    if kind is None:
        return nn.Identity()
    if kind == "batch":
        return (nn.BatchNorm2d if _dims(spatial_dims) == 2 else nn.BatchNorm3d)(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(8, channels), channels)
    if kind == "instance":
        return (nn.InstanceNorm2d if _dims(spatial_dims) == 2 else nn.InstanceNorm3d)(channels, affine=True)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def max_pool(spatial_dims: int, kernel: int = 2, stride: int = 2, padding: int = 0) -> nn.Module:
    return (nn.MaxPool2d if _dims(spatial_dims) == 2 else nn.MaxPool3d)(kernel, stride, padding)


def adaptive_avg_pool(spatial_dims: int, size: int) -> nn.Module:
    return (nn.AdaptiveAvgPool2d if _dims(spatial_dims) == 2 else nn.AdaptiveAvgPool3d)(size)


def dropout(spatial_dims: int, p: float) -> nn.Module:
    if not 0 <= p < 1:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    return (nn.Dropout2d if _dims(spatial_dims) == 2 else nn.Dropout3d)(p) if p else nn.Identity()


def resize(x: torch.Tensor, like: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """(Bi/tri)linear resize of ``x`` to the spatial size of ``like`` (align_corners=False).

    ``spatial_dims`` is passed rather than read from ``x`` so that torch.fx can
    trace the call (a tensor's rank is a traced value, not a constant).
    """
    mode = "bilinear" if _dims(spatial_dims) == 2 else "trilinear"
    return F.interpolate(x, size=like.shape[2:], mode=mode, align_corners=False)


class ConvNormAct(nn.Sequential):
    """conv → norm → ReLU; without a norm the conv gets a bias."""

    def __init__(self, spatial_dims: int, cin: int, cout: int, kernel: int = 3, *, stride: int = 1,
                 dilation: int = 1, norm_kind: Norm | None = "batch") -> None:
        super().__init__(conv(spatial_dims, cin, cout, kernel, stride=stride, dilation=dilation,
                              bias=norm_kind is None),
                         norm(norm_kind, spatial_dims, cout), nn.ReLU(inplace=True))

    def field(self, f: Field) -> Field:
        return f.through(self[0])


# ---------------------------------------------------------------- size check

def check_spatial(x: torch.Tensor, name: str, multiple: int, minimum: int, training: bool,
                  norm_stride: int | None = None) -> torch.Tensor:
    """Refuse, with a message naming the network, inputs it cannot take; returns ``x`` unchanged.

    Registered with ``torch.fx.wrap`` so symbolic tracing (BatchNorm folding)
    records it as one call instead of failing on shape-dependent branches.
    In training, a batch of one whose deepest normalised feature map (at
    ``norm_stride``, default ``multiple``) is a single pixel is refused too:
    BatchNorm cannot normalise one value per channel.
    """
    spatial = tuple(int(s) for s in x.shape[2:])
    if any(s % multiple for s in spatial):
        raise ValueError(f"{name} needs each spatial size divisible by {multiple}, got {spatial}")
    if any(s < minimum for s in spatial):
        raise ValueError(f"{name} needs each spatial size at least {minimum}, got {spatial}")
    deepest = norm_stride or multiple
    if training and x.shape[0] * math.prod(s // deepest for s in spatial) == 1:
        raise ValueError(f"{name} cannot train on one sample of size {spatial}: its deepest normalised "
                         f"feature map would be a single pixel; use a batch of 2 or sizes of at least "
                         f"{2 * deepest}")
    return x


torch.fx.wrap("check_spatial")


# ---------------------------------------------------------------- receptive fields

@dataclass(frozen=True)
class Field:
    """Receptive-field arithmetic along one axis, in input pixels.

    ``lo``/``hi`` bound the input positions that output position ``o`` can see,
    as offsets from ``o * jump``; ``jump`` is the distance in input pixels
    between adjacent outputs.  Every layer widens the span by
    (taps - 1)·dilation·jump, the classic sum over layers, and tracking the two
    ends (not only the size) keeps merged branches whose centres differ exact.
    Layers whose output phase varies (transposed convs, interpolation) use the
    bound over all phases, so the size is an upper bound on what any single
    output sees.
    """

    lo: Fraction = Fraction(0)
    hi: Fraction = Fraction(0)
    jump: Fraction = Fraction(1)

    @property
    def size(self) -> int:
        return math.ceil(self.hi - self.lo) + 1

    def conv(self, kernel: int, stride: int = 1, dilation: int = 1, padding: int | None = None) -> Field:
        pad = dilation * (kernel - 1) // 2 if padding is None else padding
        return Field(self.lo - pad * self.jump, self.hi + ((kernel - 1) * dilation - pad) * self.jump,
                     self.jump * stride)

    def transposed(self, kernel: int, stride: int, padding: int) -> Field:
        out = self.jump / stride
        return Field(self.lo + (padding - kernel + 1) * out, self.hi + padding * out, out)

    def interpolate(self, factor: Fraction | int) -> Field:
        """Linear interpolation (align_corners=False) by ``factor``: two taps per output, phase-dependent."""
        f = Fraction(factor)
        return Field(self.lo + (Fraction(1, 2) / f - Fraction(3, 2)) * self.jump,
                     self.hi + (Fraction(1, 2) / f + Fraction(1, 2)) * self.jump, self.jump / f)

    def resample_to(self, jump: Fraction) -> Field:
        """Interpolate to the resolution whose jump is ``jump``."""
        return self.interpolate(self.jump / jump)

    def nearest(self, factor: Fraction | int) -> Field:
        """Nearest-neighbour (or pixel-shuffle) upsampling by ``factor``: one tap, phase-dependent."""
        f = Fraction(factor)
        return Field(self.lo - (1 - 1 / f) * self.jump, self.hi, self.jump / f)

    def through(self, layer: nn.Module, axis: int = 0) -> Field:
        """The field after a convolution, transposed convolution or pooling layer, read from its settings."""
        k, s = _at(layer.kernel_size, axis), _at(layer.stride, axis)
        p = _at(layer.padding, axis)
        if isinstance(layer, nn.modules.conv._ConvTransposeNd):
            return self.transposed(k, s, p)
        return self.conv(k, s, _at(getattr(layer, "dilation", 1), axis), p)

    @staticmethod
    def merge(*fields: Field) -> Field:
        """Branches combined (added or concatenated) at one resolution: the union of their spans."""
        jumps = {f.jump for f in fields}
        if len(jumps) != 1:
            raise ValueError(f"cannot merge fields at different resolutions {sorted(jumps)}")
        return Field(min(f.lo for f in fields), max(f.hi for f in fields), fields[0].jump)


def _at(value: int | Sequence[int] | str, axis: int) -> int:
    if isinstance(value, str):
        raise TypeError(f"padding {value!r} has no fixed size")
    return int(value if isinstance(value, int) else value[axis])


def has_global_context(module: nn.Module) -> bool:
    """Whether any output depends on the whole input: global/adaptive pooling or per-sample norms."""
    return any(isinstance(m, (nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
                              nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm))
               for m in module.modules())


# ---------------------------------------------------------------- residual encoder

class BasicBlock(nn.Module):
    """Two 3×3 convs and an identity (or 1×1 projection) shortcut: ResNet-18/34's block."""

    expansion = 1

    def __init__(self, spatial_dims: int, cin: int, width: int, *, stride: int = 1, dilation: int = 1,
                 first_dilation: int = 1, norm_kind: Norm = "batch") -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = conv(spatial_dims, cin, width, 3, stride=stride, dilation=first_dilation)
        self.norm1 = norm(norm_kind, spatial_dims, width)
        self.conv2 = conv(spatial_dims, width, cout, 3, dilation=dilation)
        self.norm2 = norm(norm_kind, spatial_dims, cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(spatial_dims, cin, cout, stride, norm_kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.norm1(self.conv1(x)))
        return self.relu(self.norm2(self.conv2(y)) + self.shortcut(x))

    def field(self, f: Field) -> Field:
        main = f.through(self.conv1).through(self.conv2)
        return Field.merge(main, _shortcut_field(self.shortcut, f))


class Bottleneck(nn.Module):
    """1×1 reduce, dilated 3×3, 1×1 expand (×4): ResNet-50's block, cheaper per output channel.

    Its single 3×3 conv takes ``first_dilation`` (the stage's dilation except in
    a dilated stage's first block); ``dilation`` is accepted for a common
    signature with :class:`BasicBlock`.
    """

    expansion = 4

    def __init__(self, spatial_dims: int, cin: int, width: int, *, stride: int = 1, dilation: int = 1,
                 first_dilation: int = 1, norm_kind: Norm = "batch") -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = conv(spatial_dims, cin, width, 1)
        self.norm1 = norm(norm_kind, spatial_dims, width)
        self.conv2 = conv(spatial_dims, width, width, 3, stride=stride, dilation=first_dilation)
        self.norm2 = norm(norm_kind, spatial_dims, width)
        self.conv3 = conv(spatial_dims, width, cout, 1)
        self.norm3 = norm(norm_kind, spatial_dims, cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(spatial_dims, cin, cout, stride, norm_kind)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.norm1(self.conv1(x)))
        y = self.relu(self.norm2(self.conv2(y)))
        return self.relu(self.norm3(self.conv3(y)) + self.shortcut(x))

    def field(self, f: Field) -> Field:
        main = f.through(self.conv1).through(self.conv2).through(self.conv3)
        return Field.merge(main, _shortcut_field(self.shortcut, f))


BLOCKS: dict[str, type[BasicBlock | Bottleneck]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


def _shortcut(spatial_dims: int, cin: int, cout: int, stride: int, norm_kind: Norm) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(conv(spatial_dims, cin, cout, 1, stride=stride), norm(norm_kind, spatial_dims, cout))


def _shortcut_field(shortcut: nn.Module, f: Field) -> Field:
    return f if isinstance(shortcut, nn.Identity) else f.through(shortcut[0])


class DilatedResNet(nn.Module):
    """A ResNet whose last stages trade stride for dilation, for dense prediction.

    Deep stem (two 3×3 convs, the first strided, then a 3×3 max-pool: stride
    4), then four stages of residual blocks with strides 1, 2, 2, 2.  For
    ``output_stride`` 16 the last stage keeps stride 1 and dilates by 2; for
    8 the last two dilate by 2 and 4.  As in the DeepLab/PSPNet encoders, the
    first block of a dilated stage keeps the previous dilation so its kernel
    taps do not skip pixels.  ``forward`` returns (stride-4 features, deepest
    features).
    """

    def __init__(self, spatial_dims: int, in_channels: int, *, widths: Sequence[int] = (16, 32, 64, 128),
                 depths: Sequence[int] = (2, 2, 2, 2), block: str = "basic", output_stride: int = 16,
                 stem_width: int | None = None, norm_kind: Norm = "batch") -> None:
        super().__init__()
        if len(widths) != 4 or len(depths) != 4:
            raise ValueError(f"widths and depths need 4 stages, got {tuple(widths)} and {tuple(depths)}")
        if any(int(w) < 1 for w in widths) or any(int(d) < 1 for d in depths):
            raise ValueError("widths and depths must be positive")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {sorted(BLOCKS)}, got {block!r}")
        cls = BLOCKS[block]
        stem = int(stem_width or widths[0])
        self.stem = nn.Sequential(ConvNormAct(spatial_dims, in_channels, stem, 3, stride=2, norm_kind=norm_kind),
                                  ConvNormAct(spatial_dims, stem, stem, 3, norm_kind=norm_kind),
                                  max_pool(spatial_dims, 3, 2, 1))
        dilated = {8: 2, 16: 1, 32: 0}[output_stride]  # how many of the last stages dilate
        stages, cin, dilation = [], stem, 1
        for i, (width, depth) in enumerate(zip(widths, depths)):
            stride = 1 if i == 0 else 2
            previous = dilation
            if i >= 4 - dilated:
                dilation, stride = dilation * stride, 1
            blocks = []
            for j in range(int(depth)):
                blocks.append(cls(spatial_dims, cin, int(width), stride=stride if j == 0 else 1,
                                  dilation=dilation, first_dilation=previous if j == 0 else dilation,
                                  norm_kind=norm_kind))
                cin = int(width) * cls.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.low_channels = int(widths[0]) * cls.expansion
        self.out_channels = cin
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        low = x = self.stages[0](x)
        for stage in self.stages[1:]:
            x = stage(x)
        return low, x

    def fields(self, f: Field) -> tuple[Field, Field]:
        """Fields of the two outputs of ``forward``."""
        for layer in self.stem:
            f = layer.field(f) if isinstance(layer, ConvNormAct) else f.through(layer)
        low = f = _stage_field(self.stages[0], f)
        for stage in self.stages[1:]:
            f = _stage_field(stage, f)
        return low, f


def _stage_field(stage: nn.Sequential, f: Field) -> Field:
    for block in stage:
        f = block.field(f)
    return f
