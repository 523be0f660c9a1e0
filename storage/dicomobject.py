"""One DICOM file's header: what the object is, the geometry of its frames, and its values parsed.

Finding series in folders (:mod:`storage.dicomfiles`) and reading a volume's
pixels (:mod:`storage.dicom`) both need to know what one file holds without
reading its pixels: its SOP class (an image or not), its series, its pixel
encoding, and each frame's position, orientation, spacing and rescale, an
enhanced multi-frame object's frames keyed by frame type and non-spatial
dimension index.  This module is that one header pass, remembered while the
file is unchanged, with the tolerant parsers of DICOM values it needs and the
names messages give SOP classes, transfer syntaxes and frames; and the one
place a file's pixels are decoded (:func:`decode_pixels`), where every decoder
failure, a Rust decoder's panic included, becomes one CorruptInputError.
A file without the 128-byte preamble is read when it is plainly a DICOM
dataset; an image file cut short before its Rows is flagged (``damage``) so
that its series is refused rather than silently missing a slice.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from storage.errors import CorruptInputError, InputError

__all__ = ["BARE_GROUPS", "DICOM_SUFFIXES", "DicomObject", "Frame", "class_name", "decode_pixels", "fmt_numbers",
           "frame_name", "scan_file", "syntax_name", "unreadable", "why"]

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
# Dimension pointers that number frames (InstanceNumber of a legacy-converted object): never a volume of their own.
_COUNTER_POINTERS = {0x00200013}
# The first element of a dataset written without preamble and file meta: group 0002 or 0008, little endian.
BARE_GROUPS = (b"\x02\x00", b"\x08\x00")
_NATIVE_BY_ENCODING = {  # (implicit VR, little endian) of a dataset without file meta -> its transfer syntax
    (True, True): "1.2.840.10008.1.2", (False, True): "1.2.840.10008.1.2.1", (False, False): "1.2.840.10008.1.2.2",
}

_HEADER_CACHE: dict[tuple[int, int, int, int], "DicomObject | None"] = {}
_HEADER_CACHE_MAX = 100_000


# --------------------------------------------------------------------------- headers


@dataclass(frozen=True)
class Frame:
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
    # type and non-spatial dimension values of an enhanced frame; a classic file's echo (EchoNumbers=2), so that
    # a multi-echo series (one SeriesInstanceUID, every position once per echo) is one volume per echo; () otherwise
    key: tuple[str, ...] = ()


@dataclass
class DicomObject:
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
    frames: list[Frame] = field(default_factory=list)
    pixel_bytes: int | None = None  # bytes the file holds after the pixel element's header (native syntaxes)
    frames_declared: int = 1
    rows: int | None = None
    columns: int | None = None
    damage: str | None = None  # why an image file of a series cannot be one (a header cut short), else None
    bare: bool = False  # written without the 128-byte preamble (and maybe file meta): decoders need its syntax


def _read_header(path: Path) -> tuple[Dataset, str | None, int] | None:
    """The header (no pixels), which pixel element follows it and where; None when the file is not DICOM."""
    try:
        with open(path, "rb") as fp:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, force=False)
            tag = fp.read(4)  # pydicom stops at the pixel element's tag, or at the end of the file
            after_tag = fp.tell()
    except InvalidDicomError:
        return _read_bare_header(path)
    except OSError as exc:
        raise InputError(path, f"cannot read file: {exc.strerror or exc}") from None
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types for a damaged header
        raise CorruptInputError(path, f"cannot read the DICOM header: {why(exc)}") from None
    syntax = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    if syntax == _DEFLATED:  # the dataset was inflated from a copy: the file position says nothing
        return ds, "PixelData" if "Rows" in ds else None, -1
    return ds, _PIXEL_TAGS.get(tag), after_tag


def _read_bare_header(path: Path) -> tuple[Dataset, str | None, int] | None:
    """A dataset written without the 128-byte preamble (old archives, some PACS exports), or None.

    pydicom reads anything with ``force=True``, so only a file that starts with
    a group 0002/0008 element, parses, names a SOP class pydicom knows and has a
    SOP instance UID counts; a file without file meta gets the native transfer
    syntax its encoding shows (compressed pixels always come with file meta).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Expected explicit VR, but found implicit VR"; junk values of junk files
        try:
            with open(path, "rb") as fp:
                if fp.read(2) not in BARE_GROUPS:
                    return None
                fp.seek(0)
                ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True, defer_size=4096)
                tag = fp.read(4)
                after_tag = fp.tell()
            sop_class, sop_instance = str(ds.get("SOPClassUID", "")), str(ds.get("SOPInstanceUID", ""))
        except Exception:  # noqa: BLE001 - whatever this is, it is not a readable DICOM dataset
            return None
    if not sop_instance or UID(sop_class).type != "SOP Class":
        return None
    meta = getattr(ds, "file_meta", None) or pydicom.dataset.FileMetaDataset()
    syntax = str(meta.get("TransferSyntaxUID", "")) or _NATIVE_BY_ENCODING.get(
        tuple(getattr(ds, "original_encoding", (None, None))), "")
    if not UID(syntax).is_transfer_syntax:
        return None
    meta.TransferSyntaxUID = syntax
    ds.file_meta = meta
    return ds, _PIXEL_TAGS.get(tag), after_tag


def scan_file(path: Path) -> DicomObject | None:
    """The header pass over one file, remembered while the file is unchanged."""
    st = path.stat()
    cache_key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if cache_key in _HEADER_CACHE:
        return _HEADER_CACHE[cache_key]
    read = _read_header(path)
    obj = None if read is None else _describe_object(path, read[0], read[1], st.st_size)
    if obj is not None and read is not None:
        obj.bare = not getattr(read[0], "preamble", None)
    if obj is not None and read is not None and read[2] >= 0 and obj.pixel_tag is not None:
        implicit = obj.transfer_syntax_uid == _IMPLICIT_VR
        obj.pixel_bytes = st.st_size - read[2] - (4 if implicit else 8)  # past the element's VR and length
    if len(_HEADER_CACHE) >= _HEADER_CACHE_MAX:
        _HEADER_CACHE.pop(next(iter(_HEADER_CACHE)))
    _HEADER_CACHE[cache_key] = obj
    return obj


DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima")  # names only DICOM files take (Siemens writes .IMA)


def unreadable(path: Path) -> DicomObject | None:
    """A file that is not readable DICOM yet is named as a DICOM file or starts as one (the DICM preamble): a
    slice emptied or cut short by an interrupted copy, as a damaged image of no known series (a folder's series
    had been segmented without it, one slice short, when it was the last slice).  None for any other file (a
    README, a thumbnail), which a folder may hold beside its series."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return None
    if path.suffix.lower() not in DICOM_SUFFIXES and head[128:132] != b"DICM":
        return None
    return DicomObject(path=path, sop_class_uid="", is_image=False, series_instance_uid=None,
                       study_instance_uid=None, frame_of_reference_uid=None, modality=None, series_description=None,
                       series_number=None, transfer_syntax_uid=None, pixel_tag=None, bits_allocated=None,
                       bits_stored=None, pixel_representation=0, samples_per_pixel=1, photometric=None,
                       rescale_type=None, patient_name_present=False, patient_id_present=False,
                       multi_frame_without_groups=False, size=size,
                       damage=f"is not a readable DICOM file ({size} bytes): damaged or cut short")


def _describe_object(path: Path, ds: Dataset, pixel_tag: str | None, size: int) -> DicomObject:
    meta = getattr(ds, "file_meta", Dataset())
    sop_class = str(ds.get("SOPClassUID", meta.get("MediaStorageSOPClassUID", "")))
    is_image = sop_class not in NOT_IMAGES and "Rows" in ds and "Columns" in ds
    damaged = not is_image and sop_class not in NOT_IMAGES and (_is_image_class(sop_class) or pixel_tag is not None)
    # cut inside its header (every dataset has a SOPInstanceUID): skipped as "not an image", its series had lost it
    headless = not is_image and sop_class not in NOT_IMAGES and "SOPInstanceUID" not in ds
    frames_declared = _int(ds.get("NumberOfFrames")) or 1
    enhanced = "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds
    obj = DicomObject(
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
        damage=(f"is a {class_name(sop_class)} file without Rows and Columns: damaged or cut short "
                f"({size} bytes)") if damaged else
               f"is a DICOM file without a SOPInstanceUID: damaged or cut short ({size} bytes)" if headless else None,
    )
    if not is_image or obj.series_instance_uid is None:
        return obj
    try:
        obj.frames = _enhanced_frames(path, ds, frames_declared) if enhanced else [_classic_frame(path, ds)]
    except (ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise CorruptInputError(path, f"cannot read its image geometry: {why(exc)}") from None
    return obj


def _is_image_class(uid: str) -> bool:
    """An image storage SOP class (CT, MR, enhanced, legacy converted...): its files must have image attributes."""
    return bool(uid) and uid not in NOT_IMAGES and "Image Storage" in UID(uid).name


def _classic_frame(path: Path, ds: Dataset) -> Frame:
    return Frame(
        path=path, number=None, sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        rows=int(ds.Rows), columns=int(ds.Columns),
        iop=_floats(ds.get("ImageOrientationPatient"), 6), ipp=_floats(ds.get("ImagePositionPatient"), 3),
        pixel_spacing=_pair(ds.get("PixelSpacing")), thickness=_float(ds.get("SliceThickness")),
        between=_float(ds.get("SpacingBetweenSlices")),
        slope=_float(ds.get("RescaleSlope"), 1.0), intercept=_float(ds.get("RescaleIntercept"), 0.0),
        key=_echo_key(ds),
    )


def _echo_key(ds: Dataset) -> tuple[str, ...]:
    """``("EchoNumbers=n",)`` for a classic file that states its echo: dcm2niix writes such a series' echoes apart
    (``_e1``, ``_e2``); read as one volume it was refused as "two slices at the same position"."""
    echo = ds.get("EchoNumbers")
    if echo is None or echo == "":
        return ()
    if isinstance(echo, Sequence) and not isinstance(echo, str):  # a multi-valued IS: the first
        echo = echo[0] if len(echo) else ""
    try:
        value = int(float(echo))
    except (TypeError, ValueError):
        return ()
    return (f"EchoNumbers={value}",)


def _enhanced_frames(path: Path, ds: Dataset, count: int) -> list[Frame]:
    """Frames of an enhanced multi-frame object, geometry from the per-frame or shared functional groups."""
    shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else Dataset()
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) not in (0, count):
        raise ValueError(f"{len(per_frame)} per-frame functional groups for {count} frames")
    pointers = [int(item.get("DimensionIndexPointer", 0)) for item in ds.get("DimensionIndexSequence", [])]
    labels = [pydicom.datadict.keyword_for_tag(p) or f"{p:08X}" for p in pointers]
    splitting = _splitting_dimensions(pointers, [_dimension_values(per_frame[n] if per_frame else Dataset(), shared)
                                                 for n in range(count)])
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
        indexes = _dimension_values(groups, shared)
        for n_dim, (label, value) in enumerate(zip(labels, indexes)):
            if n_dim in splitting:
                key.append(f"{label}={value}")
        frames.append(Frame(
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


def _dimension_values(groups: Dataset, shared: Dataset) -> list[Any]:
    """A frame's DimensionIndexValues (per-frame, else shared), as a list."""
    for where in (groups, shared):
        seq = where.get("FrameContentSequence")
        if seq and seq[0].get("DimensionIndexValues") is not None:
            values = seq[0].DimensionIndexValues
            return [values] if isinstance(values, int) else list(values)
    return []


def _splitting_dimensions(pointers: list[int], values: list[list[Any]]) -> set[int]:
    """Which dimensions split frames into volumes: not the spatial or type ones, not a frame counter.

    A dimension whose value differs on every frame (a legacy-converted object's
    InstanceNumber) numbers frames rather than volumes: splitting by it made one
    one-frame "volume" per frame.
    """
    splitting = set()
    for n, pointer in enumerate(pointers):
        if pointer in _SPATIAL_POINTERS or pointer in _TYPE_POINTERS or pointer in _COUNTER_POINTERS:
            continue
        seen = [v[n] for v in values if len(v) > n]
        if len(seen) > 1 and len(set(seen)) == len(seen):
            continue
        splitting.add(n)
    return splitting


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


# --------------------------------------------------------------------------- pixels


# Never turned into a CorruptInputError: the user or the interpreter stopping the run.
_STOPS = (KeyboardInterrupt, SystemExit, GeneratorExit, asyncio.CancelledError)


def decode_pixels(display: str, obj: DicomObject, indices: list[int] | None) -> list[np.ndarray]:
    """The file's frames at ``indices`` (None: its one frame), decoded; any decoder failure is a corrupt file.

    BaseException is caught because a Rust decoder's panic (pylibjpeg-rle on damaged RLE data) arrives as
    pyo3's PanicException, which is not an Exception, and ended the whole batch with a backtrace.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _decode_pixels(obj, indices)
    except _STOPS:
        raise
    except BaseException as exc:  # noqa: BLE001 - decoders raise many types (and panic) for damaged data
        raise CorruptInputError(display, f"cannot decode the pixel data of {obj.path.name}: {why(exc)}") from None


def _decode_pixels(obj: DicomObject, indices: list[int] | None) -> list[np.ndarray]:
    """pydicom's file-based decoders; a deflated dataset is inflated whole first (they cannot read it)."""
    from pydicom import dcmread
    from pydicom.pixels import iter_pixels, pixel_array

    syntax = {"transfer_syntax_uid": obj.transfer_syntax_uid} if obj.bare else {}  # no file meta to say it
    if obj.transfer_syntax_uid == _DEFLATED:
        ds = dcmread(obj.path, force=obj.bare)
        array = ds.pixel_array
        if indices is None:
            return [array]
        return [array[i] if obj.frames_declared > 1 else array for i in indices]
    if indices is None:
        return [pixel_array(obj.path, **syntax)]
    return list(iter_pixels(obj.path, indices=indices, **syntax))


# --------------------------------------------------------------------------- small helpers


def frame_name(frame: Frame) -> str:
    return frame.path.name if frame.number is None else f"{frame.path.name} frame {frame.number}"


def class_name(uid: str) -> str:
    if uid in NOT_IMAGES:
        return NOT_IMAGES[uid]
    name = UID(uid).name if uid else ""
    return name if name and name != uid else (f"SOP class {uid}" if uid else "SOP-class-less")


def syntax_name(uid: str) -> str:
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


def fmt_numbers(values: Iterable[float]) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def why(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
