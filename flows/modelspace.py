"""Wiring model space into a run: which grid the network sees, and the plan that brings labels back.

A volume whose grid differs from the one its model's card (version 3)
declares is resampled once into a model-space image store in the work folder
(:func:`storage.modelimage.model_image`), stitched there, and written back on
its own grid (:class:`segmentation.modelspace.ModelSpacePlan`).  A raster
whose pixel size differs from its card's (version 4) ground sample distance,
or whose CRS differs from the card's, is warped with GDAL's kernels
(:mod:`storage.warp`) by the windows' own reads
(:class:`storage.modelview.WarpedImage`: no model-space store); its labels
come back on its own grid (``--output-grid input``) or stay on the model's
(``--output-grid model``: the outputs then carry the model grid's geometry,
:func:`output_meta`).  Where the grids already match nothing of this runs,
so such outputs stay byte for byte what they were.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
from distributed import Client
from distributed.system import MEMORY_LIMIT

from flows.config import SegmentOptions
from flows.routing import chosen_bands
from segmentation import LoadedModel, build_plan
from segmentation.card import ModelCard
from segmentation.modelspace import ModelSpacePlan
from storage.bandcover import with_bands_mask
from storage.bands import channel_indexes, channel_units, preselected
from storage.errors import InvalidInputError
from storage.geometry import RasterGeometry, VolumeGeometry
from storage.grids import GridMapping, affine_to_spacing, model_grid
from storage.layout import META_ATTR, ImageStore, StoreMeta
from storage.modelimage import model_image, model_mask, raster_model_geometry
from storage.modelview import WarpedImage
from storage.rastergrid import RasterMapping, raster_mapping
from storage.wayback import RasterWayBack
from storage.workarray import forget

def stage_memory(machine: int) -> int:
    """The most bytes of stitched model-grid chunks the way back keeps in the worker's memory (one worker only;
    past it, files in the work folder): a sixteenth of the machine, from 512 MB to 2 GB.

    A 5 m scene and a 10 m model, chunks 1024², 5 classes: at most 231 MB were held at once at 8192² (11 of 16
    chunks), 419 MB at 16384² (20 of 64): about two rows of model chunks.  Where three rows would not fit, the
    chunks keep border strips instead and go as soon as the input pixels inside them are computed
    (storage.wayback.RasterWayBack._strips_pay): a few chunks at a time, however wide the scene, but more small
    tasks.  At 32768² (three rows: 1 GB) on a 24 GB machine, a 512 MB budget took the strips: warping cost 51 %
    of the sliding window alone, run A's peak 1.49 GB; a 1.3 GB budget held the rows: 27 %, 2.09 GB
    (docs/performance.md).  So the budget follows the machine, as Dask's memory limit does.
    """
    return min(max(machine // 16, 512 << 20), 2 << 30)


STAGE_MEMORY = stage_memory(MEMORY_LIMIT)  # MEMORY_LIMIT: the machine's memory, or its cgroup's or rlimit's if less

DEFAULT_VOLUME_CHUNK = 128
RASTER_CHUNK = 1024  # a raster's model grid is chunked so where --chunk-size is not given (ingest's default too)


# model voxels 16x finer (or coarser) on every axis: past it a voxel size or unit is wrong
MAX_MODEL_GRID_GROWTH = 4096.0


def mapping_for(store: ImageStore, model: LoadedModel) -> GridMapping | RasterMapping | None:
    """The input-to-model grid mapping, or None when the model works on the input's own grid."""
    return card_mapping(model.card, store.meta.geometry, tuple(store.spatial_shape))


def card_mapping(card: ModelCard, geometry: Any, shape: tuple[int, ...]) -> GridMapping | RasterMapping | None:
    """:func:`mapping_for` of a grid (``geometry``, spatial ``shape``) and a card: training asks it of its cases,
    which have no store of their own (a dataset's), before any model is loaded."""
    if isinstance(geometry, RasterGeometry):
        if not card.applies_raster_model_space:
            return None
        mapping = raster_mapping(geometry, shape, spacing=card.input.spacing, crs=card.input.crs,
                                 resampling=card.input.resampling)
        grow = 1.0 if mapping is None else float(mapping.scale[0] * mapping.scale[1])
        if grow > MAX_MODEL_GRID_GROWTH or grow < 1.0 / MAX_MODEL_GRID_GROWTH:
            ratio = grow if grow > 1 else 1 / grow
            per_axis = ratio ** 0.5
            spacing = card.input.spacing or [1.0, 1.0]
            axis = 0 if spacing[0] > 0 or spacing[1] <= 0 else 1  # a spacing <= 0 keeps its axis: the other tells
            pixel = spacing[axis] * float(mapping.scale[1 - axis])  # scale: model pixels per input pixel, x first

            def count(n: float) -> str:  # a card's spacing of 1e-300 had printed a number hundreds of digits long
                return f"{n:,.0f}" if n < 1e9 else f"{n:.3g}"
            size = " x ".join(count(n) for n in mapping.model_shape)
            raise InvalidInputError(None, f"its {pixel:,.4g} m pixels would be "
                                          f"{'resampled' if grow > 1 else 'averaged'} {count(per_axis)}x per axis to "
                                          f"the {' x '.join(f'{v:g}' for v in spacing)} m of model {card.name!r} "
                                          f"(a {size} grid from {shape[0]:,} x "
                                          f"{shape[1]:,} pixels); more than 64x per axis is refused: "
                                          "is this the model for this imagery?")
        return mapping
    if not card.applies_model_space or not isinstance(geometry, VolumeGeometry):
        return None
    spacing = card.input.spacing
    # in mm: the card's spacing is, and a file's affine may be in metres or microns (NIfTI xyzt_units)
    mapping = model_grid(geometry.affine_mm(), tuple(shape),
                         axcodes=card.input.orientation, pixdim_ijk=None if spacing is None else spacing[::-1])
    if mapping.is_identity:
        return None
    # judged by the voxels' volumes, not the grids' sizes: a small scan in metres (12 x 10 x 8 voxels) became a
    # 1 x 1 x 1 grid, only 1/960 of its size, and was segmented as one voxel
    voxels = np.linalg.norm(geometry.affine_mm()[:3, :3], axis=0)
    # the model's voxels as the mapping made them: a card spacing <= 0 keeps that axis's own (MONAI's Spacingd
    # rule), which the card's raw numbers had made a negative or zero volume (a ZeroDivisionError)
    model_voxels = np.linalg.norm(np.asarray(mapping.model_affine, dtype=np.float64)[:3, :3], axis=0)
    grow = float(np.prod(voxels)) / float(np.prod(model_voxels))
    if grow > MAX_MODEL_GRID_GROWTH or grow < 1.0 / MAX_MODEL_GRID_GROWTH:
        size = " x ".join(f"{n:,}" for n in mapping.model_shape[::-1])
        voxel = " x ".join(f"{v:.3g}" for v in voxels)
        ratio = grow if grow > 1 else 1 / grow
        ratio_text = f"{ratio:,.0f}" if ratio < 1e6 else f"{ratio:.2g}"
        times = f"1/{ratio_text} of" if grow > 1 else f"{ratio_text} times"
        raise InvalidInputError(None, f"its voxels are {voxel} mm and model {card.name!r} works at "
                                      f"{' x '.join(f'{v:.3g}' for v in model_voxels)} mm, {times} their "
                                      f"volume (its grid would be {size} voxels); check the header's voxel size "
                                      "and unit (xyzt_units)")
    return mapping


def band_selection(store: ImageStore, model: LoadedModel, options: SegmentOptions) -> tuple[Any, list[str] | None]:
    """The bands chosen (:func:`_choose`) in the units the card declares (storage.bands.apply_units).

    A STAC item's store holds the bands picked at ingest, in the model's order.
    """
    return card_bands(store, model.card, options.bands)


def card_bands(store: ImageStore, card: ModelCard, bands: list[str] | None = None) -> tuple[Any, list[str] | None]:
    """:func:`band_selection` for a card alone: training reads its rasters through it, so the network learns
    from the bands, in the order and units, that ``segment`` will give it (training had read the file's bands
    in the file's order and stored units: a card naming blue, green, red, nir trained on a file storing nir
    first, and a card in reflectance on digital numbers)."""
    from storage.bands import apply_units

    names = preselected(store.meta)
    image, names = (store.image, names) if names is not None else _choose(store, card, bands)
    spec = card.input
    return apply_units(image, store.meta, units=spec.units, dn_scale=spec.dn_scale, names=names), names


def model_bands_store(store: ImageStore, model: LoadedModel, options: SegmentOptions) -> ImageStore:
    """``store`` read through the valid-data mask of the bands the model takes, where a nodata-marked file has
    pixels holding nodata in some bands only (:func:`storage.bandcover.with_bands_mask`)."""
    if store.meta.kind != "raster" or preselected(store.meta) is not None:
        return store
    picked = _picked(store, model, options)
    return with_bands_mask(store, list(range(int(store.image.shape[0]))) if picked is None else picked)


def _picked(store: ImageStore, model: LoadedModel, options: SegmentOptions) -> list[int] | None:
    """The stored bands the model takes, in its order (None: every band, in the stored order), by the rule the
    header check applies before anything starts (:func:`flows.routing.chosen_bands`)."""
    return chosen_bands(list(store.meta.channel_names), _names_bands(store), options.bands,
                        model.card.input.channel_names or [], f"model {model.card.name!r}", model.card.input.channels)


def _choose(store: ImageStore, card: ModelCard, bands: list[str] | None) -> tuple[Any, list[str] | None]:
    """The image the network sees, and the names of the bands chosen (None: every band, in the stored order)."""
    offered = list(store.meta.channel_names)
    picked = chosen_bands(offered, _names_bands(store), bands, card.input.channel_names or [],
                          f"model {card.name!r}", card.input.channels)
    if picked is None or picked == list(range(len(offered))):
        return store.image, None
    return da.from_zarr(store.image)[picked], [offered[i] for i in picked]


def unnamed_bands_note(store: ImageStore, model: LoadedModel, options: SegmentOptions) -> str | None:
    """What segflow assumed when the card names its channels and the raster names none of its bands: that they
    are in the card's order.  A model trained on B4,B3,B2 fed B2,B3,B4 gives wrong labels without any error, so
    the run says which band it took for which channel (None where names were matched or --bands chose)."""
    names = model.card.input.channel_names
    if store.meta.kind != "raster" or not names or options.bands is not None or _names_bands(store) or \
            preselected(store.meta) is not None:
        return None
    pairs = ", ".join(f"{i} as {n}" for i, n in enumerate(names, start=1))
    return (f"its bands have no names, so they were taken in file order: band {pairs} (if that is not their "
            "order, choose them with --bands)")


def network_bands(store: ImageStore, chosen: list[str] | None) -> list[str]:
    """The bands a raster's network got, in its order (the statistics' ``bands``): those chosen, else all of the
    store's, as stored."""
    return list(chosen) if chosen is not None else list(store.meta.channel_names)


def dtype_note(store: ImageStore, model: LoadedModel) -> str | None:
    """:func:`segmentation.normalize.dtype_problem` of the stored image, where no ``units`` were applied to convert
    its values (none on the card, or no scale or offset known for the file)."""
    from segmentation.normalize import dtype_problem

    if model.card.input.units is not None and _any_units(store):
        return None  # converted from the file's own scales and offsets; without them the values are taken as they are
    problem = dtype_problem(model.card, store.image.dtype)
    return None if problem is None else f"is stored as {problem}"


def _names_bands(store: ImageStore) -> bool:
    geometry = store.meta.geometry
    return any(getattr(geometry, "band_descriptions", None) or [])


def model_image_path(store: ImageStore) -> Path:
    """Where the model-space copy of an ingested store lives: beside it, so it goes (or stays) with it."""
    return store.path.with_name(store.path.name.removesuffix(".image.zarr") + ".model.zarr")


def build(store: ImageStore, model: LoadedModel, options: SegmentOptions,
          client: Client) -> tuple[Any, GridMapping | RasterMapping | None, dict[str, Any]]:
    """(plan, mapping, facts): a StitchPlan on the input, or a ModelSpacePlan when the grids differ (a
    StitchPlan on the model's grid for a raster with ``--output-grid model``)."""
    mapping = mapping_for(store, model)
    if isinstance(mapping, RasterMapping):
        return _build_raster(store, model, options, client, mapping)
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
    stitch = _stitch_plan(image_store, model, options, facts)
    if mapping is None:
        return stitch, None, facts
    plan = ModelSpacePlan(stitch, mapping, invert=model.card.inference.invert, chunks=store.image.chunks[1:])
    return plan, mapping, facts


def _stitch_plan(image_store: ImageStore, model: LoadedModel, options: SegmentOptions,
                 facts: dict[str, Any]) -> Any:
    """The sliding window over the grid the network sees (the input's or the model's), with the bands chosen."""
    image, bands = band_selection(image_store, model, options)
    if image_store.meta.kind == "raster":
        bands = network_bands(image_store, bands)
    if bands is not None:  # the bands the network got, in its order
        facts["bands"] = bands
    return build_plan(image, model, roi=options.roi, overlap=options.overlap, blend=options.blend,
                      precision=options.precision, chunks=options.chunk_size, mask=image_store.mask,
                      batch_size=options.batch_size, device=options.device, flip_tta=options.flip_tta,
                      compile=options.compile)


def _build_raster(store: ImageStore, model: LoadedModel, options: SegmentOptions, client: Client,
                  mapping: RasterMapping) -> tuple[Any, RasterMapping, dict[str, Any]]:
    """A raster in model space, labels on either grid.

    The windows read the model-space image straight from the input store
    (:class:`storage.modelview.WarpedImage`: each evaluate task warps its own
    region); only the model grid's valid mask is computed first, and stored
    when some model pixel is invalid.
    """
    # the model grid's chunks: --chunk-size, else the store's (1024 as ingested), never smaller: a small coarse
    # scene's own chunk (16 pixels of 600 m) had cut its 960² model grid into 3600 chunks, 90 s of scheduling
    chunk = options.chunk_size or max(RASTER_CHUNK, *(int(c) for c in store.image.chunks[1:]))
    work = model_image_path(store)
    t0 = time.perf_counter()
    model_valid = model_mask(store, mapping, work, chunk, compute=lambda graph: client.compute(graph).result())
    image, bands = _warped_image(store, model, options, mapping, chunk)
    facts: dict[str, Any] = {"model_space": mapping.to_json(), "model_image": "warped by the windows' reads",
                             "model_image_seconds": round(time.perf_counter() - t0, 3),
                             "output_grid": options.output_grid}
    facts["bands"] = network_bands(store, bands)
    stitch = build_plan(image, model, roi=options.roi, overlap=options.overlap, blend=options.blend,
                        precision=options.precision, chunks=chunk, mask=model_valid,
                        batch_size=options.batch_size, device=options.device, flip_tta=options.flip_tta,
                        compile=options.compile)
    if options.output_grid == "model":
        return stitch, mapping, facts
    input_valid = None if store.mask is None else da.from_zarr(store.mask)
    # the stitched probabilities go through a work array in the work folder (removed with it): each chunk is
    # freed once written, whatever the scene's size (storage.wayback.RasterWayBack)
    # each staged chunk is deleted once its readers have read it, when one local worker runs every task (a reader
    # recomputed on another worker after its chunk was deleted would find nothing): storage.workarray
    one_worker = options.dask_address is None and len(client.scheduler_info(n_workers=-1).get("workers", {})) == 1
    # one run's stage: a worker forgets the chunks it held in memory when the run ends (forget_staged)
    stage = work / f"staged-probabilities-{uuid.uuid4().hex[:12]}"
    way_back = RasterWayBack(mapping, model_valid, stage=stage, release=one_worker,
                             memory=STAGE_MEMORY if one_worker else 0)
    plan = ModelSpacePlan(stitch, way_back, invert=model.card.inference.invert,
                          chunks=store.image.chunks[1:], mask=input_valid)
    return plan, mapping, facts


def forget_staged(plan: Any, client: Client) -> None:
    """Drop what a raster model-space plan's way back held in the worker's memory (at a run's end, whatever its
    outcome: a failed run's chunks would otherwise stay in a long-lived worker).

    Never raises: it runs while a failed run's own error propagates, and a cluster that failed with it (closed,
    its worker gone, which took the held chunks along) must not replace that error with its own.
    """
    way_back = getattr(plan, "way_back", None)
    if isinstance(way_back, RasterWayBack) and way_back.memory and way_back.stage is not None:
        try:
            client.run(forget, str(way_back.stage))
        except Exception as exc:  # noqa: BLE001  (a closed client raises AttributeError, a lost worker comm errors)
            logging.getLogger(__name__).debug("could not drop the held way-back chunks: %s", exc)


def _any_units(store: ImageStore) -> bool:
    """Whether the file declares a scale or offset for any band (bands that mix them are refused elsewhere)."""
    try:
        return channel_units(store.meta, None) is not None
    except InvalidInputError:
        return True


def _warped_image(store: ImageStore, model: LoadedModel, options: SegmentOptions, mapping: RasterMapping,
                  chunk: int) -> tuple[WarpedImage, list[str] | None]:
    """The bands the model takes, warped on read and put in the card's units (after the warp, as a stored
    model-space image had them)."""
    names = preselected(store.meta)
    if names is None:
        _, names = _choose(store, model.card, options.bands)
    spec = model.card.input
    known = None if spec.units is None else channel_units(store.meta, names)
    units = None
    if known is not None:
        factor = spec.dn_scale if spec.units == "dn" else 1.0
        units = ([s * factor for s in known[0]], [o * factor for o in known[1]])
    bands = None if names is None else channel_indexes(list(store.meta.channel_names), names)
    image = WarpedImage(store.image, mapping, valid=store.mask, bands=bands, units=units, chunks=(chunk, chunk))
    return image, names


def output_meta(store: ImageStore, model: LoadedModel, options: SegmentOptions) -> StoreMeta:
    """The geometry the outputs are written with: the input's, or the model grid's for a raster segmented with
    ``--output-grid model`` in model space."""
    if options.output_grid != "model" or not isinstance(store.meta.geometry, RasterGeometry):
        return store.meta
    mapping = mapping_for(store, model)
    if not isinstance(mapping, RasterMapping):
        return store.meta
    return store.meta.model_copy(update={"geometry": raster_model_geometry(store.meta.geometry, mapping)})


def output_meta_attr(store: ImageStore, model: LoadedModel, options: SegmentOptions) -> Any:
    """:func:`output_meta` as a prediction store's attribute (the input store's own, untouched, when equal)."""
    meta = output_meta(store, model, options)
    return store.group.attrs[META_ATTR] if meta is store.meta else meta.model_dump(mode="json")


def resampling_record(mapping: GridMapping | RasterMapping, model: LoadedModel,
                      options: SegmentOptions) -> dict[str, Any]:
    """``parameters.resampling`` of the provenance: both grids and the kernels."""
    if isinstance(mapping, RasterMapping):
        invert = model.card.inference.invert
        back = None if options.output_grid == "model" else ("nearest" if invert == "labels" else mapping.back)
        return {"mapping": mapping.to_json(), "resampling": model.card.input.resampling,
                "to_model": mapping.forward, "to_input": back, "invert": invert, "output_grid": options.output_grid}
    return {"mapping": mapping.to_json(), "interpolation": model.card.input.interpolation,
            "invert": model.card.inference.invert}


def space_words(statistics: dict[str, Any]) -> str | None:
    """'in model space at 1 x 1 x 1 mm': a run resampled to the model's grid and back says so on its line (a
    card whose spacing training recorded resampled every scan with no word but the provenance's)."""
    space = statistics.get("model_space")
    if not isinstance(space, dict) or space.get("identity"):
        return None
    try:
        if space.get("kind") == "raster":
            t = space["model"]["transform"]
            sizes, unit = (math.hypot(t[0], t[3]), math.hypot(t[1], t[4])), "m"
        else:
            sizes, unit = tuple(affine_to_spacing(space["model"]["affine"])), "mm"
    except (KeyError, IndexError, TypeError, ValueError):
        return None
    return "in model space at " + " x ".join(f"{v:.3g}" for v in sizes) + f" {unit}"


__all__ = ["build", "forget_staged", "mapping_for", "model_image_path", "output_meta", "output_meta_attr",
           "resampling_record", "space_words", "stage_memory"]
