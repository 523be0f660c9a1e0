"""The global window grid is MONAI's, for every shape, ROI and overlap."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data.utils import dense_patch_slices
from monai.inferers.utils import _get_scan_interval

from segmentation.windows import make_grid
from storage.errors import ConfigError


def monai_windows(shape, roi, overlap):
    padded = [max(s, r) for s, r in zip(shape, roi)]
    lo = [(p - s) // 2 for p, s in zip(padded, shape)]
    interval = _get_scan_interval(padded, roi, len(shape), [overlap] * len(shape))
    return [tuple(a - l for (a, _), l in zip(w, lo)) for w in dense_patch_slices(padded, roi, interval,
                                                                                   return_slice=False)]


@settings(max_examples=300, deadline=None)
@given(data=st.data(), ndim=st.integers(1, 3),
       overlap=st.sampled_from([0.0, 0.1, 0.25, 0.5, 0.625, 0.75, 0.9]))
def test_grid_equals_monai(data, ndim, overlap):
    # bounded so that no draw asks for millions of windows
    top_shape, low_roi = {1: (400, 1), 2: (300, 4), 3: (64, 4)}[ndim]
    shape = data.draw(st.lists(st.integers(1, top_shape), min_size=ndim, max_size=ndim))
    roi = data.draw(st.lists(st.integers(low_roi, 160), min_size=ndim, max_size=ndim))
    grid = make_grid(shape, roi, overlap)
    assert list(grid) == monai_windows(shape, roi, overlap)
    assert len(grid) == len(set(grid))


def test_edges_and_padding():
    grid = make_grid((100, 7), (32, 16), 0.25)
    assert grid.starts[0] == (0, 24, 48, 68)  # the last window is moved back to end at the edge
    assert grid.starts[1] == (-4,)  # 7 < 16: padded 4 before, 5 after, as MONAI does


@pytest.mark.parametrize("shape, roi, overlap", [((10, 10), (4,), 0.5), ((10,), (0,), 0.5), ((10,), (4,), 1.0),
                                                 ((0, 5), (4, 4), 0.5)])
def test_invalid_grid(shape, roi, overlap):
    with pytest.raises(ConfigError):
        make_grid(shape, roi, overlap)
