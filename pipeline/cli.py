"""The `clipda` command line: one thin Typer command per stage.

Heavy imports (torch, transformers, ...) live inside the commands so that `--help` is
instant. A `UserError` (or a missing file / bad value named by the user) prints one line
on stderr and exits with code 2; bugs keep their traceback.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer

from pipeline.errors import UserError

app = typer.Typer(
    help="clipda: adapt CLIP to image captioning and VQA, stage by stage (see dvc.yaml).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

@app.callback()
def main() -> None:
    """clipda: adapt CLIP to image captioning and VQA, stage by stage (see dvc.yaml)."""


ParamsOpt = Annotated[Path, typer.Option("--params", help="params file to read defaults from")]


def one_line_errors(fn):
    """Turn user mistakes into `error: ...` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (UserError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper


def pick(value, params: dict, key: str, default=None):
    """CLI option if given, else params.yaml, else the code default."""
    if value is not None:
        return value
    return params.get(key, default)


@app.command()
@one_line_errors
def synth(
    out: Annotated[Path | None, typer.Option(help="output folder")] = None,
    seed: Annotated[int | None, typer.Option(help="random seed")] = None,
    params: ParamsOpt = Path("params.yaml"),
):
    """Generate the sample world: Visual Genome, LAION (img2dataset) and Flickr30k folders."""
    from pipeline.params import load_params
    from pipeline.synth.world import generate

    p = load_params("synth", params)
    out = Path(pick(out, p, "out", "data/sample"))
    seed = int(pick(seed, p, "seed", 0))
    summary = generate(out, seed=seed, params=p)
    typer.echo(summary)


@app.command("prepare-vqa")
@one_line_errors
def prepare_vqa(
    vg: Annotated[Path | None, typer.Option(help="Visual Genome folder (JSON + VG_100K*)")] = None,
    out: Annotated[Path | None, typer.Option(help="output folder for the QA parquet")] = None,
    params: ParamsOpt = Path("params.yaml"),
):
    """Build relation/object QA parquet splits + answer vocabulary from Visual Genome JSON."""
    from pipeline.params import load_params
    from pipeline.prepare_vqa import run, summary

    p = load_params("prepare_vqa", params)
    vg = Path(pick(vg, p, "vg", "data/sample/vg"))
    out = Path(pick(out, p, "out", "data/qa"))
    typer.echo(summary(run(vg, out, p)))


if __name__ == "__main__":
    app()
