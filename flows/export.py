"""Export of a finished prediction store: the label map (and probabilities) as files people open.

Rasters become a label COG (and a probability COG when probabilities were
kept); volumes become a NIfTI on exactly the input's grid, plus the same labels
on the model's grid when a run kept them (``--model-space keep``).  Each file
is renamed into place whole, and the caller learns of each as it lands, so a
later failure removes exactly what this run wrote.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import zarr

from flows.progress import say
from segmentation import LoadedModel
from segmentation.chunkwrites import PROBABILITY_SCALE
from storage.bands import BandRequest
from storage.errors import IncompatibleInputError, SegflowError
from storage.geometry import VolumeGeometry
from storage.inputfiles import stem_of
from storage.layout import ARRAY_CONFIG, LABELS, PROBABILITIES, writable

MODEL_LABELS = "model_labels"


def model_space_labels(partial: Path, stitch: Any, dtype: str, geometry: Any) -> Any:
    """The prediction store's label array on the model's grid (``--model-space keep``), with that grid's geometry."""
    group = zarr.open_group(str(partial), mode="a")
    if MODEL_LABELS not in group:
        array = group.create_array(MODEL_LABELS, shape=stitch.output_shape, dtype=dtype,
                                   chunks=tuple(c[0] for c in stitch.chunks), fill_value=0, config=ARRAY_CONFIG)
        array.attrs["geometry"] = geometry.model_dump(mode="json")
    return writable(group[MODEL_LABELS])


def export_labels(pred_path: Path, meta: Any, model: LoadedModel, out_path: Path,
                  record: dict[str, Any], created: list[Path] | None = None, vector: str = "none",
                  simplify: float | None = None, beside: Path | None = None) -> list[Path]:
    """The label map (and, for rasters, a probability COG when probabilities were kept).

    Each file is renamed into place whole; ``created`` collects them as they
    land, so a later failure can remove exactly what this run put there.
    ``simplify`` (the polygons' tolerance) defaults to the run's recorded
    ``--simplify`` parameter, so the polygons always match the provenance.
    ``beside``: the folder the outputs are published to, when ``out_path``
    is in a staging folder (:func:`qgis_styles`).
    """
    if simplify is None:
        simplify = (record.get("parameters") or {}).get("simplify")
    created = [] if created is None else created
    group = zarr.open_group(str(pred_path), mode="r")
    labels = group[LABELS]
    if meta.kind == "raster":
        from storage.cogwrite import write_label_cog, write_probability_cog

        written = [write_label_cog(labels, meta.geometry, out_path, classes=model.card.classes,
                                   provenance=record)]
        created.append(written[-1])
        if PROBABILITIES in group:
            probs = group[PROBABILITIES]
            written.append(write_probability_cog(
                _Probabilities(probs), meta.geometry, probabilities_path(out_path),
                class_names=[c.name for c in model.card.classes], mask=_Valid(labels, group.attrs["nodata_label"]),
                dtype=str(probs.dtype), provenance=record))
            created.append(written[-1])
        polygons = None
        when = scene_time(meta, record)  # once: for a mosaic it opens every tile
        if vector != "none":
            # listed before it is written: the writer renames the file into place, then totals the areas, and an
            # interrupt between the two had left a finished-looking .gpkg that no cleanup knew of
            created.append(vector_path(out_path, vector))
            polygons = write_vectors(labels, meta, model, out_path, vector, group.attrs["nodata_label"],
                                     simplify=simplify, changed=when)
            written.append(polygons)
        from storage.header import on_the_earth

        if on_the_earth(_crs(meta.geometry)):  # a STAC item needs a footprint on the Earth
            written.append(stac_item(meta, model, out_path, record, written, polygons, when))
            created.append(written[-1])
        written += qgis_styles([out_path], model.card.classes, created, beside)
        return written
    from storage.nifti import write_label_nifti

    written = [write_label_nifti(labels, meta.geometry, out_path, classes=model.card.classes, provenance=record)]
    created.append(written[-1])
    if MODEL_LABELS in group:  # --model-space keep: the same labels on the model's grid
        in_model = group[MODEL_LABELS]
        geometry = VolumeGeometry.model_validate(in_model.attrs["geometry"])
        written.append(write_label_nifti(in_model, geometry, out_path.with_name(stem_of(out_path) + ".model-space.nii.gz"),
                                         classes=model.card.classes, provenance=record))
        created.append(written[-1])
    return written


def qgis_styles(cogs: list[Path], classes: Any, created: list[Path], beside: Path | None = None) -> list[Path]:
    """``<stem>.qml`` beside each label COG (a mosaic's tile cuts too), QGIS's legend: names, not values.  A
    style already there is the user's own (QGIS's "Save as Default"): earlier runs' were set aside before the
    export began (:mod:`flows.replacing`), so it is kept and none written.  ``beside``: the folder the COGs go
    to once published, where a style is looked for (they are written in a staging folder first)."""
    from storage.labeltables import qgis_style_path, write_qgis_style

    written: list[Path] = []
    for cog in cogs:
        style = qgis_style_path(cog)
        final = style if beside is None else Path(beside) / style.name
        if final.exists() or final.is_symlink():
            say(f"{final}: kept, a QGIS style already there (the user's own, or an earlier run's changed since); "
                "no style of its own written", logging.INFO)
        else:
            created.append(write_qgis_style(cog, classes))
            written.append(created[-1])
    return written


VECTOR_SUFFIX = {"gpkg": ("GPKG", ".gpkg"), "parquet": ("Parquet", ".parquet"), "geojson": ("GeoJSON", ".geojson")}


def vector_path(out_path: Path, vector: str) -> Path:
    """Where ``--vector`` writes the polygons of the labels at ``out_path``."""
    return out_path.with_name(stem_of(out_path) + VECTOR_SUFFIX[vector][1])


def write_vectors(labels: Any, meta: Any, model: LoadedModel, out_path: Path, vector: str, nodata: int,
                  simplify: float | None = None, changed: Any = None) -> Path:
    """The labels as polygons per class (area in hectares), merged across chunks: ``<stem>.<gpkg|parquet|geojson>``.

    ``simplify`` (CRS units) simplifies them keeping shared borders shared; areas stay the pixel areas.
    ``changed``: a GeoPackage's ``last_change`` (:func:`scene_time`), else GDAL writes the time of writing.
    """
    from affine import Affine

    from storage.vectors import write_polygons

    driver = VECTOR_SUFFIX[vector][0]
    geometry = meta.geometry
    path = vector_path(out_path, vector)
    write_polygons(labels, Affine(*geometry.transform), _crs(geometry), path, classes=model.card.classes, nodata=nodata,
                   chunk=int(labels.chunks[0]), driver=driver, simplify=simplify,  # type: ignore[arg-type]
                   changed=changed)
    return path


def _crs(geometry: Any) -> Any:
    """A raster geometry's CRS as rasterio takes it (its EPSG code first), None without one."""
    from rasterio.crs import CRS

    return CRS.from_epsg(geometry.epsg) if geometry.epsg else CRS.from_wkt(geometry.crs_wkt) if geometry.crs_wkt \
        else None


def stac_item(meta: Any, model: LoadedModel, out_path: Path, record: dict[str, Any], written: list[Path],
              polygons: Path | None = None, when: Any = None) -> Path:
    """``<stem>.stac.json``: the label COG (classification), probabilities, and the model as MLM describes it."""
    from segmentation.mlm import weights_asset
    from storage.stac import PYSTAC_MISREADS, pystac_misreads, write_stac_item

    card = model.card
    spacing = card.input.spacing
    device = str(record.get("environment", {}).get("device", "cpu"))
    tiles = _tiles(record)
    item = write_stac_item(
        out_path, item_id=stem_of(out_path), label_cog=written[0], classes=card.classes,
        model=_model_description(card, model.weights_sha256, "cuda" if device.startswith("cuda") else "cpu",
                                 _band_names(card, meta, record)),
        gsd=float(spacing[0]) if spacing and spacing[0] > 0 and card.input.spacing_unit == "m" else None,
        source=str(meta.source.path), vectors=polygons,
        datetime_=when if when is not None else scene_time(meta, record),
        weights=weights_asset(model),
        probability_cog=written[1] if len(written) > 1 and written[1].name.endswith(".probabilities.tif") else None,
        grid=_written_grid(record))
    if tiles:  # a mosaic (storage.mosaic) derives from each of its tiles
        _link_tiles(item, tiles)
    misread = pystac_misreads([p.name for p in (item, *written, polygons) if p is not None])
    if misread:
        char = next(c for c in PYSTAC_MISREADS if c in misread[0])
        say(f"{item.name}: the outputs' names hold '{char}', which pystac takes as URL syntax: the item is valid "
            "STAC, but pystac will not find its files (rename the input to read them with pystac)", logging.WARNING)
    return item


def _written_grid(record: dict[str, Any]) -> str:
    """"model" when the labels went out on the model's grid (``--output-grid model`` where model space applied):
    the item's lineage had said "on the input grid" whatever the run did."""
    resampling = (record.get("parameters") or {}).get("resampling") or {}  # present where model space applied
    return "model" if resampling.get("output_grid") == "model" else "input"


def _link_tiles(item_path: Path, tiles: list[str]) -> None:
    """Replace a mosaic's item's ``derived_from`` link (its name) by one per tile, in the order named."""
    import json

    from storage.atomic import write_text_atomically

    doc = json.loads(item_path.read_text())
    links = [link for link in doc.get("links", []) if link.get("rel") != "derived_from"]
    links += [{"rel": "derived_from", "href": t, "title": "Segmented source (a tile of the mosaic)"} for t in tiles]
    doc["links"] = links
    write_text_atomically(item_path, json.dumps(doc, indent=2) + "\n", "STAC item")


def _band_names(card: Any, meta: Any, record: dict[str, Any]) -> list[str]:
    """The bands the network got, in its order: the card's names for them, else the input bands the run chose
    (``--bands 3,2,1`` or the card's rule; the provenance's ``statistics.bands``), else the stored ones."""
    chosen = (record.get("statistics") or {}).get("bands")
    return list(card.input.channel_names or chosen or meta.channel_names[:card.input.channels])


def _model_description(card: Any, weights_sha256: str, accelerator: str, bands: list[str]) -> dict[str, Any]:
    """The model as MLM describes it: the same function as `segflow model inspect --stac` (segmentation.mlm)."""
    from segmentation.mlm import model_description

    return model_description(card, weights_sha256=weights_sha256, accelerator=accelerator, bands=bands)


def _tiles(record: dict[str, Any]) -> list[str]:
    return [str(t["path"]) for t in ((record.get("input") or {}).get("mosaic") or {}).get("tiles", [])]


def scene_time(meta: Any, record: dict[str, Any]) -> Any:
    """The time outputs carry (the STAC item's datetime, the GeoPackage's ``last_change``): a source STAC item's
    own, else the scene's (:func:`_source_time`; a mosaic's newest tile's).  Never "now", so that a resumed run's
    outputs equal an uninterrupted run's byte for byte."""
    item_info = getattr(meta.geometry, "stac_item", None)
    if item_info is not None and item_info.datetime:
        return _item_time(item_info.datetime)
    tiles = _tiles(record)
    if not tiles:
        return _source_time(Path(str(meta.source.path)))
    return max((t for t in (_source_time(Path(p)) for p in tiles) if t is not None), default=None)


def _item_time(stamp: str) -> Any:
    """A source STAC item's own datetime, for the output item: the scene's time, as for a GeoTIFF's tag."""
    from datetime import datetime

    return datetime.fromisoformat(stamp)


def _source_time(path: Path) -> Any:
    """The STAC item's datetime: the scene's own (TIFF DateTime tag), else its file's modification time.

    Never "now": the same input and model must give a byte-identical item, as
    they give identical labels, so a resumed run's outputs equal an uninterrupted one's.
    """
    from datetime import datetime, timezone

    import rasterio

    import warnings

    from rasterio.errors import NotGeoreferencedWarning

    try:
        with warnings.catch_warnings():  # a picture (VOC's JPEG, Cityscapes' PNG) has no geotransform: no matter here
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(path) as src:
                stamp = src.tags().get("TIFFTAG_DATETIME")
        if stamp:
            return datetime.strptime(stamp, "%Y:%m:%d %H:%M:%S").replace(tzinfo=timezone.utc)
        return datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc).replace(microsecond=0)
    except (OSError, ValueError, rasterio.errors.RasterioError):
        return None


class _Probabilities:
    """Stored probabilities read back as floats in [0, 1], whatever their stored dtype."""

    def __init__(self, array: Any) -> None:
        self.array, self.shape, self.chunks = array, array.shape, array.chunks

    def __getitem__(self, key: Any) -> Any:
        block = np.asarray(self.array[key])
        return block.astype(np.float32) / PROBABILITY_SCALE if block.dtype == np.uint8 else block


class _Valid:
    """Where the labels are not the nodata label: the valid-data mask of a prediction."""

    def __init__(self, labels: Any, nodata: int) -> None:
        self.labels, self.nodata, self.shape = labels, nodata, labels.shape

    def __getitem__(self, key: Any) -> Any:
        return np.asarray(self.labels[key]) != self.nodata


def probabilities_path(out_path: Path) -> Path:
    return out_path.with_name(stem_of(out_path) + ".probabilities.tif")


@contextlib.contextmanager
def quicklook_image(input_path: Any, bands: BandRequest, work: Path,
                    origin: str | None = None) -> Iterator[Path | None]:
    """The picture a quicklook draws under the labels: a local GeoTIFF, VRT or NIfTI input itself; for a STAC
    item, a VRT in ``work`` stacking its red, green and blue assets (else the model's ``bands``), read from the
    assets where they are, removed on exit; None for what has no one image (a DICOM series, a mosaic) or an
    item whose bands cannot be stacked (the quicklook then shows the labels alone)."""
    from storage.stacitem import is_item_path

    path = Path(input_path) if isinstance(input_path, (str, Path)) else None
    if path is None or not path.is_file():
        yield None
    elif path.name.lower().endswith((".tif", ".tiff", ".vrt", ".nii", ".nii.gz", ".png", ".jpg", ".jpeg")):
        yield path
    elif not is_item_path(path):
        yield None
    else:
        target = work / f"{stem_of(path)}.quicklook.vrt"
        try:
            yield _stacked_rgb(path, bands, target, origin)
        finally:
            target.unlink(missing_ok=True)


def _stacked_rgb(item: Path, bands: BandRequest, target: Path, origin: str | None) -> Path | None:
    from storage.stacitem import build_vrt, plan_item

    try:
        try:
            plan = plan_item(item, BandRequest(("red", "green", "blue"), channels=3), origin=origin)
        except IncompatibleInputError:
            plan = plan_item(item, bands, origin=origin)
        target.parent.mkdir(parents=True, exist_ok=True)
        return build_vrt(plan, target)[0]
    except (SegflowError, OSError):
        return None


def write_quicklook(label_path: Path, image_path: Path | None, model: LoadedModel, statistics: dict[str, Any],
                    created: list[Path], image_store: Any = None) -> Path | None:
    """``<stem>.quicklook.png`` beside a label output: the labels over the input in the card's colours, with
    exact areas (ha) or volumes (mL) from the run's label histogram; ``image_store``, the ingested image of a
    volume that is no one file (a DICOM series), is drawn under them.  A picture is a nicety: one that cannot be
    drawn (an odd input, no overview to read) is left out with a warning, never failing the input; one drawn that
    cannot be written (a full disk) fails it, as any output would."""
    from flows.htmlreport import quicklook_path
    from storage.errors import ExportError, SegflowError
    from storage.probe import probe
    from storage.quicklook import raster_quicklook, volume_quicklook

    target = quicklook_path(label_path)
    try:
        header = probe(label_path)
        counts = {int(k): int(v) for k, v in (statistics.get("label_pixels") or {}).items()}
        sizes = None if header.cell_size is None else {v: n * header.cell_size for v, n in counts.items()}
        image = image_path if image_path is not None and Path(image_path).is_file() else None
        if header.kind == "volume":
            volume_quicklook(label_path, target, image_path=image, image_store=None if image else image_store,
                             classes=model.card.classes, volumes_ml=sizes)
        else:
            raster_quicklook(label_path, target, image_path=image, classes=model.card.classes, areas_ha=sizes)
    except ExportError:  # the picture drawn, but the disk full or the folder unwritable: an output not written,
        target.unlink(missing_ok=True)  # as for any other (it had been a warning: a done input, skipped ever after)
        raise
    except (SegflowError, OSError, ValueError) as exc:
        logging.getLogger("segflow").warning("no quicklook for %s: %s", label_path, exc)
        target.unlink(missing_ok=True)
        return None
    created.append(target)
    return target


__all__ = ["MODEL_LABELS", "export_labels", "model_space_labels", "probabilities_path", "quicklook_image",
           "write_quicklook"]
