"""The nightly flow end to end: a real Prefect flow run over a real multi-process Dask cluster.

Six inputs in an inbox: 2 GeoTIFF scenes, 2 NIfTI phantoms, 1 truncated
GeoTIFF and 1 scene already segmented by ``segflow segment``.  The first run
processes the 4 new good inputs, fails the bad one alone and skips the done
one; a rerun processes nothing.  One scene's first read fails with EIO, the
way a flaky network mount fails: the I/O boundary (``sha256_input`` as the
nightly task calls it) is patched to raise ``OSError(EIO)`` once for that
file, and Prefect's retry runs it again; the truncated file is not retried.

A second inbox holds DICOM: a good 6x24x24 CT series folder, a series with a
missing slice and a folder with only an SR report.  The series is routed to
the 3D model, reported by its display name with mL and intensity statistics
per class, and skipped by a rerun and by a manifest naming its folder; the
other two fail alone.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from typer.testing import CliRunner

from flows import ledger
from flows.config import SegmentOptions
from flows.flows import segment
from flows.nightly import is_transient, nightly, nightly_report, read_manifest
from storage import samples
from storage.errors import ConfigError, CorruptInputError, SegflowError
from storage.hashing import sha256_file
from tests.models import tiny_model

GOOD_NEW = ["scene_a.tif", "scene_b.tif", "vol_a.nii.gz", "vol_b.nii.gz"]
BAD = "broken.tif"
DONE = "scene_c.tif"
FLAKY = "scene_b.tif"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("nightly-models")
    return {"2d": tiny_model(root / "scene-2d4", spatial_dims=2, channels=4, roi=[32, 32], seed=1),
            "3d": tiny_model(root / "vol-3d1", spatial_dims=3, channels=1, roi=[16, 16, 16], seed=2)}


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory, dask_cluster):
    root = tmp_path_factory.mktemp("nightly")
    inbox, gen, out = root / "inbox", root / "gen", root / "out"
    inbox.mkdir(), gen.mkdir()
    for i, name in enumerate(["scene_a", "scene_b", "scene_c"]):
        image, _ = samples.make_scene(gen / f"{name}.tif", size=(112, 96), seed=10 + i, nodata_margin=8)
        shutil.copy(image, inbox / image.name)
    for i, name in enumerate(["vol_a", "vol_b"]):
        image, _ = samples.make_phantom(gen / f"{name}.nii.gz", shape=(36, 32, 20), seed=20 + i)
        shutil.copy(image, inbox / image.name)
    (inbox / BAD).write_bytes((gen / "scene_a.tif").read_bytes()[:3000])  # header intact, tiles cut off
    (inbox / "README.txt").write_text("not an input")
    model_dirs = [str(models["2d"].path), str(models["3d"].path)]

    # one input done before, by `segment` (no cache entry yet: nightly adopts its verified outputs)
    segment(input_path=str(inbox / DONE), model_dir=model_dirs[0], out_dir=str(out), options=SegmentOptions())
    done_mtime = (out / DONE).stat().st_mtime_ns

    calls: dict[str, int] = {}

    def flaky_sha256(path):  # noqa: ANN001, ANN202
        calls[Path(path).name] = calls.get(Path(path).name, 0) + 1
        if Path(path).name == FLAKY and calls[FLAKY] == 1:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return sha256_file(path)

    t0 = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("flows.nightly_task.sha256_input", flaky_sha256)
        first = nightly(model_dirs=model_dirs, out_dir=str(out), inbox=str(inbox), retries=2,
                        retry_delay_seconds=0, return_state=True)
    first_seconds = time.perf_counter() - t0
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    t0 = time.perf_counter()
    second = nightly(model_dirs=model_dirs, out_dir=str(out), inbox=str(inbox), retries=2, retry_delay_seconds=0,
                     return_state=True)
    second_seconds = time.perf_counter() - t0
    print(f"nightly first run {first_seconds:.1f} s, rerun {second_seconds:.1f} s")
    return {"inbox": inbox, "out": out, "first": first, "second": second, "mtimes": mtimes,
            "done_mtime": done_mtime, "calls": calls}


def _by_name(report):
    return {Path(r["input"]).name: r for r in report["inputs"]}


def test_first_run_processes_new_inputs_isolates_the_bad_one_and_skips_the_done_one(runs, models):
    state = runs["first"]
    assert state.is_failed()
    assert state.message.startswith("1 of 6 inputs failed"), state.message
    report = nightly_report(state)
    got = _by_name(report)
    assert sorted(got) == sorted(GOOD_NEW + [BAD, DONE])  # README.txt ignored
    assert report["run"]["ignored"] == [str(runs["inbox"] / "README.txt")]
    assert {n: got[n]["status"] for n in got} == {**{n: "done" for n in GOOD_NEW}, BAD: "failed", DONE: "skipped"}
    assert report["run"]["counts"] == {"done": 4, "skipped": 1, "failed": 1, "no-model": 0}

    # routing by header: 4-band rasters to the 2D model, 1-channel volumes to the 3D one
    for n in GOOD_NEW + [DONE]:
        want = models["2d"] if n.endswith(".tif") else models["3d"]
        assert got[n]["model"] == want.name and got[n]["model_path"] == str(want.path)

    # the bad input: one line naming it, not retried; the EIO one retried once and done
    bad = got[BAD]
    assert str(runs["inbox"] / BAD) in bad["error"] and "\n" not in bad["error"], bad["error"]
    assert bad["attempts"] == 1 and bad["seconds"] > 0  # its seconds too (failed inputs had none)
    assert got[FLAKY]["attempts"] == 2 and runs["calls"][FLAKY] >= 2
    assert all(got[n]["attempts"] == 1 for n in GOOD_NEW if n != FLAKY)

    # the done one: untouched, its outputs adopted after verification
    assert (runs["out"] / DONE).stat().st_mtime_ns == runs["done_mtime"]
    assert "adopted" in got[DONE]["note"]

    for n in GOOD_NEW + [DONE]:
        r = got[n]
        assert all(Path(o).exists() for o in r["outputs"]) and r["outputs"]
        w = r["windows"]
        assert w["evaluated"] > 0 and w["evaluated"] + w["skipped"] == w["total"]
        assert r["timings"]["total_seconds"] > 0
    # nothing of the bad input left behind
    assert not any(p.name.startswith("broken") for p in runs["out"].iterdir())
    assert not (runs["out"] / ".segflow-work").exists()

    # the report files, JSON and Markdown
    json_path, md_path = Path(report["report"]["json"]), Path(report["report"]["markdown"])
    assert json_path.parent == runs["out"] / "reports" and json.loads(json_path.read_text())["inputs"]
    md = md_path.read_text()
    assert "1 of 6 inputs failed" in md and "| `scene_a.tif` | done |" in md and "## Errors" in md
    assert report["run"]["flow_run_id"] and report["run"]["dask_scheduler"].startswith("tcp://")
    html = Path(report["report"]["html"])  # the HTML page beside them (flows/htmlreport.py)
    assert html == json_path.with_suffix(".html") and "scene_a.tif" in html.read_text()


def test_report_areas_and_volumes_match_the_label_maps(runs, models):
    got = _by_name(nightly_report(runs["first"]))
    for n in ("scene_a.tif", DONE):
        r = got[n]
        with rasterio.open(runs["out"] / n) as ds:
            labels = ds.read(1)
            pixel_ha = abs(ds.transform.a * ds.transform.e) / 1e4
        assert r["measure"] == "area_ha" and r["cell_size"] == pytest.approx(pixel_ha) == pytest.approx(0.01)
        for row in r["labels"]:
            count = int((labels == row["value"]).sum())
            assert row["count"] == count
            assert row["area_ha"] == pytest.approx(count * 10.0 * 10.0 / 1e4)
        assert sum(row["count"] for row in r["labels"]) == int((labels != 255).sum())
    for n in ("vol_a.nii.gz", "vol_b.nii.gz"):
        r = got[n]
        labels = np.asarray(nib.load(str(runs["out"] / n)).dataobj)
        assert r["measure"] == "volume_ml" and r["cell_size"] == pytest.approx(1.0 * 1.0 * 1.5 / 1000)
        for row in r["labels"]:
            count = int((labels == row["value"]).sum())
            assert row["count"] == count and row["volume_ml"] == pytest.approx(count * 1.5 / 1000)
        assert sum(row["count"] for row in r["labels"]) == labels.size


def test_rerun_processes_nothing_new(runs):
    state = runs["second"]
    assert state.is_failed() and state.message.startswith("1 of 6 inputs failed"), state.message
    got = _by_name(nightly_report(state))
    assert {n: got[n]["status"] for n in got} == {**{n: "skipped" for n in GOOD_NEW + [DONE]}, BAD: "failed"}
    assert got[BAD]["attempts"] == 1  # a known-bad input is tried again every night, once
    now = {p.name: p.stat().st_mtime_ns for p in runs["out"].iterdir() if p.is_file()}
    assert now == runs["mtimes"]  # no output rewritten
    # skipped inputs still report their labels and windows (from the run that made them)
    assert got["vol_a.nii.gz"]["labels"] and got["vol_a.nii.gz"]["windows"]["evaluated"] > 0
    assert len(list((runs["out"] / "reports").glob("*.md"))) == 2


def test_deleted_or_edited_outputs_are_not_skipped(runs, tmp_path, models):
    out = tmp_path / "out"
    shutil.copytree(runs["out"], out)
    entries = {json.loads(p.read_text())["input_path"]: json.loads(p.read_text())
               for p in (out / ledger.CACHE_DIR).glob("*.json")}
    assert len(entries) == 5  # 4 done + 1 adopted; nothing for the bad input

    def check(name):  # noqa: ANN001, ANN202
        e = entries[str(runs["inbox"] / name)]
        doc = e["key_document"]
        return ledger.lookup(out, e["key"], doc["input_sha256"], doc["weights_sha256"])

    assert check("scene_a.tif")[0] is not None
    with open(out / "scene_a.tif", "ab") as f:
        f.write(b"\0")
    hit, why = check("scene_a.tif")
    assert hit is None and "changed" in why
    shutil.rmtree(out / "vol_a.zarr")
    hit, why = check("vol_a.nii.gz")
    assert hit is None and "vol_a.zarr" in why and "missing" in why
    # a sidecar edited to name a file outside the output folder is not followed: the input is done again
    sidecar = out / "vol_b.provenance.json"
    assert check("vol_b.nii.gz")[0] is not None
    record = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**record, "outputs": {**record["outputs"], "../../etc/passwd": "0" * 64}}))
    hit, why = check("vol_b.nii.gz")
    assert hit is None and why == "vol_b.provenance.json names an output outside its folder ('../../etc/passwd')"
    # and the key is content-keyed: same input bytes, same model, same parameters -> same key
    e = entries[str(runs["inbox"] / "vol_b.nii.gz")]
    doc = ledger.key_document(sha256_file(runs["inbox"] / "vol_b.nii.gz"), models["3d"].weights_sha256,
                              models["3d"].card, SegmentOptions(workers=3, roi=[16, 16, 16]), stem="vol_b")
    assert ledger.cache_key(doc) == e["key"]
    assert ledger.cache_key({**doc, "parameters": {**doc["parameters"], "precision": "fast"}}) != e["key"]
    assert ledger.cache_key({**doc, "output_stem": "vol_b_copy"}) != e["key"]  # a copy's outputs are its own


def test_outputs_rewritten_with_other_parameters_are_not_the_entrys_work(runs, tmp_path, models):
    """A run with defaults, one with --overlap 0.5 into the same folder, then defaults again: the third was
    skipped ('same input, model and parameters') over the 0.5 outputs, as the entry only checked hashes.  Now the
    entry pins its sidecar, and an older entry without the pin compares the sidecar's parameters; outputs of
    `segflow segment --bands 4,3,2,1` are not adopted for a run without --bands."""
    out = tmp_path / "out"
    shutil.copytree(runs["out"], out)
    path = next(p for p in (out / ledger.CACHE_DIR).glob("*.json")
                if json.loads(p.read_text())["input_path"].endswith("scene_a.tif"))
    entry = json.loads(path.read_text())
    doc = entry["key_document"]

    def check():  # noqa: ANN202
        return ledger.lookup(out, entry["key"], doc["input_sha256"], doc["weights_sha256"])

    assert entry["sidecar_sha256"] and check()[0] is not None
    sidecar = out / "scene_a.provenance.json"
    record = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**record, "parameters": {**record["parameters"], "overlap": 0.5}}))
    hit, why = check()
    assert hit is None and why == "scene_a.provenance.json was rewritten since this entry was recorded " \
                                  "(another run's outputs?)"
    path.write_text(json.dumps({k: v for k, v in entry.items() if k != "sidecar_sha256"}))  # an older entry
    hit, why = check()
    assert hit is None and "now describes a run with other parameters" in why

    sidecar.write_text(json.dumps(record))
    path.unlink()
    banded = {**doc, "parameters": {**doc["parameters"], "bands": ["4", "3", "2", "1"]}}
    hit, why = ledger.adopt(out, entry["input_path"], ledger.cache_key(banded), banded, entry["model_path"])
    assert hit is None and why == "scene_a.provenance.json was made with other parameters"
    # the same weights behind an edited card (another normalisation): adopted as this model's work, 1.3 M pixels
    # of a real scene labelled otherwise
    card = {**doc["card"], "input": {**doc["card"]["input"], "normalization": {"mode": "none"}}}
    edited = {**doc, "card": card}
    hit, why = ledger.adopt(out, entry["input_path"], ledger.cache_key(edited), edited, entry["model_path"])
    assert hit is None and why == "scene_a.provenance.json was made with another model card"
    hit, why = ledger.adopt(out, entry["input_path"], entry["key"], doc, entry["model_path"])
    assert hit is not None, why


def test_a_ledger_that_cannot_be_written_loses_the_skip_not_the_outputs(models, tmp_path, dask_cluster):
    """A file in the way of OUT/.segflow-cache: the input was reported failed with a raw FileExistsError naming
    no input, and its complete outputs stayed behind a 'failed' status."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    image, _ = samples.make_scene(tmp_path / "scene.tif", size=(64, 64), seed=3)
    shutil.copy(image, inbox / "scene.tif")
    out = tmp_path / "out"
    out.mkdir()
    (out / ledger.CACHE_DIR).write_text("in the way")
    state = nightly(model_dirs=[str(models["2d"].path)], out_dir=str(out), inbox=str(inbox), retries=0,
                    return_state=True)
    [r] = nightly_report(state)["inputs"]
    assert r["status"] == "done", r
    assert r["note"].startswith("outputs written but not recorded as done: its ledger entry could not be written")
    assert (out / "scene.tif").is_file() and (out / "scene.provenance.json").is_file()


def test_a_skipped_input_drops_what_a_killed_run_left_for_it(models, tmp_path, dask_cluster):
    """An input killed mid-run and later done (or adopted) kept its ingested copy and partial store in OUT
    forever, as nothing resumes a done input.  A skip now removes them, and only them (``scene.b``'s stay)."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    image, _ = samples.make_scene(tmp_path / "scene.tif", size=(64, 64), seed=3)
    shutil.copy(image, inbox / "scene.tif")
    out = tmp_path / "out"
    kw = {"model_dirs": [str(models["2d"].path)], "out_dir": str(out), "inbox": str(inbox), "retries": 0}
    [first] = nightly_report(nightly(**kw, return_state=True))["inputs"]
    assert first["status"] == "done", first
    leftovers = [out / ".segflow-work" / "scene.c512.image.zarr", out / ".segflow-work" / "scene.c512.model.zarr",
                 out / ".scene.zarr.0123456789abcdef.partial"]
    others = [out / ".segflow-work" / "scene.b.c512.image.zarr", out / ".scene.b.zarr.0123456789abcdef.partial",
              out / ".segflow-work" / "scene.c1.c512.image.zarr"]
    for folder in leftovers + others:
        folder.mkdir(parents=True)
        (folder / "zarr.json").write_text("{}")
    [second] = nightly_report(nightly(**kw, return_state=True))["inputs"]
    assert second["status"] == "skipped", second
    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in others)


def test_skipped_inputs_list_the_output_folder_once_not_once_each(tmp_path, monkeypatch):
    """Each skipped input listed the whole output folder for its leftovers: a night of N done inputs cost N^2
    (200 ms a skip at 24,000 entries).  The listing is kept while the folder is unchanged, and taken again when
    it changes (a leftover that appears later is still found)."""
    from flows import nightly_task

    out = tmp_path / "out"
    (out / ".segflow-work").mkdir(parents=True)
    for i in range(300):
        (out / f"scene_{i}.tif").write_bytes(b"")
    listed: list[str] = []
    real = os.scandir

    def counting(path):  # noqa: ANN001, ANN202
        listed.append(str(path))
        return real(path)

    monkeypatch.setattr(nightly_task.os, "scandir", counting)
    for i in range(300):
        nightly_task.drop_leftover_work(out, f"scene_{i}")
    assert sorted(listed) == sorted([str(out), str(out / ".segflow-work")])
    (out / ".scene_7.zarr.0123456789abcdef.partial").mkdir()  # a killed run's, left after the listing was taken
    time.sleep(0.01)
    nightly_task.drop_leftover_work(out, "scene_7")
    assert not (out / ".scene_7.zarr.0123456789abcdef.partial").exists()


def test_a_copied_or_renamed_input_gets_outputs_of_its_own_name(runs, models, tmp_path, dask_cluster):
    """The same bytes under another name: `OUT/<stem>.tif` is promised for every input, so a copy is segmented
    under its own name (the original stays skipped), and so is a renamed one.  Both were "skipped: same input,
    model and parameters" with the other name's outputs, and no output of their own."""
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    shutil.copytree(runs["out"], out)
    inbox.mkdir()
    shutil.copy(runs["inbox"] / "scene_b.tif", inbox / "scene_b.tif")
    shutil.copy(runs["inbox"] / "scene_b.tif", inbox / "scene_b_copy.tif")
    model_dirs = [str(models["2d"].path)]
    got = _by_name(nightly_report(nightly(model_dirs=model_dirs, out_dir=str(out), inbox=str(inbox),
                                          return_state=True)))
    assert got["scene_b.tif"]["status"] == "skipped"
    assert got["scene_b_copy.tif"]["status"] == "done", got["scene_b_copy.tif"]
    assert (out / "scene_b_copy.tif").is_file() and (out / "scene_b_copy.provenance.json").is_file()
    assert all(Path(o).name.startswith("scene_b_copy") for o in got["scene_b_copy.tif"]["outputs"])
    with rasterio.open(out / "scene_b.tif") as a, rasterio.open(out / "scene_b_copy.tif") as b:
        assert np.array_equal(a.read(), b.read())
    (inbox / "scene_b.tif").rename(inbox / "scene_b_renamed.tif")
    again = _by_name(nightly_report(nightly(model_dirs=model_dirs, out_dir=str(out), inbox=str(inbox),
                                            return_state=True)))
    assert again["scene_b_copy.tif"]["status"] == "skipped"  # and the two names' entries do not evict each other
    assert again["scene_b_renamed.tif"]["status"] == "done" and (out / "scene_b_renamed.tif").is_file()


def test_another_nights_input_of_the_same_name_keeps_the_earlier_outputs(runs, models, tmp_path, dask_cluster):
    """An inbox's scene_b.tif done one night, and another delivery's scene_b.tif (other pixels) on a later one,
    the first no longer beside it: its outputs had been replaced without a word."""
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    shutil.copytree(runs["out"], out)
    inbox.mkdir()
    shutil.copy(runs["inbox"] / "scene_a.tif", inbox / "scene_b.tif")
    before = (out / "scene_b.tif").read_bytes()
    got = _by_name(nightly_report(nightly(model_dirs=[str(models["2d"].path)], out_dir=str(out), inbox=str(inbox),
                                          return_state=True)))
    assert got["scene_b.tif"]["status"] == "failed"
    assert got["scene_b.tif"]["error"] == (
        f"{inbox / 'scene_b.tif'}: {out / 'scene_b'}.* are the outputs of another input, "
        f"{runs['inbox'] / 'scene_b.tif'} (so says scene_b.provenance.json), which its outputs would replace: "
        "choose another --out, or delete those to replace them")
    assert (out / "scene_b.tif").read_bytes() == before


def _three_band(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=40, height=30, count=3, dtype="uint8",
                       crs="EPSG:32633", transform=from_origin(500000, 5800000, 10, 10)) as dst:
        dst.write(np.full((3, 30, 40), 7, np.uint8))
    return path


def test_an_input_no_model_fits_is_reported_not_processed(models, tmp_path, dask_cluster):
    rgb = _three_band(tmp_path / "rgb.tif")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"inputs": ["rgb.tif"]}))
    state = nightly(model_dirs=[str(models["2d"].path), str(models["3d"].path)], out_dir=str(tmp_path / "out"),
                    manifest=str(manifest), return_state=True)
    assert state.is_failed() and "1 of 1 inputs had no model" in state.message
    [r] = nightly_report(state)["inputs"]
    assert r["input"] == str(rgb) and r["status"] == "no-model" and r["outputs"] == []
    assert "3 channels" in r["error"] and models["2d"].name in r["error"] and "\n" not in r["error"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["reports"]


def test_inputs_that_would_write_the_same_outputs_fail_after_the_first(models, tmp_path, dask_cluster):
    first, second = _three_band(tmp_path / "rgb.tif"), _three_band(tmp_path / "copy" / "rgb.tif")
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"inputs": ["rgb.tif", "copy/rgb.tif"]}))
    import io

    from rich.console import Console

    from flows.progress import PlainReporter, reporting

    said = io.StringIO()
    with reporting(PlainReporter(Console(file=said, width=200))):
        state = nightly(model_dirs=[str(models["2d"].path)], out_dir=str(tmp_path / "out"), manifest=str(manifest),
                        return_state=True)
    # the input refused before its task is counted ("1 of 1 processed" had come above "1 of 2 inputs failed")
    assert "nightly inputs: 2 of 2 processed" in said.getvalue(), said.getvalue()
    one, two = nightly_report(state)["inputs"]
    assert (one["input"], one["status"]) == (str(first), "no-model")  # the first goes on (and fits no model)
    assert (two["input"], two["status"]) == (str(second), "failed")
    assert two["error"] == (f"{second}: its outputs would overwrite those of {first} (the same name stem 'rgb'); "
                            "rename one of them")


def test_a_broken_input_does_not_take_a_good_ones_name(models, tmp_path, dask_cluster):
    """An empty a.nii.gz beside a good a.tif: the good one failed as "would overwrite those of a.nii.gz", every
    night, and nothing was segmented."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.nii.gz").write_bytes(b"")
    samples.make_scene(tmp_path / "a.tif", size=(64, 64), seed=9, nodata_margin=4)
    shutil.copy(tmp_path / "a.tif", inbox / "a.tif")
    state = nightly(model_dirs=[str(models["2d"].path), str(models["3d"].path)], out_dir=str(tmp_path / "out"),
                    inbox=str(inbox), return_state=True)
    by_name = _by_name(nightly_report(state))
    assert by_name["a.tif"]["status"] == "done" and (tmp_path / "out" / "a.tif").is_file()
    assert by_name["a.nii.gz"]["status"] == "failed" and "file is empty" in by_name["a.nii.gz"]["error"]


def test_a_sparse_geotiff_fails_alone_before_any_work(models, tmp_path, dask_cluster):
    """168 KB declaring 60000 x 60000 x 4 (SPARSE_OK, no tiles) was ingested and segmented as 14 billion zeros,
    holding the night for hours; it fails in one line and the good scene beside it is done."""
    from tests.corpus import sparse_tif

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    sparse = sparse_tif(inbox)
    samples.make_scene(inbox / "a.tif", size=(64, 64), seed=9, nodata_margin=4)
    state = nightly(model_dirs=[str(models["2d"].path)], out_dir=str(tmp_path / "out"), inbox=str(inbox),
                    return_state=True)
    by_name = _by_name(nightly_report(state))
    assert by_name["a.tif"]["status"] == "done"
    assert by_name["sparse.tif"]["status"] == "failed"
    assert by_name["sparse.tif"]["error"].startswith(f"{sparse}: declares 60000 x 60000 x 4 channels "
                                                     "(14,400,000,000 samples) in 167.6 KB on disk")
    assert not list((tmp_path / "out").glob("sparse*"))


def test_prefects_temporary_server_logs_to_the_run_log_not_the_terminal(models, tmp_path):
    """The temporary server is a child process on this terminal: stopped at exit while it still recorded task
    runs, it printed "Error flushing 1 events" and CancelledError tracebacks after a 500-input run's report.
    Its records go to the run's log file; at DEBUG (deterministic: it always logs there) none reach the
    terminal, where 157 lines had."""
    import subprocess
    import sys

    inbox, logs = tmp_path / "inbox", tmp_path / "logs"
    inbox.mkdir()
    samples.make_scene(inbox / "a.tif", size=(48, 48), seed=9, nodata_margin=4)[1].unlink()
    # a run killed with SIGKILL left its settings (the finally that removes them never ran): the next run removes
    # them; a live run's (this process's pid) are left alone
    logs.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = logs / f"nightly-20261201T000000-{gone.pid}.log.server-logging.yml"
    live = logs / f"nightly-20261201T000001-{os.getpid()}.log.server-logging.yml"
    stale.write_text("version: 1\n")
    live.write_text("version: 1\n")
    env = {**os.environ, "PREFECT_SERVER_LOGGING_LEVEL": "DEBUG", "SEGFLOW_LOG_DIR": str(logs)}
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_LOGGING_SETTINGS_PATH", None)
    proc = subprocess.run([sys.executable, "-m", "flows", "nightly", "--inbox", str(inbox), "--model",
                           str(models["2d"].path), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "prefect.server" not in proc.stderr + proc.stdout and "uvicorn" not in proc.stderr + proc.stdout
    [log] = logs.glob("nightly-*.log")
    assert "prefect.server" in log.read_text() and "uvicorn" in log.read_text()
    # the server's logging settings, removed with the run; the killed run's too, the live one's kept
    assert [p.name for p in logs.glob("*.yml")] == [live.name]


def test_a_manifest_naming_a_file_twice_says_so(models, tmp_path, dask_cluster):
    """The repeats of a manifest entry vanished from the run without a word."""
    from flows.cli import app

    samples.make_scene(tmp_path / "a.tif", size=(64, 64), seed=9, nodata_margin=4)
    (tmp_path / "tonight.csv").write_text("path\na.tif\n./a.tif\n")
    res = CliRunner().invoke(app, ["nightly", "--model", str(models["2d"].path), "--out", str(tmp_path / "out"),
                                   "--manifest", str(tmp_path / "tonight.csv")])
    assert res.exit_code == 0, res.output
    assert "given more than once (2 times); segmented once, under its first mention" in " ".join(res.output.split())
    report = json.loads(sorted((tmp_path / "out" / "reports").glob("*.json"))[-1].read_text())
    assert [r["status"] for r in report["inputs"]] == ["done"]
    assert report["run"]["duplicates"] == [{"input": str(tmp_path / "a.tif"), "listed": 2}]
    assert "## Listed more than once" in sorted((tmp_path / "out" / "reports").glob("*.md"))[-1].read_text()


def test_flows_called_directly_raise_one_error_that_holds_their_outcomes(models, tmp_path, dask_cluster):
    """Called as Python functions (no return_state), a failed segment_batch or nightly raised Prefect's
    "TypeError: Unexpected result for failed state": it cannot raise a list or a dict."""
    import pickle

    from flows.flows import segment_batch
    from storage.errors import RunFailed

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    samples.make_scene(inbox / "good.tif", size=(48, 48), seed=4, nodata_margin=2)
    (inbox / "broken.tif").write_bytes(b"II*\x00" + b"\x00" * 20)
    with pytest.raises(RunFailed, match=r"^1 of 2 inputs failed: .*broken.tif") as err:
        segment_batch([str(inbox / "good.tif"), str(inbox / "broken.tif")], str(models["2d"].path),
                      str(tmp_path / "out"))
    assert [o["ok"] for o in err.value.result] == [True, False]
    (inbox / "good.truth.tif").unlink()  # make_scene's truth beside it: no input of this night
    with pytest.raises(RunFailed, match="1 of 2 inputs failed") as err:
        nightly(model_dirs=[str(models["2d"].path)], out_dir=str(tmp_path / "night"), inbox=str(inbox))
    assert sorted(r["status"] for r in err.value.result["inputs"]) == ["done", "failed"]
    again = pickle.loads(pickle.dumps(err.value))  # whole, as Prefect or a Dask worker passes it on
    assert str(again) == str(err.value) and again.result == err.value.result


def test_a_broken_link_in_the_inbox_fails_and_what_is_no_input_is_listed_in_the_markdown(models, tmp_path,
                                                                                         dask_cluster):
    """A dangling `scan.tif` link (a scan moved away) used to vanish from the run without a word."""
    inbox = tmp_path / "inbox"
    (inbox / "notes").mkdir(parents=True)
    (inbox / "scan.tif").symlink_to(tmp_path / "moved-away.tif")
    (inbox / "README.txt").write_text("not an input")
    state = nightly(model_dirs=[str(models["2d"].path)], out_dir=str(tmp_path / "out"), inbox=str(inbox),
                    return_state=True)
    report = nightly_report(state)
    [r] = report["inputs"]
    assert (r["input"], r["status"]) == (str(inbox / "scan.tif"), "failed")
    assert r["error"] == f"{inbox / 'scan.tif'}: is a broken symbolic link (to {tmp_path / 'moved-away.tif'})"
    assert report["run"]["ignored"] == [str(inbox / "README.txt"), str(inbox / "notes")]
    markdown = Path(report["report"]["markdown"]).read_text()
    assert "## Not inputs" in markdown and "- `README.txt`" in markdown and "- `notes`" in markdown
    page = Path(report["report"]["html"]).read_text()  # the page for people listed none of them
    assert "<h2>Not inputs</h2>" in page and "<code>README.txt</code>" in page and "<code>notes</code>" in page


def test_a_link_to_a_folder_holding_the_inbox_is_not_walked_and_one_to_a_study_is(tmp_path):
    """`inbox/root -> /` had the run walk the whole file system for DICOM files (32 s, then a failure in /proc)."""
    from flows.inbox import list_inbox
    from tests import dicom_samples

    inbox = tmp_path / "site" / "inbox"
    inbox.mkdir(parents=True)
    dicom_samples.write_ct_series(tmp_path / "studies" / "ct1", np.zeros((2, 4, 4), np.int16))
    (inbox / "root").symlink_to("/")
    (inbox / "site").symlink_to(tmp_path / "site")  # holds the inbox: a loop
    (inbox / "proc").symlink_to("/proc/self")
    (inbox / "ct1").symlink_to(tmp_path / "studies" / "ct1")
    inputs, ignored = list_inbox(inbox)
    assert inputs == [str(inbox / "ct1")]
    assert sorted(Path(p).name for p in ignored) == ["proc", "root", "site"]


def test_an_inbox_that_is_also_the_output_folder_keeps_its_scans(models, tmp_path, dask_cluster):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    image, _ = samples.make_scene(tmp_path / "scene.tif", size=(64, 64), seed=3)
    shutil.copy(image, inbox / "scene.tif")
    before = (inbox / "scene.tif").read_bytes()
    state = nightly(model_dirs=[str(models["2d"].path)], out_dir=str(inbox), inbox=str(inbox), retries=0,
                    return_state=True)
    with pytest.raises(ConfigError, match="is the inbox: the next night would read segflow's outputs as new"):
        nightly_report(state)  # refused before any input (it had failed the scan, and next night its outputs)
    assert (inbox / "scene.tif").read_bytes() == before
    assert sorted(p.name for p in inbox.iterdir()) == ["scene.tif"]


def test_cli_exit_codes_and_report_paths(models, tmp_path, dask_cluster):
    from flows.cli import app

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    _three_band(inbox / "rgb.tif")
    runner = CliRunner()
    args = ["nightly", "--model", str(models["2d"].path), "--out", str(tmp_path / "out")]
    res = runner.invoke(app, args + ["--inbox", str(inbox)])
    assert res.exit_code == 1, res.output
    assert "no-model" in res.output and "report: " in res.output and "Dask scheduler tcp://" in res.output
    named = [line.split("report: ", 1)[1] for line in res.output.splitlines() if line.startswith("report: ")]
    assert [Path(n).suffix for n in named] == [".html", ".md", ".json"]  # the page for people had gone unnamed
    assert all(Path(n).is_file() for n in named)
    assert list((tmp_path / "out" / "reports").glob("*.md"))
    # the summary is one line whatever the width (a table title wrapped at 80 columns in a cron log's grep)
    summary = json.loads(Path(named[2]).read_text())["run"]["summary"]
    assert len(f"segflow nightly: {summary}") > 40
    res = runner.invoke(app, args + ["--inbox", str(inbox)], env={"COLUMNS": "40"})
    assert f"segflow nightly: {summary}" in res.output.splitlines(), res.output
    assert runner.invoke(app, args).exit_code == 2  # neither --inbox nor --manifest
    (inbox / "rgb.tif").unlink()
    res = runner.invoke(app, args + ["--inbox", str(inbox)])  # an empty inbox is a successful night
    assert res.exit_code == 0, res.output
    # outputs written into the inbox were read as new inputs the next night, and every night after failed
    for out in (inbox, inbox / "results"):
        res = runner.invoke(app, ["nightly", "--model", str(models["2d"].path), "--out", str(out), "--inbox",
                                  str(inbox)])
        assert res.exit_code != 0 and "the next night would read segflow's outputs as new inputs" in res.output


def test_a_night_that_cannot_start_writes_its_report_where_out_exists(models, tmp_path, monkeypatch):
    """A missing model directory (or inbox) ended a deployment's run before any report: an operator reading
    OUT/reports the next morning found nothing, as if the night had not run; the error was in Prefect's UI and
    the worker's log only. (``segflow nightly`` refuses a missing model before the flow starts, in one line.)"""
    from storage.errors import ModelError

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    out.mkdir()
    gone = tmp_path / "models" / "lesion-3d"
    with pytest.raises(ModelError) as err:
        nightly(model_dirs=[str(models["2d"].path), str(gone)], out_dir=str(out), inbox=str(inbox))
    assert str(gone) in str(err.value)
    [json_path] = (out / "reports").glob("*.json")
    report = json.loads(json_path.read_text())
    assert report["run"]["state"] == "Failed" and report["inputs"] == []
    assert report["run"]["summary"] == f"the run did not start: {err.value}"
    assert report["run"]["summary"] in json_path.with_suffix(".md").read_text()
    assert "the run did not start" in json_path.with_suffix(".html").read_text()
    # the inbox gone (an unmounted share): the same, a second report
    shutil.rmtree(inbox)
    with pytest.raises(SegflowError):
        nightly(model_dirs=[str(models["2d"].path)], out_dir=str(out), inbox=str(inbox))
    assert len(list((out / "reports").glob("*.json"))) == 2
    # no OUT yet: a run that did nothing does not make one
    inbox.mkdir()
    with pytest.raises(ModelError):
        nightly(model_dirs=[str(gone)], out_dir=str(tmp_path / "new"), inbox=str(inbox))
    assert not (tmp_path / "new").exists()
    # the command checks a local inbox before Prefect starts (it said so after 16 s), and reports it all the same
    import flows.runlog
    from flows.cli import app

    def no_prefect(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("Prefect started for a run that cannot start")

    monkeypatch.setattr(flows.runlog, "prefect_console", no_prefect)
    res = CliRunner().invoke(app, ["nightly", "--inbox", str(tmp_path / "unmounted"), "--model",
                                   str(models["2d"].path), "--out", str(out)], env={"COLUMNS": "300"})
    assert res.exit_code == 2 and res.output.strip() == f"error: {tmp_path / 'unmounted'}: inbox is not a directory"
    assert len(list((out / "reports").glob("*.json"))) == 3


def test_a_report_that_cannot_be_written_is_one_error_line_after_the_inputs(models, tmp_path, dask_cluster,
                                                                             monkeypatch):
    """A full disk at report time: two tracebacks (Prefect's and the command's) and no word of the inputs. The
    disk fills here at the report's write, after the input's outputs were written."""
    from flows.cli import app

    def full(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(errno.ENOSPC, "No space left on device")

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    samples.make_scene(inbox / "scene.tif", size=(64, 64), seed=3)
    monkeypatch.setattr("flows.report.write_report", full)
    res = CliRunner().invoke(app, ["nightly", "--model", str(models["2d"].path), "--out", str(out), "--inbox",
                                   str(inbox)])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and "scene.tif" in res.output and "done" in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {out}: the run report was not written: No space left on device"], res.output
    assert (out / "scene.provenance.json").is_file()


def test_nightly_takes_segments_output_options(models, tmp_path, dask_cluster):
    """A nightly user asked for polygons, the bands and flip TTA as `segment` offers them; nightly had no such
    options, although its flow and ledger honour each."""
    from flows.cli import app

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    samples.make_scene(tmp_path / "scene.tif", size=(96, 80), seed=5, nodata_margin=4)
    shutil.copy(tmp_path / "scene.tif", inbox / "scene.tif")
    res = CliRunner().invoke(app, ["nightly", "--model", str(models["2d"].path), "--out", str(out), "--inbox",
                                   str(inbox), "--vector", "gpkg", "--bands", "4,3,2,1", "--tta", "0", "--quiet"])
    assert res.exit_code == 0, res.output
    assert (out / "scene.gpkg").is_file()
    params = json.loads((out / "scene.provenance.json").read_text())["parameters"]
    assert params["vector"] == "gpkg" and params["bands"] == ["4", "3", "2", "1"] and params["flip_tta"] == [0]
    bad = CliRunner().invoke(app, ["nightly", "--model", str(models["2d"].path), "--out", str(out), "--inbox",
                                   str(inbox), "--vector", "shp"])
    assert bad.exit_code == 2 and "vector" in bad.output


def test_settle_leaves_what_is_still_arriving_for_the_next_run(models, tmp_path, dask_cluster):
    """A transfer that preallocates the file and fills it in order leaves a full-size uncompressed GeoTIFF
    reading as zeros at its tail: without --settle it was segmented as such and called done."""
    from flows.cli import app

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    for name in ("old", "new"):
        samples.make_scene(tmp_path / f"{name}.tif", size=(64, 64), seed=7, nodata_margin=4)
        shutil.copy(tmp_path / f"{name}.tif", inbox / f"{name}.tif")
    hour_ago = time.time() - 3600
    os.utime(inbox / "old.tif", (hour_ago, hour_ago))
    args = ["nightly", "--model", str(models["2d"].path), "--out", str(out), "--inbox", str(inbox), "--settle", "600"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "arriving: " in res.output and "new.tif" in res.output and "left for the next run" in res.output
    assert (out / "old.tif").is_file() and not (out / "new.tif").exists()
    report = json.loads(sorted((out / "reports").glob("*.json"))[-1].read_text())
    assert [Path(r["input"]).name for r in report["inputs"]] == ["old.tif"]
    assert [Path(a["input"]).name for a in report["run"]["arriving"]] == ["new.tif"]
    assert "## Still arriving" in sorted((out / "reports").glob("*.md"))[-1].read_text()
    assert "Still arriving" in sorted((out / "reports").glob("*.html"))[-1].read_text()
    os.utime(inbox / "new.tif", (hour_ago, hour_ago))  # the delivery finished: the next run takes it
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0 and (out / "new.tif").is_file(), res.output


def test_parallel_keeps_that_many_inputs_in_flight_and_no_more(models, tmp_path, dask_cluster):
    """``parallel`` is a flow parameter (a served deployment takes it, the task runner's size it cannot): two of
    three inputs run at once, read back from the task runs' own start and end times."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    for i in range(3):  # made beside the inbox: a scene comes with its truth labels
        image, _ = samples.make_scene(tmp_path / f"s{i}.tif", size=(96, 96), seed=30 + i, nodata_margin=4)
        shutil.copy(image, inbox / image.name)
    state = nightly(model_dirs=[str(models["2d"].path)], out_dir=str(out), inbox=str(inbox), parallel=2,
                    return_state=True)
    report = nightly_report(state)
    assert [r["status"] for r in report["inputs"]] == ["done"] * 3
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[report["run"]["flow_run_id"]])))
    spans = sorted((r.start_time, r.end_time) for r in runs if r.name.startswith("segment-"))
    assert len(spans) == 3 and all(start and end for start, end in spans), spans
    in_flight = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert in_flight == 2, spans


def test_still_arriving_looks_inside_folders_and_at_analyze_images(tmp_path):
    from flows.inbox import still_arriving

    series = tmp_path / "series"
    (series / "deep").mkdir(parents=True)
    (series / "deep" / "1.dcm").write_bytes(b"x")
    (tmp_path / "scan.hdr").write_bytes(b"h")
    (tmp_path / "scan.img").write_bytes(b"i")
    now = time.time()
    for p in (series, series / "deep", tmp_path / "scan.hdr"):
        os.utime(p, (now - 3600, now - 3600))
    paths = [str(series), str(tmp_path / "scan.hdr"), "s3://bucket/x.tif"]
    assert set(still_arriving(paths, 60, now=now)) == {str(series), str(tmp_path / "scan.hdr")}
    assert still_arriving(paths, 0, now=now) == {}
    for p in (series / "deep" / "1.dcm", tmp_path / "scan.img"):
        os.utime(p, (now - 3600, now - 3600))
    assert still_arriving(paths, 60, now=now) == {}


def test_the_flows_parameters_are_checked_as_the_cli_checks_its_options(tmp_path):
    """The deployments call the flow, not the CLI: lock_stale_after=0 let a second run break a live lock."""
    base = {"model_dirs": [str(tmp_path / "m")], "out_dir": str(tmp_path / "o"), "inbox": str(tmp_path)}
    for bad, message in (({"retries": -1}, "retries must be >= 0, got -1"),
                         ({"retry_delay_seconds": -10}, "retry_delay_seconds must be >= 0, got -10"),
                         ({"lock_stale_after": 0}, "lock_stale_after must be >= 1, got 0"),
                         ({"parallel": 0}, "parallel must be >= 1, got 0"),
                         ({"parallel": 33}, "parallel must be <= 32, got 33")):
        with pytest.raises(ConfigError, match=message):
            nightly_report(nightly(**base, **bad, return_state=True))
    assert not (tmp_path / "o").exists()


def test_manifests_and_retry_classification(tmp_path):
    (tmp_path / "m.csv").write_text("id,path\n1,a.tif\n2, /abs/b.nii.gz \n3,\n")
    assert read_manifest(tmp_path / "m.csv") == [str(tmp_path / "a.tif"), "/abs/b.nii.gz"]
    (tmp_path / "m.json").write_text(json.dumps(["a.tif", {"path": "sub/c.nii"}]))
    assert read_manifest(tmp_path / "m.json") == [str(tmp_path / "a.tif"), str(tmp_path / "sub/c.nii")]
    (tmp_path / "bad.csv").write_text("file\na.tif\n")
    with pytest.raises(ConfigError, match=r"needs a 'path' column \(its header: 'file'\)"):
        read_manifest(tmp_path / "bad.csv")
    # as spreadsheets save them: ';' (a comma decimal mark), tabs, a BOM and CRLF; a header alone is an empty night
    (tmp_path / "semi.csv").write_bytes("\ufeffPath;Note\r\na.tif;first, of two\r\nb.tif;\r\n".encode())
    assert read_manifest(tmp_path / "semi.csv") == [str(tmp_path / "a.tif"), str(tmp_path / "b.tif")]
    (tmp_path / "tabs.csv").write_text("path\tnote\na.tif\tx\n")
    assert read_manifest(tmp_path / "tabs.csv") == [str(tmp_path / "a.tif")]
    (tmp_path / "empty.csv").write_text("path\n")
    assert read_manifest(tmp_path / "empty.csv") == []
    # one spelling per file (data/../data/b.tif had clashed with data/b.tif), and '#' rows are comments
    (tmp_path / "spelt.csv").write_text("path\n# tonight's scans\n./data/a.tif\ndata/../data/a.tif\ndata/b.tif\n")
    assert read_manifest(tmp_path / "spelt.csv") == [str(tmp_path / "data" / "a.tif")] * 2 + \
        [str(tmp_path / "data" / "b.tif")]

    def wrapped(inner):  # noqa: ANN001, ANN202  (a reader turning an OSError into a one-line InputError)
        try:
            raise inner
        except OSError:
            try:
                raise CorruptInputError("x.tif", "cannot read") from None
            except CorruptInputError as exc:
                return exc

    assert is_transient(OSError(errno.EIO, "Input/output error"))
    assert is_transient(wrapped(OSError(errno.ETIMEDOUT, "timed out")))
    assert is_transient(ConnectionResetError())
    assert not is_transient(wrapped(OSError(errno.ENOENT, "no such file")))
    assert not is_transient(CorruptInputError("x.tif", "damaged GeoTIFF"))
    assert not is_transient(PermissionError(errno.EACCES, "denied"))


def test_probe_reads_channels_and_cell_sizes_from_headers(tmp_path):
    from storage.probe import probe

    def raster(name, crs, pixel, count=2):  # noqa: ANN001, ANN202
        with rasterio.open(tmp_path / name, "w", driver="GTiff", width=8, height=6, count=count, dtype="uint8",
                           crs=crs, transform=from_origin(0, 0, pixel, pixel)) as dst:
            dst.write(np.ones((count, 6, 8), np.uint8))
        return probe(tmp_path / name)

    utm = raster("utm.tif", "EPSG:32633", 20.0)
    assert (utm.kind, utm.spatial_dims, utm.channels, utm.shape) == ("raster", 2, 2, (6, 8))
    assert utm.cell_size == pytest.approx(0.04) and utm.cell_note is None
    feet = raster("feet.tif", "EPSG:2263", 100.0)  # US survey feet
    assert feet.cell_size == pytest.approx((100 * 1200 / 3937) ** 2 / 1e4)
    geo = raster("geo.tif", "EPSG:4326", 0.001)
    assert geo.cell_size is None and "geographic" in geo.cell_note
    img = nib.Nifti1Image(np.zeros((5, 4, 3, 2), np.int16), np.diag([0.5, 0.5, 2.0, 1.0]))
    img.header.set_xyzt_units("mm")
    nib.save(img, tmp_path / "v.nii.gz")
    vol = probe(tmp_path / "v.nii.gz")
    assert (vol.kind, vol.spatial_dims, vol.channels, vol.shape) == ("volume", 3, 2, (5, 4, 3))
    assert vol.cell_size == pytest.approx(0.5 / 1000) and vol.cell_unit == "mL"


# ----------------------------------------------------------------------------- DICOM series in the inbox

CT_SPACING = (2.5, 0.8, 0.7)  # slice, row, column (mm)


@pytest.fixture(scope="module")
def dicom_runs(models, tmp_path_factory, dask_cluster):
    """An inbox with a good 6x24x24 CT series folder, one with a missing slice and a folder without images;
    the first night, a rerun over the inbox, and a manifest naming the good folder."""
    from storage.dicom import find_series
    from tests.dicom_samples import write_bad_series, write_basic_text_sr, write_ct_series

    root = tmp_path_factory.mktemp("nightly-dicom")
    inbox, out = root / "inbox", root / "out"
    data = (np.random.default_rng(5).normal(1024, 200, (6, 24, 24))).astype(np.int16)
    write_ct_series(inbox / "ct_good", data, spacing=CT_SPACING, series_description="AX CT 0.7")
    write_bad_series(inbox / "ct_broken", "missing_slice")
    write_basic_text_sr(inbox / "reports_only" / "sr.dcm")
    [good] = find_series([inbox / "ct_good"])
    [bad] = find_series([inbox / "ct_broken"])
    model_dirs = [str(models["2d"].path), str(models["3d"].path)]
    first = nightly(model_dirs=model_dirs, out_dir=str(out), inbox=str(inbox), retries=0, return_state=True)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    second = nightly(model_dirs=model_dirs, out_dir=str(out), inbox=str(inbox), retries=0, return_state=True)
    manifest = root / "tonight.json"
    manifest.write_text(json.dumps([str(inbox / "ct_good")]))
    third = nightly(model_dirs=model_dirs, out_dir=str(out), manifest=str(manifest), retries=0, return_state=True)
    return {"inbox": inbox, "out": out, "data": data, "good": good, "bad": bad, "first": first, "second": second,
            "third": third, "mtimes": mtimes}


def test_dicom_series_in_the_inbox_are_routed_segmented_and_fail_alone(dicom_runs, models):
    good, bad, out = dicom_runs["good"], dicom_runs["bad"], dicom_runs["out"]
    state = dicom_runs["first"]
    assert state.is_failed() and state.message.startswith("2 of 3 inputs failed"), state.message
    report = nightly_report(state)
    got = {r["input"]: r for r in report["inputs"]}
    no_images = str(dicom_runs["inbox"] / "reports_only")
    assert sorted(got) == sorted([good.display, bad.display, no_images])
    assert report["run"]["ignored"] == []

    g = got[good.display]
    assert g["status"] == "done", g
    assert (g["kind"], g["channels"]) == ("volume", 1)
    assert g["model"] == models["3d"].name and g["model_path"] == str(models["3d"].path)
    assert g["input_sha256"] == good.sha256()  # content-keyed on the series' files
    assert g["dicom"] == {"root": str(good.root), "series_instance_uid": good.series_instance_uid, "volume": None,
                          "name": good.name, "files": 6}
    assert Path(g["outputs"][0]) == out / f"{good.name}.nii.gz" and all(Path(o).exists() for o in g["outputs"])

    # mL per class from the label map on the series' grid; per-label statistics against the scan itself
    labels = np.asarray(nib.load(str(out / f"{good.name}.nii.gz")).dataobj)  # (i, j, k)
    hu = dicom_runs["data"].transpose(2, 1, 0).astype(np.float64) - 1024.0  # (k, j, i) raw -> (i, j, k) HU
    voxel_ml = np.prod(CT_SPACING) / 1000
    assert g["measure"] == "volume_ml" and g["cell_size"] == pytest.approx(voxel_ml)
    stats = g["label_statistics"]
    assert stats["unit"] == "HU"
    for row in g["labels"]:
        inside = labels == row["value"]
        assert row["count"] == int(inside.sum()) and row["volume_ml"] == pytest.approx(row["count"] * voxel_ml)
        entry = stats["classes"][row["name"]]
        assert entry["voxels"] == row["count"] and entry["volume_ml"] == pytest.approx(row["volume_ml"])
        if row["count"]:
            assert entry["mean"] == pytest.approx(hu[inside].mean()) and entry["std"] == pytest.approx(hu[inside].std())
    assert sum(row["count"] for row in g["labels"]) == labels.size

    # the bad series and the folder without images: one line each naming them, not retried, nothing left
    b = got[bad.display]
    assert b["status"] == "failed" and b["attempts"] == 1 and b["dicom"]["name"] == bad.name
    assert b["error"].startswith(f"{bad.display}: ") and "slice(s) missing" in b["error"] and "\n" not in b["error"]
    n = got[no_images]
    assert n["error"].startswith(f"{no_images}: no DICOM image series found"), n["error"]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted(
        [Path(o).name for o in g["outputs"]] + ["reports"])
    assert not (out / ".segflow-work").exists()

    # the reports: the series by its display, a compact statistics line per class, no patient identifiers
    from tests.dicom_samples import DUMMY_PATIENT_ID, DUMMY_PATIENT_NAME

    md = Path(report["report"]["markdown"]).read_text()
    text = md + Path(report["report"]["json"]).read_text()
    assert f"| `{good.display}` | done | {models['3d'].name} |" in md
    assert f"| `{bad.display}` | failed |" in md and f"- **failed**: {bad.display}: 1 slice(s) missing" in md
    assert "## Label statistics" in md and f"- `{good.display}`:" in md
    for name, entry in stats["classes"].items():
        if entry["voxels"]:
            line = f"  - {name}: {entry['voxels']:,} voxels, "  # counts with thousands separators
            assert line in md
            rest = md.split(line)[1].splitlines()[0]
            assert " ± " in rest and (rest.endswith(" HU") or rest.endswith(" HU, touches the border")), rest
    assert DUMMY_PATIENT_NAME not in text and DUMMY_PATIENT_ID not in text and "Dummy" not in text


def test_dicom_rerun_and_manifest_skip_the_done_series(dicom_runs):
    good, bad = dicom_runs["good"], dicom_runs["bad"]
    for key in ("second", "third"):
        report = nightly_report(dicom_runs[key])
        got = {r["input"]: r for r in report["inputs"]}
        assert got[good.display]["status"] == "skipped", got[good.display]
        assert got[good.display]["label_statistics"]["classes"]  # from the run that made the outputs
        assert got[good.display]["input_sha256"] == good.sha256()
    second = {r["input"]: r for r in nightly_report(dicom_runs["second"])["inputs"]}
    assert second[bad.display]["status"] == "failed"  # a bad series is tried again every night
    assert dicom_runs["third"].is_completed()  # the manifest names the good folder only
    now = {p.name: p.stat().st_mtime_ns for p in dicom_runs["out"].iterdir() if p.is_file()}
    assert now == dicom_runs["mtimes"]  # no output rewritten


def test_probe_dispatches_dicom_series_and_folders(tmp_path):
    from storage.dicom import find_series
    from storage.errors import InputError, InvalidInputError
    from storage.probe import probe
    from tests.dicom_samples import write_bad_series, write_ct_series

    write_ct_series(tmp_path / "one", np.zeros((3, 4, 5), np.int16), spacing=(2.0, 0.5, 0.25))
    [ref] = find_series([tmp_path / "one"])
    for what, depth in ((ref, 3), (tmp_path / "one", 3), (str(tmp_path / "one" / "IM0001.dcm"), 1)):
        h = probe(what)
        assert (h.kind, h.spatial_dims, h.channels, h.shape, h.cell_unit) == ("volume", 3, 1, (5, 4, depth), "mL")
        # the series' display (its folder, or its one file): no patient identifier
        assert h.path.startswith(f"{tmp_path / 'one'}{'/IM0001.dcm' if depth == 1 else ''} [series ")
    assert probe(ref).cell_size == pytest.approx(2.0 * 0.5 * 0.25 / 1000)
    write_ct_series(tmp_path / "two" / "a", np.zeros((3, 4, 5), np.int16))
    write_ct_series(tmp_path / "two" / "b", np.zeros((3, 4, 5), np.int16))
    with pytest.raises(InputError, match="holds 2 DICOM image volumes"):
        probe(tmp_path / "two")
    write_bad_series(tmp_path / "gap", "missing_slice")
    with pytest.raises(InvalidInputError, match=r"\[series .*\]: 1 slice\(s\) missing"):
        probe(tmp_path / "gap")


def test_options_that_write_nothing_for_a_kind_of_input_do_not_key_it(models):
    """`--vector gpkg` keyed a volume apart from the same run without it: a nightly with it redid every volume
    another had done ("made with other parameters"), though nothing vector is written for a volume."""
    volume, raster = models["3d"].card, models["2d"].card
    with_polygons = SegmentOptions(vector="gpkg", simplify=2.0)
    assert ledger.keyed_parameters(volume, with_polygons) == ledger.keyed_parameters(volume, SegmentOptions())
    assert ledger.keyed_parameters(raster, with_polygons) != ledger.keyed_parameters(raster, SegmentOptions())
    keep = SegmentOptions(model_space="keep")
    assert ledger.keyed_parameters(raster, keep) == ledger.keyed_parameters(raster, SegmentOptions())
    assert ledger.keyed_parameters(volume, keep) != ledger.keyed_parameters(volume, SegmentOptions())
