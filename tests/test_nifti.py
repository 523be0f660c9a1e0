"""NIfTI ingest and label export on generated and real files (no mocks).

The invariants: ``image[c, k, j, i] == data[i, j, k, c]`` for every voxel, and
an exported label map sits on exactly the input's grid (affine, qform/sform and
their codes, zooms, orientation) with a label-map header.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr

from storage.classes import LabelClass, slicer_color_table
from storage.errors import (
    CorruptInputError,
    ExportError,
    InputError,
    InvalidInputError,
    StoreError,
    UnsupportedFormatError,
)
from storage.layout import open_image_store
from storage.labeltables import write_label_tables
from storage.nifti import ingest_nifti, write_label_nifti

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CLASSES = [LabelClass(value=0, name="background", color=(0, 0, 0)), LabelClass(value=1, name="tissue", color=(255, 0, 0))]
PROVENANCE = {"model": "unit-test", "sha256": "ab" * 32, "params": {"roi": [16, 16, 16], "overlap": 0.25}}


def _oblique(zooms: tuple[float, float, float] = (1.5, 2.0, 2.5)) -> np.ndarray:
    """A rotated, anisotropic, translated affine: the case viewers get wrong most."""
    a, b = np.deg2rad(12.0), np.deg2rad(-7.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ rx @ np.diag(zooms)
    aff[:3, 3] = (-40.0, 12.5, 7.25)
    return aff


def _volume(shape: tuple[int, ...], dtype: str = "int16", seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-300, 1200, size=shape).astype(dtype)


def _write_raw(path: Path, hdr: nib.Nifti1Header, payload: bytes) -> Path:
    """Write header bytes and a payload as-is, for headers nibabel's savers would 'fix'."""
    hdr = hdr.copy()
    hdr["vox_offset"] = 0
    with open(path, "wb") as f:
        hdr.write_to(f)
        f.write(b"\0" * (int(hdr.get_data_offset()) - f.tell()))
        f.write(payload)
    return path


def _expected(path: Path) -> np.ndarray:
    """What nibabel reads, laid out as the store's (C, K, J, I)."""
    img = nib.load(path)
    data = np.asanyarray(img.dataobj)
    if data.ndim == 5:
        data = data[:, :, :, 0, :]
    if data.ndim == 3:
        data = data[..., None]
    return data.transpose(3, 2, 1, 0)


def _assert_one_line_naming(err: pytest.ExceptionInfo[BaseException], path: Path) -> None:
    text = str(err.value)
    assert "\n" not in text
    assert path.name in text


# --------------------------------------------------------------------------- generated inputs


def _case_oblique(tmp: Path) -> Path:
    img = nib.Nifti1Image(_volume((37, 29, 41)), _oblique())
    img.set_qform(_oblique((1.5, 2.0, 2.5)), code=1)
    img.set_sform(_oblique(), code=2)
    return _save(img, tmp / "oblique.nii")


def _case_big_endian(tmp: Path) -> Path:
    hdr = nib.Nifti1Header(endianness=">")
    hdr.set_data_dtype(np.int16)  # else the header's default float32 wins over the array's dtype
    img = nib.Nifti1Image(_volume((20, 18, 33)).astype(">i2"), _oblique(), header=hdr)
    path = _save(img, tmp / "big_endian.nii")
    assert nib.load(path).get_data_dtype() == np.dtype(">i2")
    return path


def _case_4d(tmp: Path) -> Path:
    return _save(nib.Nifti1Image(_volume((19, 23, 35, 3), "float32"), _oblique()), tmp / "four_d.nii")


def _case_nifti2(tmp: Path) -> Path:
    return _save(nib.Nifti2Image(_volume((17, 21, 18), "uint16"), _oblique()), tmp / "nifti2.nii")


def _case_gzip(tmp: Path) -> Path:
    return _save(nib.Nifti1Image(_volume((24, 17, 40, 2), "int32"), _oblique()), tmp / "gz4d.nii.gz")


def _case_qform0(tmp: Path) -> Path:
    img = nib.Nifti1Image(_volume((9, 11, 19), "uint8"), None)
    img.set_sform(np.diag([1.0, 3.0, 2.0, 1.0]), code=2)
    img.set_qform(None, code=0)
    path = _save(img, tmp / "qform0.nii.gz")
    hdr = nib.load(path).header
    assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (0, 2)
    return path


def _case_scaled(tmp: Path) -> Path:
    raw = _volume((13, 15, 20))
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(raw.shape)
    hdr.set_data_dtype(np.int16)
    hdr.set_sform(_oblique(), code=2)
    hdr.set_slope_inter(2.0, 10.0)
    return _write_raw(tmp / "scaled.nii", hdr, raw.tobytes(order="F"))


def _case_pair(tmp: Path) -> Path:
    nib.save(nib.Nifti1Pair(_volume((10, 12, 17)), _oblique()), tmp / "pair.img")
    return tmp / "pair.hdr"


def _case_vector5d(tmp: Path) -> Path:
    return _save(nib.Nifti1Image(_volume((8, 9, 18, 1, 2)), np.diag([2.0, 2.0, 2.0, 1.0])), tmp / "vectors.nii")


def _case_nanometre(tmp: Path) -> Path:
    """50 nm voxels (electron microscopy, in mm): refused as a "singular" affine by an absolute determinant bound."""
    return _save(nib.Nifti1Image(_volume((9, 10, 11)), np.diag([5e-5, 5e-5, 5e-5, 1.0])), tmp / "em.nii.gz")


def _save(img: nib.Nifti1Image, path: Path) -> Path:
    nib.save(img, path)
    return path


CASES = {
    "oblique": (_case_oblique, "int16", 1),
    "big_endian": (_case_big_endian, "int16", 1),
    "four_d": (_case_4d, "float32", 3),
    "nifti2": (_case_nifti2, "uint16", 1),
    "gzip": (_case_gzip, "int32", 2),
    "qform0": (_case_qform0, "uint8", 1),
    "scaled": (_case_scaled, "float32", 1),
    "pair": (_case_pair, "int16", 1),
    "vector5d": (_case_vector5d, "int16", 2),
    "nanometre": (_case_nanometre, "int16", 1),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_ingest_generated(tmp_path: Path, case: str) -> None:
    make, dtype, channels = CASES[case]
    src = make(tmp_path)
    img = nib.load(src)
    store = ingest_nifti(src, tmp_path / "store.zarr", chunk=16)

    opened = open_image_store(store.path)
    image = opened.image
    expected = _expected(src)
    assert image.shape == expected.shape and image.shape[0] == channels
    assert image.chunks == (1, *(min(16, n) for n in image.shape[1:]))
    assert image.dtype == np.dtype(dtype)
    assert np.array_equal(image[:], expected.astype(dtype))
    assert opened.mask is None

    meta = opened.meta
    geom = meta.geometry
    assert geom.kind == "volume" and meta.spatial_dims == 3
    assert geom.shape == list(img.shape)
    np.testing.assert_allclose(geom.affine, img.affine, atol=1e-9)
    q, qcode = img.header.get_qform(coded=True)
    s, scode = img.header.get_sform(coded=True)
    assert (geom.qform_code, geom.sform_code) == (int(qcode), int(scode))
    if qcode:
        np.testing.assert_allclose(geom.qform, q, atol=1e-9)
    if scode:
        np.testing.assert_allclose(geom.sform, s, atol=1e-9)
    np.testing.assert_allclose(geom.zooms, img.header.get_zooms())
    assert tuple(geom.orientation) == nib.aff2axcodes(img.affine)
    assert geom.nifti_version == (2 if case == "nifti2" else 1)
    assert meta.source.format == f"NIfTI-{geom.nifti_version}"
    assert meta.source.path == str(src.resolve()) and meta.source.size == src.stat().st_size
    assert meta.channel_names == [f"channel{c}" for c in range(channels)]


def test_scaled_values_are_applied(tmp_path: Path) -> None:
    src = _case_scaled(tmp_path)
    raw = np.asanyarray(nib.load(src).dataobj.get_unscaled())
    store = ingest_nifti(src, tmp_path / "s.zarr", chunk=8)
    assert np.array_equal(store.image[0], (raw * 2.0 + 10.0).astype(np.float32).T)


# an oblique affine whose qform quaternion, written by nibabel into a NIfTI-2 header, reads back with
# w^2 = -8.4e-16: nibabel's NIfTI-2 threshold (3 float64 epsilons) then raises "w2 should be positive"
OBLIQUE_180 = [[-2.0, 6.714715653593746e-19, 9.081024511081715e-18, 117.8551025390625],
               [-6.714715653593746e-19, 1.9737114906311035, -0.35552823543548584, -35.72294235229492],
               [8.25548088896093e-18, 0.3232076168060303, 2.171081781387329, -7.248798370361328], [0, 0, 0, 1]]


def test_a_nifti2_qform_at_a_half_turn_is_read_not_refused(tmp_path: Path) -> None:
    """The scan (a volume of nibabel's own example_nifti2, re-saved) had been refused with a bare "ValueError: w2
    should be positive"; its labels keep the header's qform and sform as written."""
    affine = np.array(OBLIQUE_180)
    img = nib.Nifti2Image(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), affine)
    img.set_qform(affine, 1)
    img.set_sform(affine, 1)
    src = tmp_path / "scan.nii.gz"
    nib.save(img, src)
    with pytest.raises(ValueError, match="w2 should be positive"):  # the premise
        nib.load(src).header.get_qform()
    store = ingest_nifti(src, tmp_path / "s.zarr")
    geom = store.meta.geometry
    np.testing.assert_allclose(geom.qform, affine, atol=1e-4)
    out = write_label_nifti(_threshold(store.image), geom, tmp_path / "labels.nii.gz", classes=CLASSES,
                            provenance=PROVENANCE)
    got, want = nib.load(out), nib.load(src)
    np.testing.assert_array_equal(got.affine, want.affine)
    for field in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "pixdim"):
        np.testing.assert_array_equal(got.header[field], want.header[field])


def _threshold(image: zarr.Array) -> np.ndarray:
    first = image[0]
    return (first > np.median(first)).astype(np.uint8)


@pytest.mark.parametrize("case", sorted(CASES))
def test_label_round_trip(tmp_path: Path, case: str) -> None:
    src = CASES[case][0](tmp_path)
    store = ingest_nifti(src, tmp_path / "store.zarr", chunk=16)
    geom = store.meta.geometry
    labels = _threshold(store.image)
    out = write_label_nifti(labels, geom, tmp_path / "labels.nii.gz", classes=CLASSES, provenance=PROVENANCE)
    assert out == tmp_path / "labels.nii.gz"
    _assert_same_grid(nib.load(src), out)
    _assert_label_file(out, labels)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries left


def _assert_same_grid(src: nib.Nifti1Image, out: Path) -> None:
    got = nib.load(out)
    assert got.shape == src.shape[:3]
    np.testing.assert_allclose(got.affine, src.affine, atol=1e-6)
    for form in ("qform", "sform"):
        want, want_code = getattr(src.header, f"get_{form}")(coded=True)
        have, have_code = getattr(got.header, f"get_{form}")(coded=True)
        assert int(have_code) == int(want_code), form
        if want_code:
            np.testing.assert_allclose(have, want, atol=1e-6)
    np.testing.assert_allclose(got.header.get_zooms()[:3], src.header.get_zooms()[:3])
    assert nib.aff2axcodes(got.affine) == nib.aff2axcodes(src.affine)
    assert got.header["xyzt_units"] == src.header["xyzt_units"]
    assert isinstance(got, nib.Nifti2Image) == isinstance(src, nib.Nifti2Image)


def _assert_label_file(out: Path, labels: np.ndarray, dtype: str = "uint8") -> None:
    got = nib.load(out)
    hdr = got.header
    assert got.get_data_dtype() == np.dtype(dtype)
    assert int(hdr["intent_code"]) == 1002 and hdr.get_intent()[2] == "segflow labels"
    assert int(hdr["dim"][0]) == 3
    assert hdr.get_slope_inter() in ((None, None), (1.0, 0.0))
    assert hdr["descrip"].item().startswith(b"segflow labels")
    data = np.asanyarray(got.dataobj)
    assert data.dtype == np.dtype(dtype)
    assert np.array_equal(data, np.asarray(labels).transpose(2, 1, 0))
    texts = [e.get_content().decode() for e in hdr.extensions if e.get_code() == 6]
    assert json.loads(texts[0]) == PROVENANCE
    assert texts[1].startswith("# segflow label table")


def test_a_2d_nifti_gets_a_2d_label_map_that_evaluate_reads(tmp_path: Path) -> None:
    """An (I, J) image is one slice thick inside segflow; its label map was written (I, J, 1), and evaluate refused
    a 2-D truth ("a label volume is 3-D").  The label map has the input's own shape now, and 2-D maps score."""
    from flows.evaluate import evaluate_files

    flat = nib.Nifti1Image(_volume((24, 20)), np.diag([0.7, 0.8, 2.0, 1.0]))
    flat.set_qform(flat.affine, code=1)
    src = _save(flat, tmp_path / "flat.nii.gz")
    store = ingest_nifti(src, tmp_path / "store.zarr", chunk=16)
    labels = _threshold(store.image)
    out = write_label_nifti(labels, store.meta.geometry, tmp_path / "labels.nii.gz", classes=CLASSES)
    got = nib.load(out)
    assert got.shape == (24, 20) and np.allclose(got.affine, nib.load(src).affine)
    # the slice thickness and the qform made with it are the input's (pixdim[3] was reset to 1)
    assert got.header["pixdim"][3] == 2.0 and np.allclose(got.get_qform(), nib.load(src).get_qform())
    assert np.array_equal(np.asarray(got.dataobj), labels[0].T)
    truth = np.asarray(got.dataobj).copy()
    truth[:6] = 0
    truth_path = _save(nib.Nifti1Image(truth, got.affine), tmp_path / "truth.nii.gz")
    rows = {r["value"]: r for r in evaluate_files([out], [truth_path])["cases"][0]["classes"]}
    pred = np.asarray(got.dataobj)
    want = 2 * np.sum((pred == 1) & (truth == 1)) / (np.sum(pred == 1) + np.sum(truth == 1))
    assert rows[1]["dice"] == pytest.approx(want)


def test_export_from_dask_labels_as_predict_returns_them(tmp_path: Path) -> None:
    """segmentation.predict's labels are a dask array, whose chunks are tuples per axis: the slab reader took
    int() of one (TypeError), while write_label_cog took them."""
    import dask.array as da

    src = _case_oblique(tmp_path)
    store = ingest_nifti(src, tmp_path / "s.zarr", chunk=16)
    labels = _threshold(store.image)
    lazy = da.from_array(labels, chunks=(5, 7, 9))
    out = write_label_nifti(lazy, store.meta.geometry, tmp_path / "d.nii.gz", classes=CLASSES)
    plain = write_label_nifti(labels, store.meta.geometry, tmp_path / "p.nii.gz", classes=CLASSES)
    assert np.array_equal(np.asarray(nib.load(out).dataobj), np.asarray(nib.load(plain).dataobj))


def test_export_from_zarr_labels_big_endian_uint16(tmp_path: Path) -> None:
    """Labels read from a chunked zarr array, past 255 classes, into a big-endian header."""
    src = _case_big_endian(tmp_path)
    geom = ingest_nifti(src, tmp_path / "s.zarr", chunk=8).meta.geometry
    classes = [*CLASSES, LabelClass(value=300, name="many")]
    k, j, i = 33, 18, 20
    values = np.random.default_rng(3).choice([0, 1, 300], size=(k, j, i)).astype(np.uint16)
    arr = zarr.create_array(store=str(tmp_path / "labels.zarr"), shape=values.shape, dtype="uint16", chunks=(5, 7, 9))
    arr[:] = values
    out = write_label_nifti(arr, geom, tmp_path / "l.nii", classes=classes, provenance=PROVENANCE)
    got = nib.load(out)
    assert got.header.endianness == ">"
    assert got.get_data_dtype() == np.dtype(">u2")
    assert np.array_equal(np.asanyarray(got.dataobj), values.transpose(2, 1, 0))
    assert (float(got.header["cal_min"]), float(got.header["cal_max"])) == (0.0, 300.0)
    texts = [e.get_content().decode() for e in got.header.extensions]
    assert texts[1] == slicer_color_table(classes)


def test_gzip_export_is_reproducible(tmp_path: Path) -> None:
    src = _case_oblique(tmp_path)
    store = ingest_nifti(src, tmp_path / "s.zarr", chunk=16)
    labels = _threshold(store.image)
    a = write_label_nifti(labels, store.meta.geometry, tmp_path / "a.nii.gz", classes=CLASSES, provenance=PROVENANCE)
    b = write_label_nifti(labels, store.meta.geometry, tmp_path / "b.nii.gz", classes=CLASSES, provenance=PROVENANCE)
    assert a.read_bytes() == b.read_bytes()
    table, _ = write_label_tables(tmp_path / "a", CLASSES)
    assert table.name == "a.ctbl" and table.read_text() == slicer_color_table(CLASSES)


def test_export_failures(tmp_path: Path) -> None:
    src = _case_oblique(tmp_path)
    store = ingest_nifti(src, tmp_path / "s.zarr", chunk=16)
    geom, labels = store.meta.geometry, _threshold(store.image)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    targets = [blocker / "out.nii.gz", tmp_path / "missing" / "out.nii"]
    for target in targets:
        with pytest.raises(ExportError) as err:
            write_label_nifti(labels, geom, target, classes=CLASSES)
        _assert_one_line_naming(err, target)
    with pytest.raises(ExportError) as err:
        write_label_nifti(labels[:-1], geom, tmp_path / "short.nii", classes=CLASSES)
    _assert_one_line_naming(err, tmp_path / "short.nii")
    too_big = labels.astype(np.int32) * 400
    with pytest.raises(ExportError) as err:
        write_label_nifti(too_big, geom, tmp_path / "big.nii", classes=CLASSES)
    _assert_one_line_naming(err, tmp_path / "big.nii")
    with pytest.raises(ExportError):
        write_label_nifti(labels, geom, tmp_path / "labels.mgz", classes=CLASSES)
    leftovers = {p.name for p in tmp_path.iterdir()} - {"oblique.nii", "s.zarr", "file"}
    assert leftovers == set()


# --------------------------------------------------------------------------- real files

REAL = ["anatomical.nii", "example4d.nii.gz", "standard.nii.gz", "example_nifti2.nii.gz", "functional.nii"]


@pytest.mark.parametrize("name", REAL)
def test_real_files_round_trip(tmp_path: Path, name: str) -> None:
    src = DATA / "nifti" / name
    if not src.exists():
        pytest.skip(f"real test data absent: {src}")
    img = nib.load(src)
    store = open_image_store(ingest_nifti(src, tmp_path / "store.zarr", chunk=16).path)
    expected = _expected(src)
    assert np.array_equal(store.image[:], expected.astype(store.image.dtype))
    geom = store.meta.geometry
    assert tuple(geom.orientation) == nib.aff2axcodes(img.affine)
    labels = _threshold(store.image)
    out = write_label_nifti(labels, geom, tmp_path / "labels.nii.gz", classes=CLASSES, provenance=PROVENANCE)
    _assert_same_grid(img, out)
    _assert_label_file(out, labels)


def test_real_file_properties(tmp_path: Path) -> None:
    """What the data README promises, as the store records it."""
    if not (DATA / "nifti").exists():
        pytest.skip(f"real test data absent: {DATA / 'nifti'}")
    anat = ingest_nifti(DATA / "nifti" / "anatomical.nii", tmp_path / "a.zarr").meta.geometry
    assert anat.orientation == ["L", "A", "S"] and anat.dtype == "int16"
    std = ingest_nifti(DATA / "nifti" / "standard.nii.gz", tmp_path / "s.zarr").meta.geometry
    assert (std.qform_code, std.sform_code) == (0, 2)
    n2 = ingest_nifti(DATA / "nifti" / "example_nifti2.nii.gz", tmp_path / "n.zarr")
    assert n2.meta.geometry.nifti_version == 2 and n2.meta.source.format == "NIfTI-2"
    assert n2.image.shape == (2, 12, 20, 32)
    func = ingest_nifti(DATA / "nifti" / "functional.nii", tmp_path / "f.zarr")
    assert func.image.dtype == np.float32  # scl_slope/inter are set in this file


@pytest.mark.parametrize(
    ("name", "error"),
    [("anatomical.truncated.nii", CorruptInputError), ("nifti1.hdr", CorruptInputError)],
)
def test_real_bad_files(tmp_path: Path, name: str, error: type[InputError]) -> None:
    src = DATA / "bad" / name
    if not src.exists():
        pytest.skip(f"real test data absent: {src}")
    store = tmp_path / "store.zarr"
    with pytest.raises(error) as err:
        ingest_nifti(src, store)
    _assert_one_line_naming(err, src)
    assert not store.exists()


# --------------------------------------------------------------------------- generated bad inputs


def _bad_text_gz(tmp: Path) -> Path:
    path = tmp / "text.nii.gz"
    path.write_text("this is not gzip, nor NIfTI\n")
    return path


def _bad_empty(tmp: Path) -> Path:
    path = tmp / "empty.nii"
    path.write_bytes(b"")
    return path


def _bad_huge(tmp: Path) -> Path:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4096, 4096, 4096))
    hdr.set_data_dtype(np.int16)
    return _write_raw(tmp / "huge.nii", hdr, b"\0" * 64)


def _bad_singular(tmp: Path) -> Path:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4, 4, 4))
    hdr.set_data_dtype(np.int16)
    hdr.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=2)
    return _write_raw(tmp / "singular.nii", hdr, b"\0" * 128)


def _bad_zero_dim(tmp: Path) -> Path:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4, 4, 4))
    hdr["dim"][2] = 0
    return _write_raw(tmp / "zero_dim.nii", hdr, b"\0" * 128)


def _bad_nan(tmp: Path) -> Path:
    data = np.zeros((6, 5, 40), np.float32)
    data[1, 1, 1] = np.nan
    data[2, 3, 39] = np.inf  # in the last z-slab: counted even after the first refusal
    return _save(nib.Nifti1Image(data, np.eye(4)), tmp / "nan.nii")


def _bad_complex(tmp: Path) -> Path:
    return _save(nib.Nifti1Image(np.zeros((4, 4, 4), np.complex64), np.eye(4)), tmp / "complex.nii")


def _bad_truncated_gz(tmp: Path) -> Path:
    whole = _save(nib.Nifti1Image(_volume((30, 30, 30)), np.eye(4)), tmp / "whole.nii.gz").read_bytes()
    path = tmp / "truncated.nii.gz"
    path.write_bytes(whole[: len(whole) // 2])
    return path


def _bad_analyze(tmp: Path) -> Path:
    nib.save(nib.AnalyzeImage(np.zeros((4, 4, 4), np.int16), np.eye(4)), tmp / "analyze.img")
    return tmp / "analyze.hdr"


def _bad_missing(tmp: Path) -> Path:
    return tmp / "missing.nii"


def _bad_directory(tmp: Path) -> Path:
    path = tmp / "x.nii"
    path.mkdir()
    return path


def _bad_suffix(tmp: Path) -> Path:
    path = tmp / "volume.mgz"
    path.write_bytes(b"\0" * 400)
    return path


BAD = {
    "text_gz": (_bad_text_gz, CorruptInputError),
    "empty": (_bad_empty, CorruptInputError),
    "huge": (_bad_huge, CorruptInputError),
    "singular": (_bad_singular, InvalidInputError),
    "zero_dim": (_bad_zero_dim, InvalidInputError),
    "nan": (_bad_nan, InvalidInputError),
    "complex": (_bad_complex, InvalidInputError),
    "truncated_gz": (_bad_truncated_gz, CorruptInputError),
    "analyze": (_bad_analyze, UnsupportedFormatError),
    "suffix": (_bad_suffix, UnsupportedFormatError),
    "missing": (_bad_missing, InputError),
    "directory": (_bad_directory, InputError),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs(tmp_path: Path, case: str) -> None:
    make, error = BAD[case]
    src = make(tmp_path)
    store = tmp_path / "store.zarr"
    with pytest.raises(error) as err:
        ingest_nifti(src, store, chunk=8)
    assert isinstance(err.value, InputError)
    _assert_one_line_naming(err, src)
    assert not store.exists()
    if case == "nan":
        assert "contains 2 NaN/Inf voxels" in str(err.value)


def test_store_write_failure_is_a_store_error(tmp_path: Path) -> None:
    src = _case_oblique(tmp_path)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the store's parent directory should be")
    with pytest.raises(StoreError) as err:
        ingest_nifti(src, blocker / "store.zarr")
    assert "\n" not in str(err.value) and "store.zarr" in str(err.value)


def test_a_broken_qform_beside_the_sform_is_not_written_on_as_valid(tmp_path: Path) -> None:
    """pixdim[2] NaN, qform code 1, a valid sform: segmented on the sform's grid (right), but the label file kept
    qform code 1 and the NaN, so a reader that prefers the qform got NaN geometry."""
    raw = _volume((10, 12, 14))
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(raw.shape)
    hdr.set_data_dtype(np.int16)
    hdr.set_sform(_oblique(), code=2)
    hdr.set_qform(_oblique(), code=1)
    hdr["pixdim"][2] = np.nan
    src = _write_raw(tmp_path / "nan_qform.nii", hdr, raw.tobytes(order="F"))
    store = ingest_nifti(src, tmp_path / "store.zarr", chunk=16)
    out = write_label_nifti(_threshold(store.image), store.meta.geometry, tmp_path / "labels.nii.gz",
                            classes=CLASSES, provenance=PROVENANCE)
    got = nib.load(out).header
    assert int(got["qform_code"]) == 0 and int(got["sform_code"]) == 2
    np.testing.assert_allclose(got.get_sform(), _oblique(), atol=1e-5)
    np.testing.assert_allclose(got["pixdim"][1:4], np.linalg.norm(_oblique()[:3, :3], axis=0), rtol=1e-6)
    # a healthy qform beside an sform is kept, code and all (the round trips above)


def test_a_volume_without_qform_and_sform_codes_is_said_to_have_no_known_orientation(tmp_path: Path) -> None:
    """Both codes 0 (an Analyze-style header): segmented silently, with statistics' boxes labelled "RAS" and
    pictures lettered L/R on nibabel's default; now a warning in the run's lines and statistics."""
    from flows.config import SegmentOptions
    from flows.inputnotes import input_warnings
    from tests.models import tiny_model

    model = tiny_model(tmp_path / "m", spatial_dims=3, channels=1, roi=[8, 8, 8])
    bare = nib.Nifti1Image(_volume((12, 12, 10)), np.diag([0.9, 0.9, 3.0, 1.0]))
    bare.set_qform(None, code=0)
    bare.set_sform(None, code=0)
    coded = nib.Nifti1Image(_volume((12, 12, 10)), np.diag([0.9, 0.9, 3.0, 1.0]))
    notes = {}
    for name, img in (("bare", bare), ("coded", coded)):
        src = _save(img, tmp_path / f"{name}.nii.gz")
        store = ingest_nifti(src, tmp_path / f"{name}.zarr", chunk=16)
        notes[name] = input_warnings(src, store, model, SegmentOptions(), announce=False)
    assert notes["coded"] == []
    assert notes["bare"] == [f"{tmp_path / 'bare.nii.gz'}: has neither a qform nor an sform code, so its orientation "
                             "is unknown: read as nibabel reads it (RAS, pixdim spacing); left and right in its "
                             "pictures and bounding boxes are a guess"]
