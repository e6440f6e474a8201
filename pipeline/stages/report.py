"""report: one self-contained HTML page of a run (tables, curves, galleries).

Reads the evaluation details (`--metrics`: clip_detail.json, caption_detail.json,
vqa_detail.json and plots/*.tsv), the predictions (`--predictions`: caption_*.jsonl,
vqa.jsonl), the QA tables (`--qa`, for the question boxes) and the images (`--flickr30k`,
`--vg`), and writes `--out` (index.html): the CLIP probes, the VQA and caption tables with
their 95% intervals and paired differences, the adaptation sweeps summarised over seeds
(`--sweeps`: metrics/seeds/adaptation_*.json, committed from DVC experiments; a table and a
plot per world), the training curves as inline SVG, and
galleries of test images with their captions (references, each system) and of test
questions with the box drawn and each method's answer, correct ones marked. Images are
inlined as small JPEG thumbnails; the page loads nothing from the network and runs no
script.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pipeline.settings import check, load


@dataclass(frozen=True)
class Settings:
    """How much of the test split the galleries show."""

    SECTION: ClassVar[str] = "report"
    captions: int = 24  # test images in the caption gallery (spread over the split)
    questions: int = 24  # test questions in the VQA gallery (spread over each type)
    thumb_size: int = 192  # longest side of a thumbnail, pixels

    def __post_init__(self) -> None:
        for key in ("captions", "questions"):
            check(getattr(self, key) >= 0, key, "must be >= 0")
        check(self.thumb_size >= 16, "thumb_size", "must be >= 16")


SETTINGS = (Settings,)


def main(
    metrics: Path, predictions: Path, qa: Path, flickr30k: Path, vg: Path, out: Path,
    params: Path, sweeps: Path | None = None,
) -> str:  # fmt: skip
    """Write the report page `out`; the one-line summary."""
    from jinja2 import Environment

    from pipeline.atomic import write_text
    from pipeline.errors import UserError
    from pipeline.webpage import content
    from pipeline.webpage.template import PAGE

    s = load(Settings, params)
    metrics, predictions = Path(metrics), Path(predictions)
    if not metrics.is_dir():
        raise UserError(f"metrics folder not found: {metrics}")
    caption = content.read_json(metrics / "caption_detail.json")
    vqa = content.read_json(metrics / "vqa_detail.json")
    clip = content.read_json(metrics / "clip_detail.json")
    captions = content.caption_tables(caption)
    systems = [r["name"] for r in captions["systems"]]
    cap_items, cap_missing = content.caption_gallery(
        predictions, Path(flickr30k), systems, s.captions, s.thumb_size
    )
    vqa_items, vqa_missing = content.vqa_gallery(
        predictions / "vqa.jsonl", Path(qa), Path(vg), s.questions, s.thumb_size,
        (vqa or {}).get("settings", {}).get("split", "test"),
    )  # fmt: skip
    run = (f"CLIP: {(clip or {}).get('model', '?')}; test images captioned: "
           f"{captions.get('n_images', '?')}; VQA test questions: "
           f"{(vqa or {}).get('overall', {}).get('n', '?')}")  # fmt: skip
    page = Environment(autoescape=True).from_string(PAGE).render(
        run=run, clip_rows=content.clip_rows(clip), scene_rows=content.scene_rows(clip),
        vqa=content.vqa_tables(vqa),
        caption=captions, charts=content.curves(metrics / "plots"),
        caption_gallery=cap_items, vqa_gallery=vqa_items, sweeps=content.sweeps(sweeps),
    )  # fmt: skip
    write_text(Path(out), page)
    size = Path(out).stat().st_size
    return (f"report: {len(cap_items)} captioned images ({cap_missing} image files missing), "
            f"{len(vqa_items)} questions ({vqa_missing} missing), {size / 1024:.0f} KB -> {out}")  # fmt: skip
