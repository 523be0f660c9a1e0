"""A label volume's quicklook: three orthogonal planes through each class, as a radiologist reads them.

Each row shows the axial, coronal and sagittal planes through the centre of a
class's largest connected component, so a lesion of a few voxels is cut and
shown, not missed by a plane through the volume's middle.  Whatever order the
file stores its axes in (RAS, LPS, a flipped slice axis), the planes are turned
to RAS with nibabel's orientation tools and then drawn in the radiological
convention: the patient's right on the viewer's left in axial and coronal
views, anterior on the left in sagittal ones, superior up.  The letters drawn
on each plane's edges are therefore fixed, and a scan stored LPS gives the same
picture as its RAS twin.  Pixels are made square in millimetres, so thick
slices are not squashed.

The label volume is never held: one streaming pass counts every voxel (the
legend's volumes are exact) and keeps a block grid per class
(:mod:`storage.labelcensus`); the largest components are found on those grids
and only their boxes read again (:mod:`storage.labelcomponents`); then only
the planes shown are read, from the labels and the image alike
(:mod:`storage.volumeslabs`: an uncompressed file is sliced directly, a
gzipped one, which cannot seek, streamed once in bounded slabs).  Memory
stays within a few slabs and grids whatever the volume's size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from nibabel.affines import obliquity
from nibabel.orientations import aff2axcodes, apply_orientation, io_orientation

from storage.classes import LABEL_TABLE_HEADER, LabelClass, table_names
from storage.errors import ConfigError
from storage.labelcensus import take_census
from storage.labelcomponents import component_centres
from storage.numbers import readable  # as the report pages write the same volumes
from storage.header import voxel_millilitres
from storage.quicklook_canvas import (
    LINE,
    MAX_LEGEND,
    ClassShown,
    LegendEntry,
    Panel,
    QuicklookInfo,
    Sheet,
    blend_labels,
    color_table,
    label_outline,
    palette_color,
    resize_linear,
    resize_nearest,
    save_png,
    short_name,
    text_width,
)
from storage.volumeslabs import LabelVolume, image_planes, store_planes

__all__ = ["volume_quicklook", "PLANES", "LETTERS"]

PLANES = (("axial", 2), ("coronal", 1), ("sagittal", 0))  # name, RAS axis the plane is perpendicular to
LETTERS = {  # radiological convention, for planes turned to RAS and drawn by _facing
    "axial": {"left": "R", "right": "L", "top": "A", "bottom": "P"},
    "coronal": {"left": "R", "right": "L", "top": "S", "bottom": "I"},
    "sagittal": {"left": "A", "right": "P", "top": "S", "bottom": "I"},
}
CELL = 256  # pixels of the volume's longest side, in millimetres, on screen
GAP = 8
OBLIQUE_DEGREES = 0.5  # a voxel axis this far from every anatomical axis is said to be oblique
MAX_ROWS = 4  # one row per class up to this many classes, else one row through the largest
PERCENTILES = (1.0, 99.0)  # default window: these percentiles of the shown image planes


def volume_quicklook(
    labels_path: str | PathLike[str],
    out_png: str | PathLike[str],
    *,
    image_path: str | PathLike[str] | None = None,
    image_store: Any = None,
    classes: Sequence[LabelClass] | None = None,
    window: tuple[float, float] | None = None,
    volumes_ml: Mapping[int, float] | None = None,
) -> QuicklookInfo:
    """Axial, coronal and sagittal planes through each class (at most 4 rows), labels filled and outlined.

    ``image_store``: the input's ingested image (``ImageStore.image``) where it is no one NIfTI file, e.g. a
    DICOM series (drawn without an image before).  ``window`` is (width, level) in image units, e.g. (400, 40) for soft
    tissue CT; by default the 1st-99th percentiles of the planes shown.
    ``classes`` default to the label table segflow stores in the NIfTI, else
    "class N" in palette colours.  Value 0 is background and not
    drawn.  Volumes are ``volumes_ml`` where given, else voxel count times
    voxel volume (exact: every voxel is counted).
    """
    if window is not None and (len(window) != 2 or not window[0] > 0):
        raise ConfigError(out_png, f"window must be (width, level) with a positive width, got {window}")
    labels_path, out = Path(labels_path), Path(out_png)
    volume = LabelVolume(labels_path)
    lab_img = volume.img
    affine = np.asarray(lab_img.affine, dtype=np.float64)
    ornt = io_orientation(affine)
    census = take_census(volume, track=MAX_ROWS)
    counts = census.counts
    listed = list(classes) if classes is not None else _file_classes(lab_img)
    shown = _shown(listed, counts, affine, lab_img, volumes_ml)
    present = [c for c in shown if c.value < len(counts) and counts[c.value] > 0]
    rows = present if len(present) <= MAX_ROWS else [max(present, key=lambda c: counts[c.value])]
    centres = component_centres(volume, census, [c.value for c in rows])
    if not centres:
        centres = [tuple(n // 2 for n in volume.shape)]
    planes = _planes(ornt, volume.shape)
    requests = [(_voxel_axis(ornt, ras), centre[_voxel_axis(ornt, ras)]) for centre in centres for _, ras in planes]
    label_planes = volume.planes(requests)
    img_planes = image_planes(Path(image_path), lab_img, requests) if image_path is not None else \
        store_planes(image_store, lab_img, requests) if image_store is not None else None
    lo, hi, how = _window(window, img_planes)

    top = int(max([len(counts) - 1] + [c.value for c in shown]))
    colors, drawn = color_table(shown, top)
    drawn[0] = False
    pictures = []
    for n, req in enumerate(requests):  # three per row (one for a slice), in PLANES order
        row, name = n // len(planes), planes[n % len(planes)][0]
        kept = [a for a in range(3) if a != req[0]]
        lab2d = _facing(label_planes[req], ornt, kept)
        img2d = _facing(img_planes[req], ornt, kept) if img_planes is not None else None
        size = _screen_size(affine, ornt, volume.shape, kept)
        pictures.append((row, name, req, _render(lab2d, img2d, size, lo, hi, colors, drawn)))
    captions = [_row_caption(rows[row] if rows else None, centre) for row, centre in enumerate(centres)]
    subtitles, legend = _subtitles(volume.shape, affine, how, lo, hi), _legend(shown, present)
    sheet = _lay_out(labels_path.name, subtitles, legend, pictures, captions, planes)
    panels = tuple(Panel(name, box, dict(LETTERS[name]), slice=(int(req[0]), int(req[1])),
                         through_class=rows[row].value if rows else None)
                   for (row, name, req, _), box in zip(pictures, sheet.boxes))
    path = save_png(sheet.image, out)
    return QuicklookInfo(path=path, size=sheet.image.size, panels=panels, classes=tuple(shown),
                         centres=tuple(tuple(int(v) for v in c) for c in centres),
                         note=None if present else "no labelled voxels", subtitles=tuple(subtitles),
                         legend=tuple(e.text for e in legend))


def _screen_size(affine: np.ndarray, ornt: np.ndarray, shape: Sequence[int], kept: list[int]) -> tuple[int, int]:
    """(rows, cols) of a plane on screen: millimetres at one scale for all planes, so pixels are square."""
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    extent = [0.0, 0.0, 0.0]  # per RAS axis
    for axis in range(3):
        extent[int(ornt[axis, 0])] = float(shape[axis] * sizes[axis])
    mm_per_px = max(extent) / CELL
    low, high = sorted(int(ornt[a, 0]) for a in kept)  # drawn: columns along the lower RAS axis, rows the higher
    return max(1, round(extent[high] / mm_per_px)), max(1, round(extent[low] / mm_per_px))


def _planes(ornt: np.ndarray, shape: Sequence[int]) -> tuple[tuple[str, int], ...]:
    """The planes worth drawing: all three, or for a volume one slice thick (a 2-D image kept as X x Y x 1, as
    nnU-Net keeps them) the plane across that slice alone (the other two are one voxel wide)."""
    thin = [axis for axis in range(3) if shape[axis] == 1]
    if len(thin) != 1:
        return PLANES
    return tuple(plane for plane in PLANES if _voxel_axis(ornt, plane[1]) == thin[0])


def _lay_out(title: str, subtitles: list[str], legend: list[LegendEntry], pictures: list, captions: list[str],
             planes: Sequence[tuple[str, int]] = PLANES) -> Sheet:
    """Rows of axial, coronal, sagittal pictures (of ``planes``), a caption above each row; boxes kept on
    ``sheet.boxes``."""
    widths = [p[3].shape[1] for p in pictures[:len(planes)]]
    height = max(p[3].shape[0] for p in pictures[:len(planes)])
    body = (max([sum(widths) + GAP * (len(widths) - 1)] + [text_width(c) + GAP for c in captions]),
            len(captions) * (LINE + height) + GAP * (len(captions) - 1))
    sheet = Sheet(title, subtitles, body, legend)
    for row, name, _, rgb in pictures:
        column = [n for n, _ in planes].index(name)
        y = row * (LINE + height + GAP)
        if column == 0:
            sheet.caption(captions[row], (0, y))
        box = sheet.paste(rgb, (sum(widths[:column]) + GAP * column, y + LINE))
        sheet.letters(box, LETTERS[name])
        sheet.boxes.append(box)
    return sheet


# --------------------------------------------------------------------------- classes


def _file_classes(img: Any) -> list[LabelClass]:
    """The label table segflow writes into a NIfTI comment extension; [] when there is none."""
    for ext in img.header.extensions:
        text = ext.get_content()
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
        if text.startswith(LABEL_TABLE_HEADER):
            return _parse_ctbl(text)
    return []


def _parse_ctbl(text: str) -> list[LabelClass]:
    """``value name R G B A`` lines, with the names as the card has them (:func:`storage.classes.table_names`);
    lines that do not parse are skipped (the table is a courtesy)."""
    names = table_names(text)
    out: dict[int, LabelClass] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5 or line.lstrip().startswith("#"):
            continue
        try:
            value = int(parts[0])
            color = tuple(int(p) for p in parts[2:5])
            out[value] = LabelClass(value=value, name=names.get(value, parts[1]), color=color)
        except ValueError:  # also pydantic's ValidationError, a ValueError
            continue
    return list(out.values())


def _shown(listed: list[LabelClass], counts: np.ndarray, affine: np.ndarray, img: Any,
           given: Mapping[int, float] | None) -> list[ClassShown]:
    """Every listed class and every value found, background (0) aside, with its volume in mL."""
    space_unit = img.header.get_xyzt_units()[0]
    voxel_ml, _ = voxel_millilitres(affine, space_unit)
    by_value = {c.value: c for c in listed if c.value != 0}
    for value in np.flatnonzero(counts):
        if value and int(value) not in by_value:
            by_value[int(value)] = LabelClass(value=int(value), name=f"class {value}", color=palette_color(int(value)))
    out = []
    for c in sorted(by_value.values(), key=lambda c: c.value):
        n = int(counts[c.value]) if c.value < len(counts) else 0
        if given is not None and c.value in given:
            amount: float | None = float(given[c.value])
        else:
            amount = n * voxel_ml if voxel_ml is not None else None
        out.append(ClassShown(value=c.value, name=short_name(c.name), color=tuple(c.color), amount=amount,
                              unit="mL", exact=True))
    return out


# --------------------------------------------------------------------------- planes


def _voxel_axis(ornt: np.ndarray, ras_axis: int) -> int:
    """The file's voxel axis nearest the RAS axis ``ras_axis`` (0 R, 1 A, 2 S)."""
    return int(np.flatnonzero(ornt[:, 0] == ras_axis)[0])


def _facing(plane: np.ndarray, ornt: np.ndarray, kept: list[int]) -> np.ndarray:
    """A plane over the voxel axes ``kept`` as drawn: RAS-ordered, then both axes reversed and transposed.

    Turned to RAS, the plane is P[u, v] with u the lower RAS axis.  Drawing
    rows from high v to low and columns from high u to low puts anterior or
    superior up and the patient's right (or anterior, in sagittal) on the left.
    """
    sub = np.array(ornt[kept], dtype=float)
    sub[:, 0] = np.argsort(np.argsort(sub[:, 0]))  # the two RAS axes renumbered 0, 1 in RAS order
    return apply_orientation(plane, sub)[::-1, ::-1].T


def _window(window: tuple[float, float] | None, planes: dict | None) -> tuple[float, float, str]:
    if window is not None:
        width, level = float(window[0]), float(window[1])
        return level - width / 2, level + width / 2, "given"
    if not planes:
        return 0.0, 1.0, "no image"
    values = np.concatenate([p.ravel() for p in planes.values()])
    values = values[np.isfinite(values)]
    if not values.size:
        return 0.0, 1.0, "no finite image values"
    lo, hi = np.percentile(values, PERCENTILES)
    return float(lo), float(hi if hi > lo else lo + 1.0), f"{PERCENTILES[0]:g}-{PERCENTILES[1]:g} % of the planes"


def _render(labels: np.ndarray, image: np.ndarray | None, size: tuple[int, int], lo: float, hi: float,
            colors: np.ndarray, drawn: np.ndarray) -> np.ndarray:
    """One plane as (rows, cols, 3) uint8 at ``size``: windowed grey, label fill, label outline."""
    lab = resize_nearest(labels, size)
    if image is None:
        grey = np.zeros(size, dtype=np.uint8)
    else:
        scaled = (resize_linear(np.nan_to_num(image), size) - lo) / (hi - lo)
        grey = np.rint(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)
    rgb = blend_labels(np.repeat(grey[:, :, None], 3, axis=2), lab, colors, drawn)
    edge = label_outline(lab, drawn)
    rgb[edge] = colors[np.minimum(lab[edge], len(colors) - 1)]
    return rgb


# --------------------------------------------------------------------------- words


def _subtitles(shape: Sequence[int], affine: np.ndarray, how: str, lo: float, hi: float) -> list[str]:
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    stored = "".join(aff2axcodes(affine))
    tilt = float(np.degrees(obliquity(affine[:4, :4])).max())
    if tilt >= OBLIQUE_DEGREES:  # the planes are the voxel grid's, turned from the anatomical ones
        stored += f", {tilt:.3g} degrees oblique (planes follow the voxel grid)"
    first = (f"{'x'.join(str(n) for n in shape)} voxels of {'x'.join(f'{s:.3g}' for s in sizes)} mm, stored {stored}; "
             "shown radiological (patient's right on the left)")
    second = f"window {lo:.4g} to {hi:.4g} ({how}); labels filled (alpha) and outlined"
    return [first, second]


def _legend(shown: list[ClassShown], present: list[ClassShown]) -> list[LegendEntry]:
    entries = [LegendEntry(None, "class (value): volume")]
    for c in shown[:MAX_LEGEND]:
        amount = "volume n/a" if c.amount is None else readable(c.amount, "mL")
        entries.append(LegendEntry(c.color, f"{c.name} ({c.value}): {amount}"))
    if len(shown) > MAX_LEGEND:
        entries.append(LegendEntry(None, f"... and {len(shown) - MAX_LEGEND} more classes"))
    if not present:
        entries.append(LegendEntry(None, "no labelled voxels"))
    if len(present) > MAX_ROWS:
        entries.append(LegendEntry(None, f"{len(present)} classes: planes through the largest"))
    return entries


def _row_caption(shown: ClassShown | None, centre: Sequence[int]) -> str:
    where = f"voxel ({', '.join(str(int(v)) for v in centre)})"
    if shown is None:
        return f"volume centre, {where}"
    return f"{shown.name} ({shown.value}): largest component's centre, {where}"
