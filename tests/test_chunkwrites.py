"""A written chunk's label histogram: value by value for a few classes, the same counts as a bincount."""

from __future__ import annotations

import numpy as np
import pytest

from segmentation.chunkwrites import label_dtype, label_histogram, label_nodata


def _bincount(labels: np.ndarray) -> dict[int, int]:
    return {int(v): int(n) for v, n in enumerate(np.bincount(labels.ravel())) if n}


@pytest.mark.parametrize("num_classes, values", [
    (5, [0, 1, 2, 3, 4, 255]),  # classes and nodata
    (5, [1, 3]),  # some classes absent
    (5, [0, 2, 9, 255]),  # a value the card does not list (more outputs than classes)
    (16, list(range(16)) + [255]),
    (300, [0, 7, 299, 65535]),  # uint16 labels: the bincount path
])
def test_the_histogram_counts_every_value_present_as_a_bincount_does(num_classes, values):
    rng = np.random.default_rng(num_classes + len(values))
    labels = rng.choice(np.asarray(values), size=(61, 47)).astype(label_dtype(num_classes))
    assert label_nodata(num_classes) == np.iinfo(labels.dtype).max
    hist = label_histogram(labels, num_classes)
    assert hist == _bincount(labels)
    assert list(hist) == sorted(hist)  # increasing value order, as the statistics list them
