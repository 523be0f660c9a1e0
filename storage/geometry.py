"""Everything needed to put a label map back on exactly the input's grid.

These typed records are written into the zarr store at ingest and read back at
export; the exporters rebuild the output's georeferencing or NIfTI header from
them alone, so an output never depends on re-opening the source file.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, BeforeValidator

if TYPE_CHECKING:
    import numpy as np


def _nodata_in(v: object) -> object:
    # JSON has no NaN: nodata travels as the strings "nan", "inf", "-inf".
    if isinstance(v, str):
        return float(v)
    return v


def _nodata_out(v: float | None) -> float | str | None:
    if v is None or math.isfinite(v):
        return v
    return str(v)


Nodata = Annotated[float | None, BeforeValidator(_nodata_in), PlainSerializer(_nodata_out)]


MM_PER_NIFTI_UNIT = {"mm": 1.0, "meter": 1e3, "micron": 1e-3}  # NIfTI xyzt_units; "unknown" is read as mm
# no scanner's voxel comes near 10 m: a header saying so is garbage (pixdim 1e30 gave a liver of 3e30 mL, exit 0)
MAX_VOXEL_MM = 10_000.0


class SourceInfo(BaseModel):
    """Identity of the ingested file, for provenance and for skipping done work."""

    model_config = ConfigDict(extra="forbid")

    path: str
    sha256: str
    size: int
    format: str  # GTiff, VRT, NIfTI-1, NIfTI-2


class StacAssetInfo(BaseModel):
    """One asset of a STAC item that gave bands: where it was and what it held, for provenance."""

    model_config = ConfigDict(extra="forbid")

    key: str
    href: str  # as the item gives it, made absolute
    sha256: str | None = None  # of a local file; None for a remote one
    checksum: str | None = None  # the item's file:checksum (multihash), when it states one
    size: int | None = None
    bands: list[int] = Field(default_factory=list)  # 1-based bands of the asset that became image channels


class StacItemInfo(BaseModel):
    """The STAC item a raster was stacked from (storage.stacitem): its identity and the assets used."""

    model_config = ConfigDict(extra="forbid")

    id: str
    self_href: str | None = None
    sha256: str  # of the item's JSON file
    assets: list[StacAssetInfo]
    datetime: str | None = None  # the item's acquisition time (ISO 8601: datetime, else start_datetime)


class RasterGeometry(BaseModel):
    """Georeferencing of a (band, y, x) raster."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["raster"] = "raster"
    width: int
    height: int
    crs_wkt: str | None = None
    epsg: int | None = None
    transform: tuple[float, float, float, float, float, float]  # rasterio (a, b, c, d, e, f)
    nodata: Nodata = None
    dtype: str
    band_descriptions: list[str | None] = Field(default_factory=list)
    # where the valid-data mask came from: nodata, per-dataset mask, alpha band, none
    mask_source: Literal["nodata", "mask", "alpha", "none"] = "none"
    # 1-based indexes of the source bands that became image channels (alpha is dropped)
    bands: list[int] = Field(default_factory=list)
    units: str | None = None
    # GDAL scale and offset of each image channel (value * scale + offset gives physical units, e.g.
    # reflectance); empty when none is known (every band 1 and 0), see storage.bands.apply_units
    band_scales: list[float] = Field(default_factory=list)
    band_offsets: list[float] = Field(default_factory=list)
    stac_item: StacItemInfo | None = None  # set when the raster was stacked from a STAC item's assets

    def rasterio_crs(self) -> Any:
        """The CRS as rasterio reads it (its WKT, else its EPSG code); None for a raster without one."""
        return crs_of(self)


def crs_of(geometry: Any) -> Any:
    """The rasterio CRS of anything with a raster geometry's ``crs_wkt`` and ``epsg`` (its WKT first); None for
    a raster without one."""
    from rasterio.crs import CRS

    wkt, epsg = getattr(geometry, "crs_wkt", None), getattr(geometry, "epsg", None)
    if wkt:
        return CRS.from_wkt(wkt)
    return CRS.from_epsg(epsg) if epsg else None


class DicomFile(BaseModel):
    """One file of a DICOM series: where it was and what it held, for provenance and ``verify``."""

    model_config = ConfigDict(extra="forbid")

    path: str
    sha256: str
    sop_instance_uid: str


class DicomSeriesInfo(BaseModel):
    """What a DICOM series was, by its UIDs; never patient identifiers.

    ``sop_instance_uids[k]`` (and ``frame_numbers[k]`` for an enhanced
    multi-frame object, 1-based) is the source of stored slice ``k``: a DICOM
    SEG references exactly these, in this order.
    """

    model_config = ConfigDict(extra="forbid")

    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str | None = None
    sop_class_uid: str
    modality: str | None = None
    series_description: str | None = None
    series_number: int | None = None
    sop_instance_uids: list[str]
    frame_numbers: list[int] | None = None
    files: list[DicomFile]
    transfer_syntax_uid: str | None = None
    rescale_slope: float = 1.0  # the first slice's; per-slice values were applied at ingest
    rescale_intercept: float = 0.0
    rescale_type: str | None = None  # "HU" for CT
    depth_assumed: bool = False  # one slice without SliceThickness: its depth (for mL) was taken as 1 mm
    patient_name_present: bool = False  # de-identification state: whether the identifiers are filled in
    patient_id_present: bool = False
    volume: str | None = None  # which volume of a split multi-frame object ("magnitude", a dimension value...)
    copies: list[str] = Field(default_factory=list)  # byte-identical copies of its files, read once (relative paths)
    # found by searching its folder (and those below it), not from files named one by one: verify searches there too
    searched: bool = False


class VolumeGeometry(BaseModel):
    """NIfTI geometry of a (channel, z, y, x) volume, where z, y, x are the file's k, j, i axes."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["volume"] = "volume"
    shape: list[int]  # the source's own (i, j, k[, t]) shape
    affine: list[list[float]]  # 4x4, voxel (i, j, k) -> world (RAS+ mm)
    qform: list[list[float]]
    sform: list[list[float]]
    qform_code: int
    sform_code: int
    zooms: list[float]
    orientation: list[str]  # aff2axcodes of the affine, e.g. ["L", "A", "S"]
    nifti_version: Literal[1, 2]
    header_b64: str  # the source header's raw bytes, to rebuild units, codes and descriptions
    dtype: str
    dicom: DicomSeriesInfo | None = None  # set when the volume came from a DICOM series (header synthesised)

    def mm_per_unit(self) -> float:
        """Millimetres per unit of ``affine``: NIfTI's ``xyzt_units`` (metre, micron); "unknown" is read as mm,
        as nibabel, ITK and viewers do.  Volumes, spacings and model grids are in mm, whatever the file's unit."""
        import base64

        from nibabel.nifti1 import Nifti1Header
        from nibabel.nifti2 import Nifti2Header

        cls = Nifti2Header if self.nifti_version == 2 else Nifti1Header
        unit = cls(binaryblock=base64.b64decode(self.header_b64), check=False).get_xyzt_units()[0]
        return MM_PER_NIFTI_UNIT.get(unit, 1.0)

    def affine_mm(self) -> "np.ndarray":
        """``affine`` with world coordinates in mm (a file in metres or microns scaled; others as they are)."""
        import numpy as np

        affine = np.asarray(self.affine, dtype=np.float64).copy()
        affine[:3, :] *= self.mm_per_unit()
        return affine


Geometry = Annotated[Union[RasterGeometry, VolumeGeometry], Field(discriminator="kind")]


AFFINE_RTOL, AFFINE_ATOL_MM = 1e-4, 1e-3  # a label's affine: float32 rounding passes, a shifted label does not


def same_affine(a: object, b: object) -> bool:
    """Whether two voxel-to-world affines put a label on the image's voxel grid (within float32 rounding)."""
    import numpy as np

    return bool(np.allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64),
                            rtol=AFFINE_RTOL, atol=AFFINE_ATOL_MM))


SINGULAR_AFFINE = "has a singular or non-finite affine (no valid voxel-to-world mapping)"


def voxel_axes_problem(axes: "np.ndarray", unit: str = "mm") -> str | None:
    """What makes a volume's voxel axes (the affine's 3 x 3 columns, in NIfTI's ``unit``) unusable, said as an
    input's problem, or None.  Singular (:data:`SINGULAR_AFFINE`) is judged against the voxel's own size (an
    absolute determinant bound refused 50 nm electron-microscopy voxels); a voxel over ``MAX_VOXEL_MM`` is a broken
    header, whose volumes in mL would be nonsense."""
    import numpy as np

    axes = np.asarray(axes, dtype=np.float64) * MM_PER_NIFTI_UNIT.get(unit, 1.0)
    if not np.all(np.isfinite(axes)):
        return SINGULAR_AFFINE
    sizes = np.linalg.norm(axes, axis=0)
    if np.any(sizes == 0) or abs(np.linalg.det(axes / sizes)) < 1e-6:  # axes (nearly) parallel or zero
        return SINGULAR_AFFINE
    if sizes.max() > MAX_VOXEL_MM:
        shown = " x ".join(f"{x:.4g}" for x in sizes)
        return f"has a voxel size of {shown} mm, over {MAX_VOXEL_MM:g} mm: no scan's, so its header is broken"
    return None
