"""STAC items in a nightly inbox: routed by the bands they offer, keyed by their assets' content, skipped when done.

The inbox holds three generated Sentinel-2-like items (:mod:`tests.s2_samples`; per-band COGs at 10 and 20 m
in a folder beside the inbox, hrefs relative to the item file), a JSON file that is no item, and a GeoTIFF:

- ``full.json`` offers every band: it goes to the first model, which takes red, nir, swir16 and swir22;
- ``rgbn.json`` has no SWIR assets: the first model does not fit, the second (blue, green, red, nir) does;
- ``blue.json`` offers B02 only: no model fits; reported ``no-model`` with each model's reason;
- ``gone.json`` names band files that do not exist: it fails alone, with one line naming it and the asset;
- ``notes.json`` (a JSON list) is not an input: listed as ignored.

Three real nightly runs: the first segments both items (labels equal those of ``segment_one`` on the same
item and model), the second skips them, and after one asset file of ``full.json`` is rewritten with other
pixels the third processes that item again and still skips the other: the key covers the assets' content,
not only the item's JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from flows.config import SegmentOptions
from flows.nightly import list_inbox, nightly, nightly_report
from flows.pipeline import segment_one
from tests import s2_samples
from tests.models import tiny_model

SWIR = ["red", "nir", "swir16", "swir22"]
RGBN = ["blue", "green", "red", "nir"]


def _item_in_inbox(inbox: Path, name: str, item_id: str, assets_dir: Path, keys: list[str]) -> Path:
    """``inbox/name`` listing the band COGs of ``assets_dir`` for ``keys``, with hrefs relative to the inbox."""
    assets = {k: s2_samples.band_asset(k, f"../{assets_dir.name}/{s2_samples.BANDS[k][0]}.tif") for k in keys}
    path = inbox / name
    path.write_text(json.dumps(s2_samples.item_dict(item_id, assets), indent=1))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory, dask_cluster):
    root = tmp_path_factory.mktemp("nightly-items")
    inbox, out = root / "inbox", root / "out"
    inbox.mkdir()
    s2_samples.write_item(root / "bands", size=96)  # the COGs; its own item.json stays outside the inbox
    models = [tiny_model(root / "m-swir", spatial_dims=2, channels=4, roi=[32, 32], seed=1, channel_names=SWIR),
              tiny_model(root / "m-rgbn", spatial_dims=2, channels=4, roi=[32, 32], seed=2, channel_names=RGBN)]
    items = {"full": _item_in_inbox(inbox, "full.json", "S2_full", root / "bands", list(s2_samples.BANDS)),
             "rgbn": _item_in_inbox(inbox, "rgbn.json", "S2_rgbn", root / "bands", RGBN),
             "blue": _item_in_inbox(inbox, "blue.json", "S2_blue", root / "bands", ["blue"])}
    (inbox / "notes.json").write_text(json.dumps(["not", "an", "item"]))
    broken = s2_samples.item_dict("S2_gone", {k: s2_samples.band_asset(k, f"../gone/{s2_samples.BANDS[k][0]}.tif")
                                              for k in RGBN})
    broken["links"] = []  # no self link to fall back on: the hrefs are local files, which are missing
    (inbox / "gone.json").write_text(json.dumps(broken))
    model_dirs = [str(m.path) for m in models]
    # the band COGs live beside the inbox, a folder the operator allows (storage.sources)
    kwargs = dict(model_dirs=model_dirs, out_dir=str(out), inbox=str(inbox), retries=0, return_state=True,
                  source_roots=[str(root / "bands"), str(root / "gone")],
                  options=SegmentOptions(dask_address=dask_cluster.scheduler.address))  # the session's cluster
    first = nightly(**kwargs)
    first_labels = {k: _labels(out / f"S2_{k}.tif") for k in ("full", "rgbn")}
    second = nightly(**kwargs)
    # other pixels in an asset only full.json reads (B11, 20 m); the item JSON files are untouched
    s2_samples.write_cog(root / "bands" / "B11.tif", s2_samples.band_dn(98, 48), 20)
    third = nightly(**kwargs)
    return {"root": root, "inbox": inbox, "out": out, "models": models, "items": items,
            "first": first, "second": second, "third": third, "first_labels": first_labels}


def _labels(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def _by_name(state) -> dict[str, dict]:
    return {Path(r["input"]).name: r for r in nightly_report(state)["inputs"]}


def test_items_are_inputs_and_other_json_is_ignored(runs):
    inputs, ignored = list_inbox(runs["inbox"])
    assert sorted(Path(p).name for p in inputs) == ["blue.json", "full.json", "gone.json", "rgbn.json"]
    assert ignored == [str(runs["inbox"] / "notes.json")]


def test_each_item_goes_to_the_first_model_whose_bands_it_offers(runs):
    got = _by_name(runs["first"])
    assert {n: r["status"] for n, r in got.items()} == {"full.json": "done", "rgbn.json": "done",
                                                        "blue.json": "no-model", "gone.json": "failed"}
    error = got["gone.json"]["error"]
    assert error.startswith(f"{runs['inbox'] / 'gone.json'}: asset 'blue' (") and "cannot be opened" in error, error
    assert "No such file" in error, error
    assert "\n" not in error and not (runs["out"] / "S2_gone.tif").exists()
    assert got["full.json"]["model_path"] == str(runs["models"][0].path)
    assert got["rgbn.json"]["model_path"] == str(runs["models"][1].path)
    reason = got["blue.json"]["error"]
    assert reason.startswith(f"{runs['items']['blue']}: no model fits this STAC item; "), reason
    assert "B04" not in reason.split("offers")[-1] and reason.count("model '") >= 2, reason
    assert got["full.json"]["kind"] == "raster" and got["full.json"]["channels"] == 4
    assert got["full.json"]["measure"] == "area_ha" and got["full.json"]["cell_size"] == pytest.approx(0.01)
    assert sum(r["area_ha"] for r in got["full.json"]["labels"]) == pytest.approx(96 * 96 * 0.01)
    assert runs["first"].message.startswith("1 of 4 inputs failed"), runs["first"].message


def test_labels_and_provenance_equal_segment_one_of_the_same_item(runs, dask_cluster, tmp_path):
    """The outputs now (after the third run) against ``segment_one`` of the items as they are now."""
    for key, model in (("full", runs["models"][0]), ("rgbn", runs["models"][1])):
        ref = segment_one(runs["items"][key], model, tmp_path / key, SegmentOptions(), dask_cluster)
        assert ref.ok
        assert np.array_equal(_labels(runs["out"] / f"S2_{key}.tif"), _labels(tmp_path / key / f"S2_{key}.tif"))
        record = json.loads((runs["out"] / f"S2_{key}.provenance.json").read_text())
        assert record["input"]["format"] == "STAC item" and record["input"]["path"] == str(runs["items"][key])
        assert record["input"]["sha256"] == _by_name(runs["third"])[f"{key}.json"]["input_sha256"]
        used = {a["key"] for a in record["input"]["stac_item"]["assets"]}
        assert used == set(SWIR if key == "full" else RGBN)


def test_a_rerun_skips_the_items_and_a_changed_asset_is_processed_again(runs):
    second = _by_name(runs["second"])
    assert {n: r["status"] for n, r in second.items()} == {"full.json": "skipped", "rgbn.json": "skipped",
                                                           "blue.json": "no-model", "gone.json": "failed"}
    third = _by_name(runs["third"])
    assert third["full.json"]["status"] == "done", third["full.json"]
    assert third["rgbn.json"]["status"] == "skipped"  # it does not read B11
    assert third["full.json"]["input_sha256"] != second["full.json"]["input_sha256"]
    assert not np.array_equal(_labels(runs["out"] / "S2_full.tif"), runs["first_labels"]["full"])
    record = json.loads((runs["out"] / "S2_full.provenance.json").read_text())
    assert record["input"]["sha256"] == third["full.json"]["input_sha256"]


def test_an_item_delivered_with_its_band_files_beside_it_is_one_input(tmp_path, dask_cluster):
    """A catalogue delivers an item with its band COGs beside it (hrefs ``./B02.tif``).  Each COG had also been an
    input of its own: four 1-band rasters no model takes, reported ``no-model``, and the run exited 1 every night.
    The item reads them; they are listed as ignored.  A raster no item names stays an input."""
    inbox = tmp_path / "inbox"
    item = s2_samples.write_item(inbox, size=64)
    s2_samples.write_cog(inbox / "other.tif", s2_samples.band_dn(7, 64), 10)
    (inbox / "loop-a.tif").symlink_to("loop-b.tif")  # links in a loop: inputs that fail alone, no crash here
    (inbox / "loop-b.tif").symlink_to("loop-a.tif")
    inputs, ignored = list_inbox(inbox)
    band_files = sorted(str(inbox / f"{band_id}.tif") for band_id, _, _ in s2_samples.BANDS.values())
    assert inputs == [str(item), str(inbox / "loop-a.tif"), str(inbox / "loop-b.tif"), str(inbox / "other.tif")]
    assert ignored == sorted(band_files + [str(inbox / "preview.png")])

    model = tiny_model(tmp_path / "m", spatial_dims=2, channels=4, roi=[32, 32], channel_names=RGBN)
    state = nightly(model_dirs=[str(model.path)], out_dir=str(tmp_path / "out"), inbox=str(inbox), retries=0,
                    return_state=True, options=SegmentOptions(dask_address=dask_cluster.scheduler.address))
    report = nightly_report(state)
    got = {Path(r["input"]).name: r["status"] for r in report["inputs"]}
    assert got == {"item.json": "done", "other.tif": "no-model",  # the COGs are no inputs of their own
                   "loop-a.tif": "failed", "loop-b.tif": "failed"}
    # the report says which item each set-aside file belongs to: an item dropped beside another delivery's scene,
    # naming it, had hidden that scene among the "not inputs" without a word (security probe)
    assert report["run"]["band_files"] == {f: str(item) for f in band_files}
    markdown = next((tmp_path / "out" / "reports").glob("*.md")).read_text()
    assert "- `B02.tif`: a band file of STAC item `item.json`" in markdown and "- `preview.png`\n" in markdown


def test_an_inbox_url_with_an_item_and_its_band_files_lists_the_item_alone(tmp_path):
    """As in a local inbox: the objects an item names (hrefs ``./B02.tif`` beside it) are its bands, not inputs of
    their own.  fsspec lists ``memory:///b/k`` where the hrefs resolve to ``memory://b/k``: the same objects."""
    import fsspec

    local = s2_samples.write_item(tmp_path / "delivery", size=32)
    s2_samples.write_cog(tmp_path / "delivery" / "other.tif", s2_samples.band_dn(7, 32), 10)
    prefix = "memory://segflow-inbox-items/inbox"
    fs = fsspec.filesystem("memory")
    try:
        for p in sorted(local.parent.iterdir()):
            fs.pipe(f"{prefix}/{p.name}", p.read_bytes())
        inputs, ignored = list_inbox(prefix)
        names = lambda urls: [u.rsplit("/", 1)[-1] for u in urls]  # noqa: E731
        assert names(inputs) == ["item.json", "other.tif"]
        band_files = sorted(f"{band_id}.tif" for band_id, _, _ in s2_samples.BANDS.values())
        assert sorted(names(ignored)) == sorted(band_files + ["preview.png"])
    finally:
        fs.rm("/segflow-inbox-items", recursive=True)
