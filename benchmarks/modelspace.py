"""What segmenting in model space costs: a CT-like scan resampled to the model's grid and back, against the
sliding window alone on the same model-space image.

    .venv/bin/python benchmarks/modelspace.py [--shape 512,512,400] [--depths 200 800] \
        [--precision fast exact] [--record modelspace]

A scan at 0.7 × 0.7 × 0.5 mm stored L,P,S (as DICOM converts) is generated slab
by slab straight into a ``.nii.gz`` (never whole in memory): air, a body of
soft tissue with fat, two lungs, a spine, smooth variation and noise, in HU.
The model directory has a version-3 card asking for 1.5 mm RAS, so segflow
resamples the scan once into a model-space store, stitches there, and brings
the probabilities back onto the scan's grid chunk by chunk before the argmax
(run A).  Run B is the sliding window alone: the same model-space image, as
segflow's ``to_model`` computes it, written as a float32 NIfTI at 1.5 mm RAS.
Its grid equals the model's, so segflow skips model space entirely (the run's
statistics must say so).  Both run as ``segflow segment`` subprocesses with the
same model, chunk size and precision, side by side in one process run because
the machine is noisy; the RSS of each whole process tree (CLI client, Dask
nanny and worker, Prefect's temporary server) is sampled every 0.2 s.

Resampling cost = ``inference_seconds`` of A minus B's, as a fraction of B's
(the model-space forward pass, stitching and writing included).  A's
``model_image_seconds`` is the forward resampling (the model-space store
written once); the rest is the inverse resampling, the argmax and the label
chunks written on the finer input grid.  ``--profile`` splits that rest
in-process on the first depth: the inverse alone, and the inverse plus the
argmax and label writes, on a model-space probability store of the same size,
and the labels-only way back (``storage.resample.argmax_to_input``) the
pipeline takes when no probabilities are written.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Sequence

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402
from memory import run_sampled  # noqa: E402  (the memory benchmark's process-tree RSS sampling)

ZOOMS_IJK = (0.7, 0.7, 0.5)  # the scan's spacing in mm, nibabel's (i, j, k) order
MODEL_MM = 1.5
CLASSES = 4
SLAB = 32  # slices generated (and written) at a time


# --- the inputs --------------------------------------------------------------------------------------------------

def lps_affine(shape_ijk: Sequence[int], zooms_ijk: Sequence[float]) -> np.ndarray:
    """Voxel -> RAS mm for a scan stored L,P,S (i towards the left, j towards the back), centred on 0."""
    signs = np.array([-1.0, -1.0, 1.0])
    affine = np.diag([*(signs * np.asarray(zooms_ijk, dtype=np.float64)), 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape_ijk, dtype=np.float64) - 1) / 2)
    return affine


def ct_slabs(shape_ijk: Sequence[int], zooms_ijk: Sequence[float], seed: int = 0) -> Iterator[np.ndarray]:
    """(k, j, i) int16 slabs of a CT-like phantom in HU, computed slab by slab from coordinates.

    Smooth anatomy (body, fat, lungs, spine) plus Gaussian noise, so interpolation
    and the network see realistic structure at any depth without a volume in memory.
    """
    ni, nj, nk = shape_ijk
    zi, zj, zk = zooms_ijk
    x = (np.arange(ni, dtype=np.float32) - ni / 2) * zi  # mm, left-right
    y = (np.arange(nj, dtype=np.float32) - nj / 2) * zj  # mm, front-back
    yy, xx = np.meshgrid(y, x, indexing="ij")  # (j, i)
    half_x, half_y = 0.42 * ni * zi, 0.32 * nj * zj
    rng = np.random.default_rng(seed)
    for k0 in range(0, nk, SLAB):
        k1 = min(k0 + SLAB, nk)
        z = ((np.arange(k0, k1, dtype=np.float32) - nk / 2) * zk)[:, None, None]  # mm, up
        length = nk * zk
        swell = 1.0 + 0.08 * np.sin(z / max(length, 1.0) * 2 * np.pi)
        r_body = (xx / (half_x * swell)) ** 2 + (yy / (half_y * swell)) ** 2
        hu = np.full((k1 - k0, nj, ni), -1000.0, dtype=np.float32)
        body = r_body < 1.0
        tissue = 40.0 + 25.0 * np.sin(xx / 23.0) * np.cos(yy / 31.0) * np.cos(z / 17.0)
        hu = np.where(body, tissue, hu)
        hu = np.where(body & (r_body > 0.8), -100.0, hu)  # subcutaneous fat
        in_chest = np.abs(z - 0.15 * length) < 0.3 * length
        for side in (-1.0, 1.0):
            r_lung = ((xx - side * 0.45 * half_x) / (0.33 * half_x)) ** 2 + ((yy + 0.1 * half_y) / (0.55 * half_y)) ** 2
            hu = np.where(in_chest & (r_lung < 1.0), -850.0, hu)
        spine = (xx ** 2 + (yy - 0.65 * half_y) ** 2) < (0.12 * half_y) ** 2
        hu = np.where(spine & body, 700.0, hu)
        hu += rng.normal(0.0, 20.0, hu.shape).astype(np.float32)
        yield np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def write_nifti(path: Path, shape_ijk: Sequence[int], affine: np.ndarray, dtype: np.dtype,
                slabs: Iterator[np.ndarray]) -> None:
    """A .nii.gz written header first, then (k, j, i) slabs in order: NIfTI's i-fastest layout, streamed."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(tuple(int(n) for n in shape_ijk))
    hdr.set_data_dtype(dtype)
    hdr.set_qform(affine, code=1)
    hdr.set_sform(affine, code=1)
    hdr.set_xyzt_units("mm", "sec")
    hdr["vox_offset"] = 352
    with gzip.open(path, "wb", compresslevel=1) as f:
        f.write(hdr.binaryblock + b"\0" * 4)  # 348-byte header, then "no extensions"
        for slab in slabs:
            f.write(np.ascontiguousarray(slab, dtype=dtype).tobytes())


def make_scan(path: Path, shape_ijk: Sequence[int]) -> None:
    write_nifti(path, shape_ijk, lps_affine(shape_ijk, ZOOMS_IJK), np.dtype(np.int16), ct_slabs(shape_ijk, ZOOMS_IJK))


def make_model_space_scan(scan: Path, out: Path, work: Path, chunk: int) -> dict:
    """The scan as segflow's ``to_model`` puts it on the model's grid, written as a float32 NIfTI there.

    Computed one model-space slab of ``chunk`` slices at a time from an ingested
    copy of the scan, so this too stays out of core.  Returns the grid and the
    seconds the forward resampling alone took (no store written).
    """
    import dask
    import dask.array as da

    from storage.grids import model_grid
    from storage.ingest import ingest
    from storage.resample import to_model

    store = ingest(scan, work / "scan.image.zarr", chunk=chunk)
    mapping = model_grid(np.asarray(store.meta.geometry.affine, dtype=np.float64), tuple(store.spatial_shape),
                         axcodes="RAS", pixdim_ijk=(MODEL_MM,) * 3)
    moved = to_model(da.from_zarr(store.image), mapping, chunks=chunk)
    k_model = mapping.model_shape[0]
    seconds = [0.0]

    def slabs() -> Iterator[np.ndarray]:
        for k0 in range(0, k_model, chunk):
            t = time.perf_counter()
            with dask.config.set(scheduler="threads", num_workers=2):
                slab = moved[0, k0:k0 + chunk].compute()
            seconds[0] += time.perf_counter() - t
            yield slab.astype(np.float32, copy=False)

    write_nifti(out, mapping.model_shape[::-1], np.asarray(mapping.model_affine), np.dtype(np.float32), slabs())
    return {"mapping": mapping, "forward_seconds": seconds[0], "store": store}


def make_model(path: Path, channels: Sequence[int], roi: int, batch: int) -> None:
    """A random-weight 3-D U-Net whose version-3 card asks for 1.5 mm RAS and a CT window."""
    import torch

    from segmentation.card import ModelCard
    from segmentation.modeldir import build_module, save_model

    card = ModelCard.model_validate({
        "name": "modelspace-bench",
        "architecture": {"name": "unet", "kwargs": {"channels": list(channels), "strides": [2] * (len(channels) - 1),
                                                    "num_res_units": 1}},
        "input": {"spatial_dims": 3, "channels": 1, "spacing": [MODEL_MM] * 3, "spacing_unit": "mm",
                  "orientation": "RAS",
                  "normalization": {"mode": "scale", "offset": [-1000.0], "scale": [1 / 2000], "clip": [0.0, 1.0]}},
        "classes": [{"value": v, "name": f"c{v}"} for v in range(CLASSES)],
        "inference": {"roi": [roi] * 3, "overlap": 0.25, "batch_size": batch}})
    torch.manual_seed(0)
    save_model(path, card, build_module(card))


# --- the runs ------------------------------------------------------------------------------------------------------

def segment(scan: Path, model: Path, out: Path, precision: str, chunk: int) -> dict:
    """One ``segflow segment`` subprocess: wall seconds, peak tree RSS, and its provenance statistics."""
    from storage.provenance import sidecar_path

    cmd = [sys.executable, "-m", "flows", "segment", str(scan), "--model", str(model), "--out", str(out),
           "--precision", precision, "--chunk-size", str(chunk), "--no-zarr"]
    rc, text, wall, peak, at_peak = run_sampled(cmd)
    if rc != 0:
        raise SystemExit(f"segflow failed on {scan.name}:\n{text}")
    record = json.loads(sidecar_path(out / "scan.nii.gz").read_text())
    stats = record["statistics"]
    return {"wall_s": wall, "peak_gb": peak / 1e9, "roles": {k: round(v / 1e9, 2) for k, v in at_peak.items()},
            "stats": stats, "label_bytes": (out / "scan.nii.gz").stat().st_size}


def smooth_probabilities(shape: Sequence[int], k0: int, k1: int) -> np.ndarray:
    """(classes, k1 - k0, *shape[2:]) float32 probabilities: a softmax of smooth class fields (a few model
    voxels across), so labels form regions with boundaries, as a network's do, computed slab by slab."""
    k = np.arange(k0, k1, dtype=np.float32)[:, None, None]
    j = np.arange(shape[2], dtype=np.float32)[None, :, None]
    i = np.arange(shape[3], dtype=np.float32)[None, None, :]
    logits = np.stack([3.0 * np.sin(k / (7.0 + c) + c) * np.cos(j / (9.0 + 2 * c)) + 2.0 * np.sin(i / (11.0 + c) - c)
                       for c in range(shape[0])])
    p = np.exp(logits - logits.max(axis=0, keepdims=True))
    return (p / p.sum(axis=0, keepdims=True)).astype(np.float32)


def profile_back(mapping, chunk: int, work: Path) -> dict:  # noqa: ANN001
    """In-process split of the way back: inverse resampling alone, then with argmax and label writes, then the
    labels-only path the pipeline takes without a probabilities output (``argmax_to_input``).

    The model-space probabilities are a stored float32 (classes, *model grid)
    array of smooth class fields (:func:`smooth_probabilities`), read back as
    the stitched ones are.
    """
    import dask
    import dask.array as da
    import zarr

    from segmentation.chunkwrites import label_dtype, labels_of
    from storage.resample import argmax_to_input, to_input

    shape = (CLASSES, *mapping.model_shape)
    probs_store = zarr.create_array(str(work / "probs.zarr"), shape=shape, dtype="float32",
                                    chunks=(CLASSES, *(min(chunk, n) for n in shape[1:])))
    for k0 in range(0, shape[1], chunk):
        k1 = min(k0 + chunk, shape[1])
        probs_store[:, k0:k1] = smooth_probabilities(shape, k0, k1)
    probs = da.from_zarr(probs_store)
    back = to_input(probs, mapping, chunks=chunk)
    out = {}
    with dask.config.set(scheduler="threads", num_workers=2):
        t = time.perf_counter()
        back.map_blocks(lambda b: np.zeros((1,) * b.ndim, dtype=np.float32), chunks=(1,) * 4, dtype=np.float32).sum().compute()
        out["inverse_s"] = time.perf_counter() - t
        labels = back.map_blocks(labels_of, None, CLASSES, drop_axis=0, dtype=label_dtype(CLASSES))
        target = zarr.create_array(str(work / "labels.zarr"), shape=labels.shape, dtype=labels.dtype,
                                   chunks=tuple(c[0] for c in labels.chunks))
        t = time.perf_counter()
        da.store(labels, target, lock=False)
        out["inverse_argmax_write_s"] = time.perf_counter() - t
        fast = argmax_to_input(probs, mapping, chunks=chunk, dtype=label_dtype(CLASSES))
        target2 = zarr.create_array(str(work / "labels2.zarr"), shape=fast.shape, dtype=fast.dtype,
                                    chunks=tuple(c[0] for c in fast.chunks))
        t = time.perf_counter()
        da.store(fast, target2, lock=False)
        out["labels_only_write_s"] = time.perf_counter() - t
        out["labels_equal"] = bool(np.array_equal(target[...], target2[...]))
    out["input_voxels"] = int(np.prod(mapping.input_shape))
    return out


# --- the report ----------------------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="512,512,400", help="scan i,j,k voxels at 0.7 × 0.7 × 0.5 mm")
    ap.add_argument("--depths", type=int, nargs="*", default=None,
                    help="also run these slice counts k (memory against depth); the first shape is --shape's")
    ap.add_argument("--precision", nargs="+", default=["fast"], choices=["fast", "exact"])
    ap.add_argument("--channels", default="16,32,64,128", help="U-Net channels (strides 2)")
    ap.add_argument("--roi", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--profile", action="store_true", help="split the way back in-process (first depth)")
    ap.add_argument("--keep", type=Path, default=None, help="work here and keep the files (default: a temp dir)")
    report.add_argument(ap)
    args = ap.parse_args()
    ni, nj, nk = (int(v) for v in args.shape.split(","))
    depths = [nk, *(d for d in (args.depths or []) if d != nk)]
    channels = [int(c) for c in args.channels.split(",")]

    head = ["| scan (i×j×k) | model grid (k′×j′×i′) | precision | run | windows | inference s | of which model "
            "image s | ingest s | export s | wall s | peak RSS GB (largest process of each kind) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows, summary, results, prof = [], [], [], None
    print("\n".join(head), flush=True)
    with tempfile.TemporaryDirectory(dir=args.keep) as tmp_name:
        tmp = Path(tmp_name)
        model = tmp / "model"
        make_model(model, channels, args.roi, args.batch)
        for depth in depths:
            shape = (ni, nj, depth)
            d = tmp / f"k{depth}"
            d.mkdir()
            t = time.perf_counter()
            make_scan(d / "scan.nii.gz", shape)
            gen_s = time.perf_counter() - t
            (d / "b").mkdir()
            t = time.perf_counter()
            made = make_model_space_scan(d / "scan.nii.gz", d / "b" / "scan.nii.gz", d, args.chunk)
            mapping = made["mapping"]
            print(f"# {shape}: generated in {gen_s:.0f} s ({(d / 'scan.nii.gz').stat().st_size / 1e6:.0f} MB gz); "
                  f"model grid {mapping.model_shape}, forward resampling alone {made['forward_seconds']:.1f} s "
                  f"(model-space scan written in {time.perf_counter() - t:.0f} s)", flush=True)
            if args.profile and prof is None:
                prof = {"shape": shape, **profile_back(mapping, args.chunk, d)}
                print(f"# profile: {prof}", flush=True)
            shutil.rmtree(made["store"].path)
            for precision in args.precision:
                pair = {}
                for run, scan in (("B", d / "b" / "scan.nii.gz"), ("A", d / "scan.nii.gz")):
                    r = segment(scan, model, d / f"out-{run}-{precision}", precision, args.chunk)
                    s = r["stats"]
                    if run == "B" and "model_space" in s:
                        raise SystemExit("run B was resampled: its grid should equal the model's")
                    if run == "A" and "model_space" not in s:
                        raise SystemExit("run A was not resampled")
                    roles = ", ".join(f"{k} {v}" for k, v in sorted(r["roles"].items()))
                    rows.append(f"| {ni}×{nj}×{depth} | {'×'.join(map(str, mapping.model_shape))} | {precision} | "
                                f"{'A: model space' if run == 'A' else 'B: sliding window alone'} | "
                                f"{s.get('windows_total')} | {s['inference_seconds']:.1f} | "
                                f"{s.get('model_image_seconds', 0):.1f} | {s['ingest_seconds']:.1f} | "
                                f"{s['export_seconds']:.1f} | {r['wall_s']:.0f} | {r['peak_gb']:.2f} ({roles}) |")
                    print(rows[-1], flush=True)
                    pair[run] = r
                    results.append({"depth": depth, "precision": precision, "run": run, "wall_s": r["wall_s"],
                                    "peak_gb": r["peak_gb"], "roles": r["roles"],
                                    **{k: s.get(k) for k in ("inference_seconds", "model_image_seconds",
                                                             "ingest_seconds", "export_seconds", "total_seconds",
                                                             "windows_total")}})
                    shutil.rmtree(d / f"out-{run}-{precision}")
                a, b = pair["A"]["stats"], pair["B"]["stats"]
                cost = a["inference_seconds"] - b["inference_seconds"]
                fwd = a["model_image_seconds"]
                summary.append({"depth": depth, "precision": precision, "cost": cost, "forward": fwd,
                                "rest": cost - fwd, "b_inference": b["inference_seconds"],
                                "fraction": cost / b["inference_seconds"],
                                "wall_cost": pair["A"]["wall_s"] - pair["B"]["wall_s"],
                                "b_wall": pair["B"]["wall_s"], "export_extra": a["export_seconds"] - b["export_seconds"],
                                "ingest_extra": a["ingest_seconds"] - b["ingest_seconds"],
                                "model_shape": mapping.model_shape, "voxels": ni * nj * depth})
            (d / "scan.nii.gz").unlink()
            (d / "b" / "scan.nii.gz").unlink()

    lines = [*head, *rows, "", "| scan | precision | resampling = inference A − B (s) | forward (model image) s "
             "| back + argmax + finer label writes s | B inference s | resampling / B | end to end A − B (s) "
             "| of which ingest / export on the finer grid (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for m in summary:
        lines.append(f"| {ni}×{nj}×{m['depth']} | {m['precision']} | {m['cost']:.1f} | {m['forward']:.1f} | "
                     f"{m['rest']:.1f} | {m['b_inference']:.1f} | **{100 * m['fraction']:.0f} %** | "
                     f"{m['wall_cost']:.0f} | {m['ingest_extra']:.0f} / {m['export_extra']:.0f} |")
    print("\n".join(lines[len(head) + len(rows):]))
    notes = [f"CT-like int16 scan (air, body, fat, lungs, spine, noise; HU) at {' × '.join(map(str, ZOOMS_IJK))} mm "
             f"(i, j, k), stored L,P,S, streamed slab by slab into a .nii.gz. Random-weight MONAI U-Net "
             f"({', '.join(map(str, channels))}), {CLASSES} classes, card version 3 asking for {MODEL_MM} mm RAS, "
             f"ROI {args.roi}³, overlap 0.25, batch {args.batch}, chunks {args.chunk}³, `segflow segment "
             "--no-zarr` with segment's default cluster (threads of its own process, one per core). "
             "Run A segments the scan "
             "(model space: resample once, stitch, probabilities back, argmax on the scan's grid); run B segments "
             "the same model-space image written as a float32 NIfTI at 1.5 mm RAS, which segflow does not resample "
             "(checked: its statistics carry no `model_space`). Seconds are the provenance statistics; RSS is "
             "sampled every 0.2 s over the whole process tree.", "", *lines, ""]
    for m in summary:
        verdict = "met" if m["fraction"] <= 0.15 else f"missed by {100 * (m['fraction'] - 0.15):.0f} points"
        notes.append(f"- {ni}×{nj}×{m['depth']}, {m['precision']}: resampling costs **{100 * m['fraction']:.0f} %** "
                     f"of the model-space forward pass (goal ≤ 15 %: {verdict}); forward {m['forward']:.1f} s, "
                     f"back {m['rest']:.1f} s.")
    if len({r['depth'] for r in results}) > 1:
        for run in ("A", "B"):
            peaks = {r["depth"]: r["peak_gb"] for r in results if r["run"] == run}
            lo, hi = min(peaks), max(peaks)
            notes.append(f"- Peak RSS, run {run}: {peaks[lo]:.2f} GB at {lo} slices, {peaks[hi]:.2f} GB at {hi} "
                         f"slices ({hi / lo:.1f}× the voxels, {peaks[hi] / peaks[lo]:.2f}× the memory).")
    deepest = max(depths)
    monai_gb = ni * nj * deepest * 4 * (1 + CLASSES) / 1e9
    notes.append(f"- For comparison, MONAI's Spacingd + Invertd path holds at least the {ni}×{nj}×{deepest} scan as "
                 f"float32 and the {CLASSES} inverted class maps on its grid: {monai_gb:.1f} GB.")
    if prof is not None:
        pi, pj, pk = prof["shape"]
        notes.append(f"- Way back, in-process at {pi}×{pj}×{pk} (2 threads, smooth class fields): "
                     f"inverse resampling alone {prof['inverse_s']:.1f} s, with argmax and label chunk writes "
                     f"{prof['inverse_argmax_write_s']:.1f} s; labels only (`argmax_to_input`, interpolating "
                     f"near boundaries only) with label chunk writes {prof['labels_only_write_s']:.1f} s, labels "
                     f"{'identical' if prof['labels_equal'] else 'DIFFERENT'}; for {prof['input_voxels'] / 1e6:.0f} M "
                     "input voxels.")
    body = "\n".join(notes)
    report.publish(body, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
