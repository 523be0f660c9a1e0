"""A STAC Item beside each raster output, so a catalogue can find and explain it.

A label COG on its own says where it is and which value is which class; it
does not say which model made it, from which bands, at what resolution, or
from which source file.  ``<stem>.stac.json`` says all of that in the shapes
other tools already read: the footprint in EPSG:4326 plus the native grid
(projection extension), the classes on the label asset (classification
extension), the model (Machine Learning Model extension, built and validated
with ``stac-model`` so a bad description fails here, not in a catalogue), the
model's resolution as the item's ``gsd`` (each raster asset its own pixel size as
its ``gsd``), and a ``derived_from`` link with a
``processing:lineage`` sentence.  Storage knows nothing of models: the caller
passes the model as plain data.  No schema is fetched; nothing here touches
the network.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from datetime import datetime, timezone
from os import PathLike
from pathlib import Path
from typing import Any

import pystac
import rasterio
from pydantic import ValidationError
from pystac.extensions.classification import Classification, ClassificationExtension
from pystac.extensions.projection import ProjectionExtension
from rasterio.enums import WktVersion
from rasterio.errors import RasterioError
from rasterio.warp import transform_bounds
from stac_model.input import InputStructure, ModelInput
from stac_model.output import MLMClassification, ModelOutput, ModelResult
from stac_model.schema import MLModelExtension, MLModelProperties

from storage.atomic import write_text_atomically
from storage.classes import LabelClass
from storage.errors import ExportError, InvalidInputError
from storage.hashing import sha256_file
from storage.header import linear_unit_metres
from storage.inputfiles import stem_of
from storage.remote import is_url

__all__ = ["ITEM_SUFFIX", "PROCESSING_SCHEMA", "class_name", "model_item", "stac_classes", "stac_item_path",
           "write_stac_item"]

ITEM_SUFFIX = ".stac.json"
PROCESSING_SCHEMA = "https://stac-extensions.github.io/processing/v1.2.0/schema.json"
FILE_SCHEMA = "https://stac-extensions.github.io/file/v2.1.0/schema.json"
RASTER_SCHEMA = "https://stac-extensions.github.io/raster/v2.0.0/schema.json"  # raster:scale, raster:offset
COG_MEDIA_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"
TASKS = ["semantic-segmentation"]
MODEL_KEYS = ("name", "architecture", "framework", "weights_sha256", "bands", "value_scaling", "roi", "accelerator",
              "channels", "batch_size", "hyperparameters")  # the last three optional

_NAME_BAD = re.compile(r"[^0-9A-Za-z\-_]+")
_VECTOR_TYPES = {
    ".gpkg": "application/geopackage+sqlite3",
    ".geojson": "application/geo+json",
    ".json": "application/geo+json",
    ".parquet": "application/vnd.apache.parquet",
    ".fgb": "application/vnd.flatgeobuf",
    ".shp": "application/x-shapefile",
}


def stac_item_path(label_cog: str | PathLike[str]) -> Path:
    """``<stem>.stac.json`` beside the label COG: where a reader looks for the item of ``scene.tif``."""
    label_cog = Path(label_cog)
    return label_cog.with_name(stem_of(label_cog) + ITEM_SUFFIX)


def class_name(name: str, value: int) -> str:
    """A class name the extensions accept (``^[0-9A-Za-z-_]+$``): other runs of characters become ``_``."""
    clean = _NAME_BAD.sub("_", name.strip()).strip("_")
    return clean or f"class_{value}"


def stac_classes(classes: Sequence[LabelClass]) -> list[dict[str, Any]]:
    """The classes as ``classification:classes`` objects: sanitised unique name, original name, colour hint.

    Two names that sanitise alike would make the lookup ambiguous, so a
    repeated one gets its value appended.
    """
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for c in classes:
        name = class_name(c.name, c.value)
        if name in seen:
            name = f"{name}_{c.value}"
        seen.add(name)
        out.append({"value": int(c.value), "name": name, "description": c.name,
                    "color_hint": "{:02X}{:02X}{:02X}".format(*c.color)})
    return out


def _relative_href(target: Path, item_dir: Path) -> str:
    """Asset hrefs relative to the item, so the folder can be moved or uploaded whole."""
    try:
        rel = os.path.relpath(target.resolve(), item_dir.resolve())
    except ValueError:  # another drive (Windows): no relative path exists
        return target.resolve().as_uri()
    rel = _uri_path(Path(rel).as_posix())
    return rel if rel.startswith("../") else f"./{rel}"


def _uri_path(path: str) -> str:
    """A relative path as a URI reference's path: ``%``, ``#`` and ``?`` percent-encoded (``scan #1.tif`` was read
    as ``scan `` with a fragment ``1.tif``).  Spaces and non-ASCII letters stay as they are (an IRI, RFC 3987),
    which pystac and GDAL open as local paths; encoding them would break those reads."""
    return path.replace("%", "%25").replace("#", "%23").replace("?", "%3F")


# characters pystac (1.15) takes as URL syntax in a local href, even percent-encoded as a URI reference must have
# them: it cuts a relative href at '#', '?' or ';', and does not decode '%23', so such a file is never found
PYSTAC_MISREADS = "#?;%"


def pystac_misreads(names: list[str]) -> list[str]:
    """The output names whose hrefs pystac will not resolve to the file (:data:`PYSTAC_MISREADS`)."""
    return [n for n in names if any(c in n for c in PYSTAC_MISREADS)]


def wrapped_longitudes(west: float, east: float) -> tuple[float, float]:
    """West and east in [-180, 180], as STAC and RFC 7946 ask (west > east: the box crosses the antimeridian).

    A grid already in degrees keeps its own longitudes through ``transform_bounds``: a scene from 179.98 to
    180.03 gave a bbox past 180, which catalogues reject or misplace.  A grid spanning the whole circle is
    [-180, 180]."""
    if east - west >= 360.0:
        return -180.0, 180.0

    def wrap(lon: float) -> float:
        return lon if -180.0 <= lon <= 180.0 else (lon + 180.0) % 360.0 - 180.0

    return wrap(west), wrap(east)


def _footprint(west: float, south: float, east: float, north: float) -> dict[str, Any]:
    """The bbox as GeoJSON; one crossing the antimeridian (west > east) is split in two, as RFC 7946 asks."""
    def box(w: float, e: float) -> list[list[list[float]]]:
        return [[[w, south], [e, south], [e, north], [w, north], [w, south]]]

    if west <= east:
        return {"type": "Polygon", "coordinates": box(west, east)}
    return {"type": "MultiPolygon", "coordinates": [box(west, 180.0), box(-180.0, east)]}


def _grid(label_cog: Path) -> tuple[Any, Any, tuple[int, int], tuple[float, float, float, float]]:
    """CRS, transform, shape and bounds of the label COG; a map without a CRS has no place in a catalogue."""
    try:
        with rasterio.open(label_cog) as ds:
            crs, transform, shape, bounds = ds.crs, ds.transform, (ds.height, ds.width), tuple(ds.bounds)
    except (RasterioError, OSError) as exc:
        raise ExportError(label_cog, f"cannot read the label COG to describe it: {' '.join(str(exc).split())}") from None
    if crs is None:
        raise InvalidInputError(label_cog, "has no CRS: a STAC item needs a georeferenced label map")
    return crs, transform, shape, bounds  # type: ignore[return-value]


def _gsd_field(crs: Any, transform: Any) -> dict[str, float]:
    """A raster's own ground sample distance, its square pixel's side in metres (none for degrees or rectangular
    pixels), as an asset's ``gsd`` field."""
    metres = None if crs is None else linear_unit_metres(crs)
    if metres is None or abs(abs(transform.a) - abs(transform.e)) > 1e-9 * abs(transform.a):
        return {}
    return {"gsd": float(abs(transform.a)) * metres}


def _band_facts(cog: Path) -> list[dict[str, Any]]:
    """Each band's data type, nodata and scale as the COG declares them (STAC 1.1's common ``data_type`` and
    ``nodata``; the raster extension's ``raster:scale`` and ``raster:offset``, which is where readers, segflow's
    own included, look: a bare ``scale`` was read as none): without them a catalogue reader could not tell that
    255 is "no data" in the labels, or that uint8 probabilities are round(p · 254)."""
    try:
        with rasterio.open(cog) as ds:
            facts = []
            for dtype, nodata, scale, offset in zip(ds.dtypes, ds.nodatavals, ds.scales, ds.offsets):
                band: dict[str, Any] = {"data_type": str(dtype)}
                if nodata is not None:  # STAC writes NaN as "nan" (JSON has no NaN)
                    band["nodata"] = "nan" if math.isnan(nodata) else int(nodata) if float(nodata).is_integer() \
                        else float(nodata)
                if scale not in (None, 1.0):
                    band["raster:scale"] = float(scale)
                if offset not in (None, 0.0):
                    band["raster:offset"] = float(offset)
                facts.append(band)
            return facts
    except (RasterioError, OSError) as exc:
        raise ExportError(cog, f"cannot read the COG to describe it: {' '.join(str(exc).split())}") from None


def _mlm_properties(model: dict[str, Any], classes: list[dict[str, Any]], out: Path) -> MLModelProperties:
    """The MLM fields, validated by stac-model: an impossible description fails before anything is written."""
    bands = [str(b) for b in model.get("bands") or []]
    channels = int(model.get("channels") or len(bands))  # a model without band names still has channels
    missing = [k for k in ("name", "architecture", "roi") if not model.get(k)] + ([] if channels else ["bands"])
    if missing:
        raise ExportError(out, f"the model description lacks {', '.join(missing)}")
    if bands and len(bands) != channels:
        raise ExportError(out, f"the model description names {len(bands)} bands for {channels} channels")
    roi = [int(r) for r in model["roi"]]
    spatial = ["height", "width"] if len(roi) == 2 else ["depth", "height", "width"][-len(roi):]
    try:
        props = MLModelProperties(
            name=str(model["name"]),
            architecture=str(model["architecture"]),
            tasks=set(TASKS),
            framework=model.get("framework") or "pytorch",
            accelerator=model.get("accelerator") or "cpu",
            input=[ModelInput(
                name=f"{channels} band" + ("" if channels == 1 else "s"),
                bands=bands,
                input=InputStructure(shape=[-1, channels, *roi], dim_order=["batch", "bands", *spatial],
                                     data_type="float32"),
                value_scaling=model.get("value_scaling") or None,
            )],
            output=[ModelOutput(
                name="class probabilities",
                tasks=set(TASKS),
                result=ModelResult(shape=[-1, len(classes), *roi], dim_order=["batch", "class", *spatial],
                                   data_type="float32"),
                classes=[MLMClassification(value=c["value"], name=c["name"], description=c["description"],
                                           color_hint=c["color_hint"]) for c in classes],
            )],
            pretrained=None,  # unknown here: claim nothing
            batch_size_suggestion=model.get("batch_size") or None,
            hyperparameters=model.get("hyperparameters") or None,
        )
    except (ValidationError, ValueError, TypeError) as exc:
        first = exc.errors()[0] if isinstance(exc, ValidationError) and exc.errors() else None
        why = (f"{'.'.join(str(p) for p in first['loc'])}: {first['msg']}" if first else str(exc))
        raise ExportError(out, f"the model description is not valid MLM: {why}") from None
    return props


def _lineage(model: dict[str, Any], source: str, grid: str = "input") -> str:
    sha = model.get("weights_sha256")
    weights = f" (weights sha256 {sha})" if sha else ""
    where = "the model's grid (--output-grid model)" if grid == "model" else "the input grid"
    return (f"Semantic segmentation by segflow of {Path(source).name or source} with model "
            f"{model.get('name')} ({model.get('architecture')}){weights} on {model.get('accelerator') or 'cpu'}; "
            f"windows stitched exactly, labels written on {where}.")


def write_stac_item(out_path: Path, *, item_id: str, label_cog: Path, classes: list[LabelClass], model: dict,
                    gsd: float | None, source: str, probability_cog: Path | None = None,
                    vectors: Path | None = None, datetime_: datetime | None = None,
                    weights: dict[str, Any] | None = None, grid: str = "input") -> Path:
    """Write the STAC Item of one raster output and return its path.

    ``out_path`` is the export's output path (the label COG's name, as in
    ``flows.export``); the item lands as ``<stem>.stac.json`` beside it,
    or exactly at ``out_path`` when that already ends in ``.stac.json``.
    ``model`` is plain data: name, architecture, framework, weights_sha256,
    bands (in order), value_scaling (MLM objects, or None), roi,
    accelerator.  ``datetime_`` defaults to now (UTC), the time of the
    prediction, since the source's acquisition time is not known here.
    """
    out_path, label_cog = Path(out_path), Path(label_cog)
    item_path = out_path if out_path.name.endswith(ITEM_SUFFIX) else stac_item_path(out_path)
    item_dir = item_path.parent
    crs, transform, shape, bounds = _grid(label_cog)
    west, south, east, north = transform_bounds(crs, "EPSG:4326", *bounds, densify_pts=21)
    west, east = wrapped_longitudes(west, east)
    when = datetime_ or datetime.now(timezone.utc)
    table = stac_classes(classes)
    mlm = _mlm_properties(model, table, item_path)

    item = pystac.Item(id=item_id, geometry=_footprint(west, south, east, north),
                       bbox=[west, south, east, north], datetime=when, properties={})
    if gsd is not None:
        item.common_metadata.gsd = float(gsd)

    authority = crs.to_authority()
    ProjectionExtension.ext(item, add_if_missing=True).apply(
        code=":".join(authority) if authority else None,
        wkt2=None if authority else crs.to_wkt(version=WktVersion.WKT2_2019),  # WKT2, as the field says
        shape=[int(shape[0]), int(shape[1])],
        transform=[float(v) for v in list(transform)[:6]],
    )
    MLModelExtension.ext(item, add_if_missing=True).apply(mlm)

    # each raster asset's own gsd: the item's is the model's resolution, and labels brought back to a 20 m input's
    # grid (or kept at the model's) are found by a catalogue search on the asset's pixel size
    # the labels' checksum and size, as the model asset has them: a catalogue (or an auditor holding only the
    # item) can check the file it fetches; the item had declared the file extension for the weights alone
    labels = pystac.Asset(href=_relative_href(label_cog, item_dir), media_type=COG_MEDIA_TYPE,
                          title="Class labels", roles=["data", "labels"],
                          extra_fields={"bands": [{"name": "labels", **_band_facts(label_cog)[0]}],
                                        **_gsd_field(crs, transform),
                                        "file:checksum": "1220" + sha256_file(label_cog),
                                        "file:size": label_cog.stat().st_size})
    item.add_asset("labels", labels)
    item.stac_extensions.append(FILE_SCHEMA)
    ClassificationExtension.ext(labels, add_if_missing=True).classes = [
        Classification.create(value=c["value"], name=c["name"], description=c["description"],
                              color_hint=c["color_hint"]) for c in table]
    if probability_cog is not None:
        item.add_asset("probabilities", pystac.Asset(
            href=_relative_href(Path(probability_cog), item_dir), media_type=COG_MEDIA_TYPE,
            title="Class probabilities, one band per class", roles=["data"],
            extra_fields={"bands": [{"name": c["name"], "description": c["description"], **facts}
                                    for c, facts in zip(table, _band_facts(Path(probability_cog)))],
                          **_gsd_field(*_grid(Path(probability_cog))[:2])}))
    if vectors is not None:
        vectors = Path(vectors)
        item.add_asset("polygons", pystac.Asset(
            href=_relative_href(vectors, item_dir), media_type=_VECTOR_TYPES.get(vectors.suffix.lower()),
            title="Label polygons", roles=["data", "labels"]))

    if weights is not None:  # the model that made the labels (segmentation.mlm.weights_asset)
        _add_model_asset(item, model, weights)
    # a local path as a URI reference, as the assets' hrefs are ("scene #1.tif" had been cut at its '#')
    target = str(source) if is_url(str(source)) else _uri_path(str(source))
    item.add_link(pystac.Link(rel="derived_from", target=target, title="Segmented source"))
    item.stac_extensions.append(PROCESSING_SCHEMA)
    if any(k.startswith("raster:") for a in item.assets.values() for b in a.extra_fields.get("bands") or []
           for k in b):
        item.stac_extensions.append(RASTER_SCHEMA)
    item.properties["processing:lineage"] = _lineage(model, source, grid)
    item.properties["processing:software"] = {"segflow": _segflow_version()}
    if model.get("weights_sha256"):
        item.properties["segflow:weights_sha256"] = str(model["weights_sha256"])

    text = json.dumps(item.to_dict(include_self_link=False, transform_hrefs=False), indent=2) + "\n"
    return write_text_atomically(item_path, text, "STAC item")


def model_item(*, item_id: str, model: dict, classes: list[LabelClass], gsd: float | None,
               weights: dict[str, Any], description: str | None = None,
               datetime_: datetime | None = None) -> dict[str, Any]:
    """A STAC Item describing a model alone (``segflow model inspect --stac``), as a dict.

    The MLM fields are built and validated exactly as for an output's item
    (one function, :func:`_mlm_properties`); the item has no footprint (a
    model is not a place) and one asset, the weights, with the ``mlm:model``
    role.  ``weights`` holds the asset's fields: ``href``, ``type``,
    ``sha256``, ``size``, ``artifact_type``.
    """
    when = datetime_ or datetime.now(timezone.utc)
    mlm = _mlm_properties(model, stac_classes(classes), Path(f"{item_id}{ITEM_SUFFIX}"))
    item = pystac.Item(id=item_id, geometry=None, bbox=None, datetime=when, properties={})
    if gsd is not None:
        item.common_metadata.gsd = float(gsd)
    if description:
        item.common_metadata.description = description
    MLModelExtension.ext(item, add_if_missing=True).apply(mlm)
    _add_model_asset(item, model, weights)
    return item.to_dict(include_self_link=False, transform_hrefs=False)


def _add_model_asset(item: pystac.Item, model: dict, weights: dict[str, Any]) -> None:
    """The weights as the item's ``mlm:model`` asset, which MLM requires of every item that uses it."""
    extra: dict[str, Any] = {}
    if weights.get("artifact_type"):
        extra["mlm:artifact_type"] = str(weights["artifact_type"])
    if weights.get("sha256"):
        extra["file:checksum"] = "1220" + str(weights["sha256"])  # multihash: sha2-256, 32 bytes
    if weights.get("size") is not None:
        extra["file:size"] = int(weights["size"])
    item.add_asset("model", pystac.Asset(href=str(weights["href"]), media_type=weights.get("type"),
                                         title=f"{model.get('name')} weights", roles=["mlm:model", "mlm:weights"],
                                         extra_fields=extra))
    if "file:checksum" in extra and FILE_SCHEMA not in item.stac_extensions:  # (the labels' declared it too)
        item.stac_extensions.append(FILE_SCHEMA)


def _segflow_version() -> str:
    try:
        from importlib.metadata import version

        return version("segflow")
    except Exception:  # noqa: BLE001 - running from a source tree without metadata
        return "unknown"
