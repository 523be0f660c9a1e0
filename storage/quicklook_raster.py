"""A raster label map's quicklook: the scene, the classes over it, and their areas.

The whole point is a picture of a 100k x 100k scene in seconds, so nothing is
read at full resolution: the label COG is read once at the quicklook's size
with rasterio's ``out_shape``, which GDAL serves from the nearest overview, and
the image is read onto exactly the same grid (same bounds, same shape) so the
overlay cannot drift, shift or flip against it.  An image on another grid is
cut to the labels' bounds; one in another CRS is warped onto the decimated
grid from its own overview.  Areas come from the caller's exact statistics when
given; otherwise they are counted on the decimated map and marked approximate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path

import numpy as np
import rasterio
from pydantic import ValidationError
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, Resampling
from rasterio.errors import RasterioError
from rasterio.io import DatasetReader
from rasterio.transform import Affine
from rasterio.vrt import WarpedVRT
from rasterio.windows import from_bounds

from storage import jsontext
from storage.bands import select_bands
from storage.classes import LabelClass
from storage.errors import ConfigError, CorruptInputError, IncompatibleInputError, InputError
from storage.header import pixel_hectares
from storage.numbers import readable  # as the report pages write the same areas
from storage.rasteropen import gdal_env, read_bands
from storage.quicklook_canvas import (
    ALPHA,
    MAX_LEGEND,
    ClassShown,
    LegendEntry,
    Panel,
    QuicklookInfo,
    Sheet,
    blend_labels,
    color_table,
    palette_color,
    save_png,
    short_name,
)

__all__ = ["raster_quicklook"]

STRETCH = (2.0, 98.0)  # percentiles of valid pixels mapped to black and white, per band
NO_IMAGE = (120, 120, 120)  # where the image has no data, or there is no image
NO_LABEL = (235, 235, 235)  # where there is no image and no label either
MIN_MAP_SIDE = 256  # a smaller map is magnified by a whole factor, so a person can see it


def raster_quicklook(
    labels_path: str | PathLike[str],
    out_png: str | PathLike[str],
    *,
    image_path: str | PathLike[str] | None = None,
    classes: Sequence[LabelClass] | None = None,
    rgb_bands: Sequence[str | int] | None = None,
    max_size: int = 1024,
    nodata: int | None = None,
    areas_ha: Mapping[int, float] | None = None,
) -> QuicklookInfo:
    """A PNG of the labels (alpha 0.45, nodata transparent) over the image, the map at most ``max_size`` a side.

    The image shows red/green/blue found by band name (descriptions or their
    aliases, e.g. B04/B03/B02), else colour interpretation, else its first
    three bands, else grey; ``rgb_bands`` (names or 1-based indexes, 1 or 3)
    overrides.  Each band is stretched between its 2nd and 98th percentile of
    valid pixels.  ``classes`` default to the COG's ``CLASSES`` tag, then its
    colour table, then "class N" in palette colours.  Legend areas are
    ``areas_ha`` where given (exact statistics); else pixel counts on the
    decimated map times its pixel area: approximate, as at that scale a pixel
    stands for many.  A geographic CRS has no areas ("area n/a (degrees)").
    Without overviews the decimated read still touches every block, so a big
    label map should be a COG (segflow's are).
    """
    if max_size < 16:
        raise ConfigError(out_png, f"max_size must be at least 16 pixels, got {max_size}")
    labels_path, out = Path(labels_path), Path(out_png)
    with gdal_env(), _open(labels_path) as lab:
        height, width = lab.height, lab.width
        step = max(1, math.ceil(max(height, width) / max_size))
        shape = (math.ceil(height / step), math.ceil(width / step))
        scale = (height / shape[0], width / shape[1])
        grid = lab.transform * Affine.scale(scale[1], scale[0])
        labels = _read(lab, labels_path, 1, shape, Resampling.nearest)
        nodata = _nodata(lab, nodata)
        shown = _classes(lab, labels, classes, nodata)
        overview = _overview_used(lab, max(scale))
        areas, note = _areas(lab, grid, labels, shown, areas_ha, exact_count=step == 1)
        if image_path is not None:
            base, bands, empty = _image(Path(image_path), lab, grid, shape, rgb_bands)
        else:
            base, bands, empty = None, None, None
        subtitles = [f"{width}x{height} px, {_grid_words(lab)}; shown 1:{step}"
                     + (f" from overview x{overview}" if overview else " from full resolution"),
                     f"labels over {'bands ' + ','.join(map(str, bands)) if bands else 'no image'}"
                     f" (alpha {ALPHA:g}; label nodata transparent)"]
    legend = _legend(areas, note, step, areas_ha is not None) + _blank_entries(labels, nodata, empty)
    rgb, turned = north_up(_compose(base, labels, areas, nodata), grid, lab.crs)
    if turned:
        subtitles.append(turned)
    magnification = max(1, MIN_MAP_SIDE // max(rgb.shape[:2]))
    if magnification > 1:  # a 12 x 8 scene was a 12 x 8 dot beside its legend; each pixel a visible block instead
        rgb = np.repeat(np.repeat(rgb, magnification, axis=0), magnification, axis=1)
        subtitles[0] += f", each pixel drawn {magnification} x {magnification}"
    sheet = Sheet(labels_path.name, subtitles, (rgb.shape[1], rgb.shape[0]), legend)
    box = sheet.paste(rgb, (0, 0))
    path = save_png(sheet.image, out)
    return QuicklookInfo(path=path, size=sheet.image.size, panels=(Panel("map", box),), classes=tuple(areas),
                         decimation=scale, read_shape=shape, overview=overview, magnification=magnification,
                         rgb_bands=tuple(bands) if bands else None, note=note, subtitles=tuple(subtitles),
                         legend=tuple(e.text for e in legend))


def _grid_words(lab: DatasetReader) -> str:
    """'EPSG:32633, 10 m pixels': enough for a person to tell the scene's scale."""
    if lab.crs is None:
        return "no CRS"
    t = lab.transform
    across, down = math.hypot(t.a, t.d), math.hypot(t.b, t.e)  # a column's and a row's step, rotated or not
    size = f"{across:g}" if math.isclose(across, down, rel_tol=1e-6) else f"{across:g} x {down:g}"
    if lab.crs.is_geographic:
        return f"{lab.crs.to_string()}, {size} degree pixels"
    unit = lab.crs.linear_units or "unit"
    return f"{lab.crs.to_string()}, {size} {'m' if unit in ('metre', 'meter') else unit} pixels"


def north_up(rgb: np.ndarray, grid: Affine, crs: CRS | None) -> tuple[np.ndarray, str | None]:
    """The picture as a map is read, north up, east right, square on the ground, and a line saying how it was
    turned; a picture that already is (the usual case) comes back untouched, with None.

    A raster stored south up, mirrored, rotated or with oblong pixels is
    drawn as stored otherwise: upside down, turned, or squashed, with nothing
    to say so.  A geographic CRS's degree pixels are narrower on the ground
    than they are tall away from the equator (half as wide at 60 degrees).
    Those pictures are resampled (nearest: the label colours stay whole) onto
    a grid of about the same size, outside the map light grey.
    """
    rows, cols = rgb.shape[:2]
    squeeze, lat = 1.0, None
    if crs is not None and crs.is_geographic:
        lat = (grid * (cols / 2, rows / 2))[1]
        squeeze = max(math.cos(math.radians(min(abs(lat), 89.0))), 0.05)
    # display coordinates, in ground units: x to the east, y to the south (a picture's rows run down)
    linear = np.array([[squeeze * grid.a, squeeze * grid.b], [-grid.d, -grid.e]])
    (a, b), (d, e) = linear
    if b == 0 and d == 0 and a > 0 and e > 0 and math.isclose(a, e, rel_tol=1e-6):
        return rgb, None
    corners = linear @ np.array([[0, cols, 0, cols], [0, 0, rows, rows]], dtype=float)
    low, extent = corners.min(axis=1), np.ptp(corners, axis=1)
    scale = max(rows, cols) / extent.max()
    width, height = (max(1, round(n * scale)) for n in extent)
    inverse = np.linalg.inv(linear)
    x = low[0] + (np.arange(width) + 0.5) / scale
    y = low[1] + (np.arange(height) + 0.5) / scale
    col = np.floor(inverse[0, 0] * x[None, :] + inverse[0, 1] * y[:, None]).astype(np.intp)
    row = np.floor(inverse[1, 0] * x[None, :] + inverse[1, 1] * y[:, None]).astype(np.intp)
    inside = (col >= 0) & (col < cols) & (row >= 0) & (row < rows)
    out = np.empty((height, width, 3), dtype=np.uint8)
    out[:] = NO_LABEL
    out[inside] = rgb[row[inside], col[inside]]
    return out, _turned_words(grid, lat)


def _turned_words(grid: Affine, lat: float | None) -> str:
    """What ``north_up`` did, in the words a map reader uses."""
    turned = []
    if grid.b or grid.d:
        turned.append(f"rotated {math.degrees(math.atan2(grid.d, grid.a)):.3g} degrees")
    else:
        if grid.e > 0:
            turned.append("south up")
        if grid.a < 0:
            turned.append("east-west mirrored")
    words = [f"shown north up (stored {', '.join(turned)})"] if turned else []
    if lat is not None:
        words.append(f"degree pixels drawn at their ground proportions at latitude {lat:.3g}")
    elif not math.isclose(math.hypot(grid.a, grid.d), math.hypot(grid.b, grid.e), rel_tol=1e-6):
        words.append("oblong pixels drawn at their ground proportions")
    return "; ".join(words)


# --------------------------------------------------------------------------- reading


def _open(path: Path, **options: str) -> DatasetReader:
    if not path.exists():
        raise InputError(path, "file does not exist")
    if path.is_dir():
        raise InputError(path, "is a directory, not a raster file")
    try:
        return rasterio.open(path, **options)
    except RasterioError as exc:
        raise CorruptInputError(path, f"rasterio cannot open it: {_message(exc)}") from None


def _message(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _read(src: DatasetReader, path: Path, bands: int | list[int], shape: tuple[int, int], resampling: Resampling,
          **kwargs: object) -> np.ndarray:
    try:
        if isinstance(bands, int):
            return src.read(bands, out_shape=shape, resampling=resampling, **kwargs)
        return read_bands(src, bands, out_shape=(len(bands), *shape), resampling=resampling, **kwargs)
    except RasterioError as exc:
        raise CorruptInputError(path, f"cannot read pixels: {_message(exc)}") from None


def _nodata(lab: DatasetReader, given: int | None) -> int | None:
    if given is not None:
        return int(given)
    value = lab.nodatavals[0]
    return None if value is None or not math.isfinite(value) else int(value)


def _overview_used(src: DatasetReader, factor: float) -> int | None:
    """The overview GDAL serves a read at ``factor`` from: the coarsest one not coarser than asked."""
    fits = [f for f in src.overviews(1) if f <= factor * 1.01]
    return max(fits) if fits else None


# --------------------------------------------------------------------------- classes and areas


def _file_classes(lab: DatasetReader) -> list[LabelClass] | None:
    """The classes segflow writes in the ``CLASSES`` tag; None when absent or not a valid table."""
    text = lab.tags().get("CLASSES")
    if not text:
        return None
    try:
        table = jsontext.loads(text)
        if not isinstance(table, list):
            return None
        return [LabelClass.model_validate(entry) for entry in table]
    except (ValueError, TypeError, ValidationError):
        return None  # a foreign or damaged tag: fall back on the colour table, never fail a picture


def _colormap(lab: DatasetReader) -> dict[int, tuple[int, int, int, int]]:
    try:
        return dict(lab.colormap(1))
    except ValueError:  # no colour table
        return {}


def _classes(lab: DatasetReader, labels: np.ndarray, given: Sequence[LabelClass] | None,
             nodata: int | None) -> list[tuple[LabelClass, int]]:
    """(class, decimated pixel count) for every listed class and every value found, nodata left out."""
    counts = np.bincount(labels.ravel(), minlength=1) if labels.size else np.zeros(1, dtype=np.int64)
    listed = list(given) if given is not None else (_file_classes(lab) or [])
    cmap = _colormap(lab) if not listed else {}
    by_value = {c.value: c for c in listed if c.value != nodata}
    for value in np.flatnonzero(counts):
        value = int(value)
        if value == nodata or value in by_value:
            continue
        rgba = cmap.get(value)
        color = tuple(rgba[:3]) if rgba and rgba[3] > 0 else palette_color(value)
        by_value[value] = LabelClass(value=value, name=f"class {value}", color=color)
    return [(c, int(counts[c.value]) if c.value < len(counts) else 0) for c in sorted(by_value.values(),
                                                                                     key=lambda c: c.value)]


def _areas(lab: DatasetReader, grid: Affine, labels: np.ndarray, shown: list[tuple[LabelClass, int]],
           given: Mapping[int, float] | None, *, exact_count: bool) -> tuple[list[ClassShown], str | None]:
    pixel_ha, why = pixel_hectares(grid, lab.crs, labels.shape[-2:])
    note = None
    if pixel_ha is None:
        note = "area n/a (degrees)" if lab.crs is not None and lab.crs.is_geographic else f"area n/a ({why})"
    out = []
    for c, count in shown:
        if given is not None and c.value in given:
            amount, exact = float(given[c.value]), True
        elif pixel_ha is not None:
            amount, exact = count * pixel_ha, exact_count
        else:
            amount, exact = None, False
        out.append(ClassShown(value=c.value, name=short_name(c.name), color=tuple(c.color), amount=amount,
                              unit="ha", exact=exact))
    return out, note


def _legend(areas: list[ClassShown], note: str | None, step: int, caller_areas: bool) -> list[LegendEntry]:
    entries = [LegendEntry(None, "class (value): area")]
    listed = areas if len(areas) <= MAX_LEGEND else [c for c in areas if c.amount != 0]  # many: those on the map
    for c in listed[:MAX_LEGEND]:
        if c.amount is None:
            text = f"{c.name} ({c.value}): {note or 'area n/a'}"
        else:
            text = f"{c.name} ({c.value}): {'' if c.exact else '~'}{readable(c.amount, 'ha')}"
        entries.append(LegendEntry(c.color, text))
    if len(listed) > MAX_LEGEND:
        entries.append(LegendEntry(None, f"... and {len(listed) - MAX_LEGEND} more classes"))
    if len(listed) < len(areas):
        entries.append(LegendEntry(None, f"{len(areas) - len(listed)} classes not on the map are not listed"))
    if note is None and any(not c.exact for c in areas):
        entries.append(LegendEntry(None, f"~ counted on the 1:{step} map: approximate"))
    elif caller_areas and note is None:
        entries.append(LegendEntry(None, "areas from exact statistics"))
    return entries


# --------------------------------------------------------------------------- image


def _pick_bands(src: DatasetReader, path: Path, wanted: Sequence[str | int] | None) -> list[int]:
    """1-based bands to show as R, G, B (or one grey band)."""
    offered = list(src.descriptions)
    if wanted is not None:
        picked = select_bands(list(wanted), offered, where=path, model="the quicklook",
                              hint="name them as listed, or by 1-based index")
        if len(picked) not in (1, 3):
            raise ConfigError(path, f"rgb_bands names {len(picked)} bands; give 3 (red, green, blue) or 1 (grey)")
        return [i + 1 for i in picked]
    try:
        return [i + 1 for i in select_bands(["red", "green", "blue"], offered, where=path)]
    except IncompatibleInputError:
        pass
    interp = list(src.colorinterp)
    if all(ci in interp for ci in (ColorInterp.red, ColorInterp.green, ColorInterp.blue)):
        return [interp.index(ci) + 1 for ci in (ColorInterp.red, ColorInterp.green, ColorInterp.blue)]
    bands = [i for i, ci in zip(src.indexes, interp) if ci != ColorInterp.alpha] or list(src.indexes)
    return bands[:3] if len(bands) >= 3 else bands[:1]


def _blank_entries(labels: np.ndarray, nodata: int | None, empty: np.ndarray | None) -> list[LegendEntry]:
    """The greys where nothing is labelled, named in the legend: a person saw a grey area and no entry for it."""
    unlabelled = labels == nodata if nodata is not None else np.zeros(labels.shape, dtype=bool)
    if empty is None:  # no image: label nodata is drawn light grey
        return [LegendEntry(NO_LABEL, "no label (nodata)")] if unlabelled.any() else []
    return [LegendEntry(NO_IMAGE, "no image data, no label")] if (unlabelled & empty).any() else []


def _image(path: Path, lab: DatasetReader, grid: Affine, shape: tuple[int, int],
           wanted: Sequence[str | int] | None) -> tuple[np.ndarray, list[int], np.ndarray]:
    """The image on the decimated label grid, stretched to uint8 RGB (H, W, 3), and where no band has data."""
    with _open(path) as src:
        bands = _pick_bands(src, path, wanted)
        if src.crs is not None and lab.crs is not None and src.crs != lab.crs:
            data = _warped(path, src, lab, grid, shape, bands)
        else:
            data = _cut(path, src, lab, shape, bands)
    rgb = np.stack([_stretch(data[i]) for i in range(len(bands))], axis=-1)
    if rgb.shape[-1] == 1:
        rgb = np.repeat(rgb, 3, axis=-1)
    empty = np.all(np.ma.getmaskarray(data) | ~np.isfinite(np.ma.getdata(data).astype(np.float32)), axis=0)
    return rgb, bands, empty


def _same_grid(src: DatasetReader, lab: DatasetReader) -> bool:
    return (src.width, src.height) == (lab.width, lab.height) and src.transform.almost_equals(lab.transform)


def _cut(path: Path, src: DatasetReader, lab: DatasetReader, shape: tuple[int, int], bands: list[int]) -> np.ma.MaskedArray:
    """Same CRS: read the labels' bounds from the image at the labels' decimated shape."""
    if _same_grid(src, lab):
        return _read(src, path, bands, shape, Resampling.average, masked=True)
    window = from_bounds(*lab.bounds, transform=src.transform)
    right, bottom = window.col_off + window.width, window.row_off + window.height
    if right <= 0 or bottom <= 0 or window.col_off >= src.width or window.row_off >= src.height:
        raise IncompatibleInputError(path, "the image does not overlap the label map")
    eps = 1e-6
    inside = (window.col_off >= -eps and window.row_off >= -eps and right <= src.width + eps
              and bottom <= src.height + eps)
    return _read(src, path, bands, shape, Resampling.average, masked=True, window=window, boundless=not inside)


def _warped(path: Path, src: DatasetReader, lab: DatasetReader, grid: Affine, shape: tuple[int, int],
            bands: list[int]) -> np.ma.MaskedArray:
    """Another CRS: warp onto the decimated grid from the image overview nearest that scale.

    A warp reads its source at the resolution it is opened at, so the image is
    reopened at its overview level first; otherwise a 1024-pixel quicklook would
    decode every full-resolution block.
    """
    try:
        with WarpedVRT(src, crs=lab.crs) as probe:  # the image's own pixel size, expressed in the labels' CRS
            native = abs(probe.transform.a)
    except RasterioError as exc:
        raise IncompatibleInputError(path, f"cannot warp the image to the labels' CRS: {_message(exc)}") from None
    factor = abs(grid.a) / native if native else 1.0
    levels = [n for n, f in enumerate(src.overviews(bands[0])) if f <= factor * 1.01]
    options = {"OVERVIEW_LEVEL": str(levels[-1])} if levels else {}
    with _open(path, **options) as level:
        try:
            with WarpedVRT(level, crs=lab.crs, transform=grid, width=shape[1], height=shape[0],
                           resampling=Resampling.bilinear) as vrt:
                return read_bands(vrt, bands, masked=True)
        except RasterioError as exc:
            raise IncompatibleInputError(path, f"cannot warp the image to the labels' CRS: {_message(exc)}") from None


def _stretch(band: np.ma.MaskedArray) -> np.ndarray:
    """uint8 from the 2-98 % range of valid pixels; invalid pixels get NO_IMAGE's grey."""
    data = np.ma.getdata(band).astype(np.float32, copy=False)
    valid = ~np.ma.getmaskarray(band) & np.isfinite(data)
    out = np.full(data.shape, NO_IMAGE[0], dtype=np.uint8)
    if not valid.any():
        return out
    lo, hi = np.percentile(data[valid], STRETCH)
    if hi <= lo:
        hi = lo + 1.0
    out[valid] = np.rint(np.clip((data[valid] - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)
    return out


def _compose(base: np.ndarray | None, labels: np.ndarray, shown: list[ClassShown], nodata: int | None) -> np.ndarray:
    """Labels over the image at ALPHA; without an image, labels in full colour on light grey."""
    top = int(max([labels.max() if labels.size else 0] + [c.value for c in shown] + [0]))
    colors, drawn = color_table(shown, top)
    if nodata is not None and 0 <= nodata <= top:
        drawn[nodata] = False
    if base is None:
        canvas = np.empty((*labels.shape, 3), dtype=np.uint8)
        canvas[:] = NO_LABEL
        return blend_labels(canvas, labels, colors, drawn, alpha=1.0)
    return blend_labels(base, labels, colors, drawn)

