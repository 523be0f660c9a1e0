"""Weight formats: state_dict checkpoints, TorchScript archives, and pickles that would run code."""

from __future__ import annotations

import copy
import pathlib
import pickle

import pytest
import torch

from segmentation.card import Architecture, ModelCard
from segmentation.formats import ScriptedNetwork, detect_format, read_state_dict, save_torchscript
from segmentation.modeldir import build_module, check_model, convert_model, load_model
from storage.errors import ModelError, UnsafeModelError


def _card(**arch_kwargs) -> ModelCard:
    return ModelCard.model_validate({
        "name": "tiny",
        "architecture": {"name": "unet", "kwargs": {"channels": [4, 8], "strides": [2], "num_res_units": 0,
                                                    **arch_kwargs}},
        "input": {"spatial_dims": 2, "channels": 1},
        "classes": [{"value": v, "name": f"c{v}"} for v in range(3)],
        "inference": {"roi": [32, 32]},
    })


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(1)
    return build_module(_card()).eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(2))


def _same(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor) -> bool:
    with torch.inference_mode():
        return torch.equal(a(x), b(x))


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "model", "dataparallel", "legacy", "lightning"])
def test_state_dict_checkpoints_convert_to_a_model_directory(net, x, tmp_path, wrap):
    state = net.state_dict()
    assert all(k.startswith("model.") for k in state)  # a MONAI UNet's own names: never stripped blindly
    obj = {"plain": state, "state_dict": {"state_dict": state, "epoch": 7}, "model": {"model": state},
           "dataparallel": {f"module.{k}": v for k, v in state.items()}, "legacy": state,
           # a LightningModule holding the network as self.model (it was refused, naming a "missing" tensor)
           "lightning": {"state_dict": {f"model.{k}": v for k, v in state.items()}, "epoch": 3}}[wrap]
    ckpt = tmp_path / ("weights.bin" if wrap == "legacy" else "model.pth")
    torch.save(obj, ckpt, _use_new_zipfile_serialization=wrap != "legacy")
    assert detect_format(ckpt) == "state_dict"
    assert sorted(read_state_dict(ckpt)) == sorted(state if wrap != "lightning" else obj["state_dict"])
    loaded, _ = convert_model(ckpt, tmp_path / "out", card=_card())
    assert loaded.card.training["converted_from"]["format"] == "state_dict"
    assert _same(load_model(tmp_path / "out").module, net, x)


def test_a_checkpoint_with_averaged_weights_says_which_were_converted(net, x, tmp_path):
    """{"state_dict": ..., "state_dict_ema": ...}: the plain weights were taken without a word."""
    state = net.state_dict()
    ema = {k: v * 0.5 if v.is_floating_point() else v for k, v in state.items()}
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"state_dict": state, "state_dict_ema": ema, "epoch": 3}, ckpt)
    loaded, notes = convert_model(ckpt, tmp_path / "out", card=_card())
    assert _same(loaded.module, net, x)
    assert any("averaged weights (state_dict_ema); the 'state_dict' weights were converted" in n for n in notes)
    plain = tmp_path / "plain.pth"
    torch.save(state, plain)
    assert not any("averaged" in n for n in convert_model(plain, tmp_path / "out2", card=_card())[1])


def test_shape_mismatch_and_missing_card_are_refused(net, tmp_path):
    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    with pytest.raises(ModelError, match=r"model\.pt: .*shape"):
        convert_model(ckpt, tmp_path / "out", card=_card(channels=[4, 16]))
    with pytest.raises(ModelError, match="--card"):
        convert_model(ckpt, tmp_path / "out2")
    with pytest.raises(ModelError, match=r"model\.pt: the card's architecture: cannot build 'unet' .*'foo'"):
        convert_model(ckpt, tmp_path / "out3", card=_card(foo=1))  # it named no file
    with pytest.raises(ModelError, match="no card"):
        load_model(ckpt)
    assert not (tmp_path / "out" / "card.json").exists()


def test_weights_of_a_network_built_with_monai_s_defaults_are_refused_naming_segflow_s(tmp_path):
    """An author copying a MONAI call leaves MONAI's defaults out of the card; segflow's registry has others (batch
    norm, a residual unit), and "30 missing, 8 unexpected tensors" gave no clue which."""
    from monai.networks.nets import UNet

    ckpt = tmp_path / "monai.pt"
    torch.save(UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,)).state_dict(), ckpt)
    card = ModelCard.model_validate({**_card().model_dump(), "architecture": {"name": "unet", "kwargs": {
        "channels": [4, 8], "strides": [2]}}})
    with pytest.raises(ModelError, match=r"unexpected tensors .*; segflow's defaults for 'unet' are norm 'batch' and "
                                         r"num_res_units 1 \(MONAI's UNet: instance norm, 0\): set them in "
                                         "architecture.kwargs as the network was built"):
        convert_model(ckpt, tmp_path / "out", card=card)
    fitted = ModelCard.model_validate({**card.model_dump(), "architecture": {"name": "unet", "kwargs": {
        "channels": [4, 8], "strides": [2], "norm": "instance", "num_res_units": 0}}})
    convert_model(ckpt, tmp_path / "out2", card=fitted)


def test_converting_into_a_trained_model_directory_is_refused(net, x, tmp_path):
    """A converted model's directory may be converted into again; a trained one's is refused, weights untouched
    (its weights were replaced, and its checkpoints stayed beside the new card)."""
    from segmentation.modeldir import save_model

    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    convert_model(ckpt, tmp_path / "converted", card=_card())
    again, _ = convert_model(ckpt, tmp_path / "converted", card=_card())
    assert _same(again.module, net, x)
    trained = tmp_path / "trained"
    torch.manual_seed(5)
    save_model(trained, _card().model_copy(update={"training": {"steps": 10}}), build_module(_card()))
    before = (trained / "weights.safetensors").read_bytes()
    with pytest.raises(ModelError, match=r"trained.*did not convert.*choose another --out"):
        convert_model(ckpt, trained, card=_card())
    with pytest.raises(ModelError, match="did not convert"):  # the weights file inside it, converted in place
        convert_model(trained / "weights.safetensors", trained, card=_card())
    assert (trained / "weights.safetensors").read_bytes() == before


def test_non_tensor_content_is_refused_clearly(tmp_path):
    junk = tmp_path / "junk.pt"
    torch.save({"lr": 0.1, "name": "x", "steps": [1, 2]}, junk)
    with pytest.raises(ModelError, match="not a state_dict of tensors: entry 'lr' holds a float"):
        read_state_dict(junk)
    torch.save([torch.zeros(2)], junk)
    with pytest.raises(ModelError, match="holds a list"):
        read_state_dict(junk)
    (tmp_path / "noise.pt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ModelError, match="not a weights file"):
        read_state_dict(tmp_path / "noise.pt")


class _Payload:
    """Unpickling this calls ``Path.touch(marker)``: code chosen by whoever wrote the file."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickle_payload_is_refused_and_never_runs(net, tmp_path):
    marker = tmp_path / "payload-ran"
    ckpt = tmp_path / "evil.pt"
    torch.save({"state_dict": net.state_dict(), "extra": _Payload(marker)}, ckpt)
    with pytest.raises(UnsafeModelError) as err:
        read_state_dict(ckpt)
    message = str(err.value)
    assert message.startswith(str(ckpt)) and "\n" not in message
    assert "pickle payload" in message and "never unpickles code" in message
    with pytest.raises(UnsafeModelError):
        convert_model(ckpt, tmp_path / "out", card=_card())
    # the same pickle named .safetensors: torch handed the path to safetensors, whose error was a traceback
    disguised = tmp_path / "weights.safetensors"
    disguised.write_bytes(ckpt.read_bytes())
    with pytest.raises(UnsafeModelError, match="pickle payload"):
        convert_model(disguised, tmp_path / "out2", card=_card())
    assert not marker.exists()  # segflow refused before building anything
    # the payload is live: plain unpickling of the same object does run it
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.exists()


def test_torchscript_archive_runs_as_is_and_converts(net, x, tmp_path):
    scripted = torch.jit.script(net)
    bare = tmp_path / "bare.ts"
    torch.jit.save(scripted, str(bare))
    assert detect_format(bare) == "torchscript"
    with pytest.raises(ModelError, match="no embedded card"):
        load_model(bare, trust_bundle=True)

    # an archive carrying its card loads without the registry and matches the scripted module, when trusted: its
    # graph is code (loading runs its __setstate__, the check its forward), refused as a bundle's expressions are
    archive = save_torchscript(tmp_path / "with-card.pt", scripted,
                               _card().model_copy(update={"architecture": Architecture(name="torchscript")}).model_dump_json())
    for untrusted in (lambda: load_model(archive), lambda: check_model(archive),
                      lambda: convert_model(bare, tmp_path / "untrusted", card=_card())):
        with pytest.raises(ModelError, match=r"is a TorchScript archive: its graph is code.*--trust-code"):
            untrusted()
    assert not (tmp_path / "untrusted").exists()
    loaded = load_model(archive, trust_bundle=True)
    assert loaded.source == "torchscript" and isinstance(loaded.module, ScriptedNetwork)
    assert _same(loaded.module, scripted, x)
    clone = pickle.loads(pickle.dumps(loaded.module))  # travels to Dask workers as archive bytes
    assert _same(clone, scripted, x)

    # with a registry card, the weights are extracted into card + safetensors
    out, _ = convert_model(bare, tmp_path / "registry", card=_card(), trust_bundle=True)
    assert (tmp_path / "registry" / "weights.safetensors").is_file()
    assert _same(load_model(out.path).module, scripted, x)  # safetensors and the registry's code: no trust needed
    # without one, the graph is kept: card.json + model.ts, still code
    kept, _ = convert_model(archive, tmp_path / "kept", trust_bundle=True)
    assert kept.card.architecture.name == "torchscript" and (tmp_path / "kept" / "model.ts").is_file()
    assert _same(load_model(tmp_path / "kept", trust_bundle=True).module, scripted, x)
    with pytest.raises(ModelError, match=r"kept/model\.ts: is a TorchScript archive"):
        check_model(tmp_path / "kept")


class _Dict(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.net(x)}


class _AuxFirst(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = self.net(x)
        return [y[:, :, ::2, ::2], y]


@pytest.mark.parametrize("case", ["dict", "aux first", "classes"])
def test_a_torchscript_network_whose_output_segflow_cannot_use_is_refused_at_load(net, tmp_path, case):
    """A TorchScript archive is a black box: one returning a dict, an auxiliary head first, or another number of
    classes than its card converted fine, then failed inside the windows of `segment` with a torch error."""
    module = {"dict": _Dict(net), "aux first": _AuxFirst(net), "classes": net}[case]
    classes = 5 if case == "classes" else None
    card = _card().model_copy(update={"architecture": Architecture(name="torchscript")})
    if classes:
        from storage.classes import LabelClass

        card = card.model_copy(update={"classes": [LabelClass(value=v, name=f"c{v}") for v in range(classes)]})
    archive = save_torchscript(tmp_path / "net.pt", torch.jit.script(module.eval()), card.model_dump_json())
    with pytest.raises(ModelError, match=r"net.pt: the TorchScript network returns .* segflow needs the logits"):
        load_model(archive, trust_bundle=True)


def test_a_dynunet_saved_by_safetensors_save_model_converts(tmp_path):
    """safetensors' save_file refuses DynUNet (its blocks are reached under two names) and says to use save_model,
    which writes each shared tensor once: 34 of 66 names.  segflow refused that file as "32 missing" tensors."""
    from safetensors.torch import save_model

    card = ModelCard.model_validate({
        "name": "dyn", "input": {"spatial_dims": 3, "channels": 1},
        "architecture": {"name": "dynunet", "kwargs": {"kernel_size": [3, 3, 3], "strides": [1, 2, 2],
                                                       "upsample_kernel_size": [2, 2], "res_block": False}},
        "classes": [{"value": v, "name": f"c{v}"} for v in range(2)], "inference": {"roi": [16, 16, 16]}})
    torch.manual_seed(3)
    net = build_module(card).eval()
    save_model(net, str(tmp_path / "dyn.safetensors"))
    assert len(read_state_dict(tmp_path / "dyn.safetensors")) < len(net.state_dict())  # the aliases left out
    out, _ = convert_model(tmp_path / "dyn.safetensors", tmp_path / "model", card=card)
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(4))
    assert _same(load_model(out.path).module, net, x)


@pytest.mark.parametrize("res_units", [0, 1])  # the last layer a transposed convolution, or a residual unit's
@pytest.mark.parametrize("order", ["module", "sorted"])  # safetensors lists names sorted: the bias comes first
def test_weights_with_other_classes_or_channels_than_the_card_say_so(tmp_path, res_units, order):
    """A card listing 2 classes for 3-class weights was refused with "tensor model.2.conv.bias has shape (3,),
    architecture expects (2,); segflow's defaults for 'unet' are norm 'batch' ...": the cause was not said."""
    from segmentation.formats import fill

    from storage.classes import LabelClass

    base = _card(num_res_units=res_units)
    state = build_module(base).state_dict()
    state = dict(sorted(state.items())) if order == "sorted" else state
    two = base.model_copy(update={"classes": [LabelClass(value=v, name=f"c{v}") for v in range(2)]})
    with pytest.raises(ModelError, match=r": the weights' network gives 3 outputs and the card lists 2 classes"):
        fill(build_module(two), state, tmp_path / "w.pt", "unet")
    rgb = base.model_copy(update={"input": base.input.model_copy(update={"channels": 3})})
    with pytest.raises(ModelError, match=r": the weights' network takes 1 input channels and the card's input.channels "
                                         r"is 3$"):
        fill(build_module(rgb), state, tmp_path / "w.pt", "unet")
    wider = _card(num_res_units=res_units, channels=[4, 16])  # a middle layer: the architecture's hint stays
    with pytest.raises(ModelError, match="segflow's defaults for 'unet'"):
        fill(build_module(wider), state, tmp_path / "w.pt", "unet")


def test_a_torchscript_conversion_the_card_does_not_fit_leaves_the_model_directory_as_it_was(net, x, tmp_path):
    """Converting a TorchScript archive whose outputs the card did not fit (4 classes for a 3-class network) into a
    working model directory replaced its weights with the archive and the card, then failed, naming the copy."""
    from storage.classes import LabelClass

    torch.save(net.state_dict(), tmp_path / "net.pt")
    good, _ = convert_model(tmp_path / "net.pt", tmp_path / "model", card=_card())
    before = {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()}
    archive = tmp_path / "net.ts"
    torch.jit.save(torch.jit.script(net), str(archive))
    wrong = _card().model_copy(update={"architecture": Architecture(name="torchscript"),
                                       "classes": [LabelClass(value=v, name=f"c{v}") for v in range(4)]})
    for out in (tmp_path / "model", tmp_path / "new"):
        with pytest.raises(ModelError) as err:
            convert_model(archive, out, card=wrong, trust_bundle=True)
        assert str(err.value).startswith(f"{archive}: the TorchScript network returns "), err.value
    assert {p.name: p.read_bytes() for p in (tmp_path / "model").iterdir()} == before
    assert _same(load_model(tmp_path / "model").module, good.module, x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "net.pt", "net.ts"]  # no new/, no staging


def test_a_torchscript_network_that_ends_in_a_softmax_gives_its_own_probabilities(net, x, tmp_path):
    """Exported with its softmax (as many are), it had got segflow's too: its probabilities squashed to uniform."""
    import numpy as np

    from segmentation import predict
    from segmentation.models import ProbabilitiesAsLogits

    module = torch.nn.Sequential(net, torch.nn.Softmax(1)).eval()
    card = _card().model_copy(update={"architecture": Architecture(name="torchscript")})
    archive = save_torchscript(tmp_path / "net.pt", torch.jit.script(module), card.model_dump_json())
    loaded = load_model(archive, trust_bundle=True)
    assert isinstance(loaded.module, ProbabilitiesAsLogits)
    clone = pickle.loads(pickle.dumps(loaded.module))  # still travels to Dask workers
    with torch.inference_mode():
        own = module(x)
        np.testing.assert_allclose(torch.softmax(clone(x), 1).numpy(), own.numpy(), atol=1e-6)
        image = x[0].numpy()
        probs = predict(image, loaded, roi=(32, 32), overlap=0).compute(scheduler="sync")  # one window: its own
    np.testing.assert_allclose(probs, own[0].numpy(), atol=1e-5)
    assert float(own[0].max()) > 0.5  # a second softmax would give about 0.4 there: the check above can fail


def test_a_model_directory_is_never_written_over_a_file_or_into_a_folder_of_other_things(net, tmp_path):
    """`segflow train --out` over a file was a traceback; into a data folder it scattered a model among the data."""
    from segmentation.modeldir import check_model_out

    ckpt = tmp_path / "model.pt"
    torch.save(net.state_dict(), ckpt)
    with pytest.raises(ModelError, match="exists and is not a directory"):
        check_model_out(ckpt)
    data = tmp_path / "data"
    data.mkdir()
    (data / "scene.tif").write_bytes(b"x")
    with pytest.raises(ModelError, match="folder of other files"):
        convert_model(ckpt, data, card=_card())
    assert sorted(p.name for p in data.iterdir()) == ["scene.tif"]
    interrupted = tmp_path / "interrupted"  # a training run stopped before its card: --resume goes on there
    (interrupted / "checkpoints").mkdir(parents=True)
    check_model_out(interrupted, checkpoints=True)
    with pytest.raises(ModelError, match="folder of other files"):
        check_model_out(interrupted)
    check_model_out(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_model_out(tmp_path / "empty")
    # a card written by hand into a data folder is no model directory: training had written a model among the
    # data and replaced that card; a model directory (and a write a killed run left in it) is one
    (data / "card.json").write_text("{}")
    with pytest.raises(ModelError, match=r"holds 'scene.tif' beside its card.json, which is no part of a model"):
        check_model_out(data, checkpoints=True)
    trained = tmp_path / "trained"
    for name in ("card.json", "weights.safetensors", "learning_curve.png", "validation.md", "weights.tmp"):
        (trained / name).parent.mkdir(exist_ok=True)
        (trained / name).write_bytes(b"x")
    (trained / "checkpoints").mkdir()
    check_model_out(trained, checkpoints=True)


def test_weights_with_nan_are_refused_naming_the_tensor(net, tmp_path):
    """A NaN in the weights made every pixel one class (the argmax of NaN logits), reported "ok", and so did an
    infinite parameter; -inf in a buffer is let be (a mask buffer may hold it on purpose; which buffers are masks
    is not known, so none is checked)."""
    state = {k: v.clone() for k, v in net.state_dict().items()}
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key].view(-1)[:2] = float("nan")
    ckpt = tmp_path / "model.pt"
    torch.save(state, ckpt)
    with pytest.raises(ModelError, match=rf"model\.pt: weights hold 2 NaN value\(s\) in 1 tensor\(s\) \(first: "
                                         rf"{key.replace('.', '[.]')}\)"):
        convert_model(ckpt, tmp_path / "out", card=_card())
    scripted = copy.deepcopy(net)  # a TorchScript archive is checked too: its graph is kept as is
    scripted.load_state_dict(state)
    archive = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(scripted), str(archive))
    with pytest.raises(ModelError, match=r"model\.ts: weights hold 2 NaN value\(s\)"):
        load_model(archive, trust_bundle=True)
    # an infinite parameter ends in NaN logits the same way (every label 0, "ok"); an infinite buffer is let be
    state[key].view(-1)[:2] = float("-inf")
    torch.save(state, ckpt)
    with pytest.raises(ModelError, match=rf"model\.pt: weights hold 2 infinite value\(s\) in 1 parameter\(s\) "
                                         rf"\(first: {key.replace('.', '[.]')}\)"):
        convert_model(ckpt, tmp_path / "out", card=_card())
    parameters = {name for name, _ in net.named_parameters()}
    buffer = next(k for k, v in state.items() if v.is_floating_point() and k not in parameters)
    state[key].view(-1)[:2] = 0.0
    state[buffer].view(-1)[:1] = float("-inf")  # where a mask buffer would hold one
    torch.save(state, ckpt)
    convert_model(ckpt, tmp_path / "out", card=_card())



def test_a_state_dict_written_with_pickle_dump_says_to_use_torch_save_without_torch_warnings(net, tmp_path):
    """pickle.dump of a state_dict (plain tensors) is refused by the weights-only load (its tensors are pickled
    through torch.storage._load_from_bytes); the hint said "save the state_dict of plain tensors", which it was,
    behind torch's "Detected pickle protocol 4" UserWarning."""
    import warnings

    path = tmp_path / "raw.pkl"
    with open(path, "wb") as f:
        pickle.dump(net.state_dict(), f, protocol=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UnsafeModelError, match=r"torch.save\(net.state_dict\(\), PATH\), not pickle.dump"):
            read_state_dict(path)


def test_converting_a_folder_of_a_card_and_a_pickle_names_the_file_to_convert(net, tmp_path):
    """`model convert DIR` of a card beside a .pt said "it is already a segflow model directory", which `inspect`
    of the same folder denies (no safetensors weights): the command that works is named instead."""
    folder = tmp_path / "md"
    folder.mkdir()
    (folder / "card.json").write_text(_card().model_dump_json())
    torch.save(net.state_dict(), folder / "model.pt")
    with pytest.raises(ModelError) as err:
        convert_model(folder, tmp_path / "out")
    assert "already a segflow model directory" not in str(err.value)
    assert f"segflow model convert {folder / 'model.pt'} --card {folder / 'card.json'} --out NEW_DIR" in str(err.value)
