"""A model as a STAC MLM item and back: `segflow model inspect --stac`, `segflow model convert item.json`.

Real model directories, real CLI runs, real segmentation; items checked with stac-model's pydantic models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from stac_model.schema import MLModelProperties

from segmentation.card import ModelCard
from segmentation.mlm import SEGFLOW_SCALING, card_from_item, convert_item, model_description
from segmentation.modeldir import build_module, load_model
from storage.errors import ModelError
from storage.hashing import sha256_file
from storage.stac import model_item as stac_model_item
from tests.models import tiny_model

SEGFLOW = [sys.executable, "-m", "flows"]
MLM_FIELDS = {"training", "weights_sha256"}  # what a card holds that an MLM item does not carry back


def run(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([*SEGFLOW, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "200"})


def card_of(**changes: object) -> ModelCard:
    base = {
        "name": "landcover s2 (v1)", "description": "four bands, three classes",
        "architecture": {"name": "unet", "kwargs": {"channels": [4, 8], "strides": [2], "num_res_units": 0}},
        "input": {"spatial_dims": 2, "channels": 4, "channel_names": ["B02", "B03", "B04", "B08"],
                  "normalization": {"mode": "zscore", "mean": [400, 600, 500, 2500], "std": [100, 100, 100, 300]}},
        "classes": [{"value": 0, "name": "water body", "color": [0, 0, 255]},
                    {"value": 1, "name": "water/body", "color": [0, 128, 10], "code": "LC:forest"},
                    {"value": 2, "name": "built-up", "color": [255, 0, 171]}],
        "inference": {"roi": [64, 64], "overlap": 0.5, "batch_size": 2, "flip_tta": [1]},
    }
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            base[section] = {**base[section], field: value}
        else:
            base[section] = value
    return ModelCard.model_validate(base)


def item_of(card: ModelCard, href: str = "weights.safetensors") -> dict:
    """The item `model inspect --stac` prints, without a weights file behind it."""
    from segmentation.mlm import _gsd

    return stac_model_item(item_id="m", model=model_description(card, weights_sha256=None), classes=card.classes,
                           gsd=_gsd(card), weights={"href": href}, description=card.description or None)


def without(card: ModelCard) -> dict:
    return card.model_dump(mode="json", exclude=MLM_FIELDS)


@pytest.mark.parametrize("norm", [
    {"mode": "none"},
    {"mode": "zscore", "mean": [400, 600, 500, 2500], "std": [100, 100, 100, 300]},
    {"mode": "zscore", "mean": [0.5], "std": [0.25]},
    {"mode": "scale", "scale": [1 / 255]},
    {"mode": "scale", "offset": [1000, 1000, 1000, 1000], "scale": [1e-4, 1e-4, 2e-4, 1e-4]},
    {"mode": "image_zscore", "nonzero": True},
    {"mode": "percentile", "lower": 1, "upper": 99, "b_min": 0, "b_max": 1, "clip": [0, 1]},
    {"mode": "zscore", "mean": [1], "std": [2], "clip": [-3, 3]},
])
def test_card_round_trips_through_mlm_for_every_normalisation(norm: dict) -> None:
    card = card_of(input__normalization=norm, input__spacing=[10.0, 10.0], input__spacing_unit="m",
                   input__units="reflectance")
    item = item_of(card)
    mlm = MLModelProperties.model_validate(item["properties"])  # the item is valid MLM
    assert item["properties"]["gsd"] == 10.0
    scaling = mlm.input[0].value_scaling
    if norm["mode"] == "none":
        assert scaling is None
    elif norm["mode"] in ("image_zscore", "percentile") or "clip" in norm:
        assert [s.type for s in scaling] == ["processing"] and scaling[0].format == SEGFLOW_SCALING
    else:  # affine per band: MLM's own objects, which other tools apply
        assert {s.type for s in scaling} <= {"z-score", "scale"}
    assert without(card_from_item(item, "item.json")) == without(card)


def test_a_foreign_item_maps_what_it_says_and_refuses_what_a_card_cannot_hold(tmp_path: Path) -> None:
    """An item segflow did not write: no segflow extras, MLM's own min-max/offset scaling, U-Net, a gsd."""
    arch_card = card_of(architecture={"name": "unet", "kwargs": {}}, input__normalization={"mode": "none"})
    torch.manual_seed(1)
    module = build_module(arch_card)
    weights = tmp_path / "w" / "net.safetensors"
    weights.parent.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(weights))
    item = item_of(arch_card, href="w/net.safetensors")
    props = item["properties"]
    props.pop("mlm:hyperparameters")
    props["mlm:architecture"] = "U-Net"
    props["gsd"] = 20.0
    props["mlm:input"][0]["value_scaling"] = [
        {"type": "min-max", "minimum": 0, "maximum": 10000}, {"type": "offset", "value": 1000},
        {"type": "scale", "value": 10000}, None]
    props["mlm:output"][0]["classification:classes"][2]["description"] = "Buildings and roads, any material"
    path = tmp_path / "item.json"
    path.write_text(json.dumps(item))

    loaded, _ = convert_item(path, tmp_path / "out")
    card = loaded.card
    assert card.architecture.name == "unet" and card.architecture.kwargs == {}
    assert card.input.spacing == [20.0, 20.0] and card.input.spacing_unit == "m"
    norm = card.input.normalization
    assert norm.mode == "scale" and norm.offset == [0.0, 1000.0, 0.0, 0.0] and norm.scale == [1e-4, 1.0, 1e-4, 1.0]
    assert [c.name for c in card.classes] == ["water body", "water/body", "built-up"]  # sanitised names undone
    assert card.input.channel_names == ["B02", "B03", "B04", "B08"] and card.inference.roi == [64, 64]
    assert sha256_file(loaded.weights_path) == sha256_file(weights)
    assert load_model(tmp_path / "out").card == card

    def refused(mutate, match: str) -> None:
        broken = json.loads(json.dumps(item))
        mutate(broken)
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(broken))
        with pytest.raises(ModelError, match=match) as info:
            convert_item(bad, tmp_path / "never")
        assert "\n" not in str(info.value) and str(info.value).startswith(str(bad if "sha256" not in match
                                                                               else weights))
        assert not (tmp_path / "never").exists()

    first = lambda d: d["properties"]["mlm:input"][0]  # noqa: E731
    refused(lambda d: first(d).update(value_scaling=[{"type": "clip", "minimum": 0, "maximum": 1}]),
            "value_scaling 'clip' has no segflow normalisation")
    refused(lambda d: first(d).update(value_scaling=[{"type": "processing", "format": "gdal-calc",
                                                      "expression": "A*2"}]), r"'processing \(gdal-calc\)'")
    refused(lambda d: first(d)["input"].update(shape=[-1, 4, -1, -1]), "no fixed window size")
    refused(lambda d: d["properties"]["mlm:input"].append(first(d)), "2 inputs")
    refused(lambda d: d["properties"].update({"mlm:tasks": ["classification"]}), "no semantic segmentation")
    refused(lambda d: d["properties"].update({"mlm:architecture": "vit-huge"}), "unknown architecture|registry")
    refused(lambda d: d["assets"]["model"].update(href="https://example.org/net.safetensors"), "not a local file")
    # file://host/... names another machine's file: it had read the same path here
    refused(lambda d: d["assets"]["model"].update(href=f"file://evil.example.com{weights}"), "on host 'evil")
    refused(lambda d: d["assets"]["model"].update(roles=["data"]), "0 assets with the role mlm:model")
    refused(lambda d: d["assets"]["model"].update({"file:checksum": "1220" + "0" * 64}), "sha256")
    refused(lambda d: d["properties"]["mlm:output"][0]["classification:classes"].pop(0), "values 0..N-1")


def test_inspect_then_convert_gives_the_same_model_and_the_same_labels(tmp_path: Path, dask_cluster) -> None:
    from flows.config import SegmentOptions
    from flows.pipeline import segment_one

    original = tiny_model(tmp_path / "orig", spatial_dims=2, channels=3, channel_names=["red", "green", "blue"],
                          normalization={"mode": "scale", "scale": [1 / 255]}, seed=4)
    proc = run("model", "inspect", original.path, "--stac")
    assert proc.returncode == 0, proc.stderr
    item = json.loads(proc.stdout)
    MLModelProperties.model_validate(item["properties"])
    assert item["properties"]["mlm:name"] == original.card.name
    (asset,) = [a for a in item["assets"].values() if "mlm:model" in a["roles"]]
    assert Path(asset["href"]) == original.weights_path.resolve()
    assert asset["file:checksum"] == "1220" + original.weights_sha256
    item_path = tmp_path / "model.item.json"
    item_path.write_text(proc.stdout)

    proc = run("model", "convert", item_path, "--out", tmp_path / "back")
    assert proc.returncode == 0, proc.stderr
    back = load_model(tmp_path / "back")
    assert without(back.card) == without(original.card)
    assert back.weights_sha256 == original.weights_sha256 == sha256_file(tmp_path / "back" / "weights.safetensors")

    # one line and exit 2 for what cannot be done; nothing written
    proc = run("model", "convert", item_path, "--out", tmp_path / "x", "--card", original.path / "card.json")
    assert proc.returncode == 2 and len([ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]) == 1
    assert "--card" in proc.stderr and not (tmp_path / "x").exists()

    # the converted model segments a raster exactly as the original does
    scene = tmp_path / "scene.tif"
    data = np.random.default_rng(2).integers(1, 255, (3, 90, 110), dtype=np.uint8)
    with rasterio.open(scene, "w", driver="GTiff", width=110, height=90, count=3, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(500000, 6000000, 10, 10), nodata=0) as dst:
        dst.write(data)
    labels, items = [], []
    for name, model in (("a", original), ("b", back)):
        segment_one(scene, model, tmp_path / name, SegmentOptions(chunk_size=64, keep_zarr=False), dask_cluster)
        with rasterio.open(tmp_path / name / "scene.tif") as ds:
            labels.append(ds.read(1))
        items.append(json.loads((tmp_path / name / "scene.stac.json").read_text()))
    np.testing.assert_array_equal(labels[0], labels[1])
    assert len(np.unique(labels[0])) > 1
    # the output item describes the model with the same MLM function as `model inspect --stac`
    assert items[0]["properties"]["mlm:input"] == item["properties"]["mlm:input"]
    assert items[0]["properties"]["mlm:input"][0]["value_scaling"] == [{"type": "scale", "value": 255.0}]


def test_a_volume_card_round_trips_with_its_spacing_and_orientation() -> None:
    card = card_of(input={"spatial_dims": 3, "channels": 1, "channel_names": ["T1"], "spacing": [1.5, 1.0, 1.0],
                          "spacing_unit": "mm", "orientation": "RAS", "normalization": {"mode": "image_zscore"}},
                   inference={"roi": [16, 32, 32], "invert": "labels"}, card_version=3)
    item = item_of(card)
    structure = item["properties"]["mlm:input"][0]["input"]
    assert structure["dim_order"] == ["batch", "bands", "depth", "height", "width"]
    assert structure["shape"] == [-1, 1, 16, 32, 32] and "gsd" not in item["properties"]
    back = card_from_item(item, "item.json")
    assert without(back) == without(card) and back.card_version == 3 and back.applies_model_space
