"""The Arrow row layouts of an embeddings folder (see `pipeline.embedding.files` for the files)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from pipeline.embedding.files import vector_array

DTYPES = {"float16": np.float16, "float32": np.float32}


def vectors_f(mat: np.ndarray, dtype: str, null: np.ndarray | None = None):
    """(n, d) floats as a fixed_size_list column of the stored `dtype` (`vector_array`)."""
    return vector_array(np.asarray(mat, dtype=DTYPES[dtype]), null)


def caption_table(
    rows: dict[str, list], image: np.ndarray, text: np.ndarray, dim: int, dtype: str
) -> pa.Table:
    """laion / flickr30k rows: id, image_id, split, image_emb, text_emb, caption, token_ids;
    a row whose caption is None (an image without one) has null text_emb and token_ids."""
    image = image.reshape(-1, dim)
    text = text.reshape(-1, dim)
    no_caption = np.array([c is None for c in rows["caption"]], dtype=bool)
    return pa.table(
        {
            "id": pa.array(rows["id"], pa.string()),
            "image_id": pa.array(rows["image_id"], pa.string()),
            "split": pa.array(rows["split"], pa.string()),
            "image_emb": vectors_f(image, dtype),
            "text_emb": vectors_f(text, dtype, no_caption),
            "caption": pa.array(rows["caption"], pa.string()),
            "token_ids": pa.array(rows["token_ids"], pa.list_(pa.int32())),
        }
    )


def image_table(rows: dict[str, list], image: np.ndarray, dim: int, dtype: str) -> pa.Table:
    """vg rows: id (image id, or `<image_id>@x,y,w,h` for crops), image_id, box, image_emb."""
    return pa.table(
        {
            "id": pa.array(rows["id"], pa.string()),
            "image_id": pa.array(rows["image_id"], pa.string()),
            "box": pa.array(rows["box"], pa.list_(pa.int32())),
            "image_emb": vectors_f(image.reshape(-1, dim), dtype),
        }
    )


def texts_table(rows: list[tuple[str, str, str]], emb: np.ndarray, dim: int, dtype: str):
    """vg texts.arrow rows: id, kind (question | answer), text, text_emb."""
    return pa.table(
        {
            "id": pa.array([r[0] for r in rows], pa.string()),
            "kind": pa.array([r[1] for r in rows], pa.string()),
            "text": pa.array([r[2] for r in rows], pa.string()),
            "text_emb": vectors_f(emb.reshape(-1, dim), dtype),
        }
    )
