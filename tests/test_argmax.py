"""The argmax every grid takes its labels with, against numpy's own reductions: ties, NaN and empty pixels."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from storage.argmax import argmax_first, argmax_top_two, clear_labels


def _first_reference(probs: np.ndarray, empty: int | None) -> np.ndarray:
    """numpy's argmax (first maximum wins) where no NaN is involved; from the first NaN class on, nothing beats
    it (the classes before it decide), as a running ``np.maximum`` has it."""
    labels = np.argmax(probs, axis=0)
    nan = np.isnan(probs)
    if nan.any():
        first_nan = nan.argmax(axis=0)
        for index in zip(*np.nonzero(nan.any(axis=0))):
            k = first_nan[index]
            labels[index] = int(np.argmax(probs[(slice(0, k),) + index])) if k else 0
    if empty is not None:
        labels = np.where(probs.max(axis=0) <= 0, empty, labels)  # NaN <= 0 is false: never empty
    return labels


few_values = st.sampled_from([0.0, 0.25, 0.5, 1.0, -1.0, 0.125])  # few distinct values: many ties


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(0, 5), st.integers(0, 9)),
                  elements=few_values),
       st.sampled_from([None, 0, 255]))
def test_argmax_first_equals_numpy_with_ties(probs: np.ndarray, empty: int | None) -> None:
    got = argmax_first(probs, np.uint8, empty)
    assert got.dtype == np.uint8 and got.shape == probs.shape[1:]
    assert np.array_equal(got, _first_reference(probs, empty))


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float64, st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(1, 4), st.integers(1, 7)),
                  elements=st.sampled_from([0.0, 0.5, 1.0, np.nan, -2.0])))
def test_argmax_first_3d_and_nan(probs: np.ndarray) -> None:
    assert np.array_equal(argmax_first(probs, np.uint16), _first_reference(probs, None))


@settings(max_examples=200, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 5), st.integers(1, 9)),
                  elements=few_values))
def test_top_two_equals_sorting(probs: np.ndarray) -> None:
    """The second value counts ties: two classes at the top make second == top (the label is not clear)."""
    labels, top, second = argmax_top_two(probs, np.uint8)
    ordered = np.sort(probs, axis=0)
    assert np.array_equal(labels, _first_reference(probs, None))
    assert np.array_equal(top, ordered[-1])
    assert np.array_equal(second, ordered[-2] if len(probs) > 1 else np.full(probs.shape[1:], -np.inf))


def test_strided_input_of_realistic_size() -> None:
    """A view with strides (a region's sub-block) of a chunk-sized array, with exact ties planted."""
    probs = np.random.default_rng(0).random((5, 300, 400)).astype(np.float32)
    probs[3, ::7] = probs[1, ::7]  # ties: the first of the tied classes wins
    view = probs[:, 10:290, 20:380]
    assert not view.flags.c_contiguous
    assert np.array_equal(argmax_first(view, np.uint8), np.argmax(view, axis=0))
    labels, top, second = argmax_top_two(view, np.uint8)
    assert np.array_equal(top, view.max(axis=0)) and np.array_equal(second, np.sort(view, axis=0)[-2])


@pytest.mark.parametrize(("column", "expected"), [
    ([np.nan, 0.5, 1.0], 0),  # a NaN first: nothing beats it
    ([0.2, np.nan, 1.0], 0),  # a NaN later: the classes before it decide
    ([0.2, 0.9, np.nan, 1.0], 1),
    ([0.5, 0.5, 0.2], 0),  # a tie: the first class
    ([0.0, 0.0], 255),  # nothing reached the pixel
    ([np.nan, 0.0], 0),  # NaN is not "nothing"
])
def test_nan_ties_and_empty_by_hand(column: list[float], expected: int) -> None:
    probs = np.array(column, np.float32).reshape(-1, 1, 1)
    assert argmax_first(probs, np.uint8, 255)[0, 0] == expected
    assert _first_reference(probs, 255)[0, 0] == expected  # the reference agrees with the hand


def _clear_reference(probs: np.ndarray, margin: float) -> np.ndarray | None:
    """The two passes ``clear_labels`` replaces: finiteness over every value, then the margin from max |p|."""
    if not np.isfinite(probs).all():
        return None
    first, top, second = argmax_top_two(probs, np.uint8)
    floor = top - np.float32(margin * float(np.abs(probs).max(initial=0)))
    return np.where(second < floor, first, 255).astype(np.uint8)


@settings(max_examples=300, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(0, 5), st.integers(0, 9)),
                  elements=st.sampled_from([0.0, 0.25, 0.5, 1.0, -1.0, -3.0, 0.5 + 2.0 ** -20, 2.0, np.nan, np.inf,
                                            -np.inf])),
       st.sampled_from([2.0 ** -16, 0.1, 0.0]))
def test_clear_labels_equal_the_finiteness_and_margin_passes(probs: np.ndarray, margin: float) -> None:
    """Ties, near-ties within the margin, negative values (max |p| from the bottom), NaN and infinities anywhere
    (None), empty regions: the same labels and marks as the separate passes, or None where they give up."""
    got, want = clear_labels(probs, np.dtype(np.uint8), margin), _clear_reference(probs, margin)
    if want is None:
        assert got is None
    else:
        assert got is not None and got.dtype == np.uint8 and np.array_equal(got, want)


def test_clear_labels_of_a_strided_region_of_realistic_size() -> None:
    probs = np.random.default_rng(1).random((5, 300, 400)).astype(np.float32) - np.float32(0.2)
    probs[2, ::5] = probs[4, ::5] + np.float32(2.0 ** -20)  # within the margin: not clear
    view = probs[:, 10:290, 20:380]
    got = clear_labels(view, np.dtype(np.uint8), 2.0 ** -16)
    assert np.array_equal(got, _clear_reference(view, 2.0 ** -16))
    assert 0 < np.count_nonzero(got == 255) < got.size
