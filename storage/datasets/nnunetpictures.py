"""nnU-Net v2's 2-D datasets kept as pictures (``file_ending`` .png, .bmp or .tif), checked and read.

nnU-Net keeps natural and microscopy images as pictures, one file per
``_XXXX`` suffix like its NIfTI datasets, except that an RGB file holds three
channels (its ``channel_names`` then lists R, G, B against a single
``_0000`` file), and labels as grey or palette pictures of class values.
These datasets are 2-D, on their own pixel grid (no spacing), and small: a
case is read whole.  Pixels are decoded as :func:`storage.photo.ingest_picture`
decodes a picture given to ``segment`` (:func:`storage.datasets.pictures.read_native`),
so a network sees the same values in training and inference.  Opening reads
headers only; the pixels are decoded when a case is read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from storage.datasets.pictures import (VALUE_MODES, mode_words, picture_channels, picture_header, read_native,
                                       read_values, size_text)
from storage.errors import InvalidInputError

PICTURE_ENDINGS = (".png", ".bmp", ".tif", ".tiff")


def case_files(files: dict[int, Path], label: Path, channels: int, images_dir: Path, name: str,
               ending: str) -> tuple[Path, ...]:
    """A case's picture files in channel order, checked from their headers against the label and dataset.json's
    channel count (an RGB file counts three)."""
    order = sorted(files)
    if order != list(range(len(order))):
        missing = next(c for c in range(len(order) + 1) if c not in files)
        raise InvalidInputError(images_dir / f"{name}_{missing:04d}{ending}", "missing: the case's files must be "
                                f"numbered _0000, _0001 ... without a gap ({channels} channels in dataset.json)")
    label_size, label_mode = picture_header(label)
    if label_mode not in VALUE_MODES:
        raise InvalidInputError(label, f"is {mode_words(label_mode)} picture: a label map is one value per pixel "
                                       "(palette, or 8 or 16-bit grey)")
    counts = []
    for c in order:
        size, mode = picture_header(files[c])
        if size != label_size:
            raise InvalidInputError(label, f"label size {size_text(label_size)} does not match image "
                                           f"{files[c].name} size {size_text(size)}")
        counts.append(picture_channels(mode))
    found = sum(counts)
    if found != channels:
        shown = ", ".join(f"{files[c].name} {n}" for c, n in zip(order, counts))
        raise InvalidInputError(files[order[0]], f"the case's pictures hold {found} channel(s) ({shown}) but "
                                                 f"dataset.json names {channels}")
    return tuple(files[c] for c in order)


def case_image(images: Sequence[Path]) -> np.ndarray:
    """(C, H, W): each file's channels in turn, at the depth they share (uint8 grey and RGB stay uint8)."""
    return np.concatenate([read_native(p) for p in images])


def case_labels(label: Path) -> np.ndarray:
    """(1, H, W) raw label values, as :class:`storage.datasets.arrays.LabelArray` reads a label store."""
    return read_values(label)[None]


__all__ = ["PICTURE_ENDINGS", "case_files", "case_image", "case_labels"]
