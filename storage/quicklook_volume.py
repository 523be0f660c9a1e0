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

The label volume is read once, slab by slab, into one uint8 array to count
classes and find components; large components are searched on a
block-reduced mask, so memory stays near the label volume's own size.  Of the
image only the planes shown are kept: an uncompressed file is sliced
directly, a gzipped one (which cannot seek) streamed once in bounded slabs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.orientations import aff2axcodes, apply_orientation, io_orientation
from nibabel.spatialimages import HeaderDataError
from scipy import ndimage

from storage.classes import LabelClass
from storage.errors import ConfigError, CorruptInputError, IncompatibleInputError, InputError, InvalidInputError
from storage.probe import voxel_millilitres
from storage.quicklook_canvas import (
    LINE,
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

__all__ = ["volume_quicklook", "PLANES", "LETTERS"]

PLANES = (("axial", 2), ("coronal", 1), ("sagittal", 0))  # name, RAS axis the plane is perpendicular to
LETTERS = {  # radiological convention, for planes turned to RAS and drawn by _facing
    "axial": {"left": "R", "right": "L", "top": "A", "bottom": "P"},
    "coronal": {"left": "R", "right": "L", "top": "S", "bottom": "I"},
    "sagittal": {"left": "A", "right": "P", "top": "S", "bottom": "I"},
}
CELL = 256  # pixels of the volume's longest side, in millimetres, on screen
GAP = 8
MAX_ROWS = 4  # one row per class up to this many classes, else one row through the largest
MAX_LEGEND = 30
PERCENTILES = (1.0, 99.0)  # default window: these percentiles of the shown image planes
COMPONENT_VOXELS = 1 << 23  # a component search above this many voxels runs on a block-reduced mask
_SLAB_BYTES = 16 << 20  # what one slab read or compared at a time may take
_READ_ERRORS = (ImageFileError, HeaderDataError, EOFError, OSError, ValueError)


def volume_quicklook(
    labels_path: str | PathLike[str],
    out_png: str | PathLike[str],
    *,
    image_path: str | PathLike[str] | None = None,
    classes: Sequence[LabelClass] | None = None,
    window: tuple[float, float] | None = None,
    volumes_ml: Mapping[int, float] | None = None,
) -> QuicklookInfo:
    """Axial, coronal and sagittal planes through each class (at most 4 rows), labels filled and outlined.

    ``window`` is (width, level) in image units, e.g. (400, 40) for soft
    tissue CT; by default the 1st-99th percentiles of the planes shown.
    ``classes`` default to the label table segflow stores in the NIfTI, else
    "class N" in palette colours.  Value 0 is background and not
    drawn.  Volumes are ``volumes_ml`` where given, else voxel count times
    voxel volume (exact: every voxel is counted).
    """
    if window is not None and (len(window) != 2 or not window[0] > 0):
        raise ConfigError(out_png, f"window must be (width, level) with a positive width, got {window}")
    labels_path, out = Path(labels_path), Path(out_png)
    lab_img = _load(labels_path)
    labels = _label_array(lab_img, labels_path)
    affine = np.asarray(lab_img.affine, dtype=np.float64)
    ornt = io_orientation(affine)
    counts, first, last = _census(labels)
    listed = list(classes) if classes is not None else _file_classes(lab_img)
    shown = _shown(listed, counts, affine, lab_img, volumes_ml)
    present = [c for c in shown if c.value < len(counts) and counts[c.value] > 0]
    rows = present if len(present) <= MAX_ROWS else [max(present, key=lambda c: counts[c.value])]
    centres = [_component_centre(labels, c.value, (int(first[c.value]), int(last[c.value]))) for c in rows]
    if not centres:
        centres = [tuple(n // 2 for n in labels.shape)]
    requests = [(_voxel_axis(ornt, ras), centre[_voxel_axis(ornt, ras)]) for centre in centres for _, ras in PLANES]
    label_planes = {r: _take(labels, r) for r in requests}
    image_planes = _image_planes(Path(image_path), lab_img, requests) if image_path is not None else None
    lo, hi, how = _window(window, image_planes)

    top = int(max([len(counts) - 1] + [c.value for c in shown]))
    colors, drawn = color_table(shown, top)
    drawn[0] = False
    pictures = []
    for n, req in enumerate(requests):  # three per row, in PLANES order
        row, name = n // len(PLANES), PLANES[n % len(PLANES)][0]
        kept = [a for a in range(3) if a != req[0]]
        lab2d = _facing(label_planes[req], ornt, kept)
        img2d = _facing(image_planes[req], ornt, kept) if image_planes is not None else None
        size = _screen_size(affine, ornt, labels.shape, kept)
        pictures.append((row, name, req, _render(lab2d, img2d, size, lo, hi, colors, drawn)))
    captions = [_row_caption(rows[row] if rows else None, centre) for row, centre in enumerate(centres)]
    sheet = _lay_out(labels_path.name, _subtitles(labels.shape, affine, how, lo, hi), _legend(shown, present),
                     pictures, captions)
    panels = tuple(Panel(name, box, dict(LETTERS[name]), slice=(int(req[0]), int(req[1])),
                         through_class=rows[row].value if rows else None)
                   for (row, name, req, _), box in zip(pictures, sheet.boxes))
    path = save_png(sheet.image, out)
    return QuicklookInfo(path=path, size=sheet.image.size, panels=panels, classes=tuple(shown),
                         centres=tuple(tuple(int(v) for v in c) for c in centres),
                         note=None if present else "no labelled voxels")


def _screen_size(affine: np.ndarray, ornt: np.ndarray, shape: Sequence[int], kept: list[int]) -> tuple[int, int]:
    """(rows, cols) of a plane on screen: millimetres at one scale for all planes, so pixels are square."""
    sizes = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    extent = [0.0, 0.0, 0.0]  # per RAS axis
    for axis in range(3):
        extent[int(ornt[axis, 0])] = float(shape[axis] * sizes[axis])
    mm_per_px = max(extent) / CELL
    low, high = sorted(int(ornt[a, 0]) for a in kept)  # drawn: columns along the lower RAS axis, rows the higher
    return max(1, round(extent[high] / mm_per_px)), max(1, round(extent[low] / mm_per_px))


def _lay_out(title: str, subtitles: list[str], legend: list[LegendEntry], pictures: list, captions: list[str]) -> Sheet:
    """Rows of axial, coronal, sagittal pictures, a caption above each row; boxes kept on ``sheet.boxes``."""
    widths = [p[3].shape[1] for p in pictures[:3]]
    height = max(p[3].shape[0] for p in pictures[:3])
    body = (max([sum(widths) + GAP * 2] + [text_width(c) + GAP for c in captions]),
            len(captions) * (LINE + height) + GAP * (len(captions) - 1))
    sheet = Sheet(title, subtitles, body, legend)
    for row, name, _, rgb in pictures:
        column = [n for n, _ in PLANES].index(name)
        y = row * (LINE + height + GAP)
        if column == 0:
            sheet.caption(captions[row], (0, y))
        box = sheet.paste(rgb, (sum(widths[:column]) + GAP * column, y + LINE))
        sheet.letters(box, LETTERS[name])
        sheet.boxes.append(box)
    return sheet


# --------------------------------------------------------------------------- reading


def _load(path: Path) -> Any:
    if not path.exists():
        raise InputError(path, "file does not exist")
    if path.is_dir():
        raise InputError(path, "is a directory, not a NIfTI file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = nib.load(path, mmap=False, keep_file_open=True)
    except _READ_ERRORS as exc:
        raise CorruptInputError(path, f"cannot read it as NIfTI: {_message(exc)}") from None
    if not isinstance(img, nib.Nifti1Pair):  # also Nifti1Image, Nifti2Image
        raise InvalidInputError(path, f"is {type(img).__name__}, not NIfTI")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InvalidInputError(path, "has a singular or non-finite affine (no voxel-to-world mapping)")
    return img


def _message(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _label_array(img: Any, path: Path) -> np.ndarray:
    """The whole label volume as uint8 (uint16 for wider files), read a slab at a time.

    Reading a ``.nii.gz`` in one go makes Python's gzip return a second copy
    of the whole volume before nibabel copies it in; slabs into one array
    keep the peak at the label volume plus a slab.
    """
    shape = tuple(int(n) for n in img.shape)
    if len(shape) < 2 or (len(shape) > 3 and any(n != 1 for n in shape[3:])):
        raise InvalidInputError(path, f"has shape {shape}; a label volume is 3-D")
    ni, nj, nk = (*shape[:2], shape[2] if len(shape) > 2 else 1)
    disk = np.dtype(img.get_data_dtype())
    scaled = (float(img.dataobj.slope), float(img.dataobj.inter)) != (1.0, 0.0)
    if disk.kind not in "biuf" or disk.fields is not None:
        raise InvalidInputError(path, f"labels have data type {disk}; expected integers")
    narrow = disk.itemsize == 1 and disk.kind in "biu" and not scaled
    out = np.empty((ni, nj, nk), dtype=np.uint8 if narrow else np.uint16, order="F")
    step = max(1, _SLAB_BYTES // max(1, ni * nj * max(disk.itemsize, 4 if scaled else 1)))
    tail = (0,) * (len(shape) - 3)
    for k0 in range(0, nk, step):
        k1 = min(k0 + step, nk)
        try:
            if len(shape) == 2:
                slab = np.asanyarray(img.dataobj).reshape(ni, nj, 1)
            else:
                slab = np.asanyarray(img.dataobj[(slice(None), slice(None), slice(k0, k1), *tail)])
        except _READ_ERRORS as exc:
            raise CorruptInputError(path, f"cannot read voxel data (slices {k0}-{k1 - 1}): {_message(exc)}") from None
        out[:, :, k0:k1] = _checked(slab, path, np.iinfo(out.dtype).max)
    return out


def _checked(slab: np.ndarray, path: Path, top: int) -> np.ndarray:
    """A slab of label values, refused when they are not whole numbers in 0..``top``."""
    if slab.dtype.kind == "b" or slab.dtype in (np.dtype(np.uint8), np.dtype(np.uint16)) or not slab.size:
        return slab
    if slab.dtype.kind == "f" and (not np.all(np.isfinite(slab)) or np.any(slab != np.rint(slab))):
        raise InvalidInputError(path, "label values are not whole numbers")
    low, high = slab.min(), slab.max()
    if low < 0:
        raise InvalidInputError(path, f"has negative label values (down to {low})")
    if high > top:
        raise InvalidInputError(path, f"has label values up to {high}; a quicklook draws values up to {top}")
    return slab


def _census(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxels per value and the first and last k slice holding each, one k slice at a time.

    ``np.bincount`` of the whole volume would first copy it to 8-byte
    integers; a slice at a time keeps that copy small.
    """
    top = int(labels.max()) if labels.size else 0
    depth = labels.shape[2]
    counts = np.zeros(top + 1, dtype=np.int64)
    first = np.full(top + 1, depth, dtype=np.int64)
    last = np.full(top + 1, -1, dtype=np.int64)
    for k in range(depth):
        c = np.bincount(labels[:, :, k].ravel(order="K"), minlength=top + 1)
        counts += c
        seen = c > 0
        first[seen & (first == depth)] = k
        last[seen] = k
    return counts, first, last


def _file_classes(img: Any) -> list[LabelClass]:
    """The label table segflow writes into a NIfTI comment extension; [] when there is none."""
    for ext in img.header.extensions:
        text = ext.get_content()
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
        if text.startswith("# segflow label table"):
            return _parse_ctbl(text)
    return []


def _parse_ctbl(text: str) -> list[LabelClass]:
    """``value name R G B A`` lines; lines that do not parse are skipped (the table is a courtesy)."""
    out: dict[int, LabelClass] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 5 or line.lstrip().startswith("#"):
            continue
        try:
            value = int(parts[0])
            color = tuple(int(p) for p in parts[2:5])
            out[value] = LabelClass(value=value, name=parts[1].replace("_", " "), color=color)
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


# --------------------------------------------------------------------------- where to cut


def _component_centre(labels: np.ndarray, value: int, k_range: tuple[int, int]) -> tuple[int, int, int]:
    """Voxel (i, j, k) at the centre of ``value``'s largest 6-connected component, inside it.

    The search runs in the class's bounding box; a box over COMPONENT_VOXELS
    is reduced by blocks (a block is set if any voxel is), so a body-sized
    class costs a fraction of the volume in memory, at the price of joining
    components closer than a block.
    """
    k0, k1 = k_range
    ni, nj = labels.shape[:2]
    i_any, j_any = np.zeros(ni, dtype=bool), np.zeros(nj, dtype=bool)
    step = max(1, _SLAB_BYTES // max(1, ni * nj))
    for ks in range(k0, k1 + 1, step):
        mask = labels[:, :, ks:min(ks + step, k1 + 1)] == value
        i_any |= mask.any(axis=(1, 2))
        j_any |= mask.any(axis=(0, 2))
    i0, i1 = int(np.argmax(i_any)), ni - 1 - int(np.argmax(i_any[::-1]))
    j0, j1 = int(np.argmax(j_any)), nj - 1 - int(np.argmax(j_any[::-1]))
    box = (i1 - i0 + 1, j1 - j0 + 1, k1 - k0 + 1)
    block = max(1, math.ceil((math.prod(box) / COMPONENT_VOXELS) ** (1 / 3)))
    mask = _block_any(labels, value, (i0, j0, k0), box, block)
    parts, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum_labels(mask, parts, index=np.arange(1, n + 1))
        mask = parts == int(np.argmax(sizes)) + 1
    del parts
    centre = _inside(mask, np.array(ndimage.center_of_mass(mask)))
    return tuple(min(o + c * block + block // 2, o + b - 1) for o, c, b in zip((i0, j0, k0), centre, box))


def _block_any(labels: np.ndarray, value: int, origin: tuple[int, int, int], box: tuple[int, int, int],
               block: int) -> np.ndarray:
    """``labels == value`` over the box, reduced by ``block`` per axis (any voxel set), a k slab at a time."""
    i0, j0, k0 = origin
    bi, bj, bk = box
    if block == 1:
        return labels[i0:i0 + bi, j0:j0 + bj, k0:k0 + bk] == value
    out = np.zeros((math.ceil(bi / block), math.ceil(bj / block), math.ceil(bk / block)), dtype=bool)
    pi, pj = out.shape[0] * block, out.shape[1] * block
    for n in range(out.shape[2]):
        slab = labels[i0:i0 + bi, j0:j0 + bj, k0 + n * block:min(k0 + (n + 1) * block, k0 + bk)] == value
        padded = np.zeros((pi, pj, slab.shape[2]), dtype=bool)
        padded[:bi, :bj] = slab
        out[:, :, n] = padded.reshape(out.shape[0], block, out.shape[1], block, -1).any(axis=(1, 3, 4))
    return out


def _inside(mask: np.ndarray, centre: np.ndarray) -> tuple[int, int, int]:
    """The centroid when it lies in the component, else the component voxel nearest it in the nearest k slice.

    A ring's or a C-shape's centroid is outside it; planes through there
    would miss the structure they were meant to show.
    """
    c = tuple(int(round(float(x))) for x in centre)
    if mask[c]:
        return c
    ks = np.flatnonzero(mask.any(axis=(0, 1)))
    k = int(ks[np.argmin(np.abs(ks - centre[2]))])
    ii, jj = np.nonzero(mask[:, :, k])
    n = int(np.argmin((ii - centre[0]) ** 2 + (jj - centre[1]) ** 2))
    return int(ii[n]), int(jj[n]), k


# --------------------------------------------------------------------------- planes


def _voxel_axis(ornt: np.ndarray, ras_axis: int) -> int:
    """The file's voxel axis nearest the RAS axis ``ras_axis`` (0 R, 1 A, 2 S)."""
    return int(np.flatnonzero(ornt[:, 0] == ras_axis)[0])


def _take(volume: Any, request: tuple[int, int], tail: tuple[int, ...] = ()) -> np.ndarray:
    """The plane ``index`` of voxel axis ``axis`` (``tail`` picks the first volume of a 4-D proxy)."""
    axis, index = request
    sl: list[Any] = [slice(None)] * 3
    sl[axis] = index
    return np.asarray(volume[(*sl, *tail)])


def _facing(plane: np.ndarray, ornt: np.ndarray, kept: list[int]) -> np.ndarray:
    """A plane over the voxel axes ``kept`` as drawn: RAS-ordered, then both axes reversed and transposed.

    Turned to RAS, the plane is P[u, v] with u the lower RAS axis.  Drawing
    rows from high v to low and columns from high u to low puts anterior or
    superior up and the patient's right (or anterior, in sagittal) on the left.
    """
    sub = np.array(ornt[kept], dtype=float)
    sub[:, 0] = np.argsort(np.argsort(sub[:, 0]))  # the two RAS axes renumbered 0, 1 in RAS order
    return apply_orientation(plane, sub)[::-1, ::-1].T


def _image_planes(path: Path, lab_img: Any, requests: list[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
    """Only the planes shown, as float32.

    An uncompressed file is sliced directly (nibabel reads just those
    bytes); a gzipped one cannot seek back cheaply, so its planes are
    gathered in one forward pass of bounded slabs.
    """
    img = _load(path)
    shape = tuple(int(n) for n in img.shape)
    if shape[:3] != tuple(int(n) for n in lab_img.shape[:3]):
        raise IncompatibleInputError(path, f"image shape {shape[:3]} differs from the labels' {tuple(lab_img.shape[:3])}")
    if not np.allclose(img.affine, lab_img.affine, atol=1e-3):
        raise IncompatibleInputError(path, "image and labels have different affines (not on the same voxel grid)")
    tail = (0,) * (len(shape) - 3)  # the first volume of a 4-D image
    dataobj = img.dataobj
    wanted = sorted(set(requests), key=lambda r: (r[0] != 2, r))
    try:
        if not str(path).lower().endswith(".gz"):
            return {r: _take(dataobj, r, tail).astype(np.float32) for r in wanted}
        return _slab_pass(dataobj, shape, tail, wanted)
    except _READ_ERRORS as exc:
        raise CorruptInputError(path, f"cannot read voxel data: {_message(exc)}") from None


def _slab_pass(dataobj: Any, shape: tuple[int, ...], tail: tuple[int, ...],
               wanted: list[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
    ni, nj, nk = shape[:3]
    out = {r: np.empty([n for a, n in enumerate((ni, nj, nk)) if a != r[0]], dtype=np.float32) for r in wanted}
    step = max(1, _SLAB_BYTES // max(1, ni * nj * np.dtype(dataobj.dtype).itemsize))
    for k0 in range(0, nk, step):
        k1 = min(k0 + step, nk)
        if not any(a != 2 or k0 <= i < k1 for a, i in wanted):
            continue
        slab = np.asanyarray(dataobj[(slice(None), slice(None), slice(k0, k1), *tail)])
        for a, i in wanted:
            if a == 0:
                out[(a, i)][:, k0:k1] = slab[i]
            elif a == 1:
                out[(a, i)][:, k0:k1] = slab[:, i]
            elif k0 <= i < k1:
                out[(a, i)][:] = slab[:, :, i - k0]
    return out


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
    first = (f"{'x'.join(str(n) for n in shape)} voxels of {'x'.join(f'{s:.3g}' for s in sizes)} mm, stored {stored}; "
             "shown radiological (patient's right on the left)")
    second = f"window {lo:.4g} to {hi:.4g} ({how}); labels filled (alpha) and outlined"
    return [first, second]


def _legend(shown: list[ClassShown], present: list[ClassShown]) -> list[LegendEntry]:
    entries = [LegendEntry(None, "class (value): volume")]
    for c in shown[:MAX_LEGEND]:
        amount = "volume n/a" if c.amount is None else f"{c.amount:,.2f} mL" if c.amount < 1000 else f"{c.amount:,.0f} mL"
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
