"""A MONAI bundle's network, built and run as MONAI would run it, or converted to segflow's axis order.

:mod:`segmentation.bundle` reads the bundle into a :class:`BundleMapping`
(the card, the weights, the notes) without running anything; this module
builds the network from it: by the registry, by MONAI from a trusted
configuration, or from the TorchScript archive.  MONAI's readers index images
x first, so a loaded bundle's network is wrapped in :class:`ReversedAxes` (it
sees every window as MONAI would give it), and a converted model directory has
its convolution kernels permuted instead (:func:`in_segflow_order`, checked
numerically against the wrapped network).
"""

from __future__ import annotations

from os import PathLike
from typing import Any

import torch
from torch import nn

from segmentation import models
from segmentation.bundle import (AXES_NOTE, BUNDLE_PREFIX, CONVERTED_NOTE, TORCHSCRIPT, BundleMapping, config_file,
                                 config_parser, read_bundle)
from segmentation.bundleconfig import TRUST_HINT
from segmentation.card import Architecture, ModelCard
from segmentation.formats import ScriptedNetwork, fill, load_torchscript, read_state_dict
from storage.errors import ModelError
def _reversal(spatial_dims: int) -> tuple[int, ...]:
    return (0, 1, *range(spatial_dims + 1, 1, -1))


class ReversedAxes(nn.Module):
    """Runs a MONAI-trained network on segflow windows: spatial axes reversed in, and back out.

    MONAI's readers index images x first ((i, j, k) for NIfTI, (x, y) for 2-D
    images) while segflow arrays are in storage order ((k, j, i), (row, col));
    without this, a bundle's network would see every window transposed.
    """

    def __init__(self, net: nn.Module, spatial_dims: int) -> None:
        super().__init__()
        self.net = net
        self.dims = _reversal(spatial_dims)

    def forward(self, x: torch.Tensor) -> Any:  # noqa: D102
        out = self.net(x.permute(self.dims))
        if isinstance(out, (tuple, list)):
            return type(out)(o.permute(self.dims) for o in out)
        return out.permute(self.dims)


def build_network(mapping: BundleMapping) -> nn.Module:
    """The bundle's network with its weights, in MONAI's axis order (wrap it in :class:`ReversedAxes` to run).

    Registry-built, MONAI-instantiated (trusted) or TorchScript.
    """
    arch = mapping.card.architecture
    if arch.name == TORCHSCRIPT:
        module, _ = load_torchscript(mapping.weights, trusted=mapping.allow_code)
        return ScriptedNetwork(module).eval()
    if arch.name.startswith(BUNDLE_PREFIX):
        if not mapping.trusted:
            raise ModelError(mapping.path, f"architecture {arch.name!r} needs a trusted bundle; {TRUST_HINT}")
        parser = config_parser(mapping.path, config_file(mapping.path))
        try:
            module = parser.get_parsed_content("network_def", instantiate=True)
        except Exception as exc:  # noqa: BLE001 - evaluating foreign configuration can fail in any way
            raise ModelError(mapping.path, f"MONAI could not instantiate network_def "
                                           f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
        if not isinstance(module, nn.Module):
            raise ModelError(mapping.path, f"network_def made a {type(module).__name__}, not a torch module")
    else:
        card = mapping.card
        try:
            module = models.create(arch.name, spatial_dims=card.input.spatial_dims, in_channels=card.input.channels,
                                   out_channels=card.num_classes, **arch.kwargs)
        except ModelError as exc:  # the registry does not know which bundle asked
            raise ModelError(exc.path or mapping.path, exc.problem) from None
    return fill(module, read_state_dict(mapping.weights, trusted=mapping.allow_code), mapping.weights, arch.name,
                defaults_hint=False)


def load_bundle(path: str | PathLike[str], *, trust_bundle: bool = False) -> tuple[BundleMapping, nn.Module]:
    """Read and build a bundle: (mapping, network that takes segflow windows, in eval mode)."""
    mapping = read_bundle(path, trust_bundle=trust_bundle)
    net = ReversedAxes(build_network(mapping), mapping.card.input.spatial_dims).eval()
    arch = mapping.card.architecture.name
    if arch == TORCHSCRIPT or arch.startswith(BUNDLE_PREFIX):  # not built by segflow: checked once, here
        if models.check_output(net, mapping.card, mapping.path, "the bundle's network"):  # ends in a softmax
            net = models.ProbabilitiesAsLogits(net).eval()
    return mapping, net


# Per-axis arguments of the registry's MONAI networks, reversed with the axes.  ``strides`` and
# ``kernel_size`` of DynUNet are per level, each level an int or a per-axis list.
_PER_AXIS = {"unet": {"kernel_size": "axes", "up_kernel_size": "axes", "strides": "levels"},
             "dynunet": {"kernel_size": "levels", "strides": "levels", "upsample_kernel_size": "levels"}}


def _reverse_axis_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    out = dict(kwargs)
    for key, kind in _PER_AXIS.get(name, {}).items():
        value = out.get(key)
        if kind == "axes" and isinstance(value, list):
            out[key] = value[::-1]
        elif kind == "levels" and isinstance(value, list):
            out[key] = [v[::-1] if isinstance(v, list) else v for v in value]
    return out


def _difference(a: nn.Module, b: nn.Module, channels: int, roi: list[int]) -> float | None:
    """Max |a(x) - b(x)| relative to max |a(x)| on a random window (the roi, else multiples of 32)."""
    for shape in (roi, [-(-r // 32) * 32 for r in roi], [-(-r // 64) * 64 for r in roi]):
        x = torch.randn((1, channels, *shape), generator=torch.Generator().manual_seed(0))
        try:
            with torch.inference_mode():
                want, got = a(x), b(x)
        except RuntimeError:  # sizes the network cannot take
            continue
        want = want[0] if isinstance(want, (tuple, list)) else want
        got = got[0] if isinstance(got, (tuple, list)) else got
        return float((want - got).abs().max()) / (1.0 + float(want.abs().max()))
    return None


def in_segflow_order(mapping: BundleMapping, net: nn.Module) -> tuple[ModelCard, nn.Module]:
    """The registry network that computes ``ReversedAxes(net)`` directly: kernels permuted, per-axis args reversed.

    A convolution of a transposed image with transposed kernels is the
    transposed convolution, so the converted network needs no wrapper.  The
    result is checked on a random window; anything that does not commute with
    the axis reversal (an argument segflow does not know to reverse) is refused.
    """
    arch = mapping.card.architecture
    card = mapping.card
    if arch.name not in models.names():
        raise ModelError(mapping.path, f"architecture {arch.name!r} is not a segflow registry architecture")
    d = card.input.spatial_dims
    perm = _reversal(d)
    kwargs = _reverse_axis_kwargs(arch.name, arch.kwargs)
    convs = {f"{n}.weight" if n else "weight" for n, m in net.named_modules(remove_duplicate=False)
             if isinstance(m, nn.modules.conv._ConvNd)}
    state = {k: (v.permute(perm).contiguous() if k in convs and v.ndim == d + 2 else v)
             for k, v in net.state_dict().items()}
    out = models.create(arch.name, spatial_dims=d, in_channels=card.input.channels, out_channels=card.num_classes,
                        **kwargs)
    fill(out, state, mapping.weights, arch.name, defaults_hint=False)
    err = _difference(ReversedAxes(net, d).eval(), out, card.input.channels, card.inference.roi)
    if err is None:
        raise ModelError(mapping.path, f"{arch.name} runs on neither its roi {card.inference.roi} nor multiples of "
                                       "32: cannot check the conversion")
    if not err < 1e-4:
        raise ModelError(mapping.path, f"{arch.name} with {arch.kwargs} does not convert to segflow's axis order "
                                       f"(relative difference {err:.1e}); segment the bundle itself instead")
    new_card = card.model_copy(update={"architecture": Architecture(name=arch.name, kwargs=kwargs),
                                       "description": card.description.replace(AXES_NOTE, CONVERTED_NOTE)})
    return new_card, out
