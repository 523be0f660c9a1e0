"""DICOM SEG export read back with highdicom, slice by slice against the source instances; label tables."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import zarr

from storage.classes import LabelClass, slicer_color_table
from storage.dicomseg import read_dicom_seg_labels, segment_codes, write_dicom_seg
from storage.errors import ExportError
from storage.dicom import find_series, ingest_dicom
from storage.geometry import VolumeGeometry
from storage.labeltables import itksnap_label_description, write_label_tables
from tests.conftest import shared
from tests.dicom_samples import write_ct_series

SHAPE = (6, 20, 24)  # (K, J, I)
NODATA = 255
CLASSES = [
    LabelClass(value=0, name="background", color=(0, 0, 0)),
    LabelClass(value=1, name="liver", color=(221, 130, 101), code="SCT:10200004|Liver"),
    LabelClass(value=2, name="spleen", color=(157, 108, 162), code="SCT:91723000/78961009"),
    LabelClass(value=5, name="lesion", color=(255, 0, 0), code="SCT:49755003/108369006|Neoplasm"),
    LabelClass(value=6, name="other stuff", color=(10, 200, 30)),  # no code: generic Tissue/Tissue
]
ALGORITHM = {"name": "tiny-unet", "version": "0.1.0", "weights_sha256": "ab" * 32}
OBLIQUE = (0.9396926, 0.3420201, 0.0, -0.3213938, 0.8830222, 0.3420201)  # rows and columns tilted


# --------------------------------------------------------------------------- fixtures


def ingest(folder: Path, tmp_path: Path) -> tuple[VolumeGeometry, Path]:
    """The geometry DICOM ingest records for the one series in ``folder``, and the series root."""
    (ref,) = find_series([folder])
    store = ingest_dicom(ref, tmp_path / f"{folder.name}.zarr")
    return store.meta.geometry, Path(store.meta.source.path)


def position_of(path: Path) -> np.ndarray:
    return np.asarray(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient, float)


def label_volume(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """Segments that move from slice to slice (a flipped or shifted frame order cannot match), one empty slice."""
    k_n, j_n, i_n = shape
    labels = np.zeros(shape, dtype=np.uint8)
    for k in range(k_n - 1):  # the last slice stays background: its frames are omitted
        labels[k, k % j_n:k % j_n + 4, 1:5] = 1
        labels[k, j_n // 2:j_n // 2 + 2, k:k + 6] = 2
        labels[k, -3:, (2 * k) % (i_n - 2)] = 5
        labels[k, 0, -1 - k] = 6
    labels[0, -1, :3] = NODATA  # nodata: written as background
    return labels


def labels_store(tmp_path: Path, labels: np.ndarray) -> zarr.Array:
    array = zarr.open_array(tmp_path / "labels.zarr", mode="w", shape=labels.shape, chunks=(2, 8, 8), dtype="uint8")
    array[...] = labels
    return array


def expected(labels: np.ndarray) -> np.ndarray:
    return np.where(labels == NODATA, 0, labels)


def check_frames_reference_their_slices(seg_path: Path, geometry: VolumeGeometry, root: Path,
                                        want: np.ndarray) -> None:
    """Frame by frame, without highdicom's reader: the source instance, its position and the pixels agree."""
    seg = pydicom.dcmread(seg_path)
    slice_of = {uid: k for k, uid in enumerate(geometry.dicom.sop_instance_uids)}
    position = {f.sop_instance_uid: position_of(root / f.path) for f in geometry.dicom.files}
    value_of = {0: 0}  # LABELMAP: highdicom describes the background as segment 0, without an algorithm
    for item in seg.SegmentSequence:
        if int(item.SegmentNumber) == 0:
            continue
        text = item.SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
        params = dict(p.split("=") for p in text.split(","))
        value_of[int(item.SegmentNumber)] = int(params["label_value"])
    frames = seg.pixel_array.reshape(int(seg.NumberOfFrames), *want.shape[1:])
    seen = set()
    for n, fg in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = slice_of[uid]
        np.testing.assert_allclose(np.asarray(fg.PlanePositionSequence[0].ImagePositionPatient, float),
                                   position[uid], atol=1e-4)
        if seg.SegmentationType == "BINARY":
            number = int(fg.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
            np.testing.assert_array_equal(frames[n].astype(bool), want[k] == value_of[number])
        else:  # LABELMAP: one frame per slice holding segment numbers
            np.testing.assert_array_equal([value_of.get(int(v), 0) for v in frames[n].ravel()], want[k].ravel())
        seen.add(k)
    assert seen == {k for k in range(want.shape[0]) if want[k].any()}


# --------------------------------------------------------------------------- DICOM SEG


@pytest.mark.parametrize("segmentation_type", ["BINARY", "LABELMAP"])
@pytest.mark.parametrize("variant", ["axial", "descending", "oblique"])
def test_seg_slices_match_source_instances(tmp_path: Path, variant: str, segmentation_type: str) -> None:
    rng = np.random.default_rng(1)
    options = {"descending": {"descending": True}, "oblique": {"iop": OBLIQUE}}.get(variant, {})
    paths = write_ct_series(tmp_path / "ct", rng.integers(0, 1500, SHAPE).astype(np.int16), **options)
    geometry, root = ingest(tmp_path / "ct", tmp_path)
    if variant == "descending":  # stored slice 0 is the last file written
        assert geometry.dicom.sop_instance_uids[0] == pydicom.dcmread(paths[-1]).SOPInstanceUID
    labels = label_volume()
    out = write_dicom_seg(labels_store(tmp_path, labels), geometry, tmp_path / "seg.dcm", classes=CLASSES,
                          algorithm=ALGORITHM, segmentation_type=segmentation_type, nodata_label=NODATA,
                          source_root=root)

    # highdicom's reader, by SOP instance UID in stored order, gives back the input slice for slice
    np.testing.assert_array_equal(read_dicom_seg_labels(out, geometry), expected(labels))
    check_frames_reference_their_slices(out, geometry, root, expected(labels))

    seg = hd.seg.segread(out)
    source = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert seg.SegmentationType == segmentation_type
    assert [s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence] == [source.SeriesInstanceUID]
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.SOPInstanceUID not in geometry.dicom.sop_instance_uids
    assert (seg.Manufacturer, seg.ManufacturerModelName, seg.SoftwareVersions, seg.DeviceSerialNumber) == \
        ("segflow", "tiny-unet", "0.1.0", "segflow")
    assert seg.SeriesNumber == 9003
    assert [seg.get_segment_description(n).segment_label for n in seg.segment_numbers] == \
        ["liver", "spleen", "lesion", "other stuff"]
    types = [(d.segmented_property_category.value, d.segmented_property_type.value, d.segmented_property_type.meaning)
             for d in map(seg.get_segment_description, seg.segment_numbers)]
    assert types == [("91723000", "10200004", "Liver"), ("91723000", "78961009", "spleen"),
                     ("49755003", "108369006", "Neoplasm"), ("85756007", "85756007", "Tissue")]
    first = seg.get_segment_description(1)
    assert first.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    algo = first.algorithm_identification
    assert algo[0].AlgorithmName == "tiny-unet" and algo[0].AlgorithmVersion == "0.1.0"
    assert algo.parameters == {"label_value": "1", "weights_sha256": "ab" * 32}
    assert hd.color.CIELabColor.from_dicom_value(tuple(first.RecommendedDisplayCIELabValue)).to_rgb() == (221, 130, 101)
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_seg_of_a_series_without_slice_thickness(tmp_path: Path) -> None:
    """SliceThickness is optional in many objects; highdicom takes the SEG's pixel measures from the first source
    image and failed without it ("'FileDataset' object has no attribute 'SliceThickness'"), after the whole run.
    The spacing between slices stands in for it."""
    from tests.dicom_samples import rewrite

    rng = np.random.default_rng(3)
    paths = write_ct_series(tmp_path / "ct", rng.integers(0, 1500, SHAPE).astype(np.int16))

    def drop(ds, k):  # noqa: ANN001, ARG001
        del ds.SliceThickness

    rewrite(paths, drop)
    assert "SliceThickness" not in pydicom.dcmread(paths[0])
    geometry, root = ingest(tmp_path / "ct", tmp_path)
    labels = label_volume()
    out = write_dicom_seg(labels_store(tmp_path, labels), geometry, tmp_path / "seg.dcm", classes=CLASSES,
                          algorithm=ALGORITHM, segmentation_type="BINARY", nodata_label=NODATA, source_root=root)
    np.testing.assert_array_equal(read_dicom_seg_labels(out, geometry), expected(labels))
    check_frames_reference_their_slices(out, geometry, root, expected(labels))
    measures = pydicom.dcmread(out).SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    spacing = float(np.linalg.norm(np.asarray(geometry.affine)[:3, 2]))
    assert float(measures.SliceThickness) == pytest.approx(spacing)


def test_seg_of_a_de_identified_series_without_type2_patient_and_study_attributes(tmp_path: Path) -> None:
    """De-identified exports drop type 2 attributes (PatientBirthDate, PatientSex, StudyDate, ...) that a SEG copies
    from its source: highdicom failed on the first missing one, and every output of the series was thrown away.
    They are copied empty, as the standard allows for an unknown value."""
    from storage.dicomseg import TYPE2_COPIED
    from tests.dicom_samples import rewrite

    paths = write_ct_series(tmp_path / "ct", np.random.default_rng(4).integers(0, 1500, SHAPE).astype(np.int16))
    dropped = [k for k in TYPE2_COPIED if k != "PatientID"]

    def drop(ds, k):  # noqa: ANN001, ARG001
        for keyword in dropped:
            if keyword in ds:
                delattr(ds, keyword)

    rewrite(paths, drop)
    assert not any(k in pydicom.dcmread(paths[0]) for k in dropped)
    geometry, root = ingest(tmp_path / "ct", tmp_path)
    labels = label_volume()
    out = write_dicom_seg(labels_store(tmp_path, labels), geometry, tmp_path / "seg.dcm", classes=CLASSES,
                          algorithm=ALGORITHM, segmentation_type="BINARY", nodata_label=NODATA, source_root=root)
    np.testing.assert_array_equal(read_dicom_seg_labels(out, geometry), expected(labels))
    seg = pydicom.dcmread(out)
    assert all(k in seg and seg[k].value in ("", None) for k in dropped)
    assert seg.PatientID == pydicom.dcmread(paths[0]).PatientID


def test_an_all_background_seg_is_written_without_a_library_warning(tmp_path: Path, caplog) -> None:
    """No label anywhere: every frame is encoded (highdicom cannot omit them all), and highdicom's warning about
    reverting to that no longer reaches the terminal."""
    import logging

    rng = np.random.default_rng(4)
    write_ct_series(tmp_path / "ct", rng.integers(0, 1500, SHAPE).astype(np.int16))
    geometry, root = ingest(tmp_path / "ct", tmp_path)
    empty = np.zeros_like(label_volume())
    with caplog.at_level(logging.WARNING):
        out = write_dicom_seg(labels_store(tmp_path, empty), geometry, tmp_path / "seg.dcm", classes=CLASSES,
                              algorithm=ALGORITHM, segmentation_type="BINARY", nodata_label=NODATA, source_root=root)
    assert not [r for r in caplog.records if r.name.startswith("highdicom")], caplog.records
    np.testing.assert_array_equal(read_dicom_seg_labels(out, geometry), empty)


def test_seg_of_real_ct_series(tmp_path: Path) -> None:
    """pydicom's 5-slice CT (descending z, files named by number): slice k still refers to instance k."""
    geometry, root = ingest(shared("dicom/CT5N"), tmp_path)
    assert position_of(root / geometry.dicom.files[0].path)[2] == pytest.approx(-1.2375)  # stored k=0: lowest z
    labels = label_volume((5, 16, 16))
    out = write_dicom_seg(labels, geometry, tmp_path / "ct5n-seg.dcm", classes=CLASSES, algorithm=ALGORITHM,
                          nodata_label=NODATA, source_root=root)
    np.testing.assert_array_equal(read_dicom_seg_labels(out, geometry), expected(labels))
    check_frames_reference_their_slices(out, geometry, root, expected(labels))


@pytest.mark.parametrize("segmentation_type", ["BINARY", "LABELMAP"])
def test_seg_of_enhanced_multiframe_source(tmp_path: Path, segmentation_type: str) -> None:
    """One enhanced CT holding the slices in descending z: frames reference source frame numbers, not k+1."""
    rng = np.random.default_rng(2)
    paths = write_ct_series(tmp_path / "ct", rng.integers(0, 1500, SHAPE).astype(np.int16), descending=True)
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in paths], series_instance_uid=hd.UID(), series_number=4,
        sop_instance_uid=hd.UID(), instance_number=1)
    (tmp_path / "mf").mkdir()
    enhanced.save_as(tmp_path / "mf" / "enhanced.dcm")
    geometry, root = ingest(tmp_path / "mf", tmp_path)
    assert geometry.dicom.frame_numbers == [6, 5, 4, 3, 2, 1]
    labels = label_volume()
    out = write_dicom_seg(labels, geometry, tmp_path / "seg.dcm", classes=CLASSES, algorithm=ALGORITHM,
                          segmentation_type=segmentation_type, nodata_label=NODATA, source_root=root)
    np.testing.assert_array_equal(read_dicom_seg_labels(out, geometry), expected(labels))
    seg = pydicom.dcmread(out)
    referenced = {int(fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
                  for fg in seg.PerFrameFunctionalGroupsSequence}
    assert referenced == {2, 3, 4, 5, 6}  # stored slice 5 (source frame 1) is empty and omitted
    assert seg.SeriesNumber == 9004


def test_unlisted_label_value_is_refused_and_nothing_is_left(tmp_path: Path) -> None:
    write_ct_series(tmp_path / "ct", np.zeros((3, 8, 8), np.int16))
    geometry, root = ingest(tmp_path / "ct", tmp_path)
    labels = np.zeros((3, 8, 8), np.uint8)
    labels[1, 2, 2] = 9
    with pytest.raises(ExportError, match="label value 9"):
        write_dicom_seg(labels, geometry, tmp_path / "seg.dcm", classes=CLASSES, algorithm=ALGORITHM,
                        source_root=root)
    assert not (tmp_path / "seg.dcm").exists()
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_missing_source_file_is_an_export_error(tmp_path: Path) -> None:
    paths = write_ct_series(tmp_path / "ct", np.zeros((3, 8, 8), np.int16))
    geometry, root = ingest(tmp_path / "ct", tmp_path)
    labels = np.ones((3, 8, 8), np.uint8)
    with pytest.raises(ExportError, match="relative to the series folder"):
        write_dicom_seg(labels, geometry, tmp_path / "seg.dcm", classes=CLASSES, algorithm=ALGORITHM)
    paths[1].unlink()
    with pytest.raises(ExportError, match="IM0002.dcm .* is gone"):
        write_dicom_seg(labels, geometry, tmp_path / "seg.dcm", classes=CLASSES, algorithm=ALGORITHM,
                        source_root=root)


def test_segment_code_syntax() -> None:
    category, kind = segment_codes(LabelClass(value=1, name="Liver", code="SCT:10200004"))
    assert (category.value, category.meaning, kind.value, kind.meaning) == \
        ("91723000", "Anatomical Structure", "10200004", "Liver")
    category, kind = segment_codes(LabelClass(value=1, name="x", code="SCT:49755003/108369006|Neoplasm"))
    assert (category.value, category.meaning, kind.value, kind.meaning) == \
        ("49755003", "Morphologically Altered Structure", "108369006", "Neoplasm")
    category, kind = segment_codes(LabelClass(value=1, name="forest", code="LCCS:A12"))
    assert category.value == kind.value == "85756007"
    with pytest.raises(ValueError, match="not one of"):
        segment_codes(LabelClass(value=1, name="x", code="SCT:12345678/10200004"))
    with pytest.raises(ValueError, match="SCT:"):
        segment_codes(LabelClass(value=1, name="x", code="SCT:liver"))


# --------------------------------------------------------------------------- label tables


def parse_itksnap(text: str) -> dict[int, tuple[tuple[int, int, int], float, int, int, str]]:
    rows = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        head, label, _ = line.split('"')
        idx, r, g, b, a, vis, msh = head.split()
        rows[int(idx)] = ((int(r), int(g), int(b)), float(a), int(vis), int(msh), label)
    return rows


def test_label_tables_parse_back(tmp_path: Path) -> None:
    classes = CLASSES + [LabelClass(value=7, name='say "hi"', color=(1, 2, 3))]
    ctbl, itk = write_label_tables(tmp_path / "case1_labels", classes)
    assert (ctbl.name, itk.name) == ("case1_labels.ctbl", "case1_labels.itksnap.txt")
    assert ctbl.read_text() == slicer_color_table(classes)
    slicer = {int(p[0]): (p[1], tuple(map(int, p[2:5])), int(p[5]))
              for p in (line.split() for line in ctbl.read_text().splitlines() if not line.startswith("#"))}
    assert slicer[5] == ("lesion", (255, 0, 0), 255) and slicer[6] == ("other_stuff", (10, 200, 30), 255)

    text = itk.read_text()
    assert text.startswith("################################################\n# ITK-SnAP Label Description File")
    assert text == itksnap_label_description(classes)
    rows = parse_itksnap(text)
    assert rows[0] == ((0, 0, 0), 0.0, 0, 0, "Clear Label")
    assert rows[1] == ((221, 130, 101), 1.0, 1, 1, "liver")
    assert rows[6] == ((10, 200, 30), 1.0, 1, 1, "other stuff")
    assert rows[7][4] == "say 'hi'"
    assert sorted(rows) == [0, 1, 2, 5, 6, 7]
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


# --------------------------------------------------------------------------- multi-volume sources, errors, text


def test_seg_of_each_volume_of_a_magnitude_phase_object(tmp_path: Path) -> None:
    """Magnitude and phase frames at the same positions: each volume's SEG refers to its own frames only
    (handed every frame, highdicom refused: "Plane positions must not contain duplicates")."""
    from tests.dicom_samples import write_enhanced_mr

    rng = np.random.default_rng(5)
    shape = (4, 20, 24)
    write_enhanced_mr(tmp_path / "mr", rng.integers(0, 900, shape), rng.integers(0, 900, shape))
    refs = find_series([tmp_path / "mr"])
    assert sorted(r.volume for r in refs) == ["MAGNITUDE", "PHASE"]
    for ref in refs:
        store = ingest_dicom(ref, tmp_path / f"{ref.volume}.zarr")
        geometry, root = store.meta.geometry, Path(store.meta.source.path)
        labels = label_volume(shape)
        out = write_dicom_seg(labels, geometry, tmp_path / f"{ref.volume}.seg.dcm", classes=CLASSES,
                              algorithm=ALGORITHM, nodata_label=NODATA, source_root=root)
        np.testing.assert_array_equal(read_dicom_seg_labels(out, geometry), expected(labels))
        seg = pydicom.dcmread(out)
        by_frame = {int(fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber):
                    np.asarray(fg.PlanePositionSequence[0].ImagePositionPatient, float)
                    for fg in seg.PerFrameFunctionalGroupsSequence}
        numbers = geometry.dicom.frame_numbers
        assert set(by_frame) == {numbers[k] for k in range(shape[0] - 1)}  # this volume's; the empty last omitted
        source = pydicom.dcmread(root / geometry.dicom.files[0].path, stop_before_pixels=True)
        for number, position in by_frame.items():
            groups = source.PerFrameFunctionalGroupsSequence[number - 1]
            np.testing.assert_allclose(position, groups.PlanePositionSequence[0].ImagePositionPatient, atol=1e-4)


def test_a_seg_highdicom_refuses_is_an_error_of_the_input_series(tmp_path: Path, monkeypatch) -> None:
    """The error names the series it came from; the SEG it names was never written."""
    write_ct_series(tmp_path / "ct", np.zeros((3, 8, 8), np.int16))
    geometry, root = ingest(tmp_path / "ct", tmp_path)

    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise ValueError("Plane positions must not contain duplicates.")

    monkeypatch.setattr(hd.seg, "Segmentation", refuse)
    labels = np.ones((3, 8, 8), np.uint8)
    with pytest.raises(ExportError) as caught:
        write_dicom_seg(labels, geometry, tmp_path / "out.seg.dcm", classes=CLASSES, algorithm=ALGORITHM,
                        source_root=root)
    assert caught.value.path == f"{root} [series {geometry.dicom.series_instance_uid}]"
    assert "DICOM SEG out.seg.dcm not written: highdicom refused the segmentation: Plane positions" in str(caught.value)
    assert str(caught.value).endswith("(--dicom-seg none writes the other outputs without it)")
    assert not (tmp_path / "out.seg.dcm").exists()


@pytest.mark.parametrize("names", [("Läsion", "病変 lesion"), ("lesion", "cyst")])
def test_class_names_survive_in_the_seg_whatever_their_script(tmp_path: Path, names: tuple[str, str]) -> None:
    """Non-ASCII names: UTF-8 (ISO_IR 192), no pydicom warning; ASCII names keep the source's character set.
    The source's Latin-1 patient name is read back the same either way."""
    import warnings

    paths = write_ct_series(tmp_path / "ct", np.zeros((3, 8, 8), np.int16))

    def latin1(ds: pydicom.Dataset, k: int) -> None:
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "Müller^Jürgen"

    from tests.dicom_samples import rewrite
    rewrite(paths, latin1)
    geometry, root = ingest(tmp_path / "ct", tmp_path)
    classes = [CLASSES[0], LabelClass(value=1, name=names[0], color=(255, 0, 0)),
               LabelClass(value=2, name=names[1], color=(0, 255, 0), code=f"SCT:49755003/108369006|{names[1]}")]
    labels = np.zeros((3, 8, 8), np.uint8)
    labels[1, 2:4, 2:4], labels[2, 5:7, 1:3] = 1, 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = write_dicom_seg(labels, geometry, tmp_path / "seg.dcm", classes=classes, algorithm=ALGORITHM,
                              source_root=root)
        seg = pydicom.dcmread(out)
        assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == list(names)
        assert str(seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeMeaning) == names[1]
        assert str(seg.PatientName) == "Müller^Jürgen"
        assert seg.SpecificCharacterSet == ("ISO_IR 192" if not "".join(names).isascii() else "ISO_IR 100")
        read = hd.seg.segread(out)
        assert [read.get_segment_description(n).segment_label for n in (1, 2)] == list(names)
    np.testing.assert_array_equal(read_dicom_seg_labels(out, geometry), labels)


def test_seg_of_a_series_without_the_preamble(tmp_path: Path) -> None:
    """Source files without the 128-byte preamble and file meta are read for the SEG as they were for ingest."""
    from tests.dicom_samples import strip_preamble

    paths = write_ct_series(tmp_path / "ct", np.zeros((3, 8, 8), np.int16))
    strip_preamble(paths)
    geometry, root = ingest(tmp_path / "ct", tmp_path)
    labels = np.zeros((3, 8, 8), np.uint8)
    labels[1, 2:4, 2:4] = 1
    out = write_dicom_seg(labels, geometry, tmp_path / "seg.dcm", classes=CLASSES, algorithm=ALGORITHM,
                          source_root=root)
    np.testing.assert_array_equal(read_dicom_seg_labels(out, geometry), labels)


def test_a_one_part_patient_name_is_not_quoted_on_the_terminal(tmp_path: Path, caplog) -> None:
    """highdicom doubts a one-part name ("SMITHJOHN", common for pseudonyms) and warned quoting it: the patient's
    name reached the terminal, which never shows patient identifiers.  The SEG itself keeps the name, as it must."""
    import logging
    import warnings

    from tests.dicom_samples import rewrite

    paths = write_ct_series(tmp_path / "ct", np.random.default_rng(4).integers(0, 1500, SHAPE).astype(np.int16))
    rewrite(paths, lambda ds, k: setattr(ds, "PatientName", "SMITHJOHN"))
    geometry, root = ingest(tmp_path / "ct", tmp_path)
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.DEBUG):
        warnings.simplefilter("always")
        out = write_dicom_seg(labels_store(tmp_path, label_volume()), geometry, tmp_path / "seg.dcm",
                              classes=CLASSES, algorithm=ALGORITHM, segmentation_type="BINARY", nodata_label=NODATA,
                              source_root=root)
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [s for s in said if "SMITHJOHN" in s], said
    assert pydicom.dcmread(out).PatientName == "SMITHJOHN"


def test_a_spacing_between_slices_the_positions_contradict_is_not_copied_into_the_seg(tmp_path: Path) -> None:
    """The source says 3 mm between slices, its positions 2.5 mm: the SEG copied the 3 into its pixel measures,
    while its own frames lie 2.5 mm apart (and the NIfTI says 2.5)."""
    from tests.dicom_samples import rewrite

    paths = write_ct_series(tmp_path / "ct", np.random.default_rng(4).integers(0, 1500, SHAPE).astype(np.int16))
    rewrite(paths, lambda ds, k: setattr(ds, "SpacingBetweenSlices", 3))
    geometry, root = ingest(tmp_path / "ct", tmp_path)
    out = write_dicom_seg(labels_store(tmp_path, label_volume()), geometry, tmp_path / "seg.dcm", classes=CLASSES,
                          algorithm=ALGORITHM, segmentation_type="BINARY", nodata_label=NODATA, source_root=root)
    measures = pydicom.dcmread(out).SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SpacingBetweenSlices) == pytest.approx(2.5)
    assert float(pydicom.dcmread(paths[0]).SpacingBetweenSlices) == 3.0  # the source files are not touched


def test_the_seg_of_one_slice_states_the_spacing_the_nifti_has(tmp_path: Path) -> None:
    """One slice 0.8 mm thick, no SpacingBetweenSlices: highdicom wrote 1 mm between slices into the SEG's pixel
    measures, so a viewer measured 25 % more than statistics.json (the NIfTI's 0.8 mm)."""
    paths = write_ct_series(tmp_path / "ct", np.random.default_rng(4).integers(0, 1500, (1, 20, 24)).astype(np.int16),
                            spacing=(0.8, 0.5, 0.5))
    assert "SpacingBetweenSlices" not in pydicom.dcmread(paths[0])
    geometry, root = ingest(tmp_path / "ct", tmp_path)
    labels = np.zeros((1, 20, 24), np.uint8)
    labels[0, 4:9, 3:12] = 1
    out = write_dicom_seg(labels_store(tmp_path, labels), geometry, tmp_path / "seg.dcm", classes=CLASSES,
                          algorithm=ALGORITHM, segmentation_type="BINARY", nodata_label=NODATA, source_root=root)
    measures = pydicom.dcmread(out).SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) == pytest.approx(0.8)
    assert float(measures.SpacingBetweenSlices) == pytest.approx(0.8)
    assert "SpacingBetweenSlices" not in pydicom.dcmread(paths[0])  # the source files are not touched
