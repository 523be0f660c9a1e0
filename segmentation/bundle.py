"""MONAI bundles read as segflow models, without evaluating a line of their configuration.

A bundle is a directory with ``configs/metadata.json``, ``configs/inference.json``
(or ``.yaml``) and ``models/model.pt`` (a state_dict) or ``models/model.ts``
(TorchScript).  Its configuration is a program (``$`` expressions are Python,
``_target_`` names any importable class), so by default segflow only *reads* it:

- ``network_def``: its ``_target_`` (``UNet``, ``monai.networks.nets.BasicUNet``...)
  must map to a registry architecture and every argument must be a literal;
  an expression (``$``, ``@``, ``%``) or an unknown target is refused, naming
  ``--trust-bundle``.  MONAI's own defaults are pinned for the arguments the
  registry builder would otherwise default differently, so the registry
  builds the very network the bundle describes;
- ``network_data_format`` (metadata): input channels and names, output classes
  and names;
- preprocessing: ``ScaleIntensityRanged`` becomes ``scale`` normalisation (with
  clip), ``NormalizeIntensityd`` becomes ``zscore`` (literal subtrahend/divisor)
  or ``image_zscore`` (statistics of each channel); ``Spacingd`` gives the
  card's spacing; loading/typing transforms are no-ops here; spatial transforms
  segflow does not perform (orientation, resampling, cropping) are kept as notes.
  Any other preprocessing transform, or a mapped one with options segflow cannot
  reproduce exactly (``nonzero=True``, one-sided clip...), is refused: running
  the network on differently prepared pixels would silently give other labels;
- the inferer: ``SlidingWindowInferer`` roi_size, overlap, mode, sigma_scale,
  sw_batch_size (MONAI's defaults where absent: overlap 0.25, constant mode);
- postprocessing: softmax/argmax is what segflow does; sigmoid/threshold
  (multi-label) outputs are refused; other steps are kept as notes.

Axis order: MONAI's readers index images x first ((i, j, k) of a NIfTI,
(x, y) of a 2-D image); segflow arrays are in storage order ((k, j, i),
(row, col)).  The card's roi and spacing are therefore the bundle's reversed,
a loaded bundle's network is wrapped in :class:`ReversedAxes` (it sees every
window exactly as MONAI would give it), and a converted model directory has
its convolution kernels permuted instead (:func:`in_segflow_order`, checked
numerically).

Notes (what segflow does not apply) are returned and written into the card's
description.  With ``trust_bundle=True`` (an explicit opt-in) MONAI's
``ConfigParser`` instantiates ``network_def`` for targets the registry does not
know, and evaluates expression arguments of preprocessing transforms; such a
network runs as a plain ``nn.Module`` and its card names the architecture
``bundle:<target>``, which a segflow model directory cannot hold (it is not a
registry name), so only the bundle itself can run it.
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass, field
from enum import Enum
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from segmentation import models
from segmentation.card import Architecture, ModelCard
from segmentation.formats import (ScriptedNetwork, WeightFormat, detect_format, fill, load_torchscript,
                                  read_state_dict)
from storage.errors import ModelError
from storage.hashing import sha256_file

META_FILE = Path("configs") / "metadata.json"
CONFIG_FILES = ("inference.json", "inference.yaml", "inference.yml")
STATE_FILE = Path("models") / "model.pt"
SCRIPT_FILE = Path("models") / "model.ts"
TRUST_HINT = "pass --trust-bundle (trust_bundle=True) to let MONAI evaluate the bundle's configuration"
BUNDLE_PREFIX = "bundle:"  # architecture.name of a network instantiated from a trusted bundle
TORCHSCRIPT = "torchscript"  # architecture.name of a network that is a TorchScript archive

# network_def targets the registry can build: MONAI class name -> registry name (MONAI's aliases such as
# "Unet" or "BasicUnet" differ only in case)
_CANONICAL = {"UNet": "unet", "BasicUNet": "basic_unet", "SegResNet": "segresnet", "DynUNet": "dynunet"}
_BY_LOWER = {cls.lower(): cls for cls in _CANONICAL}
_IO_SHAPED = ("spatial_dims", "dimensions", "in_channels", "out_channels")

# Preprocessing transforms that do not change pixel values as segflow sees them (segflow reads the file itself).
_NO_OPS = {"LoadImage", "EnsureChannelFirst", "AddChannel", "EnsureType", "ToTensor", "ToNumpy", "CastToType",
           "ToDevice", "Identity", "ToMetaTensor", "FromMetaTensor", "SelectItems", "DeleteItems", "CopyItems",
           "SaveImage"}
# Spatial transforms segflow does not perform: the input must already be on the grid the model expects.
_SPATIAL = {"CropForeground", "SpatialPad", "DivisiblePad", "BorderPad", "Resize",
            "ResizeWithPadOrCrop"}
# Postprocessing steps segflow does not perform (labels stay on the input grid, as Invertd restores).
_POST_NOTED = {"SaveImage", "FillHoles", "RemoveSmallObjects",
               "LabelFilter", "EnsureType", "ToTensor", "CopyItems", "DeleteItems", "Lambda"}
_PALETTE = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]

@dataclass
class BundleMapping:
    """A bundle read as a segflow card, with what was not carried over said plainly."""

    path: Path
    card: ModelCard
    weights: Path  # the weights file the card describes (models/model.pt or models/model.ts)
    weights_format: WeightFormat
    target: str  # network_def's _target_ ("" when only TorchScript was used)
    trusted: bool  # the network comes from evaluating the configuration
    notes: list[str] = field(default_factory=list)


def is_bundle(path: str | PathLike[str]) -> bool:
    return (Path(path) / META_FILE).is_file()


# --- reading the configuration as data ------------------------------------------------------------------

def _read(path: Path) -> Any:
    """JSON or YAML as plain data (``yaml.safe_load``: no tags, no objects)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelError(path, f"unreadable bundle configuration ({exc})") from None
    try:
        if path.suffix == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception as exc:  # noqa: BLE001 - json.JSONDecodeError or yaml.YAMLError
        raise ModelError(path, f"invalid bundle configuration ({' '.join(str(exc).split())[:200]})") from None


def config_file(path: Path) -> Path:
    for name in CONFIG_FILES:
        if (path / "configs" / name).is_file():
            return path / "configs" / name
    raise ModelError(path, "MONAI bundle has no configs/inference.json (or .yaml)")


def _short(target: Any) -> str:
    """``monai.transforms.ScaleIntensityRanged`` -> ``ScaleIntensityRanged``."""
    return str(target).rsplit(".", 1)[-1]


def _base(name: str) -> str:
    """Dictionary transforms end in ``d``; ``ScaleIntensityRanged`` and ``ScaleIntensityRange`` are one."""
    return name[:-1] if name.endswith("d") and len(name) > 1 else name


def _is_expr(value: Any) -> bool:
    return isinstance(value, str) and value[:1] in ("$", "@", "%")


_REF = re.compile(r"^\$?@([A-Za-z0-9_]+(?:(?:::|#)[A-Za-z0-9_]+)*)$")


def _lookup(config: Any, ref: str) -> Any:
    node = config
    for part in re.split(r"::|#", ref):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _deref(config: dict, value: Any, depth: int = 0) -> tuple[Any, bool]:
    """Follow a pure reference (``@id`` or ``$@id``) by looking it up: reading, not evaluating.

    Returns (value, resolved); a value that is any other expression is returned as is.
    """
    while isinstance(value, str) and depth < 8:
        m = _REF.match(value)
        if not m:
            break
        target = _lookup(config, m.group(1))
        if target is None:
            break
        value, depth = target, depth + 1
    return value, not _is_expr(value)


def _first_expression(value: Any) -> str | None:
    """The first non-literal part of a network argument (expression, reference, macro, object)."""
    if _is_expr(value):
        return repr(value)
    if isinstance(value, dict):
        if "_target_" in value:
            return f"an object {{'_target_': {value['_target_']!r}}}"
        for v in value.values():
            if (found := _first_expression(v)) is not None:
                return found
    if isinstance(value, list):
        for v in value:
            if (found := _first_expression(v)) is not None:
                return found
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(type(value).__name__)


# --- network_def ---------------------------------------------------------------------------------------------

@dataclass
class _Network:
    target: str
    registry: str | None  # None: the registry cannot build it (trust needed, or TorchScript)
    kwargs: dict[str, Any]
    spatial_dims: int | None
    in_channels: int | None
    out_channels: int | None
    problem: str | None  # why the registry cannot build it


def _network(config: dict, where: Path) -> _Network | None:
    raw = config.get("network_def")
    raw, _ = _deref(config, raw)
    if raw is None:
        raw, _ = _deref(config, config.get("network"))
    if not isinstance(raw, dict) or "_target_" not in raw:
        return None
    target = str(raw["_target_"])
    args = {k: v for k, v in raw.items() if not k.startswith("_")}

    def literal_int(name: str) -> int | None:
        value = args.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    dims = literal_int("spatial_dims") or literal_int("dimensions")
    net = _Network(target, None, {}, dims, literal_int("in_channels"), literal_int("out_channels"), None)
    short = _short(target)
    monai_cls = _BY_LOWER.get(short.lower()) if (target == short or target.startswith("monai.networks.nets")) else None
    name = _CANONICAL.get(monai_cls) if monai_cls else None
    if name is None or name not in models.names():
        known = sorted({cls for cls, reg in _CANONICAL.items() if reg in models.names()})
        net.problem = f"network_def target {target!r} is not an architecture segflow's registry builds " \
                      f"(known: {', '.join(known)})"
        return net
    for key, value in args.items():
        if (bad := _first_expression(value)) is not None:
            net.problem = f"network_def argument {key!r} is {bad}, not a literal"
            return net
    kwargs = {k: v for k, v in args.items() if k not in _IO_SHAPED}
    problem = _pin_monai_defaults(monai_cls, name, kwargs, dims)
    if problem:
        net.problem = problem
        return net
    net.registry, net.kwargs = name, kwargs
    return net


def _dynunet_filters(kwargs: dict[str, Any], spatial_dims: int) -> list[int]:
    """DynUNet's filters when none are given, as MONAI computes them (one per level)."""
    return [min(2 ** (5 + i), 320 if spatial_dims == 3 else 512) for i in range(len(kwargs["strides"]))]


# MONAI defaults of None that MONAI resolves itself from other arguments; the registry needs them explicit.
_DERIVED = {("DynUNet", "filters"): _dynunet_filters}


def _pin_monai_defaults(monai_name: str, registry: str, kwargs: dict[str, Any],
                        spatial_dims: int | None) -> str | None:
    """Write MONAI's defaults for arguments the registry builder defaults differently.

    The bundle's network is ``monai.networks.nets.<X>(**args)``; the registry
    builder may choose other defaults (segflow's U-Net has residual units), so
    every argument the bundle leaves out is set to MONAI's own default.
    """
    import monai.networks.nets as nets

    cls = getattr(nets, monai_name, None)
    builder = models._REGISTRY.get(registry)
    if cls is None or builder is None:
        return f"MONAI has no network {monai_name!r}"
    monai_params = inspect.signature(cls.__init__).parameters
    builder_params = inspect.signature(builder).parameters
    for pname, p in monai_params.items():
        if pname in ("self", *_IO_SHAPED) or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL) or pname in kwargs:
            continue
        if p.default is p.empty:
            return f"network_def for {monai_name} lacks the required argument {pname!r}"
        if pname in builder_params and builder_params[pname].default is not p.empty:
            if p.default is None and builder_params[pname].default is not None:
                derive = _DERIVED.get((monai_name, pname))
                if derive is None or spatial_dims is None:
                    return f"cannot express MONAI's default for {monai_name} argument {pname!r}; give it literally"
                kwargs[pname] = derive(kwargs, spatial_dims)
                continue
            try:
                kwargs[pname] = _jsonable(p.default)
            except TypeError:
                return f"cannot record MONAI's default for {monai_name} argument {pname!r}"
    return None


# --- metadata, preprocessing, inferer, postprocessing ----------------------------------------------------------

def _io_format(meta: dict) -> tuple[str, dict, dict]:
    fmt = meta.get("network_data_format") or {}
    inputs = fmt.get("inputs") or {}
    outputs = fmt.get("outputs") or {}
    in_key = next(iter(inputs), "image")
    in_spec = inputs.get(in_key) if isinstance(inputs.get(in_key), dict) else {}
    out_key = next(iter(outputs), "pred")
    out_spec = outputs.get(out_key) if isinstance(outputs.get(out_key), dict) else {}
    return in_key, in_spec, out_spec


def _channel_names(spec: dict, count: int) -> list[str] | None:
    names = spec.get("channel_def")
    if not isinstance(names, dict):
        return None
    out = [str(names.get(str(i), names.get(i, ""))).strip() for i in range(count)]
    return out if all(out) else None


def _keys(transform: dict) -> list[str] | None:
    keys = transform.get("keys")
    if isinstance(keys, str) and not _is_expr(keys):
        return [keys]
    if isinstance(keys, list) and all(isinstance(k, str) and not _is_expr(k) for k in keys):
        return keys
    return None  # not literal: assume it touches the image


class _Args:
    """A transform's arguments: literals as they are, expressions only when trusted."""

    def __init__(self, transform: dict, tid: str | None, evaluate: Any) -> None:
        self.t, self.tid, self.evaluate = transform, tid, evaluate

    def get(self, name: str, default: Any = None) -> Any:
        value = self.t.get(name, default)
        if _first_expression(value) is None:
            return value
        if self.evaluate is None or self.tid is None:
            raise ModelError(None, f"{_short(self.t.get('_target_'))} argument {name!r} is an expression "
                                   f"({value!r}); {TRUST_HINT}")
        try:
            return _jsonable_or_value(self.evaluate(f"{self.tid}::{name}"))
        except Exception as exc:  # noqa: BLE001 - evaluating foreign configuration can fail in any way
            raise ModelError(None, f"evaluating {self.tid}::{name} failed ({type(exc).__name__}: "
                                   f"{' '.join(str(exc).split())[:160]})") from None


def _jsonable_or_value(value: Any) -> Any:
    try:
        return _jsonable(value.tolist() if hasattr(value, "tolist") else value)
    except TypeError:
        return value


def _transforms(config: dict, key: str) -> tuple[list[tuple[dict, str | None]], str | None]:
    """The literal list of transform dicts under ``config[key]``, each with its config id if known."""
    node, _ = _deref(config, config.get(key))
    tid = key
    if isinstance(node, dict) and "transforms" in node:
        raw = node["transforms"]
        tid = f"{key}::transforms"
        m = _REF.match(raw) if isinstance(raw, str) else None
        node, ok = _deref(config, raw)
        if m:
            tid = m.group(1).replace("#", "::")
        if not ok:
            return [], f"{key} transforms are the expression {raw!r}"
    if node is None:
        return [], None
    if not isinstance(node, list):
        return [], f"{key} is not a literal list of transforms"
    out: list[tuple[dict, str | None]] = []
    for i, t in enumerate(node):
        t, ok = _deref(config, t)
        if not ok or not isinstance(t, dict) or "_target_" not in t:
            return [], f"{key} transform {i} is {t!r}, not a literal transform"
        out.append((t, f"{tid}::{i}"))
    return out, None


def _as_list(value: Any, n: int, what: str) -> list[float]:
    values = value if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ModelError(None, f"{what} is {value!r}, not {n} numbers")
    return [float(v) for v in values]


@dataclass
class _Preprocessing:
    """What a bundle's preprocessing means on a card: normalisation and model space."""

    norm: dict[str, Any] = field(default_factory=lambda: {"mode": "none"})
    spacing: list[float] | None = None  # MONAI's (i, j, k) order
    orientation: str | None = None
    interpolation: str = "bilinear"


# Intensity transforms whose result on a resampled image equals the resampled result (no clip, no statistics):
# only these may come before Spacingd in a bundle without segflow's order (resample, then normalise) differing.
def _commutes_with_resampling(norm: dict[str, Any]) -> bool:
    return norm["mode"] in ("none", "scale", "zscore") and norm.get("clip") is None and not norm.get("nonzero")


def _preprocessing(config: dict, in_key: str, channels: int, spatial_dims: int, notes: list[str],
                   evaluate: Any) -> _Preprocessing:
    """Normalisation and model space from the preprocessing transforms, or a refusal."""
    transforms, problem = _transforms(config, "preprocessing")
    if problem:
        raise ModelError(None, f"{problem}; write the card yourself and pass --card")
    if not transforms:
        notes.append("the bundle has no literal preprocessing: the network receives the raw pixel values")
    out = _Preprocessing()
    intensity: str | None = None
    for t, tid in transforms:
        name = _short(t["_target_"])
        base = _base(name)
        keys = _keys(t)
        if keys is not None and in_key not in keys:
            continue  # a transform of the labels or of other inputs
        args = _Args(t, tid, evaluate)
        if base in _NO_OPS:
            continue
        if base == "Orientation":
            axcodes = args.get("axcodes")
            if not isinstance(axcodes, str) or len(axcodes) != spatial_dims or spatial_dims != 3:
                raise ModelError(None, f"{name} axcodes {axcodes!r} is not a 3-D orientation segflow applies; pass --card")
            if args.get("as_closest_canonical", False):
                raise ModelError(None, f"{name}(as_closest_canonical=True) is not mapped; pass --card")
            out.orientation = axcodes.upper()
            continue
        if base == "Spacing":
            if spatial_dims != 3:
                raise ModelError(None, f"{name} on 2-D images is not applied by segflow yet; pass --card")
            out.spacing = _as_list(args.get("pixdim"), spatial_dims, f"{name} pixdim")
            mode = args.get("mode", "bilinear")
            mode = mode[0] if isinstance(mode, list) and len(set(mode)) == 1 else mode
            problems = [f"mode={mode!r}"] if mode not in ("bilinear", "nearest") else []
            problems += [f"{k}={args.get(k, ok)!r}" for k, ok in (("padding_mode", "border"), ("align_corners", False),
                                                                   ("diagonal", False), ("scale_extent", False))
                         if args.get(k, ok) != ok]
            if problems:
                raise ModelError(None, f"{name} with {', '.join(problems)} is not reproduced by segflow (bilinear "
                                       "or nearest, border padding, align_corners=False); pass --card")
            out.interpolation = str(mode)
            if intensity is not None and not _commutes_with_resampling(out.norm):
                notes.append(f"the bundle runs {intensity} before {name}; segflow resamples first, then "
                             "normalises, so intensities can differ slightly near edges")
            continue
        if base in _SPATIAL:
            shown = {k: v for k, v in t.items() if k not in ("_target_", "keys")}
            notes.append(f"{name}({', '.join(f'{k}={v!r}' for k, v in shown.items())}) is not applied: "
                         "segflow keeps the input's voxel order and grid")
            continue
        if base in ("ScaleIntensityRange", "NormalizeIntensity", "ScaleIntensityRangePercentiles"):
            if intensity is not None:
                raise ModelError(None, f"two intensity transforms ({intensity}, {name}) are not representable "
                                       "as one segflow normalisation; write the card yourself and pass --card")
            intensity = name
            out.norm = (_scale_range(args, name) if base == "ScaleIntensityRange"
                        else _percentiles(args, name) if base == "ScaleIntensityRangePercentiles"
                        else _normalize(args, name, channels))
            continue
        raise ModelError(None, f"preprocessing transform {name} is not one segflow can reproduce exactly "
                               "(it maps Orientationd, Spacingd, ScaleIntensityRanged, "
                               "ScaleIntensityRangePercentilesd and NormalizeIntensityd; ignores loading and "
                               "typing); write the card yourself and pass --card")
    return out


def _percentiles(args: _Args, name: str) -> dict[str, Any]:
    """ScaleIntensityRangePercentiles, with ``relative`` and ``clip`` resolved into literal bounds."""
    lower, upper = args.get("lower"), args.get("upper")
    b_min, b_max = args.get("b_min"), args.get("b_max")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lower, upper, b_min, b_max)):
        raise ModelError(None, f"{name} needs literal lower, upper, b_min and b_max; pass --card")
    if args.get("channel_wise", False):
        raise ModelError(None, f"{name}(channel_wise=True) is not representable; pass --card")
    if args.get("relative", False):
        b_min, b_max = (b_max - b_min) * lower / 100.0 + b_min, (b_max - b_min) * upper / 100.0 + b_min
    norm: dict[str, Any] = {"mode": "percentile", "lower": float(lower), "upper": float(upper),
                            "b_min": float(b_min), "b_max": float(b_max)}
    if args.get("clip", False):
        norm["clip"] = [float(min(b_min, b_max)), float(max(b_min, b_max))]
    return norm


def _scale_range(args: _Args, name: str) -> dict[str, Any]:
    """(x - a_min)/(a_max - a_min)·(b_max - b_min) + b_min  ==  (x - offset)·scale, then clip."""
    a_min, a_max = args.get("a_min"), args.get("a_max")
    b_min, b_max = args.get("b_min"), args.get("b_max")
    clip = bool(args.get("clip", False))
    if not all(isinstance(v, (int, float)) for v in (a_min, a_max)) or a_max == a_min:
        raise ModelError(None, f"{name} a_min={a_min!r}, a_max={a_max!r} is not a usable range")
    if (b_min is None) != (b_max is None):
        raise ModelError(None, f"{name} with only one of b_min/b_max is not representable; pass --card")
    if b_min is None:
        scale, offset = 1.0 / (a_max - a_min), float(a_min)
        if clip:
            raise ModelError(None, f"{name} clip without b_min/b_max is not representable; pass --card")
    else:
        scale = (b_max - b_min) / (a_max - a_min)
        offset = a_min - b_min / scale if scale != 0 else float(a_min)
        if scale == 0:
            raise ModelError(None, f"{name} maps everything to {b_min}: not a usable scaling")
    norm: dict[str, Any] = {"mode": "scale", "offset": [float(offset)], "scale": [float(scale)]}
    if clip:
        norm["clip"] = [float(min(b_min, b_max)), float(max(b_min, b_max))]
    return norm


def _normalize(args: _Args, name: str, channels: int) -> dict[str, Any]:
    nonzero = bool(args.get("nonzero", False))
    channel_wise = bool(args.get("channel_wise", False))
    sub, div = args.get("subtrahend"), args.get("divisor")
    if sub is None and div is None:
        if channels > 1 and not channel_wise:
            raise ModelError(None, f"{name}(channel_wise=False) pools statistics over {channels} channels; "
                                   "segflow's image_zscore is per channel; pass --card")
        return {"mode": "image_zscore", "nonzero": nonzero}
    if sub is None or div is None:
        raise ModelError(None, f"{name} with only one of subtrahend/divisor is not representable; pass --card")
    n = channels if channel_wise and isinstance(sub, (list, tuple)) else 1
    mean, std = _as_list(sub, n, f"{name} subtrahend"), _as_list(div, n, f"{name} divisor")
    std = [s if s != 0 else 1.0 for s in std]  # MONAI divides by 1 where the divisor is 0
    return {"mode": "zscore", "mean": mean, "std": std, "nonzero": nonzero}


def _inferer(config: dict, in_spec: dict, spatial_dims: int, notes: list[str], evaluate: Any) -> dict[str, Any]:
    raw, ok = _deref(config, config.get("inferer"))
    name = _short(raw.get("_target_")) if isinstance(raw, dict) else None
    if name in ("SlidingWindowInferer", "SlidingWindowInfererAdapt"):
        args = _Args(raw, "inferer", evaluate)
        roi = args.get("roi_size")
        roi = [roi] * spatial_dims if isinstance(roi, int) else roi
        if not isinstance(roi, list) or len(roi) != spatial_dims or not all(isinstance(r, int) and r > 0 for r in roi):
            raise ModelError(None, f"{name} roi_size {raw.get('roi_size')!r} is not {spatial_dims} positive sizes")
        overlap = args.get("overlap", 0.25)
        if isinstance(overlap, list):
            if len(set(overlap)) != 1:
                raise ModelError(None, f"{name} per-axis overlap {overlap!r} is not representable; pass --card")
            overlap = overlap[0]
        sigma = args.get("sigma_scale", 0.125)
        if isinstance(sigma, list):
            if len(set(sigma)) != 1:
                raise ModelError(None, f"{name} per-axis sigma_scale {sigma!r} is not representable; pass --card")
            sigma = sigma[0]
        mode = str(args.get("mode", "constant"))
        if mode not in ("constant", "gaussian"):
            raise ModelError(None, f"{name} mode {mode!r} is not a segflow blend (constant, gaussian)")
        pad = args.get("padding_mode", "constant")
        if pad != "constant" or args.get("cval", 0.0) not in (0, 0.0):
            notes.append(f"{name} padding_mode={pad!r} is not applied: segflow pads short axes with zeros")
        return {"roi": roi, "overlap": float(overlap), "blend": mode, "sigma_scale": float(sigma),
                "batch_size": int(args.get("sw_batch_size", 1)), "blend_outputs": "logits"}
    if raw is None or name == "SimpleInferer":
        shape = in_spec.get("spatial_shape")
        if isinstance(shape, list) and len(shape) == spatial_dims and all(isinstance(s, int) and s > 0 for s in shape):
            notes.append("the bundle runs the whole image at once (SimpleInferer); segflow uses windows of the "
                         f"metadata's spatial_shape {shape}")
            return {"roi": shape, "overlap": 0.25, "blend": "gaussian", "blend_outputs": "logits"}
        raise ModelError(None, "the bundle has no SlidingWindowInferer and its metadata gives no literal "
                               "spatial_shape to use as the window size; pass --card")
    raise ModelError(None, f"inferer {raw.get('_target_') if isinstance(raw, dict) else raw!r} is not one segflow "
                           "maps (SlidingWindowInferer, SimpleInferer); pass --card")


def _postprocessing(config: dict, notes: list[str], classes: int) -> dict[str, Any]:
    """Inference settings from the postprocessing: how labels come back (Invertd) and KeepLargest..."""
    transforms, problem = _transforms(config, "postprocessing")
    out: dict[str, Any] = {}
    if problem:
        notes.append(f"postprocessing not read ({problem}); segflow takes the argmax of the softmax")
        return out
    argmax_done = softmax_done = inverted = False
    for t, _ in transforms:
        name = _short(t["_target_"])
        base = _base(name)
        if base == "Activations":
            if t.get("sigmoid") is True or (t.get("other") not in (None, False)):
                raise ModelError(None, f"{name} with sigmoid/other activations (multi-label output) is not "
                                       "representable: segflow labels each voxel with the softmax argmax")
            softmax_done = softmax_done or t.get("softmax") is True
        elif base == "AsDiscrete":
            if t.get("threshold") not in (None, False) or t.get("argmax") is False:
                raise ModelError(None, f"{name} thresholding (multi-label output) is not representable: "
                                       "segflow labels each voxel with the softmax argmax")
            argmax_done = argmax_done or t.get("argmax") is True
        elif base == "Invert":
            nearest = t.get("nearest_interp", True)
            if not isinstance(nearest, bool):
                raise ModelError(None, f"{name} nearest_interp {nearest!r} is not a literal; pass --card")
            if argmax_done and not nearest:
                raise ModelError(None, f"{name} interpolates labels linearly (argmax before Invertd with "
                                       "nearest_interp=False), which segflow does not reproduce; pass --card")
            out["invert"] = "labels" if nearest else "probabilities"
            if not nearest and not softmax_done:
                notes.append(f"{name} resamples raw network outputs; segflow resamples their softmax, so labels "
                             "can differ where classes are close")
            inverted = True
        elif base == "KeepLargestConnectedComponent":
            out["keep_largest"] = _keep_largest(t, name, classes)
            if not inverted:
                notes.append(f"{name} runs before Invertd in the bundle; segflow runs it on the input's grid")
        elif base in _POST_NOTED or base in _NO_OPS:
            if base not in ("SaveImage", "EnsureType", "ToTensor", "CopyItems", "DeleteItems"):
                notes.append(f"postprocessing {name} is not applied")
        else:
            notes.append(f"postprocessing {name} is not applied")
    return out


def _keep_largest(t: dict, name: str, classes: int) -> dict[str, Any]:
    applied = t.get("applied_labels")
    applied = list(range(1, classes)) if applied is None else [applied] if isinstance(applied, int) else applied
    connectivity = t.get("connectivity")
    literal = isinstance(applied, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in applied)
    if not literal or not (connectivity is None or isinstance(connectivity, int)) or t.get("is_onehot"):
        raise ModelError(None, f"{name} arguments are not literal label values on a label map; pass --card")
    return {"applied_labels": [v for v in applied if v != 0], "independent": bool(t.get("independent", True)),
            "connectivity": connectivity, "num_components": int(t.get("num_components", 1))}


# --- the mapping -----------------------------------------------------------------------------------------------

AXES_NOTE = ("MONAI indexes arrays x first (i, j, k), segflow in storage order (k, j, i): the card's roi and spacing "
             "are the bundle's reversed, and the network sees each window with its spatial axes reversed")

CONVERTED_NOTE = ("MONAI indexes arrays x first (i, j, k), segflow in storage order (k, j, i): the card's roi and "
                  "spacing are the bundle's reversed, and the convolution kernels were permuted to match")


def _parser(path: Path, config_path: Path) -> Any:
    """MONAI's ConfigParser on the bundle: evaluating it runs the bundle's code (trusted only)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_meta(str(path / META_FILE))
    parser.read_config(str(config_path))
    parser["bundle_root"] = str(path)
    return parser


def read_bundle(path: str | PathLike[str], *, trust_bundle: bool = False,
                card: ModelCard | None = None) -> BundleMapping:
    """Map a bundle onto a :class:`ModelCard` by reading its files; nothing is evaluated unless trusted.

    Which weights are used: ``models/model.pt`` (or the parameters of
    ``models/model.ts``) with a registry architecture, or, trusted, any
    architecture; otherwise ``models/model.ts``, whose TorchScript graph runs
    without the configuration.  ``card`` replaces the mapping of input,
    classes and inference (for preprocessing segflow cannot map); the network
    still comes from the bundle.
    """
    path = Path(path)
    try:
        return _read_bundle(path, trust_bundle, card)
    except ModelError as exc:
        if exc.path is None:
            raise ModelError(path, exc.problem) from None
        raise


def _read_bundle(path: Path, trust_bundle: bool, given: ModelCard | None) -> BundleMapping:
    if not is_bundle(path):
        raise ModelError(path, f"not a MONAI bundle (no {META_FILE})")
    meta = _read(path / META_FILE)
    cfg_path = config_file(path)
    config = _read(cfg_path)
    if not isinstance(meta, dict) or not isinstance(config, dict):
        raise ModelError(path, "bundle metadata and configuration must be JSON/YAML objects")
    notes: list[str] = []
    parser = _parser(path, cfg_path) if trust_bundle else None
    evaluate = (lambda id_: parser.get_parsed_content(id_)) if parser is not None else None

    net = _network(config, path)
    state_file, script_file = path / STATE_FILE, path / SCRIPT_FILE
    target = net.target if net else ""
    trusted = False
    if net and net.registry and (state_file.is_file() or script_file.is_file()):
        weights = state_file if state_file.is_file() else script_file
        arch: dict[str, Any] = {"name": net.registry, "kwargs": net.kwargs}
    elif state_file.is_file() and trust_bundle and "network_def" in config:
        weights, trusted = state_file, True
        target = target or "network_def"
        raw = config["network_def"]
        kwargs = {k: v for k, v in raw.items() if not k.startswith("_")} if isinstance(raw, dict) else {"expr": raw}
        arch = {"name": f"{BUNDLE_PREFIX}{target}", "kwargs": kwargs}
        notes.append(f"network {target!r} was instantiated by MONAI's ConfigParser (trusted bundle); "
                     "a segflow model directory cannot hold it")
    elif script_file.is_file():
        weights, arch = script_file, {"name": TORCHSCRIPT, "kwargs": {}}
        if net and net.problem:
            notes.append(f"{net.problem}: running models/model.ts (TorchScript) instead")
    elif not state_file.is_file():
        raise ModelError(path, f"MONAI bundle has neither {STATE_FILE} nor {SCRIPT_FILE}")
    elif net is None:
        raise ModelError(path, "the bundle's configuration has no literal network_def with a _target_; "
                               + TRUST_HINT)
    else:
        raise ModelError(path, f"{net.problem}; segflow refuses to evaluate bundle code: {TRUST_HINT}")
    digest = sha256_file(weights)
    source = {"converted_from": {"format": "monai-bundle", "path": str(path.resolve()),
                                 "version": meta.get("version"), "monai_version": meta.get("monai_version"),
                                 "network": target, "weights": str(weights.relative_to(path)),
                                 "weights_sha256": digest}}
    if given is not None:
        training = {**(given.training or {}), **source}
        card = given.model_copy(update={"architecture": Architecture.model_validate(arch), "weights_sha256": digest,
                                        "training": training})
        notes.append("input, classes and inference taken from the given card (its roi in segflow's (k, j, i) "
                     "order); the network from the bundle")
        _check_io(card, net, path)
    else:
        card = _map_card(path, meta, config, net, arch, digest, source, notes, evaluate)
    notes.append(AXES_NOTE)
    if given is None:
        card = card.model_copy(update={"description": _describe(meta, notes)})
    return BundleMapping(path=path, card=card, weights=weights, weights_format=detect_format(weights),
                         target=target, trusted=trusted, notes=notes)


def _check_io(card: ModelCard, net: _Network | None, path: Path) -> None:
    if net and net.spatial_dims is not None and net.spatial_dims != card.input.spatial_dims:
        raise ModelError(path, f"the card is {card.input.spatial_dims}D, network_def {net.spatial_dims}D")
    if net and net.in_channels is not None and net.in_channels != card.input.channels:
        raise ModelError(path, f"the card says {card.input.channels} input channels, network_def {net.in_channels}")
    if net and net.out_channels is not None and net.out_channels != card.num_classes:
        raise ModelError(path, f"the card has {card.num_classes} classes, network_def {net.out_channels} outputs")


def _describe(meta: dict, notes: list[str]) -> str:
    description = " ".join(str(meta.get("description", "")).split())
    if notes:
        description = (description + " " if description else "") + "Not applied by segflow: " + "; ".join(notes) + "."
    return description


def _map_card(path: Path, meta: dict, config: dict, net: _Network | None, arch: dict[str, Any], digest: str,
              source: dict[str, Any], notes: list[str], evaluate: Any) -> ModelCard:
    in_key, in_spec, out_spec = _io_format(meta)
    spatial_dims = net.spatial_dims if net and net.spatial_dims else None
    shape = in_spec.get("spatial_shape")
    if spatial_dims is None and isinstance(shape, list) and len(shape) in (2, 3):
        spatial_dims = len(shape)
    if spatial_dims is None:
        spatial_dims = 3
        notes.append("spatial_dims not given literally: assumed 3")
    channels = _agree(in_spec.get("num_channels"), net.in_channels if net else None, "input channels")
    classes = _agree(out_spec.get("num_channels"), net.out_channels if net else None, "output channels")
    if channels is None or classes is None:
        raise ModelError(path, "metadata network_data_format (or network_def) does not give the number of "
                               "input and output channels")
    if classes < 2:
        raise ModelError(path, f"the network has {classes} output channel: segflow needs one softmax channel "
                               "per class (at least 2)")
    pre = _preprocessing(config, in_key, channels, spatial_dims, notes, evaluate)
    spacing = pre.spacing
    inference = _inferer(config, in_spec, spatial_dims, notes, evaluate)
    inference["roi"] = inference["roi"][::-1]  # MONAI's (i, j, k) -> segflow's (k, j, i)
    inference.update(_postprocessing(config, notes, classes))
    class_names = _channel_names(out_spec, classes) or [f"class{i}" for i in range(classes)]
    card = {
        "name": str(meta.get("name") or path.name),
        "architecture": arch,
        "input": {"spatial_dims": spatial_dims, "channels": channels,
                  "channel_names": _channel_names(in_spec, channels) or [], "normalization": pre.norm,
                  "spacing": spacing[::-1] if spacing else None, "spacing_unit": "mm" if spacing else None,
                  "orientation": pre.orientation, "interpolation": pre.interpolation},
        "classes": [{"value": i, "name": n, "color": _PALETTE[i % len(_PALETTE)]} for i, n in enumerate(class_names)],
        "inference": inference,
        "weights_sha256": digest,
        "training": source,
    }
    try:
        return ModelCard.model_validate(card)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "card"
        raise ModelError(path, f"the bundle maps to an invalid card: {where}: {first['msg']}") from None


def _agree(meta_value: Any, net_value: int | None, what: str) -> int | None:
    meta_int = meta_value if isinstance(meta_value, int) and not isinstance(meta_value, bool) else None
    if meta_int is not None and net_value is not None and meta_int != net_value:
        raise ModelError(None, f"metadata says {meta_int} {what}, network_def says {net_value}")
    return net_value if net_value is not None else meta_int


# --- networks ---------------------------------------------------------------------------------------------------

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
        module, _ = load_torchscript(mapping.weights)
        return ScriptedNetwork(module).eval()
    if arch.name.startswith(BUNDLE_PREFIX):
        if not mapping.trusted:
            raise ModelError(mapping.path, f"architecture {arch.name!r} needs a trusted bundle; {TRUST_HINT}")
        parser = _parser(mapping.path, config_file(mapping.path))
        try:
            module = parser.get_parsed_content("network_def", instantiate=True)
        except Exception as exc:  # noqa: BLE001 - evaluating foreign configuration can fail in any way
            raise ModelError(mapping.path, f"MONAI could not instantiate network_def "
                                           f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})") from None
        if not isinstance(module, nn.Module):
            raise ModelError(mapping.path, f"network_def made a {type(module).__name__}, not a torch module")
    else:
        card = mapping.card
        module = models.create(arch.name, spatial_dims=card.input.spatial_dims, in_channels=card.input.channels,
                               out_channels=card.num_classes, **arch.kwargs)
    return fill(module, read_state_dict(mapping.weights), mapping.weights, arch.name)


def load_bundle(path: str | PathLike[str], *, trust_bundle: bool = False) -> tuple[BundleMapping, nn.Module]:
    """Read and build a bundle: (mapping, network that takes segflow windows, in eval mode)."""
    mapping = read_bundle(path, trust_bundle=trust_bundle)
    net = build_network(mapping)
    return mapping, ReversedAxes(net, mapping.card.input.spatial_dims).eval()


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
    fill(out, state, mapping.weights, arch.name)
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
