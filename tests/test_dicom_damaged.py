"""DICOM inputs that are damaged or unusual: a corrupt RLE slice, a slice file cut short, rounded oblique
positions, a legacy-converted multi-frame MR, deflated and preamble-less files.

Each fixture is drawn here with tests/dicom_samples.py and kept to a few tiny slices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from storage.dicom import SeriesRef, find_series, ingest_dicom, is_dicom_input, probe_dicom
from storage.errors import CorruptInputError, InvalidInputError
from storage.grids import model_grid
from tests import dicom_samples as samples

RNG = np.random.default_rng(7)
OBLIQUE_IOP = (1.0, 0.0, 0.0, 0.0, float(np.cos(np.radians(20))), float(np.sin(np.radians(20))))


def _data(shape: tuple[int, int, int] = (4, 6, 7), high: int = 2000) -> np.ndarray:
    return RNG.integers(0, high, shape).astype(np.int16)


def _only(paths: list[Path]) -> SeriesRef:
    refs = find_series(paths)
    assert len(refs) == 1, refs
    return refs[0]


def _refused(ref: SeriesRef, store: Path, kind: type[Exception], pattern: str) -> str:
    """Ingest and probe both refuse, in one line naming the input, and no store is left."""
    with pytest.raises(kind, match=pattern) as caught:
        ingest_dicom(ref, store)
    with pytest.raises(kind, match=pattern):
        probe_dicom(ref)
    message = str(caught.value)
    assert message.startswith(ref.display + ": ") and "\n" not in message
    assert not store.exists()
    return message


# --------------------------------------------------------------------------- 1. a decoder that panics


def test_a_corrupt_rle_slice_that_panics_the_decoder_is_a_corrupt_input(tmp_path: Path) -> None:
    """pylibjpeg-rle panics on it (pyo3's PanicException is a BaseException); the input fails alone, in one line."""
    from pydicom.pixels import pixel_array

    paths = samples.write_ct_series(tmp_path / "in", _data((3, 8, 8), 300))
    samples.compress_series(paths)
    samples.corrupt_rle(paths[1])
    with pytest.raises(BaseException) as panic:  # the premise: the decoder does not raise an Exception
        pixel_array(paths[1])
    assert not isinstance(panic.value, Exception), panic.value
    ref = _only([tmp_path / "in"])
    with pytest.raises(CorruptInputError, match=r"cannot decode the pixel data of IM0002\.dcm") as caught:
        ingest_dicom(ref, tmp_path / "s.zarr")
    assert str(caught.value).startswith(ref.display + ": ") and "\n" not in str(caught.value)
    assert not (tmp_path / "s.zarr").exists()


def test_stopping_the_run_while_decoding_is_not_a_corrupt_file(tmp_path: Path, monkeypatch) -> None:
    """KeyboardInterrupt (and SystemExit, CancelledError) still stop the run rather than blaming the file."""
    from storage import dicomobject

    samples.write_ct_series(tmp_path / "in", _data((2, 4, 4)))

    def interrupted(obj, indices):  # noqa: ANN001, ANN202
        raise KeyboardInterrupt

    monkeypatch.setattr(dicomobject, "_decode_pixels", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ingest_dicom(_only([tmp_path / "in"]), tmp_path / "s.zarr")


# --------------------------------------------------------------------------- 2. a slice file cut short


@pytest.mark.parametrize("which", ["last", "middle"])
def test_a_slice_file_cut_short_refuses_its_series_naming_it(tmp_path: Path, which: str) -> None:
    """Cut to 300 bytes (no Rows, no series UID left): never skipped as "not an image", never a "missing slice";
    the series beside it in another folder goes on."""
    damaged = samples.write_ct_series(tmp_path / "study" / "a", _data((5, 4, 4)))
    samples.write_ct_series(tmp_path / "study" / "b", _data((3, 4, 4)), series_number=4)
    cut = damaged[-1] if which == "last" else damaged[2]
    samples.truncate(cut)
    refs = find_series([tmp_path / "study"])
    assert len(refs) == 2
    broken = next(r for r in refs if cut in r.files)
    _refused(broken, tmp_path / "a.zarr", CorruptInputError,
             rf"{cut.name} is a CT Image Storage file without Rows and Columns: damaged or cut short \(300 bytes\)")
    other = next(r for r in refs if r is not broken)
    assert ingest_dicom(other, tmp_path / "b.zarr").image.shape == (1, 3, 4, 4)


def test_a_last_slice_cut_anywhere_in_its_header_refuses_the_series(tmp_path: Path) -> None:
    """Cut inside its file meta (400 bytes: the SOP class UID left as '1.2.840.10008.'), the file parsed as a DICOM
    object of no image class and was skipped as "not an image": the series was segmented one slice short, with no
    gap to show it.  Every cut from just past 'DICM' to past the header now refuses the series naming the file."""
    paths = samples.write_ct_series(tmp_path / "in", _data((5, 4, 4)))
    whole = paths[-1].read_bytes()
    header = len(whole) - 4 * 4 * 2  # the pixels are the last 32 bytes
    for size in range(140, header, 20):
        paths[-1].write_bytes(whole[:size])
        ref = _only([tmp_path / "in"])
        assert paths[-1] in ref.files, size
        with pytest.raises((CorruptInputError, InvalidInputError), match=r"IM0005\.dcm"):
            ingest_dicom(ref, tmp_path / f"cut{size}.zarr")
        assert not (tmp_path / f"cut{size}.zarr").exists()


def test_a_cut_file_that_still_names_its_series_joins_it(tmp_path: Path) -> None:
    """Cut after SeriesInstanceUID but before Rows: it joins its own series, not the other one in the folder."""
    mine = samples.write_ct_series(tmp_path / "in", _data((4, 4, 4)), name_prefix="A")
    samples.write_ct_series(tmp_path / "in", _data((3, 4, 4)), series_number=4, name_prefix="B")
    samples.rewrite(mine[1:2], lambda ds, k: [delattr(ds, kw) for kw in ("Rows", "Columns", "PixelData")])
    refs = find_series([tmp_path / "in"])
    assert sorted(len(r.files) for r in refs) == [3, 4]
    broken = next(r for r in refs if mine[1] in r.files)
    assert broken.series_instance_uid == str(pydicom.dcmread(mine[0]).SeriesInstanceUID)
    _refused(broken, tmp_path / "a.zarr", CorruptInputError, r"A0002\.dcm is a CT Image Storage file without Rows")


def test_a_lone_cut_file_is_a_corrupt_input(tmp_path: Path) -> None:
    (path,) = samples.write_ct_series(tmp_path / "in", _data((1, 4, 4)))
    samples.truncate(path)
    with pytest.raises(CorruptInputError, match=r"IM0001\.dcm: is a CT Image Storage file without Rows"):
        find_series([path])


# --------------------------------------------------------------------------- 3. rounded oblique positions


@pytest.mark.parametrize("decimals, step, count", [(2, 1.5, 12), (3, 1.5, 40), (2, 0.5, 12)])
def test_rounded_oblique_positions_are_not_a_gantry_tilt(tmp_path: Path, decimals: int, step: float,
                                                         count: int) -> None:
    """Positions written with 2-3 decimals on a 20 degree oblique stack: accepted, on the unrounded grid."""
    data = _data((count, 4, 5))
    origin = np.array([-32.123456, -31.777777, -29.456789])
    paths = samples.write_ct_series(tmp_path / "in", data, spacing=(step, 0.8, 0.7), iop=OBLIQUE_IOP, origin=origin)
    samples.round_positions(paths, decimals)
    store = ingest_dicom(_only([tmp_path / "in"]), tmp_path / "s.zarr")
    np.testing.assert_array_equal(np.asarray(store.image[0]), data.astype(np.int32) - 1024)
    affine = np.asarray(store.meta.geometry.affine)
    to_ras = np.diag([-1.0, -1.0, 1.0])
    normal = samples.normal_of(OBLIQUE_IOP)
    np.testing.assert_allclose(affine[:3, 3], to_ras @ origin, atol=0.5 * 10.0 ** -decimals * 1.01)
    np.testing.assert_allclose(affine[:3, 2], to_ras @ (step * normal), atol=10.0 ** -decimals / (count - 1))
    np.testing.assert_allclose(affine[:3, 0], to_ras @ (0.7 * np.asarray(OBLIQUE_IOP[:3])), atol=1e-6)
    np.testing.assert_allclose(affine[:3, 1], to_ras @ (0.8 * np.asarray(OBLIQUE_IOP[3:])), atol=1e-6)
    # the slice axis is the normal's, as dcm2niix has it: a step through the last rounded position sheared the grid
    # by thousandths of a degree, and model space refused every such series as "sheared"
    columns = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    np.testing.assert_allclose(columns.T @ columns, np.eye(3), atol=1e-12)
    mapping = model_grid(affine, data.shape, axcodes="RAS", pixdim_ijk=(0.5, 0.5, 0.5))
    assert mapping.model_shape != data.shape


@pytest.mark.parametrize("degrees", [1.0, 3.0])
def test_a_real_gantry_tilt_is_still_refused_when_rounded(tmp_path: Path, degrees: float) -> None:
    paths = samples.write_ct_series(tmp_path / "in", _data((8, 4, 4)), spacing=(1.5, 0.8, 0.7), iop=OBLIQUE_IOP)
    sideways = np.tan(np.radians(degrees)) * 1.5 * np.array([1.0, 0.0, 0.0])  # along the rows, off the normal
    samples.rewrite(paths, lambda ds, k: setattr(ds, "ImagePositionPatient", [
        f"{v:.2f}" for v in np.asarray(ds.ImagePositionPatient, float) + k * sideways]))
    message = _refused(_only([tmp_path / "in"]), tmp_path / "s.zarr", InvalidInputError,
                       r"gantry tilt: slices step 0\.0\d\d mm sideways of the slice normal \([0-9.]+ degrees\)")
    assert float(message.split("(")[-1].split()[0]) == pytest.approx(degrees, abs=0.1)


# --------------------------------------------------------------------------- 5. legacy-converted multi-frame MR


def _legacy_enhanced_mr(folder: Path, magnitude: np.ndarray, phase: np.ndarray, step: float = 3.0) -> Path:
    """highdicom's Legacy Converted Enhanced MR of magnitude and phase slices at the same positions.

    Two frames share each position, so highdicom indexes the frames by the
    InstanceNumber of the legacy slice they came from (a value per frame).
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    slices = []
    for kind, data in (("M", magnitude), ("P", phase)):
        for k in range(data.shape[0]):
            ds = samples.ct_slice(data[k], position=(0.0, 0.0, k * step), iop=(1, 0, 0, 0, 1, 0),
                                  pixel_spacing=(0.9, 0.9), slice_thickness=step, study_uid=study, series_uid=series,
                                  frame_of_reference_uid=frame_of_reference, instance_number=len(slices) + 1,
                                  modality="MR", sop_class_uid=samples.MR_IMAGE_STORAGE, series_description="MR")
            del ds.RescaleSlope, ds.RescaleIntercept
            ds.ImageType = ["ORIGINAL", "PRIMARY", kind, "NONE"]
            ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "2D"
            ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength = "10", "500", 1
            ds.ImagingFrequency, ds.MagneticFieldStrength = "63.9", "1.5"
            ds.WindowCenter, ds.WindowWidth = "500", "1000"
            slices.append(ds)
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=slices, series_instance_uid=generate_uid(), series_number=9,
        sop_instance_uid=generate_uid(), instance_number=1)
    Path(folder).mkdir(parents=True, exist_ok=True)
    enhanced.save_as(Path(folder) / "legacy_mr.dcm")
    return Path(folder) / "legacy_mr.dcm"


def test_a_legacy_converted_mr_splits_by_frame_type_not_instance_number(tmp_path: Path) -> None:
    """highdicom indexes its frames by the legacy InstanceNumber (a value per frame): two volumes, not six."""
    magnitude, phase = _data((3, 4, 5)), _data((3, 4, 5))
    _legacy_enhanced_mr(tmp_path / "in", magnitude, phase)
    refs = find_series([tmp_path / "in"])
    assert sorted(r.volume for r in refs) == ["M", "P"]
    for ref in refs:
        store = ingest_dicom(ref, tmp_path / f"{ref.volume}.zarr")
        np.testing.assert_array_equal(np.asarray(store.image[0]), magnitude if ref.volume == "M" else phase)


def test_a_one_frame_volume_split_off_by_a_dimension_is_refused(tmp_path: Path) -> None:
    """A dimension that splits off a single frame makes a one-slice "volume": refused, not segmented."""
    path = _legacy_enhanced_mr(tmp_path / "in", _data((3, 4, 5)), _data((3, 4, 5)))
    ds = pydicom.dcmread(path)
    ds.DimensionIndexSequence[0].DimensionIndexPointer = 0x00209128  # TemporalPositionIndex
    for n, groups in enumerate(ds.PerFrameFunctionalGroupsSequence):  # frames: M M M P P P
        groups.FrameContentSequence[0].DimensionIndexValues = [1, 1, 1, 2, 2, 3][n]
    ds.save_as(path)
    refs = {r.volume: r for r in find_series([tmp_path / "in"])}
    assert sorted(refs) == ["M,TemporalPositionIndex=1", "P,TemporalPositionIndex=2", "P,TemporalPositionIndex=3"]
    _refused(refs["P,TemporalPositionIndex=3"], tmp_path / "s.zarr", InvalidInputError,
             r"is a single frame split off by its dimension index")
    assert ingest_dicom(refs["P,TemporalPositionIndex=2"], tmp_path / "p2.zarr").image.shape == (1, 2, 4, 5)


# --------------------------------------------------------------------------- 7, 8. transfer syntax and file format


def test_a_deflated_series_is_read(tmp_path: Path) -> None:
    data = _data()
    paths = samples.write_ct_series(tmp_path / "in", data)
    samples.deflate_series(paths)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian
    store = ingest_dicom(_only([tmp_path / "in"]), tmp_path / "s.zarr", chunk=3)
    np.testing.assert_array_equal(np.asarray(store.image[0]), data.astype(np.int32) - 1024)


@pytest.mark.parametrize("keep_meta", [False, True])
def test_files_without_the_preamble_are_read(tmp_path: Path, keep_meta: bool) -> None:
    data = _data()
    paths = samples.write_ct_series(tmp_path / "in", data)
    samples.strip_preamble(paths, keep_meta=keep_meta)
    assert all(p.read_bytes()[128:132] != b"DICM" for p in paths)
    assert is_dicom_input(tmp_path / "in") and is_dicom_input(paths[0])
    store = ingest_dicom(_only([tmp_path / "in"]), tmp_path / "s.zarr", chunk=3)
    np.testing.assert_array_equal(np.asarray(store.image[0]), data.astype(np.int32) - 1024)
    assert _only(paths[:2]).files == tuple(paths[:2])  # loose files too


def test_what_only_looks_like_a_bare_dataset_is_not_dicom(tmp_path: Path) -> None:
    """The group 0008 start is a hint, not proof: it must parse and name a known SOP class."""
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\x08\x00\x16\x00" + bytes(range(256)) * 4)
    assert not is_dicom_input(junk)
    text = tmp_path / "notes"
    text.write_bytes(b"\x08\x00hello world\n")
    assert not is_dicom_input(text) and not is_dicom_input(tmp_path)


# --------------------------------------------------------------------------- 6. echoes and copies of one series


def test_a_multi_echo_series_is_one_volume_per_echo(tmp_path: Path) -> None:
    """One SeriesInstanceUID, every position once per echo: dcm2niix writes _e1 and _e2; segflow refused the series
    as "two slices at the same position"."""
    first, second = _data((4, 6, 7)), _data((4, 6, 7))
    for echo, data in ((1, first), (2, second)):
        paths = samples.write_ct_series(tmp_path / "in", data, study_uid="1.2.3", series_uid="1.2.3.4",
                                        name_prefix=f"E{echo}_")
        samples.rewrite(paths, lambda ds, k, echo=echo: setattr(ds, "EchoNumbers", echo))
    refs = find_series([tmp_path / "in"])
    assert [r.volume for r in refs] == ["EchoNumbers=1", "EchoNumbers=2"]
    assert all(len(r.files) == 4 and "EchoNumbers_" in r.name for r in refs)
    for ref, data in zip(refs, (first, second)):
        store = ingest_dicom(ref, tmp_path / f"{ref.volume}.zarr")
        np.testing.assert_array_equal(np.asarray(store.image[0]), data.astype(np.int32) - 1024)
    # a single-echo series that states its echo stays one volume, named as before
    paths = samples.write_ct_series(tmp_path / "one", _data((3, 4, 4)), series_uid="1.2.3.9")
    samples.rewrite(paths, lambda ds, k: setattr(ds, "EchoNumbers", 1))
    assert _only([tmp_path / "one"]).volume is None


def test_a_byte_identical_copy_of_a_slice_is_read_once_and_a_different_one_is_refused(tmp_path: Path) -> None:
    """A folder merged twice holds copy_of_IM0002.dcm: dcm2niix drops the duplicate; segflow refused the series."""
    import shutil

    data = _data((4, 6, 7))
    paths = samples.write_ct_series(tmp_path / "in", data)
    shutil.copyfile(paths[1], tmp_path / "in" / "copy_of_IM0002.dcm")
    ref = _only([tmp_path / "in"])
    assert ref.files == tuple(paths) and ref.copies == (tmp_path / "in" / "copy_of_IM0002.dcm",)
    store = ingest_dicom(ref, tmp_path / "s.zarr")
    np.testing.assert_array_equal(np.asarray(store.image[0]), data.astype(np.int32) - 1024)
    assert store.meta.geometry.dicom.copies == ["copy_of_IM0002.dcm"]
    # the same SOPInstanceUID with other pixels is no copy: refused, naming both files
    samples.rewrite([tmp_path / "in" / "copy_of_IM0002.dcm"],
                    lambda ds, k: setattr(ds, "PixelData", bytes(len(ds.PixelData))))
    ref = _only([tmp_path / "in"])
    assert ref.copies == ()
    _refused(ref, tmp_path / "t.zarr", InvalidInputError, r"IM0002\.dcm and copy_of_IM0002\.dcm share one SOPInstanceUID")


# --------------------------------------------------------------------------- 6. slices emptied, claimed twice


@pytest.mark.parametrize("size", [0, 100, 500])
def test_a_slice_file_emptied_or_cut_inside_the_preamble_refuses_its_series(tmp_path: Path, size: int) -> None:
    """An interrupted copy left the last slice 0 bytes, or cut it before 'DICM', or noise: the header pass read it
    as "not DICOM" and skipped it, and the series was segmented one slice short (an end slice leaves no gap).
    A README and a thumbnail beside the series are still no part of it."""
    paths = samples.write_ct_series(tmp_path / "in", _data((5, 4, 4)))
    (tmp_path / "in" / "README.txt").write_text("exported by a PACS\n")
    (tmp_path / "in" / "thumb.jpg").write_bytes(b"\xff\xd8\xff" + bytes(200))
    keep = tmp_path / "whole.zarr"
    assert ingest_dicom(_only([tmp_path / "in"]), keep).image.shape == (1, 5, 4, 4)
    head = paths[-1].read_bytes()[:size] if size <= 100 else RNG.integers(0, 256, size, dtype=np.uint8).tobytes()
    paths[-1].write_bytes(head)
    ref = _only([tmp_path / "in"])
    assert paths[-1] in ref.files
    _refused(ref, tmp_path / "a.zarr", CorruptInputError,
             rf"IM0005\.dcm is not a readable DICOM file \({size} bytes\): damaged or cut short; the series is not "
             "segmented without it")


def test_two_slices_claiming_one_instance_uid_at_different_positions_are_refused_naming_both(tmp_path: Path) -> None:
    """Only two such files at one position were refused; at two positions the series was segmented and its DICOM
    SEG failed at the very end with highdicom's wording (a SEG cannot reference one instance twice)."""
    paths = samples.write_ct_series(tmp_path / "in", _data((4, 4, 4)))
    uid = str(pydicom.dcmread(paths[1]).SOPInstanceUID)

    def claim(ds, k):  # noqa: ANN001, ARG001
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid

    samples.rewrite(paths[2:3], claim)
    _refused(_only([tmp_path / "in"]), tmp_path / "a.zarr", InvalidInputError,
             rf"IM0002\.dcm and IM0003\.dcm share one SOPInstanceUID \({uid}\) but differ")


def test_files_named_one_by_one_from_two_folders_are_named_in_the_message(tmp_path: Path) -> None:
    """A good slice and a damaged copy of it named from two folders: the line named only their common folder,
    which the user never gave, and the good file not at all."""
    (good,) = samples.write_ct_series(tmp_path / "a" / "dicom", _data((1, 4, 4)))
    bad = tmp_path / "b" / "bad" / "IM0001.cut.dcm"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(good.read_bytes()[:-10])
    ref = _only([good, bad])
    assert ref.display.startswith(f"{good}, {bad} [series ")
    (alone,) = find_series([good])
    assert alone.display.startswith(f"{good} [series ")
