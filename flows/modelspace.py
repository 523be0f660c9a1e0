"""Wiring model space into a run: which grid the network sees, and the plan that brings labels back.

A volume whose grid differs from the one its model's card (version 3)
declares is resampled once into a model-space image store in the work folder
(:func:`storage.modelimage.model_image`), stitched there, and written back on
its own grid (:class:`segmentation.modelspace.ModelSpacePlan`).  Where the
grids already match nothing of this runs, so such outputs stay byte for byte
what they were.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
from distributed import Client

from flows.config import SegmentOptions
from segmentation import LoadedModel, build_plan
from segmentation.modelspace import ModelSpacePlan
from storage.bands import aliases, select_bands
from storage.geometry import VolumeGeometry
from storage.grids import GridMapping, model_grid
from storage.layout import ImageStore
from storage.modelimage import model_image

DEFAULT_VOLUME_CHUNK = 128


def mapping_for(store: ImageStore, model: LoadedModel) -> GridMapping | None:
    """The input-to-model grid mapping, or None when the model works on the input's own grid."""
    card = model.card
    geometry = store.meta.geometry
    if not card.applies_model_space or not isinstance(geometry, VolumeGeometry):
        return None
    spacing = card.input.spacing
    mapping = model_grid(np.asarray(geometry.affine, dtype=np.float64), tuple(store.spatial_shape),
                         axcodes=card.input.orientation, pixdim_ijk=None if spacing is None else spacing[::-1])
    return None if mapping.is_identity else mapping


def band_selection(store: ImageStore, model: LoadedModel, options: SegmentOptions) -> tuple[Any, list[str] | None]:
    """The image the network sees, and the names of the bands chosen (None: every band, in the stored order).

    ``--bands`` wins; otherwise the card's channel names are looked up among
    the input's band names when the input names its bands; an input whose
    band count already equals the model's and that names none of them is
    taken as it is (as before bands had names).
    """
    offered = list(store.meta.channel_names)
    card = model.card.input
    name = f"model {model.card.name!r}"
    if options.bands is not None:
        picked = select_bands(options.bands, offered, model=name)
    elif card.channel_names and _names_bands(store):
        hint = "choose them with --bands (names or 1-based indices)"
        if len(offered) == card.channels and not _any_match(card.channel_names, offered):
            return store.image, None  # named differently throughout, same count: the old positional contract
        picked = select_bands(card.channel_names, offered, model=name, hint=hint)
    else:
        return store.image, None
    if picked == list(range(len(offered))):
        return store.image, None
    return da.from_zarr(store.image)[picked], [offered[i] for i in picked]


def _names_bands(store: ImageStore) -> bool:
    geometry = store.meta.geometry
    return any(getattr(geometry, "band_descriptions", None) or [])


def _any_match(wanted: list[str], offered: list[str]) -> bool:
    names = {n.lower() for o in offered for n in aliases(o)}
    return any(n.lower() in names for w in wanted for n in aliases(w))


def model_image_path(store: ImageStore) -> Path:
    """Where the model-space copy of an ingested store lives: beside it, so it goes (or stays) with it."""
    return store.path.with_name(store.path.name.removesuffix(".image.zarr") + ".model.zarr")


def build(store: ImageStore, model: LoadedModel, options: SegmentOptions,
          client: Client) -> tuple[Any, GridMapping | None, dict[str, Any]]:
    """(plan, mapping, facts): a StitchPlan on the input, or a ModelSpacePlan when the grids differ."""
    mapping = mapping_for(store, model)
    facts: dict[str, Any] = {}
    image_store = store
    if mapping is not None:
        chunk = options.chunk_size or DEFAULT_VOLUME_CHUNK
        t0 = time.perf_counter()
        image_store, reused = model_image(store, mapping, model_image_path(store), chunk=chunk,
                                          interpolation=model.card.input.interpolation,
                                          compute=lambda graph: client.compute(graph).result())
        facts = {"model_space": mapping.to_json(), "model_image_reused": reused,
                 "model_image_seconds": round(time.perf_counter() - t0, 3)}
    image, bands = band_selection(image_store, model, options)
    if bands is not None:
        facts["bands"] = bands
    stitch = build_plan(image, model, roi=options.roi, overlap=options.overlap, blend=options.blend,
                        precision=options.precision, chunks=options.chunk_size, mask=image_store.mask,
                        batch_size=options.batch_size, device=options.device, flip_tta=options.flip_tta)
    if mapping is None:
        return stitch, None, facts
    plan = ModelSpacePlan(stitch, mapping, invert=model.card.inference.invert, chunks=store.image.chunks[1:])
    return plan, mapping, facts


__all__ = ["build", "mapping_for", "model_image_path"]
