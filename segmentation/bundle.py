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
- preprocessing, inferer and postprocessing: mapped onto the card's model
  space, normalisation, window settings, label inversion and connected-component
  clean-up by :mod:`segmentation.bundletransforms`, or refused when segflow
  cannot reproduce them exactly (the configuration is read as data by
  :mod:`segmentation.bundleconfig`).

Axis order: MONAI's readers index images x first ((i, j, k) of a NIfTI,
(x, y) of a 2-D image); segflow arrays are in storage order ((k, j, i),
(row, col)).  The card's roi and spacing are therefore the bundle's reversed,
a loaded bundle's network is wrapped in :class:`segmentation.bundlenet.ReversedAxes` (it sees every
window exactly as MONAI would give it), and a converted model directory has
its convolution kernels permuted instead (:func:`segmentation.bundlenet.in_segflow_order`, checked
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
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from segmentation import models
from segmentation.card import Architecture, ModelCard
from segmentation.formats import WeightFormat, detect_format
from segmentation.bundleconfig import TRUST_HINT, deref, first_expression, jsonable, read_config, short_name
from segmentation.bundletransforms import channel_names, inferer, io_format, postprocessing, preprocessing
from storage.errors import ModelError
from storage.hashing import sha256_file

META_FILE = Path("configs") / "metadata.json"
CONFIG_FILES = ("inference.json", "inference.yaml", "inference.yml")
STATE_FILE = Path("models") / "model.pt"
SCRIPT_FILE = Path("models") / "model.ts"
BUNDLE_PREFIX = "bundle:"  # architecture.name of a network instantiated from a trusted bundle
TORCHSCRIPT = "torchscript"  # architecture.name of a network that is a TorchScript archive

# network_def targets the registry can build: MONAI class name -> registry name (MONAI's aliases such as
# "Unet" or "BasicUnet" differ only in case)
_CANONICAL = {"UNet": "unet", "BasicUNet": "basic_unet", "SegResNet": "segresnet", "DynUNet": "dynunet"}
_BY_LOWER = {cls.lower(): cls for cls in _CANONICAL}
_IO_SHAPED = ("spatial_dims", "dimensions", "in_channels", "out_channels")

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
    allow_code: bool = False  # trust_bundle was given: models/model.ts may be loaded (TorchScript is code)
    notes: list[str] = field(default_factory=list)


def is_bundle(path: str | PathLike[str]) -> bool:
    return (Path(path) / META_FILE).is_file()


def config_file(path: Path) -> Path:
    for name in CONFIG_FILES:
        if (path / "configs" / name).is_file():
            return path / "configs" / name
    raise ModelError(path, "MONAI bundle has no configs/inference.json (or .yaml)")



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
    raw, _ = deref(config, raw)
    if raw is None:
        raw, _ = deref(config, config.get("network"))
    if not isinstance(raw, dict) or "_target_" not in raw:
        return None
    target = str(raw["_target_"])
    args = {k: v for k, v in raw.items() if not k.startswith("_")}

    def literal_int(name: str) -> int | None:
        value = args.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    dims = literal_int("spatial_dims") or literal_int("dimensions")
    net = _Network(target, None, {}, dims, literal_int("in_channels"), literal_int("out_channels"), None)
    short = short_name(target)
    monai_cls = _BY_LOWER.get(short.lower()) if (target == short or target.startswith("monai.networks.nets")) else None
    name = _CANONICAL.get(monai_cls) if monai_cls else None
    if name is None or name not in models.names():
        known = sorted({cls for cls, reg in _CANONICAL.items() if reg in models.names()})
        net.problem = f"network_def target {target!r} is not an architecture segflow's registry builds " \
                      f"(known: {', '.join(known)})"
        return net
    for key, value in args.items():
        if (bad := first_expression(value)) is not None:
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
                kwargs[pname] = jsonable(p.default)
            except TypeError:
                return f"cannot record MONAI's default for {monai_name} argument {pname!r}"
    return None


# --- the mapping -----------------------------------------------------------------------------------------------

AXES_NOTE = ("MONAI indexes arrays x first (i, j, k), segflow in storage order (k, j, i): the card's roi and spacing "
             "are the bundle's reversed, and the network sees each window with its spatial axes reversed")

CONVERTED_NOTE = ("MONAI indexes arrays x first (i, j, k), segflow in storage order (k, j, i): the card's roi and "
                  "spacing are the bundle's reversed, and the convolution kernels were permuted to match")


def config_parser(path: Path, config_path: Path) -> Any:
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
    meta = read_config(path / META_FILE)
    cfg_path = config_file(path)
    config = read_config(cfg_path)
    if not isinstance(meta, dict) or not isinstance(config, dict):
        raise ModelError(path, "bundle metadata and configuration must be JSON/YAML objects")
    notes: list[str] = []
    parser = config_parser(path, cfg_path) if trust_bundle else None
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
                         target=target, trusted=trusted, notes=notes, allow_code=trust_bundle)


def _check_io(card: ModelCard, net: _Network | None, path: Path) -> None:
    if net and net.spatial_dims is not None and net.spatial_dims != card.input.spatial_dims:
        raise ModelError(path, f"the card is {card.input.spatial_dims}D, network_def {net.spatial_dims}D")
    if net and net.in_channels is not None and net.in_channels != card.input.channels:
        raise ModelError(path, f"the card says {card.input.channels} input channels, network_def {net.in_channels}")
    if net and net.out_channels is not None and net.out_channels != card.num_classes:
        raise ModelError(path, f"the card has {card.num_classes} classes, network_def {net.out_channels} outputs")


def _describe(meta: dict, notes: list[str]) -> str:
    """The bundle's description, then what segflow does not apply, then how it reads the axes (which it does
    apply: listed among the steps not applied, it read as if the labels came out transposed)."""
    description = " ".join(str(meta.get("description", "")).split())
    skipped = [n for n in notes if n != AXES_NOTE]
    if skipped:
        description = (description + " " if description else "") + "Not applied by segflow: " + "; ".join(skipped) + "."
    if AXES_NOTE in notes:
        description = (description + " " if description else "") + "Axes: " + AXES_NOTE + "."
    return description


def _map_card(path: Path, meta: dict, config: dict, net: _Network | None, arch: dict[str, Any], digest: str,
              source: dict[str, Any], notes: list[str], evaluate: Any) -> ModelCard:
    in_key, in_spec, out_spec = io_format(meta)
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
    pre = preprocessing(config, in_key, channels, spatial_dims, notes, evaluate)
    spacing = pre.spacing
    inference = inferer(config, in_spec, spatial_dims, notes, evaluate)
    inference["roi"] = inference["roi"][::-1]  # MONAI's (i, j, k) -> segflow's (k, j, i)
    inference.update(postprocessing(config, notes, classes))
    if pre.interpolation == "nearest" and inference.get("invert") == "probabilities":
        # Invertd(nearest_interp=False) undoes Spacingd with its own mode: probabilities by nearest neighbour,
        # whose argmax is the labels' by nearest neighbour (segflow had brought them back bilinearly: 82 % agreed)
        inference["invert"] = "labels"
    class_names = channel_names(out_spec, classes)
    if class_names is None:
        if isinstance(out_spec.get("channel_def"), dict):  # every name had been replaced without a word
            notes.append(f"metadata's output channel_def does not name each of the network's {classes} output "
                         f"channels 0..{classes - 1}: the classes are called class0..class{classes - 1}")
        class_names = [f"class{i}" for i in range(classes)]
    card = {
        "name": str(meta.get("name") or path.name),
        "architecture": arch,
        "input": {"spatial_dims": spatial_dims, "channels": channels,
                  "channel_names": channel_names(in_spec, channels) or [], "normalization": pre.norm,
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
