"""Quicklooks as outputs of a run: ``SegmentOptions(quicklook=True)`` writes ``<stem>.quicklook.png`` beside each
label output, lists it among the outputs and in the provenance (so ``segflow verify`` hashes it), with exact
areas and volumes from the run's label histogram in the legend."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.batch import segment_inputs
from flows.config import SegmentOptions
from storage import samples
from storage.provenance import verify_sidecar
from tests.models import tiny_model


@pytest.mark.slow
def test_a_run_writes_quicklooks_with_its_outputs(tmp_path):
    scene, _ = samples.make_scene(tmp_path / "scene.tif", size=(160, 192), seed=3)
    phantom, _ = samples.make_phantom(tmp_path / "head.nii.gz", shape=(40, 40, 24), seed=3)
    raster_model = tiny_model(tmp_path / "m2", spatial_dims=2, channels=4, roi=[64, 64])
    volume_model = tiny_model(tmp_path / "m3", spatial_dims=3, channels=1, roi=[16, 16, 16])
    out = tmp_path / "out"
    options = SegmentOptions(quicklook=True, keep_zarr=False, workers=1)
    outcomes = segment_inputs([str(scene)], str(raster_model.path), str(out), options)
    outcomes += segment_inputs([str(phantom)], str(volume_model.path), str(out), options)
    assert all(o["ok"] for o in outcomes), outcomes
    for outcome, stem in zip(outcomes, ("scene", "head")):
        picture = out / f"{stem}.quicklook.png"
        assert str(picture) in outcome["outputs"]
        with Image.open(picture) as im:
            assert im.format == "PNG" and im.width >= 200 and im.height >= 150
            assert len(set(im.convert("RGB").getdata())) > 20  # a picture, not a blank page
        sidecar = out / f"{stem}.provenance.json"
        assert picture.name in json.dumps(json.loads(sidecar.read_text()))
        assert verify_sidecar(sidecar) == []


@pytest.mark.slow
def test_segment_quicklook_truth_and_run_report(tmp_path):
    """``segflow segment --quicklook --truth DIR``: the picture, the scores against the same-named truth, and the
    run's report (JSON and its HTML page, which shows the picture)."""
    from flows.cli import app

    scene, truth = samples.make_scene(tmp_path / "scene.tif", size=(128, 160), seed=4)
    (tmp_path / "truth").mkdir()
    shutil.copy(truth, tmp_path / "truth" / "scene.tif")
    model = tiny_model(tmp_path / "m2", spatial_dims=2, channels=4, roi=[64, 64], classes=5)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["segment", str(scene), "--model", str(model.path), "--out", str(out),
                                      "--quicklook", "--truth", str(tmp_path / "truth"), "--no-prefect"])
    assert result.exit_code == 0, result.output
    assert (out / "scene.quicklook.png").is_file()
    scores = json.loads((out / "evaluation" / "evaluation.json").read_text())
    assert [c["name"] for c in scores["cases"][0]["classes"]][:2] == ["class0", "class1"]  # the card's names
    assert all(0.0 <= c["dice"] <= 1.0 for c in scores["cases"][0]["classes"] if c["dice"] is not None)
    pages = list((out / "reports").glob("segment-*.html"))
    assert len(pages) == 1 and pages[0].with_suffix(".json").is_file()
    assert pages[0].read_text().count("data:image/png;base64,") == 1  # the quicklook, inline
