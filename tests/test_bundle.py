"""MONAI bundles: mapped to a card without evaluating them, segmented through the CLI, converted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from monai.networks.nets import AttentionUnet, UNet
from monai.transforms import ScaleIntensityRange
from typer.testing import CliRunner

from flows.cli import app
from segmentation.bundle import read_bundle
from segmentation.modeldir import convert_model, load_model
from segmentation.normalize import resolve
from storage.errors import ModelError
from storage.hashing import sha256_file
from storage.samples import make_phantom

NET = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
       "channels": [4, 8], "strides": [2]}  # num_res_units and norm left to MONAI's defaults (0, instance)
SCALE = {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 0, "a_max": 800, "b_min": -1.0,
         "b_max": 1.0, "clip": True}
ROI = [16, 12, 8]  # MONAI order (i, j, k); not a cube, so a transposed window would show


def write_bundle(root: Path, network: dict | None = None, net_module: torch.nn.Module | None = None,
                 preprocessing: list | None = None, postprocessing: list | None = None) -> Path:
    """A bundle as MONAI's model zoo lays them out, with the expressions real ones carry."""
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    meta = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.1.0", "monai_version": "1.6.1", "name": "Test phantom segmentation",
        "description": "A small 3D U-Net with generated weights.",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "MR", "num_channels": 1,
                                 "spatial_shape": ROI, "dtype": "float32", "value_range": [-1, 1],
                                 "is_patch_data": True, "channel_def": {"0": "T1"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 3,
                                 "spatial_shape": ROI, "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": True,
                                 "channel_def": {"0": "background", "1": "tissue", "2": "lesion"}}}},
    }
    config = {
        "imports": ["$import glob", "$import pathlib", "$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        # evaluating the configuration would create this file: it must never appear untrusted
        "evaluated": "$pathlib.Path(@bundle_root, 'evaluated').touch()",
        "datalist": "$list(sorted(glob.glob(@bundle_root + '/data/*.nii.gz')))",
        "network_def": network or NET,
        "network": "$@network_def.to(@device)",
        "preprocessing": {"_target_": "Compose", "transforms": preprocessing if preprocessing is not None else [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": [1.0, 1.0, 1.5], "mode": "bilinear"},
            SCALE,
            {"_target_": "EnsureTyped", "keys": "image"}]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]",
                    "transform": "@preprocessing"},
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": ROI, "sw_batch_size": 4, "overlap": 0.25,
                    "mode": "gaussian"},
        "postprocessing": {"_target_": "Compose", "transforms": postprocessing or [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image"},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "$@bundle_root + '/eval'",
             "output_postfix": "seg", "separate_folder": False, "output_dtype": "uint8", "resample": False}]},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 0},
        "handlers": [{"_target_": "CheckpointLoader", "load_path": "$@bundle_root + '/models/model.pt'",
                      "load_dict": {"model": "@network"}, "map_location": "cpu"}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": False},
        "run": ["$@evaluator.run()"],
    }
    (root / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2))
    (root / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    if net_module is not None:
        torch.save(net_module.state_dict(), root / "models" / "model.pt")
    return root


def monai_unet(seed: int = 0) -> torch.nn.Module:
    """The bundle's network built by MONAI directly (not through segflow's registry)."""
    torch.manual_seed(seed)
    net = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,)).eval()
    with torch.no_grad():  # generated weights with enough spread for several labels
        for p in net.parameters():
            p.normal_(0.0, 0.5)
    return net


@pytest.fixture(scope="module")
def unet() -> torch.nn.Module:
    return monai_unet()


@pytest.fixture()
def bundle(tmp_path, unet) -> Path:
    return write_bundle(tmp_path / "phantom_bundle", net_module=unet)


def test_bundle_maps_to_a_card_without_evaluating_anything(bundle):
    mapping = read_bundle(bundle)
    card = mapping.card
    assert card.architecture.name == "unet"
    assert card.architecture.kwargs == {"channels": [4, 8], "strides": [2], "num_res_units": 0, "norm": "INSTANCE"}
    assert (card.input.spatial_dims, card.input.channels, card.input.channel_names) == (3, 1, ["T1"])
    assert [c.name for c in card.classes] == ["background", "tissue", "lesion"]
    # segflow arrays are (k, j, i): the bundle's (i, j, k) roi and pixdim come reversed
    assert card.input.spacing == [1.5, 1.0, 1.0] and card.input.spacing_unit == "mm"
    assert (card.inference.roi, card.inference.overlap, card.inference.blend, card.inference.batch_size,
            card.inference.blend_outputs) == (ROI[::-1], 0.25, "gaussian", 4, "logits")
    assert card.weights_sha256 == sha256_file(bundle / "models" / "model.pt")
    # model space: Orientationd and Spacingd are applied, Invertd (nearest_interp defaults to true) brings labels back
    assert (card.input.orientation, card.input.interpolation, card.inference.invert) == ("RAS", "bilinear", "labels")
    assert card.card_version == 4 and card.applies_model_space
    assert not any("Orientationd" in n or "Spacingd" in n for n in mapping.notes)
    # the axis reversal, which segflow applies, is not among what it does not apply (read as transposed labels)
    assert "Not applied by segflow" not in card.description
    assert card.description.endswith("Axes: MONAI indexes arrays x first (i, j, k), segflow in storage order (k, j, "
                                     "i): the card's roi and spacing are the bundle's reversed, and the network sees "
                                     "each window with its spatial axes reversed.")
    # the card's normalisation is MONAI's ScaleIntensityRange
    x = np.linspace(-200, 1200, 1001, dtype=np.float32)[None]
    ours = resolve(card.input.normalization, 1)(x)
    theirs = ScaleIntensityRange(a_min=0, a_max=800, b_min=-1.0, b_max=1.0, clip=True)(x).numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-6)
    assert not (bundle / "evaluated").exists()
    # the same configuration as YAML maps to the same card
    import yaml

    config = bundle / "configs" / "inference.json"
    (bundle / "configs" / "inference.yaml").write_text(yaml.safe_dump(json.loads(config.read_text())))
    config.unlink()
    assert read_bundle(bundle).card == card


def test_a_yaml_alias_bomb_in_a_bundle_is_refused_in_one_line_at_once(tmp_path):
    """Ten levels of nine aliases under network_def (a "billion laughs"): `model inspect` walked 9**10 values and
    ran for minutes.  The configuration's expanded size is counted, up to a limit, as it is read."""
    import time

    import yaml

    root = write_bundle(tmp_path / "b")
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    config = root / "configs" / "inference.json"
    body = json.loads(config.read_text())
    (root / "configs" / "inference.yaml").write_text("\n".join(levels) + "\n" + yaml.safe_dump(
        {**body, "network_def": {**body["network_def"], "dropout": "PLACEHOLDER"}}).replace("PLACEHOLDER", "*a9"))
    config.unlink()
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match=r"inference\.yaml: the bundle configuration expands to more than "
                                         r"1,000,000 values"):
        read_bundle(root)
    assert time.perf_counter() - t0 < 30


def test_torchscript_bundle_runs_its_archive(tmp_path, unet):
    """model.ts only, network_def unknown: the archive runs as is (TorchScript, no Python unpickling)."""
    root = write_bundle(tmp_path / "b", network={**NET, "_target_": "scripts.net.MyNet"})
    torch.jit.save(torch.jit.script(unet), str(root / "models" / "model.ts"))
    with pytest.raises(ModelError, match=r"model\.ts: is a TorchScript archive: its graph is code"):
        load_model(root)  # TorchScript is code, as the configuration's expressions are
    loaded = load_model(root, trust_bundle=True)
    assert loaded.card.architecture.name == "torchscript"
    assert loaded.weights_sha256 == sha256_file(root / "models" / "model.ts")
    x = torch.randn(1, 1, 8, 12, 16, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        assert torch.equal(loaded.module(x), _reversed(unet(_reversed(x))))
    with pytest.raises(ModelError, match="segment the bundle itself: .* --trust-code"):
        convert_model(root, tmp_path / "o")


def test_a_bundle_network_segflow_did_not_build_is_checked_once_at_load(tmp_path):
    """A bundle's model.ts with 2 classes while its metadata says 3 (or one returning a dict) loaded, then failed
    in every input's windows with a worker's traceback; it is refused at load, naming the bundle."""
    root = write_bundle(tmp_path / "b", network={**NET, "_target_": "scripts.net.MyNet"})
    torch.manual_seed(0)
    two = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,)).eval()
    torch.jit.save(torch.jit.script(two), str(root / "models" / "model.ts"))
    with pytest.raises(ModelError, match=r"the bundle's network returns \(1, 2, .*the card's 3 classes") as err:
        load_model(root, trust_bundle=True)
    assert err.value.path == str(root)


def _reference_labels(net: torch.nn.Module, image: np.ndarray, card) -> np.ndarray:
    """MONAI's sliding window over the same network, the card's normalisation applied by hand."""
    n = card.input.normalization
    x = (image.astype(np.float32) - np.float32(n.offset[0])) * np.float32(n.scale[0])
    x = np.clip(x, n.clip[0], n.clip[1])
    with torch.inference_mode():
        logits = sliding_window_inference(torch.from_numpy(x)[None, None], ROI, 4, net, overlap=0.25,
                                          mode="gaussian", sigma_scale=0.125)  # MONAI blends raw outputs
    return torch.softmax(logits, 1)[0].argmax(0).numpy()


def test_segment_a_bundle_through_the_cli(bundle, unet, tmp_path):
    image, _ = make_phantom(tmp_path / "head.nii.gz", shape=(40, 40, 24), seed=3)
    out = tmp_path / "out"
    env = {**os.environ, "PREFECT_HOME": os.environ["PREFECT_HOME"], "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "flows", "segment", str(image), "--model", str(bundle),
                           "--out", str(out), "--workers", "1", "--no-zarr"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    labels = np.asarray(nib.load(out / "head.nii.gz").dataobj)
    raw = np.asarray(nib.load(image).dataobj)
    expected = _reference_labels(unet, raw, read_bundle(bundle).card)
    assert labels.shape == expected.shape
    assert len(np.unique(expected)) >= 2  # a test that could fail
    assert np.array_equal(labels, expected), f"{(labels != expected).mean():.2e} of voxels differ"
    record = json.loads((out / "head.provenance.json").read_text())
    assert record["model"]["weights_sha256"] == sha256_file(bundle / "models" / "model.pt")
    assert record["model"]["path"] == str(bundle.resolve())
    assert record["model"]["source"] == "monai-bundle"
    assert not (bundle / "evaluated").exists()
    verified = CliRunner().invoke(app, ["verify", str(out / "head.nii.gz")])
    assert verified.exit_code == 0, verified.output


@pytest.mark.parametrize("padding", [("reflect", 0.0), ("replicate", 0.0), ("circular", 0.0), ("constant", 0.7)])
def test_a_bundles_padding_mode_pads_a_scan_shorter_than_the_window_as_monai_does(tmp_path, unet, padding):
    """A scan 10 x 9 x 6 voxels under a 16 x 12 x 8 window: MONAI pads every axis (after the normalisation) with
    the inferer's padding_mode and cval before the windows run; segflow had padded with zeros whatever the mode
    (a note in the card), and such a scan's labels differed from MONAI's."""
    mode, cval = padding
    root = write_bundle(tmp_path / "bundle", net_module=unet)
    config = json.loads((root / "configs" / "inference.json").read_text())
    config["inferer"].update(padding_mode=mode, cval=cval)
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    card = read_bundle(root).card
    assert (card.inference.padding, card.inference.padding_value) == padding
    image, _ = make_phantom(tmp_path / "small.nii.gz", shape=(10, 9, 6), seed=4)
    proc = subprocess.run([sys.executable, "-m", "flows", "segment", str(image), "--model", str(root),
                           "--out", str(tmp_path / "out"), "--no-prefect", "--no-zarr"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    labels = np.asarray(nib.load(tmp_path / "out" / "small.nii.gz").dataobj)
    n = card.input.normalization
    x = np.clip((np.asarray(nib.load(image).dataobj).astype(np.float32) - np.float32(n.offset[0]))
                * np.float32(n.scale[0]), n.clip[0], n.clip[1])
    with torch.inference_mode():
        logits = sliding_window_inference(torch.from_numpy(x)[None, None], ROI, 4, unet, overlap=0.25,
                                          mode="gaussian", sigma_scale=0.125, padding_mode=mode, cval=cval)
        zeros = sliding_window_inference(torch.from_numpy(x)[None, None], ROI, 4, unet, overlap=0.25,
                                         mode="gaussian", sigma_scale=0.125)
    expected = logits[0].argmax(0).numpy()
    assert not np.array_equal(expected, zeros[0].argmax(0).numpy())  # the mode matters here: a test that can fail
    assert np.array_equal(labels, expected), f"{(labels != expected).mean():.2e} of voxels differ"


def test_a_bundle_padding_mode_monai_does_not_have_is_refused(tmp_path, unet):
    root = write_bundle(tmp_path / "bundle", net_module=unet)
    config = json.loads((root / "configs" / "inference.json").read_text())
    config["inferer"]["padding_mode"] = "symmetric"
    (root / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="padding_mode 'symmetric' is not one of MONAI's constant, reflect"):
        read_bundle(root)


def _reversed(t: torch.Tensor) -> torch.Tensor:
    """segflow's (k, j, i) window as MONAI's (i, j, k) one, and back."""
    return t.permute(0, 1, 4, 3, 2)


def test_convert_a_bundle_then_the_model_directory_computes_the_same(bundle, unet, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["model", "convert", str(bundle), "--out", str(tmp_path / "converted")])
    assert result.exit_code == 0, result.output
    assert "blends" not in result.output  # the card blends raw outputs as MONAI's inferer does: nothing to note
    converted = load_model(tmp_path / "converted")
    assert converted.card.training["converted_from"]["weights_sha256"] == sha256_file(bundle / "models" / "model.pt")
    assert converted.card.inference.roi == ROI[::-1] and converted.card.input.spacing == [1.5, 1.0, 1.0]
    x = torch.randn(2, 1, 16, 12, 20, generator=torch.Generator().manual_seed(5))  # (k, j, i), not a cube
    with torch.inference_mode():
        want = _reversed(unet(_reversed(x)))  # the bundle's network on MONAI's view of the window
        assert torch.equal(load_model(bundle).module(x), want)  # the bundle runs it as is
        got = converted.module(x)  # the converted directory computes it with permuted kernels
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), float((got - want).abs().max())
    assert torch.equal(got.argmax(1), want.argmax(1))
    result = runner.invoke(app, ["model", "convert", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    # the bundle as an MLM item names its own (MONAI-order) weights: converted from the item they ran on
    # transposed windows (46 % of labels as the bundle's); refused, pointing at the bundle
    item = tmp_path / "bundle.json"
    shown = runner.invoke(app, ["model", "inspect", str(bundle), "--stac"])
    assert shown.exit_code == 0, shown.output
    item.write_text(shown.stdout)
    result = runner.invoke(app, ["model", "convert", str(item), "--out", str(tmp_path / "from-item")])
    assert result.exit_code == 2 and "convert the bundle itself" in " ".join(result.output.split())
    assert not (tmp_path / "from-item").exists()


@pytest.mark.parametrize("network", [
    {"_target_": "UNet", "channels": [4, 8], "strides": [2], "kernel_size": [3, 3, 1]},
    {"_target_": "monai.networks.nets.BasicUNet", "features": [4, 4, 8, 8, 8, 4]},
    {"_target_": "SegResNet", "blocks_down": [1, 1], "blocks_up": [1]},
    {"_target_": "DynUNet", "kernel_size": [3, [3, 3, 1], 3], "strides": [1, 2, [2, 2, 1]],
     "upsample_kernel_size": [2, [2, 2, 1]]},
])
def test_registry_builds_the_network_monai_would_build(tmp_path, network):
    """Arguments a bundle leaves out take MONAI's defaults, not the registry builder's."""
    import monai.networks.nets as nets

    args = {k: v for k, v in network.items() if k != "_target_"}
    torch.manual_seed(0)
    direct = getattr(nets, network["_target_"].rsplit(".", 1)[-1])(spatial_dims=3, in_channels=1, out_channels=3,
                                                                   **args).eval()
    root = write_bundle(tmp_path / "b", network={**network, "spatial_dims": 3, "in_channels": 1, "out_channels": 3},
                        net_module=direct)
    loaded = load_model(root)  # refuses weights whose names or shapes differ from what it built
    x = torch.randn(1, 1, 32, 16, 16, generator=torch.Generator().manual_seed(1))  # (i, j, k) as MONAI sees it
    with torch.inference_mode():
        assert torch.equal(loaded.module.net(x), direct(x))
    converted, _ = convert_model(root, tmp_path / "converted")  # anisotropic kernels: per-axis args reversed
    with torch.inference_mode():
        want, got = direct(x), converted.module(_reversed(x))
    assert torch.allclose(_reversed(got), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("network", [
    {**NET, "channels": "$[4, 8]"},  # an expression argument
    {**NET, "_target_": "monai.networks.nets.AttentionUnet"},  # a network the registry does not build
])
def test_untrusted_code_is_refused_naming_the_flag(tmp_path, unet, network):
    root = write_bundle(tmp_path / "b", network=network, net_module=unet)
    with pytest.raises(ModelError, match="--trust-bundle") as err:
        load_model(root)
    assert str(err.value).startswith(str(root)) and "\n" not in str(err.value)
    proc = CliRunner().invoke(app, ["model", "convert", str(root), "--out", str(tmp_path / "o")])
    assert proc.exit_code == 2 and "--trust-bundle" in proc.output
    assert not (root / "evaluated").exists()


def test_trusted_bundle_builds_an_unknown_monai_network(tmp_path):
    torch.manual_seed(3)
    net = AttentionUnet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,)).eval()
    root = write_bundle(tmp_path / "b", net_module=net,
                        network={**NET, "_target_": "AttentionUnet", "strides": "$[2]"})
    loaded = load_model(root, trust_bundle=True)
    assert isinstance(loaded.module.net, AttentionUnet)
    assert loaded.card.architecture.name == "bundle:AttentionUnet" and loaded.source == "monai-bundle"
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        assert torch.equal(loaded.module(x), _reversed(net(_reversed(x))))
    with pytest.raises(ModelError, match="segment the bundle itself"):
        convert_model(root, tmp_path / "o", trust_bundle=True)


def test_preprocessing_segflow_cannot_reproduce_is_refused(tmp_path, unet):
    root = write_bundle(tmp_path / "b", net_module=unet, preprocessing=[
        {"_target_": "LoadImaged", "keys": "image"},
        {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True, "channel_wise": True}])
    norm = read_bundle(root).card.input.normalization
    assert (norm.mode, norm.nonzero) == ("image_zscore", True)  # mapped since card version 3
    for n, (refused, message) in enumerate([
        ({"_target_": "Spacingd", "keys": "image", "pixdim": [1, 1, 2], "mode": "bicubic"}, r"mode='bicubic'"),
        ({"_target_": "Spacingd", "keys": "image", "pixdim": [1, 1, 2], "align_corners": True}, "align_corners=True"),
        ({"_target_": "Orientationd", "keys": "image", "axcodes": "RA"}, "not a 3-D orientation"),
        ({"_target_": "ScaleIntensityRangePercentilesd", "keys": "image", "lower": 1, "upper": 99, "b_min": 0,
          "b_max": 1, "channel_wise": True}, "channel_wise=True"),
        # a resize had only been noted: the network saw another scale (64 % of a probe's voxels differed)
        ({"_target_": "Resized", "keys": "image", "spatial_size": [20, 18, 15]}, r"Resized\(spatial_size=.*resizes"),
        ({"_target_": "ResizeWithPadOrCropd", "keys": "image", "spatial_size": [20, 18, 15]}, "resizes the image"),
        ({"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 0, "a_max": 1, "b_min": 0, "b_max": 1,
          "_disabled_": "$True"}, "_disabled_ is the expression"),
    ]):
        root = write_bundle(tmp_path / f"refused{n}", net_module=unet, preprocessing=[refused])
        with pytest.raises(ModelError, match=message + ".*--card"):
            read_bundle(root)
    root = write_bundle(tmp_path / "c", net_module=unet, preprocessing=[
        {"_target_": "NormalizeIntensityd", "keys": "image", "channel_wise": True}])
    assert read_bundle(root).card.input.normalization.mode == "image_zscore"


def test_disabled_transforms_are_not_applied_as_monai_leaves_them_out(tmp_path, unet):
    """A transform marked "_disabled_": true (or "true") is dropped by MONAI's parser; segflow applied it: a
    disabled intensity scaling changed 24 % of a probe's labels, a disabled clean-up became keep_largest."""
    scale = {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -100, "a_max": 300, "b_min": 0,
             "b_max": 1, "clip": True}
    base = [{"_target_": "LoadImaged", "keys": "image"}, {"_target_": "EnsureChannelFirstd", "keys": "image"}]
    plain = read_bundle(write_bundle(tmp_path / "plain", net_module=unet, preprocessing=base)).card
    for n, flag in enumerate((True, "true", " True ")):
        root = write_bundle(tmp_path / f"off{n}", net_module=unet, preprocessing=[*base, {**scale, "_disabled_": flag}],
                            postprocessing=[{"_target_": "Activationsd", "keys": "pred", "softmax": True},
                                            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                                            {"_target_": "KeepLargestConnectedComponentd", "keys": "pred",
                                             "applied_labels": [2], "_disabled_": flag}])
        card = read_bundle(root).card
        assert card.input.normalization == plain.input.normalization and card.inference.keep_largest is None
    on = read_bundle(write_bundle(tmp_path / "on", net_module=unet, preprocessing=[*base, {**scale,
                                                                                         "_disabled_": False}]))
    assert on.card.input.normalization.mode == "scale"


def test_postprocessing_maps_invert_order_and_keep_largest(tmp_path, unet):
    post = [{"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "image",
             "nearest_interp": False},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {"_target_": "KeepLargestConnectedComponentd", "keys": "pred", "applied_labels": [2]}]
    root = write_bundle(tmp_path / "b", net_module=unet, postprocessing=post)
    inference = read_bundle(root).card.inference
    assert inference.invert == "probabilities"
    assert inference.keep_largest.applied_labels == [2] and inference.keep_largest.independent
    # Spacingd by nearest neighbour: Invertd(nearest_interp=False) undoes it by nearest neighbour too, so the
    # probabilities' way back is the labels' (they had come back bilinearly: 82 % of a scan's labels agreed)
    nearest = [{"_target_": "LoadImaged", "keys": "image"}, {"_target_": "EnsureChannelFirstd", "keys": "image"},
               {"_target_": "Spacingd", "keys": "image", "pixdim": [1.0, 1.0, 1.5], "mode": "nearest"}]
    card = read_bundle(write_bundle(tmp_path / "n", net_module=unet, preprocessing=nearest, postprocessing=post)).card
    assert (card.input.interpolation, card.inference.invert) == ("nearest", "labels")
    labels_bilinear = [post[0], post[2], {**post[1]}]  # argmax first, then labels interpolated linearly
    root = write_bundle(tmp_path / "c", net_module=unet, postprocessing=labels_bilinear)
    with pytest.raises(ModelError, match="interpolates labels linearly"):
        read_bundle(root)


def test_a_metadata_input_name_the_transforms_do_not_use_keeps_the_normalisation(tmp_path, unet):
    """metadata.json calling the input 'img' while the transforms call it 'image': every transform was skipped as
    another input's, and the card had no normalisation (labels 42 % as the bundle's own), without a word."""
    root = write_bundle(tmp_path / "b", net_module=unet)
    reference = read_bundle(root).card.input.normalization
    assert reference.mode != "none"
    meta_path = root / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    inputs = meta["network_data_format"]["inputs"]
    inputs["img"] = inputs.pop("image")
    meta_path.write_text(json.dumps(meta))
    mapped = read_bundle(root)
    assert mapped.card.input.normalization == reference
    assert "the metadata names the input 'img', the preprocessing 'image'" in mapped.card.description


def test_a_monai_trained_state_dict_converts_with_axes_ijk(tmp_path):
    """A network trained on MONAI's (i, j, k) windows, converted from its state_dict with a card, ran on segflow's
    (k, j, i) windows as they are: 46 % of a volume's labels agreed with the user's own MONAI inference.  With
    --axes ijk the card reads x first and the kernels are permuted, as for a bundle."""
    import copy as _copy

    from segmentation import models

    torch.manual_seed(4)  # the registry's DynUNet (MONAI's class) with per-axis arguments as the training code has them
    net = models.create("dynunet", spatial_dims=3, in_channels=1, out_channels=3, kernel_size=[3, [3, 3, 1], 3],
                        strides=[1, 2, [2, 2, 1]], upsample_kernel_size=[2, [2, 2, 1]], res_block=False).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.3)
    weights = tmp_path / "model.pt"
    torch.save(net.state_dict(), weights)
    card = {"name": "monai-dynunet", "architecture": {"name": "dynunet", "kwargs": {
                "kernel_size": [3, [3, 3, 1], 3], "strides": [1, 2, [2, 2, 1]], "upsample_kernel_size": [2, [2, 2, 1]],
                "res_block": False}},
            "input": {"spatial_dims": 3, "channels": 1, "normalization": {"mode": "none"}, "spacing": [0.8, 0.9, 2.5]},
            "classes": [{"value": v, "name": f"c{v}"} for v in range(3)],
            "inference": {"roi": [16, 16, 8], "overlap": 0.25, "batch_size": 1}}
    (tmp_path / "card.json").write_text(json.dumps(card))
    result = CliRunner().invoke(app, ["model", "convert", str(weights), "--card", str(tmp_path / "card.json"),
                                      "--out", str(tmp_path / "ijk"), "--axes", "ijk"])
    assert result.exit_code == 0, result.output
    converted = load_model(tmp_path / "ijk")
    assert converted.card.inference.roi == [8, 16, 16] and converted.card.input.spacing == [2.5, 0.9, 0.8]
    x = torch.randn(1, 1, 8, 16, 24, generator=torch.Generator().manual_seed(1))  # (k, j, i)
    with torch.inference_mode():
        want = _reversed(_copy.deepcopy(net)(_reversed(x)))  # the user's network on MONAI's view
        got = converted.module(x)
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())
    plain = CliRunner().invoke(app, ["model", "convert", str(weights), "--card", str(tmp_path / "card.json"),
                                     "--out", str(tmp_path / "kji")])
    assert plain.exit_code == 0 and "--axes ijk" in " ".join(plain.output.split())  # the note says how
    with torch.inference_mode():  # taken in segflow's order, the same weights compute something else
        assert not torch.allclose(load_model(tmp_path / "kji").module(x), want, atol=1e-2)


def test_output_names_that_do_not_cover_every_channel_are_replaced_with_a_note(tmp_path, unet):
    """A channel_def naming 2 of 3 outputs (or keys 1..3) made every class `classN` without a word."""
    bundle = write_bundle(tmp_path / "b", net_module=unet)
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    meta["network_data_format"]["outputs"]["pred"]["channel_def"] = {"1": "tissue", "2": "lesion", "3": "x"}
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta))
    mapping = read_bundle(bundle)
    assert [c.name for c in mapping.card.classes] == ["class0", "class1", "class2"]
    assert any("channel_def does not name each of the network's 3 output channels 0..2" in n for n in mapping.notes)


def test_weights_that_do_not_fit_a_bundles_network_get_no_hint_about_segflows_defaults(tmp_path):
    """A bundle's network is built with MONAI's defaults pinned, yet its weight mismatch said "segflow's defaults for
    'unet' are norm 'batch' and num_res_units 1 ...: set them in architecture.kwargs", a lead to nowhere."""
    from storage.errors import ModelError

    torch.manual_seed(0)
    other = UNet(spatial_dims=3, in_channels=1, out_channels=3, channels=(4, 16), strides=(2,)).eval()
    bundle = write_bundle(tmp_path / "b", net_module=other)  # its config says channels (4, 8)
    with pytest.raises(ModelError) as err:
        load_model(bundle)
    assert "has shape" in str(err.value) and "segflow's defaults" not in str(err.value), err.value
