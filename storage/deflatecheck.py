"""Deflate-compressed GeoTIFF blocks checked against their own checksum, which GDAL does not check.

A deflate (zlib) tile or strip ends with an Adler-32 checksum of its bytes, but
libtiff stops inflating once it has the block's bytes and never reaches it: a
tile with 8 bytes flipped decoded to 12,593 wrong pixels with no error, and the
scene was segmented and reported done.  NIfTI's gzip CRC is checked as it is
read (:mod:`storage.nifti`); this is the same check for a GeoTIFF: each block
ingest reads is inflated once more by zlib, whose "incorrect data check" (or
any other zlib error) refuses the file, naming the block.  Only local files (a
remote block would be fetched twice) and deflate: LZW and most other codecs
carry no checksum.  zlib releases the GIL, so ingest runs it beside its reads.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Any

from storage.errors import CorruptInputError


class DeflateBlocks:
    """The deflate blocks of one open GeoTIFF, each checked once as windows reach it."""

    def __init__(self, src: Any, path: Path, bands: list[int]) -> None:
        self.src, self.path = src, path
        self.block = tuple(int(v) for v in src.block_shapes[0])  # (rows, columns) of a block
        # pixel-interleaved blocks hold every band; band-interleaved ones one band each
        self.bands = [1] if src.interleaving is None or src.interleaving.name == "pixel" else sorted(set(bands))
        self.checked: set[tuple[int, int, int]] = set()
        self.fd = os.open(path, os.O_RDONLY)

    @classmethod
    def of(cls, src: Any, path: Path, bands: list[int]) -> DeflateBlocks | None:
        """A checker for ``src`` when it is a local deflate-compressed GeoTIFF, else None."""
        compression = getattr(src.compression, "name", str(src.compression or "")).lower()
        if src.driver != "GTiff" or compression != "deflate" or not path.is_file() or \
                Path(src.name).resolve() != path.resolve():
            return None
        return cls(src, path, bands)

    def close(self) -> None:
        os.close(self.fd)

    def blocks_of(self, window: Any) -> list[tuple[int, int, int, int, int]]:
        """(band, block row, block column, offset, size) of every block of ``window`` not listed before: asked of
        GDAL in the reading thread (a dataset is not to be used by two threads at once)."""
        rows, cols = self.block
        r0, c0 = int(window.row_off), int(window.col_off)
        r1, c1 = r0 + int(window.height), c0 + int(window.width)
        out = []
        for band in self.bands:
            for y in range(r0 // rows, (r1 - 1) // rows + 1):
                for x in range(c0 // cols, (c1 - 1) // cols + 1):
                    if (band, y, x) in self.checked:
                        continue
                    self.checked.add((band, y, x))
                    offset = self.src.get_tag_item(f"BLOCK_OFFSET_{x}_{y}", "TIFF", bidx=band)
                    size = self.src.get_tag_item(f"BLOCK_SIZE_{x}_{y}", "TIFF", bidx=band)
                    if offset and size and int(size) > 0:  # a sparse block has no bytes: read as nodata
                        out.append((band, y, x, int(offset), int(size)))
        return out

    def inflate(self, blocks: list[tuple[int, int, int, int, int]]) -> None:
        """Inflate each block with zlib (no GDAL: safe beside the reads); a damaged one raises CorruptInputError."""
        for band, y, x, offset, size in blocks:
            data = os.pread(self.fd, size, offset)
            try:
                if len(data) < size:
                    raise zlib.error("the file ends inside it")
                zlib.decompress(data)
            except zlib.error as exc:
                rows, cols = self.block
                where = f"band {band}, " if band != 1 or len(self.bands) > 1 else ""
                last_row, last_col = min((y + 1) * rows, self.src.height) - 1, min((x + 1) * cols, self.src.width) - 1
                raise CorruptInputError(self.path, f"its deflate-compressed block at {where}rows {y * rows}-"
                                                   f"{last_row}, cols {x * cols}-{last_col} is damaged: {exc}") from None
