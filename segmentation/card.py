"""The model card: what a model directory promises about its network.

A model directory holds ``card.json`` (this schema) and ``weights.safetensors``.
The card is validated here, at the edge; the rest of segflow receives a typed
:class:`ModelCard` and never interprets raw JSON.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from storage.classes import LabelClass

# 2 added input.dtype, input.spacing_unit and inference.flip_tta; 3 added model space (input.orientation,
# input.interpolation, inference.invert, inference.keep_largest) and the nonzero and percentile normalisations.
# 4 added model space for rasters (a 2-D card's spacing in metres and input.crs are applied, input.resampling)
# and band units (input.units, input.dn_scale).
# Versions 1 and 2 still read; their spacing is documentation only (inputs are segmented on their own grid).
# A version 3 card's 2-D spacing is documentation only too: rasters are resampled from version 4 on.
CARD_VERSION = 4
MODEL_SPACE_VERSION = 3  # from this card version on, a declared spacing or orientation of a volume is applied
RASTER_MODEL_SPACE_VERSION = 4  # and from this one on, a raster's ground sample distance and CRS


MIN_STD = 1e-12  # a smaller zscore std turns float32 values into infinities


FLOAT32_MAX = 3.4028234663852886e38  # normalisation runs in float32: a larger constant is inf there


class Normalization(BaseModel):
    """How raw pixels become network input, applied per window.

    - ``none``: cast to float32;
    - ``scale``: (x - offset) * scale per channel (fixed constants, e.g. 1/255);
    - ``zscore``: (x - mean) / std per channel with fixed constants;
    - ``image_zscore``: mean and std of the image's own valid pixels, per channel,
      computed once over the whole image before windows run (MR intensities
      have no absolute scale);
    - ``percentile``: MONAI's ``ScaleIntensityRangePercentiles``: the image's
      ``lower`` and ``upper`` percentiles (over all its voxels and channels,
      computed exactly, out of core) map linearly onto ``b_min``..``b_max``
      (``relative`` moves those by the same fractions), then optional clipping.

    ``nonzero`` (``zscore`` and ``image_zscore``, as MONAI's
    ``NormalizeIntensity(nonzero=True)``): only voxels that are not 0 are
    normalised and counted in the statistics; zeros stay 0.  All of it happens
    in model space, after resampling, as MONAI's transforms run in that order.
    """

    model_config = ConfigDict(extra="forbid")

    mode: Literal["none", "scale", "zscore", "image_zscore", "percentile"] = "none"
    offset: list[float] | None = None
    scale: list[float] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    clip: tuple[float, float] | None = None  # applied after normalising
    nonzero: bool = False
    lower: float | None = Field(default=None, ge=0.0, le=100.0)  # percentile mode
    upper: float | None = Field(default=None, ge=0.0, le=100.0)
    b_min: float | None = None
    b_max: float | None = None
    relative: bool = False

    @model_validator(mode="after")
    def _complete(self) -> "Normalization":
        numbers = {name: getattr(self, name) for name in ("offset", "scale", "mean", "std", "clip", "b_min", "b_max")}
        for name, value in numbers.items():  # a NaN or an infinity here makes every input meaningless
            # the arithmetic is float32: a scale of 1e308 became inf there, every pixel non-finite, then 0, and the
            # run reported ok with one class everywhere
            if value is not None and not all(math.isfinite(v) and abs(v) <= FLOAT32_MAX
                                             for v in (value if isinstance(value, (list, tuple)) else [value])):
                raise ValueError(f"normalization {name} must hold finite numbers within float32's range "
                                 f"(|x| <= {FLOAT32_MAX:.4g}), got {value}")
        if self.clip is not None and self.clip[0] >= self.clip[1]:
            raise ValueError(f"normalization clip {list(self.clip)} must be [lowest, highest]")
        if self.mode == "scale" and self.scale is None:
            raise ValueError("normalization mode 'scale' needs 'scale'")
        if self.mode == "zscore" and (self.mean is None or self.std is None):
            raise ValueError("normalization mode 'zscore' needs 'mean' and 'std'")
        if self.std is not None and any(s < MIN_STD for s in self.std):  # 1e-320 passed: every value became inf
            raise ValueError(f"normalization std must be at least {MIN_STD:g}, got {list(self.std)}")
        if self.mode == "percentile":
            if None in (self.lower, self.upper, self.b_min, self.b_max):
                raise ValueError("normalization mode 'percentile' needs 'lower', 'upper', 'b_min' and 'b_max'")
            if self.lower >= self.upper:  # type: ignore[operator]
                raise ValueError("normalization percentile 'lower' must be below 'upper'")
            if self.b_min == self.b_max:  # every input one constant (it ended in a ZeroDivisionError per input)
                raise ValueError(f"normalization percentile 'b_min' and 'b_max' must differ, both are {self.b_min}")
        if self.nonzero and self.mode not in ("zscore", "image_zscore"):
            raise ValueError("normalization 'nonzero' applies to the zscore and image_zscore modes")
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
    spacing: list[float] | None = None  # per spatial axis in storage order ((z, y, x) / (row, col)); <= 0 keeps
    spacing_unit: Literal["mm", "m"] | None = None  # mm for scans, metres for rasters
    # Model space (card version 3, volumes): the voxel axes' orientation the network was trained in, as
    # MONAI axcodes of the (i, j, k) voxel axes ("RAS", "LPS", ...), and how the image is resampled to the
    # spacing (MONAI Spacingd's mode; align_corners=False, border padding).
    orientation: str | None = None
    interpolation: Literal["bilinear", "nearest"] = "bilinear"
    # Model space for rasters (card version 4): the ground sample distance is ``spacing`` (metres, both axes),
    # ``crs`` the CRS the model works in: "utm" (a geographic input goes to its local UTM zone, a projected one
    # stays) or an authority code such as "EPSG:32633"; None keeps the input's CRS.  ``resampling`` is the
    # warp's GDAL kernel: "auto" is bilinear when refining and average when coarsening, as providers make their
    # own 20 m products.
    crs: str | None = None
    resampling: Literal["auto", "bilinear", "average", "nearest"] = "auto"
    # The units the network was trained on (rasters).  None: the stored values as they are.  "reflectance":
    # each band's scale and offset (GDAL's, or a STAC item's raster:bands) applied, e.g. Sentinel-2 L2A
    # digital numbers * 1e-4 - 0.1 after processing baseline 04.00.  "dn": that reflectance times
    # ``dn_scale`` (10000: the digital numbers of products before the BOA_ADD_OFFSET appeared).
    units: Literal["reflectance", "dn"] | None = None
    dn_scale: float = Field(default=10000.0, gt=0.0)

    @field_validator("crs")
    @classmethod
    def _crs(cls, v: str | None) -> str | None:
        if v is None or v.lower() == "utm":
            return None if v is None else "utm"
        import re

        if not re.fullmatch(r"[A-Za-z]+:\d+", v.strip()):
            raise ValueError(f"crs {v!r} is neither 'utm' nor an authority code such as EPSG:32633")
        return v.strip().upper()

    @field_validator("orientation")
    @classmethod
    def _axcodes(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.upper()
        axes = sorted(i for c in v for i, pair in enumerate(("LR", "AP", "SI")) if c in pair)
        if len(v) != 3 or axes != [0, 1, 2]:
            raise ValueError(f"orientation {v!r} is not three axcodes, one of L/R, A/P and S/I each (e.g. RAS)")
        return v


class KeepLargest(BaseModel):
    """MONAI's ``KeepLargestConnectedComponent`` on the label map, done across chunks."""

    model_config = ConfigDict(extra="forbid")

    applied_labels: list[int] = Field(min_length=1)
    independent: bool = True
    connectivity: int | None = Field(default=None, ge=1, le=3)
    num_components: int = Field(default=1, ge=1)


MAX_WINDOW_PIXELS = 2**28  # 16384² or 645³: a roi of 1e30 or 100000² failed every input with a torch allocation


def check_window(roi: list[int]) -> list[int]:
    """A window the machine can hold: refused at the edge (card, --roi), not as each input's allocation error."""
    if math.prod(int(r) for r in roi) > MAX_WINDOW_PIXELS:
        raise ValueError(f"roi {'x'.join(str(int(r)) for r in roi)} is a window of more than {MAX_WINDOW_PIXELS:,} "
                         "pixels (16384x16384); the window is the network's input, give one it was trained near")
    return roi


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
    # Back from model space: "probabilities" are resampled linearly onto the input's grid and the argmax taken
    # there (nnU-Net, most bundles' Invertd with nearest_interp false); "labels" takes the argmax in model
    # space and brings labels back by nearest neighbour (Invertd's default nearest_interp true).
    invert: Literal["probabilities", "labels"] = "probabilities"
    # What overlapping windows blend: softmax probabilities (segflow's default), or raw network outputs with
    # the softmax after the blend, as MONAI's sliding-window inferer does (bundles map to this).
    blend_outputs: Literal["probabilities", "logits"] = "probabilities"
    keep_largest: KeepLargest | None = None
    # What the windows see past the edge of an axis shorter than the ROI (MONAI's sliding-window padding_mode
    # and cval, applied after normalisation): "constant" ``padding_value``, or the image reflected (without
    # repeating the edge), replicated or wrapped around.  Longer axes are never padded.
    padding: Literal["constant", "reflect", "replicate", "circular"] = "constant"
    padding_value: float = 0.0

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
        return check_window(v)


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
        if self.input.spacing is not None and not all(math.isfinite(s) for s in self.input.spacing):
            raise ValueError(f"input.spacing must hold finite numbers (<= 0 keeps an axis), got {self.input.spacing}")
        values = [c.value for c in self.classes]
        if values != list(range(len(values))):
            raise ValueError("class values must be 0..N-1 in order (they index the network's outputs)")
        names = [c.name for c in self.classes]
        if len(set(names)) != len(names):  # statistics, reports and tables are keyed by name
            twice = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"class names must be unique (they key statistics and reports); "
                             f"{', '.join(repr(n) for n in twice)} names more than one class")
        if len(self.inference.roi) != self.input.spatial_dims:
            raise ValueError(f"roi has {len(self.inference.roi)} axes, spatial_dims is {self.input.spatial_dims}")
        if self.input.channel_names and len(self.input.channel_names) != self.input.channels:
            raise ValueError("channel_names must list one name per input channel")
        norm = self.input.normalization
        for name in ("offset", "scale", "mean", "std"):  # one value for every channel, or one per channel
            given = getattr(norm, name)
            if given is not None and len(given) not in (1, self.input.channels):
                raise ValueError(f"normalization {name} lists {len(given)} values for {self.input.channels} "
                                 "channels (give one, or one per channel)")
        if self.input.orientation is not None and self.input.spatial_dims != 3:
            raise ValueError("input.orientation applies to 3-D volumes")
        if self.input.spatial_dims != 2:  # accepted on a volume card and ignored without a word
            for name, given in (("crs", self.input.crs is not None), ("units", self.input.units is not None),
                                ("resampling", self.input.resampling != "auto")):
                if given:
                    raise ValueError(f"input.{name} applies to 2-D rasters (a volume's resampling is "
                                     "input.interpolation)")
        if self.input.spatial_dims == 2 and self.input.spacing is not None and \
                self.card_version >= RASTER_MODEL_SPACE_VERSION and self.input.spacing_unit not in (None, "m"):
            raise ValueError("a raster model's spacing is its ground sample distance in metres (spacing_unit 'm')")
        if self.input.spatial_dims == 3 and self.input.spacing_unit == "m":  # read as mm: 1.5 m voxels ran at 1.5 mm
            raise ValueError("a volume model's spacing is in millimetres, as scans' voxel sizes are (spacing_unit "
                             "'mm'; 1.5 mm is 1.5)")
        # set by the card's input and classes; one copied from a MONAI constructor into kwargs too had ended
        # `segment` in a traceback ("got multiple values for keyword argument"): the same value is taken once
        for key, where, value in (("spatial_dims", "input.spatial_dims", self.input.spatial_dims),
                                  ("in_channels", "input.channels", self.input.channels),
                                  ("out_channels", "the number of classes", len(self.classes))):
            if key in self.architecture.kwargs:
                if self.architecture.kwargs[key] != value:
                    raise ValueError(f"architecture.kwargs.{key} is {self.architecture.kwargs[key]!r}, but "
                                     f"{where} makes it {value}: the card's input and classes set it (drop it "
                                     "from kwargs)")
                del self.architecture.kwargs[key]
        keep = self.inference.keep_largest
        if keep is not None and any(v not in values or v == 0 for v in keep.applied_labels):
            raise ValueError("keep_largest.applied_labels must be class values other than 0 (background)")
        return self

    @property
    def applies_model_space(self) -> bool:
        """Whether a declared spacing or orientation is applied (version 3 on); older cards only documented it."""
        return self.card_version >= MODEL_SPACE_VERSION and self.input.spatial_dims == 3 and (
            self.input.spacing is not None or self.input.orientation is not None)

    @property
    def applies_raster_model_space(self) -> bool:
        """Whether a raster is warped to the card's ground sample distance or CRS (version 4 on)."""
        return self.card_version >= RASTER_MODEL_SPACE_VERSION and self.input.spatial_dims == 2 and (
            self.input.spacing is not None or self.input.crs is not None)

    @property
    def in_metres(self) -> bool:
        """A raster card in metres (a ground sample distance or CRS it applies, reflectance units): a scan's
        slice is no input for it, though it is 2-D (routing and :mod:`segmentation.oneslice`)."""
        return self.applies_raster_model_space or self.input.units is not None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def shaping(self) -> dict[str, Any]:
        """What in the card shapes a run's labels: all of it but its description and training record (the
        nightly ledger's key, and ``card_sha256`` in the provenance)."""
        out = self.model_dump(mode="json", exclude={"description", "training"})
        if self.inference.padding == "constant" and self.inference.padding_value == 0.0:
            # the padding fields came later: a card that pads with zeros, as every card had, keeps its hash
            del out["inference"]["padding"], out["inference"]["padding_value"]
        return out

    def shaping_sha256(self) -> str:
        """sha256 of :meth:`shaping`: a card edited since a run (its normalisation, its classes) is another model
        even with the same weights; the provenance records it and the ledger compares it before adopting."""
        from storage.layout import identity_digest

        return identity_digest(self.shaping())
