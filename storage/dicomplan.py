"""A DICOM series checked as a volume: its slices sorted, its geometry trusted, its stored dtype chosen.

Everything a volume cannot be trusted with is refused here, from the headers
alone, before :mod:`storage.dicom` writes a byte: a missing slice, uneven gaps,
mixed orientations or sizes, a tilted gantry, two slices at one position,
missing or truncated pixel data, a compression nobody can decode.  What passes
is a :class:`Plan`: the frames in k order (by the projection of
ImagePositionPatient on the slice normal, never by file name or
InstanceNumber), the RAS affine, and the narrowest dtype that holds the
rescaled pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.uid import UID

from storage.dicomfiles import (DicomObject, Frame, SeriesRef, class_name, fmt_numbers, frame_name, scan_file,
                                shared_instance, syntax_name, volume_label)
from storage.dicomobject import unreadable
from storage.errors import CorruptInputError, InputError, InvalidInputError, UnsupportedFormatError
from storage.geometry import voxel_axes_problem

ORIENTATION_TOL = 1e-4  # absolute, on direction cosines
SPACING_RTOL = 1e-2  # of the slice spacing, as highdicom
# How far a slice may lie sideways of the normal through the first slice, in mm: POSITION_ROUNDING_MM plus
# TILT_TOL times its distance along the normal.  Scanners write ImagePositionPatient as DS strings, often
# rounded to 2 or 3 decimals: two positions rounded to 0.01 mm differ by up to 0.01 mm in each coordinate,
# 0.0173 mm in all, whatever the slice step (an oblique series of 0.5 mm slices included), so 0.02 mm is rounding,
# not tilt.  TILT_TOL (1e-3 rad, 0.057 degrees) absorbs an orientation rounded to 4-5 decimals over a long stack.
# A real gantry tilt (several degrees: tan(5 deg) = 0.087 mm sideways per mm) is far outside both and refused:
# the volume is not resliced.  (highdicom's cosine tolerance, 1e-3, would let 2.5 degrees of tilt through.)
POSITION_ROUNDING_MM = 0.02
TILT_TOL = 1e-3
SAME_POSITION_TOL = 1e-3  # mm: closer slices are at the same position
PIXEL_SPACING_RTOL = 1e-4

@dataclass
class Plan:
    """A checked volume: its slices in k order and everything the store's metadata needs."""

    ref: SeriesRef
    objects: list[DicomObject]
    frames: list[Frame]  # sorted along the normal
    affine: np.ndarray  # RAS
    shape: tuple[int, int, int]  # (I, J, K)
    zooms: tuple[float, float, float]
    raw_dtype: np.dtype
    dtypes: list[np.dtype]  # the stored dtype to try first, then the wider fallbacks
    depth_assumed: bool = False  # one slice with no SliceThickness or SpacingBetweenSlices: 1 mm taken


ASSUMED_DEPTH_MM = 1.0  # a lone slice with no thickness: its voxels' depth, for volumes, is a guess
DEPTH_ASSUMED_NOTE = ("one slice, with neither SliceThickness nor SpacingBetweenSlices: its depth is taken as "
                      f"{ASSUMED_DEPTH_MM:g} mm, so volumes in mL rest on that guess")


def plan_series(ref: SeriesRef) -> Plan:
    display = ref.display
    if not ref.files:
        raise InputError(display, "the series has no files")
    scanned = []
    for path in dict.fromkeys(ref.files):
        if not path.is_file():
            raise InputError(display, f"file {path} of the series is missing")
        obj = scan_file(path) or unreadable(path)
        if obj is None:
            raise UnsupportedFormatError(display, f"{path.name} is not a DICOM file")
        scanned.append(obj)
    damaged = next((obj for obj in scanned if obj.damage is not None), None)
    if damaged is not None:  # before anything else: a gap it leaves must not be blamed on a "missing slice"
        raise CorruptInputError(display, f"{damaged.path.name} {damaged.damage}; the series is not segmented "
                                         "without it")
    objects = []
    for obj in scanned:
        path = obj.path
        if not obj.is_image:
            raise UnsupportedFormatError(display, f"{path.name} is a {class_name(obj.sop_class_uid)} object, "
                                                  "not an image")
        if obj.series_instance_uid != ref.series_instance_uid:
            raise InvalidInputError(display, f"{path.name} belongs to another series")
        objects.append(obj)
    for obj in objects:
        _check_pixels(display, obj)
    if problem := shared_instance(objects):
        raise InvalidInputError(display, problem)
    frames = [f for obj in objects for f in obj.frames]
    keys = {f.key for f in frames}
    if ref.volume is not None:
        frames = [f for f in frames if volume_label(f.key) == ref.volume]
        if not frames:
            raise InvalidInputError(display, f"no frames of volume {ref.volume!r} in the series' files")
        if len(frames) == 1 and any("=" in part for part in frames[0].key):
            raise InvalidInputError(display, f"volume {ref.volume!r} is a single frame split off by its dimension "
                                             "index: not a volume to segment")
    elif len(keys) > 1:
        raise InvalidInputError(display, "the files hold several volumes ("
                                         + "; ".join(sorted(volume_label(k) for k in keys))
                                         + "); take the SeriesRefs that find_series gives")

    rows = {(f.rows, f.columns) for f in frames}
    if len(rows) > 1:
        sizes = ", ".join(f"{r}x{c}" for r, c in sorted(rows))
        raise InvalidInputError(display, f"mixed image sizes in one series: {sizes} (rows x columns)")
    placing = (("ImageOrientationPatient", "iop"), ("ImagePositionPatient", "ipp"), ("PixelSpacing", "pixel_spacing"))
    for name, attr in placing:  # some slices only: those files are named (a series of 300 had said "slices")
        lacking = [f for f in frames if getattr(f, attr) is None]
        if lacking and len(lacking) < len(frames):
            shown = ", ".join(frame_name(f) for f in lacking[:3]) + \
                (f" and {len(lacking) - 3} more" if len(lacking) > 3 else "")
            raise InvalidInputError(display, f"{shown} {'has' if len(lacking) == 1 else 'have'} no {name}, which the "
                                             "series' other slices have: it cannot be placed in space")
    missing = [name for name, attr in placing if any(getattr(f, attr) is None for f in frames)]
    if missing:
        raise InvalidInputError(display, f"slices without {' and '.join(missing)}: they cannot be placed in space")
    spacings = np.array([f.pixel_spacing for f in frames], dtype=np.float64)
    if np.any(spacings <= 0) or not np.all(np.isfinite(spacings)):
        raise InvalidInputError(display, "PixelSpacing is not positive")
    if np.any(np.abs(spacings - spacings[0]) > PIXEL_SPACING_RTOL * spacings[0]):
        values = sorted({tuple(s) for s in spacings.round(6).tolist()})
        raise InvalidInputError(display, f"mixed PixelSpacing in one series: {values[0]} and {values[-1]} mm")
    iops = np.array([f.iop for f in frames], dtype=np.float64)
    if np.any(np.abs(iops - iops[0]) > ORIENTATION_TOL):
        worst = int(np.argmax(np.abs(iops - iops[0]).max(axis=1)))
        raise InvalidInputError(display, f"mixed slice orientations in one series: ImageOrientationPatient "
                                         f"{fmt_numbers(iops[0])} and {fmt_numbers(iops[worst])}")
    row_dir, col_dir = iops[0, :3], iops[0, 3:]
    if not (abs(np.linalg.norm(row_dir) - 1) < 1e-3 and abs(np.linalg.norm(col_dir) - 1) < 1e-3
            and abs(float(row_dir @ col_dir)) < 1e-3):
        raise InvalidInputError(display, f"ImageOrientationPatient {fmt_numbers(iops[0])} is not two orthogonal unit vectors")
    row_dir, col_dir = row_dir / np.linalg.norm(row_dir), col_dir / np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)

    positions = np.array([f.ipp for f in frames], dtype=np.float64)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    frames = [frames[i] for i in order]
    positions, along = positions[order], along[order]
    steps = np.diff(along)
    if steps.size and steps.min() < SAME_POSITION_TOL:
        k = int(np.argmin(steps))
        raise InvalidInputError(display, f"two slices at the same position ({along[k]:.3f} mm along the normal): "
                                         f"{frame_name(frames[k])} and {frame_name(frames[k + 1])}")
    if steps.size:
        _check_tilt(display, positions, along, normal)
        _check_gaps(display, steps, along)

    k_count = len(frames)
    row_spacing, col_spacing = (float(v) for v in spacings[0])
    if k_count > 1:  # along the normal, as dcm2niix has it: the series passed _check_tilt, so what lies sideways
        # of it is the positions' rounding, and a step through the last slice's rounded position sheared the grid
        # by a few thousandths of a degree, which model space then refused as "sheared" (its own tolerance is tighter)
        slice_step = normal * (along[-1] - along[0]) / (k_count - 1)
    else:
        thick = next((v for v in (frames[0].thickness, frames[0].between) if v and v > 0), None)
        slice_step = normal * (thick or ASSUMED_DEPTH_MM)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = slice_step
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    problem = voxel_axes_problem(lps[:3, :3])
    if problem is not None:
        raise InvalidInputError(display, problem)
    shape = (frames[0].columns, frames[0].rows, k_count)
    zooms = (col_spacing, row_spacing, float(np.linalg.norm(slice_step)))
    raw_dtype = _raw_dtype(objects)
    return Plan(ref=ref, objects=objects, frames=frames, affine=affine, shape=shape, zooms=zooms,
                 raw_dtype=raw_dtype, dtypes=_dtype_candidates(objects, frames, raw_dtype),
                 depth_assumed=k_count == 1 and thick is None)


def _check_pixels(display: str, obj: DicomObject) -> None:
    """Refuse, before anything is written, a file whose pixels cannot be read into a volume."""
    name = obj.path.name
    if obj.pixel_tag is None:
        raise InvalidInputError(display, f"{name} has no pixel data")
    if obj.pixel_tag != "PixelData":
        raise UnsupportedFormatError(display, f"{name} holds {obj.pixel_tag} (float pixels); not supported")
    if obj.multi_frame_without_groups:
        raise UnsupportedFormatError(display, f"{name} is a multi-frame image without functional groups; "
                                              "its frames have no positions")
    if obj.samples_per_pixel != 1:
        raise UnsupportedFormatError(display, f"{name} is a colour image ({obj.samples_per_pixel} samples per pixel, "
                                              f"{obj.photometric}); only greyscale series are segmented")
    if obj.bits_allocated not in (8, 16, 32):
        raise UnsupportedFormatError(display, f"{name} has BitsAllocated {obj.bits_allocated}; "
                                              "only 8, 16 and 32 are supported")
    syntax = obj.transfer_syntax_uid
    if not syntax:
        raise InvalidInputError(display, f"{name} has no transfer syntax in its file meta information")
    problem = _decoder_problem(syntax)
    if problem:
        raise UnsupportedFormatError(display, f"{name}: {problem}")
    native = UID(syntax).is_transfer_syntax and not UID(syntax).is_compressed
    if native and obj.pixel_bytes is not None and obj.rows and obj.columns:
        expected = obj.rows * obj.columns * obj.frames_declared * obj.samples_per_pixel * obj.bits_allocated // 8
        if obj.pixel_bytes < expected:
            raise CorruptInputError(display, f"{name}: pixel data is truncated: {max(obj.pixel_bytes, 0)} of "
                                             f"{expected} bytes ({obj.rows}x{obj.columns}, {obj.bits_allocated}-bit)")


def _decoder_problem(syntax: str) -> str | None:
    """Why no installed decoder handles a transfer syntax, or None when one does."""
    uid = UID(syntax)
    if uid.is_transfer_syntax and not uid.is_compressed:
        return None
    name = syntax_name(syntax)
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"transfer syntax {name} ({syntax}) cannot be decoded: no installed pixel decoder handles it"
    if not decoder.is_available:
        missing = "; ".join(f"{k}: {', '.join(v)}" for k, v in decoder.missing_dependencies.items()) \
            if hasattr(decoder, "missing_dependencies") else ""
        return f"transfer syntax {name} ({syntax}) cannot be decoded: no installed pixel decoder handles it" + \
            (f" (missing {missing})" if missing else "")
    return None


def _check_tilt(display: str, positions: np.ndarray, along: np.ndarray, normal: np.ndarray) -> None:
    """Slices stacked along their normal, up to the rounding of their positions (see POSITION_ROUNDING_MM).

    Measured from the first slice, as highdicom does, so a far slice's angle
    is not swamped by the rounding of the nearest one.
    """
    spans = positions[1:] - positions[0]
    distance = along[1:] - along[0]
    sideways = np.linalg.norm(spans - np.outer(spans @ normal, normal), axis=1)
    excess = sideways - (POSITION_ROUNDING_MM + TILT_TOL * distance)
    if excess.max() > 0:
        worst = int(np.argmax(excess))
        per_step = sideways[worst] / (worst + 1)  # slice k lies k steps from the first
        angle = float(np.degrees(np.arctan2(sideways[worst], distance[worst])))
        raise InvalidInputError(display, f"gantry tilt: slices step {per_step:.3f} mm sideways of the slice normal "
                                         f"({angle:.2f} degrees); reslice the series first")


def _check_gaps(display: str, steps: np.ndarray, along: np.ndarray) -> None:
    """Equal gaps only: a gap that is a whole multiple of the spacing is a missing slice, any other differs.

    Gaps may differ by SPACING_RTOL of the spacing plus the rounding of the positions (POSITION_ROUNDING_MM).
    """
    spacing = float(steps.min())
    tolerance = SPACING_RTOL * spacing + POSITION_ROUNDING_MM
    multiples = np.rint(steps / spacing)
    off_grid = np.abs(steps - multiples * spacing) > tolerance
    if off_grid.any():
        raise InvalidInputError(display, f"slice gaps vary from {steps.min():.4g} to {steps.max():.4g} mm "
                                         f"(more than {SPACING_RTOL:.0%} of the spacing)")
    holes = np.nonzero(multiples > 1)[0]
    if holes.size:
        k = int(holes[0])
        count = int((multiples[holes] - 1).sum())
        raise InvalidInputError(display, f"{count} slice(s) missing: a {steps[k]:.4g} mm gap between the slices at "
                                         f"{along[k]:.4g} and {along[k + 1]:.4g} mm along the normal, "
                                         f"where the spacing is {spacing:.4g} mm")


def _raw_dtype(objects: list[DicomObject]) -> np.dtype:
    kinds = {(o.bits_allocated, o.pixel_representation) for o in objects}
    dtypes = [np.dtype(f"{'i' if rep else 'u'}{bits // 8}") for bits, rep in kinds]
    return np.result_type(*dtypes) if len(dtypes) > 1 else dtypes[0]


def _dtype_candidates(objects: list[DicomObject], frames: list[Frame], raw: np.dtype) -> list[np.dtype]:
    """Stored dtypes, narrowest first: a wider one is tried only when the pixels do not fit.

    Integers stay integers when every slope and intercept is whole: the raw
    dtype when it holds the rescaled values (CT HU in int16), else int16, else
    int32, else float32; any fractional rescale gives float32. When the header
    bound (BitsStored through the rescale) already proves a dtype wide enough,
    nothing wider is listed; the narrower ones are tried against the pixels.
    """
    slopes = np.array([f.slope for f in frames])
    intercepts = np.array([f.intercept for f in frames])
    if not (np.all(np.mod(slopes, 1) == 0) and np.all(np.mod(intercepts, 1) == 0)):
        return [np.dtype("float32")]
    order = list(dict.fromkeys(([raw.newbyteorder("=")] if raw.itemsize <= 2 else [])
                               + [np.dtype("int16"), np.dtype("int32")]))
    bits = min((o.bits_stored or o.bits_allocated or 16) for o in objects)
    low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if raw.kind == "i" else (0, 2 ** bits - 1)
    ends = np.concatenate([slopes * low + intercepts, slopes * high + intercepts])
    for n, dtype in enumerate(order):
        if fits(dtype, float(ends.min()), float(ends.max())):
            return order[:n + 1]
    return order + [np.dtype("float32")]


def fits(dtype: np.dtype, low: float, high: float) -> bool:
    if dtype.kind == "f":
        return True
    info = np.iinfo(dtype)
    return info.min <= low and high <= info.max


