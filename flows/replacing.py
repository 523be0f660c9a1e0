"""How a run's outputs replace an earlier run's of the same name, so that OUT always matches one provenance.

A rerun with other options writes over the outputs an earlier run left under
the same stem.  Before the first of its outputs is written, the earlier
outputs it may replace (those the earlier sidecar lists) are set aside under
hidden names (``OUT/.<name>.previous``, as the sidecar itself is retired):
if the run fails, what it wrote goes and they are put back, so a failed rerun
leaves the earlier complete outputs as they were (it had left the earlier
sidecar, zarr and STAC item standing without their label map).  If it
succeeds, those it wrote again are dropped, and those it did not write
(stale: a probability COG, polygons of other options) are removed when they
still hold what the earlier sidecar recorded, or put back with a warning
when someone changed them since.  A file under an output's name that no
earlier sidecar lists (someone else's) is set aside too: a failed run puts it
back, and a run that writes that name replaces it, saying so.  A QGIS style
(``.qml``) of the user's, or segflow's edited since its run, is kept instead,
and the run writes none (:data:`KEPT_SUFFIXES`).

A sidecar is JSON anyone may edit or copy in, so only this input's output
names (:func:`flows.inputs.output_names`) are touched, never a file the run
reads.  A marker (``OUT/.<stem>.exporting.json``) lists the output names
already present when a run's export starts; a run killed while exporting
leaves it, and the next run of the stem removes what the killed run wrote
under the other names (listed nowhere, they had survived a rerun and looked
like part of it), then puts back what the killed run had set aside.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.inputs import input_files, input_stem, output_names, same_file
from flows.progress import say
from storage import provenance
from storage.atomic import write_text_atomically
from storage.errors import ProvenanceError

ASIDE_SUFFIX = ".previous"
# a user's own file of these names is kept, and the run writes none: QGIS saves a layer's default style as
# <stem>.qml beside <stem>.tif ("Save as Default"), which a rerun must not replace with segflow's plain one
KEPT_SUFFIXES = (".qml",)


def aside_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{ASIDE_SUFFIX}")


def marker_path(out_dir: Path, stem: str) -> Path:
    return out_dir / f".{stem}.exporting.json"


def remove_path(path: Path) -> None:
    """Remove a file, link or directory tree; a link to a directory is unlinked, never followed."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@dataclass
class Replacing:
    """One run's replacement of the earlier outputs of its stem: begun before its first output is written."""

    out_dir: Path
    source: Any
    split_by_tile: bool
    earlier: dict[str, str] = field(default_factory=dict)  # name -> the sha256 the earlier sidecar recorded
    aside: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)  # set aside, though no earlier sidecar lists them

    @property
    def names(self) -> list[str]:
        """This input's output names, less its sidecar (retired and restored on its own: storage.provenance)."""
        sidecar = input_stem(self.source) + ".provenance.json"
        return [n for n in output_names(self.source, split_by_tile=self.split_by_tile) if n != sidecar]

    def _ours(self, path: Path) -> bool:
        """A name this input's outputs have, not a link, and no file the run reads."""
        return not path.is_symlink() and not any(same_file(path, r) for r in input_files(self.source))

    def begin(self, out_path: Path) -> None:
        """Undo what a run killed while exporting left, then set the earlier outputs aside and mark the export."""
        self.earlier = earlier_outputs(out_path)
        allowed = set(self.names)
        marker = marker_path(self.out_dir, input_stem(self.source))
        killed, killed_foreign = _read_marker(marker)
        for name in killed_foreign & allowed:  # someone else's file the killed run had set aside: back first
            path, aside = self.out_dir / name, aside_path(self.out_dir / name)
            if aside.is_file() and not aside.is_symlink():
                remove_path(path)
                aside.rename(path)
        if killed is not None:  # a killed export: what it wrote under names not there before it is listed nowhere
            for name in allowed - killed - killed_foreign - set(self.earlier):
                path = self.out_dir / name
                if (path.exists() or path.is_symlink()) and self._ours(path):
                    remove_path(path)
        for name in sorted(allowed):
            path, aside = self.out_dir / name, aside_path(self.out_dir / name)
            if aside.exists() and name in self.earlier:  # set aside by the killed run: still the earlier output
                remove_path(path)
                self.aside.append(name)
            elif aside.exists():
                remove_path(aside)
            elif name.endswith(KEPT_SUFFIXES) and path.is_file() and not _holds(path, self.earlier.get(name)):
                continue  # the user's own style, or segflow's edited since: kept, and the export writes none
            elif name in self.earlier and self._ours(path) and (path.is_file() or _segflow_store(path)):
                path.rename(aside)  # a folder of someone else's under an output's name stays, and fails the write
                self.aside.append(name)
            elif name not in self.earlier and self._ours(path) and path.is_file():
                path.rename(aside)
                self.foreign.append(name)
        present = sorted(n for n in allowed if (self.out_dir / n).exists())
        write_text_atomically(marker, json.dumps({"present": present, "foreign": self.foreign}), "export marker")

    def failed(self) -> None:
        """The run failed after :meth:`begin` (its own outputs already removed): put the earlier ones back."""
        for name in [*self.aside, *self.foreign]:
            path = self.out_dir / name
            remove_path(path)
            aside_path(path).rename(path)
        self.aside, self.foreign = [], []
        marker_path(self.out_dir, input_stem(self.source)).unlink(missing_ok=True)

    def succeeded(self, written: list[Path]) -> None:
        """Drop what this run wrote again; of the rest, remove what still holds what the earlier sidecar
        recorded (a zarr store: a segflow store), and put back, with a warning, what was changed since."""
        now = {Path(p).name for p in written}
        for name in self.aside:
            path, aside = self.out_dir / name, aside_path(self.out_dir / name)
            if name in now:
                remove_path(aside)
                continue
            if _holds(aside, self.earlier.get(name)):
                remove_path(aside)
            else:
                remove_path(path)
                aside.rename(path)
                say(f"{path}: an earlier run's output of this name has changed since it was written; left in "
                    "place, and not among this run's outputs", logging.WARNING)
        for name in self.foreign:
            path, aside = self.out_dir / name, aside_path(self.out_dir / name)
            if name in now:
                remove_path(aside)
                say(f"{path}: replaced a file of this name that no earlier segflow run had written",
                    logging.WARNING)
            else:
                remove_path(path)
                aside.rename(path)
        self.aside, self.foreign = [], []
        marker_path(self.out_dir, input_stem(self.source)).unlink(missing_ok=True)


def earlier_outputs(out_path: Path) -> dict[str, str]:
    """The outputs the sidecar already beside ``out_path`` lists (an earlier run's of the same name), and those
    of a sidecar a killed run had retired (:func:`storage.provenance.retire_sidecar`), with their recorded sha256."""
    names: dict[str, str] = {}
    for path in (provenance.sidecar_path(out_path), provenance.retired_path(out_path)):
        try:
            record = provenance.read_sidecar(path)
        except (ProvenanceError, OSError):
            continue
        for name, digest in (record.get("outputs") or {}).items():
            if provenance.is_output_name(name) and isinstance(digest, str):
                names.setdefault(name, digest)
    return names


def _holds(path: Path, digest: str | None) -> bool:
    """Whether an output still holds what its sidecar recorded (a zarr store: one segflow committed)."""
    if path.is_dir():
        return path.name.removesuffix(ASIDE_SUFFIX).endswith(".zarr") and _segflow_store(path)
    try:
        return digest is not None and provenance.sha256_output(path) == digest
    except OSError:
        return False


def _segflow_store(path: Path) -> bool:
    import zarr

    from storage.layout import PROVENANCE_ATTR

    try:
        return PROVENANCE_ATTR in zarr.open_group(str(path), mode="r").attrs
    except Exception:  # noqa: BLE001 - not a zarr group, or unreadable: not ours to remove
        return False


def _read_marker(marker: Path) -> tuple[set[str] | None, set[str]]:
    """A killed export's names present before it began (None: no marker), and those it set aside as others'."""
    try:
        doc = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None, set()
    doc = doc if isinstance(doc, dict) else {}
    present, foreign = doc.get("present"), doc.get("foreign")
    return ({str(n) for n in present} if isinstance(present, list) else set(),
            {str(n) for n in foreign} if isinstance(foreign, list) else set())


__all__ = ["ASIDE_SUFFIX", "KEPT_SUFFIXES", "Replacing", "aside_path", "earlier_outputs", "marker_path", "remove_path"]
