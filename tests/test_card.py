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
    assert c.card_version == CARD_VERSION == 2
    assert c.inference.flip_tta == [0, 1]
    assert c.classes[0].code == "LC-10"
    assert ModelCard.model_validate_json(c.model_dump_json()) == c


def test_version_1_cards_still_read():
    c = ModelCard.model_validate(card(card_version=1, inference={"roi": [64, 64]}))
    assert c.card_version == 1 and c.inference.flip_tta == []


@pytest.mark.parametrize("changes, message", [
    ({"card_version": 3}, "newer than this segflow reads"),
    ({"inference__flip_tta": [2]}, "flip_tta axes must be < spatial_dims"),
    ({"inference__flip_tta": [0, 0]}, "distinct"),
    ({"input__spacing": [1.0]}, "one value per spatial axis"),
    ({"input__spacing_unit": "furlong"}, "spacing_unit"),
])
def test_inconsistent_cards_are_refused(changes, message):
    with pytest.raises(ValidationError, match=message):
        ModelCard.model_validate(card(**changes))
