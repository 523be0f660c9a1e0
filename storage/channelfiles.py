"""nnU-Net's one file per channel: ``case_0000.nii.gz`` ... ``case_000K.nii.gz`` are one input.

nnU-Net (and the Medical Segmentation Decathlon data converted for it) keeps
each channel of a multi-channel case in a file of its own: a brain tumour case
is ``BraTS_001_0000.nii.gz`` (T1), ``_0001`` (T1ce), ``_0002`` (T2) and
``_0003`` (FLAIR).  ``segflow train --dataset`` reads that layout, so a model
trained on it is applied to the same files: :func:`group_channel_files` turns
the files of a case named together (``imagesTs/*.nii.gz``, an inbox) into one
:class:`ChannelFiles` input, channels in file order, named after the case as
nnU-Net names its prediction (``BraTS_001.nii.gz``).  Only a whole case is
grouped (``_0000`` up, no gap): a lone ``_0000`` file, or one-channel scans
numbered like channels (``amos_0001``, ``amos_0004``), stay plain inputs, and
the model's refusal of a one-channel file of a multi-channel case says which
files to give together.  The files must share one voxel grid (shape and affine), as nnU-Net
requires; ingest copies each into its channel of one image store, slab by
slab, and records every file with its sha256 for provenance and ``verify``.
"""

from __future__ import annotations

import hashlib
import os
import re
from contextlib import ExitStack
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Collection, Sequence

import numpy as np

from storage.errors import InvalidInputError
from storage.geometry import SourceInfo, same_affine
from storage.hashing import sha256_input

CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})(?P<ending>\.nii(?:\.gz)?)$", re.IGNORECASE)
FORMAT = "NIfTI channel files"
ATTR = "segflow_channel_files"  # the image store's record of its files: [{channel, path, sha256, size}]


@dataclass(frozen=True)
class ChannelFiles:
    """One case's channel files, in channel order (``files[c]`` is ``<case>_<c:04d>``): the unit segflow segments."""

    case: str
    files: tuple[Path, ...]

    @property
    def name(self) -> str:
        """The outputs' stem: the case, as nnU-Net names its prediction."""
        return self.case

    @property
    def display(self) -> str:
        """How messages and the provenance name the case: its folder, case and channel range."""
        ending = CHANNEL_FILE.match(self.files[0].name)["ending"]  # type: ignore[index]
        return f"{self.files[0].parent / self.case}_0000..{len(self.files) - 1:04d}{ending}"

    def file_sha256s(self) -> list[str]:
        return [sha256_input(f) for f in self.files]

    def sha256(self, file_sha256s: list[str] | None = None) -> str:
        """Content identity: one digest over the files' sha256s in channel order (the order is the input)."""
        digest = hashlib.sha256(b"channel-files\n")
        for value in file_sha256s if file_sha256s is not None else self.file_sha256s():
            digest.update(value.encode("ascii") + b"\n")
        return digest.hexdigest()


def group_channel_files(items: Sequence[Any], takes: Collection[int] | None = None) -> list[Any]:
    """The items with each whole case's channel files made one :class:`ChannelFiles`, where its first file was.

    A whole case is two or more local NIfTI files of one folder (as resolved: ``a/x_0000`` and ``/abs/a/x_0001``
    are one case) numbered ``_0000`` up without a gap; any other numbered files stay plain inputs: a dataset of
    one-channel scans numbered ``amos_0001``, ``amos_0004`` (AMOS, WORD) is not a case with channels missing.
    ``takes``: the channel counts of the models that may segment them; a case of K files stays K plain inputs
    when no model takes K channels and one takes 1 (``word_0000`` ... ``word_0002`` before a one-channel model).
    """
    cases: dict[tuple[str, str], dict[int, str]] = {}
    for item in items:
        key_channel = _channel_key(item)
        if key_channel is not None:
            key, channel = key_channel
            files = cases.setdefault(key, {})
            files.setdefault(channel, item)  # a second spelling of one file is the same channel
    groups = {key: files for key, files in cases.items()
              if len(files) > 1 and sorted(files) == list(range(len(files)))
              and (takes is None or len(files) in takes or 1 not in takes)}
    out: list[Any] = []
    seen: set[tuple[str, str]] = set()
    grouped = {os.path.realpath(f) for files in groups.values() for f in files.values()}
    for item in items:
        key_channel = _channel_key(item)
        key = key_channel[0] if key_channel is not None else None
        if key not in groups or os.path.realpath(item) not in grouped:  # x_0000.nii beside x_0000.nii.gz: its own
            out.append(item)
        elif key not in seen:
            seen.add(key)
            files = groups[key]  # type: ignore[index]
            out.append(ChannelFiles(case=key[1], files=tuple(Path(files[c]) for c in range(len(files)))))
    return out


def case_of(item: str) -> tuple[str, str] | None:
    """(folder, case) of a local channel file, the case it may belong to; None for any other item."""
    key_channel = _channel_key(item)
    return None if key_channel is None else key_channel[0]


def _channel_key(item: Any) -> tuple[tuple[str, str], int] | None:
    from storage.remote import is_url

    if not isinstance(item, str) or is_url(item):
        return None
    path = Path(item)
    match = CHANNEL_FILE.match(path.name)
    if match is None or not path.is_file():
        return None
    return (str(path.parent.resolve()), match["case"]), int(match["channel"])


def check_grid(ref: ChannelFiles, files: Sequence[tuple[Path, Any, int]]) -> None:
    """Every file of the case one channel on the first file's voxel grid: ``files`` is [(path, geometry, channels)]."""
    first, first_geometry, _ = files[0]
    for path, geometry, channels in files:
        if channels != 1:
            raise InvalidInputError(path, f"has {channels} channels: nnU-Net channel files hold one each "
                                          f"(it is one of {ref.display})")
        if geometry.shape[:3] != first_geometry.shape[:3]:
            raise InvalidInputError(path, f"has shape {tuple(geometry.shape[:3])} but {first.name} has "
                                          f"{tuple(first_geometry.shape[:3])}: one case's channel files share "
                                          "one voxel grid")
        if not same_affine(geometry.affine, first_geometry.affine):
            raise InvalidInputError(path, f"is not on {first.name}'s voxel grid (their affines differ): one case's "
                                          "channel files share one voxel grid")


def stored_dtype(dtypes: Sequence[np.dtype]) -> np.dtype:
    """One dtype that holds every channel's values: float32 where they mix integers and floats (as a scaled
    NIfTI is read), float64 only when a file holds float64."""
    result = np.result_type(*dtypes)
    if result == np.float64 and not any(d == np.float64 for d in dtypes):
        return np.dtype("float32")
    return result


def ingest_channel_files(ref: ChannelFiles, store_path: str | PathLike[str], *, chunk: int = 128) -> Any:
    """Copy each channel file into its channel of a new image store, slab by slab (no volume held whole)."""
    from storage.layout import StoreMeta
    from storage.nifti import open_volume, write_volume_store

    if chunk < 1:
        raise ValueError(f"chunk must be positive, got {chunk}")
    with ExitStack() as stack:
        volumes = [open_volume(path, stack) for path in ref.files]
        check_grid(ref, [(v.path, v.geometry, v.channels) for v in volumes])
        stored = stored_dtype([np.dtype(v.geometry.dtype) for v in volumes])
        digests = ref.file_sha256s()
        sizes = [path.stat().st_size for path in ref.files]
        meta = StoreMeta(source=SourceInfo(path=str(ref.files[0].resolve()), sha256=ref.sha256(digests),
                                           size=sum(sizes), format=FORMAT),
                         geometry=volumes[0].geometry.model_copy(update={"dtype": stored.name}),
                         channel_names=[f"channel{c}" for c in range(len(ref.files))], spatial_dims=3)
        files = [{"channel": c, "path": str(path.resolve()), "sha256": digest, "size": size}
                 for c, (path, digest, size) in enumerate(zip(ref.files, digests, sizes))]
        return write_volume_store(store_path, meta, volumes, stored, chunk, attrs={ATTR: files})


@dataclass(frozen=True)
class Grid:
    """What :func:`check_grid` reads of a file's geometry (a probe has it from the header alone)."""

    shape: list[int]
    affine: Any


def is_channel_store(store: Any, ref: ChannelFiles) -> bool:
    """Whether an image store is a complete ingest of these channel files as they are now."""
    source = store.meta.source
    return source.format == FORMAT and source.sha256 == ref.sha256()


__all__ = ["ATTR", "CHANNEL_FILE", "ChannelFiles", "FORMAT", "Grid", "case_of", "check_grid", "group_channel_files",
           "ingest_channel_files", "is_channel_store"]
