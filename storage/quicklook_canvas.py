"""The sheet a quicklook is drawn on: title, pictures at known places, legend, a small PNG.

Both quicklooks (a raster's map, a volume's orthogonal planes) are numpy RGB
pictures pasted into a Pillow canvas at offsets the caller chooses and gets
back in :class:`QuicklookInfo`, so a test (or a person with a ruler) can find
any source pixel in the PNG.  Labels are blended over the image in their
class colours; classes without a colour get one from a fixed palette, so the
same value has the same colour in every quicklook.  The PNG is written under a
temporary name and renamed into place, and squeezed to a 256-colour palette
when the full-colour file would pass about 1 MB.
"""

from __future__ import annotations

import colorsys
import io
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from storage.atomic import write_bytes_atomically
from storage.errors import ExportError

__all__ = ["ClassShown", "Panel", "QuicklookInfo", "LegendEntry", "Sheet", "blend_labels", "label_outline",
           "palette_color", "resize_linear", "resize_nearest", "save_png", "text_width", "font"]

ALPHA = 0.45
MAX_LEGEND = 30  # class lines in a legend; a model of hundreds of classes made a picture 5,524 pixels tall
MARGIN = 12
TITLE_SIZE, TEXT_SIZE, LETTER_SIZE = 16, 13, 14
LINE = 18  # legend and title line height in pixels
SWATCH = 12
MAX_PNG_BYTES = 1 << 20
BACKGROUND = (255, 255, 255)
INK = (20, 20, 20)
MAX_NAME = 40  # characters of a class name shown: names come from files and may be anything


@dataclass(frozen=True)
class Panel:
    """One picture in the PNG: where it sits and which way it faces."""

    name: str  # "map", or "axial" / "coronal" / "sagittal"
    box: tuple[int, int, int, int]  # left, top, width, height in PNG pixels
    letters: dict[str, str] = field(default_factory=dict)  # edge (left/right/top/bottom) -> anatomical letter
    slice: tuple[int, int] | None = None  # (voxel axis of the file, index) the plane was cut at
    through_class: int | None = None  # the class value whose largest component the plane passes through


@dataclass(frozen=True)
class ClassShown:
    """One legend line: the amount is hectares (raster) or millilitres (volume), None when unknown."""

    value: int
    name: str
    color: tuple[int, int, int]
    amount: float | None
    unit: str
    exact: bool  # False when counted on a decimated read


@dataclass(frozen=True)
class QuicklookInfo:
    """What a quicklook shows and where, so callers and tests need not parse the PNG."""

    path: Path
    size: tuple[int, int]  # (width, height) of the PNG in pixels
    panels: tuple[Panel, ...]
    classes: tuple[ClassShown, ...]
    decimation: tuple[float, float] | None = None  # raster: source pixels per map pixel (rows, cols)
    read_shape: tuple[int, int] | None = None  # raster: the (rows, cols) both rasters were read at
    overview: int | None = None  # raster: the overview factor the labels were read from (None: full resolution)
    rgb_bands: tuple[int, ...] | None = None  # raster: 1-based image bands shown as R, G, B (or grey)
    magnification: int = 1  # raster: screen pixels per map pixel a side (a small map is drawn larger, in blocks)
    centres: tuple[tuple[int, int, int], ...] = ()  # volume: voxel (i, j, k) each row of planes passes through
    note: str | None = None
    subtitles: tuple[str, ...] = ()  # the lines under the title: the grid, what is drawn over what, how it was turned
    legend: tuple[str, ...] = ()  # the legend's lines, swatches left out

    def panel(self, name: str, row: int = 0) -> Panel:
        """The ``row``-th panel called ``name``."""
        return [p for p in self.panels if p.name == name][row]

    def by_value(self, value: int) -> ClassShown:
        return next(c for c in self.classes if c.value == value)


@dataclass(frozen=True)
class LegendEntry:
    color: tuple[int, int, int] | None  # None: a text line without swatch
    text: str


@lru_cache(maxsize=8)
@lru_cache(maxsize=8)
def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans as matplotlib ships it: a bundled font, so the PNG looks the same on every machine, with the
    glyphs of names people write (ü, é, ✓; Pillow's own default drew them as empty boxes).  Pillow's default
    where that file is missing."""
    try:
        import matplotlib

        path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
        return ImageFont.truetype(str(path), size=size)
    except (ImportError, OSError):
        pass
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def text_width(text: str, size: int = TEXT_SIZE) -> int:
    left, _, right, _ = font(size).getbbox(text)
    return int(right - left)


def palette_color(value: int) -> tuple[int, int, int]:
    """A fixed, well-spread colour per value (golden-ratio hues), for classes no file gives a colour."""
    hue = (value * 0.618033988749895) % 1.0
    light = 0.45 if value % 2 else 0.58
    r, g, b = colorsys.hls_to_rgb(hue, light, 0.85)
    return int(r * 255), int(g * 255), int(b * 255)


def short_name(name: str) -> str:
    clean = " ".join(str(name).split())
    return clean if len(clean) <= MAX_NAME else clean[: MAX_NAME - 3] + "..."


def color_table(classes: list[ClassShown], top: int) -> tuple[np.ndarray, np.ndarray]:
    """(colours (top+1, 3) uint8, drawn (top+1,) bool) indexed by label value."""
    colors = np.zeros((top + 1, 3), dtype=np.uint8)
    drawn = np.zeros(top + 1, dtype=bool)
    for c in classes:
        if 0 <= c.value <= top:
            colors[c.value] = c.color
            drawn[c.value] = True
    return colors, drawn


def blend_labels(base: np.ndarray, labels: np.ndarray, colors: np.ndarray, drawn: np.ndarray,
                 alpha: float = ALPHA) -> np.ndarray:
    """``base`` (H, W, 3) uint8 with each drawn label's colour laid over at ``alpha``; others see through."""
    top = len(drawn) - 1
    lab = np.minimum(labels, top) if labels.size and labels.max() > top else labels
    where = drawn[lab]
    out = base.copy()
    if where.any():
        over = colors[lab[where]].astype(np.float32)
        out[where] = np.rint(base[where].astype(np.float32) * (1 - alpha) + over * alpha).astype(np.uint8)
    return out


def label_outline(labels: np.ndarray, drawn: np.ndarray) -> np.ndarray:
    """Pixels of a drawn label with a 4-neighbour of another value: the edge a fill alone would blur."""
    top = len(drawn) - 1
    lab = np.minimum(labels, top) if labels.size and labels.max() > top else labels
    edge = np.zeros(lab.shape, dtype=bool)
    edge[1:, :] |= lab[1:, :] != lab[:-1, :]
    edge[:-1, :] |= lab[:-1, :] != lab[1:, :]
    edge[:, 1:] |= lab[:, 1:] != lab[:, :-1]
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    return edge & drawn[lab]


def resize_nearest(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resampling to ``size`` (rows, cols): label values stay label values."""
    rows = np.minimum((np.arange(size[0]) + 0.5) * a.shape[0] / size[0], a.shape[0] - 1).astype(np.intp)
    cols = np.minimum((np.arange(size[1]) + 0.5) * a.shape[1] / size[1], a.shape[1] - 1).astype(np.intp)
    return a[rows][:, cols]


def resize_linear(a: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resampling of a float plane to ``size`` (rows, cols), pixel centres aligned."""
    out = a.astype(np.float32)
    for axis, n in enumerate(size):
        m = out.shape[axis]
        pos = np.clip((np.arange(n) + 0.5) * m / n - 0.5, 0, m - 1)
        lo = np.floor(pos).astype(np.intp)
        hi = np.minimum(lo + 1, m - 1)
        w = (pos - lo).astype(np.float32)
        shape = [1, 1]
        shape[axis] = n
        w = w.reshape(shape)
        out = np.take(out, lo, axis=axis) * (1 - w) + np.take(out, hi, axis=axis) * w
    return out


class Sheet:
    """A white page: a title block, a body of pictures at (MARGIN, top) and a legend to its right."""

    def __init__(self, title: str, subtitles: list[str], body: tuple[int, int], legend: list[LegendEntry]) -> None:
        self.boxes: list[tuple[int, int, int, int]] = []  # what the caller pasted, in its order
        self.title = short_title(title)
        self.subtitles = subtitles
        self.legend = legend
        self.body_origin = (MARGIN, MARGIN + LINE + 4 + LINE * len(subtitles) + 6)
        legend_w = max([SWATCH + 6 + text_width(e.text) if e.color else text_width(e.text) for e in legend] + [120])
        legend_h = LINE * len(legend)
        heading_w = max([text_width(self.title, TITLE_SIZE)] + [text_width(s) for s in subtitles])
        width = max(MARGIN + body[0] + MARGIN + legend_w + MARGIN, MARGIN + heading_w + MARGIN)
        height = self.body_origin[1] + max(body[1], legend_h) + MARGIN
        self.legend_origin = (MARGIN + body[0] + MARGIN, self.body_origin[1])
        self.image = Image.new("RGB", (int(width), int(height)), BACKGROUND)
        self.draw = ImageDraw.Draw(self.image)
        self._heading()
        self._legend()

    def _heading(self) -> None:
        self.draw.text((MARGIN, MARGIN), self.title, fill=INK, font=font(TITLE_SIZE))
        for n, line in enumerate(self.subtitles):
            self.draw.text((MARGIN, MARGIN + LINE + 4 + n * LINE), line, fill=(80, 80, 80), font=font(TEXT_SIZE))

    def _legend(self) -> None:
        x, y = self.legend_origin
        for n, entry in enumerate(self.legend):
            top = y + n * LINE
            if entry.color is None:
                self.draw.text((x, top), entry.text, fill=INK, font=font(TEXT_SIZE))
                continue
            self.draw.rectangle((x, top + 2, x + SWATCH, top + 2 + SWATCH), fill=tuple(entry.color), outline=INK)
            self.draw.text((x + SWATCH + 6, top), entry.text, fill=INK, font=font(TEXT_SIZE))

    def paste(self, rgb: np.ndarray, at: tuple[int, int]) -> tuple[int, int, int, int]:
        """Paste an (H, W, 3) picture at ``at`` (relative to the body); its box in PNG pixels."""
        left, top = self.body_origin[0] + at[0], self.body_origin[1] + at[1]
        self.image.paste(Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB"), (left, top))
        return left, top, int(rgb.shape[1]), int(rgb.shape[0])

    def caption(self, text: str, at: tuple[int, int]) -> None:
        left, top = self.body_origin[0] + at[0], self.body_origin[1] + at[1]
        self.draw.text((left, top), text, fill=INK, font=font(TEXT_SIZE))

    def letters(self, box: tuple[int, int, int, int], letters: dict[str, str]) -> None:
        """Orientation letters inside a panel's edges, light with a dark rim so any background shows them."""
        left, top, width, height = box
        f = font(LETTER_SIZE)
        for edge, letter in letters.items():
            w = text_width(letter, LETTER_SIZE)
            x = {"left": left + 3, "right": left + width - w - 4}.get(edge, left + (width - w) // 2)
            y = {"top": top + 2, "bottom": top + height - LETTER_SIZE - 5}.get(edge, top + (height - LETTER_SIZE) // 2)
            self.draw.text((x, y), letter, fill=(255, 230, 0), font=f, stroke_width=2, stroke_fill=(0, 0, 0))


def short_title(name: str) -> str:
    clean = "".join(ch if ch.isprintable() else "?" for ch in name)
    return clean if len(clean) <= 120 else clean[:117] + "..."


def save_png(image: Image.Image, out: Path) -> Path:
    """Write the PNG atomically; a 256-colour palette when full colour would pass ~1 MB."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=6)
    data = buf.getvalue()
    if len(data) > MAX_PNG_BYTES:
        buf = io.BytesIO()
        image.quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(buf, format="PNG", compress_level=9)
        data = buf.getvalue()
    if not out.parent.is_dir():
        raise ExportError(out, f"output directory {out.parent} does not exist")
    write_bytes_atomically(out, data, "quicklook")
    return out
