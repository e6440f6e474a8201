"""The text side of an embeddings folder: texts.arrow (VG questions and answers) and the
CLIP token-embedding table (`token_embedding.safetensors`, the caption decoder's input
and output space)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.atomic import atomic_path
from pipeline.embedding.encoders import encode_token_ids, tokenize_checked
from pipeline.embedding.shards import TEXTS_FILE, TOKEN_TABLE, finished, write_part
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
    write_part(path, table, fp, report)


def write_token_table(out_dir: Path, backbone) -> None:
    """The text model's token-embedding matrix, tagged with the model revision."""
    from safetensors.torch import save_file

    weight = backbone.token_embedding().contiguous()
    meta = {"revision": backbone.revision}  # one key: safetensors orders keys arbitrarily
    with atomic_path(out_dir / TOKEN_TABLE) as tmp:
        save_file({"weight": weight}, str(tmp), metadata=meta)


def token_table_ok(out_dir: Path, backbone) -> bool:
    """Whether the token table is there and comes from this model revision."""
    from safetensors import SafetensorError, safe_open

    path = out_dir / TOKEN_TABLE
    if not path.exists():
        return False
    try:
        with safe_open(str(path), "pt") as fh:
            return (fh.metadata() or {}).get("revision") == backbone.revision
    except (OSError, SafetensorError):
        return False
