"""A DICOM SEG as ground truth: its segments as one label map on the grid of the prediction it is scored against.

Radiology groups keep their annotations as DICOM SEG objects (TCIA delivers
them so, and segflow writes one beside each series it segments).  A SEG holds
frames only where a segment is drawn, so highdicom's volume of it covers a
sub-range of the series' slices, in the patient's LPS frame: it is placed
into the prediction's voxel grid by the map between the two affines, which
must be a signed permutation with an integer offset (the same grid, read in
another axis order, cut to the annotated slices); voxels it has no frame for
are background (0).  Segments keep their numbers as values, unless every
segment's label names a class of the prediction: then they take those classes'
values, as segflow's own SEG numbers its segments 1..n in class order and a
card's values need not be 1..n.  Overlapping segments cannot be one label map
and are refused.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from storage.errors import CorruptInputError, IncompatibleInputError, InvalidInputError

if TYPE_CHECKING:
    from storage.labelmaps import LabelSource

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_TOL = 1e-3  # voxels


def is_dicom_seg(path: Path) -> bool:
    """A file named ``*.dcm`` (or any DICOM suffix), or one with the DICM preamble."""
    from storage.inputfiles import DICOM_SUFFIXES

    if Path(path).name.lower().endswith(DICOM_SUFFIXES):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def open_seg_truth(path: Path, reference: "LabelSource",
                   names: dict[int, str] | None = None) -> tuple["LabelSource", str | None]:
    """The SEG at ``path`` as a label map on ``reference``'s voxel grid, and a note when its segment numbers are
    taken as class values (its labels name none of ``names``, the prediction's classes by default)."""
    import highdicom as hd

    path = Path(path)
    if reference.kind != "volume" or reference.affine is None:
        raise IncompatibleInputError(path, f"is a DICOM SEG, but the prediction {reference.path} is no volume")
    try:
        seg = hd.seg.segread(path)
    except Exception as exc:  # noqa: BLE001 - pydicom and highdicom raise many types for what is no SEG
        raise CorruptInputError(path, f"cannot be read as a DICOM SEG: {exc}") from None
    try:
        volume = seg.get_volume(combine_segments=True, relabel=False, dtype=np.uint16)
    except Exception as exc:  # noqa: BLE001 - overlapping segments, frames off one grid
        raise InvalidInputError(path, f"its segments cannot be read as one label map: {exc}") from None
    to_reference = np.linalg.inv(np.asarray(reference.affine, float)) @ _LPS_TO_RAS @ np.asarray(volume.affine, float)
    placed = _place(np.asarray(volume.array), to_reference, reference.shape)
    if placed is None:
        raise IncompatibleInputError(path, f"is not on the voxel grid of {reference.path} (its frames lie "
                                           "elsewhere, or between its voxels)")
    labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    names_of = {name.casefold(): value for value, name in (names or reference.classes or {}).items()}
    note = None
    if labels and all(label.casefold() in names_of for label in labels.values()):
        table = np.arange(max(max(labels), int(placed.max(initial=0))) + 1, dtype=np.uint16)
        for number, label in labels.items():
            table[number] = names_of[label.casefold()]
        placed = table[placed]
        classes = {names_of[label.casefold()]: label for label in labels.values()}
    else:
        classes = dict(labels)
        note = ("the DICOM SEG's segment numbers are taken as class values (its segment labels "
                f"{', '.join(repr(v) for v in labels.values())} do not all name a class of the prediction)")
    source = replace(reference, path=path, array=placed, nodata=None, classes=classes)
    return source, note


def _place(data: np.ndarray, to_reference: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """``data`` (indexed as the SEG volume) put into an array of ``shape`` by a signed permutation with an integer
    offset; None when the map is not one, or the data would fall outside."""
    rotation, offset = to_reference[:3, :3], to_reference[:3, 3]
    signed = np.round(rotation)
    if not np.allclose(rotation, signed, atol=_TOL) or not all(
            sorted(np.abs(signed[:, a]).tolist()) == [0.0, 0.0, 1.0] for a in range(3)):
        return None
    if not np.allclose(offset, np.round(offset), atol=_TOL):
        return None
    axis_of = [int(np.argmax(np.abs(signed[:, a]))) for a in range(3)]  # SEG axis a -> reference axis
    if sorted(axis_of) != [0, 1, 2]:
        return None
    order = [axis_of.index(r) for r in range(3)]  # reference axis r <- SEG axis order[r]
    block = np.transpose(data, order)
    starts = []
    for r in range(3):
        a = order[r]
        sign = signed[r, a]
        if sign < 0:
            block = np.flip(block, axis=r)
        first = int(round(offset[r])) + (0 if sign > 0 else -(data.shape[a] - 1))
        starts.append(first)
    if any(s < 0 or s + n > int(m) for s, n, m in zip(starts, block.shape, shape)):
        return None
    out = np.zeros(tuple(int(n) for n in shape), dtype=np.uint16)
    out[tuple(slice(s, s + n) for s, n in zip(starts, block.shape))] = block
    return out


__all__ = ["is_dicom_seg", "open_seg_truth"]
