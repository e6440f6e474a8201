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


@app.command("clip-bootstrap")
@one_line_errors
def clip_bootstrap(
    laion: Annotated[Path | None, typer.Option(help="img2dataset shards (tar + parquet)")] = None,
    flickr30k: Annotated[
        Path | None, typer.Option(help="Flickr30k folder (tokenizer texts; pairs if enabled)")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="output CLIP checkpoint folder")] = None,
    metrics: Annotated[Path | None, typer.Option(help="metrics JSON")] = None,
    plots: Annotated[Path | None, typer.Option(help="per-epoch TSV curve")] = None,
    pretrained: Annotated[
        str | None, typer.Option(help="hub id or folder to fine-tune / pass through")
    ] = None,
    finetune: Annotated[
        bool | None, typer.Option("--finetune/--no-finetune", help="fine-tune `pretrained`")
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="training epochs")] = None,
    params: ParamsOpt = Path("params.yaml"),
):
    """Train a small CLIP contrastively (or fine-tune / pass through a pretrained one)."""
    from pipeline.clip.bootstrap import run, summary
    from pipeline.params import load_params

    p = load_params("clip_bootstrap", params)
    laion = Path(pick(laion, p, "laion", "data/sample/laion"))
    flickr = pick(flickr30k, p, "flickr30k", "data/sample/flickr30k")
    out = Path(pick(out, p, "out", "models/clip"))
    metrics = Path(pick(metrics, p, "metrics", "metrics/clip.json"))
    plots = pick(plots, p, "plots", "metrics/plots/clip.tsv")
    p["pretrained"] = pick(pretrained, p, "pretrained", None)
    p["finetune"] = pick(finetune, p, "finetune", False)
    p["epochs"] = pick(epochs, p, "epochs", None)
    report = run(laion, Path(flickr) if flickr else None, out, metrics,
                 Path(plots) if plots else None, p)  # fmt: skip
    typer.echo(summary(report))


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


@app.command()
@one_line_errors
def embed(
    dataset: Annotated[str, typer.Option(help="vg | laion | flickr30k")],
    input: Annotated[
        Path | None, typer.Option("--input", help="dataset folder (vg: the data/qa folder)")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="output folder (data/emb/<dataset>)")] = None,
    model: Annotated[
        str | None, typer.Option(help="CLIP checkpoint: hub id or Hugging Face folder")
    ] = None,
    shard: Annotated[
        str | None, typer.Option(help="i/n: embed only shards k with k % n == i")
    ] = None,
    images: Annotated[
        Path | None, typer.Option(help="vg only: the Visual Genome folder holding VG_100K*/")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
):
    """Cache CLIP image/text embeddings of one dataset as Arrow shards (resumable)."""
    import time

    from pipeline.embed import DATASETS, parse_shard, run
    from pipeline.params import load_params

    if dataset not in DATASETS:
        raise UserError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    p = load_params("embed", params)
    inputs = p.get("inputs") or {}
    defaults = {"vg": "data/qa", "laion": "data/sample/laion", "flickr30k": "data/sample/flickr30k"}
    input = Path(input if input is not None else inputs.get(dataset, defaults[dataset]))
    out = Path(out if out is not None else Path(p.get("out_root", "data/emb")) / dataset)
    images = Path(pick(images, p, "vg_images", "data/sample/vg"))
    t0 = time.perf_counter()
    report = run(dataset, input, out, p, model=model, shard=parse_shard(shard), images_root=images)
    rows = " (written rows: whole images + question-box crops)" if report.extra.get("crops") else ""
    typer.echo(f"{report.summary()}{rows} in {time.perf_counter() - t0:.1f}s -> {out}")


@app.command("train-caption")
@one_line_errors
def train_caption(
    variant: Annotated[str, typer.Option(help="noada | ada (adversarial domain adaptation)")],
    laion: Annotated[Path | None, typer.Option(help="LAION embeddings folder")] = None,
    flickr: Annotated[Path | None, typer.Option(help="Flickr30k embeddings folder")] = None,
    out: Annotated[
        Path | None, typer.Option(help="model folder (default models/caption/<variant>)")
    ] = None,
    plots: Annotated[
        Path | None, typer.Option(help="folder of the caption_<variant>.tsv curve")
    ] = None,
    params: ParamsOpt = Path("params.yaml"),
):
    """Train the embedding-space caption decoder: LAION pretrain, adapt, Flickr30k fine-tune."""
    from pipeline.params import load_params
    from pipeline.train_caption import run

    p = load_params("train_caption", params)
    laion = Path(pick(laion, p, "laion", "data/emb/laion"))
    flickr = Path(pick(flickr, p, "flickr", "data/emb/flickr30k"))
    out = Path(out if out is not None else Path(p.get("out", "models/caption")) / variant)
    plots = Path(pick(plots, p, "plots", "metrics/plots"))
    s = run(variant, laion, flickr, out, plots, p)
    typer.echo(
        f"train_caption[{variant}]: {s['steps']} steps, {s['epochs']} epochs, caption loss "
        f"{s['final_caption_loss']:.4f}, val loss {s['final_val_loss']:.4f}, disc acc "
        f"{s['final_disc_acc']:.3f}, {s['seconds']:.1f}s on {s['device']} -> {out}"
    )


@app.command("evaluate-caption")
@one_line_errors
def evaluate_caption(
    emb: Annotated[Path | None, typer.Option(help="Flickr30k embeddings folder")] = None,
    models: Annotated[Path | None, typer.Option(help="folder of models/<variant>/")] = None,
    out: Annotated[Path | None, typer.Option(help="metrics JSON to write")] = None,
    pred_dir: Annotated[Path | None, typer.Option(help="folder for predictions")] = None,
    params: ParamsOpt = Path("params.yaml"),
):
    """Caption the test images (each variant + a nearest-neighbour baseline); BLEU, CIDEr-D."""
    from pipeline.evaluate_caption import run, summary
    from pipeline.params import load_params

    p = load_params("evaluate_caption", params)
    report = run(
        emb=Path(pick(emb, p, "emb", "data/emb/flickr30k")),
        models=Path(pick(models, p, "models", "models/caption")),
        out=Path(pick(out, p, "out", "metrics/caption.json")),
        pred_dir=Path(pick(pred_dir, p, "pred_dir", "data/eval")),
        params=p,
    )
    typer.echo(summary(report))


@app.command("train-vqa")
@one_line_errors
def train_vqa(
    qa: Annotated[Path | None, typer.Option(help="data/qa folder (parquet splits)")] = None,
    emb: Annotated[Path | None, typer.Option(help="VG embeddings folder")] = None,
    out: Annotated[Path | None, typer.Option(help="output model folder")] = None,
    plots: Annotated[Path | None, typer.Option(help="folder for vqa.tsv")] = None,
    params: ParamsOpt = Path("params.yaml"),
):
    """Train the VQA head on cached CLIP image + question embeddings."""
    from pipeline.params import load_params
    from pipeline.train_vqa import run

    p = load_params("train_vqa", params)
    report = run(
        qa_dir=Path(pick(qa, p, "qa", "data/qa")),
        emb_dir=Path(pick(emb, p, "emb", "data/emb/vg")),
        out_dir=Path(pick(out, p, "out", "models/vqa")),
        plots_dir=Path(pick(plots, p, "plots", "metrics/plots")),
        params=p,
    )
    x = report.extra
    typer.echo(
        f"{report.summary()}; train {x['n_train']} val {x['n_val']}, final train_loss "
        f"{x['final_train_loss']:.4f} val_loss {x['final_val_loss']:.4f}"
    )


@app.command("evaluate-vqa")
@one_line_errors
def evaluate_vqa(
    qa: Annotated[Path | None, typer.Option(help="data/qa folder (parquet splits)")] = None,
    emb: Annotated[Path | None, typer.Option(help="VG embeddings folder")] = None,
    model: Annotated[Path | None, typer.Option(help="trained VQA model folder")] = None,
    out: Annotated[Path | None, typer.Option(help="metrics JSON to write")] = None,
    predictions: Annotated[Path | None, typer.Option(help="predictions JSONL")] = None,
    params: ParamsOpt = Path("params.yaml"),
):
    """VQA accuracy per question type: trained head vs zero-shot CLIP, text prior, majority."""
    from pipeline.evaluate_vqa import run
    from pipeline.params import load_params

    p = load_params("evaluate_vqa", params)
    report = run(
        qa_dir=Path(pick(qa, p, "qa", "data/qa")),
        emb_dir=Path(pick(emb, p, "emb", "data/emb/vg")),
        model_dir=Path(pick(model, p, "model", "models/vqa")),
        metrics_path=Path(pick(out, p, "out", "metrics/vqa.json")),
        predictions_path=Path(pick(predictions, p, "predictions", "data/eval/vqa.jsonl")),
        params=p,
    )
    typer.echo(report.summary())
    for group, m in report.extra["metrics"].items():
        tops = ", ".join(
            f"{k[: -len('_top1')]} {v:.3f}"
            for k, v in m.items()
            if k.endswith("_top1") and v is not None
        )
        typer.echo(f"  {group} (n={m['n']}) top-1: {tops}")


@app.command()
@one_line_errors
def caption(
    images: Annotated[list[Path], typer.Argument(help="image files")],
    model: Annotated[Path | None, typer.Option(help="caption model folder")] = None,
    clip: Annotated[str | None, typer.Option(help="CLIP checkpoint (default: embed.model)")] = None,
    beam: Annotated[int, typer.Option(help="beam size (1: greedy)")] = 3,
    max_len: Annotated[int, typer.Option(help="most tokens per caption")] = 30,
    params: ParamsOpt = Path("params.yaml"),
):
    """Print one caption per image (`path<TAB>caption`) with CLIP + a trained decoder."""
    import torch

    from pipeline.ask import embed_image
    from pipeline.clip.backbone import load_backbone
    from pipeline.decode import generate, load_caption_model
    from pipeline.nn.caption_decoder import read_model_info
    from pipeline.params import load_params

    model = Path(model if model is not None else "models/caption/ada")
    clip = clip or load_params("embed", params).get("model", "models/clip")
    if beam < 1:
        raise UserError(f"--beam must be >= 1, got {beam}")
    if max_len < 1:
        raise UserError(f"--max-len must be >= 1, got {max_len}")
    decoder = load_caption_model(model)
    trained_on = read_model_info(model).get("clip", {})
    bb = load_backbone(clip)
    want = decoder.config["image_dim"]
    if bb.dim != want:
        raise UserError(f"{clip} gives {bb.dim}-d embeddings, {model} expects {want}")
    if trained_on.get("revision") not in (None, bb.revision):
        was = f"{trained_on.get('model')} ({trained_on.get('revision')})"
        typer.echo(f"warning: {model} was trained on {was}, not {bb.revision}", err=True)
    emb = torch.cat([embed_image(bb, path) for path in images])  # decoded as embed decodes
    for path, ids in zip(images, generate(decoder, emb, beam_size=beam, max_len=max_len)):
        text = " ".join(bb.tokenizer.decode(ids, skip_special_tokens=True).split())
        typer.echo(f"{path}\t{text}")


@app.command()
@one_line_errors
def ask(
    image: Annotated[Path, typer.Argument(help="image file")],
    question: Annotated[
        str, typer.Argument(help="e.g. 'What is the relationship between X and Y?'")
    ],
    box: Annotated[str | None, typer.Option(help="crop x,y,w,h (pixels) before embedding")] = None,
    model: Annotated[Path | None, typer.Option(help="trained VQA model folder")] = None,
    clip: Annotated[str | None, typer.Option(help="CLIP checkpoint (default: the model's)")] = None,
    top: Annotated[int, typer.Option(help="how many answers to print")] = 5,
    params: ParamsOpt = Path("params.yaml"),
):
    """Answer one question about an image: trained VQA head and zero-shot CLIP, with scores."""
    from pipeline.ask import ask as ask_one
    from pipeline.ask import format_result, parse_box
    from pipeline.params import load_params

    p = load_params("evaluate_vqa", params)
    model = Path(pick(model, p, "model", "models/vqa"))
    result = ask_one(image, question, model, clip, parse_box(box), top, p.get("templates"))
    typer.echo(format_result(result, model))


@app.command("prepare-qa-table")
@one_line_errors
def prepare_qa_table(
    input: Annotated[Path, typer.Option("--input", help="QA table: .parquet, .jsonl or .csv")],
    out: Annotated[Path | None, typer.Option(help="output folder (data/qa layout)")] = None,
    images: Annotated[Path | None, typer.Option(help="root of relative image paths")] = None,
    top_k: Annotated[int | None, typer.Option(help="answer vocabulary size")] = None,
    min_count: Annotated[int | None, typer.Option(help="min train count of an answer")] = None,
    params: ParamsOpt = Path("params.yaml"),
):
    """Convert a generic QA table (image path, question, answer) into the data/qa layout."""
    from pipeline.formats.qa_table import run
    from pipeline.params import load_params

    p = load_params("qa_table", params)
    p["top_k"] = pick(top_k, p, "top_k", 1000)
    p["min_count"] = pick(min_count, p, "min_count", 1)
    out = Path(pick(out, p, "out", "data/qa"))
    typer.echo(run(input, out, p, images=images).summary())


if __name__ == "__main__":
    app()
