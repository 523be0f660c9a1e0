"""Training with validation: splits, the spatial hold-out, per-class Dice, the best checkpoint, resume,
the learning curve, and training from a dataset (tiny generated data, a few steps each)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, safe_open

from flows.training import choose_split, dataset_fingerprint, train_from_dataset, train_from_files
from segmentation.card import ModelCard
from segmentation.checkpoint import LAST_FILE, STATE_FILE
from segmentation.holdout import Holdout, Region
from segmentation.modeldir import load_model
from segmentation.trainreport import CURVE_FILE, TABLE_FILE
from segmentation.training import TrainingSample, save_trained, train
from segmentation.validation import Validator
from storage.classes import LabelClass
from storage.datasets.base import Case, CaseData, fingerprint
from storage.errors import ConfigError, IncompatibleInputError
from storage.samples import make_scene

# ---------------------------------------------------------------- fixture generators


def tiny_card(*, classes: int = 2, channels: int = 1, spatial_dims: int = 2, roi: int = 16) -> ModelCard:
    return ModelCard.model_validate({
        "name": f"tiny-{spatial_dims}d",
        "architecture": {"name": "unet", "kwargs": {"channels": [4, 8], "strides": [2], "num_res_units": 1}},
        "input": {"spatial_dims": spatial_dims, "channels": channels,
                  "normalization": {"mode": "scale", "scale": [0.01]}},
        "classes": [{"value": v, "name": f"c{v}"} for v in range(classes)],
        "inference": {"roi": [roi] * spatial_dims, "overlap": 0.25, "batch_size": 2},
    })


def blobs(seed: int, shape: tuple[int, ...] = (32, 32)) -> tuple[np.ndarray, np.ndarray]:
    """A noisy (1, *shape) float image with bright rectangles labelled 1, and its labels."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    for _ in range(3):
        lo = [int(rng.integers(0, s - 8)) for s in shape]
        labels[tuple(slice(a, a + int(rng.integers(4, 9))) for a in lo)] = 1
    image = (labels * 100.0 + rng.normal(20, 10, shape)).astype(np.float32)[None]
    return image, labels


class Recorded:
    """A numpy array that notes every index it is read with (to see which pixels training touched)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape, self.dtype, self.ndim = array, array.shape, array.dtype, array.ndim
        self.reads: list[tuple] = []

    def __getitem__(self, key):
        self.reads.append(key if isinstance(key, tuple) else (key,))
        return self.array[key]


class TinyDataset:
    """A Dataset (storage.datasets.base protocol) over grey PNG images and label PNGs written to a folder.

    Stands in for the real layouts (VOC, Cityscapes ...) so these tests depend on the interface only.
    """

    layout = "tiny-png"
    ignore_index = 255
    spatial_dims = 2
    channels = 1

    def __init__(self, root: Path, splits: list[str | None]) -> None:
        self.root, self.name = root, "tiny blobs"
        self.classes = [LabelClass(value=0, name="ground", color=(0, 0, 0)),
                        LabelClass(value=1, name="blob", color=(220, 40, 40))]
        (root / "images").mkdir(parents=True)
        (root / "labels").mkdir()
        self.cases = []
        for n, split in enumerate(splits):
            image, labels = blobs(n + 10)
            labels[:2] = 255  # a strip without labels
            Image.fromarray(np.clip(image[0], 0, 255).astype(np.uint8)).save(root / "images" / f"case{n}.png")
            Image.fromarray(labels).save(root / "labels" / f"case{n}.png")
            self.cases.append(Case(id=f"case{n}", images=(root / "images" / f"case{n}.png",),
                                   labels=root / "labels" / f"case{n}.png", split=split))
        self.read_ids: list[str] = []

    def read(self, case: Case, work: Path) -> CaseData:
        self.read_ids.append(case.id)
        image = np.asarray(Image.open(case.images[0]))[None]
        return CaseData(image=image, labels=np.asarray(Image.open(case.labels)), spacing=(1.0, 1.0))


# ---------------------------------------------------------------- splits and the hold-out view


def test_choose_split_rules():
    two = choose_split([None, None], val_fraction=0.2, seed=0)
    assert two.method == "fraction" and len(two.val) == 1 and sorted(two.train + two.val) == [0, 1]
    ten = [choose_split([None] * 10, val_fraction=0.2, seed=s) for s in (0, 0, 1)]
    assert ten[0].val == ten[1].val and len(ten[0].val) == 2 and ten[0].val != ten[2].val  # seeded
    assert choose_split([None], val_fraction=0.2, seed=0).val == []  # one image: nothing to hold back
    declared = choose_split(["train", "val", "test", None], val_fraction=0.5, seed=0)
    assert (declared.method, declared.train, declared.val, declared.excluded) == ("dataset", [0, 3], [1], [2])
    held = choose_split(["train", "val"], val_fraction=0.0, seed=0, holdout=Holdout("x", 0.5))
    assert held.method == "holdout" and held.train == [0, 1] and held.val == []
    with pytest.raises(ConfigError):
        choose_split([None, None], val_fraction=1.0, seed=0)
    # a validation split alone (COCO's val2017 JSON): refused, even with --val-fraction, before; now split by it
    only_val = choose_split(["val"] * 5, val_fraction=0.2, seed=0)
    assert only_val.method == "fraction" and len(only_val.val) == 1 and len(only_val.train) == 4
    with pytest.raises(ConfigError, match="give --val-fraction F to split them, or --holdout AXIS:F"):
        choose_split(["val"] * 5, val_fraction=0.0, seed=0)


def test_holdout_boxes_and_region_is_a_view():
    h = Holdout.parse("x:0.25")
    assert (h.axis, h.fraction, str(h)) == ("x", 0.25, "x:0.25")
    for bad in ("x", "w:0.5", "x:1", "x:0", "y:abc", "x:-1"):
        with pytest.raises(ConfigError):
            Holdout.parse(bad)
    with pytest.raises(ConfigError):
        Holdout.parse("z:0.5").boxes((8, 8))  # a 2-D image has no z
    train_box, val_box = h.boxes((6, 8))
    assert train_box == (slice(0, 6), slice(0, 2)) and val_box == (slice(0, 6), slice(2, 8))
    last = Holdout.parse("y:-0.5")  # the last half along y trains (a RAS volume's anterior half)
    assert str(last) == "y:-0.5" and last.boxes((6, 8)) == ((slice(3, 6), slice(0, 8)), (slice(0, 3), slice(0, 8)))
    base = np.arange(3 * 6 * 8).reshape(3, 6, 8)
    view = Region(base, val_box, lead=1)
    assert view.shape == (3, 6, 6) and view.nbytes == 3 * 6 * 6 * base.itemsize
    np.testing.assert_array_equal(view[...], base[:, :, 2:])
    np.testing.assert_array_equal(view[:, 1:4, -3:], base[:, 1:4, 5:8])
    np.testing.assert_array_equal(view[1, 2], base[1, 2, 2:])
    np.testing.assert_array_equal(view[:, 1:3], base[:, 1:3, 2:])  # a single-axis slab, as label scans read
    assert np.shares_memory(view[:, :, :], base)  # a view: nothing copied
    with pytest.raises(IndexError):
        view[0, 0, 6]


def test_holdout_keeps_training_patches_out_of_the_validation_part():
    image, labels = blobs(3, (32, 64))
    rec_image, rec_labels = Recorded(image), Recorded(labels)
    result = train(tiny_card(), [TrainingSample(rec_image, rec_labels, ignore_index=None)], steps=6, batch_size=3,
                   holdout=Holdout.parse("x:0.5"), val_every=3, precision="exact")
    cut = 32
    columns = [key[-1] for key in rec_image.reads]
    training = [c for c in columns if c.stop <= cut]
    validation = [c for c in columns if c.start >= cut]
    assert len(training) + len(validation) == len(columns)  # no read straddles the cut
    patches = [c for c in training if c.stop - c.start == 16]
    assert len(patches) == 6 * 3  # every sampled patch, its origin inside the training part
    assert all(0 <= c.start <= cut - 16 for c in patches)
    assert validation and all(c == slice(32, 64, 1) for c in validation)  # validation saw the other half whole
    assert all(key[-1].stop <= cut for key in rec_labels.reads if key[-1].start < cut)
    prov = result.provenance
    assert prov["holdout"] == {"axis": "x", "fraction": 0.5,
                               "boxes": [{"train": [[0, 32], [0, 32]], "validation": [[0, 32], [32, 64]]}]}
    assert [h["step"] for h in prov["validation"]["history"]] == [3, 6]
    assert prov["validation"]["regions"] == [{"shape": [32, 32], "method": "sliding_window", "pixels": 1024}]


# ---------------------------------------------------------------- validation, best checkpoint, reports


def test_validation_every_n_steps_and_the_best_checkpoint_is_the_saved_model(tmp_path):
    """Validation labels contradict the training labels (blobs are class 0 there), so the more the network
    learns the worse it validates: the best checkpoint is an early step, not the last."""
    card = tiny_card()
    samples = [TrainingSample(*blobs(s)) for s in (1, 2)]
    image, labels = blobs(3)
    val = [TrainingSample(image, 1 - labels)]
    events: list[dict] = []
    result = train(card, samples, validation=val, steps=9, batch_size=2, val_every=3, lr=2e-2, seed=2,
                   precision="exact", log=events.append)
    validated = [e for e in events if "validation" in e]
    assert [e["step"] for e in validated] == [3, 6, 9]
    assert all(set(e["validation"]["dice"]) == {"c0", "c1"} for e in validated)
    v = result.provenance["validation"]
    scores = [h["mean_foreground"] for h in v["history"]]
    assert scores[0] > scores[-1] and v["best"]["step"] == 3 and v["last"]["step"] == 9
    assert v["best"]["mean_foreground"] == max(scores)

    saved = save_trained(tmp_path / "model", card, result)
    loaded = load_model(tmp_path / "model")
    assert loaded.weights_sha256 == saved.weights_sha256

    def rescore(state: dict[str, torch.Tensor]) -> dict:
        module = loaded.module
        module.load_state_dict(state)
        score = Validator(card, val, seed=2)(module.to(memory_format=torch.channels_last), torch.device("cpu"),
                                             None, torch.channels_last)
        return {k: round(score.dice[c], 5) for c, k in enumerate(["c0", "c1"])}

    weights = load_file(str(tmp_path / "model" / "weights.safetensors"))
    last = load_file(str(tmp_path / "model" / "checkpoints" / LAST_FILE))
    assert any(not torch.equal(weights[k], last[k]) for k in weights)
    assert rescore(weights) == v["best"]["dice"]  # the saved weights are the best step's
    assert rescore(last) == v["last"]["dice"]  # and the last step's are kept beside them


def test_learning_curve_png_and_per_class_table(tmp_path):
    card = tiny_card()
    result = train(card, [TrainingSample(*blobs(1))], validation=[TrainingSample(*blobs(2))], steps=4, batch_size=2,
                   val_every=2, precision="exact")
    save_trained(tmp_path / "m", card, result)
    png = (tmp_path / "m" / CURVE_FILE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    with Image.open(tmp_path / "m" / CURVE_FILE) as im:
        im.verify()
        assert im.size[0] > 400 and im.size[1] > 200
    table = (tmp_path / "m" / TABLE_FILE).read_text()
    rows = [line for line in table.splitlines() if line.startswith("| c") and "class" not in line]
    per_class = load_model(tmp_path / "m").card.training["validation"]["per_class"]
    assert [r["class"] for r in per_class] == ["c0", "c1"] and len(rows) == 2
    best = result.provenance["validation"]["best"]
    assert f"{best['dice']['c1']:.4f}" in rows[1] and f"step {best['step']}" in table

    plain = train(card, [TrainingSample(*blobs(1))], steps=2, batch_size=1, precision="exact")
    save_trained(tmp_path / "m", card, plain)  # rewritten without validation: no stale table
    assert "validation" not in plain.provenance and not (tmp_path / "m" / TABLE_FILE).exists()
    assert plain.last is None and not (tmp_path / "m" / "checkpoints" / LAST_FILE).exists()
    assert (tmp_path / "m" / CURVE_FILE).stat().st_size > 0


def test_validator_skips_ignore_pixels_and_samples_large_regions_with_fixed_patches():
    card = tiny_card()
    image, labels = blobs(5, (32, 48))
    labels[:, :10] = 255
    module = torch.nn.Conv2d(1, 2, 1)  # any network: the scores' bookkeeping is under test
    whole = Validator(card, [TrainingSample(image, labels)], seed=0)
    score = whole(module, torch.device("cpu"))
    assert whole.describe() == [{"shape": [32, 48], "method": "sliding_window", "pixels": 32 * 48}]
    assert score.pixels == int((labels != 255).sum())  # ignore pixels are never counted
    assert module.training  # left as it was found

    small_budget = dict(seed=0, in_memory_pixels=32 * 48 - 1)  # as if the region were too large to hold
    patches = Validator(card, [TrainingSample(image, labels)], **small_budget)
    again = Validator(card, [TrainingSample(image, labels)], **small_budget)
    other = Validator(card, [TrainingSample(image, labels)], seed=1, in_memory_pixels=32 * 48 - 1)
    (described,) = patches.describe()
    assert described["method"] == "seeded_patches" and described["patch"] == [16, 16]
    assert described["patches"] == 256 and described["pixels"] == 256 * 16 * 16
    assert patches.regions[0].boxes == again.regions[0].boxes != other.regions[0].boxes  # fixed by the seed
    assert all(b.stop <= s for box in patches.regions[0].boxes for b, s in zip(box, (32, 48)))
    scored = patches(module, torch.device("cpu"))
    assert 0 < scored.pixels <= 256 * 16 * 16 and scored.pixels == sum(
        int((labels[box] != 255).sum()) for box in patches.regions[0].boxes)


# ---------------------------------------------------------------- resume


class Interrupted(Exception):
    pass


def test_resume_gives_the_uninterrupted_run(tmp_path):
    card = tiny_card()
    samples = [TrainingSample(*blobs(s)) for s in (1, 2)]
    val = [TrainingSample(*blobs(3))]
    kw = dict(validation=val, steps=12, batch_size=2, val_every=4, seed=3, precision="exact")
    whole = train(card, samples, checkpoints=tmp_path / "a", **kw)

    def stop_at_10(entry: dict) -> None:
        if entry["step"] == 10:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(card, samples, checkpoints=tmp_path / "b", log=stop_at_10, **kw)
    state_file = tmp_path / "b" / STATE_FILE
    assert [p.name for p in (tmp_path / "b").iterdir()] == [STATE_FILE]  # no temporary left behind
    with safe_open(str(state_file), "pt") as f:  # safetensors + JSON, nothing pickled
        meta = json.loads(f.metadata()["segflow_resume"])
    assert meta["step"] == 8 and len(meta["losses"]) == 8 and [h["step"] for h in meta["history"]] == [4, 8]

    resumed = train(card, samples, checkpoints=tmp_path / "b", resume=True, **kw)
    a, b = whole.module.state_dict(), resumed.module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(whole.last[k], resumed.last[k]) for k in whole.last)
    assert resumed.losses == whole.losses
    assert resumed.provenance["validation"]["history"] == whole.provenance["validation"]["history"]
    assert resumed.provenance["resumed_from_steps"] == [8]

    save_trained(tmp_path / "model", card, resumed)
    assert not state_file.exists()  # the model directory is committed: the resume state is spent
    with pytest.raises(ConfigError, match="no resume state"):
        train(card, samples, checkpoints=tmp_path / "b", resume=True, **kw)


def test_resume_refuses_another_run(tmp_path):
    card = tiny_card()
    samples = [TrainingSample(*blobs(1))]

    def stop(entry: dict) -> None:
        if entry["step"] == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(card, samples, steps=4, batch_size=1, val_every=2, checkpoints=tmp_path, log=stop, precision="exact")
    with pytest.raises(ConfigError, match="different run .*batch_size"):
        train(card, samples, steps=4, batch_size=2, val_every=2, checkpoints=tmp_path, resume=True,
              precision="exact")
    with pytest.raises(ConfigError):
        train(card, samples, steps=4, batch_size=1, resume=True)  # no checkpoints folder named


def test_resume_on_other_files_is_refused(tmp_path):
    """The interrupted run trained on one label file; the same-shaped file edited since is other data: resuming
    would mix the two and record only the new one (it did, and the card's provenance then lied)."""
    image, truth = make_scene(tmp_path / "scene.tif", size=(64, 96), seed=4)
    card = tiny_card(classes=5, channels=4)
    run = dict(steps=4, batch_size=2, patch=(16, 16), precision="exact", val_every=2, holdout="x:0.5")

    def stop(entry: dict) -> None:
        if entry["step"] >= 2 and "validation" in entry:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_from_files(card, [(image, truth)], tmp_path / "m", on_step=stop, **run)
    edited = _relabelled(truth, tmp_path / "edited.tif", values=lambda a: np.where(a == 1, 2, a))
    with pytest.raises(ConfigError, match="different run .*data"):
        train_from_files(card, [(image, edited)], tmp_path / "m", resume=True, **run)
    loaded = train_from_files(card, [(image, truth)], tmp_path / "m", resume=True, **run)  # the same files go on
    assert loaded.card.training["resumed_from_steps"] == [2]


def test_resume_on_a_dataset_whose_label_was_edited_in_place_is_refused(tmp_path):
    """A dataset's label raster rewritten at the same size (uncompressed GeoTIFF): its fingerprint (names and
    sizes, as the card records) stays, and a resume had carried on with the new labels while the card kept the
    best step scored on the old ones.  The resume key also holds the files' modification times."""
    import os

    import rasterio

    from storage.datasets import open_dataset
    from tests.medgeo_datasets import geo_raster_dataset

    root = tmp_path / "geo"
    geo_raster_dataset(root, stems=("tile_a", "tile_b", "tile_c"), values=(0, 1, 2), label_crs=True)
    card = tiny_card(classes=3, channels=2)
    run = dict(steps=4, batch_size=2, patch=(16, 16), precision="exact", val_every=2)

    def stop(entry: dict) -> None:
        if entry["step"] >= 2 and "validation" in entry:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_from_dataset(card, open_dataset(root), tmp_path / "m", on_step=stop, say=None, **run)
    label = root / "labels" / "tile_a.tif"
    size, before = label.stat().st_size, dataset_fingerprint(open_dataset(root))
    with rasterio.open(label, "r+") as dst:
        dst.write(np.full((1, dst.height, dst.width), 2, dst.dtypes[0]))
    os.utime(label, ns=(label.stat().st_atime_ns, label.stat().st_mtime_ns + 1_000_000_000))
    assert label.stat().st_size == size and dataset_fingerprint(open_dataset(root)) == before
    with pytest.raises(ConfigError, match="different run .*data"):
        train_from_dataset(card, open_dataset(root), tmp_path / "m", resume=True, say=None, **run)


# ---------------------------------------------------------------- flows: files and datasets


def test_train_from_dataset_takes_its_classes_split_and_fingerprint(tmp_path):
    dataset = TinyDataset(tmp_path / "data", ["train", "train", "val", "test"])
    card = tiny_card(classes=3)  # replaced by the dataset's two classes
    said: list[str] = []
    loaded = train_from_dataset(card, dataset, tmp_path / "model", steps=4, batch_size=2, val_every=2,
                                precision="exact", say=said.append)
    assert len(said) == 1 and "tiny-png" in said[0] and "validating on 1" in said[0]
    assert sorted(dataset.read_ids) == ["case0", "case1", "case2"]  # the test case is never read
    reloaded = load_model(tmp_path / "model")
    assert [(c.name, c.color) for c in reloaded.card.classes] == [("ground", (0, 0, 0)), ("blob", (220, 40, 40))]
    with torch.no_grad():
        assert reloaded.module(torch.zeros(1, 1, 16, 16)).shape[1] == 2  # the network's outputs follow
    t = loaded.card.training
    files = [f for c in dataset.cases for f in (*c.images, c.labels)]
    assert t["dataset"]["name"] == "tiny blobs" and t["dataset"]["layout"] == "tiny-png"
    assert t["dataset"]["fingerprint"] == fingerprint(dataset.root, files) == dataset_fingerprint(dataset)
    assert t["split"] == {"method": "dataset", "train": ["case0", "case1"], "validation": ["case2"],
                          "excluded_test": 1}
    assert set(t["validation"]["best"]["dice"]) == {"ground", "blob"}
    assert t["ignore_index"] == [255]

    with pytest.raises(IncompatibleInputError, match="channels"):
        train_from_dataset(tiny_card(channels=3), dataset, tmp_path / "other", steps=1, batch_size=1, say=None)


def test_train_from_files_with_a_holdout(tmp_path):
    image, truth = make_scene(tmp_path / "scene.tif", size=(64, 96), seed=4)
    card = tiny_card(classes=5, channels=4)
    loaded = train_from_files(card, [(image, truth)], tmp_path / "model", steps=4, batch_size=2, patch=(16, 16),
                              holdout="x:0.5", val_every=2, precision="exact")
    t = loaded.card.training
    assert t["split"] == {"method": "holdout", "holdout": "x:0.5", "train": ["0-scene"], "validation": [],
                          "excluded_test": 0}
    assert t["holdout"]["boxes"] == [{"train": [[0, 64], [0, 48]], "validation": [[0, 64], [48, 96]]}]
    assert t["dataset"]["layout"] == "pairs" and len(t["dataset"]["fingerprint"]) == 64
    assert [h["step"] for h in t["validation"]["history"]] == [2, 4]
    assert (tmp_path / "model" / "checkpoints" / LAST_FILE).is_file()
    assert not (tmp_path / "model" / "checkpoints" / STATE_FILE).exists()


def _relabelled(truth: Path, out: Path, *, values=None, shift: float = 0.0, crs: bool = True) -> Path:
    """A copy of the label raster ``truth`` with its values mapped by ``values`` and its grid moved by ``shift``
    metres east (or its CRS dropped)."""
    import rasterio

    with rasterio.open(truth) as src:
        labels, profile = src.read(1), src.profile
    if values is not None:
        labels = values(labels)
    t = profile["transform"]
    profile.update(transform=rasterio.Affine(t.a, t.b, t.c + shift, t.d, t.e, t.f), crs=profile["crs"] if crs else None)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(labels.astype(profile["dtype"]), 1)
    return out


def test_labels_off_the_image_grid_out_of_the_card_s_classes_or_all_ignored_are_refused(tmp_path):
    """Each was accepted before: a label raster on another grid trained silently on misaligned labels, an
    all-ignored one "trained" on nothing, and a stray class value was refused without naming the file."""
    from storage.errors import InvalidInputError

    image, truth = make_scene(tmp_path / "scene.tif", size=(64, 96), seed=4)
    card = tiny_card(classes=5, channels=4)
    run = dict(steps=2, batch_size=2, patch=(16, 16), precision="exact")
    shifted = _relabelled(truth, tmp_path / "shifted.tif", shift=100.0)
    with pytest.raises(IncompatibleInputError) as err:
        train_from_files(card, [(image, shifted)], tmp_path / "m1", **run)
    assert str(err.value) == (f"{shifted}: is not on the grid of {image.resolve()} (CRS or transform differ); warp "
                              "it onto that grid first")
    assert not (tmp_path / "m1").exists()
    # a label raster without a CRS is taken by its shape (a mask saved by an image editor has no georeference)
    train_from_files(card, [(image, _relabelled(truth, tmp_path / "plain.tif", shift=100.0, crs=False))],
                     tmp_path / "m2", **run)
    stray = _relabelled(truth, tmp_path / "stray.tif", values=lambda a: np.where(a == 3, 7, a))
    with pytest.raises(InvalidInputError) as err:
        train_from_files(card, [(image, stray)], tmp_path / "m3", **run)
    assert str(err.value) == (f"{stray}: holds label value(s) 7, which are not among the card's classes 0..4 "
                              "(nor the ignore value 255)")
    ignored = _relabelled(truth, tmp_path / "ignored.tif", values=lambda a: np.full_like(a, 255))
    with pytest.raises(InvalidInputError) as err:
        train_from_files(card, [(image, ignored)], tmp_path / "m4", **run)
    assert str(err.value).startswith(f"{ignored}: no labelled pixel to train on")
    # one class only (a blank mask, or labels 0/1 meant for another card): trained silently into a model that
    # draws that class everywhere
    blank = _relabelled(truth, tmp_path / "blank.tif", values=lambda a: np.where(a == 255, 255, 2))
    with pytest.raises(InvalidInputError) as err:
        train_from_files(card, [(image, blank)], tmp_path / "m6", **run)
    assert str(err.value) == (f"{blank}: every labelled pixel of the training part is class 2 (c2) of the card's 5: "
                              "a model trained on it can only ever draw that class (are these the label files, and "
                              "their values the card's classes?)")
    assert not any((tmp_path / m).exists() for m in ("m3", "m4", "m6"))
    # a hold-out with nothing labelled in it: every validation was "n/a" and the first step validated was kept
    half = _relabelled(truth, tmp_path / "half.tif", values=lambda a: np.where(np.arange(a.shape[1]) >= 48, 255, a))
    with pytest.raises(InvalidInputError) as err:
        train_from_files(card, [(image, half)], tmp_path / "m5", **run, holdout="x:0.5", val_every=1)
    assert str(err.value).startswith(f"{half}: no labelled pixel to validate on")
    assert not (tmp_path / "m5").exists()


def test_train_command_with_holdout_and_its_argument_errors(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    image, truth = make_scene(tmp_path / "scene.tif", size=(64, 96), seed=4)
    card = tmp_path / "card.json"
    card.write_text(tiny_card(classes=5, channels=4).model_dump_json())
    runner = CliRunner()
    common = ["train", "--card", str(card), "--out", str(tmp_path / "model"), "--steps", "4", "--batch-size", "2",
              "--precision", "exact"]
    done = runner.invoke(app, [*common, "--image", str(image), "--labels", str(truth), "--holdout", "x:0.5",
                               "--val-every", "2"])
    assert done.exit_code == 0, done.output
    training = load_model(tmp_path / "model").card.training
    assert training["split"]["method"] == "holdout" and [h["step"] for h in training["validation"]["history"]] == [2, 4]
    assert (tmp_path / "model" / CURVE_FILE).is_file() and (tmp_path / "model" / TABLE_FILE).is_file()
    assert "no validation" not in done.output
    # one pair and no hold-out: --val-fraction has nothing to split, which is said (it was silent), and no empty
    # checkpoints folder is left
    lone = runner.invoke(app, [*common[:4], str(tmp_path / "lone"), *common[5:], "--image", str(image), "--labels",
                               str(truth), "--val-fraction", "0.5"])
    assert lone.exit_code == 0, lone.output
    assert "no validation: one image/label pair cannot be split by --val-fraction" in " ".join(lone.output.split())
    assert not (tmp_path / "lone" / "checkpoints").exists() and (tmp_path / "lone" / "weights.safetensors").is_file()
    # --quiet (a scheduled retraining): the note on the data stays, the step, validation and ok lines go
    quiet = runner.invoke(app, [*common[:4], str(tmp_path / "quiet"), *common[5:], "--image", str(image),
                                "--labels", str(truth), "--val-fraction", "0.5", "-q"])
    assert quiet.exit_code == 0 and (tmp_path / "quiet" / "weights.safetensors").is_file(), quiet.output
    assert [line.split(":")[0] for line in quiet.output.splitlines() if line.strip() and line[0] != " "] == \
        ["note", "no validation"], quiet.output
    assert "trained" in lone.output and "trained" not in quiet.output
    held = runner.invoke(app, [*common[:4], str(tmp_path / "held-quiet"), *common[5:], "--image", str(image),
                               "--labels", str(truth), "--holdout", "x:0.5", "--val-every", "2", "--quiet"])
    assert held.exit_code == 0 and " ".join(held.output.split()).startswith("note: the card declared no spacing"), \
        held.output
    assert held.output.count("note:") == 1 and "step" not in held.output, held.output
    assert "step 4: validation" in done.output
    # a label file or --out refused: the one line says so, with no note about a training that never ran before it
    stray = _relabelled(truth, tmp_path / "stray.tif", values=lambda a: np.where(a == 3, 7, a))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("someone's")
    for out, labels, problem in ((tmp_path / "stray", stray, "holds label value(s) 7"),
                                 (tmp_path / "other", truth, "folder of other files")):
        refused = runner.invoke(app, [*common[:4], str(out), *common[5:], "--image", str(image),
                                      "--labels", str(labels)])
        assert refused.exit_code == 2, refused.output
        [line] = [x for x in refused.output.splitlines() if x.strip()]
        assert line.startswith("error: ") and problem in line, refused.output

    for extra, message in [(["--dataset", str(tmp_path), "--image", str(image), "--labels", str(truth)], "not both"),
                           ([], "nothing to train on"),
                           (["--image", str(image), "--labels", str(truth), "--holdout", "x:2"], "AXIS:FRACTION"),
                           (["--image", str(image), "--labels", str(truth), "--resume"], "no resume state")]:
        failed = runner.invoke(app, [*common, *extra])
        assert failed.exit_code == 2 and message in " ".join(failed.output.split()), failed.output


def test_an_nnunet_datasets_channel_names_must_be_the_cards_or_become_them(tmp_path):
    """dataset.json names its channels (T1, T2): a card naming none takes them; a card naming others (CT, PET) is
    refused, as its classes would be replaced and its channel count checked.  It trained silently and kept the
    card's names for channels that were not them."""
    from storage.datasets import decathlon
    from tests.medgeo_datasets import nnunet_dataset

    nnunet_dataset(tmp_path / "ds")
    dataset = decathlon.LAYOUT.open(tmp_path / "ds")
    plain = tiny_card(classes=3, channels=2, spatial_dims=3, roi=8)
    run = dict(steps=1, batch_size=1, precision="exact", say=None)
    loaded = train_from_dataset(plain, dataset, tmp_path / "m1", **run)
    assert loaded.card.input.channel_names == ["T1", "T2"]
    named = ModelCard.model_validate({**plain.model_dump(), "input": {**plain.input.model_dump(),
                                                                      "channel_names": ["CT", "PET"]}})
    with pytest.raises(IncompatibleInputError, match="its channels are T1, T2, the card's CT, PET"):
        train_from_dataset(named, dataset, tmp_path / "m2", **run)
    assert not (tmp_path / "m2").exists()
    same = ModelCard.model_validate({**plain.model_dump(), "input": {**plain.input.model_dump(),
                                                                     "channel_names": ["t1", "t2"]}})
    assert train_from_dataset(same, dataset, tmp_path / "m3", **run).card.input.channel_names == ["t1", "t2"]


def test_train_from_a_dicom_series_folder_with_nifti_labels(tmp_path):
    """A folder of one DICOM series, as `segment` reads it, with labels on its grid (a segflow NIfTI output):
    training had refused it as "a folder holding no DICOM files"; a folder of two series names them."""
    from storage.dicom import find_series, ingest_dicom
    from storage.nifti import write_label_nifti
    from tests import dicom_samples

    data = np.full((8, 16, 16), 1000, np.int16)
    data[:, 4:12, 4:12] = 1600
    folder = tmp_path / "series"
    dicom_samples.write_ct_series(folder, data)
    [series] = find_series([folder])
    store = ingest_dicom(series, tmp_path / "s.zarr")
    labels = write_label_nifti((np.asarray(store.image[0]) > 300).astype(np.uint8), store.meta.geometry,
                               tmp_path / "labels.nii.gz", classes=[LabelClass(value=0, name="background"),
                                                                     LabelClass(value=1, name="bright")])
    card = tiny_card(classes=2, channels=1, spatial_dims=3, roi=8)
    loaded = train_from_files(card, [(folder, labels)], tmp_path / "model", steps=2, batch_size=1,
                              patch=(8, 8, 8), precision="exact")
    assert loaded.card.training["steps"] == 2
    dicom_samples.write_ct_series(folder / "other", data, series_number=9)
    with pytest.raises(Exception, match=r"series: holds 2 DICOM series \(.*\): give the folder of the one"):
        train_from_files(card, [(folder, labels)], tmp_path / "model2", steps=1, batch_size=1, patch=(8, 8, 8))


def test_a_trained_models_reports_are_written_before_its_card(tmp_path, monkeypatch):
    """The card is the commit point: a run killed just after it had left card and weights without the learning
    curve and validation table, a directory that looked complete."""
    import segmentation.training as training

    card = tiny_card()
    samples = [TrainingSample(*blobs(s)) for s in (1, 2)]
    image, labels = blobs(3)
    result = train(card, samples, validation=[TrainingSample(image, labels)], steps=4, batch_size=2, val_every=2,
                   seed=2, precision="exact")
    seen: list[set[str]] = []
    commit = training.save_model

    def at_the_commit(path, *args, **kwargs):  # noqa: ANN001, ANN202
        seen.append({p.name for p in Path(path).iterdir()})
        return commit(path, *args, **kwargs)

    monkeypatch.setattr(training, "save_model", at_the_commit)
    save_trained(tmp_path / "model", card, result)
    assert seen and {"learning_curve.png", "validation.md", "checkpoints"} <= seen[0] and "card.json" not in seen[0]
    assert {"card.json", "weights.safetensors", "learning_curve.png", "validation.md"} <= \
        {p.name for p in (tmp_path / "model").iterdir()}
    assert not (tmp_path / "model" / "checkpoints" / "resume.safetensors").exists()
