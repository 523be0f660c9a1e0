"""The architecture zoo: every registered network builds in 2-D and 3-D, gives logits at the
input's size in fp32 and bf16, refuses sizes it cannot take, trains, folds its BatchNorm,
and sees no further than its documented receptive field."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from segmentation import layers, models
from segmentation.inference import WindowPredictor
from segmentation.netprep import fold_batch_norm
from segmentation.layers import Field
from storage.errors import ModelError

OWN = ["deeplabv3plus", "fcn", "pspnet"]
MONAI = ["basic_unet", "dynunet", "segresnet", "unet"]

# Small but complete versions of each network: every branch present, few channels.
TINY: dict[str, dict] = {
    "unet": {"channels": (4, 8, 8), "strides": (2, 2)},
    "basic_unet": {"features": (4, 4, 8, 8, 8, 4)},
    "segresnet": {"init_filters": 8, "blocks_down": (1, 1, 1), "blocks_up": (1, 1)},
    "dynunet": {"filters": (4, 8, 8, 8)},
    "deeplabv3plus": {"widths": (4, 8, 8, 8), "depths": (1, 1, 1, 1), "aspp_channels": 8, "low_channels": 4,
                      "decoder_channels": 8},
    "fcn": {"widths": (4, 4, 8, 8, 8), "depths": (1, 1, 1, 1, 1), "fc_channels": 8},
    "pspnet": {"widths": (4, 8, 8, 8), "depths": (1, 1, 1, 1), "channels": 8},
}


def size_for(name: str, dims: int) -> int:
    """The smallest test size each network takes: 64 in 2-D, 32 in 3-D (48 for PSPNet's 6 bins)."""
    if dims == 2:
        return 64
    return 48 if name == "pspnet" else 32


def build(name: str, dims: int, *, tiny: bool = True, cin: int = 3, classes: int = 4, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    args = {**(TINY[name] if tiny else {}), **kwargs}
    return models.create(name, spatial_dims=dims, in_channels=cin, out_channels=classes, **args)


def test_registry_lists_the_zoo():
    assert set(OWN + MONAI) <= set(models.names())


# ---------------------------------------------------------------- shapes and precision

@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", OWN + MONAI)
def test_default_network_gives_logits_at_input_size(name, dims):
    net = build(name, dims, tiny=False, cin=4, classes=5).eval()
    s = size_for(name, dims)
    batch = 2 if dims == 2 else 1
    x = torch.randn(batch, 4, *([s] * dims))
    with torch.inference_mode():
        y = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yb = net(x)
    assert y.shape == (batch, 5) + (s,) * dims
    assert yb.shape == y.shape
    assert torch.isfinite(y).all() and torch.isfinite(yb.float()).all()
    assert models.input_multiple(net) > 1 and s % models.input_multiple(net) == 0
    models.check_roi(net, [s] * dims, name)


@pytest.mark.parametrize("name", OWN)
def test_channels_last_bf16_inference_path(name, monkeypatch):
    """Through the WindowPredictor as inference runs it: folded, channels-last, bf16 autocast (forced: on a CPU
    without bf16 instructions ``fast`` would run fp32)."""
    monkeypatch.setenv("SEGFLOW_CPU_BF16", "1")
    net = build(name, 2, cin=2, classes=3)
    region = np.random.default_rng(0).standard_normal((2, 64, 128)).astype(np.float32)
    windows = [(slice(0, 64), slice(0, 64)), (slice(0, 64), slice(64, 128))]
    predictor = WindowPredictor(net, spatial_dims=2, num_classes=3, precision="fast", device="cpu")
    assert predictor.cpu_dtype == torch.bfloat16
    acc = predictor.accumulate(region, windows, np.ones((64, 64), np.float32), 3)
    assert acc.shape == (3, 64, 128)
    np.testing.assert_allclose(acc.sum(0), 1.0, rtol=1e-4)  # softmax over classes, each pixel in one window


# ---------------------------------------------------------------- input sizes

@pytest.mark.parametrize("name,multiple", [("deeplabv3plus", 16), ("fcn", 32), ("pspnet", 8)])
def test_own_networks_refuse_sizes_with_a_clear_message(name, multiple):
    net = build(name, 2).eval()
    assert models.input_multiple(net) == multiple
    bad = (100, 96)
    with pytest.raises(ValueError, match=rf"^{name} needs each spatial size divisible by {multiple}, "
                                         rf"got \(100, 96\)$"):
        net(torch.randn(1, 3, *bad))
    with pytest.raises(ModelError, match=rf"divisible by {multiple}, got roi \(100, 96\)"):
        models.check_roi(net, bad, name)


def test_an_instance_norm_network_needs_more_than_one_pixel_at_its_coarsest_level():
    """BasicUNet (instance norm) at roi 16: every window failed inside the run ("Expected more than 1 spatial
    element when training"), although 16 is its input multiple."""
    net = models.create("basic_unet", spatial_dims=3, in_channels=1, out_channels=2, features=[4, 4, 8, 8, 16, 4])
    net.eval()
    with pytest.raises(ModelError, match=r"at least 32 \(its instance norm needs more than one pixel at the "
                                         r"coarsest level\), got roi \(16, 16, 16\)"):
        models.check_roi(net, (16, 16, 16), "basic_unet")
    with pytest.raises(ValueError, match="more than 1 spatial element"):  # what the windows met
        with torch.inference_mode():
            net(torch.zeros(1, 1, 16, 16, 16))
    models.check_roi(net, (32, 16 * 3, 32), "basic_unet")


def test_pspnet_needs_a_feature_map_as_large_as_its_largest_bin():
    net = build("pspnet", 3).eval()
    assert net.min_input_size == 48
    with pytest.raises(ValueError, match=r"^pspnet needs each spatial size at least 48, got \(32, 32, 32\)$"):
        net(torch.randn(1, 3, 32, 32, 32))
    with pytest.raises(ModelError, match="at least 48"):
        models.check_roi(net, (32, 32, 32), "pspnet")
    small = build("pspnet", 3, bins=(1, 2))
    assert small.min_input_size == 16
    assert small.eval()(torch.randn(1, 3, 16, 16, 16)).shape == (1, 4, 16, 16, 16)


def test_training_on_one_single_pixel_feature_map_is_refused_clearly():
    net = build("deeplabv3plus", 2).train()
    with pytest.raises(ValueError, match="cannot train on one sample of size \\(16, 16\\)"):
        net(torch.randn(1, 3, 16, 16))
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 4, 16, 16)  # a batch of two is fine
    assert net.eval()(torch.randn(1, 3, 16, 16)).shape == (1, 4, 16, 16)


@pytest.mark.parametrize("name,kwargs,multiple", [
    ("unet", {"channels": (4, 8, 8, 8), "strides": (2, 2, 2)}, 8),
    ("unet", {"channels": (4, 8), "strides": (3,)}, 3),
    ("dynunet", {"filters": (4, 8, 8, 8)}, 8),
    ("dynunet", {"filters": (4, 8, 8), "strides": (1, 2, 4), "kernel_size": (3, 3, 5),
                 "upsample_kernel_size": (2, 4), "res_block": False}, 8),  # MONAI's res blocks need stride <= 3
    ("segresnet", {"init_filters": 8, "blocks_down": (1, 1, 1), "blocks_up": (1, 1)}, 4),
    ("basic_unet", {}, 16),
])
def test_registry_knows_what_monai_networks_need(name, kwargs, multiple):
    net = build(name, 2, tiny=False, **kwargs).eval()
    assert models.input_multiple(net) == multiple
    good = 2 * multiple
    assert net(torch.randn(1, 3, good, good)).shape == (1, 4, good, good)
    with pytest.raises(ModelError, match=f"divisible by {multiple}"):
        models.check_roi(net, (good + 1, good), name)
    if name in ("unet", "dynunet"):  # off the multiple they fail or return the wrong size: the check matters
        odd = good + multiple // 2 + 1
        try:
            shape = tuple(net(torch.randn(1, 3, odd, good)).shape)
        except RuntimeError:
            shape = None
        assert shape != (1, 4, odd, good)


def test_anisotropic_dynunet_multiples_per_axis():
    net = build("dynunet", 3, filters=(4, 8, 8), strides=(1, (1, 2, 2), 2),
                upsample_kernel_size=((1, 2, 2), 2))
    assert models.input_multiples(net, 3) == (2, 4, 4)
    assert models.input_multiple(net) == 4
    models.check_roi(net, (6, 8, 12))
    with pytest.raises(ModelError, match=r"divisible by \(2, 4, 4\)"):
        models.check_roi(net, (6, 8, 10))


# ---------------------------------------------------------------- building errors

@pytest.mark.parametrize("name", OWN + MONAI)
def test_unknown_kwargs_are_model_errors(name):
    with pytest.raises(ModelError, match=f"cannot build '{name}'"):
        build(name, 2, no_such_option=3)


@pytest.mark.parametrize("channels", [[16, 32, 64, 2**40], [4, 10**30]])
def test_absurd_sizes_in_a_card_are_one_model_error_not_a_traceback(channels):
    """A card asking for 2**40 channels printed torch's allocator traceback; 10**30 a C++ overflow with its
    frames, in a line naming no card."""
    with pytest.raises(ModelError, match=r"cannot build 'unet' with \{'channels': \[.*\]\}: "
                                         r"(RuntimeError: .*\(are its sizes plausible\?\)$|empty\(\): .*Overflow)"
                       ) as caught:
        build("unet", 2, channels=channels, strides=[2] * (len(channels) - 1))
    assert "\n" not in str(caught.value) and len(str(caught.value)) < 700


@pytest.mark.parametrize("name,kwargs", [
    ("deeplabv3plus", {"output_stride": 32}),
    ("deeplabv3plus", {"rates": (6, 0)}),
    ("deeplabv3plus", {"block": "dense"}),
    ("deeplabv3plus", {"norm": "layer"}),
    ("pspnet", {"bins": (1, 0)}),
    ("pspnet", {"bins": (2, 2)}),
    ("fcn", {"upsample": "nearest"}),
    ("fcn", {"depths": (1, 1, 1)}),
    ("dynunet", {"filters": (8, 16)}),
    ("segresnet", {"blocks_down": (1, 2), "blocks_up": (1, 1)}),
])
def test_bad_values_are_model_errors(name, kwargs):
    with pytest.raises(ModelError):
        build(name, 2, **kwargs)


@pytest.mark.parametrize("norm", ["group", "instance"])
@pytest.mark.parametrize("name", OWN)
def test_per_sample_norms_work_and_make_the_context_global(name, norm):
    net = build(name, 2, norm=norm)
    assert models.global_context(net)
    x = torch.randn(1, 3, 64, 64)
    assert net.train()(x).shape == net.eval()(x).shape == (1, 4, 64, 64)


def test_learned_upsampling_starts_as_linear_interpolation():
    up = layers.conv_transpose(3, 2, 2, 4)
    x = torch.rand(1, 2, 1, 1, 1) * torch.ones(1, 2, 4, 4, 4)  # constant per channel
    y = up(x)
    assert y.shape == (1, 2, 16, 16, 16)
    torch.testing.assert_close(y[..., 2:-2, 2:-2, 2:-2], x[..., :1, :1, :1].expand(1, 2, 12, 12, 12))
    ramp = torch.arange(4.0).view(1, 1, 4, 1).expand(1, 1, 4, 4)
    line = layers.conv_transpose(2, 1, 1, 2)(ramp)[0, 0, 2:-2, 3]  # interior of a linear ramp stays linear
    torch.testing.assert_close(line.diff(), torch.full_like(line.diff(), 0.5))


def test_unknown_name_is_a_model_error():
    with pytest.raises(ModelError, match="unknown architecture 'deeplab'"):
        models.create("deeplab", spatial_dims=2, in_channels=1, out_channels=2)


# ---------------------------------------------------------------- training

@pytest.mark.parametrize("name,dims", [(n, 2) for n in OWN + MONAI] + [(n, 3) for n in OWN])
def test_one_optimizer_step_reduces_the_loss(name, dims):
    net = build(name, dims, cin=2, classes=3).train()
    s = size_for(name, dims)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, *([s] * dims), generator=gen)  # batch 1: the BatchNorm pitfalls included
    y = torch.randint(0, 3, (1,) + (s,) * dims, generator=gen)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    before = F.cross_entropy(net(x), y)
    opt.zero_grad()
    before.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(bool(g.abs().sum() > 0) for g in grads) > 0.9 * len(grads)
    opt.step()
    after = F.cross_entropy(net(x), y)
    assert after.item() < before.item()


def test_dynunet_deep_supervision_gives_the_main_head_in_eval():
    net = build("dynunet", 2, deep_supervision=True, deep_supr_num=2)
    x = torch.randn(2, 3, 32, 32)
    assert net.train()(x).shape == (2, 3, 4, 32, 32)  # main + 2 heads, stacked on dim 1
    assert net.eval()(x).shape == (2, 4, 32, 32)
    assert build("dynunet", 2).train()(x).shape == (2, 4, 32, 32)  # off by default


@pytest.mark.parametrize("name", OWN + MONAI)
def test_model_directory_round_trip(name, tmp_path):
    """DynUNet included: MONAI registers its blocks under two names, so its state_dict shares tensors."""
    from segmentation.card import ModelCard
    from segmentation.modeldir import load_model, save_model

    card = ModelCard.model_validate({
        "name": f"zoo-{name}", "architecture": {"name": name, "kwargs": TINY[name]},
        "input": {"spatial_dims": 2, "channels": 3, "normalization": {"mode": "scale", "scale": [1.0]}},
        "classes": [{"value": v, "name": f"c{v}"} for v in range(4)], "inference": {"roi": [64, 64]}})
    net = build(name, 2).eval()
    save_model(tmp_path / name, card, net)
    loaded = load_model(tmp_path / name).module.eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), atol=0, rtol=0)


# ---------------------------------------------------------------- BatchNorm folding

def _randomise_batch_norm(net: nn.Module) -> None:
    """Non-trivial statistics and affine terms, so folding has something to get wrong."""
    gen = torch.Generator().manual_seed(3)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)


def _batch_norms(net: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())


@pytest.mark.parametrize("name,dims", [(n, 2) for n in OWN + MONAI] + [(n, 3) for n in OWN])
def test_fold_batch_norm_keeps_outputs(name, dims):
    net = build(name, dims, **{"dynunet": {"norm_name": "batch"}}.get(name, {"norm": "batch"}))
    _randomise_batch_norm(net)
    net.eval()
    s = size_for(name, dims)
    x = torch.randn(1, 3, *([s] * dims))
    folded = fold_batch_norm(net, x)
    with torch.no_grad():
        expected = net(x)
        got = folded(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    if name == "basic_unet":
        # fx traces BasicUNet's UpCat without its skip concatenation (torch.jit.isinstance of a
        # proxy is False): the probe catches the wrong graph and the original network is kept
        assert folded is net
    if name in OWN:  # traceable, and every BatchNorm follows a conv: all folded away
        assert _batch_norms(folded) == 0
    if name == "unet":  # traced; the norms after its transposed convs are folded too, its Dropouts dropped
        assert _batch_norms(net) > 0 and _batch_norms(folded) == 0
        calls = [n.target for n in folded.graph.nodes if n.op == "call_module"]
        assert not any(isinstance(folded.get_submodule(t), nn.Dropout) for t in calls)
    if name in OWN:  # the size check survives tracing
        with pytest.raises(ValueError, match="divisible by"):
            folded(torch.randn(1, 3, *([s + 4] * dims)))


class _SharedTransposed(nn.Module):
    """A transposed conv whose output feeds both a BatchNorm and a skip: folding the norm into the conv would
    change the skip, so it must stay; the second pair is plain and folds."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(3, 4, 2, stride=2)
        self.bn = nn.BatchNorm2d(4)
        self.up2 = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.bn2 = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(x)
        return self.drop(self.bn2(self.up2(self.bn(y) + y)))


def test_a_norm_after_a_shared_transposed_conv_stays_and_eval_dropout_goes():
    net = _SharedTransposed()
    _randomise_batch_norm(net)
    net.eval()
    x = torch.randn(2, 3, 8, 8)
    folded = fold_batch_norm(net, x)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), net(x), atol=1e-5, rtol=1e-5)
    calls = [type(folded.get_submodule(n.target)).__name__ for n in folded.graph.nodes if n.op == "call_module"]
    assert calls == ["ConvTranspose2d", "BatchNorm2d", "ConvTranspose2d"], calls


# ---------------------------------------------------------------- receptive fields

# Small configurations whose field fits a 2-D test image, with BatchNorm (local in eval)
# and no global pooling, so the gradient can be measured against the theory.
RF_CASES: list[tuple[str, dict]] = [
    ("unet", {"channels": (4, 8, 8), "strides": (2, 2)}),
    ("unet", {"channels": (4, 8, 8), "strides": (2, 2), "num_res_units": 0}),
    ("basic_unet", {"features": (4, 4, 4, 4, 4, 4), "norm": "batch"}),
    ("segresnet", {"init_filters": 4, "norm": "batch", "blocks_down": (1, 1, 1), "blocks_up": (1, 1)}),
    ("dynunet", {"filters": (4, 4, 4, 4), "norm_name": "batch", "kernel_size": (3, 5, 3, 3)}),
    ("deeplabv3plus", {"widths": (4, 4, 4, 4), "depths": (1, 1, 1, 1), "rates": (2,), "output_stride": 8,
                       "image_pooling": False, "aspp_channels": 4, "low_channels": 4, "decoder_channels": 4,
                       "block": "bottleneck"}),
    ("fcn", {"widths": (4, 4, 4, 4, 4), "depths": (1, 1, 1, 1, 1), "fc_channels": 16}),
    ("pspnet", {"widths": (4, 4, 4, 4), "depths": (1, 1, 1, 1), "bins": (), "channels": 4}),
]


def _gradient_extent(net: nn.Module, size: int, cin: int = 2) -> tuple[int, ...]:
    """Per axis, the span of input pixels with a nonzero gradient of the centre output."""
    net = net.eval().double()
    x = torch.randn(1, cin, size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x.requires_grad_(True)
    net(x)[0, :, size // 2, size // 2].sum().backward()
    nz = (x.grad.abs().sum((0, 1)) > 0).nonzero()
    return tuple(int(v) for v in nz.max(0).values - nz.min(0).values + 1)


@pytest.mark.parametrize("name,kwargs", RF_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(RF_CASES)])
def test_measured_field_is_within_the_theoretical_one(name, kwargs):
    net = build(name, 2, tiny=False, cin=2, classes=2, **kwargs)
    if name == "fcn":  # its skip heads start at zero, which would hide their paths
        for head in (net.score16, net.score8):
            nn.init.normal_(head.weight)
    assert not models.global_context(net)
    rf = models.receptive_field(net)
    assert rf is not None
    size = 1 << (rf + 16).bit_length()  # the whole field fits, so nothing is clipped
    extent = _gradient_extent(net, size)
    assert max(extent) <= rf, f"{name}: gradient reaches {extent} pixels, theory says {rf}"
    assert min(extent) >= 0.6 * rf, f"{name}: gradient reaches only {extent} pixels of {rf}: theory too loose"


@pytest.mark.parametrize("name,kwargs", [("deeplabv3plus", {}), ("pspnet", {})])
def test_global_pooling_makes_the_field_global(name, kwargs):
    net = build(name, 2, cin=2, classes=2, **kwargs)
    assert models.global_context(net)
    assert _gradient_extent(net, 128) == (128, 128)  # every input pixel reaches the centre output


def test_field_arithmetic_by_hand():
    f = Field().conv(3).conv(3, stride=2).conv(3, dilation=2)  # 1 + 2 + 2 + 2·2·2
    assert f.size == 13 and f.jump == 2
    assert Field().conv(2, stride=2, padding=0).conv(2, stride=2, padding=0).size == 4
    assert Field().transposed(4, 2, 1).size == 3  # two taps, half a pixel apart at most
    with pytest.raises(ValueError, match="different resolutions"):
        Field.merge(Field(), Field().conv(3, stride=2))


@pytest.mark.parametrize("name", OWN + MONAI)
def test_documented_receptive_field_is_the_computed_one(name):
    """Docstrings quote the default's field; it must be what the formula gives."""
    net = build(name, 2, tiny=False)
    rf = models.receptive_field(net)
    doc = (type(net).__doc__ if name in OWN else models._REGISTRY[name].__doc__) or ""
    quoted = [int(v) for v in re.findall(r"receptive field[^.]*?(\d+) pixels", " ".join(doc.split()))]
    assert quoted and quoted[0] == rf, f"{name}: documented {quoted}, computed {rf}"
    assert models.receptive_field(build(name, 3, tiny=False)) == rf  # the same per axis in 3-D


def test_build_plan_refuses_a_roi_the_network_cannot_take_before_running_anything():
    from segmentation import build_plan
    from storage.errors import ModelError

    net = models.create("deeplabv3plus", spatial_dims=2, in_channels=3, out_channels=2)
    image = np.zeros((3, 200, 200), np.float32)
    with pytest.raises(ModelError, match=r"divisible by 16, got roi \(100, 96\)"):
        build_plan(image, net, roi=(100, 96), num_classes=2)
    build_plan(image, net, roi=(96, 96), num_classes=2)  # a fitting roi builds


def test_a_fold_in_one_thread_never_breaks_a_forward_pass_in_another():
    """torch.fx patches nn.Module.__call__ for the whole process while it traces: with `nightly --parallel 3`, one
    input's fold ran while another's windows ran in the same worker, and inputs failed at random with "NameError:
    module is not installed as a submodule".  Forward passes and traces now take turns (TracingGate)."""
    import threading

    from monai.networks.nets import UNet

    from segmentation.netprep import TRACING, fold_batch_norm

    def unet() -> torch.nn.Module:
        return UNet(2, 4, 5, channels=(8, 16, 32), strides=(2, 2), num_res_units=1, norm="batch").eval()

    x = torch.rand(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    runner = fold_batch_norm(unet(), x)
    errors: list[str] = []
    stop = threading.Event()

    def forward_passes() -> None:
        while not stop.is_set():
            try:
                with TRACING.forward(), torch.inference_mode():  # as Predictor._forward runs a window batch
                    runner(x)
            except Exception as exc:  # noqa: BLE001 - any failure is the test's finding
                errors.append(repr(exc))
                stop.set()

    thread = threading.Thread(target=forward_passes)
    thread.start()
    try:
        for _ in range(20):
            if stop.is_set():
                break
            fold_batch_norm(unet(), x)
    finally:
        stop.set()
        thread.join()
    assert errors == []
