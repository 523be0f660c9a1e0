"""A DICOM series read into an image store: pixels rescaled, slabs streamed.

The volume's files come from :func:`storage.dicomfiles.find_series` and are
checked and sorted by :func:`storage.dicomplan.plan_series`, which refuses
everything a volume cannot be trusted with before a byte is written.  The
accepted volume becomes ``image[0, k, j, i]`` (i column, j row, k sorted
slice), exactly the layout of :func:`storage.nifti.ingest_nifti`, with a
synthesised NIfTI-1 header on the series' grid so that the NIfTI exporter puts
labels back where the slices were.  Pixels are read one chunk-depth of slices
at a time and rescaled (RescaleSlope/Intercept) per slice or frame.
"""

from __future__ import annotations

import base64
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

from storage.dicomfiles import Frame, SeriesRef, find_series, frame_name, is_dicom_input, why
from storage.dicomobject import decode_pixels
from storage.dicomplan import DEPTH_ASSUMED_NOTE, Plan, fits, plan_series
from storage.errors import CorruptInputError, StoreError
from storage.geometry import DicomFile, DicomSeriesInfo, SourceInfo, VolumeGeometry
from storage.hashing import sha256_input
from storage.layout import ImageStore, StoreMeta, create_image_store, mark_complete
from storage.header import Header, voxel_millilitres

__all__ = ["SeriesRef", "is_dicom_input", "find_series", "ingest_dicom", "probe_dicom"]

# --------------------------------------------------------------------------- ingest and probe


def probe_dicom(ref: SeriesRef) -> Header:
    """What routing needs (kind, shape, voxel size) from the headers alone, after the same checks as ingest."""
    plan = plan_series(ref)
    size, note = voxel_millilitres(plan.affine, "mm")
    if plan.depth_assumed:
        note = DEPTH_ASSUMED_NOTE
    return Header(path=ref.display, kind="volume", spatial_dims=3, channels=1, shape=plan.shape,
                  cell_size=size, cell_unit="mL", cell_note=note)


def ingest_dicom(ref: SeriesRef, store_path: str | os.PathLike[str], *, chunk: int = 128) -> ImageStore:
    """Copy one checked DICOM volume into a new image store, one chunk-depth of slices at a time."""
    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    store = Path(store_path)
    plan = plan_series(ref)  # every refusal happens here, before the store exists
    created = False
    try:
        candidates = list(plan.dtypes)
        while candidates:
            dtype = candidates.pop(0)
            i, j, k = plan.shape
            shape = (1, k, j, i)
            chunks = (1, *(min(chunk, n) for n in shape[1:]))
            created = True
            try:
                out = create_image_store(store, meta=_meta(plan, dtype), shape=shape, dtype=dtype.name,
                                         chunks=chunks, with_mask=False)
                seen = _copy_slabs(plan, out, dtype, strict=bool(candidates))
            except OSError as exc:
                raise StoreError(store, f"cannot write the image store: {exc.strerror or why(exc)}") from None
            if seen is None:
                mark_complete(out.group)
                return out
            # skip the dtypes that cannot hold what was already seen; the next one is checked again
            while len(candidates) > 1 and not fits(candidates[0], *seen):
                candidates.pop(0)
        raise AssertionError("the last stored dtype always fits")  # pragma: no cover
    except BaseException:
        if created:
            shutil.rmtree(store, ignore_errors=True)
        raise


def _meta(plan: Plan, dtype: np.dtype) -> StoreMeta:
    ref, first = plan.ref, plan.objects[0]
    hdr = _nifti_header(plan, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qform = np.asarray(hdr.get_qform(coded=False), dtype=np.float64)
    files: dict[Path, DicomFile] = {}  # in slice order of their first frame
    for frame in plan.frames:
        if frame.path not in files:
            files[frame.path] = DicomFile(path=_relative(frame.path, ref.root), sha256=sha256_input(frame.path),
                                          sop_instance_uid=frame.sop_instance_uid)
    root = ref.root.resolve()
    multi = any(f.number is not None for f in plan.frames)
    info = DicomSeriesInfo(
        study_instance_uid=first.study_instance_uid or "",
        series_instance_uid=ref.series_instance_uid,
        frame_of_reference_uid=first.frame_of_reference_uid,
        sop_class_uid=first.sop_class_uid,
        modality=first.modality,
        series_description=first.series_description,
        series_number=first.series_number,
        sop_instance_uids=[f.sop_instance_uid for f in plan.frames],
        frame_numbers=[f.number or 1 for f in plan.frames] if multi else None,
        files=list(files.values()),
        transfer_syntax_uid=first.transfer_syntax_uid,
        rescale_slope=plan.frames[0].slope,
        rescale_intercept=plan.frames[0].intercept,
        rescale_type=first.rescale_type or ("HU" if first.modality == "CT" else None),
        patient_name_present=any(o.patient_name_present for o in plan.objects),
        patient_id_present=any(o.patient_id_present for o in plan.objects),
        volume=ref.volume,
        depth_assumed=plan.depth_assumed,
        copies=[_relative(c, ref.root) for c in ref.copies],
        searched=not ref.listed,
    )
    geometry = VolumeGeometry(
        shape=list(plan.shape),
        affine=plan.affine.tolist(),
        qform=qform.tolist(),
        sform=plan.affine.tolist(),
        qform_code=1,
        sform_code=1,
        zooms=list(plan.zooms),
        orientation=list(nib.aff2axcodes(plan.affine)),
        nifti_version=1,
        header_b64=base64.b64encode(hdr.binaryblock).decode("ascii"),
        dtype=dtype.name,
        dicom=info,
    )
    return StoreMeta(
        source=SourceInfo(path=str(root), sha256=ref.sha256(), size=sum(o.size for o in plan.objects),
                          format="DICOM"),
        geometry=geometry,
        channel_names=["channel0"],
        spatial_dims=3,
    )


def _relative(path: Path, root: Path) -> str:
    """A file's path relative to the series root (SourceInfo.path), so a moved archive still verifies."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def _nifti_header(plan: Plan, dtype: np.dtype) -> nib.Nifti1Header:
    """A NIfTI-1 header on the series' grid: scanner qform and sform, mm, no scaling (values are rescaled)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(plan.shape)
    hdr.set_data_dtype(dtype)
    hdr.set_qform(plan.affine, code=1)
    hdr.set_sform(plan.affine, code=1)
    hdr.set_zooms(plan.zooms)
    hdr.set_xyzt_units("mm", "sec")
    hdr.set_slope_inter(1.0, 0.0)
    hdr["descrip"] = b"segflow: from a DICOM series"
    return hdr


def _copy_slabs(plan: Plan, out: ImageStore, dtype: np.dtype, *, strict: bool) -> tuple[float, float] | None:
    """Write every z-chunk of slices; None when done.

    With ``strict``, stop at the first slab whose values ``dtype`` cannot hold
    and return the value range seen so far, so the caller picks a wider dtype.
    """
    image = out.image
    depth = image.shape[1]
    step = image.chunks[1]
    j, i = image.shape[2], image.shape[3]
    integral = dtype.kind != "f"
    work = _work_dtype(plan) if integral else np.dtype("float64")
    low, high = np.inf, -np.inf
    for k0 in range(0, depth, step):
        k1 = min(k0 + step, depth)
        slab = np.empty((k1 - k0, j, i), dtype=work)
        for k, pixels in zip(range(k0, k1), _read_frames(plan, plan.frames[k0:k1])):
            frame = plan.frames[k]
            if pixels.shape != (j, i):
                raise CorruptInputError(plan.ref.display, f"{frame_name(frame)} decoded to {pixels.shape}, "
                                                          f"not rows x columns {(j, i)}")
            if integral:
                slab[k - k0] = pixels.astype(work) * int(frame.slope) + int(frame.intercept)
            else:
                slab[k - k0] = pixels.astype(np.float64) * frame.slope + frame.intercept
        low, high = min(low, float(slab.min())), max(high, float(slab.max()))
        if strict and not fits(dtype, low, high):
            return low, high
        image[0, k0:k1] = slab.astype(dtype)
    return None


def _work_dtype(plan: Plan) -> np.dtype:
    """int32 holds rescaled 8/16-bit pixels with any sane slope and intercept (half the memory of int64)."""
    bound = max(abs(f.slope) for f in plan.frames) * 65535 + max(abs(f.intercept) for f in plan.frames)
    return np.dtype("int32") if plan.raw_dtype.itemsize <= 2 and bound < 2 ** 31 else np.dtype("int64")


def _read_frames(plan: Plan, frames: list[Frame]) -> Iterator[np.ndarray]:
    """Decoded raw pixels of the given frames in their order, one file open per file per slab."""
    display = plan.ref.display
    by_path = {obj.path: obj for obj in plan.objects}
    wanted: dict[Path, list[int]] = {}
    for frame in frames:
        if frame.number is not None:
            wanted.setdefault(frame.path, []).append(frame.number - 1)
    decoded: dict[tuple[Path, int], np.ndarray] = {}
    for path, indices in wanted.items():
        indices = sorted(set(indices))
        for index, array in zip(indices, decode_pixels(display, by_path[path], indices)):
            decoded[(path, index)] = array
    for frame in frames:
        if frame.number is not None:
            array = decoded.pop((frame.path, frame.number - 1), None)
            if array is None:
                raise CorruptInputError(display, f"{frame_name(frame)} could not be read")
            yield array
            continue
        (array,) = decode_pixels(display, by_path[frame.path], None)
        yield array
