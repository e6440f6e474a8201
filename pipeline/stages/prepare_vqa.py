"""prepare_vqa: Visual Genome JSON -> relation / object QA parquet splits + answer vocabulary.

Streams `relationships.json` and `objects.json` one image entry at a time into
`out/{train,val,test}.parquet`, then writes `answers.json` (the vocabulary, counted on
train) and `report.json` (every relationship and object read, written or skipped by
reason). The rules of the rows are in `pipeline.formats.vg_qa`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pipeline.formats.vg import (
    OBJECT_ALIAS,
    OBJECTS,
    RELATIONSHIP_ALIAS,
    RELATIONSHIPS,
    Normalizer,
    ObjEntry,
    RelEntry,
    iter_entries,
    load_aliases,
)
from pipeline.formats.vg_qa import (
    SPLITS,
    QABuilder,
    StagedSplits,
    StagedWriter,
    build_report,
    build_vocab,
    check_vg_folder,
    gc_paused,
    progress,
    read_images,
    row_groups,
    summary,
    write_answers,
)
from pipeline.settings import Answers, Split, as_dict, check, load


@dataclass(frozen=True)
class Settings:
    """Which questions are built (the split and the vocabulary: sections `split`, `answers`)."""

    SECTION: ClassVar[str] = "prepare_vqa"
    dedupe_triples: bool = True  # one question per (subject, predicate, object) in an image
    max_objects_per_image: int | None = 5  # per image, largest first; null: no cap, 0: none
    row_group_size: int = 65536  # parquet rows per row group (the unit held in memory)
    seed: int = 0  # top-level `seed`: the hash split by image

    def __post_init__(self) -> None:
        cap = self.max_objects_per_image
        check(cap is None or cap >= 0, "max_objects_per_image", "must be null or >= 0")
        check(self.row_group_size >= 1, "row_group_size", "must be >= 1")


SETTINGS = (Settings, Split, Answers)


def main(vg: Path, out: Path, params: Path) -> str:
    """Build `out/{train,val,test}.parquet`, `answers.json`, `report.json`; the summary."""
    settings, split, answers = (load(cls, params) for cls in SETTINGS)
    vg_dir, out = Path(vg), Path(out)
    want_objects = settings.max_objects_per_image != 0
    check_vg_folder(vg_dir, objects=want_objects)
    rel_norm = Normalizer(load_aliases(vg_dir / RELATIONSHIP_ALIAS))
    obj_norm = Normalizer(load_aliases(vg_dir / OBJECT_ALIAS))
    images, files, meta = read_images(vg_dir)

    out.mkdir(parents=True, exist_ok=True)
    with StagedSplits(out, ("rows",)) as staged, StagedWriter(out, "rows") as writer:
        builder = QABuilder(settings, split, images, files, rel_norm, obj_norm, writer.write)
        with gc_paused():
            for entry in progress(
                iter_entries(vg_dir / RELATIONSHIPS, RelEntry), len(images), "rels"
            ):
                builder.add_relationships(entry)
            if want_objects:
                for entry in progress(
                    iter_entries(vg_dir / OBJECTS, ObjEntry), len(images), "objs"
                ):
                    builder.add_objects(entry)
            builder.flush()
        writer.close()
        vocab = build_vocab(builder.answer_counts["train"], answers.top_k, answers.min_count)
        groups = {s: row_groups(builder.image_rows[s], settings.row_group_size) for s in SPLITS}
        in_vocab = staged.finalize(vocab, groups)

    write_answers(out / "answers.json", vocab, answers)
    used = {**as_dict(settings), **as_dict(split), **as_dict(answers)}
    report = build_report(builder, meta, vg_dir, vocab, in_vocab, used)
    report.save(out / "report.json")
    return summary(report)
