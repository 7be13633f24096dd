"""`patchcore weights list | fetch`: which backbones' ImageNet weights are present, and fetching torchvision's."""
from __future__ import annotations

import json
from typing import Annotated

import typer

from ..helptext import Typer

app = Typer()
weights_app = Typer(help="Backbone ImageNet weights: list what is present, fetch torchvision's (hash-checked).",
                    no_args_is_help=True)
app.add_typer(weights_app, name="weights")


@weights_app.command("list")
def weights_list() -> None:
    """One JSON line per backbone: present or not, its file, how to get it; then what --backbone auto picks."""
    from scorer.backbones import BACKBONES, BackboneError, default_weights_path, fetch_hint, resolve_backbone

    for name in BACKBONES:
        path = default_weights_path(name)
        typer.echo(json.dumps({"backbone": name, "present": path.is_file(), "path": str(path),
                               "get": None if path.is_file() else fetch_hint(name)}))
    try:
        choice = resolve_backbone()
        typer.echo(json.dumps({"auto": choice.name, "why": choice.reason}))
    except BackboneError as exc:
        typer.echo(json.dumps({"auto": None, "why": str(exc)}))


@weights_app.command("fetch")
def weights_fetch(
    name: Annotated[str, typer.Argument(help="Backbone: wide_resnet50_2, resnet18, resnet50 or mobilenet_v2.")],
    force: Annotated[bool, typer.Option(help="Download again even if a good file is present.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Download torchvision's ImageNet weights (IMAGENET1K_V1) into the torch hub cache, checked against the
    sha256 prefix in the file name; a mismatch or an interrupted download leaves no file."""
    from scorer.backbones import BackboneError
    from scorer.weights import WeightsFetchError, fetch_weights

    try:
        result = fetch_weights(name, force=force, progress=progress)
    except (BackboneError, WeightsFetchError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    typer.echo(json.dumps({"backbone": result.name, "path": str(result.path), "sha256": result.sha256,
                           "downloaded": result.downloaded}))
