"""prepare_vqa: Visual Genome JSON -> relation / object QA parquet splits + answer vocabulary.

Streams `relationships.json` and `objects.json` a block of image entries at a time into
`out/{train,val,test}.parquet` (an objects.json of `APART_BYTES` or more by a second
process, at the same time), then writes `answers.json` (the vocabulary, counted on train)
and `report.json` (every relationship and object read, written or skipped by reason).
The rules of the rows are in `pipeline.formats.vg_qa`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

from pipeline.formats.vg import (
    OBJECT_ALIAS,
    OBJECTS,
    RELATIONSHIP_ALIAS,
    RELATIONSHIPS,
    Normalizer,
    load_aliases,
)
from pipeline.formats.vg_qa import (
    SPLITS,
    InChild,
    QABuilder,
    StagedSplits,
    build_part,
    build_report,
    build_vocab,
    check_vg_folder,
    read_images,
    row_groups,
    summary,
    write_answers,
)
from pipeline.report import Report
from pipeline.settings import Answers, Split, as_dict, check, load


@dataclass(frozen=True)
class Settings:
    """Which questions are built (the split and the vocabulary: sections `split`, `answers`)."""

    SECTION: ClassVar[str] = "prepare_vqa"
    dedupe_triples: bool = True  # one question per (subject, predicate, object) in an image
    max_objects_per_image: int | None = 5  # per image, largest first; null: no cap, 0: none
    row_group_size: int = 65536  # parquet rows per row group (held in memory when written)
    seed: int = 0  # top-level `seed`: the hash split by image

    def __post_init__(self) -> None:
        cap = self.max_objects_per_image
        check(cap is None or cap >= 0, "max_objects_per_image", "must be null or >= 0")
        check(self.row_group_size >= 1, "row_group_size", "must be >= 1")


SETTINGS = (Settings, Split, Answers)
APART_BYTES = 64 << 20  # objects.json from this size on is read by a second process


def main(vg: Path, out: Path, params: Path) -> str:
    """Build `out/{train,val,test}.parquet`, `answers.json`, `report.json`; the summary."""
    settings, split, answers = (load(cls, params) for cls in SETTINGS)
    vg_dir, out = Path(vg), Path(out)
    want_objects = settings.max_objects_per_image != 0
    check_vg_folder(vg_dir, objects=want_objects)
    objects = vg_dir / OBJECTS if want_objects else None
    apart = objects is not None and objects.stat().st_size >= APART_BYTES

    out.mkdir(parents=True, exist_ok=True)
    with StagedSplits(out, ("relations", "objects") if apart else ("rows",)) as staged:
        report, vocab, groups = read_vg(vg_dir, objects, out, apart, settings, split, answers)
        in_vocab = staged.finalize(vocab, groups)
    for s, n in in_vocab.items():
        report.extra["splits"][s]["in_vocab"] = n
    write_answers(out / "answers.json", vocab, answers)
    report.save(out / "report.json")
    return summary(report)


def read_vg(
    vg_dir: Path,
    objects: Path | None,
    out: Path,
    apart: bool,
    settings: Settings,
    split: Split,
    answers: Answers,
) -> tuple[Report, list[tuple[str, int]], dict[str, list[int]]]:
    """Stage the rows (objects.json by a second process if `apart`); the report (its
    `in_vocab` still None), the vocabulary and the row groups. The per-image tables are
    freed on return, before the final rewrite."""
    rel_norm = Normalizer(load_aliases(vg_dir / RELATIONSHIP_ALIAS))
    obj_norm = Normalizer(load_aliases(vg_dir / OBJECT_ALIAS))
    images, files, meta = read_images(vg_dir)
    new_builder = partial(QABuilder, settings, split, images, files, rel_norm, obj_norm)
    rels = vg_dir / RELATIONSHIPS
    builder = new_builder(None)  # the counts of the parts, merged in file order
    if apart:
        with InChild(build_part, new_builder, out, "objects", None, objects) as child:
            builder.merge(build_part(new_builder, out, "relations", rels, None))
            builder.merge(child.result())
    else:
        builder.merge(build_part(new_builder, out, "rows", rels, objects))
    vocab = build_vocab(builder.answer_counts["train"], answers.top_k, answers.min_count)
    groups = {s: row_groups(builder.image_rows[s], settings.row_group_size) for s in SPLITS}
    used = {**as_dict(settings), **as_dict(split), **as_dict(answers)}
    report = build_report(builder, meta, vg_dir, vocab, dict.fromkeys(SPLITS), used)
    return report, vocab, groups
