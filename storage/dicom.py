"""DICOM series in: find the volumes on disk, check their geometry, stream them into an image store.

A DICOM "image" is a folder of files, one slice each (or one enhanced
multi-frame file holding many frames), that segflow must first assemble into a
volume. Files are grouped by SeriesInstanceUID and sorted by the projection of
ImagePositionPatient on the slice normal, never by file name or InstanceNumber.
An enhanced multi-frame object may hold several volumes at the same positions
(magnitude and phase, several time points): its frames are split by frame type
and by the non-spatial dimension indexes into separate :class:`SeriesRef`s.
Everything a volume cannot be trusted with is refused before a byte is written:
a missing slice, uneven gaps, mixed orientations or sizes, a tilted gantry, two
slices at one position, missing pixel data, a compression nobody can decode.
The accepted volume becomes ``image[0, k, j, i]`` (i column, j row, k sorted
slice), exactly the layout of :func:`storage.nifti.ingest_nifti`, with a
synthesised NIfTI-1 header on the series' grid so that the NIfTI exporter puts
labels back where the slices were. Pixels are read one chunk-depth of slices
at a time and rescaled (RescaleSlope/Intercept) per slice or frame.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import stat
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from storage.errors import CorruptInputError, InputError, InvalidInputError, StoreError, UnsupportedFormatError
from storage.geometry import DicomFile, DicomSeriesInfo, SourceInfo, VolumeGeometry
from storage.hashing import sha256_input
from storage.layout import ImageStore, StoreMeta, create_image_store, mark_complete
from storage.probe import Header, voxel_millilitres

__all__ = ["SeriesRef", "is_dicom_input", "find_series", "ingest_dicom", "probe_dicom"]

DICOMDIR_NAME = "DICOMDIR"
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
# Objects with rows and columns that are still not images to segment.
NOT_IMAGES = {
    MEDIA_STORAGE_DIRECTORY: "DICOMDIR",
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose",
    "1.2.840.10008.5.1.4.1.1.30": "Parametric Map",
}
# Transfer syntaxes newer than this pydicom's dictionary, to name them in messages.
_SYNTAX_NAMES = {
    "1.2.840.10008.1.2.4.110": "JPEG XL Lossless",
    "1.2.840.10008.1.2.4.111": "JPEG XL JPEG Recompression",
    "1.2.840.10008.1.2.4.112": "JPEG XL",
    "1.2.840.10008.1.2.8.1": "Deflated Image Frame Compression",
}
_DEFLATED = "1.2.840.10008.1.2.1.99"
_IMPLICIT_VR = "1.2.840.10008.1.2"
_PIXEL_TAGS = {  # (7FE0,0010) PixelData, (7FE0,0008) FloatPixelData, (7FE0,0009) DoubleFloatPixelData
    bytes.fromhex("e07f1000"): "PixelData", bytes.fromhex("7fe00010"): "PixelData",
    bytes.fromhex("e07f0800"): "FloatPixelData", bytes.fromhex("7fe00008"): "FloatPixelData",
    bytes.fromhex("e07f0900"): "DoubleFloatPixelData", bytes.fromhex("7fe00009"): "DoubleFloatPixelData",
}
# Dimension pointers that place a frame in space: they sort frames, they do not split volumes.
_SPATIAL_POINTERS = {0x00200032, 0x00209057}  # ImagePositionPatient, InStackPositionNumber
_TYPE_POINTERS = {0x00089007, 0x00089208}  # FrameType, ComplexImageComponent: already in the type label

ORIENTATION_TOL = 1e-4  # absolute, on direction cosines
SPACING_RTOL = 1e-2  # of the slice spacing, as highdicom
PERPENDICULAR_TOL = 1e-3  # mm a slice may step sideways of the normal
SAME_POSITION_TOL = 1e-3  # mm: closer slices are at the same position
PIXEL_SPACING_RTOL = 1e-4
NAME_MAX = 80
_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
_HEADER_CACHE: dict[tuple[int, int, int, int], "_Object | None"] = {}
_HEADER_CACHE_MAX = 100_000


# --------------------------------------------------------------------------- the public unit


@dataclass(frozen=True)
class SeriesRef:
    """One volume of a DICOM series found on disk: the unit segflow segments."""

    root: Path  # the folder (or DICOMDIR's folder, or common parent of listed files) it came from
    series_instance_uid: str
    files: tuple[Path, ...]  # the image files of this volume (any order)
    name: str  # output stem, [A-Za-z0-9._-] only, <= 80 characters, unique per volume
    description: str | None
    volume: str | None = None  # key of one volume of a split enhanced multi-frame object, else None

    @property
    def display(self) -> str:
        """How messages name the volume: the folder (the file, for a one-file series) and UIDs, never patient names."""
        where = self.files[0] if len(self.files) == 1 else self.root
        return f"{where} [series {self.series_instance_uid}{' ' + self.volume if self.volume else ''}]"

    def sha256(self) -> str:
        """Content identity: sha256 over the files' sha256s in path order (plus the volume key).

        The volume key is part of it because two volumes split from one file
        have the same files yet are different inputs to a content-keyed batch.
        """
        digest = hashlib.sha256()
        for path in sorted(self.files):
            digest.update(sha256_input(path).encode("ascii"))
            digest.update(b"\n")
        if self.volume:
            digest.update(f"volume:{self.volume}".encode("utf-8"))
        return digest.hexdigest()


# --------------------------------------------------------------------------- headers


@dataclass(frozen=True)
class _Frame:
    """One slice: a single-frame file, or one frame (1-based ``number``) of a multi-frame file."""

    path: Path
    number: int | None
    sop_instance_uid: str
    rows: int
    columns: int
    iop: tuple[float, ...] | None
    ipp: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing)
    thickness: float | None
    between: float | None
    slope: float
    intercept: float
    key: tuple[str, ...] = ()  # type and non-spatial dimension values of an enhanced frame; () otherwise


@dataclass
class _Object:
    """What the header pass learnt about one DICOM file."""

    path: Path
    sop_class_uid: str
    is_image: bool
    series_instance_uid: str | None
    study_instance_uid: str | None
    frame_of_reference_uid: str | None
    modality: str | None
    series_description: str | None
    series_number: int | None
    transfer_syntax_uid: str | None
    pixel_tag: str | None  # which pixel data element follows the header, None when there is none
    bits_allocated: int | None
    bits_stored: int | None
    pixel_representation: int
    samples_per_pixel: int
    photometric: str | None
    rescale_type: str | None
    patient_name_present: bool
    patient_id_present: bool
    multi_frame_without_groups: bool
    size: int
    frames: list[_Frame] = field(default_factory=list)
    pixel_bytes: int | None = None  # bytes the file holds after the pixel element's header (native syntaxes)
    frames_declared: int = 1
    rows: int | None = None
    columns: int | None = None


def _read_header(path: Path) -> tuple[Dataset, str | None, int] | None:
    """The header (no pixels), which pixel element follows it and where; None when the file is not DICOM."""
    try:
        with open(path, "rb") as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, force=False)
            tag = fp.read(4)  # pydicom stops at the pixel element's tag, or at the end of the file
            after_tag = fp.tell()
    except InvalidDicomError:
        return None
    except OSError as exc:
        raise InputError(path, f"cannot read file: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for a damaged header
        raise CorruptInputError(path, f"cannot read the DICOM header: {_why(exc)}") from None
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    if syntax == _DEFLATED:  # the dataset was inflated from a copy: the file position says nothing
        return ds, "PixelData" if "Rows" in ds else None, -1
    return ds, _PIXEL_TAGS.get(tag), after_tag


def _scan(path: Path) -> _Object | None:
    """The header pass over one file, remembered while the file is unchanged."""
    st = path.stat()
    cache_key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if cache_key in _HEADER_CACHE:
        return _HEADER_CACHE[cache_key]
    read = _read_header(path)
    obj = None if read is None else _describe_object(path, read[0], read[1], st.st_size)
    if obj is not None and read is not None and read[2] >= 0 and obj.pixel_tag is not None:
        implicit = obj.transfer_syntax_uid == _IMPLICIT_VR
        obj.pixel_bytes = st.st_size - read[2] - (4 if implicit else 8)  # past the element's VR and length
    if len(_HEADER_CACHE) >= _HEADER_CACHE_MAX:
        _HEADER_CACHE.pop(next(iter(_HEADER_CACHE)))
    _HEADER_CACHE[cache_key] = obj
    return obj


def _describe_object(path: Path, ds: Dataset, pixel_tag: str | None, size: int) -> _Object:
    meta = getattr(ds, "file_meta", Dataset())
    sop_class = str(ds.get("SOPClassUID", meta.get("MediaStorageSOPClassUID", "")))
    is_image = sop_class not in NOT_IMAGES and "Rows" in ds and "Columns" in ds
    frames_declared = _int(ds.get("NumberOfFrames")) or 1
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    obj = _Object(
        path=path,
        sop_class_uid=sop_class,
        is_image=is_image,
        series_instance_uid=_str(ds.get("SeriesInstanceUID")),
        study_instance_uid=_str(ds.get("StudyInstanceUID")),
        frame_of_reference_uid=_str(ds.get("FrameOfReferenceUID")),
        modality=_str(ds.get("Modality")),
        series_description=_str(ds.get("SeriesDescription")),
        series_number=_int(ds.get("SeriesNumber")),
        transfer_syntax_uid=_str(meta.get("TransferSyntaxUID")),
        pixel_tag=pixel_tag,
        bits_allocated=_int(ds.get("BitsAllocated")),
        bits_stored=_int(ds.get("BitsStored")),
        pixel_representation=_int(ds.get("PixelRepresentation")) or 0,
        samples_per_pixel=_int(ds.get("SamplesPerPixel")) or 1,
        photometric=_str(ds.get("PhotometricInterpretation")),
        rescale_type=_str(ds.get("RescaleType")),
        patient_name_present=bool(str(ds.get("PatientName", "") or "").strip()),
        patient_id_present=bool(str(ds.get("PatientID", "") or "").strip()),
        multi_frame_without_groups=frames_declared > 1 and not enhanced,
        size=size,
        frames_declared=frames_declared,
        rows=_int(ds.get("Rows")),
        columns=_int(ds.get("Columns")),
    )
    if not is_image or obj.series_instance_uid is None:
        return obj
    try:
        obj.frames = _enhanced_frames(path, ds, frames_declared) if enhanced else [_classic_frame(path, ds)]
    except (ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise CorruptInputError(path, f"cannot read its image geometry: {_why(exc)}") from None
    return obj


def _classic_frame(path: Path, ds: Dataset) -> _Frame:
    return _Frame(
        path=path, number=None, sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        rows=int(ds.Rows), columns=int(ds.Columns),
        iop=_floats(ds.get("ImageOrientationPatient"), 6), ipp=_floats(ds.get("ImagePositionPatient"), 3),
        pixel_spacing=_pair(ds.get("PixelSpacing")), thickness=_float(ds.get("SliceThickness")),
        between=_float(ds.get("SpacingBetweenSlices")),
        slope=_float(ds.get("RescaleSlope"), 1.0), intercept=_float(ds.get("RescaleIntercept"), 0.0),
    )


def _enhanced_frames(path: Path, ds: Dataset, count: int) -> list[_Frame]:
    """Frames of an enhanced multi-frame object, geometry from the per-frame or shared functional groups."""
    shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else Dataset()
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) not in (0, count):
        raise ValueError(f"{len(per_frame)} per-frame functional groups for {count} frames")
    pointers = [int(item.get("DimensionIndexPointer", 0)) for item in ds.get("DimensionIndexSequence", [])]
    labels = [pydicom.datadict.keyword_for_tag(p) or f"{p:08X}" for p in pointers]
    top_slope, top_intercept = _float(ds.get("RescaleSlope"), 1.0), _float(ds.get("RescaleIntercept"), 0.0)
    frames = []
    for n in range(count):
        groups = per_frame[n] if per_frame else Dataset()

        def item(keyword: str) -> Dataset:
            for where in (groups, shared):
                seq = where.get(keyword)
                if seq:
                    return seq[0]
            return Dataset()

        position, orientation, measures = item("PlanePositionSequence"), item("PlaneOrientationSequence"), \
            item("PixelMeasuresSequence")
        transform = item("PixelValueTransformationSequence")
        key = [_frame_type_label(groups, shared)]
        indexes = item("FrameContentSequence").get("DimensionIndexValues")
        indexes = [] if indexes is None else ([indexes] if isinstance(indexes, int) else list(indexes))
        for pointer, label, value in zip(pointers, labels, indexes):
            if pointer not in _SPATIAL_POINTERS and pointer not in _TYPE_POINTERS:
                key.append(f"{label}={value}")
        frames.append(_Frame(
            path=path, number=n + 1, sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
            rows=int(ds.Rows), columns=int(ds.Columns),
            iop=_floats(orientation.get("ImageOrientationPatient"), 6),
            ipp=_floats(position.get("ImagePositionPatient"), 3),
            pixel_spacing=_pair(measures.get("PixelSpacing")), thickness=_float(measures.get("SliceThickness")),
            between=_float(measures.get("SpacingBetweenSlices")),
            slope=_float(transform.get("RescaleSlope"), top_slope),
            intercept=_float(transform.get("RescaleIntercept"), top_intercept),
            key=tuple(k for k in key if k),
        ))
    return frames


def _frame_type_label(groups: Dataset, shared: Dataset) -> str:
    """MAGNITUDE / PHASE / ... from the frame-type sequence (ComplexImageComponent, else FrameType value 3)."""
    for where in (groups, shared):
        for element in where:
            if element.keyword.endswith("FrameTypeSequence") and element.VR == "SQ" and element.value:
                frame_type = element.value[0]
                component = _str(frame_type.get("ComplexImageComponent"))
                values = frame_type.get("FrameType")
                values = [] if values is None else ([values] if isinstance(values, str) else list(values))
                third = values[2] if len(values) > 2 else "_".join(values)
                return component if component and component != "MIXED" else third
    return ""


# --------------------------------------------------------------------------- finding series


def is_dicom_input(path: str | os.PathLike[str]) -> bool:
    """A directory holding DICOM files, a DICOMDIR, or a file with the DICM preamble."""
    path = Path(path)
    if path.is_dir():
        return any(_has_preamble(p) for p in _walk(path))
    return path.is_file() and (path.name.upper() == DICOMDIR_NAME or _has_preamble(path))


def _has_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _walk(folder: Path) -> Iterator[Path]:
    """Regular files under a folder, depth first in name order (symbolic links to files included)."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            try:
                if stat.S_ISREG(path.stat().st_mode):
                    yield path
            except OSError:
                continue


def find_series(paths: Sequence[str | os.PathLike[str]]) -> list[SeriesRef]:
    """The image volumes among folders (recursive), DICOMDIR files and lists of files.

    Files that are not DICOM images (the DICOMDIR itself, a README, SR, SEG or
    RTSTRUCT objects) are skipped. Loose files given together share their
    common parent folder as root.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    groups: list[tuple[Path, list[Path], Path | None]] = []  # (root, files, the folder named when one was)
    loose: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists() and not path.is_symlink():
            raise InputError(path, "no such file or folder")
        if path.is_dir():
            groups.append((path, list(_walk(path)), path))
        elif path.name.upper() == DICOMDIR_NAME:
            groups.append((path.parent, _dicomdir_files(path), path))
        else:
            from storage.ingest import check_readable_file

            check_readable_file(path)
            loose.append(path)
    if loose:
        root = Path(os.path.commonpath([str(p.parent.absolute()) for p in loose]))
        groups.append((root, loose, None))

    refs: list[SeriesRef] = []
    for root, files, named in groups:
        objects, skipped = [], []
        for path in dict.fromkeys(files):
            obj = _scan(path)
            if obj is None:
                if named is None:
                    raise UnsupportedFormatError(path, "not a DICOM file (no DICM preamble)")
                continue
            if obj.is_image and obj.series_instance_uid:
                objects.append(obj)
            else:
                skipped.append(obj)
        if not objects:
            if named is None and len(files) == 1 and skipped:
                raise UnsupportedFormatError(files[0], f"is a {_class_name(skipped[0].sop_class_uid)} object, "
                                                       "not an image; there is nothing to segment")
            where = named if named is not None else root
            raise InputError(where, f"no DICOM image series found ({_count(len(files), 'file')}, "
                                    f"{_count(len(skipped), 'DICOM object')} that are not images)")
        refs.extend(_refs_of(root, objects))
    return sorted(refs, key=lambda r: (str(r.root), r.name, r.series_instance_uid, r.volume or ""))


def _dicomdir_files(dicomdir: Path) -> list[Path]:
    """The files a DICOMDIR references, relative to its folder (never outside it)."""
    try:
        ds = pydicom.dcmread(dicomdir, force=False)
    except InvalidDicomError:
        raise UnsupportedFormatError(dicomdir, "is named DICOMDIR but is not a DICOM file") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for a damaged file
        raise CorruptInputError(dicomdir, f"cannot read the DICOMDIR: {_why(exc)}") from None
    files = []
    for record in ds.get("DirectoryRecordSequence", []):
        ref = record.get("ReferencedFileID")
        if ref is None:
            continue
        parts = [ref] if isinstance(ref, str) else list(ref)
        if any(p in ("", ".", "..") or "/" in p or "\\" in p for p in parts):
            raise InvalidInputError(dicomdir, f"references a file outside its folder: {'/'.join(parts)!r}")
        path = dicomdir.parent.joinpath(*parts)
        if not path.is_file():
            # media file IDs are upper case; file systems may have kept the case as written
            raise InputError(dicomdir, f"references a missing file {'/'.join(parts)}")
        files.append(path)
    return files


def _refs_of(root: Path, objects: list[_Object]) -> list[SeriesRef]:
    by_series: dict[str, list[_Object]] = {}
    for obj in objects:
        by_series.setdefault(obj.series_instance_uid or "", []).append(obj)
    refs = []
    for uid, members in by_series.items():
        first = members[0]
        by_key: dict[tuple[str, ...], set[Path]] = {}
        for obj in members:
            for frame in obj.frames:
                by_key.setdefault(frame.key, set()).add(obj.path)
        for key, files in by_key.items():
            volume = _volume_label(key) if len(by_key) > 1 else None
            refs.append(SeriesRef(
                root=root, series_instance_uid=uid, files=tuple(sorted(files)),
                name=_name(first.series_number, first.series_description, uid, volume),
                description=first.series_description, volume=volume,
            ))
    return refs


def _volume_label(key: tuple[str, ...]) -> str:
    return ",".join(key) if key else "untyped"


def _name(number: int | None, description: str | None, uid: str, volume: str | None) -> str:
    """series-<number>-<description>[-<volume>]-<8 hex>: a file stem safe on any file system."""
    digest = hashlib.sha1((uid + (f"/{volume}" if volume else "")).encode("utf-8")).hexdigest()[:8]
    head = "series" if number is None else f"series-{number}"
    words = [_SAFE.sub("_", w).strip("._-") for w in (description or "", volume or "")]
    middle = "-".join(w for w in words if w)
    room = NAME_MAX - len(head) - len(digest) - 2
    middle = middle[:max(room - 1, 0)].rstrip("._-")
    return "-".join(p for p in (head, middle, digest) if p)


# --------------------------------------------------------------------------- checking a volume


@dataclass
class _Plan:
    """A checked volume: its slices in k order and everything the store's metadata needs."""

    ref: SeriesRef
    objects: list[_Object]
    frames: list[_Frame]  # sorted along the normal
    affine: np.ndarray  # RAS
    shape: tuple[int, int, int]  # (I, J, K)
    zooms: tuple[float, float, float]
    raw_dtype: np.dtype
    dtypes: list[np.dtype]  # the stored dtype to try first, then the wider fallbacks


def _plan(ref: SeriesRef) -> _Plan:
    display = ref.display
    if not ref.files:
        raise InputError(display, "the series has no files")
    objects = []
    for path in dict.fromkeys(ref.files):
        if not path.is_file():
            raise InputError(display, f"file {path} of the series is missing")
        obj = _scan(path)
        if obj is None:
            raise UnsupportedFormatError(display, f"{path.name} is not a DICOM file (no DICM preamble)")
        if not obj.is_image:
            raise UnsupportedFormatError(display, f"{path.name} is a {_class_name(obj.sop_class_uid)} object, "
                                                  "not an image")
        if obj.series_instance_uid != ref.series_instance_uid:
            raise InvalidInputError(display, f"{path.name} belongs to another series")
        objects.append(obj)
    for obj in objects:
        _check_pixels(display, obj)
    frames = [f for obj in objects for f in obj.frames]
    keys = {f.key for f in frames}
    if ref.volume is not None:
        frames = [f for f in frames if _volume_label(f.key) == ref.volume]
        if not frames:
            raise InvalidInputError(display, f"no frames of volume {ref.volume!r} in the series' files")
    elif len(keys) > 1:
        raise InvalidInputError(display, "the files hold several volumes ("
                                         + "; ".join(sorted(_volume_label(k) for k in keys))
                                         + "); take the SeriesRefs that find_series gives")

    rows = {(f.rows, f.columns) for f in frames}
    if len(rows) > 1:
        sizes = ", ".join(f"{r}x{c}" for r, c in sorted(rows))
        raise InvalidInputError(display, f"mixed image sizes in one series: {sizes} (rows x columns)")
    missing = [name for name, attr in (("ImageOrientationPatient", "iop"), ("ImagePositionPatient", "ipp"),
                                       ("PixelSpacing", "pixel_spacing"))
               if any(getattr(f, attr) is None for f in frames)]
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
                                         f"{_fmt(iops[0])} and {_fmt(iops[worst])}")
    row_dir, col_dir = iops[0, :3], iops[0, 3:]
    if not (abs(np.linalg.norm(row_dir) - 1) < 1e-3 and abs(np.linalg.norm(col_dir) - 1) < 1e-3
            and abs(float(row_dir @ col_dir)) < 1e-3):
        raise InvalidInputError(display, f"ImageOrientationPatient {_fmt(iops[0])} is not two orthogonal unit vectors")
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
                                         f"{_frame_name(frames[k])} and {_frame_name(frames[k + 1])}")
    if steps.size:
        moves = np.diff(positions, axis=0)
        sideways = np.linalg.norm(moves - np.outer(moves @ normal, normal), axis=1)
        if sideways.max() > PERPENDICULAR_TOL:
            angle = float(np.degrees(np.arctan2(sideways.max(), steps[int(np.argmax(sideways))])))
            raise InvalidInputError(display, f"gantry tilt: slices step {sideways.max():.3f} mm sideways of the "
                                             f"slice normal ({angle:.2f} degrees); reslice the series first")
        _check_gaps(display, steps, along)

    k_count = len(frames)
    row_spacing, col_spacing = (float(v) for v in spacings[0])
    if k_count > 1:
        slice_step = (positions[-1] - positions[0]) / (k_count - 1)
    else:
        thick = next((v for v in (frames[0].thickness, frames[0].between) if v and v > 0), 1.0)
        slice_step = normal * thick
    lps = np.eye(4)
    lps[:3, 0] = row_dir * col_spacing
    lps[:3, 1] = col_dir * row_spacing
    lps[:3, 2] = slice_step
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    shape = (frames[0].columns, frames[0].rows, k_count)
    zooms = (col_spacing, row_spacing, float(np.linalg.norm(slice_step)))
    raw_dtype = _raw_dtype(objects)
    return _Plan(ref=ref, objects=objects, frames=frames, affine=affine, shape=shape, zooms=zooms,
                 raw_dtype=raw_dtype, dtypes=_dtype_candidates(objects, frames, raw_dtype))


def _check_pixels(display: str, obj: _Object) -> None:
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
    name = _syntax_name(syntax)
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


def _check_gaps(display: str, steps: np.ndarray, along: np.ndarray) -> None:
    """Equal gaps only: a gap that is a whole multiple of the spacing is a missing slice, any other differs."""
    spacing = float(steps.min())
    tolerance = SPACING_RTOL * spacing
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


def _raw_dtype(objects: list[_Object]) -> np.dtype:
    kinds = {(o.bits_allocated, o.pixel_representation) for o in objects}
    dtypes = [np.dtype(f"{'i' if rep else 'u'}{bits // 8}") for bits, rep in kinds]
    return np.result_type(*dtypes) if len(dtypes) > 1 else dtypes[0]


def _dtype_candidates(objects: list[_Object], frames: list[_Frame], raw: np.dtype) -> list[np.dtype]:
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
        if _fits(dtype, float(ends.min()), float(ends.max())):
            return order[:n + 1]
    return order + [np.dtype("float32")]


def _fits(dtype: np.dtype, low: float, high: float) -> bool:
    if dtype.kind == "f":
        return True
    info = np.iinfo(dtype)
    return info.min <= low and high <= info.max


# --------------------------------------------------------------------------- ingest and probe


def probe_dicom(ref: SeriesRef) -> Header:
    """What routing needs (kind, shape, voxel size) from the headers alone, after the same checks as ingest."""
    plan = _plan(ref)
    size, note = voxel_millilitres(plan.affine, "mm")
    return Header(path=ref.display, kind="volume", spatial_dims=3, channels=1, shape=plan.shape,
                  cell_size=size, cell_unit="mL", cell_note=note)


def ingest_dicom(ref: SeriesRef, store_path: str | os.PathLike[str], *, chunk: int = 128) -> ImageStore:
    """Copy one checked DICOM volume into a new image store, one chunk-depth of slices at a time."""
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    store = Path(store_path)
    plan = _plan(ref)  # every refusal happens here, before the store exists
    created = False
    try:
        candidates = list(plan.dtypes)
        while candidates:
            dtype = candidates.pop(0)
            i, j, k = plan.shape
            shape = (1, k, j, i)
            chunks = (1, *(min(chunk, n) for n in shape[1:]))
            created = True
            try:
                out = create_image_store(store, meta=_meta(plan, dtype), shape=shape, dtype=dtype.name,
                                         chunks=chunks, with_mask=False)
                seen = _copy_slabs(plan, out, dtype, strict=bool(candidates))
            except OSError as exc:
                raise StoreError(store, f"cannot write the image store: {exc.strerror or _why(exc)}") from None
            if seen is None:
                mark_complete(out.group)
                return out
            # skip the dtypes that cannot hold what was already seen; the next one is checked again
            while len(candidates) > 1 and not _fits(candidates[0], *seen):
                candidates.pop(0)
        raise AssertionError("the last stored dtype always fits")  # pragma: no cover
    except BaseException:
        if created:
            shutil.rmtree(store, ignore_errors=True)
        raise


def _meta(plan: _Plan, dtype: np.dtype) -> StoreMeta:
    ref, first = plan.ref, plan.objects[0]
    hdr = _nifti_header(plan, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qform = np.asarray(hdr.get_qform(coded=False), dtype=np.float64)
    files: dict[Path, DicomFile] = {}  # in slice order of their first frame
    for frame in plan.frames:
        if frame.path not in files:
            files[frame.path] = DicomFile(path=_relative(frame.path, ref.root), sha256=sha256_input(frame.path),
                                          sop_instance_uid=frame.sop_instance_uid)
    root = ref.root.resolve()
    multi = any(f.number is not None for f in plan.frames)
    info = DicomSeriesInfo(
        study_instance_uid=first.study_instance_uid or "",
        series_instance_uid=ref.series_instance_uid,
        frame_of_reference_uid=first.frame_of_reference_uid,
        sop_class_uid=first.sop_class_uid,
        modality=first.modality,
        series_description=first.series_description,
        series_number=first.series_number,
        sop_instance_uids=[f.sop_instance_uid for f in plan.frames],
        frame_numbers=[f.number or 1 for f in plan.frames] if multi else None,
        files=list(files.values()),
        transfer_syntax_uid=first.transfer_syntax_uid,
        rescale_slope=plan.frames[0].slope,
        rescale_intercept=plan.frames[0].intercept,
        rescale_type=first.rescale_type or ("HU" if first.modality == "CT" else None),
        patient_name_present=any(o.patient_name_present for o in plan.objects),
        patient_id_present=any(o.patient_id_present for o in plan.objects),
        volume=ref.volume,
    )
    geometry = VolumeGeometry(
        shape=list(plan.shape),
        affine=plan.affine.tolist(),
        qform=qform.tolist(),
        sform=plan.affine.tolist(),
        qform_code=1,
        sform_code=1,
        zooms=list(plan.zooms),
        orientation=list(nib.aff2axcodes(plan.affine)),
        nifti_version=1,
        header_b64=base64.b64encode(hdr.binaryblock).decode("ascii"),
        dtype=dtype.name,
        dicom=info,
    )
    return StoreMeta(
        source=SourceInfo(path=str(root), sha256=ref.sha256(), size=sum(o.size for o in plan.objects),
                          format="DICOM"),
        geometry=geometry,
        channel_names=["channel0"],
        spatial_dims=3,
    )


def _relative(path: Path, root: Path) -> str:
    """A file's path relative to the series root (SourceInfo.path), so a moved archive still verifies."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def _nifti_header(plan: _Plan, dtype: np.dtype) -> nib.Nifti1Header:
    """A NIfTI-1 header on the series' grid: scanner qform and sform, mm, no scaling (values are rescaled)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(plan.shape)
    hdr.set_data_dtype(dtype)
    hdr.set_qform(plan.affine, code=1)
    hdr.set_sform(plan.affine, code=1)
    hdr.set_zooms(plan.zooms)
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_slope_inter(1.0, 0.0)
    hdr["descrip"] = b"segflow: from a DICOM series"
    return hdr


def _copy_slabs(plan: _Plan, out: ImageStore, dtype: np.dtype, *, strict: bool) -> tuple[float, float] | None:
    """Write every z-chunk of slices; None when done.

    With ``strict``, stop at the first slab whose values ``dtype`` cannot hold
    and return the value range seen so far, so the caller picks a wider dtype.
    """
    image = out.image
    depth = image.shape[1]
    step = image.chunks[1]
    j, i = image.shape[2], image.shape[3]
    integral = dtype.kind != "f"
    work = _work_dtype(plan) if integral else np.dtype("float64")
    low, high = np.inf, -np.inf
    for k0 in range(0, depth, step):
        k1 = min(k0 + step, depth)
        slab = np.empty((k1 - k0, j, i), dtype=work)
        for k, pixels in zip(range(k0, k1), _read_frames(plan, plan.frames[k0:k1])):
            frame = plan.frames[k]
            if pixels.shape != (j, i):
                raise CorruptInputError(plan.ref.display, f"{_frame_name(frame)} decoded to {pixels.shape}, "
                                                          f"not rows x columns {(j, i)}")
            if integral:
                slab[k - k0] = pixels.astype(work) * int(frame.slope) + int(frame.intercept)
            else:
                slab[k - k0] = pixels.astype(np.float64) * frame.slope + frame.intercept
        low, high = min(low, float(slab.min())), max(high, float(slab.max()))
        if strict and not _fits(dtype, low, high):
            return low, high
        image[0, k0:k1] = slab.astype(dtype)
    return None


def _work_dtype(plan: _Plan) -> np.dtype:
    """int32 holds rescaled 8/16-bit pixels with any sane slope and intercept (half the memory of int64)."""
    bound = max(abs(f.slope) for f in plan.frames) * 65535 + max(abs(f.intercept) for f in plan.frames)
    return np.dtype("int32") if plan.raw_dtype.itemsize <= 2 and bound < 2 ** 31 else np.dtype("int64")


def _read_frames(plan: _Plan, frames: list[_Frame]) -> Iterator[np.ndarray]:
    """Decoded raw pixels of the given frames in their order, one file open per file per slab."""
    from pydicom.pixels import iter_pixels, pixel_array

    display = plan.ref.display
    wanted: dict[Path, list[int]] = {}
    for frame in frames:
        if frame.number is not None:
            wanted.setdefault(frame.path, []).append(frame.number - 1)
    decoded: dict[tuple[Path, int], np.ndarray] = {}
    for path, indices in wanted.items():
        indices = sorted(set(indices))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for index, array in zip(indices, iter_pixels(path, indices=indices)):
                    decoded[(path, index)] = array
        except Exception as exc:  # noqa: BLE001 - decoders raise many types for damaged data
            raise CorruptInputError(display, f"cannot decode the pixel data of {path.name}: {_why(exc)}") from None
    for frame in frames:
        if frame.number is not None:
            array = decoded.pop((frame.path, frame.number - 1), None)
            if array is None:
                raise CorruptInputError(display, f"{_frame_name(frame)} could not be read")
            yield array
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                array = pixel_array(frame.path)
        except Exception as exc:  # noqa: BLE001 - decoders raise many types for damaged data
            raise CorruptInputError(display, f"cannot decode the pixel data of {frame.path.name}: "
                                             f"{_why(exc)}") from None
        yield array


# --------------------------------------------------------------------------- small helpers


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _frame_name(frame: _Frame) -> str:
    return frame.path.name if frame.number is None else f"{frame.path.name} frame {frame.number}"


def _class_name(uid: str) -> str:
    if uid in NOT_IMAGES:
        return NOT_IMAGES[uid]
    name = UID(uid).name if uid else ""
    return name if name and name != uid else (f"SOP class {uid}" if uid else "SOP-class-less")


def _syntax_name(uid: str) -> str:
    name = UID(uid).name
    return _SYNTAX_NAMES.get(uid, name if name != uid else "unknown")


def _str(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _int(value: Any) -> int | None:
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _float(value: Any, default: float | None = None) -> float | None:
    try:
        out = float(value) if value is not None and value != "" else default
    except (TypeError, ValueError):
        return default
    return out if out is None or np.isfinite(out) else default


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    values = [value] if not isinstance(value, Iterable) or isinstance(value, (str, bytes)) else list(value)
    if len(values) != n:
        return None
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None
    return out if all(np.isfinite(out)) else None


def _pair(value: Any) -> tuple[float, float] | None:
    out = _floats(value, 2)
    return None if out is None else (out[0], out[1])


def _fmt(values: Iterable[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def _why(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
