"""The text side of an embeddings folder: texts.arrow (VG questions and answers). (The
CLIP token-embedding table lives in the CLIP folder: `pipeline.clip.token_table`.)"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.embedding.encoders import encode_token_ids, tokenize_checked
from pipeline.embedding.shards import TEXTS_FILE, finished, write_part
from pipeline.embedding.tables import texts_table
from pipeline.report import Report

if TYPE_CHECKING:
    from pipeline.stages.embed import Settings


def write_texts(
    out_dir: Path, rows: list[tuple[str, str, str]], backbone, settings: Settings, fp: str
) -> None:
    """texts.arrow: id, kind, text, text_emb (skipped when already complete)."""
    path = out_dir / TEXTS_FILE
    if finished(path, fp) is not None:
        return
    report = Report("embed")
    ids = [r[0] for r in rows]
    tokens = tokenize_checked(backbone, [r[2] for r in rows], ids, report, "text_truncated")
    emb = encode_token_ids(backbone, tokens, settings.text_batch_size)
    table = texts_table(rows, emb, backbone.dim, settings.dtype)
    report.written = table.num_rows
    write_part(path, table, fp, report, backbone.device)
