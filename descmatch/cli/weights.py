"""descmatch weights (list, import) and descmatch examples."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .app import app, out, say

weights_app = typer.Typer(
    help="List the shipped weights (name, net, training data, sha256, headline metric); "
    "`weights import` converts published weight files.",
)
app.add_typer(weights_app, name="weights")


@weights_app.callback(invoke_without_command=True)
def weights_cmd(ctx: typer.Context) -> None:
    """List the shipped weights: name, net, training data, sha256, headline metric."""
    if ctx.invoked_subcommand is not None:
        return
    from ..weights import default_method, list_weights, weights_dir

    items = list_weights()
    if not items:
        say(
            f"no trained weights ship in {weights_dir()}: --method auto uses rootsift. "
            "Train with `descmatch train --method hardnet`."
        )
        return
    default = default_method()
    table = Table("name", "net", "trained on", "sha256", "headline", title=str(weights_dir()))
    for w in items:
        mark = " (default)" if w.name == default else ""
        table.add_row(w.name + mark, w.net, w.data, w.sha256[:16], w.metric)
    out.print(table)


@weights_app.command("import")
def weights_import_cmd(
    source: Annotated[
        Path,
        typer.Argument(
            help="A published weight file: HardNet's (DagnyT/hardnet), SOSNet's (the 32x32 "
            "model) or a state dict saved from kornia's HardNet or SOSNet."
        ),
    ],
    net: Annotated[str, typer.Option("--net", help="The net the file holds: hardnet or sosnet.")],
    out_path: Annotated[
        Path | None,
        typer.Option("--out", help="Checkpoint to write (default: weights/NET-<file name>.pt)."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing checkpoint.")
    ] = False,
) -> None:
    """Convert a published weight file into a descmatch checkpoint for --weights (read as
    tensors only; records the file's name and sha256)."""
    from ..weights_import import import_weights

    path = import_weights(source, net, out_path, overwrite)
    say(f"wrote {path}: {net} from {source.name}; use it with --method {net} --weights {path}")


@app.command("examples")
def examples_cmd(
    folder: Annotated[Path, typer.Argument(help="Folder to copy the example images into.")],
) -> None:
    """Copy the example images that ship with descmatch (a synthetic scene, 3 views)."""
    from ..examples import copy_examples

    files = copy_examples(folder)  # OutputError: a file in the way, or not writable
    n = sum(1 for f in files if not f.name.startswith("H_"))
    say(
        f"{folder}: {n} example images and {len(files) - n} homographies (H_1_i: view-1 "
        "pixels to view-i pixels)"
    )


# -- structure from motion ------------------------------------------------------------------
