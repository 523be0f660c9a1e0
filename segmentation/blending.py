"""Window weights for blending overlapping predictions.

MONAI's own ``compute_importance_map`` is used so that segflow's blending is,
by construction, the reference's: Gaussian with sigma = sigma_scale·roi per
axis (small values clamped up), or constant.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np

Blend = Literal["gaussian", "constant"]


@lru_cache(maxsize=16)
def importance_map(roi: tuple[int, ...], blend: Blend = "gaussian", sigma_scale: float = 0.125) -> np.ndarray:
    """float32 weights of shape ``roi``; cached because every window of a run shares them."""
    from monai.data.utils import compute_importance_map

    weights = compute_importance_map(roi, mode=blend, sigma_scale=sigma_scale, device="cpu")
    out = weights.numpy().astype(np.float32, copy=True)
    out.setflags(write=False)
    return out
