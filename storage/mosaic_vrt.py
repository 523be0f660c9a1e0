"""The stitched reading of a mosaic: its plan written as GDAL VRT files, nothing of it computed yet.

A :class:`~storage.mosaic_plan.MosaicPlan` says where each tile lands; this
module turns it into the XML GDAL reads the pixels through (a warped VRT per
warped tile, one mosaic VRT over them all), so the ingest copies the mosaic
block by block like any raster.  It exists apart from the plan because it is
the only part that writes files and depends on GDAL's VRT format and its
warping options (the overlap order, masks and constant kernel scale).
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import ColorInterp, Resampling
from rasterio.transform import Affine
from rasterio.vrt import WarpedVRT

from storage.mosaic_plan import MosaicPlan, Placement, Tile, suggested_size


_GDAL_TYPES = {"uint8": "Byte", "int8": "Int8", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32",
               "int32": "Int32", "uint64": "UInt64", "int64": "Int64", "float32": "Float32", "float64": "Float64"}


def _warped_tile(placement: Placement, plan: MosaicPlan, folder: Path, index: int) -> Path:
    """The tile warped onto its window of the mosaic's grid (nothing is warped yet): a VRTWarpedDataset file with
    an alpha band, wrapped in a plain VRT of the tile's image bands whose per-dataset mask is that alpha.

    GDAL takes an alpha band for the mask only in 2- or 4-band datasets, so
    the wrapper states the mask explicitly, whatever the band count.
    """
    t = plan.transform
    transform = Affine(t.a, 0.0, t.c + placement.col * t.a, 0.0, t.e, t.f + placement.row * t.e)
    warped = folder / f"tile{index}.warped.vrt"
    scale = warp_scale(placement.tile, plan)
    with rasterio.open(placement.tile.path) as src:
        has_alpha = any(ci == ColorInterp.alpha for ci in src.colorinterp)  # then it is warped as the alpha
        with WarpedVRT(src, crs=plan.crs, transform=transform, width=placement.width, height=placement.height,
                       resampling=Resampling.bilinear, add_alpha=not has_alpha, XSCALE=repr(scale),
                       YSCALE=repr(scale)) as vrt:
            rasterio.shutil.copy(vrt, warped, driver="VRT")
    _fix_warped_vrt(warped)
    with rasterio.open(warped) as vrt:
        alpha = next(i for i, ci in zip(vrt.indexes, vrt.colorinterp) if ci == ColorInterp.alpha)
        dtypes = vrt.dtypes
    w, h = placement.width, placement.height
    rect = f'<SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/><DstRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'

    def simple(band: int) -> str:
        return (f'<SimpleSource><SourceFilename relativeToVRT="0">{escape(str(warped))}</SourceFilename>'
                f'<SourceBand>{band}</SourceBand>{rect}</SimpleSource>')

    lines = [f'<VRTDataset rasterXSize="{w}" rasterYSize="{h}">',
             f'  <SRS>{escape(plan.crs.to_wkt())}</SRS>',
             f'  <GeoTransform>{transform.c!r}, {transform.a!r}, 0.0, {transform.f!r}, 0.0, {transform.e!r}'
             f'</GeoTransform>']
    for k, band in enumerate(placement.tile.bands):
        gdal_type = _GDAL_TYPES[str(np.dtype(dtypes[band - 1]))]
        lines.append(f'  <VRTRasterBand dataType="{gdal_type}" band="{k + 1}">{simple(band)}</VRTRasterBand>')
    lines.append(f'  <MaskBand><VRTRasterBand dataType="Byte">{simple(alpha)}</VRTRasterBand></MaskBand>')
    lines.append('</VRTDataset>')
    target = folder / f"tile{index}.vrt"
    target.write_text("\n".join(lines) + "\n")
    return target


def warp_scale(tile: Tile, plan: MosaicPlan) -> float:
    """GDAL's XSCALE/YSCALE for a warped tile: destination pixels per source pixel, capped at 1.

    GDAL otherwise estimates it anew for every warped block, from the block's
    shape, and widens the bilinear kernel accordingly, so a pixel's value would
    depend on the block it falls in.  A constant makes it a function of the
    pixel alone: 1 (plain 2x2 bilinear) for tiles of the mosaic's pixel size
    (within 1 %), less for tiles finer than the grid, whose kernel widens to
    average what each mosaic pixel covers.
    """
    ratio = suggested_size(tile, plan.crs) / max(plan.transform.a, -plan.transform.e)
    return 1.0 if ratio > 0.99 else float(f"{ratio:.6g}")


def _fix_warped_vrt(vrt: Path) -> None:
    """Two edits of a serialised WarpedVRT, so that it is a function of the pixel alone and masks as it should.

    - Drop the approximate transformer GDAL wraps the warp in: every pixel's
      source position is then computed exactly, so a pixel's value does not
      depend on the block or window it is read in (rasterio cannot build a
      WarpedVRT with ``tolerance=0`` and a given grid, hence the edit).
    - Make its alpha band Byte: GDAL only takes a Byte (or UInt16) alpha band
      for the bands' mask, which the mosaic's ``UseMaskBand`` composites with;
      a Float32 alpha (a float tile's) would let the zeros outside the tile's
      footprint overwrite its neighbour.
    """
    import xml.etree.ElementTree as ET

    tree = ET.parse(vrt)
    for band in tree.getroot().iter("VRTRasterBand"):
        interp = band.find("ColorInterp")
        if interp is not None and (interp.text or "").strip().lower() == "alpha":
            band.set("dataType", "Byte")
    for transformer in tree.getroot().iter("Transformer"):
        approx = transformer.find("ApproxTransformer")
        base = None if approx is None else approx.find("BaseTransformer")
        if approx is not None and base is not None and len(base):
            transformer.remove(approx)
            transformer.append(base[0])
    tree.write(vrt)


def _source(filename: Path, band: str | int, placement: Placement, extra: str) -> str:
    w, h = placement.width, placement.height
    src_w, src_h = (w, h) if placement.warped else (placement.tile.width, placement.tile.height)
    return (f'    <ComplexSource>\n'
            f'      <SourceFilename relativeToVRT="0">{escape(str(filename))}</SourceFilename>\n'
            f'      <SourceBand>{band}</SourceBand>\n'
            f'      <SrcRect xOff="0" yOff="0" xSize="{src_w}" ySize="{src_h}"/>\n'
            f'      <DstRect xOff="{placement.col}" yOff="{placement.row}" xSize="{w}" ySize="{h}"/>\n'
            f'      {extra}\n'
            f'    </ComplexSource>\n')


def write_mosaic_vrt(plan: MosaicPlan, folder: str | PathLike[str]) -> Path:
    """``folder/<name>.vrt`` (and a warped VRT per warped tile): the mosaic, nothing of it computed yet.

    Sources are listed so that the later one wins where tiles overlap: warped
    tiles first, then tiles on the grid, each group in reverse of the order named.
    """
    folder = Path(folder).absolute()  # sources are named by absolute paths: the ingest may run elsewhere
    folder.mkdir(parents=True, exist_ok=True)
    order = [p for p in reversed(plan.placements) if p.warped] + [p for p in reversed(plan.placements) if not p.warped]
    files: dict[int, Path] = {}
    for i, p in enumerate(plan.placements):
        files[id(p)] = _warped_tile(p, plan, folder, i) if p.warped else p.tile.path
    first = plan.placements[0].tile
    gdal_type = _GDAL_TYPES[plan.dtype]
    t = plan.transform
    lines = [f'<VRTDataset rasterXSize="{plan.width}" rasterYSize="{plan.height}">',
             f'  <SRS>{escape(plan.crs.to_wkt())}</SRS>',
             f'  <GeoTransform>{t.c!r}, {t.a!r}, {t.b!r}, {t.f!r}, {t.d!r}, {t.e!r}</GeoTransform>']
    for k in range(len(first.bands)):
        lines.append(f'  <VRTRasterBand dataType="{gdal_type}" band="{k + 1}">')
        if first.descriptions[k]:
            lines.append(f'    <Description>{escape(first.descriptions[k] or "")}</Description>')
        if first.units[k]:
            lines.append(f'    <UnitType>{escape(first.units[k])}</UnitType>')
        if first.offsets[k] != 0.0 or first.scales[k] != 1.0:
            lines.append(f'    <Offset>{first.offsets[k]!r}</Offset>\n    <Scale>{first.scales[k]!r}</Scale>')
        for p in order:  # a warped tile's wrapper numbers the image bands 1..n
            source_band = k + 1 if p.warped else p.tile.bands[k]
            lines.append(_source(files[id(p)], source_band, p, "<UseMaskBand>true</UseMaskBand>").rstrip("\n"))
        lines.append('  </VRTRasterBand>')
    lines.append('  <MaskBand>\n  <VRTRasterBand dataType="Byte">')  # valid where any tile is: per-dataset mask
    for p in order:
        lines.append(_source(files[id(p)], "mask,1", p, "<NODATA>0</NODATA>").rstrip("\n"))
    lines.append('  </VRTRasterBand>\n  </MaskBand>')
    lines.append('</VRTDataset>')
    target = folder / f"{plan.ref.name}.vrt"
    target.write_text("\n".join(lines) + "\n")
    return target
