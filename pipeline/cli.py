"""The `clipda` command line: one thin Typer command per stage, plus `caption` and `ask`.

Each stage command takes its input and output paths as options (dvc.yaml names them) and
`--params FILE` for its settings, and calls `pipeline.stages.<stage>.main`, which returns
the one-line summary. Heavy imports (torch, transformers, ...) live inside the commands
so that `--help` is instant. A `UserError` (or a missing file named by the user) prints
one line on stderr and exits with code 2; bugs keep their traceback.
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


def _opt(text: str):
    return typer.Option(help=text)


Params = Annotated[Path, typer.Option("--params", help="params file (settings of the stage)")]


def _decode_opt(text: str, key: str):
    """An option of `caption` whose default is evaluate_caption's setting `key`."""
    return typer.Option(help=text, show_default=f"evaluate_caption.{key}")


PARAMS = Path("params.yaml")


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


@app.command()
@one_line_errors
def synth(
    out: Annotated[Path, _opt("output folder of the sample world")],
    params: Params = PARAMS,
):
    """Generate the sample world: Visual Genome, LAION (img2dataset) and Flickr30k folders."""
    from pipeline.stages import synth as stage

    typer.echo(stage.main(out=out, params=params))


@app.command("clip-bootstrap")
@one_line_errors
def clip_bootstrap(
    laion: Annotated[Path, _opt("LAION img2dataset shards (tar + parquet)")],
    flickr30k: Annotated[Path, _opt("Flickr30k folder (tokenizer texts; pairs if enabled)")],
    pretrained: Annotated[str, _opt("hub id or folder to fine-tune / pass through; 'scratch'")],
    out: Annotated[Path, _opt("output CLIP checkpoint folder")],
    metrics: Annotated[Path, _opt("headline metrics JSON (DVC metric)")],
    detail: Annotated[Path, _opt("detail metrics JSON")],
    plots: Annotated[Path, _opt("per-epoch TSV curve")],
    probes: Annotated[
        Path | None, typer.Option(help="probe set (labels.json + images) scored into metrics")
    ] = None,
    params: Params = PARAMS,
):
    """Train a small CLIP contrastively (or fine-tune / pass through a pretrained one)."""
    from pipeline.stages import clip_bootstrap as stage

    typer.echo(
        stage.main(
            laion=laion,
            flickr30k=flickr30k,
            pretrained=pretrained,
            out=out,
            metrics=metrics,
            detail=detail,
            plots=plots,
            params=params,
            probes=probes,
        )
    )


@app.command("clip-standin")
@one_line_errors
def clip_standin(
    out: Annotated[Path, _opt("output folder of the stand-in CLIP checkpoint")],
    params: Params = PARAMS,
):
    """Train the sample world's stand-in CLIP once, long, on its own web-like pairs."""
    from pipeline.stages import clip_standin as stage

    typer.echo(stage.main(out=out, params=params))


@app.command("convert-open-clip")
@one_line_errors
def convert_open_clip(
    checkpoint: Annotated[
        Path, _opt("open_clip checkpoint: .safetensors or a weights-only torch file (.pt, .bin)")
    ],
    tokenizer: Annotated[
        str, _opt("Hugging Face CLIP folder or hub id whose tokenizer the model uses")
    ],
    out: Annotated[Path, _opt("output folder (Hugging Face CLIP layout)")],
    model_config: Annotated[
        Path | None,
        _opt(
            "open_clip model config JSON (model_configs/<name>.json or a hub "
            "open_clip_config.json; default: inferred from the weights' shapes)"
        ),
    ] = None,
    quick_gelu: Annotated[
        bool, _opt("the model uses QuickGELU (OpenAI weights, open_clip's *-quickgelu)")
    ] = False,
):
    """Convert an open_clip ViT checkpoint to a Hugging Face CLIP folder (+ open_clip.json)."""
    from pipeline.clip.open_clip import main as convert

    typer.echo(
        convert(checkpoint, out, tokenizer=tokenizer, model_config=model_config,
                quick_gelu=quick_gelu)
    )  # fmt: skip


@app.command("prepare-vqa")
@one_line_errors
def prepare_vqa(
    vg: Annotated[Path, _opt("Visual Genome folder (JSON + VG_100K*)")],
    out: Annotated[Path, _opt("output folder for the QA parquet")],
    params: Params = PARAMS,
):
    """Build relation/object QA parquet splits + answer vocabulary from Visual Genome JSON."""
    from pipeline.stages import prepare_vqa as stage

    typer.echo(stage.main(vg=vg, out=out, params=params))


@app.command()
@one_line_errors
def embed(
    dataset: Annotated[str, _opt("vg | laion | flickr30k")],
    input: Annotated[Path, typer.Option("--input", help="dataset folder (vg: data/qa)")],
    images: Annotated[Path, _opt("folder the images are in (vg: the VG folder with VG_100K*)")],
    clip: Annotated[str, _opt("CLIP checkpoint: hub id or Hugging Face folder")],
    out: Annotated[Path, _opt("output folder (data/emb/<dataset>)")],
    shard: Annotated[str | None, _opt("i/n: embed only shards k with k % n == i")] = None,
    params: Params = PARAMS,
):
    """Cache CLIP image/text embeddings of one dataset as Arrow shards (resumable)."""
    from pipeline.stages import embed as stage

    typer.echo(
        stage.main(
            dataset=dataset,
            input=input,
            images=images,
            clip=clip,
            out=out,
            shard=shard,
            params=params,
        )
    )


@app.command("train-caption")
@one_line_errors
def train_caption(
    variant: Annotated[
        list[str], _opt("noada | ada (adversarial domain adaptation); repeat to train several")
    ],
    laion: Annotated[Path, _opt("LAION embeddings folder")],
    flickr30k: Annotated[Path, _opt("Flickr30k embeddings folder")],
    out: Annotated[str, _opt("model folder; {variant} in it: the variant's name")],
    plots: Annotated[str, _opt("per-epoch TSV curve; {variant} in it: the variant's name")],
    clip: Annotated[
        str | None,
        _opt("the CLIP the embeddings came from (its token table); default: the one they name"),
    ] = None,
    params: Params = PARAMS,
):
    """Train the embedding-space caption decoder: LAION pretrain, adapt, Flickr30k fine-tune.
    Several variants train at once on a CPU with a core for each (same numbers)."""
    from pipeline.stages import train_caption as stage

    summaries = stage.run(
        variant, laion=laion, flickr30k=flickr30k, out=out, plots=plots, params=params, clip=clip
    )
    for line in summaries:
        typer.echo(line)


@app.command("evaluate-caption")
@one_line_errors
def evaluate_caption(
    emb: Annotated[Path, _opt("Flickr30k embeddings folder")],
    clip: Annotated[str, _opt("the CLIP the embeddings came from (its tokenizer decodes)")],
    model: Annotated[list[Path], _opt("caption model folder; repeat for each variant")],
    metrics: Annotated[Path, _opt("headline metrics folder, a JSON per row (DVC metrics)")],
    detail: Annotated[Path, _opt("detail metrics JSON")],
    predictions: Annotated[Path, _opt("folder for caption_<variant>.jsonl")],
    scenes: Annotated[
        Path | None, _opt("scene truth (sample world's scenes.json) for grounding; if absent: none")
    ] = None,
    laion: Annotated[
        Path | None, _opt("LAION (source-domain) embeddings folder, for the domain gap")
    ] = None,
    params: Params = PARAMS,
):
    """Caption the test images (each variant + a nearest-neighbour baseline); BLEU, CIDEr-D,
    grounding where the scene truth exists, the domain gap where --laion is given."""
    from pipeline.stages import evaluate_caption as stage

    typer.echo(
        stage.main(
            emb=emb,
            clip=clip,
            models=model,
            metrics=metrics,
            detail=detail,
            predictions=predictions,
            params=params,
            scenes=scenes,
            laion=laion,
        )
    )


@app.command("train-vqa")
@one_line_errors
def train_vqa(
    qa: Annotated[Path, _opt("data/qa folder (parquet splits)")],
    emb: Annotated[Path, _opt("VG embeddings folder")],
    out: Annotated[Path, _opt("output model folder")],
    plots: Annotated[Path, _opt("per-epoch TSV curve")],
    params: Params = PARAMS,
):
    """Train the VQA head on cached CLIP image + question embeddings."""
    from pipeline.stages import train_vqa as stage

    typer.echo(stage.main(qa=qa, emb=emb, out=out, plots=plots, params=params))


@app.command("evaluate-vqa")
@one_line_errors
def evaluate_vqa(
    qa: Annotated[Path, _opt("data/qa folder (parquet splits)")],
    emb: Annotated[Path, _opt("VG embeddings folder")],
    model: Annotated[Path, _opt("trained VQA model folder")],
    clip: Annotated[str, _opt("CLIP checkpoint for the zero-shot prompts")],
    metrics: Annotated[Path, _opt("headline metrics folder, a JSON per row (DVC metrics)")],
    detail: Annotated[Path, _opt("detail metrics JSON")],
    predictions: Annotated[Path, _opt("predictions JSONL")],
    prompt_cache: Annotated[
        Path | None, _opt("Arrow file caching prompt embeddings across runs")
    ] = None,
    params: Params = PARAMS,
):
    """VQA accuracy per question type: trained head vs zero-shot CLIP, text prior, majority."""
    from pipeline.stages import evaluate_vqa as stage

    typer.echo(
        stage.main(
            qa=qa,
            emb=emb,
            model=model,
            clip=clip,
            metrics=metrics,
            detail=detail,
            predictions=predictions,
            prompt_cache=prompt_cache,
            params=params,
        )
    )


@app.command()
@one_line_errors
def report(
    metrics: Annotated[Path, _opt("metrics folder (clip/caption/vqa _detail.json, plots/)")],
    predictions: Annotated[Path, _opt("predictions folder (caption_*.jsonl, vqa.jsonl)")],
    qa: Annotated[Path, _opt("data/qa folder (question boxes)")],
    flickr30k: Annotated[Path, _opt("Flickr30k folder (caption gallery images)")],
    vg: Annotated[Path, _opt("Visual Genome folder (question images)")],
    out: Annotated[Path, _opt("the HTML page to write")],
    params: Params = PARAMS,
    sweeps: Annotated[
        Path | None, _opt("folder of sweep summaries (metrics/seeds: adaptation_*.json)")
    ] = None,
):
    """One self-contained HTML page: tables with intervals, sweeps, curves, galleries."""
    from pipeline.stages import report as stage

    typer.echo(stage.main(metrics=metrics, predictions=predictions, qa=qa, flickr30k=flickr30k,
                          vg=vg, out=out, params=params, sweeps=sweeps))  # fmt: skip


@app.command()
@one_line_errors
def seeds(
    out: Annotated[Path, _opt("summary JSON to write")],
    by: Annotated[list[str] | None, _opt("group by this param (repeat for more)")] = None,
    metric: Annotated[
        list[str] | None, _opt("metrics to keep, glob on e.g. caption.ada.cider (repeat)")
    ] = None,
    plot: Annotated[Path | None, _opt("SVG of the --metric means against the first --by")] = None,
    plot_metric: Annotated[
        list[str] | None, _opt("with --plot: draw only these of the --metric (glob, repeat)")
    ] = None,
    rev: Annotated[
        str | None, _opt("the commit the experiments derive from (default HEAD)")
    ] = None,
    exp_json: Annotated[
        Path | None, _opt("a saved `dvc exp show --json` (default: run it here)")
    ] = None,
    choose: Annotated[
        str | None, _opt("per value of the first --by, the second's with the best mean of this")
    ] = None,
    against: Annotated[str | None, _opt("with --choose: also report this metric's mean")] = None,
    higher: Annotated[bool, _opt("with --choose: higher is better (default: lower)")] = False,
    intervals: Annotated[
        bool, _opt("count the seeds whose own interval of each difference excludes 0 (git)")
    ] = False,
    note: Annotated[str, _opt("a line on what the sweep is, kept in the summary")] = "",
    where: Annotated[
        list[str] | None, _opt("keep only the experiments with this param value: KEY=VALUE")
    ] = None,
    diffs: Annotated[
        Path | None, _opt("summarise this folder of `caption-diff --label` results instead")
    ] = None,
):
    """Mean, std, min and max over seeds of the DVC experiments' metrics, per setting; with
    --choose, the trade-off chosen on them (e.g. adv_weight per labelled fraction on the
    pooled validation score caption.ada.select_loss, against caption.noada.select_loss).
    With --diffs, of `clipda caption-diff` results (arms in different experiments against
    one reference): their labels group them, and each seed's b - a interval is counted."""
    import fnmatch
    import json

    from pipeline.atomic import write_json, write_text
    from pipeline.experiments import choose as choose_setting
    from pipeline.experiments import (
        detail_intervals,
        exp_show,
        finished,
        markdown,
        select,
        summarise,
        sweep_plot,
    )

    if plot is not None and (not by or not metric):
        raise UserError("--plot needs a --by (its x axis: the first) and the --metric names "
                        "to draw")  # fmt: skip
    if choose is not None and len(by or []) != 2:
        raise UserError("--choose needs two --by params: the setting to choose per value of the "
                        "first (e.g. --by train_caption.labelled_fraction --by "
                        "train_caption.adv_weight)")  # fmt: skip
    if (against is not None or higher) and choose is None:
        raise UserError("--against and --higher go with --choose")
    if diffs is not None:
        from pipeline.caption.paired import diff_rows

        if exp_json or rev or intervals:
            raise UserError("--diffs reads caption-diff results: no --exp-json, --rev, --intervals")
        rows = select(diff_rows(diffs), where or [])
    else:
        shown = json.loads(exp_json.read_text()) if exp_json else exp_show(Path.cwd(), rev)
        rows = select(finished(shown), where or [])
    if intervals:
        for r in rows:
            r["intervals"] = detail_intervals(Path.cwd(), r["rev"])
    groups = summarise(rows, by or [], metric or ["*"])
    chosen = choose_setting(groups, by or [], choose, against, higher) if choose else None
    write_json(out, {"by": by or [], "groups": groups} | ({"note": note} if note else {})
               | ({"chosen": chosen} if chosen else {}))  # fmt: skip
    if plot is not None:
        assert by is not None
        names = sorted({m for g in groups for m in g["metrics"]
                        if any(fnmatch.fnmatchcase(m, p) for p in plot_metric or ["*"])})  # fmt: skip
        write_text(plot, sweep_plot(groups, by, names))
    typer.echo(markdown(groups))
    for row in chosen or []:
        assert by is not None and choose is not None
        line = (f"chosen: {by[0]}={row[by[0]]}: {by[1]}={row[by[1]]} ({choose} "
                f"{row['mean']:.4f} ± {row['std']:.4f}, {row['n']} seeds)")  # fmt: skip
        if "against_mean" in row:
            verdict = "better" if row["against_better"] else "not better"
            line += f"; {against} {row['against_mean']:.4f}: {verdict}"
        typer.echo(line)


@app.command()
@one_line_errors
def compare(
    sides: Annotated[
        list[str] | None,
        typer.Argument(
            help="git revision, DVC experiment name or metrics folder (0, 1 or 2)",
            metavar="REV_OR_DIR",
        ),
    ] = None,
    seeds: Annotated[
        Path | None, _opt("a `clipda seeds --out` JSON: the seed spread of a's setting")
    ] = None,
):
    """Is each headline difference within noise? Compares the metrics of a (default HEAD)
    with b (default the workspace's metrics/): `compare` is HEAD vs workspace, `compare A` A vs
    workspace, `compare A B` A vs B; diff = b - a. Exit code 0 whatever the verdicts.

    Within noise (judged on a's side) when:
    - |diff| <= 2.8 x the sd over seeds of a's setting (from --seeds, else from
      the DVC experiments of a's commit with its params but the seed),
    - else |diff| <= half a's 95% bootstrap interval: test sampling only,
    - else: no noise estimate.
    """
    from pipeline.compare import main as compare_metrics

    typer.echo(compare_metrics(sides or [], seeds, Path.cwd()))


@app.command("caption-diff")
@one_line_errors
def caption_diff(
    a: Annotated[str, typer.Argument(help="predictions JSONL, or REV:PATH (git rev or DVC exp)")],
    b: Annotated[str, typer.Argument(help="the other side, on the same images and references")],
    scenes: Annotated[
        str | None, _opt("scenes.json (or REV:PATH) of the world: grounding too")
    ] = None,
    out: Annotated[Path | None, _opt("write the result as JSON here")] = None,
    label: Annotated[
        list[str] | None, _opt("KEY=VALUE kept in --out, e.g. seed=0, arm=token (repeat)")
    ] = None,
    params: Params = PARAMS,
):
    """The paired difference b - a of two runs' captions (BLEU, CIDEr-D, grounding with
    --scenes) with its bootstrap interval, e.g. an arm in one DVC experiment against noada in
    another: `clipda caption-diff EXP1:data/eval/caption_noada.jsonl EXP2:data/eval/...`."""
    import json

    from pipeline.atomic import write_text
    from pipeline.caption.paired import paired, parse_labels, render
    from pipeline.settings import Bootstrap, load

    labels = parse_labels(label or [])
    boot = load(Bootstrap, params)
    result = paired(a, b, boot.resamples, boot.level, boot.seed, scenes, Path.cwd())
    result["labels"] = labels
    if out is not None:
        write_text(out, json.dumps(result, indent=1) + "\n")
    typer.echo(render(result))


@app.command()
@one_line_errors
def caption(
    images: Annotated[list[Path], typer.Argument(help="image files")],
    model: Annotated[Path, _opt("caption model folder")] = Path("models/caption/noada"),
    clip: Annotated[str | None, _opt("CLIP checkpoint (default: the model's)")] = None,
    beam: Annotated[int | None, _decode_opt("beam size (1: greedy)", "beam_size")] = None,
    max_len: Annotated[int | None, _decode_opt("most tokens per caption", "max_len")] = None,
    no_repeat_ngram: Annotated[
        int | None, _decode_opt("no token may repeat an n-gram (0: off)", "no_repeat_ngram_size")
    ] = None,
    length_penalty: Annotated[
        float | None, _decode_opt("rank beams by log-score / length**this", "length_penalty")
    ] = None,
    device: Annotated[str | None, _decode_opt("auto | cpu | cuda | cuda:N", "device")] = None,
    domain: Annotated[
        str, _opt("the domain token read (models with one): target (Flickr30k's) or source")
    ] = "target",
    mbr_samples: Annotated[
        int | None, _decode_opt("sampled captions per image, MBR choice (0: off)", "mbr_samples")
    ] = None,
    mbr_temperature: Annotated[
        float | None,
        _decode_opt("their temperature, times the model's own", "mbr_temperature"),
    ] = None,
    seed: Annotated[int, _opt("seed of the sampled captions")] = 0,
):
    """Print one caption per image (`path<TAB>caption`) with CLIP + a trained decoder,
    decoded as evaluate_caption decodes (its settings' defaults where an option is not given)."""
    from pipeline.caption.decode import caption_images
    from pipeline.nn.caption_decoder import SOURCE, TARGET
    from pipeline.stages.evaluate_caption import Settings

    if domain not in ("target", "source"):
        raise UserError(f"--domain must be target or source, got {domain!r}")

    s = Settings()
    texts = caption_images(
        images, model, clip,
        s.beam_size if beam is None else beam,
        s.max_len if max_len is None else max_len,
        s.no_repeat_ngram_size if no_repeat_ngram is None else no_repeat_ngram,
        s.length_penalty if length_penalty is None else length_penalty,
        s.device if device is None else device,
        SOURCE if domain == "source" else TARGET,
        s.mbr_samples if mbr_samples is None else mbr_samples,
        s.mbr_temperature if mbr_temperature is None else mbr_temperature,
        seed,
    )  # fmt: skip
    for path, text in texts:
        typer.echo(f"{path}\t{text}")


@app.command()
@one_line_errors
def ask(
    image: Annotated[Path, typer.Argument(help="image file")],
    question: Annotated[
        str, typer.Argument(help="e.g. 'What is the relationship between X and Y?'")
    ],
    box: Annotated[str | None, _opt("crop x,y,w,h (pixels) before embedding")] = None,
    model: Annotated[Path, _opt("trained VQA model folder")] = Path("models/vqa"),
    clip: Annotated[str | None, _opt("CLIP checkpoint (default: the model's)")] = None,
    top: Annotated[int, _opt("how many answers to print")] = 5,
    device: Annotated[str, _opt("auto | cpu | cuda | cuda:N")] = "auto",
    params: Params = PARAMS,
):
    """Answer one question about an image: trained head and zero-shot CLIP, with scores."""
    from pipeline.settings import load
    from pipeline.stages.evaluate_vqa import Settings
    from pipeline.vqa.ask import ask as ask_one
    from pipeline.vqa.ask import format_result, parse_box

    templates = load(Settings, params).templates
    result = ask_one(image, question, model, clip, parse_box(box), top, templates, device)
    typer.echo(format_result(result, model))


@app.command()
@one_line_errors
def export(
    emb: Annotated[Path, _opt("embeddings folder (data/emb/<name>)")],
    out: Annotated[Path, _opt("output folder: img_emb/, text_emb/, metadata/ + a faiss index")],
    rows_per_file: Annotated[int, _opt("rows per npy / parquet file")] = 1_000_000,
    dtype: Annotated[str, _opt("npy dtype: keep (the stored one), float16 or float32")] = "keep",
    index: Annotated[
        str, _opt("faiss index: auto (Flat to 100k rows, else IVF-PQ), flat or a factory string")
    ] = "auto",
    overwrite: Annotated[bool, _opt("replace a previous export in --out")] = False,
    device: Annotated[
        str, _opt("faiss index built on: auto | cpu | cuda | cuda:N (a GPU needs faiss-gpu)")
    ] = "auto",
):
    """Export embeddings to the clip-retrieval layout (npy + parquet) with a faiss index
    (built on a GPU with faiss-gpu, saved as a CPU index)."""
    from pipeline.embedding.export import main as export_embeddings

    typer.echo(export_embeddings(emb, out, rows_per_file, dtype, index, overwrite, device))


@app.command("prepare-qa-table")
@one_line_errors
def prepare_qa_table(
    input: Annotated[
        Path,
        typer.Option(
            "--input",
            help="QA table: .parquet, .jsonl, .csv, GQA questions JSON or VQA v2 questions JSON",
        ),
    ],
    out: Annotated[Path, _opt("output folder (data/qa layout)")],
    annotations: Annotated[
        Path | None, _opt("VQA v2 annotations JSON (the answers of a VQA v2 questions --input)")
    ] = None,
    images: Annotated[Path | None, _opt("root of relative image paths")] = None,
    default_qtype: Annotated[str, _opt("question type of rows that name none")] = "other",
    params: Params = PARAMS,
):
    """Convert a QA table (image path, question, answer), or GQA / VQA v2 question files, into
    the data/qa layout.

    Reads the `seed`, `split` and `answers` settings, as prepare-vqa does.
    """
    from pipeline.formats.qa_table import main as convert

    typer.echo(
        convert(input, out, images=images, default_qtype=default_qtype, params=params,
                annotations=annotations)
    )  # fmt: skip


if __name__ == "__main__":
    app()
