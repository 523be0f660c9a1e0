"""The architecture registry: networks are built by name, never by importing a path.

Building only registered classes is what makes a model card safe to read:
a card names an architecture and its arguments; it cannot make segflow
import or call anything else.
"""

from __future__ import annotations

from typing import Any, Callable


from torch import nn

from storage.errors import ModelError

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
    except (TypeError, ValueError, AssertionError) as exc:
        raise ModelError(None, f"cannot build {name!r} with {kwargs}: {exc}") from None


@register("unet")
def _monai_unet(*, spatial_dims: int, in_channels: int, out_channels: int,
                channels: tuple[int, ...] = (16, 32, 64, 128), strides: tuple[int, ...] = (2, 2, 2),
                num_res_units: int = 1, norm: str = "batch", **kwargs: Any) -> nn.Module:
    """MONAI's residual U-Net; input sizes should be divisible by prod(strides)."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                channels=tuple(channels), strides=tuple(strides), num_res_units=num_res_units,
                norm=norm, **kwargs)


@register("basic_unet")
def _monai_basic_unet(*, spatial_dims: int, in_channels: int, out_channels: int,
                      features: tuple[int, ...] = (16, 16, 32, 64, 128, 16), **kwargs: Any) -> nn.Module:
    from monai.networks.nets import BasicUNet

    return BasicUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                     features=tuple(features), **kwargs)
