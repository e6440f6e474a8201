"""manifest.json + report.json of an embeddings folder, written by whichever process sees
every shard (and texts.arrow) finished.

The manifest names the CLIP (model, revision), where that checkpoint came from (`origin`:
the folder's `clip_source.json` from clip_bootstrap and `open_clip.json` from
convert-open-clip, where present) and the facts of its token table (size, special ids,
`sha256`: `pipeline.clip.token_table.table_sha256`); the table itself is in the CLIP
folder."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from pipeline.atomic import write_json
from pipeline.clip.token_table import table_sha256
from pipeline.embedding.items import Listing
from pipeline.embedding.provenance import checkpoint_origin
from pipeline.embedding.shards import (
    FORMAT_VERSION,
    MANIFEST,
    REPORT,
    TEXTS_FILE,
    finished,
    part_path,
)
from pipeline.report import Report


def merge_image_counts(a: dict, b: dict) -> dict:
    """Sum two `{"read", "written", "skipped_by_reason"}` image-count dicts."""
    skipped = Counter(a.get("skipped_by_reason", {}))
    skipped.update(b.get("skipped_by_reason", {}))
    return {
        "read": a.get("read", 0) + b.get("read", 0),
        "written": a.get("written", 0) + b.get("written", 0),
        "skipped_by_reason": dict(sorted(skipped.items())),
    }


def finalize(
    out_dir: Path,
    dataset: str,
    fps: list[str],
    texts_fp: str | None,
    listing: Listing,
    backbone,
    dtype: str,
    input_path: Path,
) -> Report | None:
    """manifest.json + report.json once every shard (and texts.arrow) is complete; the
    stage report, or None while some part is missing."""
    report = Report("embed")
    report.merge(listing.report)
    shard_rows, runtimes = [], []
    images = listing.extra.get("images")
    for k, fp in enumerate(fps):
        done = finished(part_path(out_dir, k), fp)
        if done is None:
            return None
        report.merge(done[0])
        shard_rows.append(done[1])
        runtimes.append(done[0].extra.get("runtime"))
        if images is not None:
            images = merge_image_counts(images, done[0].extra.get("images", {}))
    texts_rows = None
    if texts_fp is not None:
        done = finished(out_dir / TEXTS_FILE, texts_fp)
        if done is None:
            return None
        texts_report, texts_rows = done
        runtimes.append(texts_report.extra.get("runtime"))
        texts_report.written = 0  # `written` counts image / caption rows
        report.merge(texts_report)
    report.extra = {
        "dataset": dataset,
        "input": str(input_path),
        **listing.extra,
        **({"images": images} if images is not None else {}),
        "images_listed": len(listing.items),
        "shards": len(fps),
        "shard_rows": shard_rows,
    }
    if texts_rows is not None:
        report.extra["texts_written"] = texts_rows
    report.save(out_dir / REPORT)
    manifest = {
        "model": backbone.model_id,
        "revision": backbone.revision,
        **({"origin": origin} if (origin := checkpoint_origin(backbone.model_id)) else {}),
        "dataset": dataset,
        "dim": backbone.dim,
        "dtype": dtype,
        "normalized": True,
        "rows": sum(shard_rows),
        "shards": len(fps),
        "files": [part_path(out_dir, k).name for k in range(len(fps))]
        + ([TEXTS_FILE] if texts_fp else []),
        "texts_rows": texts_rows,
        "image_size": backbone.image_size,
        "context_length": backbone.context_length,
        "sources": listing.sources,
        "token_embedding": {  # the table: in the CLIP folder (`pipeline.clip.token_table`)
            "vocab_size": int(backbone.model.config.text_config.vocab_size),
            "width": int(backbone.model.config.text_config.hidden_size),
            "bos_token_id": backbone.bos_token_id,
            "eos_token_id": backbone.eos_token_id,
            "pad_token_id": backbone.pad_token_id,
            "sha256": table_sha256(backbone.token_embedding()),
        },
        "format_version": FORMAT_VERSION,
        # what wrote the parts (`pipeline.runtime`): one entry per distinct runtime
        "runtime": [r for i, r in enumerate(runtimes) if r and r not in runtimes[:i]],
    }
    if texts_fp is None:
        del manifest["texts_rows"]
    write_json(out_dir / MANIFEST, manifest)
    return report
