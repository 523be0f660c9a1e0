"""What a user names on the command line or in a manifest becomes a list of inputs.

A GeoTIFF, VRT or NIfTI file, or a STAC item's JSON (or its URL), is one
input; an item's outputs are named after its id (:mod:`storage.stacitem`).  DICOM comes as
radiology gives it: a folder of files, a DICOMDIR, or the files themselves;
each SeriesInstanceUID in it (each volume of a split enhanced multi-frame
object) becomes one input of its own, named after the series
(:func:`storage.dicom.find_series`).  Loose DICOM files named together are
grouped together, so ``segflow segment scan/*.dcm`` is one series, not one
input per slice.  nnU-Net's channel files of a case named together
(``case_0000.nii.gz``, ``case_0001.nii.gz`` ...) are one input of that many
channels, named after the case (:mod:`storage.channelfiles`).  Something that cannot be expanded (a folder without image
series) becomes a failed input with its one-line reason, and the batch goes on.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Collection, Union

from flows.progress import say
from storage.channelfiles import ChannelFiles, group_channel_files, is_channel_store
from storage.dicomfiles import SeriesRef, damaged_files, find_series, is_dicom_input, join_split_series
from storage.errors import SegflowError, StoreError
from storage.hashing import sha256_input
from storage.ingest import ingest
from storage.inputfiles import same_file, stem_of
from storage.layout import ImageStore, open_image_store
from storage.mosaic import MosaicRef, is_mosaic_store
from storage.remote import is_url
from storage.bands import BandRequest
from storage.stacassets import local_asset_files
from storage.stacitem import is_item_path, item_stem, named_by_id, reuse_sha256

Expanded = Union[str, SeriesRef, ChannelFiles]
GROUPS = (SeriesRef, MosaicRef, ChannelFiles)  # inputs of several files, named by their own name and display


def expand(inputs: list[str], takes: Collection[int] | None = None) -> tuple[list[Expanded], list[tuple[str, str]]]:
    """(inputs in the order given, [(what failed, its one-line error)]).  ``takes``: the channel counts of the
    models that may segment them, which decide whether numbered NIfTI files are a case's channels
    (:func:`storage.channelfiles.group_channel_files`); None groups every whole case."""
    parts: list[list[Expanded]] = []  # per argument (the loose DICOM files together, last)
    failed: list[tuple[str, str]] = []
    loose: list[str] = []
    for item in inputs:
        if is_url(item) or not _dicom(item):
            parts.append([item])
        elif Path(item).is_file() and Path(item).name.upper() != "DICOMDIR":
            loose.append(item)
        else:
            parts.append(_series(item, [item], failed))
    if loose:
        parts.append(_series(", ".join(loose) if len(loose) < 4 else f"{len(loose)} DICOM files", loose, failed))
    parts, unjoined = join_split_series(parts)  # one series in two folders given together is one input
    out = [x for part in parts for x in part]
    return group_channel_files(out, takes), failed + unjoined


def _dicom(item: str) -> bool:
    try:
        return is_dicom_input(Path(item))
    except OSError:
        return False


def _series(label: str, paths: list[str], failed: list[tuple[str, str]]) -> list[Expanded]:
    try:
        return list(find_series(paths))
    except SegflowError as exc:
        failed.append((label, str(exc)))
        return []


def input_stem(source: Any) -> str:
    """The stem every output of an input is named after: the file's, or the series' sanitised name."""
    if isinstance(source, GROUPS):
        return source.name
    return item_stem(source) or stem_of(source)  # a STAC item's outputs are named after its id


# the longest names made from a stem: the temporary file of an output (.<stem>.probabilities.tif.<32 hex>.tmp) is
# 56 bytes more than the stem, and file systems allow 255 bytes a name
MAX_STEM_BYTES = 255 - 56


def name_too_long(stem: str) -> str | None:
    """Why outputs cannot be named after ``stem`` (too long for the file system), or None.  A 250-character name
    started the cluster, then failed on a work file whose path the message named instead of the input."""
    size = len(stem.encode("utf-8"))
    if size <= MAX_STEM_BYTES:
        return None
    return (f"its name is {size} bytes long, and the outputs and temporary files named after it need at most "
            f"{MAX_STEM_BYTES} (file names are limited to 255 bytes): give it a shorter name or a shorter link")


def input_label(source: Any) -> str:
    """How messages and provenance name an input: its path, or a series' folder and UIDs."""
    return source.display if isinstance(source, GROUPS) else str(source)


def output_clashes(items: list[Expanded], usable: Callable[[Expanded], bool] | None = None,
                   done: str = "segmented") -> dict[int, str]:
    """The items whose outputs would overwrite an earlier item's, by position: {index: its one-line error}.

    Two inputs clash when they share an output stem (``site1/scan.nii.gz`` and
    ``site2/scan.nii.gz``, ``scan.nii`` and ``scan.nii.gz``, the same DICOM
    series copied into two folders, two STAC items with one id); the first
    keeps its name.  An input listed twice is segmented once, and its second
    mention is reported, as ``cp`` reports a source given twice.  ``usable``
    (asked only of items that share a stem): an item it rejects claims no
    name, so an empty ``a.nii.gz`` does not keep a good ``a.tif`` from being
    segmented night after night (it fails with its own error).  ``done``: what the command does to an input
    (``ingest`` ingests: it had said "segmented once").
    """
    stems = [input_stem(item) for item in items]
    shared = {stem for stem, n in Counter(stems).items() if n > 1}
    first: dict[str, str] = {}
    clashes: dict[int, str] = {}
    for i, item in enumerate(items):
        stem, label = stems[i], input_label(item)
        if stem in shared and usable is not None and not usable(item):
            continue  # its own error is said where it is read
        if stem not in first:
            first[stem] = label
        elif first[stem] == label:
            clashes[i] = f"{label}: given more than once; {done} once, under its first mention"
        else:
            # a STAC item's outputs are named after its id, which renaming the file does not change
            advice = "segment one of them into another --out (an item's outputs are named after its id)" \
                if isinstance(item, str) and named_by_id(item) else \
                "the same DICOM series in two places: give one of them, or segment the other into another --out" \
                + _damage_note(item) if isinstance(item, SeriesRef) else "rename one of them"
            clashes[i] = (f"{label}: its outputs would overwrite those of {first[stem]} (the same name stem "
                          f"{stem!r}); {advice}")
    return clashes


def _damage_note(ref: SeriesRef) -> str:
    """A refused copy's damaged slices, named: a truncated file in a copy of a study had gone unmentioned."""
    damaged = damaged_files(ref)
    if not damaged:
        return ""
    names = ", ".join(p.name for p in damaged[:3]) + (f" and {len(damaged) - 3} more" if len(damaged) > 3 else "")
    return f" (this copy also has {len(damaged)} damaged file(s): {names})"


OUTPUT_SUFFIXES = (".tif", ".nii.gz", ".zarr", ".provenance.json", ".stac.json", ".probabilities.tif",
                   ".quicklook.png", ".gpkg", ".parquet", ".geojson", ".statistics.json", ".seg.dcm", ".ctbl",
                   ".itksnap.txt", ".model-space.nii.gz", ".qml")
"""What an input's outputs are named: ``OUT/<stem>`` and one of these (``--split-by-tile`` adds ``<tile stem>.tif``)."""


def overwritten_input(source: Any, out_dir: str | Path, *,
                      split_by_tile: bool = False) -> tuple[Path, str] | None:
    """A file the run reads and that its outputs would overwrite, and why (None when there is none).

    With ``--out`` the input's own folder, ``a.tif`` is segmented into
    ``OUT/a.tif``: the label map used to replace the image it came from.
    The input file, an Analyze ``.img`` beside its ``.hdr`` and a mosaic's
    tiles are checked against every output name the run may write.
    """
    if isinstance(source, SeriesRef) or is_url(str(source)):
        return None  # a series' outputs are named series-<number>-...; a URL is read from a downloaded copy
    out = Path(out_dir)
    reads = input_files(source)  # once: an item's JSON and a VRT are parsed to list what they read
    for target in (out / name for name in output_names(source, split_by_tile=split_by_tile)):
        for read in reads:
            if same_file(read, target):
                by = "" if isinstance(source, MosaicRef) or read == Path(str(source)) else \
                    f", which {Path(str(source)).name} reads"  # a STAC item's band file, a VRT's source
                return read, (f"its output {target} would overwrite it{by} (--out is the folder the input is in, "
                              "and the names coincide); choose another --out")
    return None


def outputs_of_another(source: Any, out_dir: str | Path, content: str | None = None) -> str | None:
    """Why ``source``'s outputs would replace those an earlier run made in ``out_dir`` from another input of the
    same name stem (``site1/scan.tif``, then ``site2/scan.tif``, or ``x.tif`` then ``x.nii.gz``), or None.  Within
    one batch such a clash is refused; across runs the earlier input's outputs had been replaced without a word.
    The same file moved (another path, the same content, ``content`` if known) is the same input.  Plain files
    only: a series, a case's channel files, a STAC item or a URL is named otherwise."""
    if isinstance(source, (SeriesRef, ChannelFiles, MosaicRef)) or is_url(str(source)) or \
            is_item_path(str(source)):
        return None
    from storage.provenance import read_sidecar

    stem = input_stem(source)
    sidecar = Path(out_dir) / f"{stem}.provenance.json"
    if not sidecar.is_file():
        return None
    try:
        earlier = read_sidecar(sidecar).get("input") or {}
    except SegflowError:  # a damaged record: the run replaces it, as before
        return None
    path, digest = earlier.get("path"), earlier.get("sha256")
    if not isinstance(path, str) or not path or is_url(path) or not isinstance(digest, str):
        return None
    here = Path(str(source))
    if os.path.abspath(path) == os.path.abspath(here) or same_file(Path(path), here):
        return None
    try:
        if (content or sha256_input(here)) == digest:
            return None
    except OSError:
        return None  # unreadable: reading it says why
    return (f"{Path(out_dir) / stem}.* are the outputs of another input, {path} (so says {sidecar.name}), which "
            f"its outputs would replace: choose another --out, or delete those to replace them")


def input_files(source: Any) -> list[Path]:
    """The local files a run reads for ``source``: a series' slices, a mosaic's tiles, an Analyze pair's two."""
    if isinstance(source, (SeriesRef, ChannelFiles)):
        return list(source.files)
    if isinstance(source, MosaicRef):
        return [Path(t) for t in source.tiles if not is_url(str(t))]
    if is_url(str(source)):
        return []
    path = Path(source)
    if is_item_path(path):  # its band files: an item whose id is an asset's stem, segmented into their folder
        return [path, *sorted(local_asset_files(path))]
    if path.suffix.lower() == ".vrt":  # its sources: scene.vrt beside scene.tif, segmented into that folder
        return [path, *_vrt_sources(path)]
    return [path] + ([path.with_suffix(".img")] if path.suffix.lower() == ".hdr" else [])


def own_files(source: Any) -> list[Path]:
    """The files an input is made of, less what a VRT or STAC item names (:mod:`storage.sources` checks those
    before GDAL opens the VRT to list them)."""
    if isinstance(source, (str, Path)) and not is_url(str(source)) and (
            is_item_path(Path(source)) or Path(source).suffix.lower() == ".vrt"):
        return [Path(source)]
    return input_files(source)


def _vrt_sources(path: Path) -> list[Path]:
    """The local files a VRT reads, as GDAL lists them; none when it does not open (its run says why)."""
    import rasterio

    try:
        with rasterio.open(path) as src:
            return [Path(f) for f in src.files if Path(f) != path and not f.startswith("/vsi")]
    except Exception:  # noqa: BLE001 - rasterio and GDAL raise several types for a VRT that does not open
        return []


def output_names(source: Any, *, split_by_tile: bool = False) -> list[str]:
    """Every name a run of ``source`` may write in OUT (:data:`OUTPUT_SUFFIXES`, and a mosaic's cuts)."""
    names = [input_stem(source) + suffix for suffix in OUTPUT_SUFFIXES]
    if isinstance(source, MosaicRef) and split_by_tile:
        names += [stem_of(t) + suffix for t in source.tiles for suffix in (".tif", ".qml")]
    return names


def forged_problem(item: Any, header: Any) -> str | None:
    """Why an input's files declare far more samples than their bytes hold
    (:func:`storage.inputfiles.expansion_problem`); a VRT is not asked, its pixels being in other files."""
    from storage.inputfiles import expansion_problem

    if str(item).lower().endswith(".vrt"):
        return None
    return expansion_problem(header.shape, header.channels, input_files(item))


def check_named_sources(item: Any, roots: "list[Path] | None" = None, origin: str | None = None) -> None:
    """Refuse a VRT or STAC item naming a source GDAL must not open for it (:mod:`storage.sources`), before
    GDAL opens it: ``roots`` limits local sources to those folders (``nightly``'s inbox).  A STAC item's
    assets are checked against the always-refused ones when planned (``storage.stacassets.plan_item``), so
    here only for ``roots``."""
    from storage.remote import is_url
    from storage.sources import check_sources, vrt_sources
    from storage.stacitem import is_item_path

    if not isinstance(item, (str, Path)) or is_url(str(item)):  # a DICOM series, a case's channel files; a URL
        return  # is checked as its staged copy
    if str(item).lower().endswith(".vrt"):
        check_sources(item, vrt_sources(item), roots)
    elif roots is not None and is_item_path(item):
        from storage.stacassets import item_sources

        check_sources(item, item_sources(item, origin), roots)


def output_name(input_path: Any, kind: str) -> str:
    return input_stem(input_path) + (".tif" if kind == "raster" else ".nii.gz")


def ingest_input(path: Any, work_dir: str | Path, chunk: int | None = None,
                 bands: BandRequest | None = None, origin: str | None = None) -> tuple[ImageStore, bool]:
    """The input's image store, and whether it was reused: a complete earlier ingest of the same content is.

    The store's name holds the chunk size asked for, and it is only reused
    when it carries its completion marker and its recorded sha256 and file are
    those of ``path`` now, so a half-written or stale ingest is never used.
    """
    kind = "mosaic" if isinstance(path, MosaicRef) else "image"  # a mosaic never shares a store with a tile
    store_path = Path(work_dir) / f"{input_stem(path)}.c{chunk or 'default'}.{kind}.zarr"
    reusable = _reusable_ingest(path, store_path, bands, origin)
    if reusable is not None:
        say(f"{input_label(path)}: reusing its complete ingest from an interrupted run", logging.INFO)
        return reusable, True
    store_path.parent.mkdir(parents=True, exist_ok=True)
    ingest(path, store_path, chunk=chunk, bands=bands, origin=origin)
    return open_image_store(store_path), False


def _reusable_ingest(path: Any, store_path: Path, bands: BandRequest | None = None,
                     origin: str | None = None) -> ImageStore | None:
    if isinstance(path, SeriesRef):
        return _reusable_series(path, store_path)
    if isinstance(path, MosaicRef):
        return _reusable_mosaic(path, store_path)
    if isinstance(path, ChannelFiles):
        return _reusable_channels(path, store_path)
    if not store_path.is_dir() or not path.is_file():
        return None
    try:
        store = open_image_store(store_path)
        source = store.meta.source
        same = os.path.samefile(source.path, path)
        now = reuse_sha256(path, bands, origin) if is_item_path(path) else sha256_input(path)  # an item: with its assets
        if same and source.size == path.stat().st_size and source.sha256 == now:
            return store
    except (StoreError, OSError, ValueError):
        pass
    shutil.rmtree(store_path, ignore_errors=True)
    return None


def _reusable_mosaic(ref: MosaicRef, store_path: Path) -> ImageStore | None:
    """A complete ingest of the same mosaic: the same tiles' content (sha256, in order) and target CRS."""
    return _reusable_store(store_path, lambda store: is_mosaic_store(store, ref))


def _reusable_channels(ref: ChannelFiles, store_path: Path) -> ImageStore | None:
    """A complete ingest of the same channel files with the same contents, in the same order."""
    return _reusable_store(store_path, lambda store: is_channel_store(store, ref))


def _reusable_series(ref: SeriesRef, store_path: Path) -> ImageStore | None:
    """A complete ingest of the same series volume with the same file contents."""
    def same(store: ImageStore) -> bool:
        info = getattr(store.meta.geometry, "dicom", None)
        return info is not None and info.series_instance_uid == ref.series_instance_uid and \
            store.meta.source.sha256 == ref.sha256()

    return _reusable_store(store_path, same)


def _reusable_store(store_path: Path, same: Callable[[ImageStore], bool]) -> ImageStore | None:
    """The complete store at ``store_path`` when ``same`` says it holds this input now; else it is removed (a
    file gone or unreadable is not reused: the new ingest says what is wrong in one line)."""
    if not store_path.is_dir():
        return None
    try:
        store = open_image_store(store_path)
        if same(store):
            return store
    except (SegflowError, OSError, ValueError):
        pass
    shutil.rmtree(store_path, ignore_errors=True)
    return None


__all__ = ["Expanded", "GROUPS", "MAX_STEM_BYTES", "OUTPUT_SUFFIXES", "expand", "ingest_input", "input_files",
           "input_label",
           "input_stem", "output_names", "same_file",
           "name_too_long", "output_clashes", "output_name", "outputs_of_another", "overwritten_input"]
