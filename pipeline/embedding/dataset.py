"""One dataset folder into one embeddings folder: list, shard, embed, finalize.

The listing comes from the dataset's format reader (`pipeline.formats.*`); the shards this
process owns and has not finished are decoded and embedded (`shards.ShardEmbedder`),
process 0 also writes (vg) texts.arrow, and whichever process sees every part finished
writes manifest.json and report.json. (The CLIP's token table is not copied here: it
lives in the CLIP folder, `pipeline.clip.token_table`.)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.embedding.items import Listing, fingerprint_fields
from pipeline.embedding.manifest import finalize
from pipeline.embedding.precomputed import embed_precomputed
from pipeline.embedding.shards import (
    ShardEmbedder,
    clean_outputs,
    fingerprint,
    finished,
    part_path,
    resolve_shard,
    settings_fingerprint,
    shard_ranges,
)
from pipeline.embedding.texts import write_texts
from pipeline.errors import UserError
from pipeline.report import Report
from pipeline.settings import Split

if TYPE_CHECKING:
    from pipeline.stages.embed import Settings

DATASETS = ("vg", "laion", "flickr30k")


def check_dataset(name: str) -> None:
    """A `UserError` unless `name` is one of `DATASETS`."""
    if name not in DATASETS:
        raise UserError(f"--dataset must be one of {', '.join(DATASETS)}, got {name!r}")


def list_dataset(
    dataset: str, input_path: Path, images: Path | None, settings: Settings, split: Split
) -> tuple[Listing, list[tuple[str, str, str]] | None]:
    """The dataset's items in output order, and (vg) the question / answer text rows."""
    from pipeline.formats import flickr30k, laion, qa

    if dataset == "vg":
        if images is None:
            raise UserError("vg: the Visual Genome image folder (--images) is needed")
        listing, qa_texts = qa.list_qa(input_path, images, crops=settings.vg_crops)
        return listing, qa_texts.rows
    if dataset == "laion":
        return laion.list_webdataset(input_path), None
    return flickr30k.list_flickr30k(input_path, split), None


def embed_dataset(
    dataset: str,
    input_path: Path,
    out_dir: Path,
    backbone,
    settings: Settings,
    split: Split,
    *,
    images: Path | None = None,
    shard: tuple[int, int] | None = None,
    on_shard_written: Callable[[int], None] | None = None,
) -> Report:
    """Embed one dataset into `out_dir` with a loaded `Backbone`; the stage report.

    `images`: the VG image folder (vg only; laion / flickr30k images are in `input_path`).
    `shard`: (i, n) as `--shard i/n`; None: torchrun's RANK / WORLD_SIZE, else all shards.
    `on_shard_written(k)`: called after each part file is written (tests kill a run there).
    When this process does not finish the last shard, the returned report covers only
    what it listed and the manifest / report files are left to the process that does.
    """
    from pipeline.formats import laion

    check_dataset(dataset)
    rank, world = resolve_shard(shard)
    input_path, out_dir = Path(input_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    common = settings_fingerprint(dataset, backbone, settings)
    texts_fp = None
    if dataset == "laion" and laion.is_precomputed(input_path):
        n_parts = len(laion.precomputed_chunks(input_path))
        clean_outputs(out_dir, n_parts, [k for k in range(n_parts) if k % world == rank], False)
        listing, fps = embed_precomputed(
            input_path, out_dir, backbone, settings, common, rank, world, on_shard_written
        )
    else:
        listing, texts = list_dataset(dataset, input_path, images, settings, split)
        ranges = shard_ranges(len(listing.items), settings.shard_size)
        fps = [
            fingerprint(common, [fingerprint_fields(listing.items[i]) for i in r]) for r in ranges
        ]
        mine = [k for k in range(len(ranges)) if k % world == rank]
        clean_outputs(out_dir, len(ranges), mine, texts is not None)
        todo = [k for k in mine if finished(part_path(out_dir, k), fps[k]) is None]
        # decoding starts here, in parallel with the texts
        captions = dataset != "vg"
        embedder = ShardEmbedder(
            listing, todo, ranges, fps, out_dir, backbone, settings, captions, on_shard_written
        )
        texts_fp = fingerprint(common, texts) if texts is not None else None
        try:
            if rank == 0 and texts is not None:
                write_texts(out_dir, texts, backbone, settings, texts_fp)
            embedder.run(f"embed {dataset}")
        finally:
            embedder.close()
    final = finalize(out_dir, dataset, fps, texts_fp, listing, backbone, settings.dtype, input_path)
    return final if final is not None else listing.report
