"""End to end per dataset layout: ``segflow train --dataset`` a few steps, then score the model.

Each layout is generated in its real folder and file conventions (tests/natural_datasets.py,
tests/medgeo_datasets.py).  Training goes through the real CLI; the model directory must carry the
dataset's classes and its validation scores.  For the layouts whose images segflow segments (GeoTIFF,
NIfTI), the trained model then segments a case and ``segflow evaluate`` scores it against the case's labels.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from flows.cli import app
from segmentation.modeldir import read_card
from storage.datasets import open_dataset
from tests.medgeo_datasets import geo_raster_dataset, nnunet_dataset
from tests.natural_datasets import write_cityscapes, write_coco, write_voc

runner = CliRunner()


def _card(path: Path, *, spatial_dims: int, channels: int, roi: list[int]) -> Path:
    """A tiny U-Net card; its classes are placeholders that the dataset's table replaces."""
    card = {"name": f"tiny-{spatial_dims}d", "architecture": {"name": "unet", "kwargs": {
                "channels": [4, 8], "strides": [2], "num_res_units": 0}},
            "input": {"spatial_dims": spatial_dims, "channels": channels,
                      "normalization": {"mode": "image_zscore"}},
            "classes": [{"value": 0, "name": "a"}, {"value": 1, "name": "b"}],
            "inference": {"roi": roi, "overlap": 0.25, "batch_size": 2}}
    path.write_text(json.dumps(card))
    return path


def _train(dataset: Path, card: Path, out: Path, *extra: str) -> dict:
    result = runner.invoke(app, ["train", "--dataset", str(dataset), "--card", str(card), "--out", str(out),
                                 "--steps", "4", "--batch-size", "2", "--val-every", "2", *extra])
    assert result.exit_code == 0, result.output
    assert "dataset" in result.output  # it says which layout it found
    return read_card(out / "card.json").model_dump()


def _check_trained(card: dict, dataset: Path, layout: str) -> None:
    found = open_dataset(dataset)
    assert found.layout == layout
    assert [(c["value"], c["name"]) for c in card["classes"]] == [(c.value, c.name) for c in found.classes]
    training = card["training"]
    assert training["dataset"]["layout"] == layout and training["dataset"]["fingerprint"]
    scores = training["validation"]["best"]
    assert scores and all(0.0 <= v <= 1.0 for v in scores.get("dice", {}).values() if v is not None)


@pytest.mark.parametrize("layout", ["voc", "cityscapes", "coco"])
def test_photograph_layouts_train_and_validate(tmp_path, layout):
    writer = {"voc": write_voc, "cityscapes": write_cityscapes, "coco": write_coco}[layout]
    root = writer(tmp_path / "data").root
    card = _card(tmp_path / "card.json", spatial_dims=2, channels=3, roi=[16, 16])
    trained = _train(root, card, tmp_path / "model")
    _check_trained(trained, root, layout)
    assert (tmp_path / "model" / "learning_curve.png").stat().st_size > 0
    assert (tmp_path / "model" / "validation.md").read_text().count("|") > 4


def test_a_photograph_model_segments_the_datasets_pictures_as_training_read_them(tmp_path):
    """A VOC model could not segment a JPEG ("unsupported file type"); GDAL's JPEG decoding also differs from
    Pillow's, which training uses, by up to 44 levels at colour edges. Pictures are now read as training reads
    them, and their PNG label maps are scored as they are."""
    import numpy as np

    from flows.inbox import list_inbox
    from storage.datasets.pictures import read_rgb
    from storage.ingest import ingest

    root = write_voc(tmp_path / "data").root
    card = _card(tmp_path / "card.json", spatial_dims=2, channels=3, roi=[16, 16])
    _train(root, card, tmp_path / "model")
    jpeg = sorted((root / "JPEGImages").glob("*.jpg"))[0]
    truth = root / "SegmentationClass" / f"{jpeg.stem}.png"
    assert np.array_equal(ingest(jpeg, tmp_path / "s.zarr").image[...], read_rgb(jpeg))
    out = tmp_path / "out"
    import warnings

    with warnings.catch_warnings(record=True) as caught:  # printed on the terminal of every picture segmented
        warnings.simplefilter("always")
        seg = runner.invoke(app, ["segment", str(jpeg), "--model", str(tmp_path / "model"), "--out", str(out),
                                  "--no-prefect"])
    assert seg.exit_code == 0, seg.output
    assert not [w for w in caught if "NotGeoreferenced" in type(w.message).__name__], [str(w) for w in caught]
    assert "has no CRS" not in seg.output  # a photograph has none to lose
    ev = runner.invoke(app, ["evaluate", str(out / f"{jpeg.stem}.tif"), "--truth", str(truth), "--classes",
                             str(tmp_path / "model"), "--out", str(tmp_path / "scores")])
    assert ev.exit_code == 0, ev.output
    [case] = json.loads((tmp_path / "scores" / "evaluation.json").read_text())["cases"]
    assert case["ignored_pixels"] > 0  # VOC's 255 borders
    # a nightly inbox leaves pictures alone: a delivery's thumbnail is no scene to segment
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "scene.tif").write_bytes(b"")
    (inbox / "thumbnail.jpg").write_bytes(b"")
    assert list_inbox(inbox) == ([str(inbox / "scene.tif")], [str(inbox / "thumbnail.jpg")])


def test_geo_layout_trains_segments_and_evaluates(tmp_path):
    root = tmp_path / "geo"
    geo_raster_dataset(root, stems=("tile_a", "tile_b", "tile_c"), values=(0, 1, 2), label_crs=True)
    card = _card(tmp_path / "card.json", spatial_dims=2, channels=2, roi=[16, 16])
    trained = _train(root, card, tmp_path / "model")
    _check_trained(trained, root, "geo")

    out = tmp_path / "out"
    seg = runner.invoke(app, ["segment", str(root / "images" / "tile_a.tif"), "--model", str(tmp_path / "model"),
                              "--out", str(out), "--no-prefect"])
    assert seg.exit_code == 0, seg.output
    scores = tmp_path / "scores"
    ev = runner.invoke(app, ["evaluate", str(out / "tile_a.tif"), "--truth", str(root / "labels" / "tile_a.tif"),
                             "--out", str(scores)])
    assert ev.exit_code == 0, ev.output
    report = json.loads((scores / "evaluation.json").read_text())
    dice = [c["dice"] for case in report["cases"] for c in case["classes"] if c.get("dice") is not None]
    assert dice and all(0.0 <= d <= 1.0 for d in dice)


def test_a_geo_dataset_of_more_bands_trains_a_card_naming_its_bands(tmp_path):
    """A 6-band tile set (Sentinel-2 band ids) with a card naming blue, green, red, nir was refused ("has 6
    channels, the card expects 4"), though the same files as an image/label pair trained on the bands by name
    (research-group probe, 2026-12-06).  The network gets the named bands, in the card's order."""
    import rasterio
    from rasterio.transform import from_origin

    from segmentation.modeldir import load_model

    root = tmp_path / "geo"
    rng = np.random.default_rng(4)
    for stem in ("tile_a", "tile_b", "tile_c"):
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "labels").mkdir(parents=True, exist_ok=True)
        profile = dict(driver="GTiff", width=32, height=32, crs="EPSG:32633",
                       transform=from_origin(500000, 4000000, 10, 10))
        with rasterio.open(root / "images" / f"{stem}.tif", "w", count=6, dtype="uint16", **profile) as dst:
            dst.write(rng.integers(0, 3000, (6, 32, 32)).astype(np.uint16))
            for i, band in enumerate(["B01", "B08", "B04", "B03", "B02", "B11"], start=1):
                dst.set_band_description(i, band)
        with rasterio.open(root / "labels" / f"{stem}.tif", "w", count=1, dtype="uint8", **profile) as dst:
            dst.write(rng.integers(0, 2, (1, 32, 32)).astype(np.uint8))
    card = json.loads(_card(tmp_path / "card.json", spatial_dims=2, channels=4, roi=[16, 16]).read_text())
    card["input"]["channel_names"] = ["blue", "green", "red", "nir"]
    (tmp_path / "card.json").write_text(json.dumps(card))
    trained = _train(root, tmp_path / "card.json", tmp_path / "model")
    assert trained["input"]["channel_names"] == ["blue", "green", "red", "nir"]
    seg = runner.invoke(app, ["segment", str(root / "images" / "tile_a.tif"), "--model", str(tmp_path / "model"),
                              "--out", str(tmp_path / "out"), "--no-prefect"])
    assert seg.exit_code == 0, seg.output
    record = json.loads((tmp_path / "out" / "tile_a.provenance.json").read_text())
    assert record["statistics"]["bands"] == ["B02", "B03", "B04", "B08"]
    assert load_model(tmp_path / "model").card.input.channels == 4
    # a card that names no bands is still refused, saying how to take them by name
    card["input"].pop("channel_names")
    (tmp_path / "card.json").write_text(json.dumps(card))
    result = runner.invoke(app, ["train", "--dataset", str(root), "--card", str(tmp_path / "card.json"),
                                 "--out", str(tmp_path / "m2"), "--steps", "2"])
    assert result.exit_code == 2 and "has 6 channels, the card expects 4; a card naming its bands" in result.output


@pytest.mark.parametrize("inference", [{}, {"flip_tta": [0, 1]}, {"blend_outputs": "logits"}])
def test_validation_scores_are_those_of_segment_then_evaluate(tmp_path, inference):
    """The card's validation Dice is what `segment --truth` gives on the validation case: validation had blended
    raw outputs while segment blends probabilities (the card's blend_outputs) and mirrors (its flip_tta), so they
    differed (by 0.0033 on a probe's 64x64 tile) and the best checkpoint was chosen on another predictor's labels."""
    root = tmp_path / "geo"
    geo_raster_dataset(root, stems=("tile_a", "tile_b", "tile_c"), values=(0, 1, 2), label_crs=True)
    card = _card(tmp_path / "card.json", spatial_dims=2, channels=2, roi=[16, 16])
    doc = json.loads(card.read_text())
    doc["inference"].update(inference)
    card.write_text(json.dumps(doc))
    trained = _train(root, card, tmp_path / "model", "--precision", "exact", "--steps", "30", "--val-every", "30")
    [case] = trained["training"]["split"]["validation"]
    best = trained["training"]["validation"]["best"]
    assert best["step"] == 30
    seg = runner.invoke(app, ["segment", str(root / "images" / f"{case}.tif"), "--model", str(tmp_path / "model"),
                              "--out", str(tmp_path / "out"), "--no-prefect", "--precision", "exact",
                              "--truth", str(root / "labels")])
    assert seg.exit_code == 0, seg.output
    [scored] = json.loads((tmp_path / "out" / "evaluation" / "evaluation.json").read_text())["cases"]
    segment_dice = {c["name"]: c["dice"] for c in scored["classes"]}
    assert set(segment_dice) == set(best["dice"])
    for name, dice in best["dice"].items():
        assert dice == pytest.approx(segment_dice[name], abs=1e-5), (name, best["dice"], segment_dice)  # 5 decimals


def test_decathlon_layout_trains_segments_and_evaluates(tmp_path):
    root = tmp_path / "Dataset042_Tiny"
    nnunet_dataset(root, cases=("liver_001", "liver_002", "liver_003"))
    card = _card(tmp_path / "card.json", spatial_dims=3, channels=2, roi=[8, 8, 8])
    trained = _train(root, card, tmp_path / "model")
    _check_trained(trained, root, "decathlon")
    assert [c["name"] for c in trained["classes"]] == ["background", "liver", "tumour"]
    # the model takes the dataset's own files: a case's channel files are one input, named after the case
    out = tmp_path / "out"
    channel_files = [str(root / "imagesTr" / f"liver_001_{c:04d}.nii.gz") for c in range(2)]
    seg = runner.invoke(app, ["segment", *channel_files, "--model", str(tmp_path / "model"), "--out", str(out),
                              "--no-prefect"])
    assert seg.exit_code == 0, seg.output
    ev = runner.invoke(app, ["evaluate", str(out / "liver_001.nii.gz"), "--truth",
                             str(root / "labelsTr" / "liver_001.nii.gz"), "--out", str(tmp_path / "scores")])
    assert ev.exit_code == 0, ev.output
    [case] = json.loads((tmp_path / "scores" / "evaluation.json").read_text())["cases"]
    assert {c["name"] for c in case["classes"]} >= {"liver", "tumour"}


def test_a_cityscapes_model_is_scored_against_the_label_ids_read_as_train_ids(tmp_path):
    """``evaluate --classes MODEL`` had read ``*_gtFine_labelIds.png`` as they are: road (id 7) scored as train id 7,
    'traffic sign', sky (23) as an extra 'class 23', with no note.  The card records the label table training
    read the ids through; the folder ``gtFine/val/<city>/`` pairs ``X_leftImg8bit.tif`` with
    ``X_gtFine_labelIds.png`` (beside ``X_gtFine_instanceIds.png``, which is no label map)."""
    import rasterio

    written = write_cityscapes(tmp_path / "data")
    root, stem = written.root, "frankfurt_000000_000294"
    card = _card(tmp_path / "card.json", spatial_dims=2, channels=3, roi=[16, 16])
    trained = _train(root, card, tmp_path / "model")
    assert [7, 0] in trained["training"]["dataset"]["truth_values"]  # road
    out = tmp_path / "out"
    seg = runner.invoke(app, ["segment", str(root / "leftImg8bit" / "val" / "frankfurt" / f"{stem}_leftImg8bit.png"),
                              "--model", str(tmp_path / "model"), "--out", str(out), "--no-prefect"])
    assert seg.exit_code == 0, seg.output
    train_ids = written.labels[stem]  # what a perfect model writes: train ids, 255 where Cityscapes ignores
    with rasterio.open(out / f"{stem}_leftImg8bit.tif", "r+", IGNORE_COG_LAYOUT_BREAK="YES") as dst:
        dst.write(np.where(train_ids == 255, 0, train_ids).astype(np.uint8), 1)
    ev = runner.invoke(app, ["evaluate", str(out / f"{stem}_leftImg8bit.tif"), "--truth",
                             str(root / "gtFine" / "val" / "frankfurt"), "--classes", str(tmp_path / "model"),
                             "--out", str(tmp_path / "scores")])
    assert ev.exit_code == 0, ev.output
    [case] = json.loads((tmp_path / "scores" / "evaluation.json").read_text())["cases"]
    assert case["truth"].endswith(f"{stem}_gtFine_labelIds.png")
    present = sorted(set(np.unique(train_ids)) - {255})
    scored = {r["value"]: r["dice"] for r in case["classes"] if r["dice"] is not None}
    assert scored == {int(v): 1.0 for v in present} and len(present) > 1, case["classes"]
    assert not [r for r in case["classes"] if r["name"].startswith("class ")]  # no stray label id as a class
    assert case["ignored_pixels"] == int((train_ids == 255).sum()) > 0
    assert any("7 as class 0" in n for n in case["notes"]), case["notes"]
    assert not case["warnings"], case["warnings"]
    # without --classes the ids are scored as they are: a warning says so (it had been silent, road scored as
    # 'traffic sign')
    ev = runner.invoke(app, ["evaluate", str(out / f"{stem}_leftImg8bit.tif"), "--truth",
                             str(root / "gtFine" / "val" / "frankfurt"), "--out", str(tmp_path / "raw")])
    assert ev.exit_code == 0, ev.output
    [case] = json.loads((tmp_path / "raw" / "evaluation.json").read_text())["cases"]
    assert [w.split(":")[0] for w in case["warnings"]] == [f"{stem}_gtFine_labelIds.png holds Cityscapes label ids "
                                                           "(road 7...), not the 19 train ids a Cityscapes model "
                                                           "writes"], case["warnings"]
    assert "pass --classes MODEL" in " ".join(ev.output.split())


def test_a_decathlon_table_with_a_gap_says_how_values_map_and_records_them(tmp_path):
    """A table of 0, 1, 2, 4 (BraTS' original values) trains as classes 0..3: the outputs hold 3 where the
    dataset's files hold 4, and scoring them against those files gave 'enhancing' a Dice of 0 with no word of
    why.  Training now says so and the card records the dataset's values."""
    from tests.medgeo_datasets import msd_dataset

    root = tmp_path / "Task01_Gap"
    msd_dataset(root, labels={0: "background", 1: "necrotic", 2: "edema", 4: "enhancing"})
    card = _card(tmp_path / "card.json", spatial_dims=3, channels=2, roi=[8, 8, 8])
    result = runner.invoke(app, ["train", "--dataset", str(root), "--card", str(card), "--out",
                                 str(tmp_path / "model"), "--steps", "2", "--batch-size", "1"])
    assert result.exit_code == 0, result.output
    assert "note: the dataset's label values are not 0..3: the model's outputs write 3 for 'enhancing' (value 4)" \
        in " ".join(result.output.split())
    trained = read_card(tmp_path / "model" / "card.json").model_dump()
    assert trained["training"]["dataset"]["label_values"] == [0, 1, 2, 4]
    assert [c["name"] for c in trained["classes"]] == ["background", "necrotic", "edema", "enhancing"]
    # scored against the dataset's own files with the model's classes: its values read as the classes they are
    import nibabel as nib

    truth = root / "labelsTr" / "BRATS_001.nii.gz"
    img = nib.load(truth)
    perfect = np.asarray(img.dataobj).astype(np.uint8)
    assert 4 in perfect
    perfect[perfect == 4] = 3  # what the model writes where the dataset says 4
    nib.save(nib.Nifti1Image(perfect, img.affine), tmp_path / "BRATS_001.nii.gz")
    ev = runner.invoke(app, ["evaluate", str(tmp_path / "BRATS_001.nii.gz"), "--truth", str(truth), "--classes",
                             str(tmp_path / "model"), "--out", str(tmp_path / "scores")])
    assert ev.exit_code == 0, ev.output
    [case] = json.loads((tmp_path / "scores" / "evaluation.json").read_text())["cases"]
    assert {r["name"]: r["dice"] for r in case["classes"]} == \
        {"background": 1.0, "necrotic": 1.0, "edema": 1.0, "enhancing": 1.0}
    assert any("4 as class 3" in n for n in case["notes"]), case["notes"]


def test_a_card_without_spacing_records_a_feet_crs_training_grid_in_metres(tmp_path):
    """Tiles in a US State Plane CRS (feet): their 10 ft pixels were recorded as 10 m, and the note then said
    the cases "differ" from that size, their own."""
    from flows.modelspace import card_mapping
    from flows.trainspace import CaseGrid, with_training_spacing
    from segmentation.card import ModelCard
    from storage.geometry import RasterGeometry

    card = ModelCard.model_validate(json.loads(_card(tmp_path / "c.json", spatial_dims=2, channels=2,
                                                     roi=[16, 16]).read_text()))
    feet = RasterGeometry(transform=(10, 0, 1e6, 0, -10, 2e5), width=64, height=64, epsg=2263, dtype="float32")
    recorded, note = with_training_spacing(card, [CaseGrid("a", feet, (64, 64)), CaseGrid("b", feet, (64, 64))])
    assert recorded.input.spacing == pytest.approx([3.048006, 3.048006]) and recorded.input.spacing_unit == "m"
    assert "records the training data's, 3.04801 x 3.04801 m" in note, note
    assert card_mapping(recorded, feet, (64, 64)) is None  # its own grid is the model's
    degrees = RasterGeometry(transform=(1e-4, 0, 10, 0, -1e-4, 50), width=64, height=64, epsg=4326,
                             dtype="float32")
    assert with_training_spacing(card, [CaseGrid("g", degrees, (64, 64))]) == (card, None)


def test_rasters_off_the_cards_grid_are_warped_to_it_and_a_card_without_spacing_records_the_datas(tmp_path):
    """A card saying 20 m trained on 10 m tiles without a word, and segment then showed the network every tile at
    20 m; a card saying nothing let segment run 20 m scenes through a network that had seen only 10 m ones."""
    import nibabel as nib
    import rasterio
    from rasterio.warp import Resampling, reproject

    from flows.modelspace import card_mapping
    from flows.training import _case_sample
    from segmentation.card import ModelCard
    from storage.geometry import RasterGeometry

    root = tmp_path / "geo"
    geo_raster_dataset(root, stems=("tile_a", "tile_b"), values=(0, 1, 2), label_crs=True)
    card = _card(tmp_path / "card.json", spatial_dims=2, channels=2, roi=[16, 16])
    at_20 = json.loads(card.read_text())
    at_20["input"].update(spacing=[20.0, 20.0], spacing_unit="m")
    (tmp_path / "card20.json").write_text(json.dumps(at_20))
    warped = runner.invoke(app, ["train", "--dataset", str(root), "--card", str(tmp_path / "card20.json"), "--out",
                                 str(tmp_path / "m20"), "--steps", "2", "--batch-size", "2"])
    assert warped.exit_code == 0, warped.output
    trained20 = read_card(tmp_path / "m20" / "card.json")
    assert all(tuple(s[1:]) == (32, 32) for s in trained20.training["sample_shapes"])  # 64 px of 10 m at 20 m
    # the labels sampled are GDAL's nearest-neighbour warp of the tile's labels to the 20 m grid
    dataset = open_dataset(root)
    case = next(c for c in dataset.cases if c.id == "tile_a")
    sample = _case_sample(ModelCard.model_validate(at_20), dataset, case, tmp_path / "w", [2**30], [])
    with rasterio.open(root / "labels" / "tile_a.tif") as src:
        reference = np.zeros((32, 32), np.uint8)
        reproject(src.read(1), reference, src_transform=src.transform, src_crs=src.crs,
                  dst_transform=src.transform * src.transform.scale(2, 2), dst_crs=src.crs,
                  resampling=Resampling.nearest)
    np.testing.assert_array_equal(np.asarray(sample.labels[...]), reference)

    result = runner.invoke(app, ["train", "--dataset", str(root), "--card", str(card), "--out", str(tmp_path / "m"),
                                 "--steps", "2", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "records the training data's, 10 x 10 m (input.spacing)" in " ".join(result.output.split())
    trained = read_card(tmp_path / "m" / "card.json")
    assert trained.input.spacing == [10.0, 10.0] and trained.input.spacing_unit == "m"
    grid = dict(width=64, height=64, epsg=32633, dtype="float32")
    assert card_mapping(trained, RasterGeometry(transform=(10, 0, 5e5, 0, -10, 4e6), **grid), (64, 64)) is None
    assert card_mapping(trained, RasterGeometry(transform=(20, 0, 5e5, 0, -20, 4e6), **grid), (64, 64)) is not None

    # volumes of two voxel sizes: nothing to record, and it says why
    data = tmp_path / "Dataset043_Mixed"
    nnunet_dataset(data, cases=("liver_001", "liver_002"))
    for path in [data / "imagesTr" / f"liver_002_{c:04d}.nii.gz" for c in (0, 1)] + \
            [data / "labelsTr" / "liver_002.nii.gz"]:
        img = nib.load(path)
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.diag([1.0, 1.0, 3.0, 1.0])), path)
    card3 = _card(tmp_path / "card3.json", spatial_dims=3, channels=2, roi=[8, 8, 8])
    mixed = runner.invoke(app, ["train", "--dataset", str(data), "--card", str(card3), "--out", str(tmp_path / "m3"),
                                "--steps", "2", "--batch-size", "1"])
    assert mixed.exit_code == 0, mixed.output
    assert "the training cases differ in pixel or voxel size" in " ".join(mixed.output.split())
    assert read_card(tmp_path / "m3" / "card.json").input.spacing is None


def test_volumes_off_the_cards_grid_are_resampled_to_it_as_segment_does(tmp_path):
    """A Decathlon dataset's scans at 1.5 x 1 x 2.5 mm, a card at 2 mm: training had sampled the native grid
    (and segment then showed the network 2 mm inputs). Each case is now taken to the card's grid first, by the
    function segment uses (storage.resample.to_model), image by the card's interpolation, labels by nearest."""
    import dask.array as da

    from flows.modelspace import card_mapping
    from storage.ingest import ingest
    from storage.resample import to_model

    root = tmp_path / "Dataset044_Spaced"
    nnunet_dataset(root, cases=("liver_001", "liver_002"))
    card = json.loads(_card(tmp_path / "card.json", spatial_dims=3, channels=2, roi=[8, 8, 8]).read_text())
    card["input"].update(spacing=[2.0, 2.0, 2.0], spacing_unit="mm")
    (tmp_path / "card.json").write_text(json.dumps(card))
    result = runner.invoke(app, ["train", "--dataset", str(root), "--card", str(tmp_path / "card.json"), "--out",
                                 str(tmp_path / "m"), "--steps", "2", "--batch-size", "1", "--val-fraction", "0.5"])
    assert result.exit_code == 0, result.output
    trained = read_card(tmp_path / "m" / "card.json")
    label = ingest(root / "labelsTr" / "liver_001.nii.gz", tmp_path / "l.zarr")
    mapping = card_mapping(trained, label.meta.geometry, tuple(label.spatial_shape))
    assert mapping is not None and tuple(mapping.model_shape) != tuple(label.spatial_shape)
    shapes = trained.training["sample_shapes"]
    assert shapes and all(tuple(s[1:]) == tuple(mapping.model_shape) for s in shapes), shapes
    # the labels training sampled are segment's resampling of the dataset's own, nearest neighbour
    from flows.trainspace import volume_in_model_space

    image = ingest(root / "imagesTr" / "liver_001_0000.nii.gz", tmp_path / "i.zarr")
    _, moved, _ = volume_in_model_space(trained, image.meta.geometry, image.image, label.image[0], tmp_path / "w")
    expected = to_model(da.from_zarr(label.image).astype(np.float32), mapping, mode="nearest")[0].compute()
    np.testing.assert_array_equal(moved[...], expected.astype(moved.dtype))
    assert set(np.unique(moved[...])) <= set(np.unique(label.image[...]))


def test_an_image_label_pair_volume_is_resampled_to_the_cards_grid_too(tmp_path):
    from flows.modelspace import card_mapping
    from flows.training import train_from_files
    from segmentation.card import ModelCard
    from storage import samples
    from storage.ingest import ingest

    image, truth = samples.make_phantom(tmp_path / "p.nii.gz", shape=(24, 20, 12), seed=3)
    card = json.loads(_card(tmp_path / "card.json", spatial_dims=3, channels=1, roi=[8, 8, 8]).read_text())
    card["input"].update(spacing=[2.0, 2.0, 2.0], spacing_unit="mm")
    card["classes"] = [{"value": 0, "name": "bg"}, {"value": 1, "name": "tissue"}, {"value": 2, "name": "lesion"}]
    model = train_from_files(ModelCard.model_validate(card), [(image, truth)], tmp_path / "m", steps=2,
                             batch_size=1)
    store = ingest(image, tmp_path / "s.zarr")
    mapping = card_mapping(model.card, store.meta.geometry, tuple(store.spatial_shape))
    assert mapping is not None
    assert [tuple(s[1:]) for s in model.card.training["sample_shapes"]] == [tuple(mapping.model_shape)]


def test_training_reads_a_rasters_bands_in_the_order_and_units_segment_gives_them(tmp_path):
    """A card naming blue, green, red, nir trained on a file storing nir first took the file's order, and a card in
    reflectance took the stored digital numbers, while segment reorders by name and applies scale and offset:
    the network learnt from other pixels than it was then shown."""
    import rasterio
    from rasterio.transform import from_origin

    from flows.training import _open, _sample
    from segmentation.card import ModelCard

    dn = np.random.default_rng(1).integers(1000, 3000, (4, 40, 48)).astype(np.uint16)
    path = tmp_path / "scene.tif"
    with rasterio.open(path, "w", driver="GTiff", width=48, height=40, count=4, dtype="uint16", crs="EPSG:32633",
                       transform=from_origin(500000, 4000000, 10, 10)) as dst:
        dst.write(dn)
        for i, name in enumerate(["nir", "red", "green", "blue"], start=1):
            dst.set_band_description(i, name)
        dst.scales, dst.offsets = (1e-4,) * 4, (-0.1,) * 4
    labels = tmp_path / "labels.tif"
    with rasterio.open(labels, "w", driver="GTiff", width=48, height=40, count=1, dtype="uint8", crs="EPSG:32633",
                       transform=from_origin(500000, 4000000, 10, 10)) as dst:
        dst.write(np.zeros((1, 40, 48), np.uint8))
    card = json.loads(_card(tmp_path / "card.json", spatial_dims=2, channels=4, roi=[16, 16]).read_text())
    card["input"].update(channel_names=["blue", "green", "red", "nir"], units="reflectance")
    sample = _sample(ModelCard.model_validate(card), _open(path, tmp_path / "i.zarr"),
                     _open(labels, tmp_path / "l.zarr"), tmp_path / "w")
    expected = dn[::-1].astype(np.float64) * 1e-4 - 0.1  # blue first, in reflectance
    np.testing.assert_allclose(np.asarray(sample.image[...], dtype=np.float64), expected, atol=1e-6)


def test_a_palette_png_given_as_labels_is_its_indices_as_evaluate_reads_it(tmp_path):
    """``train --labels lab.png`` with a palette PNG (VOC's labels) was refused as "a label map must have one
    integer band": it was decoded as a photograph, into its colours (research-group probe, 2026-12-06).  A
    palette PNG gives its indices, a 16-bit grey one its values; a colour picture is still refused."""
    from PIL import Image

    from flows.training import _open

    values = np.zeros((24, 32), np.uint8)
    values[4:12, 6:20], values[14:20, 2:9] = 1, 2
    palette = Image.fromarray(values, "P")
    palette.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [0] * 759)
    palette.save(tmp_path / "palette.png")
    store = _open(tmp_path / "palette.png", tmp_path / "p.zarr", labels=True)
    assert store.image.shape == (1, 24, 32) and np.array_equal(store.image[0], values)
    deep = (values.astype(np.uint16) * 300)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert np.array_equal(_open(tmp_path / "deep.png", tmp_path / "d.zarr", labels=True).image[0], deep)
    # the same file as an image stays a picture (its colours), as segment reads it
    assert _open(tmp_path / "palette.png", tmp_path / "i.zarr").image.shape == (3, 24, 32)


@pytest.mark.parametrize("layout", ["cityscapes", "geo"])
def test_a_dataset_file_whose_name_is_no_utf8_is_one_line(tmp_path, layout):
    """A city folder or a tile named in another encoding had ended in a traceback (from the dataset's fingerprint,
    or from GDAL opening the tile), where a single input so named is one line."""
    import os

    if layout == "cityscapes":
        root = write_cityscapes(tmp_path / "data").root
        city = next(p for p in (root / "leftImg8bit" / "train").iterdir())
        for top in ("leftImg8bit", "gtFine"):
            old = root / top / "train" / city.name
            os.rename(os.fsencode(old), os.fsencode(old.parent) + b"/br\xffmen")
        card = _card(tmp_path / "card.json", spatial_dims=2, channels=3, roi=[32, 32])
    else:
        root = tmp_path / "geo"
        geo_raster_dataset(root)
        for sub in ("images", "labels"):
            os.rename(os.fsencode(root / sub / "tile_b.tif"), os.fsencode(root / sub) + b"/tile_\xe9b.tif")
        card = _card(tmp_path / "card.json", spatial_dims=2, channels=2, roi=[32, 32])
    result = runner.invoke(app, ["train", "--dataset", str(root), "--card", str(card), "--out", str(tmp_path / "m"),
                                 "--steps", "2", "--batch-size", "1"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert errors[0].endswith("its name is not valid UTF-8 (a file named in another encoding), which GDAL cannot "
                              "open: rename it"), errors
    assert not (tmp_path / "m").exists()


def test_a_coco_category_drawn_only_in_the_validation_split_is_refused(tmp_path):
    """Every dog annotated in val2017 only: it trained, exit 0, a model with a class it never saw."""
    from tests.natural_datasets import edit_json

    root = write_coco(tmp_path / "data").root
    val = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    assert any(a["category_id"] == 18 for a in val["annotations"])  # the dog stays in val: the check can fail
    edit_json(root / "annotations" / "instances_train2017.json",
              lambda d: d.update(annotations=[a for a in d["annotations"] if a["category_id"] != 18]))
    card = _card(tmp_path / "card.json", spatial_dims=2, channels=3, roi=[32, 32])
    result = runner.invoke(app, ["train", "--dataset", str(root), "--card", str(card), "--out", str(tmp_path / "m"),
                                 "--steps", "2", "--batch-size", "1"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {root}: 'dog' (class 3) is drawn in no training case (only in the validation split): "
                      "the model would never learn it; annotate some training images with it, or drop the category"]
    assert not (tmp_path / "m").exists()
