"""Which model segments which input, and whether an input fits a model, from the input's header.

A card fits an input when its ``input.spatial_dims`` equals the input's (2 for
a GeoTIFF/VRT raster, 3 for a NIfTI volume or a DICOM series) and the channels
the network would get number its ``input.channels``.  For a raster those are
chosen as the pipeline chooses them (:func:`chosen_bands`): ``--bands`` when
given; else, when the card names its channels and the file names its bands,
those names looked up among the file's (a 13-band Sentinel-2 file fits a card
naming B02,B03,B04,B08); else every image band (alpha excluded).  A volume's
channels are its 4-D NIfTI's fourth axis, always 1 for a DICOM series.  A
volume one slice thick (I x J x 1, as nnU-Net keeps 2-D images) also fits a
2-D card (:func:`one_slice`).  No
other card field is used: a model trained on another resolution or dtype still
fits (where its card names a spacing, the pipeline resamples onto the model's
grid and back).

``segflow nightly`` routes each input to the first model that fits, in the
order given.  A STAC item has no one header: which assets it gives depends on
the bands a model names, so it fits the first 2-D model whose bands it offers
(:func:`route_item`: the item read and those assets opened, as ingest would).  ``segflow segment`` checks every input against its one model
before it starts a cluster (:func:`flows.batch.check_inputs`), so a wrong band
count is one line within a second, not after the cluster and Prefect started.
That check must not import torch (2 s, which the cluster's start otherwise
overlaps), so it reads what it needs of a model directory's ``card.json``
directly (:func:`peek`); bundles and TorchScript archives are read through
their full check.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from storage import jsontext
from storage.bands import GREY, SENTINEL2_ORDER, BandRequest, aliases, select_bands, sentinel2_numbers
from storage.errors import IncompatibleInputError
from storage.header import Header

RASTER_CARD_VERSION = 4  # segmentation.card.RASTER_MODEL_SPACE_VERSION (not imported: routing runs before torch)

if TYPE_CHECKING:
    from flows.config import SegmentOptions
    from segmentation import LoadedModel
    from segmentation.card import ModelCard

CARD_FILE = "card.json"  # segmentation.modeldir.CARD_FILE, named here so that peeking imports no torch
BANDS_HINT = "choose them with --bands (names or 1-based indices)"


@dataclass(frozen=True)
class ModelInput:
    """What a card says its network takes, as far as an input's header can be checked against it."""

    name: str
    spatial_dims: int
    channels: int
    channel_names: tuple[str, ...] = ()
    metres: bool = False  # ModelCard.in_metres: a scan's slice is no input for it

    @classmethod
    def of(cls, card: "ModelCard") -> "ModelInput":
        spec = card.input
        return cls(card.name, spec.spatial_dims, spec.channels, tuple(spec.channel_names), metres=card.in_metres)

    def describe(self) -> str:
        return f"{self.name} ({self.spatial_dims}D, {self.channels} channel{'s' * (self.channels != 1)})"


def peek(path: str | Path) -> ModelInput | None:
    """A model directory's input from its ``card.json``, without importing torch; None when there is none to
    read that way (a bundle, an archive) or it is not valid: the full check (:func:`model_input`) says why."""
    card = Path(path) / CARD_FILE
    try:
        data = jsontext.read(card)
        spec = data["input"]
        # as ModelCard.in_metres says, without importing the card (pydantic, torch)
        metres = int(spec["spatial_dims"]) == 2 and (spec.get("units") is not None or (
            int(data.get("card_version", RASTER_CARD_VERSION)) >= RASTER_CARD_VERSION
            and (spec.get("spacing") is not None or spec.get("crs") is not None)))
        found = ModelInput(str(data["name"]), int(spec["spatial_dims"]), int(spec["channels"]),
                           tuple(str(n) for n in spec.get("channel_names") or ()), metres=metres)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if found.spatial_dims not in (2, 3) or found.channels < 1 or \
            (found.channel_names and len(found.channel_names) != found.channels):
        return None
    return found


def model_input(path: str | Path, *, trust_bundle: bool = False) -> ModelInput:
    """The input of whatever model ``path`` is: peeked when it can be, else from its full card check (which
    raises ``ModelError`` for a bad model)."""
    found = peek(path)
    if found is not None:
        return found
    from segmentation.modeldir import check_model

    return ModelInput.of(check_model(path, trust_bundle=trust_bundle))


def chosen_bands(offered: Sequence[str], names_bands: bool, option: Sequence[str] | None,
                 channel_names: Sequence[str], model: str, channels: int | None = None) -> list[int] | None:
    """0-based indexes of the bands a network gets, in its order; None: every band, as stored.

    ``option`` (``--bands``) wins; otherwise a card's ``channel_names`` are
    looked up among the input's band names when the input names its bands,
    except that an input with as many bands as the card, named differently
    throughout, is taken as it is (the positional contract from before bands
    had names).  Refusals are ``IncompatibleInputError`` without a path, listing
    what the input offers.  ``model``: how messages name it (``model 'x'``).
    """
    if option is not None:
        return select_bands(list(option), list(offered), model=model)
    if list(offered) == [GREY] and channels == 3:  # a grey picture for a network that learnt pictures as RGB:
        return [0, 0, 0]  # the grey repeated, as training decoded it (storage.datasets.pictures.read_rgb)
    if not channel_names or not names_bands:
        return None
    if len(offered) == len(channel_names) and not _any_match(channel_names, offered):
        return None
    return select_bands(list(channel_names), list(offered), model=model, hint=BANDS_HINT)


def _any_match(wanted: Sequence[str], offered: Sequence[str]) -> bool:
    names = {n.lower() for o in offered for n in aliases(o)}
    return any(n.lower() in names for w in wanted for n in aliases(w))


def band_request(card: "ModelCard", options: "SegmentOptions") -> BandRequest:
    """The bands a STAC item's assets must give a model: ``--bands``, else the card's channel names."""
    spec = card.input
    return BandRequest.of(options.bands, spec.channel_names, spec.channels, f"model {card.name!r}",
                          resampling=spec.resampling)


def one_slice(header: Header, model: ModelInput) -> bool:
    """A volume one slice thick (I x J x 1: nnU-Net's 2-D images in NIfTI) fits a 2D model not in metres: it
    segments the slice's plane (:mod:`segmentation.oneslice`)."""
    return model.spatial_dims == 2 and not model.metres and header.kind == "volume" and len(header.shape) == 3 \
        and header.shape[2] == 1


def thick_volume_problem(model: str, shape_ijk: Sequence[int]) -> str:
    """Why a 2D model does not take a volume of several slices (routing's line, and the Python API's)."""
    return (f"model {model!r} is 2D, the input is 3D ({' x '.join(map(str, shape_ijk))} voxels; a 2D model takes "
            "volumes one slice thick in k, I x J x 1)")


def fit_problem(header: Header, model: ModelInput, bands: Sequence[str] | None = None) -> str | None:
    """Why the input of ``header`` does not fit ``model`` (one line, without the path), or None when it does."""
    name = f"model {model.name!r}"
    if header.spatial_dims != model.spatial_dims and not one_slice(header, model):
        if model.spatial_dims == 2 and header.kind == "volume" and model.metres:
            return f"{name} is a raster model in metres (its card's spacing, crs or units), the input is a scan"
        if model.spatial_dims == 2 and header.kind == "volume":
            return thick_volume_problem(model.name, header.shape)
        return f"{name} is {model.spatial_dims}D, the input is {header.spatial_dims}D"
    count = header.channels
    if header.kind == "raster":
        try:
            picked = chosen_bands(header.channel_names, header.names_bands, bands, model.channel_names, name,
                                  model.channels)
        except IncompatibleInputError as exc:
            return exc.problem
        count = len(picked) if picked is not None else count
    elif bands is not None:  # a volume's channels have no header names: --bands is checked at ingest
        return None
    if count != model.channels:
        if bands is not None and header.kind == "raster":
            return (f"{name} takes {model.channels} channels, --bands chose {count} "
                    f"(the input has {header.channels})")
        if header.kind == "raster" and count > model.channels:  # a 13-band scene with no band names
            wanted = f" ({', '.join(model.channel_names)})" if model.channel_names else ""
            # "e.g. --bands 1,2,3,4" had been offered, which feeds a Sentinel-2 file's coastal band as blue
            s2 = sentinel2_numbers(model.channel_names) if count == len(SENTINEL2_ORDER) else None
            example = (f"; a Sentinel-2 file of its 13 bands in their usual order ({', '.join(SENTINEL2_ORDER)}) "
                       f"takes --bands {','.join(map(str, s2))}") if s2 else ""
            return (f"{name} takes {_channels(model.channels)}{wanted}, the input has {count}: choose them with "
                    f"--bands, the file's band numbers (1 for its first) in the model's order{example}")
        if header.kind == "raster" and count < model.channels and header.case is None:  # bands in other files?
            wanted = f" ({', '.join(model.channel_names)})" if model.channel_names else ""
            return (f"{name} takes {_channels(model.channels)}{wanted}, the input has {count}: give one raster, VRT "
                    "or STAC item that holds them all (bands in separate files: docs/satellite.md)")
        if header.case is not None:  # a case's nnU-Net channel files (storage.channelfiles)
            stem = header.case
            given = f"{count} nnU-Net channel files of one case ({stem}_0000 ... {stem}_{count - 1:04d})"
            if count > model.channels:
                advice = "give each file alone" if model.channels == 1 else \
                    f"give the {model.channels} files it takes, or use a model that takes {count}"
                return f"{name} takes {_channels(model.channels)}, the input is {given}: {advice}"
            missing = [f"{stem}_{c:04d}" for c in range(count, model.channels)]
            return (f"{name} takes {_channels(model.channels)}, the input is {given}: {', '.join(missing)} "
                    f"{'is' if len(missing) == 1 else 'are'} not among the files given")
        if header.kind == "volume" and count > 1:  # a 4-D NIfTI: its 4th axis (often time) is read as channels
            return (f"{name} takes {_channels(model.channels)}, the input has {count} (its 4th axis, read as "
                    "channels; a time series goes in one volume at a time)")
        channel_file = re.search(r"^(.*)_(\d{4})\.nii(\.gz)?$", Path(header.path).name)
        if header.kind == "volume" and count == 1 and channel_file:  # nnU-Net's one file per channel
            case = channel_file.group(1)
            return (f"{name} takes {_channels(model.channels)}, the input has 1: give all of the case's nnU-Net "
                    f"channel files together ({case}_0000 ... {case}_{model.channels - 1:04d}), which are then one "
                    "input, or one 4-D NIfTI with the channels on its 4th axis")
        return f"{name} takes {_channels(model.channels)}, the input has {count}"
    return None


def _channels(n: int) -> str:
    return f"{n} channel" if n == 1 else f"{n} channels"


@dataclass(frozen=True)
class ModelEntry:
    """A candidate model: where it is and what its card promises."""

    path: str
    card: "ModelCard"

    @property
    def spatial_dims(self) -> int:
        return self.card.input.spatial_dims

    @property
    def channels(self) -> int:
        return self.card.input.channels

    @property
    def input(self) -> ModelInput:
        return ModelInput.of(self.card)

    def fits(self, header: Header) -> bool:
        return fit_problem(header, self.input) is None

    def describe(self) -> str:
        return self.input.describe()


@dataclass(frozen=True)
class ItemRoute:
    """Where a STAC item goes: the model, the header of the stack it would get and what keys its content
    (:func:`storage.stacitem.content_sha256`); or, with no model, why none fits."""

    entry: "ModelEntry | None"
    header: Header | None = None
    sha256: str | None = None
    reason: str | None = None


def route_item(path: str | Path, models: "list[ModelEntry]", options: "SegmentOptions",
               origin: str | None = None, *, shown: str | None = None) -> ItemRoute:
    """The first 2-D model whose bands the item at ``path`` offers (``--bands`` for every model when given).

    An item that is not one, or an asset that does not open, raises (the
    input fails); a model whose bands it lacks is passed over.  ``origin``:
    the URL ``path`` was downloaded from; ``shown``: how the reason names the input.
    """
    from storage.stacitem import probe_item

    problems = []
    for m in models:
        if m.spatial_dims != 2:
            problems.append(f"model {m.card.name!r} is {m.spatial_dims}D, a STAC item's bands are 2D")
            continue
        try:
            header, sha256 = probe_item(path, band_request(m.card, options), origin)
        except IncompatibleInputError as exc:
            problems.append(exc.problem)
            continue
        if header.channels != m.channels:
            problems.append(f"model {m.card.name!r} takes {m.channels} channels, --bands picks {header.channels}")
            continue
        return ItemRoute(m, header, sha256)
    return ItemRoute(None, reason=f"{shown or path}: no model fits this STAC item; " + "; ".join(problems))


def read_models(paths: list[str], *, trust_bundle: bool = False) -> list[ModelEntry]:
    """The cards of the given model directories (validated, nothing built yet); a bad one raises ModelError."""
    from segmentation.modeldir import check_model

    return [ModelEntry(str(Path(p).expanduser().absolute()), check_model(p, trust_bundle=trust_bundle))
            for p in paths]


def route(header: Header, models: list[ModelEntry]) -> ModelEntry | None:
    """The first model that fits ``header``, or None."""
    return next((m for m in models if m.fits(header)), None)


def no_model_reason(header: Header, models: list[ModelEntry]) -> str:
    """One line: what the input is and what the models expect."""
    what = (f"{'raster' if header.kind == 'raster' else 'volume'} ({header.spatial_dims}D, "
            f"{header.channels} channel{'s' * (header.channels != 1)})")
    return f"{header.path}: no model fits this {what}; models: " + "; ".join(m.describe() for m in models)


_loaded: dict[tuple, "LoadedModel"] = {}
_lock = threading.Lock()


def loaded(entry: ModelEntry, *, trust_bundle: bool = False) -> "LoadedModel":
    """The model of ``entry``, built once per process (weights hashed and verified once)."""
    return load_cached(entry.path, trust_bundle=trust_bundle)


def load_cached(path: str | Path, *, trust_bundle: bool = False) -> "LoadedModel":
    """The model at ``path``, loaded (weights hashed, verified, network built) once per process.

    The CLI loads a model before it starts Prefect or a run, so a bad one is
    one line and nothing started; the run then gets the same object.  The
    cache is keyed by the path and the size and modification time of the
    files in it, so a model replaced in place between nightly runs of a
    long-lived process (``segflow schedule``) is loaded again.
    """
    from segmentation import load_model

    path = Path(path).expanduser().absolute()  # one entry for every spelling of the path (provenance resolves it)
    key = (str(path), _stamp(path), trust_bundle)
    with _lock:
        if key not in _loaded:
            _loaded[key] = load_model(path, trust_bundle=trust_bundle)
        return _loaded[key]


def _stamp(path: Path) -> tuple:
    if not path.exists():
        return ()
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files)
