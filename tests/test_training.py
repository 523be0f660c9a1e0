"""Metrics, synthetic sample data and the training engine (short runs only; the
full demo budget is measured by benchmarks/demo_training.py)."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import rasterio
import torch

from segmentation import precision
from segmentation.card import ModelCard
from segmentation.demo_cards import DEMO_BUDGET, landcover_card, lesion_card
from segmentation.metrics import ConfusionAccumulator, confusion_matrix, dice_per_class, mean_dice
from segmentation.modeldir import load_model
from segmentation.normalize import image_statistics, resolve
from segmentation.modeldir import build_module
from segmentation.losses import MaskedDiceCELoss, supervised_loss
from segmentation.patches import prepare as _prepare
from segmentation.patches import sample_batch as _sample_batch
from segmentation.training import TrainingSample, save_trained, train
from storage import samples
from storage.hashing import sha256_file


def small_card(*, spatial_dims: int = 2, channels: int = 4, classes: int = 5,
               normalization: dict | None = None, roi: list[int] | None = None) -> ModelCard:
    return ModelCard.model_validate({
        "name": f"small-{spatial_dims}d",
        "architecture": {"name": "unet", "kwargs": {"channels": [8, 16, 32], "strides": [2, 2],
                                                    "num_res_units": 1}},
        "input": {"spatial_dims": spatial_dims, "channels": channels,
                  "normalization": normalization or {"mode": "scale", "scale": [1e-4]}},
        "classes": [{"value": v, "name": f"c{v}"} for v in range(classes)],
        "inference": {"roi": roi or [64] * spatial_dims},
    })


def scene_arrays(tmp_path, seed: int = 5, size=(256, 256)) -> tuple[np.ndarray, np.ndarray]:
    image_path, truth_path = samples.make_scene(tmp_path / f"s{seed}.tif", size=size, seed=seed)
    with rasterio.open(image_path) as src:
        image = src.read()
    with rasterio.open(truth_path) as src:
        labels = src.read(1)
    return image, labels


# ---------------------------------------------------------------- metrics

def test_dice_by_hand():
    pred = np.array([[0, 1], [1, 1]])
    truth = np.array([[0, 1], [0, 1]])
    d = dice_per_class(pred, truth, 3)
    assert d[0] == pytest.approx(2 * 1 / (2 + 1))  # tp 1, |truth| 2, |pred| 1
    assert d[1] == pytest.approx(2 * 2 / (2 + 3))
    assert math.isnan(d[2])  # absent from both: no number is honest
    np.testing.assert_array_equal(confusion_matrix(pred, truth, 3), [[1, 1, 0], [0, 2, 0], [0, 0, 0]])
    assert mean_dice(d) == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert mean_dice(d, exclude=(0,)) == pytest.approx(4 / 5)


def test_dice_ignores_pixels_and_rejects_stray_values():
    truth = np.array([0, 1, 255, 255])
    pred = np.array([0, 1, 1, 255])  # whatever is predicted at ignored pixels does not count
    assert dice_per_class(pred, truth, 2, ignore=255) == {0: 1.0, 1: 1.0}
    with pytest.raises(ValueError):
        dice_per_class(np.array([0, 255]), np.array([0, 1]), 2, ignore=255)
    with pytest.raises(ValueError):
        dice_per_class(np.array([0, 1]), np.array([0, 7]), 2)


def test_accumulator_over_blocks_equals_one_shot():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 4, (50, 40))
    truth[rng.random(truth.shape) < 0.1] = 255
    pred = np.where(rng.random(truth.shape) < 0.7, truth % 255 % 4, rng.integers(0, 4, truth.shape))
    acc = ConfusionAccumulator(4, ignore=255)
    acc.update(pred[:23], truth[:23]).update(pred[23:], truth[23:])
    np.testing.assert_array_equal(acc.matrix, confusion_matrix(pred, truth, 4, ignore=255))
    assert acc.dice() == dice_per_class(pred, truth, 4, ignore=255)
    assert acc.count == int((truth != 255).sum())


# ---------------------------------------------------------------- samples

def test_scene_is_deterministic_and_georeferenced(tmp_path):
    (tmp_path / "a").mkdir()
    a = samples.make_scene(tmp_path / "a" / "scene.tif", seed=3)
    b = samples.make_scene(tmp_path / "b.tif", seed=3)
    c = samples.make_scene(tmp_path / "c.tif", seed=4)
    assert a[1].name == "scene.truth.tif"
    assert [sha256_file(p) for p in a] == [sha256_file(p) for p in b]
    assert sha256_file(a[0]) != sha256_file(c[0])

    with rasterio.open(a[0]) as img, rasterio.open(a[1]) as tru:
        assert img.crs.to_epsg() == 32633 and img.count == 4 and img.dtypes == ("uint16",) * 4
        assert img.transform.a == 10.0 and img.transform.e == -10.0 and img.transform.b == 0.0
        assert img.transform.c > 100_000 and img.transform.f > 1_000_000  # a real UTM origin
        assert img.nodata == 0 and img.descriptions == ("blue", "green", "red", "nir")
        assert img.block_shapes[0] == (256, 256) and img.compression.name.lower() == "deflate"
        assert (tru.crs, tru.transform, tru.shape) == (img.crs, img.transform, img.shape)
        assert tru.nodata == 255 and tru.dtypes == ("uint8",)
        data, labels = img.read(), tru.read(1)
    nodata = (data == 0).all(axis=0)
    np.testing.assert_array_equal(nodata, labels == 255)  # truth no-data exactly where the image has none
    assert nodata[:, :24].all() and not nodata[:, 24:].all()
    assert (data[:, ~nodata] > 0).all()
    counts = np.bincount(labels[labels != 255], minlength=5)
    assert (counts > 1000).all(), counts  # every class present


def test_phantom_is_deterministic_with_a_real_header(tmp_path):
    a = samples.make_phantom(tmp_path / "p.nii.gz", shape=(64, 64, 40), seed=2)
    b = samples.make_phantom(tmp_path / "q.nii.gz", shape=(64, 64, 40), seed=2)
    assert a[1].name == "p.truth.nii.gz"
    assert [sha256_file(p) for p in a] == [sha256_file(p) for p in b]

    img, tru = nib.load(a[0]), nib.load(a[1])
    assert img.shape == tru.shape == (64, 64, 40)
    for h in (img.header, tru.header):
        assert int(h["qform_code"]) == 1 and int(h["sform_code"]) == 2
        np.testing.assert_allclose(h.get_zooms(), (1.0, 1.0, 1.5), rtol=1e-5)
        np.testing.assert_allclose(h.get_qform(), h.get_sform(), atol=1e-4)
    np.testing.assert_allclose(img.affine, tru.affine)
    rotation = img.affine[:3, :3] / np.array([1.0, 1.0, 1.5])
    assert not np.allclose(rotation, np.eye(3), atol=1e-3)  # a small rotation, not the identity
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-5)
    assert tru.header.get_intent()[0] == "label" and tru.get_data_dtype() == np.uint8
    data, labels = np.asanyarray(img.dataobj), np.asanyarray(tru.dataobj)
    assert data.dtype == np.int16 and set(np.unique(labels)) == {0, 1, 2}
    assert data[labels == 2].mean() > 1.3 * data[labels == 1].mean()  # lesions are brighter than tissue


# ---------------------------------------------------------------- loss and sampling

def test_ignored_pixels_add_no_loss_and_no_gradient():
    torch.manual_seed(0)
    target = torch.randint(0, 3, (2, 8, 8))
    target[:, :, 4:] = -1
    loss_fn = MaskedDiceCELoss(3)
    logits = torch.randn(2, 3, 8, 8, requires_grad=True)
    loss = loss_fn(logits, target)
    loss.backward()
    assert torch.all(logits.grad[:, :, :, 4:] == 0)
    changed = logits.detach().clone()
    changed[:, :, :, 4:] = torch.randn(2, 3, 8, 4) * 100
    assert loss_fn(changed, target).item() == pytest.approx(loss.item(), abs=1e-6)
    everything_ignored = loss_fn(logits, torch.full_like(target, -1))
    assert torch.isfinite(everything_ignored) and everything_ignored.item() == pytest.approx(0.0, abs=1e-4)


def test_oversampling_finds_a_rare_class_and_pads_small_images():
    labels = np.zeros((100, 100), np.uint8)
    labels[70:73, 10:14] = 2  # 12 pixels of a rare class
    labels[:, 60:] = 255
    sample = TrainingSample(image=np.ones((4, 100, 100), np.uint16), labels=labels)
    card = small_card(classes=3)
    prep = _prepare(card, sample, np.random.default_rng(0))
    _, batch = _sample_batch([prep], (32, 32), 16, 1.0, np.random.default_rng(1))
    assert all((patch == 2).any() for patch in batch)
    _, batch = _sample_batch([prep], (32, 32), 16, 0.0, np.random.default_rng(1))
    assert (batch == -1).any() and not (batch == 255).any()  # no-data is ignored, never a class
    small = TrainingSample(image=np.ones((4, 20, 30), np.uint16), labels=np.ones((20, 30), np.uint8))
    img, lab = _sample_batch([_prepare(card, small, np.random.default_rng(0))], (32, 32), 2, 0.5,
                             np.random.default_rng(0))
    assert img.shape == (2, 4, 32, 32) and (lab == -1).sum(axis=(1, 2)).tolist() == [32 * 32 - 600] * 2


# ---------------------------------------------------------------- training

def test_short_run_learns_and_saves_a_model_directory(tmp_path):
    image, labels = scene_arrays(tmp_path)
    card = small_card()
    losses: list[float] = []
    result = train(card, [TrainingSample(image, labels)], steps=20, batch_size=4, patch=(64, 64), lr=3e-3,
                   seed=1, log=lambda e: losses.append(e["loss"]))
    assert len(losses) == 20
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    prov = result.provenance
    assert prov["steps"] == 20 and prov["patch"] == [64, 64] and prov["precision"] == "fast"
    # what `fast` trained in on this CPU: bf16 only where the CPU has bf16 instructions (segmentation.precision)
    assert prov["compute"] == ("bfloat16 autocast" if precision.cpu_has_bf16() else "float32")
    assert prov["sample_shapes"] == [[4, 256, 256]] and prov["torch_version"] == torch.__version__
    assert not result.module.training

    saved = save_trained(tmp_path / "model", card, result)
    loaded = load_model(tmp_path / "model")
    assert loaded.card.training == prov
    assert loaded.card.weights_sha256 == sha256_file(tmp_path / "model" / "weights.safetensors") == saved.weights_sha256
    x = torch.randn(1, 4, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.module(x), result.module(x))


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 11])
def test_any_number_of_steps_trains(tmp_path, steps):
    """`segflow train --steps 10` ended in a ZeroDivisionError traceback: a tenth of 10 steps is one warm-up step,
    a phase of length 0 to OneCycleLR.  The learning rate rises, then falls, for every step count."""
    image, labels = scene_arrays(tmp_path)
    rates: list[float] = []
    train(small_card(), [TrainingSample(image, labels)], steps=steps, batch_size=1, patch=(32, 32), lr=3e-3, seed=1,
          log=lambda e: rates.append(e["lr"]))
    assert len(rates) == steps and all(math.isfinite(r) and r > 0 for r in rates)
    if steps >= 4:  # annealed from its peak by the end
        assert rates[-1] < max(rates) / 10


@pytest.mark.parametrize("options, problem", [({"steps": 0}, "steps and batch_size must be positive, got 0 and 4"),
                                              ({"batch_size": -1}, "got 20 and -1"),
                                              ({"lr": -1.0}, "learning rate must be a positive number, got -1.0"),
                                              ({"lr": math.nan}, "got nan"), ({"lr": 0.0}, "got 0.0"),
                                              # these trained as something else, or failed at the first step
                                              ({"precision": "bogus"}, "precision must be 'exact' or 'fast'"),
                                              ({"oversample": 2.0}, "oversample is a share"),
                                              ({"patch": (33, 33)}, r"patch \[33, 33\]: .*divisible by"),
                                              ({"float_labels": True}, "labels of dtype float32")])
def test_bad_options_are_refused_before_training(tmp_path, options, problem):
    """A negative or NaN learning rate was torch's ValueError, a traceback out of `segflow train`."""
    from storage.errors import ConfigError

    image, labels = scene_arrays(tmp_path)
    if options.pop("float_labels", False):
        labels = labels.astype(np.float32) + 0.5  # a label map resampled bilinearly: 0.5, 1.5... had trained as 0, 1
    with pytest.raises(ConfigError, match=problem):
        train(small_card(), [TrainingSample(image, labels)], **{"steps": 20, "batch_size": 4, **options})
    with pytest.raises(ConfigError, match="lists of segmentation.training.TrainingSample"):
        train(small_card(), [(image, labels)], steps=2, batch_size=2)


def test_ignored_region_does_not_teach_a_class():
    """A uniform image, labelled 1 in a small square and ignored elsewhere: only class 1 may be learned.

    Were ignored pixels counted as class 0, the same-looking pixels would
    mostly teach class 0 (about half the image is then predicted 0).
    """
    rng = np.random.default_rng(0)
    image = rng.normal(100, 5, (1, 64, 64)).astype(np.float32)
    labels = np.full((64, 64), 255, np.uint8)
    labels[24:40, 24:40] = 1
    image[:, :4, :4], labels[:4, :4] = 200.0, 0  # a bright corner teaches class 0 (one class alone is refused)
    card = small_card(channels=1, classes=2, normalization={"mode": "image_zscore"}, roi=[32, 32])
    result = train(card, [TrainingSample(image, labels)], steps=40, batch_size=4, seed=0, precision="exact")
    assert result.provenance["ignore_index"] == [255]
    x = resolve(card.input.normalization, 1, image_statistics(image))(image)
    with torch.no_grad():
        pred = result.module(torch.from_numpy(x)[None]).argmax(1)[0].numpy()
    assert (pred == 1).mean() > 0.9


def test_nan_nodata_pixels_train_as_zeros_not_into_a_nan_loss(tmp_path):
    """A float raster's NaN/Inf nodata (labels ignored there): the network sees 0 there, as the sliding window
    does, so the loss stays finite (it was NaN at the first step: "training diverged ... try a lower lr")."""
    image, labels = scene_arrays(tmp_path, size=(128, 128))
    image = image.astype(np.float32)
    image[:, 10:70, 10:70] = np.nan
    image[1, 80:90, 50:60] = np.inf
    labels[10:70, 10:70] = 255
    labels[80:90, 50:60] = 255
    card = small_card(normalization={"mode": "image_zscore"})
    stats = image_statistics(image, ~((labels == 255)))
    assert all(map(math.isfinite, [*stats[0], *stats[1]]))
    losses: list[float] = []
    train(card, [TrainingSample(image, labels, stats=stats)], steps=4, batch_size=4, patch=(64, 64), seed=0,
          oversample=0.0, log=lambda e: losses.append(e["loss"]))
    assert len(losses) == 4 and all(map(math.isfinite, losses)), losses


def test_training_takes_a_percentile_card_s_statistics_over_valid_pixels_as_inference_does(tmp_path):
    """Training's image statistics leave out nodata pixels, as ``predict`` does with the input's mask: a
    percentile card trained over the nodata zeros would see other values than at inference."""
    from flows.training import _open, _sample
    from segmentation.normalize import image_percentiles

    image_path, truth_path = samples.make_scene(tmp_path / "s.tif", size=(96, 96), seed=3)
    with rasterio.open(image_path) as src:
        assert src.nodata is not None
        pixels, nodata = src.read(), src.nodata
    valid = np.all(pixels != nodata, axis=0)
    assert 0 < valid.mean() < 1  # the scene has a nodata margin
    card = small_card(normalization={"mode": "percentile", "lower": 2.0, "upper": 98.0, "b_min": 0.0,
                                     "b_max": 1.0})
    sample = _sample(card, _open(image_path, tmp_path / "i.zarr"), _open(truth_path, tmp_path / "l.zarr"),
                     tmp_path / "w")
    assert list(sample.stats) == image_percentiles(pixels, [2.0, 98.0], valid)
    assert list(sample.stats) != image_percentiles(pixels, [2.0, 98.0])
    assert np.array_equal(np.asarray(sample.valid), valid)  # and its nodata pixels are 0 for the network


def test_zarr_volume_training(tmp_path):
    zarr = pytest.importorskip("zarr")
    image_path, truth_path = samples.make_phantom(tmp_path / "p.nii.gz", shape=(48, 48, 32), seed=1)
    data = np.asanyarray(nib.load(image_path).dataobj).transpose(2, 1, 0)[None]
    truth = np.asanyarray(nib.load(truth_path).dataobj).transpose(2, 1, 0)
    store = zarr.storage.MemoryStore()
    image = zarr.create_array(store=store, name="image", data=np.ascontiguousarray(data), chunks=(1, 8, 48, 48))
    labels = zarr.create_array(store=store, name="labels", data=np.ascontiguousarray(truth), chunks=(8, 48, 48))
    card = small_card(spatial_dims=3, channels=1, classes=3, normalization={"mode": "image_zscore"},
                      roi=[16, 32, 32])
    result = train(card, [TrainingSample(image, labels, ignore_index=None)], steps=3, batch_size=2)
    assert result.provenance["sample_shapes"] == [[1, 32, 48, 48]]
    assert math.isfinite(result.provenance["final_loss"])


def test_deep_supervision_weights_the_heads_and_downsamples_targets():
    torch.manual_seed(0)
    loss_fn = MaskedDiceCELoss(3)
    target = torch.randint(0, 3, (2, 8, 8))
    target[:, :3] = -1
    main, deep, small = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4)
    assert supervised_loss(loss_fn, main, target, 2).item() == pytest.approx(loss_fn(main, target).item())
    stacked = torch.stack([main, deep], 1)  # as MONAI's DynUNet returns its heads in train mode
    expected = (loss_fn(main, target) + 0.5 * loss_fn(deep, target)) / 1.5
    assert supervised_loss(loss_fn, stacked, target, 2).item() == pytest.approx(expected.item())
    # a coarser head meets the target downsampled by nearest neighbour (every other pixel, ignore kept)
    expected = (loss_fn(main, target) + 0.5 * loss_fn(small, target[:, ::2, ::2])) / 1.5
    assert supervised_loss(loss_fn, [main, small], target, 2).item() == pytest.approx(expected.item())


def dynunet_card() -> ModelCard:
    return ModelCard.model_validate({
        "name": "tiny-dynunet",
        "architecture": {"name": "dynunet", "kwargs": {"filters": [4, 8, 16], "deep_supervision": True}},
        "input": {"spatial_dims": 3, "channels": 1, "normalization": {"mode": "image_zscore"}},
        "classes": [{"value": 0, "name": "background"}, {"value": 1, "name": "lesion"}],
        "inference": {"roi": [16, 16, 16], "batch_size": 1},
    })


def cube_volume(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.zeros((16, 16, 16), np.uint8)
    a = rng.integers(2, 7, 3)
    labels[a[0]:a[0] + 7, a[1]:a[1] + 6, a[2]:a[2] + 8] = 1
    return (labels * 80.0 + rng.normal(100, 10, labels.shape)).astype(np.float32)[None], labels


def test_dynunet_with_deep_supervision_trains_and_its_model_segments(tmp_path):
    card = dynunet_card()
    x = torch.from_numpy(cube_volume(9)[0])[None]
    torch.manual_seed(4)
    initial = build_module(card)
    with torch.no_grad():
        assert initial.train()(x).ndim == 6  # (batch, heads, classes, z, y, x): the heads really are stacked
    result = train(card, [TrainingSample(*cube_volume(1), ignore_index=None)],
                   validation=[TrainingSample(*cube_volume(2), ignore_index=None)], steps=6, batch_size=2,
                   val_every=3, seed=4, lr=1e-2)
    assert "deep_supervision" in result.provenance and math.isfinite(result.provenance["final_loss"])
    assert [h["step"] for h in result.provenance["validation"]["history"]] == [3, 6]
    head = "deep_supervision_heads.0.conv.conv.weight"  # trained only through the deep head's loss
    change = (result.last[head] - initial.state_dict()[head]).abs().max().item()
    assert change > 1e-4, change

    save_trained(tmp_path / "model", card, result)
    loaded = load_model(tmp_path / "model")
    assert loaded.card.architecture.kwargs["deep_supervision"] is True and not loaded.module.training
    with torch.no_grad():
        out = loaded.module(x)
    assert out.shape == (1, 2, 16, 16, 16)  # eval mode: the main head only
    with torch.no_grad():
        torch.testing.assert_close(out, result.module(x))


def test_demo_cards_are_consistent():
    for card in (landcover_card(), lesion_card()):
        budget = DEMO_BUDGET[card.name]
        assert len(budget.patch) == card.input.spatial_dims
        assert all(p % 8 == 0 for p in budget.patch)  # three stride-2 levels
    assert [c.name for c in landcover_card().classes] == list(samples.SCENE_CLASSES)
    assert [c.name for c in lesion_card().classes] == list(samples.PHANTOM_CLASSES)


def test_augmentation_moves_labels_with_pixels_and_intensity_changes_only_the_image():
    from segmentation.augment import dihedral, intensity

    rng = np.random.default_rng(3)
    img = rng.normal(size=(2, 16, 16)).astype(np.float32)
    lab = np.arange(256).reshape(16, 16)
    img[0] = lab  # channel 0 carries each pixel's label: any geometric change must move both alike
    seen = set()
    for _ in range(40):
        i2, l2 = dihedral(img, lab, rng)
        np.testing.assert_array_equal(i2[0], l2)
        seen.add(l2.tobytes())
    assert len(seen) == 8  # every flip and transpose of a square 2-D patch happens
    # off: the patch is returned as is and the generator draws nothing (seeded runs stay as they were)
    before = np.random.default_rng(5)
    assert intensity(img, before, 0.0) is img and before.random() == np.random.default_rng(5).random()
    changed = intensity(img, np.random.default_rng(6), 1.0)
    assert changed.shape == img.shape and changed.dtype == np.float32 and not np.array_equal(changed, img)
    # contrast and brightness are relative to each channel's own spread: a channel stays of the same order
    assert np.abs(changed.std(axis=(1, 2)) / img.std(axis=(1, 2)) - 1).max() < 0.35
    from segmentation.augment import Augmentation

    with pytest.raises(Exception, match="intensity"):
        train(landcover_card(), [], steps=1, batch_size=1, augment=Augmentation(intensity=1.5))
    with pytest.raises(Exception, match="spatial"):
        train(landcover_card(), [], steps=1, batch_size=1, augment=Augmentation(spatial=-0.1))


@pytest.mark.parametrize("dims", [2, 3])
def test_rotation_and_scale_move_labels_with_pixels_and_ignore_what_comes_from_outside(dims):
    """A label map of a few constant regions, copied into the image: after a random turn and zoom, every
    labelled pixel's image value is the label it got (the image is linear, but interpolating inside a
    region of one value gives that value), and pixels from outside the patch are ignored, never class 0."""
    from segmentation.augment import affine

    shape = (40, 40) if dims == 2 else (12, 40, 40)
    lab = np.zeros(shape, dtype=np.int64)
    lab[..., 8:30, 10:22] = 1
    lab[..., 24:36, 26:38] = 2
    img = np.stack([lab.astype(np.float32) + 10.0, np.ones(shape, np.float32)])  # 10, 11, 12: never 0
    rng = np.random.default_rng(11)
    turned = 0
    for _ in range(20):
        i2, l2 = affine(img, lab, rng, 1.0, ignore=-1)
        assert i2.shape == img.shape and i2.dtype == np.float32 and l2.shape == lab.shape and l2.dtype == np.int64
        assert set(np.unique(l2)) <= {-1, 0, 1, 2}
        outside = l2 == -1
        assert np.all(i2[1][outside] < 1.0) and np.all(i2[0][outside] < 10.0)  # zero-filled from outside
        # deep inside a region (away from its edge and the patch's), image and label agree exactly
        from scipy import ndimage

        for cls in (0, 1, 2):
            core = ndimage.binary_erosion(l2 == cls, iterations=2)
            assert np.allclose(i2[0][core], cls + 10.0)
        turned += not np.array_equal(l2, lab)
    assert turned == 20
    before = np.random.default_rng(5)  # off: nothing drawn, the patch returned as it is
    assert affine(img, lab, before, 0.0, ignore=-1)[1] is lab and before.random() == np.random.default_rng(5).random()


def test_a_spatially_augmented_run_records_it_and_trains(tmp_path):
    """Both augmentations on: the provenance says what was done and the run still learns the scene."""
    from segmentation.augment import Augmentation

    image, labels = scene_arrays(tmp_path)
    result = train(small_card(), [TrainingSample(image, labels)], steps=4, batch_size=2, patch=(64, 64),
                   augment=Augmentation(intensity=0.5, spatial=0.5))
    words = result.provenance["augmentation"]
    assert words.startswith("flips, transposes, rotation (±180°) and scale (0.8-1.25) on 0.5 of patches, "
                            "intensity on 0.5 of patches"), words
    assert np.isfinite(result.losses).all() and len(result.losses) == 4


def test_values_under_the_mask_reach_neither_training_nor_validation(tmp_path):
    """The sliding window shows the network 0 where the mask says the input has no data, whatever the file holds
    there; training and validation do the same, so two images differing only under their mask train alike and
    validate alike (a nodata value of 0, or 5000, had reached the network as -2.2 or +6 after normalisation)."""
    rng = np.random.default_rng(4)
    image = rng.random((4, 96, 96), dtype=np.float32) * 1000
    labels = rng.integers(0, 3, (96, 96)).astype(np.uint8)
    valid = np.ones((96, 96), bool)
    valid[10:60, 20:70] = False
    labels[~valid] = 255
    other = image.copy()
    other[:, ~valid] = 5000.0
    card = small_card(classes=3, normalization={"mode": "image_zscore"}, roi=[32, 32])
    results = []
    for pixels in (image, other):
        sample = TrainingSample(pixels, labels, stats=([500.0] * 4, [290.0] * 4), valid=valid)
        results.append(train(card, [sample], steps=3, batch_size=2, patch=(32, 32), seed=0, precision="exact",
                             holdout=None, validation=[sample], val_every=3))
    a, b = results
    assert a.losses == b.losses
    assert a.provenance["validation"]["history"] == b.provenance["validation"]["history"]
    for name, tensor in a.module.state_dict().items():
        assert torch.equal(tensor, b.module.state_dict()[name]), name
