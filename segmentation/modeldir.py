"""Model directories: ``card.json`` + ``weights.safetensors``, loaded without executing anything."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from segmentation import models
from segmentation.card import ModelCard
from storage.errors import ModelError
from storage.hashing import sha256_file

CARD_FILE = "card.json"
WEIGHTS_FILE = "weights.safetensors"


@dataclass
class LoadedModel:
    """A model directory turned into a ready network plus the identity provenance needs."""

    path: Path
    card: ModelCard
    module: nn.Module
    weights_sha256: str

    @property
    def name(self) -> str:
        return self.card.name


def read_card(path: str | PathLike[str]) -> ModelCard:
    """Validate ``card.json`` of a model directory (or a card file given directly)."""
    path = Path(path)
    card_path = path / CARD_FILE if path.is_dir() else path
    if not card_path.is_file():
        raise ModelError(path, f"no {CARD_FILE} (a model directory holds {CARD_FILE} and {WEIGHTS_FILE})")
    try:
        return ModelCard.model_validate_json(card_path.read_bytes())
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "card"
        raise ModelError(card_path, f"invalid model card: {where}: {first['msg']}") from None


def build_module(card: ModelCard) -> nn.Module:
    return models.create(card.architecture.name, spatial_dims=card.input.spatial_dims,
                         in_channels=card.input.channels, out_channels=card.num_classes,
                         **card.architecture.kwargs)


def load_model(path: str | PathLike[str], *, verify_hash: bool = True) -> LoadedModel:
    """Build the card's architecture from the registry and fill it from safetensors.

    The weights' sha256 must equal the card's, and every tensor must match the
    network's parameter names and shapes: a directory whose parts do not belong
    together is refused rather than half-loaded.
    """
    path = Path(path)
    if not path.is_dir():
        raise ModelError(path, "model path is not a directory")
    card = read_card(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelError(path, f"no {WEIGHTS_FILE}")
    digest = sha256_file(weights)
    if verify_hash and card.weights_sha256 and digest != card.weights_sha256:
        raise ModelError(weights, f"sha256 {digest[:12]}… does not match the card's {card.weights_sha256[:12]}…")
    module = build_module(card)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(weights, f"not a readable safetensors file ({exc})") from None
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelError(weights, f"weights do not fit architecture {card.architecture.name!r}: "
                                  f"{len(missing)} missing, {len(unexpected)} unexpected tensors"
                                  + (f" (e.g. {(missing or unexpected)[0]})"))
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ModelError(weights, f"tensor {key} has shape {tuple(tensor.shape)}, "
                                      f"architecture expects {tuple(expected[key].shape)}")
    module.load_state_dict(state)
    module.eval()
    return LoadedModel(path=path, card=card, module=module, weights_sha256=digest)


def save_model(path: str | PathLike[str], card: ModelCard, module: nn.Module) -> LoadedModel:
    """Write weights then card (the card, naming the weights' hash, is the commit point)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    weights = path / WEIGHTS_FILE
    tmp = weights.with_suffix(".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, weights)
    digest = sha256_file(weights)
    card = card.model_copy(update={"weights_sha256": digest})
    fd, tmp_card = tempfile.mkstemp(dir=path, suffix=".json.tmp")
    with os.fdopen(fd, "w") as f:
        f.write(card.model_dump_json(indent=2))
    os.replace(tmp_card, path / CARD_FILE)
    return LoadedModel(path=path, card=card, module=module.eval(), weights_sha256=digest)


