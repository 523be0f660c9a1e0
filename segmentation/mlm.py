"""The model card as a STAC Machine Learning Model (MLM) description, and a card made back from one.

MLM says most of what a card says, in its own words: the name and
architecture, the bands in order and the window (``mlm:input``: shape and
``value_scaling``), the classes (``mlm:output`` with ``classification:classes``),
the suggested batch size; the ground sample distance goes in the item's
``gsd``, as MLM has no field for it.  Normalisations that are an affine map
per band are written as MLM's own ``z-score`` (or ``scale``) objects, which
other tools apply; the rest (image statistics, percentiles, clipping,
``nonzero``) as one ``processing`` object of format
``segflow-normalization`` whose expression is the card's normalisation as
JSON (validated by pydantic when read back, never evaluated).  What MLM has no
field for at all (architecture keyword arguments, overlap, blending, flips,
band units, CRS and resampling, the card version) travels in
``mlm:hyperparameters["segflow"]``; a foreign item without it gets the card's
defaults.  Reading an item back, the MLM fields win: the segflow extras only
fill what MLM cannot say, and a normalisation kept there is used only when it
renders to exactly the item's ``value_scaling``.  Anything MLM can say that a
card cannot hold (clipping alone, another processing format, several inputs,
a window of variable size) is refused with one line.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pydantic import ValidationError

from segmentation.card import CARD_VERSION, ModelCard, Normalization
from storage.errors import ModelError

SEGFLOW_SCALING = "segflow-normalization"  # format of a processing value_scaling holding a card's normalisation
EXTRAS = "segflow"  # the mlm:hyperparameters key of what MLM has no field for
TASKS = {"semantic-segmentation", "segmentation"}
_BAND_DIMS = {"bands", "band", "channel", "channels"}
_SPATIAL = {2: ["height", "width"], 3: ["depth", "height", "width"]}
_MEDIA = {"safetensors": "application/octet-stream; application=safetensors",
          "state_dict": "application/octet-stream; framework=pytorch; profile=torch.save",
          "torchscript": "application/octet-stream; framework=pytorch; profile=torch.jit.save"}
_ARTIFACT = {"safetensors": "safetensors.torch.save_file", "state_dict": "torch.save", "torchscript": "torch.jit.save"}


# --- card -> MLM ---------------------------------------------------------------------------------------------

def value_scaling(norm: Normalization, channels: int) -> list[dict[str, Any]] | None:
    """The card's normalisation as MLM ``value_scaling`` objects (one, broadcast, or one per band)."""
    plain = norm.clip is None and not norm.nonzero
    if norm.mode == "none" and norm.clip is None:
        return None
    if norm.mode == "zscore" and plain:
        mean, std = _lists(norm.mean, norm.std)
        return [{"type": "z-score", "mean": m, "stddev": s} for m, s in zip(mean, std)]
    if norm.mode == "scale" and plain and not any(norm.offset or []):
        # MLM's scale divides: value = 1 / scale (exact for 1/255, 1e-4; otherwise within one ulp)
        return [{"type": "scale", "value": 1.0 / s} for s in (norm.scale or [])]
    if norm.mode == "scale" and plain:
        offset, scale = _lists(norm.offset, norm.scale)
        return [{"type": "z-score", "mean": o, "stddev": 1.0 / s} for o, s in zip(offset, scale)]
    return [{"type": "processing", "format": SEGFLOW_SCALING,
             "expression": norm.model_dump(mode="json", exclude_defaults=True)}]


def _lists(a: list[float] | None, b: list[float] | None) -> tuple[list[float], list[float]]:
    """Two per-channel lists of equal length (one of length 1 is broadcast)."""
    a, b = list(a or [0.0]), list(b or [1.0])
    n = max(len(a), len(b))
    return (a * n if len(a) == 1 else a), (b * n if len(b) == 1 else b)


def _extras(card: ModelCard) -> dict[str, Any]:
    """What MLM has no field for, in the card's own shape (defaults left out)."""
    inp = card.input.model_dump(mode="json", exclude_defaults=True,
                                exclude={"spatial_dims", "channels", "channel_names"})
    gsd = _gsd(card)
    if gsd is not None:
        inp.pop("spacing", None)
        inp.pop("spacing_unit", None)
    inf = card.inference.model_dump(mode="json", exclude_defaults=True, exclude={"roi", "batch_size"})
    extras: dict[str, Any] = {"card_version": card.card_version, "spatial_dims": card.input.spatial_dims,
                              "input": inp, "inference": inf}
    if card.architecture.kwargs:
        extras["architecture_kwargs"] = card.architecture.kwargs
    codes = {str(c.value): c.code for c in card.classes if c.code}
    if codes:
        extras["class_codes"] = codes
    return extras


def _gsd(card: ModelCard) -> float | None:
    """The model's ground sample distance (metres) when the card states one: MLM puts it in the item's gsd."""
    spacing = card.input.spacing
    if card.input.spatial_dims == 2 and spacing and card.input.spacing_unit == "m" and spacing[0] == spacing[1] > 0:
        return float(spacing[0])
    return None


def model_description(card: ModelCard, *, weights_sha256: str | None, accelerator: str = "cpu",
                      bands: list[str] | None = None) -> dict[str, Any]:
    """The model as the plain data ``storage.stac`` turns into MLM fields (output items and model items alike)."""
    return {
        "name": card.name, "architecture": card.architecture.name, "framework": "pytorch",
        "weights_sha256": weights_sha256, "roi": list(card.inference.roi),
        "bands": list(bands if bands is not None else card.input.channel_names),
        "channels": card.input.channels,
        "value_scaling": value_scaling(card.input.normalization, card.input.channels),
        "accelerator": accelerator, "batch_size": card.inference.batch_size,
        "hyperparameters": {EXTRAS: _extras(card)},
    }


def weights_asset(loaded: Any) -> dict[str, Any]:
    """The fields of a loaded model's weights as an MLM ``mlm:model`` asset: href (absolute), sha256, and where the
    file is here, its media type, artifact type and size."""
    from segmentation.formats import detect_format

    weights = Path(loaded.weights_path) if loaded.weights_path else None
    asset: dict[str, Any] = {"href": str(weights.resolve()) if weights else str(loaded.path),
                             "sha256": loaded.weights_sha256}
    if weights is not None and weights.is_file():
        fmt = detect_format(weights)
        asset.update(type=_MEDIA[fmt], artifact_type=_ARTIFACT[fmt], size=weights.stat().st_size)
    return asset


def model_item(loaded: Any) -> dict[str, Any]:
    """A loaded model (``segmentation.modeldir.LoadedModel``) as a STAC MLM item; the weights are its model asset."""
    from storage.stac import model_item as build_item

    card = loaded.card
    asset = weights_asset(loaded)
    weights = Path(loaded.weights_path) if loaded.weights_path else None
    when = None
    if weights is not None and weights.is_file():
        when = datetime.fromtimestamp(weights.stat().st_mtime, tz=timezone.utc).replace(microsecond=0)
    return build_item(item_id=_item_id(card.name), model=model_description(card, weights_sha256=loaded.weights_sha256),
                      classes=card.classes, gsd=_gsd(card), weights=asset, description=card.description or None,
                      datetime_=when)


def _item_id(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z._-]+", "-", name).strip("-") or "model"


# --- MLM -> card ---------------------------------------------------------------------------------------------

def card_from_item(item: dict[str, Any], where: str | Path) -> ModelCard:
    """A model card from an MLM item's properties; one ``ModelError`` line for what a card cannot hold."""
    from stac_model.schema import MLModelProperties

    from segmentation import models
    from storage.stac import class_name

    props = item.get("properties") if isinstance(item, dict) else None
    if not isinstance(props, dict) or "mlm:name" not in props:
        raise ModelError(where, "not a STAC item with the MLM extension (no properties.mlm:name)")
    try:
        mlm = MLModelProperties.model_validate(props)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ModelError(where, f"not a valid MLM item: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    if not TASKS & {str(t) for t in mlm.tasks}:
        raise ModelError(where, f"mlm:tasks {sorted(map(str, mlm.tasks))} has no semantic segmentation, the only "
                                "task segflow runs")
    if mlm.framework and mlm.framework.lower() not in ("pytorch", "torch"):
        raise ModelError(where, f"mlm:framework {mlm.framework!r}: segflow runs PyTorch models only")
    if len(mlm.input) != 1:
        raise ModelError(where, f"mlm:input lists {len(mlm.input)} inputs; a segflow model takes one image")
    (inp,) = mlm.input
    dims = [str(d).lower() for d in inp.input.dim_order]
    shape = list(inp.input.shape)
    spatial_dims = len(dims) - 2
    if spatial_dims not in _SPATIAL or dims[0] != "batch" or dims[1] not in _BAND_DIMS or \
            dims[2:] != _SPATIAL[spatial_dims]:
        raise ModelError(where, f"mlm:input dim_order {dims} is not [batch, bands, (depth,) height, width]")
    roi = shape[2:]
    if any(not float(r).is_integer() or r < 1 for r in roi):
        raise ModelError(where, f"mlm:input shape {shape} has no fixed window size (a card needs its roi)")
    bands = [b if isinstance(b, str) else b.name for b in (inp.bands or [])]
    channels = int(shape[1]) if shape[1] not in (-1, None) else len(bands)
    if channels < 1 or (bands and len(bands) != channels):
        raise ModelError(where, f"mlm:input names {len(bands)} bands but its shape has {shape[1]} channels")

    extras = (props.get("mlm:hyperparameters") or {}).get(EXTRAS) or {}
    if not isinstance(extras, dict):
        raise ModelError(where, f"mlm:hyperparameters.{EXTRAS} is not an object")
    if extras.get("spatial_dims", spatial_dims) != spatial_dims:
        raise ModelError(where, f"mlm:hyperparameters.{EXTRAS}.spatial_dims disagrees with mlm:input's dim_order")
    scaling = [s.model_dump(mode="json", exclude_none=True) if s is not None else None
               for s in (inp.value_scaling or [])]
    normalization = _normalization(scaling, channels, (extras.get("input") or {}).get("normalization"), where)

    outputs = [o for o in mlm.output if TASKS & {str(t) for t in o.tasks}]
    if len(outputs) != 1:
        raise ModelError(where, f"mlm:output has {len(outputs)} semantic segmentation outputs; segflow needs one")
    (output,) = outputs
    if not output.classes:
        raise ModelError(where, "mlm:output lists no classification:classes (a card names its classes)")
    codes = extras.get("class_codes") or {}
    classes = []
    for c in output.classes:
        sanitised = class_name(c.description, c.value) if c.description else None  # as stac_classes wrote it
        name = c.description if sanitised and c.name in (sanitised, f"{sanitised}_{c.value}") else c.name
        color = _color(getattr(c, "color_hint", None), where)
        classes.append({"value": c.value, "name": name, "color": color, "code": codes.get(str(c.value))})
    if [c["value"] for c in classes] != list(range(len(classes))):
        raise ModelError(where, "mlm:output classes must have the values 0..N-1 in order (they index the "
                                "network's outputs)")

    arch = _architecture(mlm.architecture, models.names())
    inp_extra = {k: v for k, v in (extras.get("input") or {}).items() if k != "normalization"}
    gsd = props.get("gsd")
    if gsd is not None:
        if spatial_dims != 2:
            raise ModelError(where, "gsd describes a raster model; this item's input is a volume")
        inp_extra.update(spacing=[float(gsd), float(gsd)], spacing_unit="m")
    raw = {
        "card_version": extras.get("card_version", CARD_VERSION),
        "name": mlm.name,
        "description": props.get("description") or "",
        "architecture": {"name": arch, "kwargs": extras.get("architecture_kwargs") or {}},
        "input": {**inp_extra, "spatial_dims": spatial_dims, "channels": channels, "channel_names": bands,
                  "normalization": normalization},
        "classes": [{k: v for k, v in c.items() if v is not None} for c in classes],
        "inference": {**(extras.get("inference") or {}), "roi": [int(r) for r in roi],
                      **({"batch_size": mlm.batch_size_suggestion} if mlm.batch_size_suggestion else {})},
    }
    try:
        return ModelCard.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"]) or "card"
        raise ModelError(where, f"the item does not make a valid model card: {loc}: {first['msg']}") from None


def _normalization(scaling: list[Any], channels: int, kept: Any, where: str | Path) -> dict[str, Any]:
    """MLM value_scaling as a card normalisation: affine per band, or segflow's own processing object."""
    if kept is not None:  # the card's own words, used only when they say exactly what the MLM fields say
        try:
            norm = Normalization.model_validate(kept)
        except ValidationError:
            norm = None
        if norm is not None and (value_scaling(norm, channels) or []) == scaling:
            return norm.model_dump(mode="json", exclude_defaults=True)
    if not scaling or all(s is None for s in scaling):
        return {"mode": "none"}
    if len(scaling) not in (1, channels):
        raise ModelError(where, f"mlm:input value_scaling has {len(scaling)} objects for {channels} bands "
                                "(one, or one per band)")
    kinds = {s.get("type") if s else None for s in scaling}
    if kinds == {"processing"} and len(scaling) == 1 and scaling[0].get("format") == SEGFLOW_SCALING:
        try:
            return Normalization.model_validate(scaling[0].get("expression")).model_dump(mode="json",
                                                                                         exclude_defaults=True)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise ModelError(where, f"value_scaling {SEGFLOW_SCALING}: {first['msg']}") from None
    shift, factor = [], []
    for s in scaling:
        kind = s.get("type") if s else None
        if kind is None:
            shift.append(0.0), factor.append(1.0)
        elif kind == "z-score" and float(s["stddev"]) > 0:
            shift.append(float(s["mean"])), factor.append(1.0 / float(s["stddev"]))
        elif kind == "min-max" and float(s["maximum"]) > float(s["minimum"]):
            shift.append(float(s["minimum"])), factor.append(1.0 / (float(s["maximum"]) - float(s["minimum"])))
        elif kind == "offset":
            shift.append(float(s["value"])), factor.append(1.0)
        elif kind == "scale" and float(s["value"]) != 0:
            shift.append(0.0), factor.append(1.0 / float(s["value"]))
        else:
            what = f"{kind} ({s.get('format')})" if kind == "processing" else kind
            raise ModelError(where, f"mlm:input value_scaling {what!r} has no segflow normalisation (segflow "
                                    "applies z-score, min-max, offset and scale per band, or its own "
                                    f"{SEGFLOW_SCALING})")
    if kinds == {"z-score"}:
        return {"mode": "zscore", "mean": [float(s["mean"]) for s in scaling],
                "std": [float(s["stddev"]) for s in scaling]}
    return {"mode": "scale", "offset": shift, "scale": factor}


def _color(hint: Any, where: str | Path) -> tuple[int, int, int]:
    if not hint:
        return (128, 128, 128)
    if not re.fullmatch(r"[0-9A-Fa-f]{6}", str(hint)):
        raise ModelError(where, f"class color_hint {hint!r} is not RRGGBB")
    return tuple(int(str(hint)[i:i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]


def _architecture(name: str, known: list[str]) -> str:
    """The registry name MLM's architecture means (U-Net, UNet -> unet; DeepLabV3+ -> deeplabv3plus), else as is."""
    key = re.sub(r"[^0-9a-z]", "", name.lower().replace("+", "plus"))
    return next((k for k in known if re.sub(r"[^0-9a-z]", "", k) == key), name)


# --- the item's weights --------------------------------------------------------------------------------------

def model_asset(item: dict[str, Any], item_path: Path) -> tuple[Path, str | None]:
    """The local weights file of the item's ``mlm:model`` asset and its expected sha256, if the item gives one."""
    assets = item.get("assets") or {}
    found = [a for a in assets.values() if isinstance(a, dict) and "mlm:model" in (a.get("roles") or [])]
    if len(found) != 1:
        raise ModelError(item_path, f"the item has {len(found)} assets with the role mlm:model; segflow needs one")
    href = str(found[0].get("href") or "")
    parsed = urlparse(href)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):  # file://host/path named another machine; it read the local path
            raise ModelError(item_path, f"the model asset {href!r} names a file on host {parsed.netloc!r}; copy it "
                                        "here and point the asset's href at the copy")
        path = Path(unquote(parsed.path))
    elif parsed.scheme and len(parsed.scheme) > 1:  # a URL (a one-letter scheme is a Windows drive)
        raise ModelError(item_path, f"the model asset {href!r} is not a local file; download it and point the "
                                    "asset's href at the copy")
    else:
        path = Path(href) if os.path.isabs(href) else item_path.parent / href
    if not path.is_file():
        raise ModelError(item_path, f"the model asset {href!r} is not a file ({path})")
    checksum = str(found[0].get("file:checksum") or "")
    expected = checksum[4:].lower() if checksum.startswith("1220") and len(checksum) == 68 else None
    return path, expected or (item.get("properties") or {}).get("segflow:weights_sha256")


def convert_item(item_path: str | os.PathLike[str], out: str | os.PathLike[str], *,
                 trust_bundle: bool = False) -> tuple[Any, list[str]]:
    """``segflow model convert item.json``: a model directory from an MLM item whose weights segflow reads (a
    TorchScript asset only with ``trust_bundle``: it is code)."""
    from segmentation import models
    from segmentation.formats import detect_format
    from segmentation.modeldir import convert_model
    from storage.hashing import sha256_file

    item_path = Path(item_path)
    try:
        item = json.loads(item_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelError(item_path, f"not a readable JSON STAC item ({str(exc).splitlines()[0][:120]})") from None
    card = card_from_item(item, item_path)
    from segmentation.bundle import AXES_NOTE

    if AXES_NOTE in (card.description or ""):  # `model inspect --stac BUNDLE`: the weights are the bundle's own
        raise ModelError(item_path, "describes a MONAI bundle's network, whose weights are in MONAI's axis order "
                                    "(i, j, k); converted from here they ran on transposed windows (labels 46 % as "
                                    "the bundle's): convert the bundle itself (`segflow model convert BUNDLE_DIR`), "
                                    "which permutes its kernels")
    weights, expected = model_asset(item, item_path)
    if card.architecture.name not in models.names() and detect_format(weights) != "torchscript":
        raise ModelError(item_path, f"mlm:architecture {card.architecture.name!r} is not in segflow's registry "
                                    f"({', '.join(models.names())}), and only a TorchScript model asset runs "
                                    "without one")
    if expected:
        digest = sha256_file(weights)
        if digest != expected:
            raise ModelError(weights, f"sha256 {digest[:12]}… does not match the item's {expected[:12]}…")
    return convert_model(weights, out, card=card, trust_bundle=trust_bundle)


def looks_like_item(path: Path) -> bool:
    """Whether ``path`` is a JSON file holding a STAC Item (what `model convert` treats as an MLM item)."""
    if not path.is_file() or path.suffix.lower() != ".json":
        return False
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(raw, dict) and raw.get("type") == "Feature"


__all__ = ["SEGFLOW_SCALING", "card_from_item", "convert_item", "looks_like_item", "model_asset",
           "model_description", "model_item", "value_scaling"]
