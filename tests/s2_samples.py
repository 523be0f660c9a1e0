"""A generated Sentinel-2-like scene as catalogues deliver it: one COG per band, a STAC item listing them.

B02, B03, B04 and B08 are 10 m COGs, B11 and B12 20 m COGs covering the
same ground, all uint16 digital numbers (nodata 0, values from 1000 up, as
L2A products after processing baseline 04.00 carry a 1000 offset).  The item
(STAC 1.0, eo and raster extensions) lists them with ``eo:bands`` and
``raster:bands`` (scale 0.0001, offset -0.1), beside a thumbnail and a
metadata asset that are not rasters to segment.  Hrefs are relative to the
item; its self link points at a catalogue URL, as a downloaded item's does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.shutil
from rasterio.enums import Resampling
from rasterio.transform import from_origin

ORIGIN = (500000.0, 5000000.0)  # UTM 33N
CRS = "EPSG:32633"
SCALE, OFFSET = 0.0001, -0.1
BANDS = {  # asset key: (band id, common name, resolution in metres)
    "blue": ("B02", "blue", 10), "green": ("B03", "green", 10), "red": ("B04", "red", 10),
    "nir": ("B08", "nir", 10), "swir16": ("B11", "swir16", 20), "swir22": ("B12", "swir22", 20),
}


def _field(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth blobs plus noise: regions a model labels differently, and texture within them."""
    coarse = rng.random((size // 16 + 2, size // 16 + 2))
    y = np.linspace(0, coarse.shape[0] - 1.001, size)
    x = np.linspace(0, coarse.shape[1] - 1.001, size)
    y0, x0 = y.astype(int), x.astype(int)
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]
    smooth = (coarse[y0][:, x0] * (1 - fy) * (1 - fx) + coarse[y0 + 1][:, x0] * fy * (1 - fx)
              + coarse[y0][:, x0 + 1] * (1 - fy) * fx + coarse[y0 + 1][:, x0 + 1] * fy * fx)
    return smooth + 0.15 * rng.random((size, size))


def write_cog(path: Path, data: np.ndarray, resolution: float, *, nodata: float | None = 0) -> Path:
    """``data`` (y, x) or (band, y, x) as a COG on the scene's grid at ``resolution`` metres."""
    data = data[None] if data.ndim == 2 else data
    tmp = path.with_name(path.name + ".tmp.tif")
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                   dtype=str(data.dtype), crs=CRS, transform=from_origin(*ORIGIN, resolution, resolution),
                   nodata=nodata, tiled=True, blockxsize=32, blockysize=32)
    with rasterio.open(tmp, "w", **profile) as dst:
        dst.write(data)
    rasterio.shutil.copy(tmp, path, driver="COG", BLOCKSIZE="128", COMPRESS="DEFLATE")
    tmp.unlink()
    return path


def band_dn(seed: int, size: int) -> np.ndarray:
    """One band's digital numbers: 1000 (the offset) plus up to about 6000 of reflectance."""
    rng = np.random.default_rng(seed)
    return (1000 + 5000 * _field(rng, size)).astype(np.uint16)


def item_dict(item_id: str, assets: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A STAC 1.0 item around ``assets``, with the eo, raster and file extensions declared."""
    west, north = ORIGIN
    return {
        "type": "Feature", "stac_version": "1.0.0",
        "stac_extensions": ["https://stac-extensions.github.io/eo/v1.1.0/schema.json",
                            "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
                            "https://stac-extensions.github.io/projection/v1.1.0/schema.json"],
        "id": item_id,
        "geometry": {"type": "Polygon", "coordinates": [[[15.0, 45.1], [15.02, 45.1], [15.02, 45.08],
                                                          [15.0, 45.08], [15.0, 45.1]]]},
        "bbox": [15.0, 45.08, 15.02, 45.1],
        "properties": {"datetime": "2024-06-01T10:00:31Z", "platform": "sentinel-2b", "proj:epsg": 32633},
        "links": [{"rel": "self", "href": f"https://catalogue.example.com/collections/s2/items/{item_id}.json"}],
        "assets": assets,
    }


def band_asset(key: str, href: str) -> dict[str, Any]:
    band_id, common, res = BANDS[key]
    return {"href": href, "type": "image/tiff; application=geotiff; profile=cloud-optimized", "roles": ["data"],
            "title": f"{band_id} ({common}) {res} m", "gsd": res,
            "eo:bands": [{"name": band_id, "common_name": common}],
            "raster:bands": [{"nodata": 0, "data_type": "uint16", "spatial_resolution": res,
                              "scale": SCALE, "offset": OFFSET}]}


def write_item(folder: Path, size: int = 128, item_id: str = "S2B_33TVL_20240601_0_L2A") -> Path:
    """The per-band COGs (10 m: ``size``², 20 m: half that) and ``item.json`` in ``folder``; the item's path."""
    folder.mkdir(parents=True, exist_ok=True)
    assets: dict[str, dict[str, Any]] = {}
    for n, (key, (band_id, _, res)) in enumerate(BANDS.items()):
        write_cog(folder / f"{band_id}.tif", band_dn(n, size * 10 // res), res)
        assets[key] = band_asset(key, f"./{band_id}.tif")
    (folder / "preview.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assets["thumbnail"] = {"href": "./preview.png", "type": "image/png", "roles": ["thumbnail"]}
    assets["granule_metadata"] = {"href": "./MTD_TL.xml", "type": "application/xml", "roles": ["metadata"]}
    item = folder / "item.json"
    item.write_text(json.dumps(item_dict(item_id, assets), indent=1))
    return item


def hand_stacked(folder: Path, band_ids: list[str], out: Path, *, size: int = 128,
                 resampling: Resampling = Resampling.bilinear, reflectance: bool = False) -> Path:
    """The bands stacked by hand on the 10 m grid: coarser ones read with ``out_shape`` and ``resampling``.

    ``reflectance`` writes DN * 0.0001 - 0.1 as float32 (computed in float64),
    the values a card with ``units: reflectance`` sees.
    """
    layers = []
    for band_id in band_ids:
        with rasterio.open(folder / f"{band_id}.tif") as src:
            layers.append(src.read(1, out_shape=(size, size), resampling=resampling))
    data = np.stack(layers)
    if reflectance:
        data = (data.astype(np.float64) * SCALE + OFFSET).astype(np.float32)
    profile = dict(driver="GTiff", width=size, height=size, count=len(band_ids), dtype=str(data.dtype), crs=CRS,
                   transform=from_origin(*ORIGIN, 10, 10), tiled=True, blockxsize=32, blockysize=32)
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(data)
    return out
