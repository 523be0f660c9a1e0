"""The ``segflow model`` sub-command group: ``model inspect`` and ``model convert``.

Models made elsewhere (MONAI bundles, checkpoints, TorchScript, STAC MLM
items) are inspected and converted into segflow model directories here; the
group is its own ``typer.Typer`` (``model_app``), which ``flows/cli.py`` adds
to the ``segflow`` app as ``model``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from flows import cliopts, cliutil
from storage.errors import SegflowError

console, out = cliutil.console, cliutil.out
model_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Inspect and convert models.")


@model_app.command("inspect")
def model_inspect(path: Path = typer.Argument(..., readable=False,
                                              help="Model directory, MONAI bundle or TorchScript archive."),
                  trust_bundle: cliopts.TrustBundle = False,
                  stac: bool = typer.Option(False, "--stac", help="Print the model as a STAC item with the "
                                                                  "Machine Learning Model extension instead.")) -> None:
    """Print a model card (for a bundle: the card segflow maps it to), or with --stac the model as an MLM item.

    The model is loaded as `segment` loads it: weights `segment` would refuse (a pickle checkpoint, a truncated
    file, tensors that do not fit the card's architecture) are one error line and exit 1.
    """
    from flows.inspect import inspect_model, model_stac

    try:
        if stac:
            out.print_json(json.dumps(model_stac(path, trust_bundle=trust_bundle)))
            return
        card = inspect_model(path, trust_bundle=trust_bundle).card
    except SegflowError as exc:
        cliutil.fail(str(exc), 1)
    out.print_json(card.model_dump_json())


AXIS_ORDER_NOTE = ("segflow gives the network its windows in storage order: (k, j, i) of a NIfTI, (row, col) of a "
                   "raster, as nnU-Net (SimpleITK) and torchgeo (rasterio) load them; a network trained on MONAI's "
                   "loading (i, j, k) would see them transposed, and its labels differ: convert it with --axes ijk")


@model_app.command("convert")
def model_convert(src: Path = typer.Argument(..., readable=False, help="MONAI bundle directory, state_dict checkpoint "
                                                       "(.pt/.pth/.bin/.safetensors), TorchScript archive, or a "
                                                       "STAC item (.json) with the MLM extension whose mlm:model "
                                                       "asset is such a weights file."),
                  out: Path = typer.Option(..., "--out", help="Model directory to write."),
                  card: Optional[Path] = typer.Option(None, "--card", help="Model card JSON: the architecture of a "
                                                                           "checkpoint, or the input, classes and "
                                                                           "inference of a bundle segflow cannot "
                                                                           "map."),
                  trust_bundle: cliopts.TrustBundle = False,
                  axes: str = typer.Option("kji", "--axes",
                                           help="The order the weights file's network saw its windows in: kji "
                                                "(segflow's storage order: segflow train, nnU-Net, torchgeo) or ijk "
                                                "(MONAI's, x first; the card's roi, spacing and per-axis arguments "
                                                "then read x first too, and the kernels are permuted).")) -> None:
    """Make a segflow model directory (card.json + weights.safetensors) from weights made elsewhere."""
    from segmentation.mlm import convert_item, looks_like_item
    from segmentation.modeldir import convert_model, read_card

    cliutil.local_only(out, "--out")
    try:
        if axes != "kji" and (looks_like_item(src) or src.is_dir()):
            cliutil.fail(f"{src}: --axes applies to a weights file with --card; a bundle's or an item's axis order is "
                         "known")
        if looks_like_item(src):  # an MLM item: the card comes from the item, the weights from its model asset
            if card is not None:
                cliutil.fail(f"{src}: an MLM item describes its model itself; --card applies to weights files")
            loaded, notes = convert_item(src, out, trust_bundle=trust_bundle)
        else:
            given = read_card(card) if card is not None else None
            loaded, notes = convert_model(src, out, card=given, trust_bundle=trust_bundle, axes=axes)
            if given is not None and loaded.source == "segflow" and axes == "kji":  # nothing says its axis order
                notes = [*notes, AXIS_ORDER_NOTE]
    except SegflowError as exc:
        cliutil.fail(str(exc))
    for note in notes:
        console.print(f"[yellow]note:[/yellow] {note}", highlight=False, soft_wrap=True)
    console.print(f"converted {src} -> {loaded.path} ({loaded.card.architecture.name}, "
                  f"{loaded.weights_path.name if loaded.weights_path else ''} sha256 {loaded.weights_sha256[:12]}…)",
                  highlight=False, soft_wrap=True)
