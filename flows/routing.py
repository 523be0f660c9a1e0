"""Which model segments which input: the first model whose card fits the input's header.

A card fits an input when its ``input.spatial_dims`` equals the input's (2 for
a GeoTIFF/VRT raster, 3 for a NIfTI volume or a DICOM series) and its
``input.channels`` equals the image channels ingest would read (alpha bands
excluded; a 4-D NIfTI's fourth axis; always 1 for a DICOM series, whose
colour images are refused).  Models are tried in the order given, so with two models that
fit the same inputs the first one wins.  No other card field is used: a model
trained on another resolution or dtype is still chosen (where its card names
a spacing, the pipeline resamples the scan onto the model's grid and back).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from segmentation import LoadedModel, load_model
from segmentation.card import ModelCard
from segmentation.modeldir import check_model
from storage.probe import Header


@dataclass(frozen=True)
class ModelEntry:
    """A candidate model: where it is and what its card promises."""

    path: str
    card: ModelCard

    @property
    def spatial_dims(self) -> int:
        return self.card.input.spatial_dims

    @property
    def channels(self) -> int:
        return self.card.input.channels

    def fits(self, header: Header) -> bool:
        return self.spatial_dims == header.spatial_dims and self.channels == header.channels

    def describe(self) -> str:
        return f"{self.card.name} ({self.spatial_dims}D, {self.channels} channel{'s' * (self.channels != 1)})"


def read_models(paths: list[str], *, trust_bundle: bool = False) -> list[ModelEntry]:
    """The cards of the given model directories (validated, nothing built yet); a bad one raises ModelError."""
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


_loaded: dict[tuple, LoadedModel] = {}
_lock = threading.Lock()


def loaded(entry: ModelEntry, *, trust_bundle: bool = False) -> LoadedModel:
    """The model of ``entry``, built once per process (weights hashed and verified once).

    The cache is keyed by the path and the size and modification time of the
    files in it, so a model replaced in place between nightly runs of a
    long-lived process (``segflow schedule``) is loaded again.
    """
    key = (str(Path(entry.path).resolve()), _stamp(Path(entry.path)), trust_bundle)
    with _lock:
        if key not in _loaded:
            _loaded[key] = load_model(entry.path, trust_bundle=trust_bundle)
        return _loaded[key]


def _stamp(path: Path) -> tuple:
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files)
