"""End to end on real files: a Prefect flow run over a real Dask cluster, outputs on exactly the input grid."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import rasterio
import zarr
from rio_cogeo.cogeo import cog_validate

from flows.config import SegmentOptions
from flows.flows import batch_outcomes, segment, segment_batch
from segmentation import precision
from segmentation.windows import make_grid
from storage.hashing import sha256_file
from storage.provenance import sidecar_path, verify_sidecar
from tests.conftest import shared
from tests.models import tiny_model

RASTERS = ["geotiff/RGB.byte.tif", "geotiff/rgb_lzw.tif", "geotiff/cogeo.tif", "geotiff/shade.tif"]
VOLUMES = ["nifti/anatomical.nii", "nifti/example4d.nii.gz", "nifti/standard.nii.gz"]
BAD = ["bad/corrupt.tif", "bad/RGB.byte.truncated.tif", "bad/empty.tif", "bad/anatomical.truncated.nii",
       "bad/nifti1.hdr", "bad/CT_small.truncated.dcm", "bad/MR_truncated.dcm"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {(d, c): tiny_model(root / f"m{d}d{c}", spatial_dims=d, channels=c) for d, c in
            [(2, 3), (2, 1), (3, 1), (3, 2)]}


def _model_for(models, path):
    if path.name.endswith((".tif", ".tiff")):
        with rasterio.open(path) as src:
            return models[(2, src.count)]
    img = nib.load(str(path))
    return models[(3, img.shape[3] if img.ndim == 4 else 1)]


def _check_raster(src_path, out_path, nodata_label):
    with rasterio.open(src_path) as src, rasterio.open(out_path) as out:
        assert out.crs == src.crs
        assert out.transform == src.transform
        assert (out.width, out.height) == (src.width, src.height)
        assert out.nodata == nodata_label
        assert out.dtypes[0] == "uint8"
        assert out.colormap(1)[1][:3] == (40, 215, 128)
        assert [c["name"] for c in json.loads(out.tags()["CLASSES"])] == ["class0", "class1", "class2"]
        labels = out.read(1)
        valid = src.dataset_mask() > 0
    assert np.all(labels[~valid] == nodata_label)
    assert np.all(labels[valid] < 3)
    ok, errors, _ = cog_validate(str(out_path))
    assert ok, errors


def _check_volume(src_path, out_path):
    src, out = nib.load(str(src_path)), nib.load(str(out_path))
    assert out.shape == src.shape[:3]
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-6)
    for code in ("qform_code", "sform_code"):
        assert int(out.header[code]) == int(src.header[code])
    np.testing.assert_allclose(out.header.get_qform(), src.header.get_qform(), atol=1e-6)
    np.testing.assert_allclose(out.header.get_sform(), src.header.get_sform(), atol=1e-6)
    assert out.get_data_dtype() == np.uint8
    assert int(out.header["intent_code"]) == 1002
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1, 2}


def _check_provenance(src_path, out_path, model):
    record = json.loads(sidecar_path(out_path).read_text())
    assert record["input"]["sha256"] == sha256_file(src_path)
    assert record["model"]["weights_sha256"] == sha256_file(model.path / "weights.safetensors")
    assert record["statistics"]["windows_evaluated"] + record["statistics"]["windows_skipped"] == \
        record["statistics"]["windows_total"]
    for key in ("torch", "monai", "zarr", "rasterio", "nibabel", "dask", "prefect"):
        assert record["environment"]["versions"][key]
    assert record["parameters"]["roi"] == model.card.inference.roi
    fast = record["parameters"]["precision"] == "fast"
    assert record["parameters"]["compute"] == ("float32" if not fast else "bfloat16 autocast"
                                               if precision.cpu_has_bf16()
                                               else "float32 (this CPU has no bf16 instructions)")
    assert verify_sidecar(sidecar_path(out_path)) == []
    embedded = zarr.open_group(str(out_path.parent / (sidecar_path(out_path).name.split(".provenance")[0] + ".zarr")),
                               mode="r").attrs["provenance"]
    assert embedded["input"] == record["input"]


@pytest.mark.parametrize("relative", RASTERS + VOLUMES)
def test_output_grid_equals_input_grid(relative, models, tmp_path, dask_cluster):
    src = shared(relative)
    model = _model_for(models, src)
    state = segment_batch(inputs=[str(src)], model_dir=str(model.path), out_dir=str(tmp_path),
                          options=SegmentOptions(chunk_size=256 if src.suffix == ".tif" else 16),
                          return_state=True)
    [outcome] = batch_outcomes(state)
    assert state.is_completed() and outcome["ok"], outcome
    out = tmp_path / outcome["outputs"][0].split("/")[-1]
    if src.suffix == ".tif":
        _check_raster(src, out, 255)
    else:
        _check_volume(src, out)
    _check_provenance(src, out, model)
    assert not (tmp_path / ".segflow-work").exists()


def test_nodata_heavy_raster_skips_windows(models, tmp_path, dask_cluster):
    src = shared("geotiff/shade.tif")  # 88% nodata
    out = segment(input_path=str(src), model_dir=str(models[(2, 1)].path), out_dir=str(tmp_path),
                  options=SegmentOptions(chunk_size=256))
    stats = out["statistics"]
    with rasterio.open(src) as ds:
        valid = ds.dataset_mask() > 0
    grid = make_grid(valid.shape, models[(2, 1)].card.inference.roi, models[(2, 1)].card.inference.overlap)
    expected = sum(1 for w in grid if not valid[grid.slices(w)].any())
    assert expected > 0
    assert stats["windows_skipped"] == expected
    assert stats["windows_evaluated"] == len(grid) - expected


def test_bad_inputs_fail_alone_and_leave_nothing(models, tmp_path, dask_cluster):
    bad = [shared(p) for p in BAD]
    good = shared("geotiff/RGB.byte.tif")
    state = segment_batch(inputs=[str(p) for p in bad[:3]] + [str(good)] + [str(p) for p in bad[3:]],
                          model_dir=str(models[(2, 3)].path), out_dir=str(tmp_path), return_state=True)
    assert state.is_failed()
    outcomes = {o["input"]: o for o in batch_outcomes(state)}
    assert outcomes[str(good)]["ok"]
    for p in bad:  # a DICOM file is a series: named by the file and its series UID
        [o] = [v for k, v in outcomes.items() if k == str(p) or k.startswith(f"{p} [series ")]
        assert not o["ok"]
        assert str(p) in o["error"] and "\n" not in o["error"], o["error"]
    left = sorted(f.name for f in tmp_path.iterdir())
    assert left == ["RGB.byte.provenance.json", "RGB.byte.qml", "RGB.byte.stac.json", "RGB.byte.tif",
                    "RGB.byte.zarr"], left


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_probabilities_are_kept_in_zarr_and_as_a_cog(dtype, models, tmp_path, dask_cluster):
    src = shared("geotiff/RGB.byte.tif")
    out = segment(input_path=str(src), model_dir=str(models[(2, 3)].path), out_dir=str(tmp_path),
                  options=SegmentOptions(chunk_size=256, probabilities=dtype))
    assert [p.split("/")[-1] for p in out["outputs"]] == [
        "RGB.byte.tif", "RGB.byte.probabilities.tif", "RGB.byte.stac.json", "RGB.byte.qml",
        "RGB.byte.provenance.json", "RGB.byte.zarr"]
    group = zarr.open_group(str(tmp_path / "RGB.byte.zarr"), mode="r")
    stored = group["probabilities"]
    assert stored.dtype == np.dtype(dtype) and stored.shape == (3, 718, 791)
    with rasterio.open(tmp_path / "RGB.byte.probabilities.tif") as ds, rasterio.open(tmp_path / "RGB.byte.tif") as lab:
        probs = ds.read(masked=True).astype(np.float32) * (ds.scales[0] if dtype == "uint8" else 1.0)
        labels = lab.read(1)
        valid = labels != 255
        assert ds.count == 3 and [ds.descriptions[i] for i in range(3)] == ["class0", "class1", "class2"]
    assert np.all(probs.mask[:, ~valid]) and not probs.mask[:, valid].any()
    np.testing.assert_allclose(probs.sum(0)[valid], 1.0, atol=0.01)
    p = probs.filled(0)[:, valid]
    lab = labels[valid]
    picked = np.take_along_axis(p, lab[None].astype(np.int64), 0)[0]
    # the label is the class of highest probability, up to one quantisation step for uint8
    assert np.all(picked >= p.max(0) - (1.0 / 254 + 1e-6 if dtype == "uint8" else 1e-6))
    assert verify_sidecar(sidecar_path(tmp_path / "RGB.byte.tif")) == []


def test_a_rerun_with_fewer_outputs_removes_the_earlier_runs_extras(models, tmp_path, dask_cluster):
    """A run with --probabilities, a quicklook and polygons, then one without, into the same OUT: the earlier
    probability COG, picture and GeoPackage described the first run while the new sidecar and `verify` said nothing
    of them (a stale probability map disagreed with the new labels).  They go; a user's file beside them stays."""
    from storage.provenance import verify

    src = shared("geotiff/RGB.byte.tif")
    model = str(models[(2, 3)].path)
    first = segment(input_path=str(src), model_dir=model, out_dir=str(tmp_path),
                    options=SegmentOptions(chunk_size=256, probabilities="uint8", quicklook=True, vector="gpkg"))
    names = {p.split("/")[-1] for p in first["outputs"]}
    assert {"RGB.byte.probabilities.tif", "RGB.byte.quicklook.png", "RGB.byte.gpkg"} <= names, names
    (tmp_path / "RGB.byte.notes.txt").write_text("mine")
    second = segment(input_path=str(src), model_dir=model, out_dir=str(tmp_path),
                     options=SegmentOptions(chunk_size=256, keep_zarr=False))
    now = {p.split("/")[-1] for p in second["outputs"]}
    left = {p.name for p in tmp_path.iterdir() if p.name.startswith("RGB.byte")}
    assert left == now | {"RGB.byte.notes.txt"}, (left, now)
    report = verify(sidecar_path(tmp_path / "RGB.byte.tif"))
    assert not report.problems


def test_an_edited_sidecar_never_has_a_rerun_remove_the_input_or_a_users_file(tmp_path, dask_cluster, caplog):
    """The stale outputs a rerun removes were any plain names the earlier sidecar listed: a sidecar naming the
    input (in OUT) and a user's files had a rerun delete them.  Only this input's output names, holding what the
    sidecar recorded, go; an output edited since stays, and the run says so."""
    import logging
    import shutil

    from storage import samples

    model = tiny_model(tmp_path / "model", spatial_dims=2, channels=4, roi=[32, 32], seed=4)
    out = tmp_path / "out"
    out.mkdir()
    src, _ = samples.make_scene(tmp_path / "scene.tif", size=(64, 64), seed=5)
    shutil.copy(src, out / "scene.tiff")
    first = segment(input_path=str(out / "scene.tiff"), model_dir=str(model.path), out_dir=str(out),
                    options=SegmentOptions(probabilities="uint8", quicklook=True, keep_zarr=False))
    assert first["ok"], first
    (out / "notes.txt").write_text("mine")
    (out / "scene.nii.gz").write_text("mine, under a name an output of this input may have")
    with open(out / "scene.probabilities.tif", "ab") as f:  # an earlier output edited since
        f.write(b"edited")
    sidecar = out / "scene.provenance.json"
    record = json.loads(sidecar.read_text())
    # the input and a file of a name no output has, recorded with their own hashes; a user's file under an output's
    # name, with another hash (a sidecar copied in from another run)
    record["outputs"].update({name: sha256_file(out / name) for name in ("scene.tiff", "notes.txt")})
    record["outputs"]["scene.nii.gz"] = "0" * 64
    sidecar.write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING, logger="segflow"):
        second = segment(input_path=str(out / "scene.tiff"), model_dir=str(model.path), out_dir=str(out),
                         options=SegmentOptions(keep_zarr=False))
    assert second["ok"], second
    assert (out / "scene.tiff").read_bytes() == src.read_bytes()
    assert (out / "notes.txt").read_text() == "mine" and (out / "scene.nii.gz").is_file()
    assert (out / "scene.probabilities.tif").is_file()  # changed since: left, and said
    assert any("scene.probabilities.tif: an earlier run's output of this name has changed" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]
    assert not (out / "scene.quicklook.png").exists()  # unchanged and not written again: removed, as before


def test_crf_refines_probabilities_chunk_by_chunk_as_on_the_whole_image(tmp_path, dask_cluster):
    from segmentation import build_plan, load_model
    from segmentation.crf import CRFParams, mean_field
    from storage import samples
    from storage.ingest import ingest

    model = tiny_model(tmp_path / "model", spatial_dims=2, channels=4, roi=[32, 32], seed=4)
    src, _ = samples.make_scene(tmp_path / "scene.tif", size=(150, 130), seed=5)
    out = segment(input_path=str(src), model_dir=str(model.path), out_dir=str(tmp_path / "out"),
                  options=SegmentOptions(chunk_size=48, crf=True, crf_iterations=2, probabilities="float32"))
    assert out["ok"], out
    record = json.loads((tmp_path / "out" / "scene.provenance.json").read_text())
    assert record["parameters"]["crf"]["iterations"] == 2

    # the reference: the same stitched probabilities, refined in one piece
    store = ingest(src, tmp_path / "ref.zarr")
    image, mask = np.asarray(store.image[...]), np.asarray(store.mask[...])
    plan = build_plan(image, load_model(model.path), mask=mask, chunks=1000)
    probs = plan.probabilities().compute(scheduler="sync")
    refined = mean_field(probs, plan.normalizer(image), CRFParams(iterations=2), mask)
    expected = np.where(mask, refined.argmax(0), 255)
    with rasterio.open(tmp_path / "out" / "scene.tif") as ds:
        labels = ds.read(1)
    stored = np.asarray(zarr.open_group(str(tmp_path / "out" / "scene.zarr"), mode="r")["probabilities"][...])
    np.testing.assert_allclose(stored[:, mask], refined[:, mask], atol=1e-5)
    assert np.array_equal(labels, expected)
    # and the CRF did change the answer, so the comparison above means something
    assert np.mean(np.where(mask, probs.argmax(0), 255) != labels) > 0.001


def test_segment_one_and_save_model_say_what_they_take(models, tmp_path, dask_cluster):
    """Called from Python: a model path or a missing client were AttributeErrors from deep inside, and
    save_model wrote a card and weights into a folder of other things."""
    import pytest

    from flows.pipeline import segment_one
    from segmentation import save_model
    from storage.errors import ConfigError, ModelError

    model = next(iter(models.values()))
    with pytest.raises(ConfigError, match="segmentation.load_model"):
        segment_one(tmp_path / "x.tif", str(model.path), tmp_path / "out", SegmentOptions(), dask_cluster)
    with pytest.raises(ConfigError, match="a Dask client"):
        segment_one(tmp_path / "x.tif", model, tmp_path / "out", SegmentOptions(), None)
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "p1.py").write_text("print(1)")
    with pytest.raises(ModelError, match="is a folder of other files"):
        save_model(tmp_path / "scripts", model.card, model.module)
    assert sorted(p.name for p in (tmp_path / "scripts").iterdir()) == ["p1.py"]
