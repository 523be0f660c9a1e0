"""What a MONAI bundle's transforms and inferer mean on a segflow card.

Each preprocessing transform segflow reproduces exactly becomes a card field:
``Orientationd`` and ``Spacingd`` give model space, ``ScaleIntensityRanged``,
``ScaleIntensityRangePercentilesd`` and ``NormalizeIntensityd`` the
normalisation; the ``SlidingWindowInferer`` gives ROI, overlap and blending;
``Invertd`` and ``KeepLargestConnectedComponentd`` in the postprocessing say how
labels come back and what is cleaned up.  Loading and typing transforms are
no-ops here; anything else that would change the pixels the network sees is
refused, because running the network on differently prepared pixels would
silently give other labels.  Steps that do not change labels are kept as notes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from segmentation.bundleconfig import (Args, as_floats, base_name, deref, short_name, transform_keys,
                                       transform_list)
from storage.errors import ModelError

# Preprocessing transforms that do not change pixel values as segflow sees them (segflow reads the file itself).
NO_OPS = {"LoadImage", "EnsureChannelFirst", "AddChannel", "EnsureType", "ToTensor", "ToNumpy", "CastToType",
           "ToDevice", "Identity", "ToMetaTensor", "FromMetaTensor", "SelectItems", "DeleteItems", "CopyItems",
           "SaveImage"}
# Spatial transforms segflow does not perform: the input must already be on the grid the model expects.
SPATIAL_NOTED = {"CropForeground", "SpatialPad", "DivisiblePad", "BorderPad"}
# ... and those that change the image's scale, which the network then sees otherwise than it was trained: refused
RESIZES = {"Resize", "ResizeWithPadOrCrop", "Zoom"}
PADDING_MODES = ("constant", "reflect", "replicate", "circular")  # what MONAI's sliding window pads with
# Postprocessing steps segflow does not perform (labels stay on the input grid, as Invertd restores).
POST_NOTED = {"SaveImage", "FillHoles", "RemoveSmallObjects",
               "LabelFilter", "EnsureType", "ToTensor", "CopyItems", "DeleteItems", "Lambda"}


def io_format(meta: dict) -> tuple[str, dict, dict]:
    fmt = meta.get("network_data_format") or {}
    inputs = fmt.get("inputs") or {}
    outputs = fmt.get("outputs") or {}
    in_key = next(iter(inputs), "image")
    in_spec = inputs.get(in_key) if isinstance(inputs.get(in_key), dict) else {}
    out_key = next(iter(outputs), "pred")
    out_spec = outputs.get(out_key) if isinstance(outputs.get(out_key), dict) else {}
    return in_key, in_spec, out_spec


def channel_names(spec: dict, count: int) -> list[str] | None:
    names = spec.get("channel_def")
    if not isinstance(names, dict):
        return None
    out = [str(names.get(str(i), names.get(i, ""))).strip() for i in range(count)]
    return out if all(out) else None


@dataclass
class Preprocessing:
    """What a bundle's preprocessing means on a card: normalisation and model space."""

    norm: dict[str, Any] = field(default_factory=lambda: {"mode": "none"})
    spacing: list[float] | None = None  # MONAI's (i, j, k) order
    orientation: str | None = None
    interpolation: str = "bilinear"


# Intensity transforms whose result on a resampled image equals the resampled result (no clip, no statistics):
# only these may come before Spacingd in a bundle without segflow's order (resample, then normalise) differing.
def _commutes_with_resampling(norm: dict[str, Any]) -> bool:
    return norm["mode"] in ("none", "scale", "zscore") and norm.get("clip") is None and not norm.get("nonzero")


def _image_key(transforms: list, in_key: str, notes: list[str]) -> str:
    """The key the preprocessing transforms call the image.  The metadata's input name is usually it; where no
    transform names it (metadata "img", transforms "image"), every transform was skipped as another input's and
    the bundle's normalisation was lost without a word (labels 42 % as the bundle's own)."""
    named = [set(keys) for keys in (transform_keys(t) for t, _ in transforms) if keys is not None]
    if not named or any(in_key in keys for keys in named):
        return in_key
    loaders = [set(transform_keys(t) or ()) for t, _ in transforms
               if base_name(short_name(t["_target_"])) == "LoadImage"]
    candidates = set.union(*loaders) if loaders else set()
    if len(candidates) == 1:
        key = candidates.pop()
        notes.append(f"the metadata names the input {in_key!r}, the preprocessing {key!r}: {key!r} is taken as the "
                     "image")
        return key
    raise ModelError(None, f"the metadata names the input {in_key!r}, which no preprocessing transform names (they "
                           f"name {', '.join(sorted(set.union(*named)))}); write the card yourself and pass --card")


def preprocessing(config: dict, in_key: str, channels: int, spatial_dims: int, notes: list[str],
                   evaluate: Any) -> Preprocessing:
    """Normalisation and model space from the preprocessing transforms, or a refusal."""
    transforms, problem = transform_list(config, "preprocessing")
    if problem:
        raise ModelError(None, f"{problem}; write the card yourself and pass --card")
    if not transforms:
        notes.append("the bundle has no literal preprocessing: the network receives the raw pixel values")
    in_key = _image_key(transforms, in_key, notes)
    out = Preprocessing()
    intensity: str | None = None
    for t, tid in transforms:
        name = short_name(t["_target_"])
        base = base_name(name)
        keys = transform_keys(t)
        if keys is not None and in_key not in keys:
            continue  # a transform of the labels or of other inputs
        args = Args(t, tid, evaluate)
        if base in NO_OPS:
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
            out.spacing = as_floats(args.get("pixdim"), spatial_dims, f"{name} pixdim")
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
        if base in RESIZES:
            shown = {k: v for k, v in t.items() if k not in ("_target_", "keys")}
            raise ModelError(None, f"{name}({', '.join(f'{k}={v!r}' for k, v in shown.items())}) resizes the image, "
                                   "which segflow does not do: the network would see it at another scale than the "
                                   "bundle feeds it (its labels differed in 64 % of a test volume's voxels); "
                                   "pass --card")
        if base in SPATIAL_NOTED:
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


def _percentiles(args: Args, name: str) -> dict[str, Any]:
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


def _scale_range(args: Args, name: str) -> dict[str, Any]:
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


def _normalize(args: Args, name: str, channels: int) -> dict[str, Any]:
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
    mean, std = as_floats(sub, n, f"{name} subtrahend"), as_floats(div, n, f"{name} divisor")
    std = [s if s != 0 else 1.0 for s in std]  # MONAI divides by 1 where the divisor is 0
    return {"mode": "zscore", "mean": mean, "std": std, "nonzero": nonzero}


def inferer(config: dict, in_spec: dict, spatial_dims: int, notes: list[str], evaluate: Any) -> dict[str, Any]:
    raw, ok = deref(config, config.get("inferer"))
    name = short_name(raw.get("_target_")) if isinstance(raw, dict) else None
    if name in ("SlidingWindowInferer", "SlidingWindowInfererAdapt"):
        args = Args(raw, "inferer", evaluate)
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
        pad, cval = args.get("padding_mode", "constant"), args.get("cval", 0.0)
        if pad not in PADDING_MODES:
            raise ModelError(None, f"{name} padding_mode {pad!r} is not one of MONAI's {', '.join(PADDING_MODES)}")
        if isinstance(cval, bool) or not isinstance(cval, (int, float)) or not math.isfinite(cval):
            raise ModelError(None, f"{name} cval {cval!r} is not a finite number; pass --card")
        return {"roi": roi, "overlap": float(overlap), "blend": mode, "sigma_scale": float(sigma),
                "batch_size": int(args.get("sw_batch_size", 1)), "blend_outputs": "logits",
                "padding": pad, "padding_value": float(cval)}
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


def postprocessing(config: dict, notes: list[str], classes: int) -> dict[str, Any]:
    """Inference settings from the postprocessing: how labels come back (Invertd) and KeepLargest..."""
    transforms, problem = transform_list(config, "postprocessing")
    out: dict[str, Any] = {}
    if problem:
        notes.append(f"postprocessing not read ({problem}); segflow takes the argmax of the softmax")
        return out
    argmax_done = softmax_done = inverted = False
    for t, _ in transforms:
        name = short_name(t["_target_"])
        base = base_name(name)
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
        elif base in POST_NOTED or base in NO_OPS:
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
