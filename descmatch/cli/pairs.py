"""descmatch pairs: choose the image pairs to match, in the grammar every command's --pairs
takes (exhaustive, sequential:K, sequential:K+loops:N, retrieval:K, or a pairs file)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .app import app, say
from .options import PAIRS_HELP


def _is_features_file(spec: str) -> bool:
    p = Path(spec)
    return p.is_file() and p.suffix.lower() in (".h5", ".hdf5")


@app.command("pairs")
def pairs_cmd(
    source: Annotated[
        str,
        typer.Argument(
            help="features.h5 (needed for retrieval:K and loop closure), or images: folder, "
            "glob, image list."
        ),
    ],
    output: Annotated[Path, typer.Argument(help="Pairs file to write ('name0 name1' lines).")],
    pairs: Annotated[str, typer.Option("--pairs", help=PAIRS_HELP)] = "exhaustive",
    words: Annotated[
        int,
        typer.Option(
            "--words",
            min=1,
            max=1024,
            help="Retrieval: k-means codebook size, learned on the collection (at most 1024, "
            "and one word per 16 sampled descriptors).",
        ),
    ] = 64,
    seed: Annotated[int, typer.Option("--seed", help="Retrieval: codebook seed.")] = 0,
) -> None:
    """Choose the image pairs to match: exhaustive, sequential (with retrieval loop closure)
    or by image retrieval (VLAD over a k-means codebook of the collection's own descriptors).
    """
    from ..errors import InputError
    from ..h5 import Reader
    from ..images import list_images
    from ..outputs import refuse_inputs
    from ..pairs import pairs_for, write_pairs

    features = source if _is_features_file(source) else None
    refuse_inputs(output, (source, pairs) if Path(pairs).is_file() else (source,), "pairs file")
    if features is not None:
        with Reader(features, "features") as r:
            names = sorted(r.keys)
    else:
        names = list_images(source).names
    needs_descriptors = pairs.startswith("retrieval") or "+loops:" in pairs
    if needs_descriptors and features is None:
        raise InputError(
            f"{source}: --pairs {pairs} needs a features.h5 with descriptors (descmatch "
            "extract IMAGES features.h5)"
        )
    chosen = pairs_for(pairs, names, features, seed=seed, words=words)
    write_pairs(output, chosen)
    say(f"{output}: {len(chosen)} pairs of {len(names)} images ({pairs})")
