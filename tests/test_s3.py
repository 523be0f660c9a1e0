"""Inputs and outputs as ``s3://`` URLs, against a local S3-compatible server (moto, on loopback).

segflow finds the server the way a user points it at MinIO or Ceph: through
the standard ``AWS_ENDPOINT_URL`` variable and dummy credentials in the
environment; nothing in segflow knows it is under test.  The runs:

- ``segflow segment`` (the CLI, in this process) of a GeoTIFF and a corrupt
  object in one batch, and of a NIfTI, from ``s3://`` to ``s3://``;
- the same inputs from local files to a local folder, for comparison;
- an upload that fails at the sidecar (the commit point);
- ``segflow nightly`` over an ``s3://`` inbox into an ``s3://`` output prefix,
  twice: the rerun skips both inputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import rasterio
from typer.testing import CliRunner

from flows.config import SegmentOptions
from flows.nightly import nightly, nightly_report
from flows.staging import STAGING_ENV, segment_staged
from storage import remote, samples
from storage.errors import ExportError
from tests.models import tiny_model

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

BUCKET = "segflow-test"
S3 = f"s3://{BUCKET}"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (a free port), with the environment a user would set for MinIO."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    staging = tmp_path_factory.mktemp("staging")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        mp.setenv(STAGING_ENV, str(staging))
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        fs, _ = remote.filesystem(S3)
        fs.mkdir(BUCKET)
        yield {"fs": fs, "staging": staging}
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.fixture(scope="module")
def data(s3, tmp_path_factory):
    root = tmp_path_factory.mktemp("s3-data")
    scene, _ = samples.make_scene(root / "scene.tif", size=(112, 96), seed=3, nodata_margin=8)
    head, _ = samples.make_phantom(root / "head.nii.gz", shape=(36, 32, 20), seed=4)
    broken = root / "broken.tif"
    broken.write_bytes(scene.read_bytes()[:3000])  # header intact, tiles cut off
    for f in (scene, head, broken):
        remote.upload(f, f"{S3}/in/{f.name}")
    m2d = tiny_model(root / "m2d", spatial_dims=2, channels=4, roi=[32, 32], seed=1)
    m3d = tiny_model(root / "m3d", spatial_dims=3, channels=1, roi=[16, 16, 16], seed=2)
    return {"root": root, "scene": scene, "head": head, "m2d": m2d, "m3d": m3d}


@pytest.fixture(scope="module")
def runs(s3, data, dask_cluster):
    """`segflow segment` from and to S3 (the CLI, in process: its flow uses the test's Dask cluster)."""
    from flows.cli import app

    cli = CliRunner()
    batch = cli.invoke(app, ["segment", f"{S3}/in/scene.tif", f"{S3}/in/broken.tif", "--model",
                             str(data["m2d"].path), "--out", f"{S3}/out/"])
    volume = cli.invoke(app, ["segment", f"{S3}/in/head.nii.gz", "--model", str(data["m3d"].path),
                              "--out", f"{S3}/out"])
    local = data["root"] / "local-out"
    for image, model in ((data["scene"], data["m2d"]), (data["head"], data["m3d"])):
        segment_staged(image, model, local, SegmentOptions(), dask_cluster)
    return {"batch": batch, "volume": volume, "local": local}


def _objects(prefix: str) -> list[str]:
    return [rel for rel, _ in remote.tree_files(prefix)] if remote.exists(prefix) else []


def _staging_files(s3) -> list[Path]:
    return [p for p in Path(s3["staging"]).rglob("*")]


def _download(url: str, target: Path) -> Path:
    return remote.download(url, target)


def test_segment_from_s3_to_s3_matches_a_local_run(s3, data, runs, tmp_path):
    batch, volume = runs["batch"], runs["volume"]
    assert batch.exit_code == 1, batch.output
    errors = [line for line in batch.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"{S3}/in/broken.tif:" in errors[0], batch.output
    assert f"ok {S3}/in/scene.tif -> {S3}/out/scene.tif" in batch.output
    assert volume.exit_code == 0, volume.output

    names = _objects(f"{S3}/out")
    for stem, ext in (("scene", ".tif"), ("head", ".nii.gz")):
        assert f"{stem}{ext}" in names and f"{stem}.provenance.json" in names
        assert any(n.startswith(f"{stem}.zarr/") for n in names)
    assert not any("broken" in n for n in names)  # the corrupt input left nothing behind
    assert not any(n.startswith(".segflow-work") for n in names)
    assert _staging_files(s3) == []  # nothing left in the local staging folder
    assert not (runs["local"] / ".segflow-work").exists()

    # the labels and georeferencing equal those of the same run on local files
    cog = _download(f"{S3}/out/scene.tif", tmp_path / "scene.tif")
    with rasterio.open(cog) as got, rasterio.open(runs["local"] / "scene.tif") as want:
        assert np.array_equal(got.read(), want.read())
        assert got.transform == want.transform and got.crs == want.crs and got.nodata == want.nodata
        assert got.colormap(1) == want.colormap(1) and got.overviews(1) == want.overviews(1)
        embedded = json.loads(got.tags()["SEGFLOW_PROVENANCE"])
    assert embedded["input"]["path"] == f"{S3}/in/scene.tif"
    nii = _download(f"{S3}/out/head.nii.gz", tmp_path / "head.nii.gz")
    got_img, want_img = nib.load(str(nii)), nib.load(str(runs["local"] / "head.nii.gz"))
    assert np.array_equal(np.asarray(got_img.dataobj), np.asarray(want_img.dataobj))
    assert np.allclose(got_img.affine, want_img.affine)
    assert got_img.header.get_sform(coded=True)[1] == want_img.header.get_sform(coded=True)[1]

    # the sidecar names the URL, the content's sha256, and the uploaded outputs' hashes
    for stem, source in (("scene", data["scene"]), ("head", data["head"])):
        record = json.loads(remote.read_bytes(f"{S3}/out/{stem}.provenance.json"))
        assert record["input"]["path"] == f"{S3}/in/{source.name}"
        assert record["input"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
        main = f"{stem}.tif" if stem == "scene" else f"{stem}.nii.gz"
        assert record["outputs"][main] == remote.sha256_url(f"{S3}/out/{main}")
        extras = {f"{stem}.statistics.json", f"{stem}.ctbl", f"{stem}.itksnap.txt"} if stem == "head" else \
            {f"{stem}.stac.json", f"{stem}.qml"}
        assert set(record["outputs"]) == {main, f"{stem}.zarr"} | extras  # a volume also has its statistics

    # `segflow verify` of an output URL: downloads, checks every hash (the input's too, from S3)
    from flows.cli import app

    result = CliRunner().invoke(app, ["verify", f"{S3}/out/scene.tif"])
    assert result.exit_code == 0, result.output
    assert f"verified {S3}/out/scene.provenance.json" in result.output and "unverified" not in result.output


def test_a_failed_upload_leaves_no_output_and_no_sidecar(s3, data, runs, dask_cluster, monkeypatch):
    real_upload = remote.upload

    def failing_upload(local, url):  # noqa: ANN001, ANN202
        if url.endswith(".provenance.json"):
            raise ConnectionError("connection reset while uploading")
        return real_upload(local, url)

    monkeypatch.setattr(remote, "upload", failing_upload)
    with pytest.raises(ExportError, match="cannot upload.*nothing of this input was left"):
        segment_staged(f"{S3}/in/scene.tif", data["m2d"], f"{S3}/failed/", SegmentOptions(), dask_cluster)
    assert _objects(f"{S3}/failed") == []
    assert _staging_files(s3) == []


def test_nightly_over_an_s3_inbox_processes_then_skips(s3, data, runs):
    for f in (data["scene"], data["head"]):
        remote.upload(f, f"{S3}/inbox/{f.name}")
    remote.write_bytes(f"{S3}/inbox/notes.txt", b"not an input")
    kwargs = {"model_dirs": [str(data["m2d"].path), str(data["m3d"].path)], "out_dir": f"{S3}/nightly/",
              "inbox": f"{S3}/inbox/", "retries": 0, "return_state": True}
    first = nightly_report(nightly(**kwargs))
    second = nightly_report(nightly(**kwargs))
    assert {r["input"]: r["status"] for r in first["inputs"]} == {f"{S3}/inbox/scene.tif": "done",
                                                                  f"{S3}/inbox/head.nii.gz": "done"}
    assert first["run"]["ignored"] == [f"{S3}/inbox/notes.txt"]
    assert {r["status"] for r in second["inputs"]} == {"skipped"}, second["inputs"]
    for r in second["inputs"]:
        assert r["outputs"] and all(o.startswith(f"{S3}/nightly/") for o in r["outputs"])
        assert r["labels"]  # carried over from the run that made the outputs
    names = _objects(f"{S3}/nightly")
    assert sum(n.startswith(".segflow-cache/") for n in names) == 2
    assert sum(n.startswith("reports/") for n in names) == 4
    report = json.loads(remote.read_bytes(second["report"]["json"]))
    assert report["report"]["json"] == second["report"]["json"] and report["run"]["out_dir"] == f"{S3}/nightly"
    assert _staging_files(s3) == []


def test_inbox_manifest_and_input_errors_name_urls(s3, tmp_path):
    """Listing, manifests and staging-in errors, without running a model."""
    from flows.nightly import list_inbox, read_manifest
    from flows.staging import staged_input
    from storage.errors import InputError

    for name in ("a.tif", "a.tif.msk", "v.hdr", "v.img", ".hidden.tif", "r.txt"):
        remote.write_bytes(f"{S3}/box/{name}", b"II*\0" + bytes(64))
    inputs, ignored = list_inbox(f"{S3}/box/")
    assert inputs == [f"{S3}/box/a.tif", f"{S3}/box/v.hdr"]
    assert ignored == [f"{S3}/box/a.tif.msk", f"{S3}/box/r.txt"]
    remote.write_bytes(f"{S3}/lists/tonight.json", json.dumps(["../box/a.tif", "s3://other/b.nii.gz"]).encode())
    assert read_manifest(f"{S3}/lists/tonight.json") == [f"{S3}/box/a.tif", "s3://other/b.nii.gz"]

    with staged_input(f"{S3}/box/v.hdr", tmp_path) as local:  # an Analyze pair travels together
        assert sorted(p.name for p in Path(local).parent.iterdir()) == ["v.hdr", "v.img"]
    with staged_input(f"{S3}/box/a.tif", tmp_path) as local:  # and a GeoTIFF's mask
        assert sorted(p.name for p in Path(local).parent.iterdir()) == ["a.tif", "a.tif.msk"]
    assert list(tmp_path.iterdir()) == []  # the copies are gone
    for url, problem in ((f"{S3}/box/missing.tif", "no such object"), (f"{S3}/box", "is a prefix"),
                         ("s3://no-such-bucket/x.tif", "no such object")):
        with pytest.raises(InputError, match=problem) as caught, staged_input(url, tmp_path):
            pass
        assert str(caught.value).startswith(f"{url}: ")

    # an error about the copy names the URL, however the copy's path was written: `--out out` is relative, and a
    # reader that resolved it (the STAC item reader) named the copy by its absolute path
    from storage.errors import CorruptInputError

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        for form in (Path, lambda p: Path(p).absolute()):
            with pytest.raises(CorruptInputError) as caught, staged_input(f"{S3}/box/a.tif", "out") as local:
                raise CorruptInputError(form(local), f"damaged near {form(local)}")
            assert str(caught.value) == f"{S3}/box/a.tif: damaged near {S3}/box/a.tif"


def test_an_item_url_with_relative_hrefs_reads_its_assets_beside_it_on_s3(s3, dask_cluster, tmp_path):
    """A STAC item under a URL whose asset hrefs are relative and which has no self link: the staged copy's
    hrefs resolve beside the URL it came from, and GDAL reads the ``s3://`` assets from the server fsspec
    uses (``AWS_ENDPOINT_URL``, as ``storage.rasteropen.s3_endpoint_options`` passes it on); labels equal
    those of the same item read from local files.  As a nightly input beside other files, the item is
    listed, routed and keyed by its assets (the JSON alone names them, the key checks their content)."""
    from tests import s2_samples

    item = s2_samples.write_item(tmp_path / "scene", size=64, item_id="S2_on_s3")
    doc = json.loads(item.read_text())
    doc["links"] = []  # no self link: only where the item was read from says where its assets are
    item.write_text(json.dumps(doc))
    for f in sorted((tmp_path / "scene").iterdir()):
        remote.upload(f, f"{S3}/items/scene/{f.name}")
    model = tiny_model(tmp_path / "m", spatial_dims=2, channels=4, roi=[32, 32], seed=5,
                       channel_names=["blue", "green", "red", "nir"])
    url = f"{S3}/items/scene/item.json"
    outcome = segment_staged(url, model, str(tmp_path / "out"), SegmentOptions(), dask_cluster)
    local = segment_staged(str(item), model, str(tmp_path / "local"), SegmentOptions(), dask_cluster)
    assert outcome.ok and local.ok and outcome.input == url
    with rasterio.open(tmp_path / "out" / "S2_on_s3.tif") as got, \
            rasterio.open(tmp_path / "local" / "S2_on_s3.tif") as want:
        assert np.array_equal(got.read(), want.read()) and got.transform == want.transform
    record = json.loads((tmp_path / "out" / "S2_on_s3.provenance.json").read_text())
    assert record["input"]["path"] == url
    hrefs = {a["key"]: a["href"] for a in record["input"]["stac_item"]["assets"]}
    assert hrefs == {k: f"{S3}/items/scene/{s2_samples.BANDS[k][0]}.tif" for k in ("blue", "green", "red", "nir")}

    # a nightly inbox: the item's assets are one folder up
    doc["assets"] = {k: dict(a, href=f"../scene/{Path(a['href']).name}") for k, a in doc["assets"].items()}
    remote.write_bytes(f"{S3}/items/scene-box/item.json", json.dumps(doc).encode())
    remote.write_bytes(f"{S3}/items/scene-box/list.json", b"[1, 2]")
    kwargs = {"model_dirs": [str(model.path)], "out_dir": str(tmp_path / "nightly"),
              "inbox": f"{S3}/items/scene-box/", "retries": 0, "return_state": True}
    first = nightly_report(nightly(**kwargs))
    assert [(r["input"], r["status"]) for r in first["inputs"]] == [(f"{S3}/items/scene-box/item.json", "done")]
    assert first["run"]["ignored"] == [f"{S3}/items/scene-box/list.json"]
    with rasterio.open(tmp_path / "nightly" / "S2_on_s3.tif") as got, \
            rasterio.open(tmp_path / "local" / "S2_on_s3.tif") as want:
        assert np.array_equal(got.read(), want.read())
    second = nightly_report(nightly(**kwargs))
    assert [r["status"] for r in second["inputs"]] == ["skipped"], second["inputs"]
    assert _staging_files(s3) == []
