"""Model directories: ``card.json`` + ``weights.safetensors``, loaded without executing anything.

``load_model`` also accepts what users bring from elsewhere, each read safely:

- a segflow model directory: ``card.json`` + ``weights.safetensors`` (a registry
  architecture), or ``card.json`` + ``model.ts`` (a TorchScript network, card
  architecture ``torchscript``);
- a MONAI bundle directory (``configs/metadata.json``), mapped by
  :mod:`segmentation.bundle` without evaluating its configuration unless trusted;
- a TorchScript archive file carrying its card as the extra file ``card.json``.

Plain state_dict checkpoints (``.pt``/``.pth``/``.bin``) hold only tensors; they
need a card naming the architecture: :func:`convert_model` makes them a model
directory.  Every loaded model carries the sha256 of the weights file it was
built from, which provenance records.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from safetensors.torch import save_file
from torch import nn

from segmentation import models
from segmentation.card import ModelCard
from segmentation.checkpoint import CHECKPOINTS
from segmentation.formats import (TORCHSCRIPT_UNTRUSTED, ScriptedNetwork, averaged_weights_note, detect_format, fill,
                                  load_torchscript, read_state_dict, torch_load_safely, unwrap_state_dict)
from storage.errors import ModelError
from storage.hashing import sha256_file

CARD_FILE = "card.json"
WEIGHTS_FILE = "weights.safetensors"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")  # what a torch.save file is called
TRAINING_CURVE = "learning_curve.png"  # segmentation.trainreport.CURVE_FILE: written before a trained model's card
SCRIPT_FILE = "model.ts"  # the TorchScript form of a model directory
VALIDATION_TABLE = "validation.md"  # segmentation.trainreport.TABLE_FILE: a trained model's per-class scores
TORCHSCRIPT = "torchscript"  # card architecture.name of a TorchScript network


@dataclass
class LoadedModel:
    """A model turned into a ready network plus the identity provenance needs."""

    path: Path
    card: ModelCard
    module: nn.Module
    weights_sha256: str
    weights_path: Path | None = None  # the file weights_sha256 is the hash of
    source: str = "segflow"  # segflow | torchscript | monai-bundle
    _as_loaded: tuple = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._as_loaded = _state_signature(self.module)

    @property
    def name(self) -> str:
        return self.card.name

    def weights_changed(self) -> bool:
        """Whether the module's weights were changed since it was loaded (an in-place edit, a
        ``load_state_dict``, a new parameter): ``weights_sha256`` then no longer says what it computes."""
        return _state_signature(self.module) != self._as_loaded

    def __repr__(self) -> str:  # the dataclass's repr held the whole card (loss curve included) and network
        spec = self.card.input
        return (f"LoadedModel({self.card.name!r}, {self.card.architecture.name} {spec.spatial_dims}D, "
                f"{spec.channels} channel(s) -> {self.card.num_classes} classes, roi {self.card.inference.roi}, "
                f"weights sha256 {self.weights_sha256[:12]}, from {str(self.path)!r})")


def _state_signature(module: nn.Module) -> tuple:
    """Each parameter and buffer object with its in-place version counter: what any change of the weights
    changes, without reading them."""
    return tuple((name, id(t), _version(t)) for name, t in module.state_dict(keep_vars=True).items())


def _version(tensor: Any) -> int:
    """A tensor's in-place version counter; -1 for an inference tensor (made under ``torch.inference_mode``),
    which keeps none and can only be changed in place inside that mode."""
    try:
        return int(tensor._version)
    except RuntimeError:
        return -1


def read_card(path: str | PathLike[str]) -> ModelCard:
    """Validate ``card.json`` of a model directory (or a card file given directly)."""
    path = Path(path)
    card_path = path / CARD_FILE if path.is_dir() else path
    if not path.exists():
        raise ModelError(path, "no such model directory or card file")
    if not card_path.is_file():
        raise ModelError(path, f"no {CARD_FILE} (a model directory holds {CARD_FILE} and {WEIGHTS_FILE})")
    try:
        # a BOM (Windows Notepad's UTF-8) had read as "Invalid JSON: expected value at line 1 column 1"
        return ModelCard.model_validate_json(card_path.read_bytes().removeprefix(b"\xef\xbb\xbf"))
    except OSError as exc:
        raise ModelError(card_path, f"cannot read: {exc.strerror or exc}") from None
    except ValidationError as exc:
        raise ModelError(card_path, _first_error(exc)) from None


def _first_error(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "card"
    return f"invalid model card: {where}: {first['msg']}"


def build_module(card: ModelCard) -> nn.Module:
    return models.create(card.architecture.name, spatial_dims=card.input.spatial_dims,
                         in_channels=card.input.channels, out_channels=card.num_classes,
                         **card.architecture.kwargs)


def _pickle_hint(folder: Path) -> str:
    """What to do when the only weights beside the card are a pickle checkpoint ("" when there is none)."""
    pickles = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(CHECKPOINT_SUFFIXES))
    if not pickles:
        return ""
    return (f"; {pickles[0].name} is a pickle checkpoint, which segflow does not load (unpickling can run code): "
            f"make a model directory of it with `segflow model convert {pickles[0]} --card {folder / CARD_FILE} "
            "--out NEW_DIR`")


def load_model(path: str | PathLike[str], *, verify_hash: bool = True, trust_bundle: bool = False) -> LoadedModel:
    """A model directory, a MONAI bundle or a TorchScript archive with its card, ready to run.

    The weights' sha256 must equal the card's, and every tensor must match the
    network's parameter names and shapes: parts that do not belong together are
    refused rather than half-loaded.  A bundle is evaluated by MONAI only with
    ``trust_bundle=True``.
    """
    try:
        return _load_path(Path(path), verify_hash, trust_bundle)
    except PermissionError as exc:  # a card or weights file its owner made private (mode 0600): a traceback
        raise ModelError(Path(exc.filename or path), f"cannot read: {exc.strerror}") from None


def _load_path(path: Path, verify_hash: bool, trust_bundle: bool) -> LoadedModel:
    from segmentation import bundle, bundlenet

    if path.is_file():
        return _load_archive(path, trust_bundle)
    if not path.is_dir():
        raise ModelError(path, "no such model directory" if not path.exists() else
                         "is neither a model directory nor a weights file")
    if bundle.is_bundle(path) and not (path / CARD_FILE).is_file():
        mapping, module = bundlenet.load_bundle(path, trust_bundle=trust_bundle)
        return LoadedModel(path=path, card=mapping.card, module=module, weights_sha256=mapping.card.weights_sha256
                           or sha256_file(mapping.weights), weights_path=mapping.weights, source="monai-bundle")
    card = read_card(path)
    weights, script = path / WEIGHTS_FILE, path / SCRIPT_FILE
    if not weights.is_file() and script.is_file():
        return _load_script_dir(path, card, script, verify_hash, trust_bundle)
    if not weights.is_file():
        raise ModelError(path, f"no {WEIGHTS_FILE}{_pickle_hint(path)}")
    _check_architecture(path, card)
    digest = _checked_digest(weights, card, verify_hash)
    if detect_format(weights) != "safetensors":
        raise ModelError(weights, "not a safetensors file (convert other formats with `segflow model convert`)")
    try:
        network = build_module(card)
    except ModelError as exc:  # the registry's errors do not know which card asked
        raise ModelError(path / CARD_FILE, exc.problem) if exc.path is None else exc from None
    module = fill(network, read_state_dict(weights), weights, card.architecture.name)
    return LoadedModel(path=path, card=card, module=module, weights_sha256=digest, weights_path=weights)


def _check_architecture(path: Path, card: ModelCard) -> None:
    """An architecture the registry does not know is refused naming the card, before any weights are read."""
    name = card.architecture.name
    if name != TORCHSCRIPT and name not in models.names():
        raise ModelError(path / CARD_FILE, f"unknown architecture {name!r} (known: {', '.join(models.names())})")


def _checked_digest(weights: Path, card: ModelCard, verify_hash: bool) -> str:
    digest = sha256_file(weights)
    if verify_hash and card.weights_sha256 and digest != card.weights_sha256:
        raise ModelError(weights, f"sha256 {digest[:12]}… does not match the card's {card.weights_sha256[:12]}…")
    return digest


def _load_script_dir(path: Path, card: ModelCard, script: Path, verify_hash: bool, trusted: bool) -> LoadedModel:
    if card.architecture.name != TORCHSCRIPT:
        raise ModelError(path, f"the card names architecture {card.architecture.name!r} but the directory holds "
                               f"{SCRIPT_FILE}, not {WEIGHTS_FILE}")
    digest = _checked_digest(script, card, verify_hash)
    if detect_format(script) != "torchscript":
        raise ModelError(script, "not a TorchScript archive")
    module, _ = load_torchscript(script, trusted=trusted)
    return LoadedModel(path=path, card=card, module=_scripted(module, card, script), weights_sha256=digest,
                       weights_path=script, source="torchscript")


def _load_archive(path: Path, trusted: bool) -> LoadedModel:
    """A TorchScript archive that carries its card (``segflow model convert`` writes them that way)."""
    fmt = detect_format(path)
    if fmt != "torchscript":
        # "holds only tensors" was said of a pickled whole nn.Module too
        raise ModelError(path, f"a {fmt} file carries no card (which network, classes, input): make a model "
                               "directory with `segflow model convert SRC --card CARD.json --out DIR`")
    module, raw = load_torchscript(path, trusted=trusted)
    if raw is None:
        raise ModelError(path, "TorchScript archive has no embedded card.json: make a model directory with "
                               "`segflow model convert SRC --card CARD.json --out DIR`")
    try:
        card = ModelCard.model_validate(raw)
    except ValidationError as exc:
        raise ModelError(path, _first_error(exc)) from None
    digest = sha256_file(path)
    return LoadedModel(path=path, card=card, module=_scripted(module, card, path), weights_sha256=digest,
                       weights_path=path, source="torchscript")


def _scripted(module: nn.Module, card: ModelCard, path: Path) -> nn.Module:
    """The TorchScript network checked on one window, ready to travel to workers; one that ends in a softmax
    gives its probabilities as logits (:class:`segmentation.models.ProbabilitiesAsLogits`), never softmaxed twice."""
    probabilities = models.check_output(module, card, path)
    net = ScriptedNetwork(module)
    return (models.ProbabilitiesAsLogits(net) if probabilities else net).eval()


def check_model(path: str | PathLike[str], *, trust_bundle: bool = False) -> ModelCard:
    """The card of whatever ``load_model`` would load, without building the network (early CLI errors)."""
    try:
        return _check_path(Path(path), trust_bundle)
    except PermissionError as exc:
        raise ModelError(Path(exc.filename or path), f"cannot read: {exc.strerror}") from None


def _check_path(path: Path, trust_bundle: bool) -> ModelCard:
    from segmentation import bundle

    if path.is_file():
        return _load_archive(path, trust_bundle).card
    if path.is_dir() and bundle.is_bundle(path) and not (path / CARD_FILE).is_file():
        return bundle.read_bundle(path, trust_bundle=trust_bundle).card
    card = read_card(path)
    if path.is_dir():
        _check_architecture(path, card)
        script = path / SCRIPT_FILE
        if card.architecture.name == TORCHSCRIPT and not trust_bundle and not (path / WEIGHTS_FILE).is_file():
            raise ModelError(script, TORCHSCRIPT_UNTRUSTED)
    return card


def save_model(path: str | PathLike[str], card: ModelCard, module: nn.Module) -> LoadedModel:
    """Write weights then card (the card, naming the weights' hash, is the commit point); into a new, empty or
    model directory only (a folder of other things, a script's own, had got a card and weights among them)."""
    path = Path(path)
    check_model_out(path, checkpoints=True)
    path.mkdir(parents=True, exist_ok=True)
    # cloned: safetensors refuses tensors that share memory, and DynUNet reaches its blocks under two names
    state = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
    weights = path / WEIGHTS_FILE
    tmp = weights.with_suffix(".tmp")
    save_file(state, str(tmp))
    os.chmod(tmp, 0o644)  # safetensors and mkstemp write private files: other users could not load the model
    os.replace(tmp, weights)
    (path / SCRIPT_FILE).unlink(missing_ok=True)  # one weights file per directory
    digest = sha256_file(weights)
    card = card.model_copy(update={"weights_sha256": digest})
    _write_card(path, card)
    return LoadedModel(path=path, card=card, module=module.eval(), weights_sha256=digest, weights_path=weights)


def _write_card(path: Path, card: ModelCard) -> None:
    fd, tmp_card = tempfile.mkstemp(dir=path, suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        f.write(card.model_dump_json(indent=2))
    os.chmod(tmp_card, 0o644)
    os.replace(tmp_card, path / CARD_FILE)


def _save_script_dir(path: Path, card: ModelCard, archive: Path) -> LoadedModel:
    """card.json + model.ts, the archive copied byte for byte (its hash stays the source's).  The network is checked
    on one window before anything is written: a card whose classes or channels it did not fit (only known when it
    runs) had replaced a working model directory with that card and archive, and the error named the copy."""
    digest = sha256_file(archive)
    card = card.model_copy(update={"weights_sha256": digest,
                                   "architecture": card.architecture.model_copy(update={"name": TORCHSCRIPT})})
    module, _ = load_torchscript(archive, trusted=True)  # only reached with the archive trusted (it was loaded)
    network = _scripted(module, card, archive)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (SCRIPT_FILE + ".tmp")
    shutil.copyfile(archive, tmp)
    os.replace(tmp, path / SCRIPT_FILE)
    (path / WEIGHTS_FILE).unlink(missing_ok=True)
    _write_card(path, card)
    return LoadedModel(path=path, card=card, module=network, weights_sha256=digest, weights_path=path / SCRIPT_FILE,
                       source="torchscript")


def check_model_out(out: Path, *, checkpoints: bool = False) -> None:
    """Refuse to write a model directory over a file, or into a folder of other things (a dataset, a home
    folder): it may be empty, or a model directory (with ``checkpoints``, also an interrupted training run's)."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise ModelError(out, "exists and is not a directory; a model directory is written there")
    ours = (out / CARD_FILE).is_file() or (checkpoints and ((out / CHECKPOINTS).is_dir()
                                                            or (out / TRAINING_CURVE).is_file()))
    if not ours and any(out.iterdir()):
        raise ModelError(out, "is a folder of other files, not an empty or model directory; choose a new --out")
    # a card.json among a user's own files (a data folder with the card written for it) is no model directory:
    # training had written its weights and checkpoints there and replaced that card
    foreign = sorted(p.name for p in out.iterdir() if not _model_entry(p.name))
    if ours and foreign:
        raise ModelError(out, f"holds {foreign[0]!r} beside its {CARD_FILE}, which is no part of a model directory: "
                              "a model would be written among those files; choose a new --out")


MODEL_ENTRIES = frozenset({CARD_FILE, WEIGHTS_FILE, SCRIPT_FILE, TRAINING_CURVE, VALIDATION_TABLE, CHECKPOINTS})


def _model_entry(name: str) -> bool:
    """What segflow writes into a model directory, its temporary files while it writes, and hidden files."""
    return name in MODEL_ENTRIES or name.startswith(".") or name.endswith(".tmp")


def _check_replaceable(out: Path) -> None:
    """Converting again into a converted model's directory replaces it; a trained model's is refused: its
    weights would be lost, and its checkpoints and learning curve would stay beside another model's card."""
    if not (out / CARD_FILE).is_file():
        return
    try:
        training = json.loads((out / CARD_FILE).read_text(encoding="utf-8")).get("training")
    except (OSError, ValueError, AttributeError):
        training = None
    if not (isinstance(training, dict) and "converted_from" in training):
        raise ModelError(out, "holds a model segflow did not convert (trained, or written by hand); converting "
                              "into it would replace its weights: choose another --out, or remove it first")


def _with_source(card: ModelCard, src: Path, fmt: str) -> ModelCard:
    training = dict(card.training or {})
    training.setdefault("converted_from", {"format": fmt, "path": str(src.resolve()), "sha256": sha256_file(src)})
    return card.model_copy(update={"training": training})


def convert_model(src: str | PathLike[str], out: str | PathLike[str], *, card: ModelCard | None = None,
                  trust_bundle: bool = False, axes: str = "kji") -> tuple[LoadedModel, list[str]]:
    """Turn a bundle, a checkpoint or a TorchScript archive into a segflow model directory.

    Returns the reloaded model directory and the notes about what segflow does
    not apply.  A registry architecture (from the bundle's network_def or from
    ``card``) gives card + safetensors; a TorchScript network without one gives
    card + model.ts.  A network only a trusted bundle can build has no model
    directory form: run the bundle itself.

    ``axes`` is the order the weights' network was trained to see a window in:
    "kji", segflow's storage order (nnU-Net's, torchgeo's, ``segflow train``'s),
    or "ijk", MONAI's (x first).  With "ijk" the card is read as the training
    code has it (roi, spacing and per-axis architecture arguments x first), and
    the network is converted to segflow's order as a bundle's is: kernels
    permuted, checked on a random window.
    """
    if axes not in ("kji", "ijk"):
        raise ModelError(None, f"axes must be 'kji' (segflow's storage order) or 'ijk' (MONAI's), got {axes!r}")
    from segmentation import bundle, bundlenet

    src, out = Path(src), Path(out)
    if src.resolve() == out.resolve():
        raise ModelError(out, "the output directory must differ from the source")
    check_model_out(out)
    _check_replaceable(out)
    notes: list[str] = []
    if src.is_dir() and bundle.is_bundle(src) and not (src / CARD_FILE).is_file():
        mapping = bundle.read_bundle(src, trust_bundle=trust_bundle, card=card)
        arch = mapping.card.architecture.name
        if arch.startswith(bundle.BUNDLE_PREFIX) or arch == TORCHSCRIPT:
            what = "TorchScript only" if arch == TORCHSCRIPT else "built by MONAI from the trusted configuration"
            raise ModelError(src, f"the bundle's network ({mapping.target or 'models/model.ts'}) is {what}, not a "
                                  "segflow registry architecture, so no model directory can hold it; segment the "
                                  f"bundle itself: segflow segment --model {src}"
                                  + (" --trust-bundle" if arch != TORCHSCRIPT else " --trust-code"))
        new_card, module = bundlenet.in_segflow_order(mapping, bundlenet.build_network(mapping))
        save_model(out, new_card.model_copy(update={"weights_sha256": None}), module)
        return load_model(out), list(mapping.notes)
    if src.is_dir():
        already = "; it is already a segflow model directory" if (src / CARD_FILE).is_file() else ""
        # a card beside a pickle checkpoint is no model directory yet (inspect says so): say which file to convert
        hint = _pickle_hint(src) if already and not (src / WEIGHTS_FILE).is_file() else ""
        raise ModelError(src, "neither a MONAI bundle (configs/metadata.json) nor a weights file" + (hint or already))
    elif src.is_file():
        weights, fmt = src, detect_format(src)
        embedded = load_torchscript(src, trusted=trust_bundle)[1] if fmt == "torchscript" else None
        if card is None and embedded is not None:
            try:
                card = ModelCard.model_validate(embedded)
            except ValidationError as exc:
                raise ModelError(src, _first_error(exc)) from None
        if card is None:
            raise ModelError(src, f"a {fmt} file does not say which network it is: pass --card CARD.json naming "
                                  f"a registry architecture ({', '.join(models.names())})"
                             + (f" or {TORCHSCRIPT!r} to keep the TorchScript graph" if fmt == "torchscript" else ""))
        target = _with_source(card, src, fmt)
        arch = target.architecture.name
    else:
        raise ModelError(src, "no such file or directory")

    if arch == TORCHSCRIPT or arch not in models.names():
        if fmt != "torchscript":
            raise ModelError(src, f"architecture {arch!r} is not in segflow's registry "
                                  f"({', '.join(models.names())}); a {fmt} file needs one to be built from")
        if arch != TORCHSCRIPT:
            notes.append(f"architecture {arch!r} is not in the registry: the TorchScript graph is kept as is")
        return _save_script_dir(out, target, weights), notes
    try:
        network = build_module(target)
    except ModelError as exc:  # the registry's errors do not know which card asked ("unexpected keyword 'foo'")
        raise ModelError(exc.path or src, f"the card's architecture: {exc.problem}") from None
    checkpoint = torch_load_safely(weights) if fmt == "state_dict" else None  # read once: weights and the EMA note
    try:
        state = unwrap_state_dict(checkpoint, weights) if fmt == "state_dict" else \
            read_state_dict(weights, trusted=trust_bundle)
        module = fill(network, state, weights, arch)
    except ModelError as exc:
        if fmt == "torchscript" and exc.path is not None:
            raise ModelError(exc.path, f"{exc.problem}; the TorchScript module's parameters must match the "
                                       f"card's registry architecture (or give architecture {TORCHSCRIPT!r})") from None
        raise
    averaged = averaged_weights_note(checkpoint) if checkpoint is not None else None
    notes += [averaged] if averaged else []
    if axes == "ijk":  # trained on MONAI's view: as a bundle's network, its kernels go to segflow's order
        target, module = _from_monai_order(target, module, src, weights)
        notes.append("the weights were trained on windows x first (i, j, k): the card's roi, spacing and per-axis "
                     "arguments were reversed and the convolution kernels permuted to segflow's order (k, j, i)")
    save_model(out, target.model_copy(update={"weights_sha256": None}), module)
    return load_model(out), notes


def _from_monai_order(card: ModelCard, net: nn.Module, src: Path, weights: Path) -> tuple[ModelCard, nn.Module]:
    """A network trained on MONAI's (i, j, k) windows, as :func:`segmentation.bundlenet.in_segflow_order` converts a
    bundle's: the card's roi and spacing reversed, the per-axis arguments and kernels reversed there."""
    from types import SimpleNamespace

    from segmentation import bundlenet

    spec, inference = card.input, card.inference
    mirrored = card.model_copy(update={
        "inference": inference.model_copy(update={"roi": list(inference.roi)[::-1]}),
        "input": spec.model_copy(update={"spacing": None if spec.spacing is None else list(spec.spacing)[::-1]})})
    mapping = SimpleNamespace(path=src, card=mirrored, weights=weights)
    return bundlenet.in_segflow_order(mapping, net)  # type: ignore[arg-type]
