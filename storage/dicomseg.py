"""DICOM SEG export of a label map, for PACS and the viewers a radiology group uses.

A DICOM SEG is a new series in the source's study whose frames each point at
one source image (by SOP instance UID, and frame number for an enhanced
multi-frame source).  Stored slice ``k`` of a segflow volume is exactly
``geometry.dicom.sop_instance_uids[k]`` (ingest sorted the series along its
slice normal), so the label map is handed to highdicom in that same order with
the source headers in that order: each SEG frame then references the right
instance and carries its position, whatever the file names, instance numbers
or slice direction were.  The source headers are read without pixel data.

One segment per non-background class.  BINARY needs segment numbers 1..n, so
classes are numbered by rank of value; each segment's algorithm parameters keep
``label_value=<class value>`` (and the weights' sha256), which is how
:func:`read_dicom_seg_labels` maps segments back to class values.

Segment codes come from the class's ``code`` (see :func:`segment_codes`).
highdicom needs the whole pixel array in memory: the label map is read slab by
slab into one uint8/uint16 array of segment numbers, the size of one label
volume.  The file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import os
import re
import uuid
from os import PathLike
from pathlib import Path
from typing import Any, Literal

import highdicom as hd
import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes

from storage.classes import SCT_CODE, LabelClass
from storage.errors import ExportError, InvalidInputError
from storage.geometry import VolumeGeometry
from storage.libquiet import quietly as library_quietly

__all__ = ["write_dicom_seg", "read_dicom_seg_labels", "segment_codes", "SEG_SERIES_NUMBER_BASE"]

SEG_SERIES_NUMBER_BASE = 9000
MANUFACTURER = "segflow"

# SNOMED CT segmentation property categories (DICOM CID 7150) a card's code may name by number.
CATEGORIES: dict[str, str] = {
    "91723000": "Anatomical Structure",
    "49755003": "Morphologically Altered Structure",
    "85756007": "Tissue",
    "260787004": "Physical object",
    "246464006": "Function",
    "410607006": "Organism",
    "272737002": "Spatial and Relational Concept",
}
ANATOMICAL_STRUCTURE = "91723000"
# A class without a SNOMED code is described as Tissue/Tissue: it claims nothing anatomical that the card
# did not say, and it is what 3D Slicer assigns to a segment it knows nothing about, so viewers show it
# neutrally instead of mislabelling it as an organ.
GENERIC = hd.sr.CodedConcept("85756007", "SCT", "Tissue")

_LO_BAD = re.compile(r"[\\\x00-\x1f\x7f]")


def segment_codes(cls: LabelClass) -> tuple[hd.sr.CodedConcept, hd.sr.CodedConcept]:
    """(category, type) codes for a class, from its card ``code``.

    Syntax: ``SCT:[<category>/]<type>[|<meaning>]``, e.g. ``SCT:10200004|Liver``
    or ``SCT:49755003/108369006|Neoplasm``. The category defaults to 91723000
    "Anatomical Structure" and must be one of :data:`CATEGORIES`; the type's
    meaning defaults to the class name. A class without a code, or with a code
    of another scheme (a land-cover code), gets the generic Tissue/Tissue.
    """
    code = (cls.code or "").strip()
    if not code.upper().startswith("SCT:"):
        return GENERIC, GENERIC
    m = SCT_CODE.match("SCT:" + code[4:].strip())
    if m is None:
        raise ValueError(f"class {cls.name!r} has code {code!r}, not SCT:[<category>/]<type>[|<meaning>]")
    category = m["category"] or ANATOMICAL_STRUCTURE
    if category not in CATEGORIES:
        raise ValueError(f"class {cls.name!r} has category {category}, not one of the SNOMED CT segmentation "
                         f"categories {', '.join(sorted(CATEGORIES))}")
    meaning = _lo(m["meaning"] or cls.name)
    return (hd.sr.CodedConcept(category, "SCT", CATEGORIES[category]),
            hd.sr.CodedConcept(m["type"], "SCT", meaning))


def write_dicom_seg(
    labels: Any,
    geometry: VolumeGeometry,
    out_path: str | PathLike[str],
    *,
    classes: list[LabelClass],
    algorithm: dict[str, Any],
    segmentation_type: Literal["BINARY", "LABELMAP"] = "BINARY",
    nodata_label: int | None = None,
    series_number: int | None = None,
    source_root: str | PathLike[str] | None = None,
) -> Path:
    """Write a (K, J, I) label map as a DICOM SEG referencing the source series, slice k -> instance k.

    ``algorithm`` is ``{"name": model name, "version": segflow version,
    "weights_sha256": ...}``. Nodata voxels are written as background; a
    label value that is neither a class nor nodata is refused. The series
    number defaults to 9000 + the source's series number (mod 1000).
    ``source_root`` is the series folder that relative paths in
    ``geometry.dicom.files`` start from (the image store's ``source.path``).
    """
    out = Path(out_path)
    info = geometry.dicom
    if info is None:
        raise ExportError(out, "the volume did not come from a DICOM series: a DICOM SEG needs source images")
    where = _series_label(geometry, source_root)  # content errors name the input; only I/O names the SEG
    if segmentation_type not in ("BINARY", "LABELMAP"):
        raise ExportError(where, f"segmentation type must be BINARY or LABELMAP, got {segmentation_type!r}")
    depth = len(info.sop_instance_uids)
    if len(labels.shape) != 3 or labels.shape[0] != depth:
        raise ExportError(where, f"labels have shape {tuple(labels.shape)} but the series has {depth} slices")
    if np.dtype(labels.dtype).kind not in "biu":
        raise ExportError(where, f"labels must be integers, got {labels.dtype}")
    name = str(algorithm.get("name") or "segflow model")
    version = str(algorithm.get("version") or "unknown")
    weights = str(algorithm.get("weights_sha256") or "")

    segmented = sorted((c for c in classes if c.value != 0), key=lambda c: c.value)
    if not segmented:
        raise ExportError(where, "no non-background class to write as a segment")
    if nodata_label is not None and any(c.value == nodata_label for c in segmented):
        raise ExportError(where, f"nodata label {nodata_label} is also the value of a class")
    try:
        descriptions = [_describe(c, n, name, version, weights) for n, c in enumerate(segmented, start=1)]
    except ValueError as exc:
        raise ExportError(where, str(exc)) from None

    sources = _read_sources(where, geometry, source_root)
    _with_thickness(sources, geometry)
    _with_type2(sources)
    rows, columns = int(sources[0].Rows), int(sources[0].Columns)
    if tuple(labels.shape[1:]) != (rows, columns):
        raise ExportError(where, f"labels have shape {tuple(labels.shape)} but the source images are "
                                 f"{rows} rows x {columns} columns")
    numbers = _segment_numbers(where, labels, segmented, nodata_label)
    if info.frame_numbers is not None:  # one enhanced multi-frame source: this volume's frames of it
        sources = [_volume_frames(sources[0], info.frame_numbers)]

    if series_number is None:
        series_number = SEG_SERIES_NUMBER_BASE + (info.series_number or 0) % 1000
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
    try:
        with library_quietly("highdicom"):  # highdicom quotes a one-part patient name it doubts
            seg = _segmentation(sources, numbers, segmentation_type, descriptions, series_number, name, version)
        if info.frame_numbers is not None:
            _refer_to_source_frames(seg, info.frame_numbers)
        seg.SeriesDescription = _lo(f"segflow {name}")
        seg.save_as(tmp, enforce_file_format=True)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        _unlink(tmp)
        raise ExportError(out, f"cannot write: {exc.strerror or type(exc).__name__}") from None
    except (ValueError, TypeError, AttributeError) as exc:  # highdicom's validation of the content
        _unlink(tmp)
        raise ExportError(where, f"DICOM SEG {out.name} not written: highdicom refused the segmentation: "
                                 f"{_short(exc)} (--dicom-seg none writes the other outputs without it)") from None
    except BaseException:
        _unlink(tmp)
        raise
    return out


def _segmentation(sources: list[pydicom.Dataset], numbers: np.ndarray, segmentation_type: str,
                  descriptions: list[Any], series_number: int, name: str, version: str) -> Any:
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=numbers,
        segmentation_type=segmentation_type,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=_lo(name),
        software_versions=_lo(version),
        device_serial_number=MANUFACTURER,
        content_label="SEGFLOW",
        content_description=_lo(f"{name} labels"),
        omit_empty_frames=bool(np.any(numbers)),  # all empty: every frame, as highdicom would (with a warning)
        **_character_set(descriptions, name, version),
    )


def _series_label(geometry: VolumeGeometry, root: str | PathLike[str] | None) -> str:
    """How an error names the input series (as SeriesRef.display does), not the SEG that was never written."""
    info = geometry.dicom
    assert info is not None
    volume = f" {info.volume}" if info.volume else ""
    return f"{root or 'DICOM'} [series {info.series_instance_uid}{volume}]"


def _volume_frames(source: pydicom.Dataset, frame_numbers: list[int]) -> pydicom.Dataset:
    """The multi-frame source's header cut down to this volume's frames, in stored slice order.

    An enhanced object holding two volumes (magnitude and phase) at the same
    positions made highdicom refuse ("Plane positions must not contain
    duplicates") when handed all its frames; handed these, SEG frame k refers
    to frame k+1 of the copy, renumbered by :func:`_refer_to_source_frames`.
    """
    copy = pydicom.Dataset(source)  # a shallow copy: the file's header is not changed
    copy.file_meta = source.file_meta
    per_frame = source.PerFrameFunctionalGroupsSequence
    copy.PerFrameFunctionalGroupsSequence = pydicom.Sequence([per_frame[n - 1] for n in frame_numbers])
    copy.NumberOfFrames = len(frame_numbers)
    return copy


def _refer_to_source_frames(seg: pydicom.Dataset, frame_numbers: list[int]) -> None:
    """Point each SEG frame's source reference at the real frame number of the source object.

    highdicom shares one reference item between the segments of a slice: each item is renumbered once.
    """
    done: set[int] = set()
    for item in seg.get("PerFrameFunctionalGroupsSequence", []):
        for derivation in item.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                if "ReferencedFrameNumber" in source and id(source) not in done:
                    done.add(id(source))
                    source.ReferencedFrameNumber = frame_numbers[int(source.ReferencedFrameNumber) - 1]


UTF8 = "ISO_IR 192"


def _character_set(descriptions: list[hd.seg.SegmentDescription], name: str, version: str) -> dict[str, str]:
    """UTF-8 when a text the SEG writes is not ASCII (a class named 'Läsion' or '病変'), else the source's.

    Without it pydicom wrote such names in the source's (often default, ASCII)
    repertoire: Latin-1 bytes no reader could decode, or '?' with a warning.
    Values copied from the source are re-encoded, so nothing else changes.
    """
    texts = [name, version] + [str(d.SegmentLabel) for d in descriptions] + \
        [str(d.SegmentedPropertyTypeCodeSequence[0].CodeMeaning) for d in descriptions]
    return {"specific_character_set": UTF8} if any(not t.isascii() for t in texts) else {}


def _with_thickness(sources: list[Any], geometry: VolumeGeometry) -> None:
    """Give single-frame sources without a SliceThickness (optional in many objects) the spacing between slices,
    in memory, as dcm2niix does (and a SpacingBetweenSlices their positions contradict, the true one): highdicom
    takes the SEG's pixel measures from the first source and failed on it
    ("no attribute 'SliceThickness'"), throwing away the run's other outputs.  The files are not touched."""
    if geometry.dicom is None or geometry.dicom.frame_numbers is not None:
        return
    spacing = float(np.linalg.norm(np.asarray(geometry.affine, dtype=np.float64)[:3, 2]))  # the slice axis, mm
    for ds in sources:
        if ds.get("SliceThickness") in (None, ""):
            ds.SliceThickness = f"{spacing:.6g}"
        # a SpacingBetweenSlices the positions contradict (3 where the frames lie 2 mm apart) was copied into the
        # SEG's pixel measures as it stood: the SEG states the spacing its frames have, as the NIfTI does
        # and one that is absent: highdicom then wrote 1 mm (a one-slice MR of 0.8 mm measured 25 % more in a
        # viewer than in statistics.json)
        between = ds.get("SpacingBetweenSlices")
        if between in (None, "") or abs(float(between) - spacing) > 1e-3 * spacing:
            ds.SpacingBetweenSlices = f"{spacing:.6g}"


# The patient and study attributes a SEG copies from its source (DICOM PS3.3 C.7.1.1, C.7.2.1) that are type 2:
# present, but allowed empty.  De-identified exports often drop them altogether.
TYPE2_COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")


def _with_type2(sources: list[Any]) -> None:
    """Give sources that lack a type 2 patient or study attribute an empty one, in memory: highdicom copies them
    from the first source and failed on the missing one ("no attribute 'PatientBirthDate'"), throwing away the
    run's other outputs.  Empty is what the standard allows when the value is unknown; the files are not
    touched."""
    for ds in sources:
        for keyword in TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")


def _describe(c: LabelClass, number: int, name: str, version: str, weights: str) -> hd.seg.SegmentDescription:
    category, kind = segment_codes(c)
    parameters = {"label_value": str(c.value)}
    if weights:
        parameters["weights_sha256"] = _parameter(weights)
    algorithm = hd.AlgorithmIdentificationSequence(
        name=_lo(name), family=codes.cid7162.ArtificialIntelligence, version=_lo(version),
        source=MANUFACTURER, parameters=parameters,
    )
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=_lo(c.name),
        segmented_property_category=category,
        segmented_property_type=kind,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        display_color=hd.color.CIELabColor.from_rgb(*c.color),
    )


def _read_sources(where: str, geometry: VolumeGeometry, root: str | PathLike[str] | None) -> list[pydicom.Dataset]:
    """The source headers (no pixel data), in stored slice order (one dataset for a multi-frame source)."""
    info = geometry.dicom
    assert info is not None
    by_uid = {f.sop_instance_uid: f for f in info.files}
    wanted = list(dict.fromkeys(info.sop_instance_uids))  # a multi-frame source lists its one UID per slice
    sources = []
    for sop_uid in wanted:
        entry = by_uid.get(sop_uid)
        if entry is None:
            raise ExportError(where, f"series {info.series_instance_uid}: no file recorded for instance {sop_uid}")
        path = Path(entry.path)
        if not path.is_absolute():
            if root is None:
                raise ExportError(where, f"series {info.series_instance_uid}: source paths are relative to the "
                                       "series folder, which was not given (source_root)")
            path = Path(root) / path
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)  # ingest accepted it, preamble or not
        except FileNotFoundError:
            raise ExportError(where, f"source file {path.name} of series {info.series_instance_uid} is gone") from None
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise ExportError(where, f"cannot read source file {path.name} of series "
                                   f"{info.series_instance_uid}: {_short(exc)}") from None
        if ds.get("SOPInstanceUID") != sop_uid or ds.get("SeriesInstanceUID") != info.series_instance_uid:
            raise ExportError(where, f"source file {path.name} no longer holds instance {sop_uid} of series "
                                   f"{info.series_instance_uid}")
        sources.append(ds)
    if info.frame_numbers is not None and len(sources) != 1:
        raise ExportError(where, f"series {info.series_instance_uid}: frame numbers given for {len(sources)} "
                               "instances; only one multi-frame source is supported")
    return sources


def _segment_numbers(where: str, labels: Any, segmented: list[LabelClass], nodata_label: int | None) -> np.ndarray:
    """Class values -> segment numbers 1..n (0 background, nodata -> 0), read slab by slab."""
    n = len(segmented)
    top = max([c.value for c in segmented] + [nodata_label or 0])
    lut = np.full(top + 1, -1, dtype=np.int64)
    lut[0] = 0
    for number, c in enumerate(segmented, start=1):
        lut[c.value] = number
    if nodata_label is not None and nodata_label >= 0:
        lut[nodata_label] = 0
    dtype = np.uint8 if n < 256 else np.uint16
    numbers = np.zeros(tuple(labels.shape), dtype=dtype)
    chunks = getattr(labels, "chunks", None)
    step = int(chunks[0]) if chunks and isinstance(chunks[0], (int, np.integer)) else 8
    for k0 in range(0, labels.shape[0], step):
        slab = np.asarray(labels[k0:k0 + step])
        if slab.size == 0:
            continue
        lo, hi = int(slab.min()), int(slab.max())
        if lo < 0 or hi > top:
            bad = lo if lo < 0 else hi
            raise ExportError(where, f"label value {bad} (slices {k0}-{k0 + len(slab) - 1}) is not a class")
        mapped = lut[slab]
        if mapped.min() < 0:
            bad = int(slab[mapped < 0].flat[0])
            raise ExportError(where, f"label value {bad} (slices {k0}-{k0 + len(slab) - 1}) is not a class")
        numbers[k0:k0 + len(slab)] = mapped
    return numbers


def read_dicom_seg_labels(path: str | PathLike[str], geometry: VolumeGeometry) -> np.ndarray:
    """Read a DICOM SEG back as a (K, J, I) array of class values on the source's stored grid.

    Frames are matched to slices by the source SOP instance UID (and frame
    number) each frame references, not by frame order, so a SEG written in
    the wrong order reads back wrong.
    """
    src = Path(path)
    info = geometry.dicom
    if info is None:
        raise InvalidInputError(src, "the volume did not come from a DICOM series")
    try:
        seg = hd.seg.segread(src)
    except (InvalidDicomError, OSError, ValueError, AttributeError) as exc:
        raise InvalidInputError(src, f"not a readable DICOM SEG: {_short(exc)}") from None
    referenced = {item.SeriesInstanceUID for item in seg.get("ReferencedSeriesSequence", [])}
    if info.series_instance_uid not in referenced:
        raise InvalidInputError(src, f"does not reference series {info.series_instance_uid}")
    try:
        if info.frame_numbers is not None:
            numbers = seg.get_pixels_by_source_frame(
                source_sop_instance_uid=info.sop_instance_uids[0], source_frame_numbers=info.frame_numbers,
                combine_segments=True, assert_missing_frames_are_empty=False, dtype=np.uint16)
        else:
            numbers = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=info.sop_instance_uids, combine_segments=True,
                assert_missing_frames_are_empty=False, dtype=np.uint16)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise InvalidInputError(src, f"cannot map its frames onto series {info.series_instance_uid}: "
                                     f"{_short(exc)}") from None
    lut = np.zeros(int(max(seg.segment_numbers, default=0)) + 1, dtype=np.int64)
    for number in seg.segment_numbers:
        if number:  # LABELMAP: highdicom describes the background as segment 0
            lut[number] = _label_value(seg.get_segment_description(number))
    values = lut[numbers]
    dtype = np.uint8 if values.max(initial=0) < 256 else np.uint16
    return values.astype(dtype)


def _label_value(desc: hd.seg.SegmentDescription) -> int:
    """The class value a segment stands for: its ``label_value`` parameter, else its segment number."""
    for item in desc.get("SegmentationAlgorithmIdentificationSequence", []):
        for part in str(item.get("AlgorithmParameters", "")).split(","):
            key, _, value = part.partition("=")
            if key.strip() == "label_value" and value.strip().isdigit():
                return int(value)
    return int(desc.segment_number)


def _lo(text: str) -> str:
    """A DICOM LO value: no backslash or control characters, at most 64 characters."""
    clean = " ".join(_LO_BAD.sub(" ", text).split())
    return clean[:64] or "unnamed"


def _parameter(text: str) -> str:
    # AlgorithmParameters is "key=value,key=value": neither separator may appear in a value.
    return re.sub(r"[,=\\\x00-\x1f]", "_", text)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
