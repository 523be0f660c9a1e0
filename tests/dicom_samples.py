"""Small DICOM series written with pydicom, for tests of DICOM ingest and DICOM SEG export.

segflow ships no patient data, so its DICOM tests draw their own series: a CT
(or MR) written one slice per file, an enhanced multi-frame MR holding two
volumes at the same positions, and the broken series a scanner or a careless
export produces (a missing slice, uneven gaps, a tilted gantry...). Each file is
a valid Part 10 file that dcm2niix and highdicom accept, so the same fixtures
serve as a reference check against dcm2niix; patient identifiers are dummies.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    PYDICOM_IMPLEMENTATION_UID,
    RLELossless,
    generate_uid,
)

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")
ENHANCED_MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4.1")
BASIC_TEXT_SR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.88.11")
SEGMENTATION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.66.4")
# JPEG XL (DICOM 2024): no decoder for it in pydicom 3.0 or the pylibjpeg plugins installed here
JPEG_XL_LOSSLESS = UID("1.2.840.10008.1.2.4.110")
MPEG2_MPHL = UID("1.2.840.10008.1.2.4.101")

DUMMY_PATIENT_NAME = "Dummy^Patient"
DUMMY_PATIENT_ID = "DUMMY-0001"


def _fmt(values: Sequence[float]) -> list[str]:
    """DS values short enough for the 16-character limit, exact for the test geometries."""
    return [f"{float(v):.10g}"[:16] for v in values]


def normal_of(iop: Sequence[float]) -> np.ndarray:
    """The slice normal n = row direction x column direction."""
    row = np.asarray(iop[:3], dtype=float)
    col = np.asarray(iop[3:], dtype=float)
    return np.cross(row, col)


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str = ExplicitVRLittleEndian) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def _patient_study(ds: Dataset, study_uid: str, series_uid: str, modality: str,
                   series_description: str | None, series_number: int | None) -> None:
    ds.PatientName = DUMMY_PATIENT_NAME
    ds.PatientID = DUMMY_PATIENT_ID
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.Modality = modality
    if series_description is not None:
        ds.SeriesDescription = series_description
    if series_number is not None:
        ds.SeriesNumber = series_number
    ds.Manufacturer = "segflow-tests"


def _pixel_module(ds: Dataset, rows: int, columns: int) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1


def ct_slice(
    pixels: np.ndarray,
    *,
    position: Sequence[float],
    iop: Sequence[float],
    pixel_spacing: Sequence[float],
    slice_thickness: float,
    study_uid: str,
    series_uid: str,
    frame_of_reference_uid: str,
    instance_number: int,
    slope: float = 1.0,
    intercept: float = -1024.0,
    series_description: str | None = "AX CT",
    series_number: int | None = 3,
    modality: str = "CT",
    sop_class_uid: str = CT_IMAGE_STORAGE,
) -> Dataset:
    """One single-frame CT/MR slice (not yet saved): ``pixels`` (rows, columns) int16 stored raw."""
    pixels = np.ascontiguousarray(pixels, dtype=np.int16)
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = file_meta(sop_class_uid, sop_uid)
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    _patient_study(ds, study_uid, series_uid, modality, series_description, series_number)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = _fmt(position)
    ds.ImageOrientationPatient = _fmt(iop)
    ds.PixelSpacing = _fmt(pixel_spacing)
    ds.SliceThickness = _fmt([slice_thickness])[0]
    _pixel_module(ds, *pixels.shape)
    ds.RescaleSlope = _fmt([slope])[0]
    ds.RescaleIntercept = _fmt([intercept])[0]
    if modality == "CT":
        ds.RescaleType = "HU"
        ds.KVP = "120"
    ds.PixelData = pixels.tobytes()
    return ds


def write_ct_series(
    folder: Path,
    data: np.ndarray,
    *,
    spacing: tuple[float, float, float] = (2.5, 0.8, 0.7),
    iop: Sequence[float] = (1, 0, 0, 0, 1, 0),
    origin: Sequence[float] = (-100.0, -120.0, 40.0),
    descending: bool = False,
    slope: float = 1.0,
    intercept: float = -1024.0,
    series_description: str = "AX CT",
    series_number: int = 3,
    study_uid: str | None = None,
    series_uid: str | None = None,
    name_prefix: str = "IM",
) -> list[Path]:
    """Write ``data`` (K, J, I) int16 as one CT slice file per k; the paths in k order.

    ``spacing`` is (slice, row, column) spacing in mm: rows (j) are ``spacing[1]``
    apart along the column direction ``iop[3:]``, columns (i) ``spacing[2]`` apart
    along the row direction ``iop[:3]``. Slice k lies at ``origin + k*spacing[0]*n``
    (n = row x column direction), or at ``origin - k*spacing[0]*n`` when
    ``descending``. Pixel values are stored raw; HU = raw*slope + intercept.
    Files are named ``{name_prefix}{k+1:04d}.dcm`` and InstanceNumber is k+1.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = np.asarray(data)
    if data.ndim != 3:
        raise ValueError(f"data must be (K, J, I), got shape {data.shape}")
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    n = normal_of(iop)
    sign = -1.0 if descending else 1.0
    paths = []
    for k in range(data.shape[0]):
        position = np.asarray(origin, dtype=float) + sign * k * spacing[0] * n
        ds = ct_slice(
            data[k], position=position, iop=iop, pixel_spacing=(spacing[1], spacing[2]),
            slice_thickness=spacing[0], study_uid=study_uid, series_uid=series_uid,
            frame_of_reference_uid=frame_uid, instance_number=k + 1, slope=slope,
            intercept=intercept, series_description=series_description, series_number=series_number,
        )
        path = folder / f"{name_prefix}{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- more series


def rewrite(paths: Sequence[Path], change) -> None:  # noqa: ANN001 - change(ds, k) edits a dataset in place
    """Read each file, let ``change(ds, k)`` edit it, write it back: how the bad series are made."""
    for k, path in enumerate(paths):
        ds = dcmread(path)
        change(ds, k)
        ds.save_as(path, enforce_file_format=True)


def compress_series(paths: Sequence[Path], syntax: str = RLELossless) -> None:
    """Re-encode the files with a compressed transfer syntax pydicom can encode (RLE Lossless)."""
    rewrite(paths, lambda ds, k: ds.compress(syntax))


def set_undecodable_syntax(paths: Sequence[Path]) -> None:
    """Claim JPEG XL Lossless, which no installed decoder handles; the frames are junk fragments.

    pydicom 3.0 does not know the JPEG XL UIDs and will not write them, so the
    files are written as MPEG2 MP@HL (a UID of the same length, also encapsulated
    and also undecodable here) and the UID's bytes are swapped afterwards.
    """
    def change(ds: Dataset, k: int) -> None:
        ds.file_meta.TransferSyntaxUID = MPEG2_MPHL
        ds.PixelData = encapsulate([b"\xff\x0a" + bytes(30)])
        ds["PixelData"].VR = "OB"
    rewrite(paths, change)
    for path in paths:
        raw = Path(path).read_bytes()
        assert raw.count(MPEG2_MPHL.encode()) == 1
        Path(path).write_bytes(raw.replace(MPEG2_MPHL.encode(), JPEG_XL_LOSSLESS.encode()))


def write_enhanced_mr(
    folder: Path,
    magnitude: np.ndarray,
    second: np.ndarray,
    *,
    second_type: str = "PHASE",
    spacing: tuple[float, float, float] = (3.0, 0.9, 0.9),
    iop: Sequence[float] = (1, 0, 0, 0, 1, 0),
    origin: Sequence[float] = (-50.0, -60.0, -10.0),
    interleave: bool = True,
    slope: float = 1.0,
    intercept: float = 0.0,
    series_description: str = "ENH MR B0",
    series_number: int = 7,
    name: str = "enhanced.dcm",
) -> Path:
    """One Enhanced MR object with two volumes at the same positions: magnitude and ``second_type``.

    Both arrays are (K, J, I) int16. Frames are written interleaved
    (magnitude k, second k, ...) in reverse k order, so neither frame order nor
    position order can be mistaken for the volume order. The dimension index
    is (ComplexImageComponent-like frame type, InStackPositionNumber).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    magnitude, second = np.asarray(magnitude, np.int16), np.asarray(second, np.int16)
    k_count, rows, columns = magnitude.shape
    n = normal_of(iop)
    frames = [(kind, k) for k in reversed(range(k_count)) for kind in (0, 1)] if interleave else \
        [(kind, k) for kind in (0, 1) for k in reversed(range(k_count))]
    sop_uid = generate_uid()
    dim_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = file_meta(ENHANCED_MR_IMAGE_STORAGE, sop_uid)
    ds.SOPClassUID = ENHANCED_MR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    _patient_study(ds, generate_uid(), generate_uid(), "MR", series_description, series_number)
    ds.FrameOfReferenceUID = generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.InstanceNumber = 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "MIXED", "NONE"]
    ds.ContentDate, ds.ContentTime, ds.AcquisitionDateTime = "20240101", "120000", "20240101120000"
    ds.ContentQualification = "RESEARCH"
    ds.ImageComments = ""
    ds.PixelPresentation = "MONOCHROME"
    ds.VolumetricProperties = "VOLUME"
    ds.VolumeBasedCalculationTechnique = "NONE"
    ds.ComplexImageComponent = "MIXED"
    ds.AcquisitionContrast = "MIXED"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.MagneticFieldStrength = "3"
    ds.NumberOfFrames = len(frames)
    _pixel_module(ds, rows, columns)
    ds.PresentationLUTShape = "IDENTITY"

    organization = Dataset()
    organization.DimensionOrganizationUID = dim_uid
    ds.DimensionOrganizationSequence = [organization]
    dim_type, dim_pos = Dataset(), Dataset()
    dim_type.DimensionOrganizationUID = dim_uid
    dim_type.DimensionIndexPointer = 0x00089208  # ComplexImageComponent
    dim_type.FunctionalGroupPointer = 0x00189226  # MR Image Frame Type Sequence
    dim_type.DimensionDescriptionLabel = "Frame type"
    dim_pos.DimensionOrganizationUID = dim_uid
    dim_pos.DimensionIndexPointer = 0x00200032  # ImagePositionPatient
    dim_pos.FunctionalGroupPointer = 0x00209113  # Plane Position Sequence
    dim_pos.DimensionDescriptionLabel = "Position"
    ds.DimensionIndexSequence = [dim_type, dim_pos]

    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = _fmt(spacing[1:])
    measures.SliceThickness = _fmt([spacing[0]])[0]
    measures.SpacingBetweenSlices = _fmt([spacing[0]])[0]
    shared.PixelMeasuresSequence = [measures]
    orientation = Dataset()
    orientation.ImageOrientationPatient = _fmt(iop)
    shared.PlaneOrientationSequence = [orientation]
    transform = Dataset()
    transform.RescaleSlope = _fmt([slope])[0]
    transform.RescaleIntercept = _fmt([intercept])[0]
    transform.RescaleType = "US"
    shared.PixelValueTransformationSequence = [transform]
    ds.SharedFunctionalGroupsSequence = [shared]

    per_frame = []
    pixels = []
    kinds = (("M", "MAGNITUDE"), ("B0" if second_type == "FIELD_MAP" else "PHASE_MAP", second_type))
    for kind, k in frames:
        item = Dataset()
        content = Dataset()
        content.DimensionIndexValues = [kind + 1, k + 1]
        content.InStackPositionNumber = k + 1
        content.StackID = "1"
        content.FrameAcquisitionNumber = 1
        content.TemporalPositionIndex = 1
        item.FrameContentSequence = [content]
        position = Dataset()
        position.ImagePositionPatient = _fmt(np.asarray(origin, float) + k * spacing[0] * n)
        item.PlanePositionSequence = [position]
        frame_type = Dataset()
        frame_type.FrameType = ["ORIGINAL", "PRIMARY", kinds[kind][0], "NONE"]
        frame_type.PixelPresentation = "MONOCHROME"
        frame_type.VolumetricProperties = "VOLUME"
        frame_type.VolumeBasedCalculationTechnique = "NONE"
        frame_type.ComplexImageComponent = kinds[kind][1]
        frame_type.AcquisitionContrast = "UNKNOWN"
        item.MRImageFrameTypeSequence = [frame_type]
        per_frame.append(item)
        pixels.append((magnitude if kind == 0 else second)[k])
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.PixelData = np.ascontiguousarray(np.stack(pixels), dtype=np.int16).tobytes()
    path = folder / name
    ds.save_as(path, enforce_file_format=True)
    return path


# --------------------------------------------------------------------------- objects that are not images


def write_basic_text_sr(path: Path, *, study_uid: str | None = None) -> Path:
    """A Basic Text SR document: DICOM, but no pixels and no geometry."""
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = file_meta(BASIC_TEXT_SR_STORAGE, sop_uid)
    ds.SOPClassUID = BASIC_TEXT_SR_STORAGE
    ds.SOPInstanceUID = sop_uid
    _patient_study(ds, study_uid or generate_uid(), generate_uid(), "SR", "report", 99)
    ds.InstanceNumber = 1
    ds.ValueType = "CONTAINER"
    ds.ContinuityOfContent = "SEPARATE"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    concept = Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = "11528-7", "LN", "Radiology Report"
    ds.ConceptNameCodeSequence = [concept]
    text = Dataset()
    text.RelationshipType, text.ValueType, text.TextValue = "CONTAINS", "TEXT", "No findings."
    ds.ContentSequence = [text]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dirfile(path: Path) -> Path:
    """A Philips-style DIRFILE: a Part 10 file with directory data but no SOP class, no image."""
    ds = Dataset()
    ds.file_meta = file_meta("1.2.840.10008.1.3.10", generate_uid())
    ds.FileSetID = "SEGFLOW"
    ds.DirectoryRecordSequence = []
    path = Path(path)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_seg(path: Path, source_paths: Sequence[Path]) -> Path:
    """A real DICOM SEG (highdicom) over a CT series: it has pixels and positions yet is not an image."""
    import highdicom as hd
    from highdicom.sr.coding import CodedConcept

    sources = [dcmread(p) for p in source_paths]
    sources.sort(key=lambda d: float(np.dot(d.ImagePositionPatient, normal_of(d.ImageOrientationPatient))))
    mask = np.zeros((len(sources), sources[0].Rows, sources[0].Columns), dtype=bool)
    mask[:, 1:3, 1:3] = True
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="thing",
        segmented_property_category=CodedConcept("91723000", "SCT", "Anatomical Structure"),
        segmented_property_type=CodedConcept("818981001", "SCT", "Abdomen"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=generate_uid(), series_number=100,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="segflow-tests",
        manufacturer_model_name="tests", software_versions="0", device_serial_number="0",
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


# --------------------------------------------------------------------------- broken series

BAD_CASES = ("missing_slice", "varying_gaps", "mixed_orientation", "mixed_sizes", "mixed_spacing",
             "gantry_tilt", "no_pixel_data", "duplicate_position", "undecodable", "no_position")


def write_bad_series(folder: Path, case: str) -> list[Path]:
    """A six-slice CT series broken in the way ``case`` (one of BAD_CASES) names; its remaining files."""
    data = np.arange(6 * 4 * 5, dtype=np.int16).reshape(6, 4, 5)
    paths = write_ct_series(folder, data, spacing=(2.0, 0.5, 0.5), origin=(0.0, 0.0, 0.0))

    def position(ds: Dataset, xyz: Sequence[float]) -> None:
        ds.ImagePositionPatient = _fmt(xyz)

    if case == "missing_slice":
        paths.pop(3).unlink()
    elif case == "varying_gaps":  # 2, 2, 2.6, 2, 2 mm: not a whole multiple, so not a missing slice
        rewrite(paths[3:], lambda ds, k: position(ds, (0.0, 0.0, 2.0 * (k + 3) + 0.6)))
    elif case == "mixed_orientation":  # one slice rotated by 3 degrees about z
        c, s = np.cos(np.radians(3)), np.sin(np.radians(3))
        rewrite(paths[2:3], lambda ds, k: setattr(ds, "ImageOrientationPatient", _fmt((c, s, 0, -s, c, 0))))
    elif case == "mixed_sizes":
        def bigger(ds: Dataset, k: int) -> None:
            ds.Rows, ds.Columns = 6, 5
            ds.PixelData = np.zeros((6, 5), np.int16).tobytes()
        rewrite(paths[4:5], bigger)
    elif case == "mixed_spacing":
        rewrite(paths[1:2], lambda ds, k: setattr(ds, "PixelSpacing", _fmt((0.6, 0.6))))
    elif case == "gantry_tilt":  # each slice 0.5 mm further in y: a 14 degree tilt
        rewrite(paths, lambda ds, k: position(ds, (0.0, 0.5 * k, 2.0 * k)))
    elif case == "no_pixel_data":
        rewrite(paths[2:3], lambda ds, k: delattr(ds, "PixelData"))
    elif case == "duplicate_position":
        rewrite(paths[3:4], lambda ds, k: position(ds, (0.0, 0.0, 4.0)))
    elif case == "undecodable":
        set_undecodable_syntax(paths)
    elif case == "no_position":
        rewrite(paths[1:2], lambda ds, k: delattr(ds, "ImagePositionPatient"))
    else:
        raise ValueError(f"unknown bad case {case!r}")
    return paths


def write_dicomdir(folder: Path, paths: Sequence[Path]) -> Path:
    """A real DICOM file-set (pydicom FileSet): the files copied under ``folder`` and a DICOMDIR indexing them."""
    from pydicom.fileset import FileSet

    file_set = FileSet()
    for path in paths:
        file_set.add(dcmread(path))
    file_set.write(folder)
    return Path(folder) / "DICOMDIR"


# --------------------------------------------------------------------------- damaged and unusual files


def corrupt_rle(path: Path) -> None:
    """Make an RLE Lossless slice's first segment start with a replicate run longer than the frame.

    Byte 64 of the frame is its first segment's first header byte; 0x81 asks
    for 128 copies of the next byte, which overruns the decoded segment of a
    small frame: pylibjpeg-rle panics ("index out of bounds") on it.
    """
    from pydicom.encaps import generate_frames

    fragment = next(generate_frames(dcmread(path).PixelData, number_of_frames=1))
    raw = bytearray(Path(path).read_bytes())
    at = bytes(raw).index(fragment) + 64
    raw[at] = 0x81
    Path(path).write_bytes(bytes(raw))


def truncate(path: Path, size: int = 300) -> None:
    """Cut a file short, as an interrupted copy does: 300 bytes keep the file meta, not the dataset."""
    Path(path).write_bytes(Path(path).read_bytes()[:size])


def deflate_series(paths: Sequence[Path]) -> None:
    """Re-write the files as Deflated Explicit VR Little Endian (the whole dataset zlib-deflated)."""
    rewrite(paths, lambda ds, k: setattr(ds.file_meta, "TransferSyntaxUID", "1.2.840.10008.1.2.1.99"))


def strip_preamble(paths: Sequence[Path], *, keep_meta: bool = False) -> None:
    """Drop the 128-byte preamble and 'DICM' (and, unless ``keep_meta``, the file meta): a bare dataset."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    for path in paths:
        raw = Path(path).read_bytes()
        if keep_meta:
            Path(path).write_bytes(raw[132:])
            continue
        ds = dcmread(path)
        out = DicomBytesIO()
        out.is_little_endian, out.is_implicit_VR = True, True
        bare = Dataset(ds)
        bare.file_meta = None
        write_dataset(out, bare)
        Path(path).write_bytes(out.getvalue())


def round_positions(paths: Sequence[Path], decimals: int) -> None:
    """Write ImagePositionPatient with ``decimals`` decimals, as many scanners do."""
    rewrite(paths, lambda ds, k: setattr(ds, "ImagePositionPatient",
                                         [f"{float(v):.{decimals}f}" for v in ds.ImagePositionPatient]))
