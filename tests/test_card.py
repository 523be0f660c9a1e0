"""The model card is validated at the edge: versions, TTA axes and spacing must fit the network."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from segmentation.card import CARD_VERSION, ModelCard


def card(**changes) -> dict:
    base = {"name": "c", "architecture": {"name": "unet"},
            "input": {"spatial_dims": 2, "channels": 3, "dtype": "uint8", "spacing": [10.0, 10.0],
                      "spacing_unit": "m", "channel_names": ["red", "green", "blue"]},
            "classes": [{"value": 0, "name": "water", "code": "LC-10"}, {"value": 1, "name": "forest"}],
            "inference": {"roi": [64, 64], "flip_tta": [1, 0]}}
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            base[section] = {**base[section], field: value}
        else:
            base[section] = value
    return base


def test_a_full_card_round_trips_and_sorts_tta_axes():
    c = ModelCard.model_validate(card())
    assert c.card_version == CARD_VERSION == 4
    assert c.inference.flip_tta == [0, 1]
    assert c.classes[0].code == "LC-10"
    assert ModelCard.model_validate_json(c.model_dump_json()) == c


def test_a_card_that_pads_with_zeros_keeps_the_hash_it_had_before_padding_was_a_field():
    """The provenance and the nightly ledger key on the card's hash: the padding fields, added later, leave a card
    that does not use them with its earlier hash (computed by segflow before they existed), and change the hash
    of one that does."""
    c = ModelCard.model_validate(card())
    assert c.shaping_sha256() == "f65f98e83ad84eaea4ebd1028650b0d7f8809380e086d1da18c0f22fd3d96544"
    assert "padding" not in c.shaping()["inference"]
    for inference in ({"padding": "reflect"}, {"padding_value": 0.5}):
        padded = ModelCard.model_validate(card(inference={"roi": [64, 64], "flip_tta": [1, 0], **inference}))
        assert padded.shaping_sha256() != c.shaping_sha256()


def test_segment_options_sort_tta_axes_like_the_card():
    """--tta 1,0 and --tta 0,1 are one run: they were recorded apart (another run identity, so an interrupted
    run of one was not resumed by the other, and other output bytes)."""
    from flows.config import SegmentOptions
    from flows.ledger import keyed_parameters

    a, b = SegmentOptions(flip_tta=[1, 0]), SegmentOptions(flip_tta=[0, 1])
    assert a.flip_tta == b.flip_tta == [0, 1]
    c = ModelCard.model_validate(card())
    assert keyed_parameters(c, a) == keyed_parameters(c, b)


def test_a_window_no_machine_holds_is_refused_at_the_edge():
    """A card's roi of 1e30, or --roi 100000,100000, failed every input with a torch allocation error (exit 1,
    each line blaming the input)."""
    from flows.config import SegmentOptions

    with pytest.raises(ValidationError, match="is a window of more than 268,435,456 pixels"):
        ModelCard.model_validate(card(inference__roi=[10**30, 10**30]))
    with pytest.raises(ValidationError, match="is a window of more than"):
        SegmentOptions(roi=[100000, 100000])
    assert SegmentOptions(roi=[16384, 16384]).roi == [16384, 16384]  # the largest taken
    for bad in (float("nan"), float("inf")):  # "--overlap nan" was told "Input should be less than 1"
        with pytest.raises(ValidationError, match="finite number"):
            SegmentOptions(overlap=bad)
    assert ModelCard.model_validate(card(inference__roi=[512, 512])).inference.roi == [512, 512]


def test_version_1_cards_still_read():
    c = ModelCard.model_validate(card(card_version=1, inference={"roi": [64, 64]}))
    assert c.card_version == 1 and c.inference.flip_tta == []


def volume_card(**input_changes) -> dict:
    return card(input={"spatial_dims": 3, "channels": 1, "spacing": [2.0, 1.5, 1.5], "spacing_unit": "mm",
                       **input_changes}, inference={"roi": [32, 32, 32]})


def test_a_volume_card_in_metres_is_refused():
    """Read as millimetres: 1.5 m voxels ran on a 1.5 mm grid, and 0.0015 m was refused as 0.0015 mm."""
    ModelCard.model_validate(volume_card())
    with pytest.raises(ValidationError, match="a volume model's spacing is in millimetres"):
        ModelCard.model_validate(volume_card(spacing_unit="m"))
    for field, value in (("units", "reflectance"), ("resampling", "nearest"), ("crs", "utm")):  # ignored before
        with pytest.raises(ValidationError, match=f"input.{field} applies to 2-D rasters"):
            ModelCard.model_validate(volume_card(**{field: value}))


def test_model_space_applies_from_version_3_only():
    """A version 2 card's spacing was documentation: applying it now would change its users' labels silently."""
    v3 = ModelCard.model_validate(volume_card(orientation="lps"))
    assert v3.input.orientation == "LPS" and v3.applies_model_space
    assert v3.inference.invert == "probabilities" and v3.input.interpolation == "bilinear"
    v2 = ModelCard.model_validate({**volume_card(), "card_version": 2})
    assert not v2.applies_model_space
    assert not ModelCard.model_validate(card()).applies_model_space  # 2-D rasters: issue 11's warp, not this


@pytest.mark.parametrize("norm, message", [
    ({"mode": "percentile", "lower": 1.0, "upper": 99.0, "b_min": 0.0}, "needs 'lower', 'upper', 'b_min'"),
    ({"mode": "percentile", "lower": 99.0, "upper": 1.0, "b_min": 0.0, "b_max": 1.0}, "below 'upper'"),
    ({"mode": "scale", "scale": [1.0], "nonzero": True}, "nonzero"),
    # each of these was accepted, and made every input meaningless (NaN) or failed only once a run had started
    ({"mode": "scale", "scale": [float("nan")]}, r"scale must hold finite numbers.*, got \[nan\]"),
    # finite, but inf in the float32 arithmetic: every pixel became 0 and the run reported ok with one class
    ({"mode": "scale", "scale": [1e308]}, r"scale must hold finite numbers within float32's range"),
    ({"mode": "zscore", "mean": [-1e39], "std": [1.0]}, "mean must hold finite numbers within float32's range"),
    ({"mode": "zscore", "mean": [float("inf")], "std": [1.0]}, "mean must hold finite numbers"),
    ({"mode": "zscore", "mean": [0.0], "std": [1.0], "clip": [5.0, -5.0]}, r"clip \[5.0, -5.0\] must be"),
    ({"mode": "zscore", "mean": [0.0, 0.0], "std": [1.0]}, "mean lists 2 values for 1 channels"),
    # a ZeroDivisionError blamed on each input, and every pixel one class with rc 0
    ({"mode": "percentile", "lower": 5.0, "upper": 95.0, "b_min": 1.0, "b_max": 1.0}, "'b_min' and 'b_max' must differ"),
    ({"mode": "zscore", "mean": [0.0], "std": [1e-320]}, "std must be at least 1e-12"),
])
def test_inconsistent_normalisations_are_refused(norm, message):
    with pytest.raises(ValidationError, match=message):
        ModelCard.model_validate(volume_card(normalization=norm))


@pytest.mark.parametrize("changes, message", [
    ({"card_version": 5}, "newer than this segflow reads"),
    ({"classes": [{"value": 0, "name": "bg"}, {"value": 1, "name": "liver", "code": "SCT:liver"}]}, "SNOMED CT"),
    ({"input__orientation": "RRS"}, "three axcodes"),
    ({"input__orientation": "RAS"}, "applies to 3-D volumes"),
    ({"inference__keep_largest": {"applied_labels": [0]}}, "other than 0"),
    ({"inference__keep_largest": {"applied_labels": [7]}}, "other than 0"),
    ({"inference__flip_tta": [2]}, "flip_tta axes must be < spatial_dims"),
    ({"inference__flip_tta": [0, 0]}, "distinct"),
    ({"input__spacing": [1.0]}, "one value per spatial axis"),
    ({"input__spacing": [float("nan"), 1.0]}, "spacing must hold finite numbers"),
    ({"input__spacing_unit": "furlong"}, "spacing_unit"),
    # two classes of one name: refused at load (every volume input failed after inference, naming no input)
    ({"classes": [{"value": 0, "name": "bg"}, {"value": 1, "name": "lesion"}, {"value": 2, "name": "lesion"}]},
     "'lesion' names more than one class"),
    ({"architecture": {"name": "unet", "kwargs": {"in_channels": 4}}}, "kwargs.in_channels is 4, but input.channels"),
    ({"architecture": {"name": "unet", "kwargs": {"out_channels": 3}}}, "the number of classes makes it 2"),
    ({"architecture": {"name": "unet", "kwargs": {"spatial_dims": 3}}}, "input.spatial_dims makes it 2"),
])
def test_inconsistent_cards_are_refused(changes, message):
    with pytest.raises(ValidationError, match=message):
        ModelCard.model_validate(card(**changes))


@pytest.mark.parametrize("color", [[300, -10, 20], [0, 0, 256], [1, 2]])
def test_a_class_colour_that_is_no_8_bit_rgb_is_refused_with_the_card(color):
    """[300, -10, 20] passed the card, failed after the inference (a quicklook's uint8, a COG's colour hint) or
    went as is into the Slicer and ITK-SNAP tables."""
    from storage.classes import LabelClass

    with pytest.raises(ValidationError, match="color"):
        LabelClass(value=2, name="lesion", color=color)
    assert LabelClass(value=2, name="lesion", color=[0, 255, 7]).color == (0, 255, 7)


def test_constructor_arguments_the_card_sets_are_taken_once_when_they_agree(tmp_path):
    """MONAI's constructor arguments copied into architecture.kwargs (spatial_dims, in_channels, out_channels) ended
    `segment` and `model inspect` in a TypeError traceback; where they agree with the card they are taken once."""
    from segmentation.modeldir import build_module

    copied = ModelCard.model_validate(card(architecture={"name": "unet", "kwargs": {
        "spatial_dims": 2, "in_channels": 3, "out_channels": 2, "channels": [8, 16], "strides": [2]}}))
    assert copied.architecture.kwargs == {"channels": [8, 16], "strides": [2]}
    assert build_module(copied) is not None


def test_a_card_saved_with_a_byte_order_mark_reads(tmp_path):
    """Notepad saves UTF-8 with a BOM: such a card was refused as "Invalid JSON: expected value at line 1 column 1"."""
    import json

    from segmentation.modeldir import read_card

    path = tmp_path / "card.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(card()).encode())
    assert read_card(path).name == "c"
