"""The architecture registry: networks are built by name, never by importing a path.

Building only registered classes is what makes a model card safe to read:
a card names an architecture and its arguments; it cannot make segflow
import or call anything else.

Besides building, the registry answers two questions about a built network
so a region of interest can be checked before any window is run:
:func:`input_multiple` (what each window size must be divisible by) and
:func:`receptive_field` (how far each output can see, where known).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from segmentation.layers import Field, has_global_context
from storage.errors import ModelError

# Where a registry default is not MONAI's own: weights of a network built with MONAI's defaults fit only when the
# card's kwargs say so, and a failed fit names these (an author copying a MONAI call had no clue why)
NOT_MONAI_DEFAULTS = {
    "unet": "norm 'batch' and num_res_units 1 (MONAI's UNet: instance norm, 0)",
    "basic_unet": "features (16, 16, 32, 64, 128, 16) (MONAI's BasicUNet: (32, 32, 64, 128, 256, 32))",
    "segresnet": "init_filters 16 (MONAI's SegResNet: 8)",
    "dynunet": "res_block true (MONAI's DynUNet: false)",
}

Builder = Callable[..., nn.Module]
_REGISTRY: dict[str, Builder] = {}


def register(name: str) -> Callable[[Builder], Builder]:
    def deco(fn: Builder) -> Builder:
        _REGISTRY[name] = fn
        return fn
    return deco


def names() -> list[str]:
    return sorted(_REGISTRY)


def create(name: str, *, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
    """Build a registered network; unknown names and bad arguments are ModelErrors."""
    if name not in _REGISTRY:
        raise ModelError(None, f"unknown architecture {name!r} (known: {', '.join(names())})")
    try:
        return _REGISTRY[name](spatial_dims=spatial_dims, in_channels=in_channels,
                               out_channels=out_channels, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError, MemoryError, OverflowError) as exc:
        # torch's own errors carry its C++ frames, and a card may ask for a layer of 2**40 channels: first line only
        said = " ".join(str(exc).strip().splitlines()[:1])[:200] or type(exc).__name__
        if isinstance(exc, (RuntimeError, MemoryError, OverflowError)):
            said = f"{type(exc).__name__}: {said} (are its sizes plausible?)"
        raise ModelError(None, f"cannot build {name!r} with {str(kwargs)[:300]}: {said}") from None


# ---------------------------------------------------------------- MONAI networks

@register("unet")
def _monai_unet(*, spatial_dims: int, in_channels: int, out_channels: int,
                channels: tuple[int, ...] = (16, 32, 64, 128), strides: tuple[int, ...] = (2, 2, 2),
                num_res_units: int = 1, norm: str = "batch", **kwargs: Any) -> nn.Module:
    """MONAI's residual U-Net; input sizes must be divisible by prod(strides).

    BatchNorm by default (foldable, local).  Theoretical receptive field of
    the defaults (the same per axis in 2-D and 3-D): 59 pixels.
    """
    from monai.networks.nets import UNet

    return UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                channels=tuple(channels), strides=tuple(strides), num_res_units=num_res_units,
                norm=norm, **kwargs)


@register("basic_unet")
def _monai_basic_unet(*, spatial_dims: int, in_channels: int, out_channels: int,
                      features: tuple[int, ...] = (16, 16, 32, 64, 128, 16), **kwargs: Any) -> nn.Module:
    """MONAI's BasicUNet (four 2× max-pools: sizes divisible by 16).

    Instance norm by default, so its context is the whole window; the
    theoretical receptive field of its convolutional paths for the defaults
    (the same per axis in 2-D and 3-D) is 215 pixels.
    """
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                     features=tuple(features), **kwargs)


@register("segresnet")
def _monai_segresnet(*, spatial_dims: int, in_channels: int, out_channels: int, init_filters: int = 16,
                     blocks_down: tuple[int, ...] = (1, 2, 2, 4), blocks_up: tuple[int, ...] = (1, 1, 1),
                     **kwargs: Any) -> nn.Module:
    """MONAI's SegResNet (Myronenko 2018, without the VAE); sizes divisible by 2**(len(blocks_down) - 1).

    GroupNorm by default (MONAI's choice), so its context is the whole window;
    the theoretical receptive field of its convolutional paths for the
    defaults (the same per axis in 2-D and 3-D) is 253 pixels.
    """
    from monai.networks.nets import SegResNet

    if len(blocks_up) != len(blocks_down) - 1:
        raise ValueError(f"blocks_up needs {len(blocks_down) - 1} entries for {len(blocks_down)} blocks_down")
    return SegResNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                     init_filters=init_filters, blocks_down=tuple(blocks_down), blocks_up=tuple(blocks_up),
                     **kwargs)


@register("dynunet")
def _monai_dynunet(*, spatial_dims: int, in_channels: int, out_channels: int,
                   filters: Sequence[int] = (16, 32, 64, 128, 256),
                   kernel_size: Sequence[int | Sequence[int]] | None = None,
                   strides: Sequence[int | Sequence[int]] | None = None,
                   upsample_kernel_size: Sequence[int | Sequence[int]] | None = None,
                   deep_supervision: bool = False, res_block: bool = True, **kwargs: Any) -> nn.Module:
    """MONAI's DynUNet, the nnU-Net architecture; one level per entry of ``filters``.

    Defaults as nnU-Net plans them for isotropic data: 3×3(×3) kernels,
    stride 1 at the first level and 2 below, transposed-conv kernels equal to
    the strides, instance norm, residual blocks.  Any of these can be given
    explicitly (per level, per axis for anisotropic data).  With
    ``deep_supervision`` MONAI returns the main and intermediate heads
    stacked on dim 1 in training mode only; in eval mode it returns the main
    head alone, which is what inference uses (``segflow train`` weights the
    heads' losses, :func:`segmentation.losses.supervised_loss`).  Instance norm makes the
    context the whole window; the theoretical receptive field of the
    convolutional paths for the defaults (the same per axis in 2-D and 3-D)
    is 170 pixels.
    """
    from monai.networks.nets import DynUNet

    levels = len(strides) if strides is not None else len(filters)
    if levels < 3:
        raise ValueError(f"dynunet needs at least 3 levels, got {levels}")
    strides = list(strides) if strides is not None else [1] + [2] * (levels - 1)
    kernel_size = list(kernel_size) if kernel_size is not None else [3] * levels
    upsample_kernel_size = (list(upsample_kernel_size) if upsample_kernel_size is not None else strides[1:])
    return DynUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                   kernel_size=kernel_size, strides=strides, upsample_kernel_size=upsample_kernel_size,
                   filters=list(filters), deep_supervision=deep_supervision, res_block=res_block, **kwargs)


# ---------------------------------------------------------------- segflow's networks

@register("deeplabv3plus")
def _deeplabv3plus(*, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
    from segmentation.deeplab import DeepLabV3Plus

    return DeepLabV3Plus(spatial_dims, in_channels, out_channels, **kwargs)


@register("fcn")
def _fcn(*, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
    from segmentation.fcn import FCN

    return FCN(spatial_dims, in_channels, out_channels, **kwargs)


@register("pspnet")
def _pspnet(*, spatial_dims: int, in_channels: int, out_channels: int, **kwargs: Any) -> nn.Module:
    from segmentation.pspnet import PSPNet

    return PSPNet(spatial_dims, in_channels, out_channels, **kwargs)


# ---------------------------------------------------------------- input sizes

def _axis_product(strides: Sequence[int | Sequence[int]], spatial_dims: int) -> tuple[int, ...]:
    per_axis = [[int(s)] * spatial_dims if isinstance(s, int) else [int(v) for v in s] for s in strides]
    return tuple(math.prod(level[a] for level in per_axis) for a in range(spatial_dims))


def input_multiples(module: nn.Module, spatial_dims: int) -> tuple[int, ...]:
    """What each spatial size must be divisible by, per axis (1 where the network is unknown)."""
    from monai.networks.nets import BasicUNet, DynUNet, SegResNet, UNet

    own = getattr(module, "input_multiple", None)
    if isinstance(own, int):
        return (own,) * spatial_dims
    if isinstance(module, UNet):
        return _axis_product(list(module.strides)[:len(module.channels) - 1], spatial_dims)
    if isinstance(module, DynUNet):
        return _axis_product(module.strides, spatial_dims)
    if isinstance(module, SegResNet):
        return (2 ** (len(module.blocks_down) - 1),) * spatial_dims
    if isinstance(module, BasicUNet):
        return (16,) * spatial_dims  # four 2x max-pools
    return (1,) * spatial_dims


def input_multiple(module: nn.Module) -> int:
    """One number every spatial size must be divisible by (the lcm over axes; 1 when unknown).

    Ask the registry-built module, not a BatchNorm-folded copy: folding
    rebuilds the network as a torch.fx GraphModule without these attributes.
    """
    dims = 3 if any(isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)) for m in module.modules()) else 2
    return math.lcm(*input_multiples(module, dims))


def check_roi(module: nn.Module, roi: Sequence[int], name: str = "the network") -> None:
    """Refuse a window size the network cannot take, before any window is run."""
    roi = tuple(int(r) for r in roi)
    multiples = input_multiples(module, len(roi))
    if any(r % m for r, m in zip(roi, multiples)):
        need = multiples[0] if len(set(multiples)) == 1 else multiples
        raise ModelError(None, f"{name} needs each spatial size divisible by {need}, got roi {roi}")
    minimum = int(getattr(module, "min_input_size", 1))
    if any(r < minimum for r in roi):
        raise ModelError(None, f"{name} needs each spatial size at least {minimum}, got roi {roi}")
    # an instance norm at the coarsest level of a one-pixel window fails in every window ("Expected more than 1
    # spatial element"), after the run has started: BasicUNet's default at roi 16
    if any(isinstance(m, nn.modules.instancenorm._InstanceNorm) for m in module.modules()):
        if any(m > 1 and r // m < 2 for r, m in zip(roi, multiples)):
            need = tuple(2 * m for m in multiples)
            shown = need[0] if len(set(need)) == 1 else need
            raise ModelError(None, f"{name} needs each spatial size at least {shown} (its instance norm needs more "
                                   f"than one pixel at the coarsest level), got roi {roi}")


PROBABILITY_TOL = 1e-4  # how close to 1 a window's class sums must be for its outputs to be taken as probabilities
SMALLEST_PROBABILITY = 1e-30  # log(0) guarded: exp(log 1e-30) is 0 in every blend


def window_probe(module: nn.Module, channels: int, roi: Sequence[int]) -> tuple[tuple[int, ...] | str, bool]:
    """Run ``module`` once on a zero (1, ``channels``, *``roi``) window where its parameters are, in eval mode (its
    train flag put back): the shape of the logits inference would take (the first item of a tuple or list), or the
    type it returned instead; and whether those outputs are probabilities already (non-negative, summing to 1
    over classes at every pixel: a network ending in a softmax).  What the module raises propagates; callers say
    it in their own words."""
    import torch

    was_training = module.training
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    try:
        with torch.inference_mode():
            out = module.eval()(torch.zeros((1, channels, *roi), device=device))
    finally:
        module.train(was_training)
    first = out[0] if isinstance(out, (tuple, list)) and out else out
    if not isinstance(first, torch.Tensor):
        return type(out).__name__, False
    probabilities = False
    if first.ndim >= 2 and first.shape[1] >= 2 and first.is_floating_point():
        values = first.float()
        probabilities = bool(values.min() >= 0) and bool((values.sum(1) - 1).abs().max() <= PROBABILITY_TOL)
    return tuple(first.shape), probabilities


def window_output(module: nn.Module, channels: int, roi: Sequence[int]) -> tuple[int, ...] | str:
    """:func:`window_probe`'s shape (or type name) alone."""
    return window_probe(module, channels, roi)[0]


class ProbabilitiesAsLogits(nn.Module):
    """A network that ends in a softmax, as logits: log p, whose softmax is p again.

    segflow takes the softmax of every window's outputs before blending them;
    a network whose outputs are probabilities already got a second one (its
    probabilities squashed toward uniform: 0.98 became 0.57, and blending then
    flipped labels).  Wrapped, the windows blend the network's own
    probabilities, as MONAI's inferer blends whatever the network returns.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Any) -> Any:  # noqa: D102
        import torch

        out = self.net(x)
        first = out[0] if isinstance(out, (tuple, list)) else out
        return torch.log(first.float().clamp_min(SMALLEST_PROBABILITY))


PROBABILITIES_NOTE = ("its outputs are probabilities already (non-negative, summing to 1 over classes: it ends in a "
                      "softmax); segflow blends them as they are instead of taking a second softmax")


def check_output(module: nn.Module, card: Any, path: Any, what: str = "the TorchScript network") -> bool:
    """A network segflow did not build (a TorchScript archive, a bundle's network MONAI instantiated) is a black
    box: run it once on a window of the card's roi and check it returns the logits of the card's classes on the
    window's grid (first of a tuple or list, as inference takes them).  One returning a dict, fewer or more
    classes, or an auxiliary head first failed inside the windows of every input, with a torch traceback.
    Returns whether its outputs are probabilities already (:class:`ProbabilitiesAsLogits` then wraps it)."""
    roi = tuple(card.inference.roi)
    window = (1, card.input.channels, *roi)
    try:
        got, probabilities = window_probe(module, card.input.channels, roi)
    except Exception as exc:  # noqa: BLE001 - whatever the network's code raises, said in one line
        raise ModelError(path, f"{what} fails on a ({', '.join(map(str, window))}) window: "
                               f"{' '.join(str(exc).split())[:200]}") from None
    want = (1, card.num_classes, *roi)
    if got != want:
        raise ModelError(path, f"{what} returns {got} for a {window} window; segflow needs the logits of the "
                               f"card's {card.num_classes} classes on the window's grid, {want} (the first of a "
                               "tuple or list)")
    return probabilities


# ---------------------------------------------------------------- receptive fields

def global_context(module: nn.Module) -> bool:
    """Whether outputs depend on the whole window (global pooling, group/instance/layer norm)."""
    return has_global_context(module)


def receptive_field(module: nn.Module) -> int | None:
    """Theoretical receptive field in input pixels along the widest axis, None when unknown.

    Computed from the network's layers (the sum over layers of
    (kernel - 1) · dilation · jump, tracking both ends of the span).  It
    counts convolutions, pooling windows and interpolation; where
    :func:`global_context` is true some outputs also depend on the whole
    window, through pooling or per-sample norms, and this number is the
    extent of the convolutional paths only.
    """
    from monai.networks.nets import BasicUNet, DynUNet, SegResNet, UNet

    own = getattr(module, "receptive_field", None)
    if isinstance(own, int):
        return own
    fields = {UNet: _unet_field, DynUNet: _dynunet_field, SegResNet: _segresnet_field,
              BasicUNet: _basic_unet_field}
    for cls, fn in fields.items():
        if isinstance(module, cls):
            dims = 3 if any(isinstance(m, nn.Conv3d) for m in module.modules()) else 2
            try:
                return max(fn(module, Field(), axis).size for axis in range(dims))
            except (_Unknown, AttributeError, TypeError, ValueError):
                return None  # a MONAI variant whose layers this walker does not model
    return None


def _chain(module: nn.Module, f: Field, axis: int, skip: Sequence[str] = ("residual", "conv3")) -> Field:
    """``f`` through the convolutions, pools and upsamplings of ``module``'s main path, in order.

    MONAI registers layers in the order it runs them; ``skip`` names the
    residual shortcuts (``residual`` in ResidualUnit, ``conv3`` in the
    DynUNet blocks), whose span is inside the main path's.
    """
    from torch.nn.modules.pooling import _AvgPoolNd, _MaxPoolNd

    for name, layer in module.named_modules():
        if any(part in skip for part in name.split(".")):
            continue
        if isinstance(layer, (nn.modules.conv._ConvNd, _MaxPoolNd, _AvgPoolNd)):
            f = f.through(layer, axis)
        elif isinstance(layer, nn.Upsample):
            scale = layer.scale_factor
            scale = int(scale if isinstance(scale, (int, float)) else scale[axis])
            f = f.nearest(scale) if layer.mode == "nearest" else f.interpolate(scale)
        elif isinstance(layer, nn.PixelShuffle) or type(layer).__name__ == "SubpixelUpsample":
            raise _Unknown
    return f


class _Unknown(Exception):
    """A layer whose field the walker does not model."""


def _unet_field(net: nn.Module, f: Field, axis: int) -> Field:
    """MONAI UNet: nested Sequential(down, SkipConnection(inner), up) levels."""
    from monai.networks.layers.simplelayers import SkipConnection

    def level(block: nn.Module, f: Field) -> Field:
        if not (isinstance(block, nn.Sequential) and len(block) == 3 and isinstance(block[1], SkipConnection)):
            return _chain(block, f, axis)  # the bottom layer
        down, skip, up = block
        d = _chain(down, f, axis)
        return _chain(up, Field.merge(d, level(skip.submodule, d)), axis)

    return level(net.model, f)


def _dynunet_field(net: nn.Module, f: Field, axis: int) -> Field:
    """MONAI DynUNet: input block, downsamples, bottleneck, then up blocks fed by the encoder levels."""
    encoder = []
    for block in [net.input_block, *net.downsamples]:
        f = _chain(block, f, axis)
        encoder.append(f)
    f = _chain(net.bottleneck, f, axis)
    for up, skip in zip(net.upsamples, reversed(encoder)):
        f = _chain(up.conv_block, Field.merge(_chain(up.transp_conv, f, axis), skip), axis)
    return _chain(net.output_block, f, axis)


def _segresnet_field(net: nn.Module, f: Field, axis: int) -> Field:
    """MONAI SegResNet: init conv, residual down levels, 1×1 + linear upsampling added to the skips."""
    f = _chain(net.convInit, f, axis)
    encoder = []
    for block in net.down_layers:
        f = _chain(block, f, axis)
        encoder.append(f)
    for up, layer, skip in zip(net.up_samples, net.up_layers, reversed(encoder[:-1])):
        f = _chain(layer, Field.merge(_chain(up, f, axis), skip), axis)
    return _chain(net.conv_final, f, axis) if net.use_conv_final else f


def _basic_unet_field(net: nn.Module, f: Field, axis: int) -> Field:
    """MONAI BasicUNet: two convs per level, 2× max-pools, transposed-conv upsampling, concatenation."""
    x0 = _chain(net.conv_0, f, axis)
    encoder = [x0]
    for down in (net.down_1, net.down_2, net.down_3, net.down_4):
        encoder.append(_chain(down, encoder[-1], axis))
    f = encoder[-1]
    for up, skip in zip((net.upcat_4, net.upcat_3, net.upcat_2, net.upcat_1), reversed(encoder[:-1])):
        f = _chain(up.convs, Field.merge(_chain(up.upsample, f, axis), skip), axis)
    return _chain(net.final_conv, f, axis)
