"""Run options, validated once at the edge (CLI or flow parameters)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MIN_CHUNK = 8  # the smallest spatial chunk a store or a task takes (pixels or voxels per axis)
MAX_PARALLEL = 32  # a nightly run's inputs in flight at once, at most (its task runner's threads)


class SegmentOptions(BaseModel):
    """Everything that shapes a segmentation run; recorded whole in provenance."""

    model_config = ConfigDict(extra="forbid")

    precision: Literal["exact", "fast"] = "exact"
    roi: list[int] | None = None  # default: the model card's
    overlap: float | None = Field(default=None, ge=0.0, lt=1.0, allow_inf_nan=False)  # nan: "should be < 1" had said
    blend: Literal["gaussian", "constant"] | None = None
    chunk_size: int | None = Field(default=None, ge=MIN_CHUNK)  # default: the ingested store's chunking
    batch_size: int | None = Field(default=None, ge=1)
    probabilities: Literal["none", "float32", "uint8"] = "none"
    device: str = "auto"
    # local Dask worker processes; 0: threads of this process. None: segment's default is 0, nightly's 1
    workers: int | None = Field(default=None, ge=0)
    # an existing scheduler; None: Dask's own setting (DASK_SCHEDULER_ADDRESS), else a local cluster
    dask_address: str | None = Field(default=None, validate_default=True)
    gpus: bool = False  # dask-cuda LocalCUDACluster (one worker per GPU), or GPU workers of dask_address
    keep_zarr: bool = True  # keep OUT/<stem>.zarr (labels [+ probabilities]) beside the export
    quicklook: bool = False  # OUT/<stem>.quicklook.png: the labels over the image, at a glance (storage.quicklook)
    flip_tta: list[int] | None = None  # spatial axes to mirror at test time; default: the model card's
    trust_bundle: bool = False  # let MONAI evaluate a bundle's configuration (runs its code); off unless asked
    # torch.compile the network (segmentation.netprep.compiled): faster fp32 windows once compiled; the first
    # run on a machine pays the compile (its kernels are cached); probabilities move in the last float bits
    compile: bool = False
    crf: bool = False  # refine probabilities with the truncated dense CRF (segmentation.crf) before the argmax
    crf_iterations: int = Field(default=5, ge=1, le=20)
    # Scans whose grid differs from the model card's (version 3) are segmented in model space; their labels
    # always come back on the scan's grid, and "keep" also writes them on the model's grid.
    model_space: Literal["input", "keep"] = "input"
    dicom_seg: Literal["binary", "labelmap", "none"] = "binary"  # DICOM SEG beside the labels of DICOM inputs
    # The input bands the model gets, in its order: names (GDAL description, STAC common name, S2/Landsat id)
    # or 1-based indices. Default: the card's channel_names matched by name, or every band when nothing is named.
    bands: list[str] | None = None
    vector: Literal["none", "gpkg", "parquet", "geojson"] = "none"  # label polygons beside a raster's COG
    # Simplification tolerance (CRS units, metres for projected rasters) of the polygons, keeping the topology
    # between neighbours (shapely.coverage_simplify, Visvalingam-Whyatt); None or 0 keeps the exact pixel outlines.
    simplify: float | None = Field(default=None, ge=0.0, allow_inf_nan=False)
    # Rasters whose ground sample distance or CRS differs from the card's (version 4): labels on the input's
    # grid (probabilities warped back before the argmax) or on the model's.
    output_grid: Literal["input", "model"] = "input"
    # Many tiles as one seamless image named ``mosaic``: a VRT when they share a CRS, else warped into ``crs``.
    mosaic: str | None = None
    crs: str | None = None  # the mosaic's target CRS, e.g. EPSG:32633
    split_by_tile: bool = False  # with mosaic: one COG per tile, cut from the seamless result

    @field_validator("dask_address")
    @classmethod
    def _scheduler(cls, v: str | None) -> str | None:
        """No address given: the scheduler Dask's configuration names (``DASK_SCHEDULER_ADDRESS``, or
        ``scheduler-address`` in a Dask config file), which ``distributed.Client()`` would use too.  A container
        set-up (infra/) names its cluster there once, and every run, ``nightly``'s deployment included, uses it."""
        if v is not None and v.strip():
            return v.strip()
        import dask

        configured = str(dask.config.get("scheduler-address", None) or "").strip()
        return configured or None

    @field_validator("mosaic")
    @classmethod
    def _mosaic_name(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or "/" in v or "\\" in v or v.startswith(".")):
            raise ValueError("mosaic is a plain output name (no folders, not hidden)")
        return v

    @field_validator("simplify")
    @classmethod
    def _no_simplification(cls, v: float | None) -> float | None:
        return None if v == 0 else v  # 0 keeps the pixel outlines, as None does: one run identity, one key

    @field_validator("flip_tta")
    @classmethod
    def _flips(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(set(v)) != len(v) or any(a < 0 or a > 2 for a in v)):
            raise ValueError("the axes to mirror must be distinct spatial axes: 0, 1 or 2")
        return None if v is None else sorted(v)  # 1,0 is 0,1: one run identity, one provenance, resumable

    @field_validator("roi")
    @classmethod
    def _roi(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (len(v) not in (2, 3) or any(r < 1 for r in v)):
            raise ValueError("roi must have 2 or 3 positive sizes")
        if v is None:
            return None
        from segmentation.card import check_window  # here: the module stays light for `--help`

        return check_window(v)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not v.startswith("cuda:"):
            raise ValueError("device must be auto, cpu, cuda or cuda:N")
        return v
