"""The LAION / clip-retrieval precomputed-embedding layout, taken as is: one part per
`img_emb_N.npy` (with `text_emb_N.npy` and `metadata_N.parquet`).

Image embeddings are never recomputed (their dimension must match the model's); text
embeddings are taken from text_emb_N.npy, computed only when that file is absent. A row
without a caption keeps its image embedding (null text_emb and token_ids: left out of
caption training only).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.embedding.encoders import encode_captions
from pipeline.embedding.items import Listing, file_stamp, source_entry
from pipeline.embedding.shards import fingerprint, finished, part_path, write_part
from pipeline.embedding.tables import caption_table
from pipeline.errors import UserError
from pipeline.report import Report

if TYPE_CHECKING:
    from pipeline.stages.embed import Settings


def embed_precomputed(
    input_path: Path,
    out_dir: Path,
    backbone,
    settings: Settings,
    common: dict[str, Any],
    rank: int,
    world: int,
    on_shard_written: Callable[[int], None] | None,
) -> tuple[Listing, list[str]]:
    """Write this process's parts of the layout; (listing for the manifest, fingerprints)."""
    from pipeline.formats import laion

    chunks = laion.precomputed_chunks(input_path)
    for c in chunks:
        shape, _ = laion.npy_shape(c.img_emb)
        if len(shape) != 2 or shape[1] != backbone.dim:
            raise UserError(
                f"{c.img_emb}: embeddings of dim {shape[-1]} but the model {backbone.model_id} "
                f"has dim {backbone.dim}; this layout has no images to recompute them from"
            )
    fps = []
    sources = []
    for c in chunks:
        files = [f for f in (c.img_emb, c.text_emb, c.metadata) if f is not None]
        sources += [source_entry(f) for f in files]
        # paths relative to the input: a moved or copied layout is not recomputed
        fps.append(
            fingerprint(
                common, [[f.relative_to(input_path).as_posix(), file_stamp(f)] for f in files]
            )
        )
    for k, c in enumerate(chunks):
        if k % world != rank or finished(part_path(out_dir, k), fps[k]) is not None:
            continue
        report = Report("embed")
        rows = laion.read_precomputed(c, report)
        token_ids, text = encode_captions(
            backbone, rows.captions, rows.ids, report, settings.text_batch_size, rows.text_emb
        )
        if rows.text_emb is None:
            captioned = sum(caption is not None for caption in rows.captions)
            report.note("text_emb_computed", f"chunk {c.n}", n=captioned)
        cols = {
            "id": rows.ids,
            "image_id": rows.image_ids,
            "split": rows.splits,
            "caption": rows.captions,
            "token_ids": token_ids,
        }
        table = caption_table(cols, rows.image_emb, text, backbone.dim, settings.dtype)
        report.written = table.num_rows
        write_part(part_path(out_dir, k), table, fps[k], report, backbone.device)
        if on_shard_written is not None:
            on_shard_written(k)
    listing = Listing([], Report("embed"), sources, {"layout": "precomputed embeddings"})
    return listing, fps
