"""DICOM series in: grouping, sorting, refusals, rescaling, multi-frame splitting, against dcm2niix.

Every fixture is a real Part 10 file written by tests/dicom_samples.py; the
reference for voxel values and geometry is dcm2niix (its PyPI binary) run on
the same files, compared after both volumes are put in RAS order.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import zarr

from storage.classes import LabelClass
from storage.errors import CorruptInputError, InputError, InvalidInputError, UnsupportedFormatError
from storage.hashing import sha256_file
from storage.layout import open_image_store
from storage.nifti import write_label_nifti
from storage.dicom import SeriesRef, find_series, ingest_dicom, is_dicom_input, probe_dicom
from tests import dicom_samples as samples
from tests.conftest import shared

RNG = np.random.default_rng(20240101)
OBLIQUE_IOP = (np.cos(0.3), np.sin(0.3), 0.0,
               -np.sin(0.3) * np.cos(0.2), np.cos(0.3) * np.cos(0.2), np.sin(0.2))


def _data(shape: tuple[int, int, int] = (6, 5, 7), high: int = 3000) -> np.ndarray:
    return RNG.integers(0, high, shape).astype(np.int16)


def _only(paths: list[Path | str]) -> SeriesRef:
    refs = find_series(paths)
    assert len(refs) == 1, refs
    return refs[0]


def _ras(array_ijk: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    return nib.as_closest_canonical(nib.Nifti1Image(array_ijk, affine))


def _dcm2niix(folder: Path, out: Path) -> list[Path]:
    """dcm2niix's NIfTIs of a folder (the PyPI package's binary)."""
    import dcm2niix

    out.mkdir(parents=True, exist_ok=True)
    run = subprocess.run([dcm2niix.bin, "-z", "n", "-b", "n", "-f", "%s", "-o", str(out), str(folder)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    return sorted(out.glob("*.nii"))


def _assert_same_as_dcm2niix(store, reference: Path) -> None:
    """Voxel values equal in RAS order, affines within 1e-3 mm."""
    geometry = store.meta.geometry
    ours = _ras(np.asarray(store.image[0]).transpose(2, 1, 0), np.asarray(geometry.affine))
    theirs = nib.as_closest_canonical(nib.load(reference))
    assert ours.shape == theirs.shape
    np.testing.assert_array_equal(ours.get_fdata(), theirs.get_fdata())
    np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-3)


def _store_json(path: Path) -> str:
    return json.dumps(dict(zarr.open_group(str(path), mode="r").attrs))


# --------------------------------------------------------------------------- good series vs dcm2niix


@pytest.mark.parametrize("case", ["ascending", "descending", "oblique", "rle"])
def test_series_matches_dcm2niix(tmp_path: Path, case: str) -> None:
    data = _data()
    folder = tmp_path / "in"
    paths = samples.write_ct_series(folder, data, descending=case == "descending",
                                    iop=OBLIQUE_IOP if case == "oblique" else (1, 0, 0, 0, 1, 0))
    if case == "rle":
        samples.compress_series(paths)
        assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    ref = _only([folder])
    store = ingest_dicom(ref, tmp_path / "s.zarr", chunk=4)
    # slices are stored in ascending order along the normal whatever the writing order
    expected = data[::-1] if case == "descending" else data
    np.testing.assert_array_equal(np.asarray(store.image[0]), expected.astype(np.int32) - 1024)
    assert store.image.dtype == np.int16
    (reference,) = _dcm2niix(folder, tmp_path / "d2n")
    _assert_same_as_dcm2niix(store, reference)


def test_real_ct5n_matches_dcm2niix(tmp_path: Path) -> None:
    folder = shared("dicom/CT5N")
    ref = _only([folder])
    assert ref.name.startswith("series-5-SmartScore_-_Gated_0.5_sec-") and len(ref.files) == 5
    store = ingest_dicom(ref, tmp_path / "ct5n.zarr", chunk=2)
    assert store.image.shape == (1, 5, 16, 16) and store.image.chunks == (1, 2, 2, 2)
    (reference,) = _dcm2niix(folder, tmp_path / "d2n")
    _assert_same_as_dcm2niix(store, reference)
    # descending z on disk: the first stored slice is the lowest, whichever file held it
    z = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in ref.files]
    assert store.meta.geometry.affine[2][3] == pytest.approx(min(z), abs=1e-4)


def test_real_single_slice_ct_small(tmp_path: Path) -> None:
    source = shared("dicom/CT_small.dcm")
    ref = _only([source])
    assert ref.root == source.parent and ref.files == (source,)
    store = ingest_dicom(ref, tmp_path / "small.zarr")
    assert store.image.shape == (1, 1, 128, 128)
    raw = pydicom.dcmread(source).pixel_array.astype(np.int32)
    np.testing.assert_array_equal(np.asarray(store.image[0, 0]), raw - 1024)
    assert store.meta.geometry.zooms[2] == pytest.approx(5.0)  # SliceThickness gives the single slice its depth
    alone = tmp_path / "alone"  # dcm2niix converts a whole folder: give it this file only
    alone.mkdir()
    os.symlink(source, alone / source.name)
    (reference,) = _dcm2niix(alone, tmp_path / "d2n")
    _assert_same_as_dcm2niix(store, reference)


def test_a_single_slice_without_thickness_says_its_depth_is_a_guess(tmp_path: Path) -> None:
    """One slice with neither SliceThickness nor SpacingBetweenSlices: the 1 mm depth that makes a volume in mL
    is a guess, and the probe and the run say so (it was silent: 'ok', mL resting on 1 mm)."""
    from flows.cluster import dask_client
    from flows.config import SegmentOptions
    from flows.pipeline import segment_one
    from storage.dicom import DEPTH_ASSUMED_NOTE
    from tests.models import tiny_model

    paths = samples.write_ct_series(tmp_path / "one", RNG.integers(0, 1500, (1, 20, 24)).astype(np.int16))

    def drop(ds, k):  # noqa: ANN001, ARG001
        del ds.SliceThickness

    samples.rewrite(paths, drop)
    ref = _only(paths)
    assert probe_dicom(ref).cell_note == DEPTH_ASSUMED_NOTE
    model = tiny_model(tmp_path / "m", spatial_dims=3, channels=1, roi=[8, 16, 16])
    with dask_client(workers=1, threads_per_worker=1) as client:
        out = segment_one(ref, model, tmp_path / "out", SegmentOptions(chunk_size=16, dicom_seg="none"), client)
    assert out.ok, out.error
    assert any(DEPTH_ASSUMED_NOTE in w for w in out.statistics["warnings"]), out.statistics.get("warnings")
    # with a thickness, no such note
    samples.rewrite(paths, lambda ds, k: setattr(ds, "SliceThickness", "2.5"))
    assert probe_dicom(_only(paths)).cell_note is None


def test_enhanced_multiframe_splits_into_volumes(tmp_path: Path) -> None:
    magnitude, phase = _data((4, 5, 6), 1000), (_data((4, 5, 6), 1000) - 500).astype(np.int16)
    samples.write_enhanced_mr(tmp_path / "in", magnitude, phase)
    refs = find_series([tmp_path / "in"])
    assert sorted(r.volume for r in refs) == ["MAGNITUDE", "PHASE"]
    assert len({r.name for r in refs}) == 2 and all("ENH_MR_B0" in r.name for r in refs)
    assert refs[0].sha256() != refs[1].sha256()  # same file, different inputs
    references = _dcm2niix(tmp_path / "in", tmp_path / "d2n")
    assert len(references) == 2  # dcm2niix also writes magnitude and phase apart (7.nii, 7_ph.nii)
    for ref in refs:
        store = ingest_dicom(ref, tmp_path / f"{ref.name}.zarr", chunk=3)
        expected = magnitude if ref.volume == "MAGNITUDE" else phase
        np.testing.assert_array_equal(np.asarray(store.image[0]), expected)
        info = store.meta.geometry.dicom
        assert info.volume == ref.volume and len(info.frame_numbers) == 4
        # frames were written interleaved in reverse k order: magnitude k is frame 2*(3-k)+1
        offset = 1 if ref.volume == "MAGNITUDE" else 2
        assert info.frame_numbers == [2 * (3 - k) + offset for k in range(4)]
        reference = references[0] if ref.volume == "MAGNITUDE" else references[1]
        _assert_same_as_dcm2niix(store, reference)


# --------------------------------------------------------------------------- ordering, grouping, names


def test_order_ignores_file_names_and_instance_numbers(tmp_path: Path) -> None:
    data = _data((7, 4, 5))
    folder = tmp_path / "in"
    paths = samples.write_ct_series(folder, data, descending=True)
    lies = RNG.permutation(len(paths))
    samples.rewrite(paths, lambda ds, k: setattr(ds, "InstanceNumber", int(lies[k]) + 1))
    for n, k in enumerate(RNG.permutation(len(paths))):  # shuffle the names too
        paths[k].rename(folder / f"x{n:02d}.tmp")
    ref = _only([folder])
    store = ingest_dicom(ref, tmp_path / "s.zarr")
    np.testing.assert_array_equal(np.asarray(store.image[0]), data[::-1].astype(np.int32) - 1024)
    positions = [float(pydicom.dcmread(folder / f"x{n:02d}.tmp").ImagePositionPatient[2]) for n in range(7)]
    order = np.argsort(positions)
    uids = [str(pydicom.dcmread(folder / f"x{n:02d}.tmp").SOPInstanceUID) for n in order]
    assert store.meta.geometry.dicom.sop_instance_uids == uids


def test_folder_with_several_series_and_clutter(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    ct = samples.write_ct_series(folder / "a", _data((3, 4, 4)), series_description="T1 AX/POST*<x>",
                                 series_number=3, name_prefix="CT")
    samples.write_ct_series(folder / "a", _data((2, 4, 4)), series_description="AX CT", series_number=4,
                            name_prefix="OTHER")
    (folder / "README").write_text("not dicom\n")
    samples.write_dirfile(folder / "DIRFILE")
    samples.write_basic_text_sr(folder / "sr" / "report.dcm")
    samples.write_seg(folder / "seg" / "seg.dcm", ct)
    refs = find_series([folder])
    assert [len(r.files) for r in refs] == [3, 2]
    assert refs[0].name.startswith("series-3-T1_AX_POST_x-") and refs[1].name.startswith("series-4-AX_CT-")
    for ref in refs:
        assert len(ref.name) <= 80 and all(c.isalnum() or c in "._-" for c in ref.name)
        assert ref.root == folder and ref.display == f"{folder} [series {ref.series_instance_uid}]"
    assert is_dicom_input(folder) and is_dicom_input(ct[0]) and not is_dicom_input(folder / "README")


def test_long_description_name_is_short_and_unique(tmp_path: Path) -> None:
    long = "x" * 64  # the DICOM limit for SeriesDescription
    samples.write_ct_series(tmp_path / "a", _data((2, 3, 3)), series_description=long)
    samples.write_ct_series(tmp_path / "b", _data((2, 3, 3)), series_description=long)
    names = [r.name for r in find_series([tmp_path])]
    assert len(set(names)) == 2 and all(len(n) <= 80 for n in names)


def test_dicomdir_uses_its_referenced_files(tmp_path: Path) -> None:
    data = _data((3, 4, 5))
    paths = samples.write_ct_series(tmp_path / "src", data)
    dicomdir = samples.write_dicomdir(tmp_path / "media", paths)
    ref = _only([dicomdir])
    assert ref.root == dicomdir.parent and len(ref.files) == 3
    assert all(dicomdir.parent in p.parents for p in ref.files)
    store = ingest_dicom(ref, tmp_path / "s.zarr")
    np.testing.assert_array_equal(np.asarray(store.image[0]), data.astype(np.int32) - 1024)
    assert is_dicom_input(dicomdir)


def test_loose_files_are_named_by_the_folder_their_series_shares(tmp_path: Path) -> None:
    paths = samples.write_ct_series(tmp_path / "in", _data((4, 3, 3)))
    ref = _only(paths[:2])
    assert ref.root == tmp_path / "in" and set(ref.files) == set(paths[:2])
    # loose files of two series in two folders: each named by its own folder (both had been named by tmp_path,
    # and with a file from another tree by "/", in messages and in the provenance's input path)
    other = samples.write_ct_series(tmp_path / "b" / "deep", _data((3, 3, 3)), series_number=4)
    refs = find_series([*paths, *other])
    assert {r.root for r in refs} == {tmp_path / "in", tmp_path / "b" / "deep"}
    assert {r.root: set(r.files) for r in refs} == {tmp_path / "in": set(paths), tmp_path / "b" / "deep": set(other)}


# --------------------------------------------------------------------------- what is not an image series


def test_non_image_objects_alone_are_refused(tmp_path: Path) -> None:
    sr = samples.write_basic_text_sr(tmp_path / "sr" / "report.dcm")
    with pytest.raises(UnsupportedFormatError, match=r"report\.dcm: is a Basic Text SR Storage object, not an image"):
        find_series([sr])
    seg = samples.write_seg(tmp_path / "seg" / "seg.dcm",
                            samples.write_ct_series(tmp_path / "ct", _data((2, 4, 4))))
    with pytest.raises(UnsupportedFormatError, match=r"seg\.dcm: is a Segmentation object"):
        find_series([seg])
    with pytest.raises(InputError, match=r"sr: no DICOM image series found \(1 file, 1 DICOM object that"):
        find_series([tmp_path / "sr"])
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UnsupportedFormatError, match="not a DICOM file"):
        find_series([tmp_path / "notes.txt"])
    with pytest.raises(InputError, match="no such file or folder"):
        find_series([tmp_path / "absent"])


BAD = {
    "missing_slice": (InvalidInputError, r"1 slice\(s\) missing: a 4 mm gap between the slices at 4 and 8 mm"),
    "varying_gaps": (InvalidInputError, r"slice gaps vary from 2 to 2\.6 mm"),
    "mixed_orientation": (InvalidInputError, r"mixed slice orientations in one series"),
    "mixed_sizes": (InvalidInputError, r"mixed image sizes in one series: 4x5, 6x5 \(rows x columns\)"),
    "mixed_spacing": (InvalidInputError, r"mixed PixelSpacing in one series"),
    "gantry_tilt": (InvalidInputError, r"gantry tilt: slices step 0\.500 mm sideways of the slice normal"),
    "no_pixel_data": (InvalidInputError, r"IM0003\.dcm has no pixel data"),
    "no_position": (InvalidInputError, r"IM0002\.dcm has no ImagePositionPatient, which the series' other slices have"),
    "duplicate_position": (InvalidInputError, r"two slices at the same position \(4\.000 mm along the normal\)"),
    "undecodable": (UnsupportedFormatError, r"transfer syntax JPEG XL Lossless \(1\.2\.840\.10008\.1\.2\.4\.110\) "
                                            r"cannot be decoded"),
}


@pytest.mark.parametrize("case", samples.BAD_CASES)
def test_bad_series_are_refused_and_leave_no_store(tmp_path: Path, case: str) -> None:
    samples.write_bad_series(tmp_path / "in", case)
    ref = _only([tmp_path / "in"])  # grouping never splits a broken series into "good" parts
    kind, problem = BAD[case]
    store = tmp_path / "s.zarr"
    with pytest.raises(kind, match=problem) as caught:
        ingest_dicom(ref, store)
    message = str(caught.value)
    assert message.startswith(ref.display + ": ") and "\n" not in message
    assert not store.exists()
    with pytest.raises(kind, match=problem):  # probe refuses what ingest refuses
        probe_dicom(ref)


def test_truncated_pixel_data_is_corrupt(tmp_path: Path) -> None:
    paths = samples.write_ct_series(tmp_path / "in", _data((3, 8, 8)))
    raw = paths[1].read_bytes()
    paths[1].write_bytes(raw[:-40])  # the header still parses; the pixels are short
    ref = _only([tmp_path / "in"])
    with pytest.raises(CorruptInputError, match=r"IM0002\.dcm: pixel data is truncated: 88 of 128 bytes"):
        ingest_dicom(ref, tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


# --------------------------------------------------------------------------- values and dtypes


def test_ct_hounsfield_units_in_int16(tmp_path: Path) -> None:
    data = _data((5, 4, 4), 4000)
    samples.write_ct_series(tmp_path / "in", data, slope=1.0, intercept=-1024.0)
    store = ingest_dicom(_only([tmp_path / "in"]), tmp_path / "s.zarr")
    assert store.image.dtype == np.int16 and store.meta.geometry.dtype == "int16"
    np.testing.assert_array_equal(np.asarray(store.image[0]), data.astype(np.int32) * 1 - 1024)
    info = store.meta.geometry.dicom
    assert (info.rescale_slope, info.rescale_intercept, info.rescale_type) == (1.0, -1024.0, "HU")


@pytest.mark.parametrize(("slope", "intercept", "high", "dtype"), [
    (1.0, 2000.0, 32000, np.int32),  # raw int16 plus 2000 overflows int16: found in the pixels, widened
    (0.5, -10.0, 3000, np.float32),  # a fractional slope gives float32
])
def test_rescale_picks_a_dtype_that_holds_the_values(tmp_path: Path, slope: float, intercept: float,
                                                     high: int, dtype: type) -> None:
    data = _data((5, 4, 4), high)
    data[4, 0, 0] = high  # in the last slab only: the first slabs fit int16
    samples.write_ct_series(tmp_path / "in", data, slope=slope, intercept=intercept)
    store = ingest_dicom(_only([tmp_path / "in"]), tmp_path / "s.zarr", chunk=2)
    assert store.image.dtype == dtype and store.meta.geometry.dtype == np.dtype(dtype).name
    np.testing.assert_array_equal(np.asarray(store.image[0]), (data.astype(np.float64) * slope + intercept))


# --------------------------------------------------------------------------- metadata, provenance, export


def test_series_info_and_no_patient_identifiers(tmp_path: Path) -> None:
    data = _data((4, 3, 3))
    paths = samples.write_ct_series(tmp_path / "in", data, series_description="AX CT", series_number=3)
    ref = _only([tmp_path / "in"])
    store = ingest_dicom(ref, tmp_path / "s.zarr")
    meta = open_image_store(tmp_path / "s.zarr").meta
    info = meta.geometry.dicom
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    assert info.sop_instance_uids == [str(h.SOPInstanceUID) for h in headers]  # ascending z = file order here
    assert info.series_instance_uid == ref.series_instance_uid == str(headers[0].SeriesInstanceUID)
    assert info.study_instance_uid == str(headers[0].StudyInstanceUID)
    assert info.frame_of_reference_uid == str(headers[0].FrameOfReferenceUID)
    assert [f.sha256 for f in info.files] == [sha256_file(p) for p in paths]
    assert [f.path for f in info.files] == [p.name for p in paths]  # relative to source.path
    assert info.frame_numbers is None and info.patient_name_present and info.patient_id_present
    assert info.transfer_syntax_uid == pydicom.uid.ExplicitVRLittleEndian
    assert meta.source.format == "DICOM" and meta.source.path == str((tmp_path / "in").resolve())
    assert meta.source.sha256 == ref.sha256() and meta.source.size == sum(p.stat().st_size for p in paths)
    text = _store_json(store.path)
    for secret in (samples.DUMMY_PATIENT_NAME, samples.DUMMY_PATIENT_ID, "Dummy", "19700101"):
        assert secret not in text


def test_probe_reads_headers_only(tmp_path: Path) -> None:
    paths = samples.write_ct_series(tmp_path / "in", _data((6, 4, 5)), spacing=(2.5, 0.8, 0.7))
    header = probe_dicom(_only([tmp_path / "in"]))
    assert (header.kind, header.spatial_dims, header.channels, header.shape) == ("volume", 3, 1, (5, 4, 6))
    assert header.cell_size == pytest.approx(2.5 * 0.8 * 0.7 / 1000) and header.cell_unit == "mL"
    for p in paths:  # the pixels are never read: emptying them does not change the probe
        samples.rewrite([p], lambda ds, k: setattr(ds, "PixelData", b"\0" * 40))
    assert probe_dicom(_only([tmp_path / "in"])).shape == (5, 4, 6)


def test_labels_exported_on_the_series_grid(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    samples.write_ct_series(folder, _data((5, 4, 6)), iop=OBLIQUE_IOP, descending=True)
    store = ingest_dicom(_only([folder]), tmp_path / "s.zarr")
    geometry = store.meta.geometry
    labels = (np.asarray(store.image[0]) > 500).astype(np.uint8)
    out = write_label_nifti(labels, geometry, tmp_path / "labels.nii.gz",
                            classes=[LabelClass(value=0, name="background"), LabelClass(value=1, name="bright")])
    written = nib.load(out)
    assert written.shape == (6, 4, 5)
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 1
    assert written.header.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(written.affine, geometry.affine, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(written.dataobj), labels.transpose(2, 1, 0))
    (reference,) = _dcm2niix(folder, tmp_path / "d2n")  # dcm2niix flips rows: compare in RAS order
    np.testing.assert_allclose(nib.as_closest_canonical(written).affine,
                               nib.as_closest_canonical(nib.load(reference)).affine, atol=1e-3)


@pytest.mark.parametrize("syntax", [pydicom.uid.JPEGLSLossless, pydicom.uid.JPEG2000Lossless])
def test_compressed_series_decode_to_the_same_volume(tmp_path: Path, syntax) -> None:
    """JPEG-LS and JPEG 2000 (pylibjpeg's decoders), beside RLE above: the same HU volume as uncompressed."""
    data = (np.arange(3 * 64 * 64).reshape(3, 64, 64) % 2000).astype(np.int16)  # JPEG 2000 needs a few levels
    paths = samples.write_ct_series(tmp_path / "in", data)
    samples.compress_series(paths, syntax)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == syntax
    store = ingest_dicom(_only([tmp_path / "in"]), tmp_path / "s.zarr", chunk=32)
    np.testing.assert_array_equal(np.asarray(store.image[0]), data.astype(np.int32) - 1024)
    assert store.meta.geometry.dicom.transfer_syntax_uid == syntax


def test_one_series_split_across_two_folders_given_together_is_one_whole_input(tmp_path: Path) -> None:
    """Slices 1-3 in one folder and 4-6 in another, both named: two inputs had come out, the first half segmented
    and reported ok (half the volume) and the second refused as "the same series in two places".  The halves are
    now one input, equal to the whole folder's; a part holding every slice of the others is the series, named
    first; a slice cut short in a part refuses the joined series naming it."""
    import shutil

    from flows.inputs import expand, output_clashes

    data = _data((6, 5, 7))
    paths = samples.write_ct_series(tmp_path / "whole", data)
    for k, path in enumerate(paths):
        (tmp_path / ("p1" if k < 3 else "p2")).mkdir(exist_ok=True)
        shutil.copy(path, tmp_path / ("p1" if k < 3 else "p2") / path.name)
    items, failed = expand([str(tmp_path / "p1"), str(tmp_path / "p2")])
    assert failed == [] and len(items) == 1
    [joined] = items
    assert sorted(f.name for f in joined.files) == [p.name for p in paths]
    store = ingest_dicom(joined, tmp_path / "joined.zarr", chunk=4)
    whole = ingest_dicom(_only([tmp_path / "whole"]), tmp_path / "whole.zarr", chunk=4)
    np.testing.assert_array_equal(np.asarray(store.image), np.asarray(whole.image))
    assert store.meta.geometry.affine == whole.meta.geometry.affine

    # a half and the whole series: the whole is the input (first), the half refused as a copy of it
    items, failed = expand([str(tmp_path / "p1"), str(tmp_path / "whole")])
    assert failed == [] and [len(i.files) for i in items] == [6, 3]
    assert list(output_clashes(items)) == [1]

    # a slice cut short in one half joins the series, which ingest then refuses naming it (as in one folder)
    cut = tmp_path / "p2" / paths[4].name
    cut.write_bytes(cut.read_bytes()[:400])
    items, failed = expand([str(tmp_path / "p1"), str(tmp_path / "p2")])
    assert failed == [] and len(items) == 1 and cut in items[0].files and len(items[0].files) == 6
    with pytest.raises(CorruptInputError, match=paths[4].name):
        ingest_dicom(items[0], tmp_path / "cut.zarr", chunk=4)


def test_one_series_in_two_folders_is_told_to_be_given_once_not_renamed(tmp_path: Path) -> None:
    """A DICOM series copied into two folders: the second was told to "rename one of them", which a series'
    outputs (named by its number, description and UID) cannot be."""
    import shutil

    from flows.inputs import output_clashes

    samples.write_ct_series(tmp_path / "a", _data((3, 4, 4)))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    refs = [_only([tmp_path / "a"]), _only([tmp_path / "b"])]
    assert output_clashes(refs) == {1: (
        f"{refs[1].display}: its outputs would overwrite those of {refs[0].display} (the same name stem "
        f"{refs[0].name!r}); the same DICOM series in two places: give one of them, or segment the other into "
        "another --out")}
    # a copy with a slice cut short: refused as a copy, and its damaged file named (it had gone unsaid)
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    cut = sorted((tmp_path / "c").iterdir())[1]
    samples.truncate(cut)
    refs.append(_only([tmp_path / "c"]))
    assert output_clashes(refs)[2].endswith(f"another --out (this copy also has 1 damaged file(s): {cut.name})")


def test_a_pixel_spacing_no_scanner_has_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    """PixelSpacing 1e30 went through (as a NIfTI pixdim of 1e30 did): volumes of 1e30 mL, exit 0."""
    paths = samples.write_ct_series(tmp_path / "ct", RNG.integers(0, 1500, (3, 20, 24)).astype(np.int16))
    samples.rewrite(paths, lambda ds, k: setattr(ds, "PixelSpacing", [1e30, 0.7]))
    with pytest.raises(InvalidInputError, match=r"has a voxel size of 0\.7 x 1e\+30 x 2\.5 mm, over 10000 mm"):
        ingest_dicom(_only(paths), tmp_path / "ct.zarr")
    assert not (tmp_path / "ct.zarr").exists()

