"""What a radiology group opens beside a label volume: statistics, label tables and, for DICOM, a SEG.

Per-label statistics (voxels, mL, intensity mean and std, bounding box in mm,
as TotalSegmentator's ``--statistics``) are computed chunk by chunk on the
input's grid, from the finished labels and the ingested scan, before the
provenance is sealed, so the provenance and the nightly report carry them.
The label tables (3D Slicer, ITK-SNAP) and the DICOM SEG are written once the
labels are exported, each renamed into place whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.config import SegmentOptions
from segmentation import LoadedModel
from segmentation.chunkwrites import label_nodata
from storage import provenance
from storage.geometry import VolumeGeometry
from storage.inputfiles import stem_of
from storage.layout import ImageStore
from storage.statistics import label_statistics, write_statistics


def intensity_unit(geometry: VolumeGeometry) -> str | None:
    """HU for CT (DICOM RescaleType, or CT's standard), else the scanner's arbitrary units (None)."""
    info = geometry.dicom
    if info is None:
        return None
    if info.rescale_type:
        return info.rescale_type
    return "HU" if (info.modality or "").upper() == "CT" else None


def volume_statistics(labels: Any, store: ImageStore, model: LoadedModel) -> dict[str, Any]:
    """Per-label statistics of a label volume on the input's grid (chunk by chunk)."""
    geometry = store.meta.geometry
    assert isinstance(geometry, VolumeGeometry)
    return label_statistics(labels, store.image, geometry.affine_mm(), model.card.classes,
                            nodata_label=label_nodata(model.card.num_classes), unit=intensity_unit(geometry))


def write_extras(labels: Any, store: ImageStore, model: LoadedModel, options: SegmentOptions, out_path: Path,
                 statistics: dict[str, Any], created: list[Path]) -> list[Path]:
    """Statistics JSON, label tables and (DICOM inputs) the DICOM SEG beside ``out_path``; appended to ``created``."""
    from storage.labeltables import write_label_tables

    stem = out_path.parent / stem_of(out_path)
    written = [write_statistics(stem.with_name(stem.name + ".statistics.json"), statistics)]
    created.append(written[-1])
    for path in write_label_tables(stem, model.card.classes):
        written.append(path)
        created.append(path)
    geometry = store.meta.geometry
    if isinstance(geometry, VolumeGeometry) and geometry.dicom is not None and options.dicom_seg != "none":
        from storage.dicomseg import write_dicom_seg

        written.append(write_dicom_seg(
            labels, geometry, stem.with_name(stem.name + ".seg.dcm"), classes=model.card.classes,
            algorithm={"name": model.name, "version": provenance.package_versions().get("segflow") or "unknown",
                       "weights_sha256": model.weights_sha256},
            segmentation_type="LABELMAP" if options.dicom_seg == "labelmap" else "BINARY",
            nodata_label=label_nodata(model.card.num_classes), source_root=store.meta.source.path))
        created.append(written[-1])
    return written


__all__ = ["intensity_unit", "volume_statistics", "write_extras"]
