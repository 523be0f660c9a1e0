"""The model card: what a model directory promises about its network.

A model directory holds ``card.json`` (this schema) and ``weights.safetensors``.
The card is validated here, at the edge; the rest of segflow receives a typed
:class:`ModelCard` and never interprets raw JSON.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from storage.classes import LabelClass

CARD_VERSION = 2  # 2 added input.dtype, input.spacing_unit and inference.flip_tta; 1 still reads


class Normalization(BaseModel):
    """How raw pixels become network input, applied per window.

    - ``none``: cast to float32;
    - ``scale``: (x - offset) * scale per channel (fixed constants, e.g. 1/255);
    - ``zscore``: (x - mean) / std per channel with fixed constants;
    - ``image_zscore``: mean and std of the image's own valid pixels, per channel,
      computed once over the whole image before windows run (MR intensities
      have no absolute scale).
    """

    model_config = ConfigDict(extra="forbid")

    mode: Literal["none", "scale", "zscore", "image_zscore"] = "none"
    offset: list[float] | None = None
    scale: list[float] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    clip: tuple[float, float] | None = None  # applied after normalising

    @model_validator(mode="after")
    def _complete(self) -> "Normalization":
        if self.mode == "scale" and self.scale is None:
            raise ValueError("normalization mode 'scale' needs 'scale'")
        if self.mode == "zscore" and (self.mean is None or self.std is None):
            raise ValueError("normalization mode 'zscore' needs 'mean' and 'std'")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError("normalization std must be positive")
        return self


class Architecture(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)  # a registry name, see segmentation.models.names()
    kwargs: dict[str, Any] = Field(default_factory=dict)


class InputSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spatial_dims: Literal[2, 3]
    channels: int = Field(ge=1)
    channel_names: list[str] = Field(default_factory=list)
    normalization: Normalization = Field(default_factory=Normalization)
    dtype: str | None = None  # the raw pixel dtype the normalisation was designed for, e.g. "uint8"
    spacing: list[float] | None = None  # per spatial axis, the resolution the model was trained at
    spacing_unit: Literal["mm", "m"] | None = None  # mm for scans, metres for rasters


class InferenceDefaults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    roi: list[int]
    overlap: float = Field(default=0.25, ge=0.0, lt=1.0)
    blend: Literal["gaussian", "constant"] = "gaussian"
    sigma_scale: float = Field(default=0.125, gt=0.0)
    batch_size: int = Field(default=4, ge=1)
    # Test-time augmentation: the spatial axes (0-based) to mirror.  Every
    # combination of them is run and the softmax outputs averaged (2^k passes per
    # window), as nnU-Net's mirroring does.  Per window, so chunking cannot change it.
    flip_tta: list[int] = Field(default_factory=list)

    @field_validator("flip_tta")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v) or any(a < 0 for a in v):
            raise ValueError("flip_tta lists distinct, non-negative spatial axes")
        return sorted(v)

    @field_validator("roi")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(r < 1 for r in v):
            raise ValueError("roi must be positive")
        return v


class ModelCard(BaseModel):
    model_config = ConfigDict(extra="forbid")

    card_version: int = Field(default=CARD_VERSION, ge=1)
    name: str = Field(min_length=1)
    description: str = ""
    architecture: Architecture
    input: InputSpec
    classes: list[LabelClass] = Field(min_length=2)
    inference: InferenceDefaults
    weights_sha256: str | None = None
    training: dict[str, Any] | None = None  # provenance of the training run that made the weights

    @model_validator(mode="after")
    def _consistent(self) -> "ModelCard":
        if self.card_version > CARD_VERSION:
            raise ValueError(f"card_version {self.card_version} is newer than this segflow reads "
                             f"(up to {CARD_VERSION}); upgrade segflow")
        if any(a >= self.input.spatial_dims for a in self.inference.flip_tta):
            raise ValueError(f"flip_tta axes must be < spatial_dims ({self.input.spatial_dims})")
        if self.input.spacing is not None and len(self.input.spacing) != self.input.spatial_dims:
            raise ValueError("input.spacing needs one value per spatial axis")
        values = [c.value for c in self.classes]
        if values != list(range(len(values))):
            raise ValueError("class values must be 0..N-1 in order (they index the network's outputs)")
        if len(self.inference.roi) != self.input.spatial_dims:
            raise ValueError(f"roi has {len(self.inference.roi)} axes, spatial_dims is {self.input.spatial_dims}")
        if self.input.channel_names and len(self.input.channel_names) != self.input.channels:
            raise ValueError("channel_names must list one name per input channel")
        return self

    @property
    def num_classes(self) -> int:
        return len(self.classes)
