"""Training-time augmentation of (image, labels) patches: geometry that keeps labels exact, and intensity.

Small training sets (a few dozen buildings in one scene, one MR volume) are
learnt by heart unless every patch looks a little different. Mirror images
and, for square 2-D patches, transposes are free: a scene from above has no
preferred orientation and the labels move with the pixels. Intensity changes
(contrast, brightness, noise) apply to the normalised image only; they teach
the network that a darker or flatter acquisition, or the other half of a
scene whose percentiles differ, holds the same classes. Each draw comes from
the caller's generator, so a seeded run is repeatable, and with intensity off
the generator sees exactly the draws it saw before intensity existed.
"""

from __future__ import annotations

import numpy as np

__all__ = ["dihedral", "intensity", "CONTRAST", "BRIGHTNESS", "NOISE"]

CONTRAST = (0.75, 1.25)  # factor on the deviation from the patch's per-channel mean
BRIGHTNESS = 0.2  # shift, in units of the patch's per-channel standard deviation, drawn in ±this
NOISE = 0.05  # Gaussian noise, in the same units, standard deviation drawn in [0, this]


def dihedral(img: np.ndarray, lab: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A random flip per spatial axis, and for square 2-D patches a random transpose (views, not copies)."""
    for axis in range(lab.ndim):
        if rng.random() < 0.5:
            img, lab = np.flip(img, axis + 1), np.flip(lab, axis)
    if lab.ndim == 2 and lab.shape[0] == lab.shape[1] and rng.random() < 0.5:
        img, lab = img.transpose(0, 2, 1), lab.T  # 2-D scenes have no preferred orientation
    return img, lab


def intensity(img: np.ndarray, rng: np.random.Generator, probability: float) -> np.ndarray:
    """With ``probability``: contrast, brightness and noise per channel of a normalised (C, *spatial) patch."""
    if probability <= 0.0 or rng.random() >= probability:
        return img
    out = np.array(img, dtype=np.float32, copy=True)
    axes = tuple(range(1, out.ndim))
    mean = out.mean(axis=axes, keepdims=True)
    std = out.std(axis=axes, keepdims=True) + np.float32(1e-6)
    channels = (out.shape[0],) + (1,) * (out.ndim - 1)
    contrast = rng.uniform(*CONTRAST, size=channels).astype(np.float32)
    shift = rng.uniform(-BRIGHTNESS, BRIGHTNESS, size=channels).astype(np.float32)
    out -= mean
    out *= contrast
    out += mean + shift * std
    sigma = np.float32(rng.uniform(0.0, NOISE))
    out += rng.standard_normal(out.shape, dtype=np.float32) * (sigma * std)
    return out
