"""Pictures as the photograph layouts keep them (JPEG images, PNG label maps): headers, pixels, message text.

Pascal VOC, Cityscapes and COCO share these: a header read gives sizes
without decoding pixels (what validating a whole dataset can afford), label
PNGs are read as their raw values (palette indices, never their colours), and
every failure is one line naming the file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from storage.errors import CorruptInputError, InvalidInputError

LABEL_MODES = ("P", "L")  # a class map's indices: palette PNG as VOC ships it, or 8-bit grey after a re-save


def by_stem(folder: Path, extension: str) -> dict[str, Path]:
    """stem -> file of ``folder``'s visible files with ``extension`` in any case (``.JPG`` from a camera or a
    Windows tool is a ``.jpg``), the exact spelling preferred where a stem has both; one listing of the folder,
    so looking every case up stays linear.  A folder that cannot be listed holds none."""
    out: dict[str, Path] = {}
    try:
        paths = sorted(folder.iterdir())
    except OSError:
        return out
    for path in paths:
        name = path.name
        if name.startswith(".") or len(name) <= len(extension) or name[-len(extension):].lower() != extension:
            continue
        stem = name[: -len(extension)]
        if stem not in out or name.endswith(extension):
            out[stem] = path
    return out


_MODE_WORDS = {"1": "a 1-bit (black and white)", "L": "an 8-bit grey", "P": "a palette", "RGB": "an RGB colour",
               "RGBA": "an RGBA colour", "LA": "a grey-and-alpha", "CMYK": "a CMYK colour", "YCbCr": "a YCbCr colour",
               "I": "a 32-bit integer grey", "F": "a floating-point grey", "I;16": "a 16-bit grey",
               "I;16L": "a 16-bit grey", "I;16B": "a 16-bit grey", "PA": "a palette-and-alpha"}


def mode_words(mode: str) -> str:
    """A picture's Pillow mode as people say it, with its article ("a 16-bit grey"): refusals had said "is a I;16
    PNG" and "is a RGB picture"."""
    return _MODE_WORDS.get(mode, f"a {mode}-mode")


def listed(values: list[int], most: int = 10) -> str:
    """Bad values for a one-line message: the first few, and how many there are."""
    shown = ", ".join(str(int(v)) for v in values[:most])
    return shown + (f" ... ({len(values)} values)" if len(values) > most else "")


def size_text(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


RGB_MODES = ("RGB", "L", "P", "RGBA", "LA", "CMYK", "YCbCr")  # 8-bit modes that convert to RGB losslessly enough


def picture_header(path: Path) -> tuple[tuple[int, int], str]:
    """(width, height) and Pillow mode from the file's header alone (the pixels are not decoded)."""
    try:
        with Image.open(path) as picture:
            return picture.size, picture.mode
    except FileNotFoundError:
        raise InvalidInputError(path, "missing") from None
    except (OSError, ValueError) as err:  # UnidentifiedImageError is an OSError
        raise CorruptInputError(path, f"is not a readable PNG or JPEG: {err}") from None


def read_rgb(path: Path) -> np.ndarray:
    """(3, H, W) uint8 RGB; a greyscale picture's one channel repeated, an alpha channel dropped."""
    picture = _decode(path, lambda p: p.convert("RGB") if p.mode in RGB_MODES else None)
    if picture is None:
        raise InvalidInputError(path, "is not an 8-bit RGB or greyscale picture")
    return np.ascontiguousarray(np.asarray(picture, dtype=np.uint8).transpose(2, 0, 1))


GREY_MODES = ("1", "L", "LA", "I;16", "I;16L", "I;16B", "I", "F")  # one channel, at its own depth (alpha dropped)
VALUE_MODES = ("P", "L", "I;16", "I;16L", "I;16B", "I")  # label maps: palette indices or grey values, as stored


def picture_channels(mode: str) -> int:
    """How many channels :func:`read_native` gives a picture of this Pillow mode: 1 grey, else 3 (RGB)."""
    return 1 if mode in GREY_MODES else 3


def read_native(path: Path) -> np.ndarray:
    """(C, H, W) as nnU-Net's natural-image reader sees a picture: a grey one (8 or 16 bits, integer or float)
    as one channel at its own depth, any other as uint8 RGB (a palette's colours, alpha dropped)."""
    def convert(picture: Image.Image) -> Image.Image | None:
        if getattr(picture, "n_frames", 1) > 1:
            raise InvalidInputError(path, f"holds {picture.n_frames} pages; a 2-D picture holds one (a 3-D TIFF "
                                          "stack is not read as a picture)")
        if picture.mode in GREY_MODES:
            return picture.convert("L") if picture.mode in ("1", "LA") else picture
        return picture.convert("RGB") if picture.mode in RGB_MODES + ("PA",) else None

    picture = _decode(path, convert)
    if picture is None:
        raise InvalidInputError(path, f"is a {picture_mode(path)} picture, neither grey nor convertible to RGB")
    pixels = np.asarray(picture)
    return np.ascontiguousarray(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))


def picture_mode(path: Path) -> str:
    return picture_header(path)[1]


def read_values(path: Path) -> np.ndarray:
    """(H, W) raw values of a label picture: palette indices, or 8 or 16-bit grey values, never colours."""
    picture = _decode(path, lambda p: p if p.mode in VALUE_MODES and getattr(p, "n_frames", 1) == 1 else None)
    if picture is None:
        raise InvalidInputError(path, f"is a {picture_mode(path)} picture: a label map is one value per pixel "
                                      "(palette, or 8 or 16-bit grey)")
    return np.array(picture)


def read_indices(path: Path) -> np.ndarray:
    """(H, W) uint8 raw values of a palette or 8-bit greyscale PNG (palette indices, never their colours)."""
    picture = _decode(path, lambda p: p if p.mode in LABEL_MODES else None)
    if picture is None:
        raise InvalidInputError(path, "is not a palette or 8-bit greyscale PNG of label values")
    return np.array(picture, dtype=np.uint8)


def read_rgb_ids(path: Path) -> np.ndarray:
    """(H, W) int64 ``R + 256 G + 256² B`` of an RGB PNG (COCO panoptic segment ids)."""
    rgb = read_rgb(path).astype(np.int64)
    return rgb[0] + 256 * rgb[1] + 65536 * rgb[2]


def _decode(path: Path, convert) -> Image.Image | None:
    try:
        with Image.open(path) as picture:
            picture.load()
            return convert(picture)
    except FileNotFoundError:
        raise InvalidInputError(path, "missing") from None
    except (OSError, ValueError) as err:
        raise CorruptInputError(path, f"cannot be decoded: {err}") from None


__all__ = ["GREY_MODES", "LABEL_MODES", "RGB_MODES", "VALUE_MODES", "by_stem", "listed", "mode_words",
           "picture_channels", "picture_header", "read_indices", "read_native", "read_rgb", "read_rgb_ids",
           "read_values", "size_text"]
