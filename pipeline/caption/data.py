"""Caption data from the embed stage's cached Arrow files (no image decoding).

`data/emb/laion` and `data/emb/flickr30k` hold one row per caption: `image_emb`
(fixed_size_list<float16>[d]), `token_ids` (list<int32>, BOS ... EOS), `split`, ids.
The shards are memory-mapped (`pipeline.embedding.files`); only the rows of the requested splits
are copied into tensors. Token ids are right-padded into a (n, L) tensor with their
lengths; captions longer than `max_len` are cut to `max_len` tokens ending in EOS.
The token-embedding table comes from the CLIP (`pipeline.clip.token_table`), checked
against the fingerprint the manifests record.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from pipeline.caption.shift import TargetShift
from pipeline.clip.token_table import TokenTable, clip_token_table
from pipeline.embedding.files import read_dataset, vectors
from pipeline.errors import UserError
from pipeline.readers import read_json


@dataclass
class CaptionSet:
    """Caption rows of some splits of one embedding folder, as tensors."""

    image_emb: torch.Tensor  # (n, d) one row per caption, dtype as stored (float16)
    ids: torch.Tensor  # (n, L) int64, right-padded with pad id
    lengths: torch.Tensor  # (n,) int64 tokens incl. BOS and EOS
    image_index: torch.Tensor  # (n,) int64 row -> index into `image_ids`
    image_ids: list[str]  # unique image ids in order of first appearance
    row_ids: list[str]
    captions: list[str]
    truncated: int = 0  # captions cut to max_len
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    def subset_images(self, keep: torch.Tensor) -> CaptionSet:
        """The rows of the images `keep` (indices into `image_ids`), in file order."""
        chosen = torch.zeros(len(self.image_ids), dtype=torch.bool)
        chosen[keep] = True
        rows = chosen[self.image_index].nonzero().squeeze(1)
        new_index = torch.cumsum(chosen.long(), 0) - 1  # old image index -> new
        pick = rows.tolist()
        return CaptionSet(
            image_emb=self.image_emb[rows.to(self.image_emb.device)],
            ids=self.ids[rows.to(self.ids.device)],
            lengths=self.lengths[rows.to(self.lengths.device)],
            image_index=new_index[self.image_index[rows]],
            image_ids=[i for i, c in zip(self.image_ids, chosen.tolist()) if c],
            row_ids=[self.row_ids[r] for r in pick],
            captions=[self.captions[r] for r in pick],
            truncated=self.truncated,
            skipped=dict(self.skipped),
        )


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise UserError(f"{folder}: no manifest.json (run the embed stage first)")
    return read_json(path)


def _pad_token_ids(
    column: pa.ChunkedArray | pa.Array, rows: np.ndarray, max_len: int, pad_id: int, eos_id: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Gather `rows` of a list<int32> column into a padded (n, L) int64 array."""
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = col.offsets.to_numpy()
    values = col.values.to_numpy(zero_copy_only=False)
    starts = offsets[rows]
    full = offsets[rows + 1] - starts
    lengths = np.minimum(full, max_len)
    width = int(lengths.max()) if len(rows) else 2
    pos = np.arange(width)
    valid = pos[None, :] < lengths[:, None]
    out = np.full((len(rows), width), pad_id, dtype=np.int64)
    out[valid] = values[(starts[:, None] + pos[None, :])[valid]]
    cut = full > max_len
    if cut.any():
        out[cut, max_len - 1] = eos_id
    return out, lengths.astype(np.int64), int(cut.sum())


def load_captions(
    folder: str | Path,
    splits: tuple[str, ...] | list[str] = ("train",),
    max_len: int = 32,
    pad_id: int = 0,
    eos_id: int = 2,
    emb_column: str = "image_emb",
) -> CaptionSet:
    """Rows of `splits` from an embedding folder, each with the vector `emb_column` (the
    image's, or `text_emb`: the caption's own). Rows without token ids, or with fewer
    than 2 tokens, are skipped and counted in `.skipped` by reason."""
    table = read_dataset(folder)
    need = {"id", "image_id", "split", emb_column, "token_ids", "caption"}
    missing = need - set(table.column_names)
    if missing:
        raise UserError(f"{folder}: embedding table lacks columns {sorted(missing)}")
    split = np.asarray(table.column("split").to_pylist(), dtype=object)
    tok = table.column("token_ids")
    null = tok.is_null().to_numpy(zero_copy_only=False).astype(bool)
    lens = pc.list_value_length(tok).fill_null(0).to_numpy().astype(np.int64)
    in_split = np.isin(split, list(splits))
    bad_null, bad_short = in_split & null, in_split & ~null & (lens < 2)
    rows = np.flatnonzero(in_split & ~bad_null & ~bad_short)
    # null token ids: a row without a caption (embed keeps its image, noted empty_caption)
    skipped = {k: int(v.sum()) for k, v in (("empty_caption", bad_null), ("too_short", bad_short))}
    ids, lengths, cut = _pad_token_ids(tok, rows, max_len, pad_id, eos_id)
    emb = vectors(table.column(emb_column))
    image_ids = table.column("image_id").take(pa.array(rows)).to_pylist()
    uniq: dict[str, int] = {}
    index = [uniq.setdefault(i, len(uniq)) for i in image_ids]
    return CaptionSet(
        image_emb=torch.from_numpy(np.ascontiguousarray(emb[rows])),
        ids=torch.from_numpy(ids),
        lengths=torch.from_numpy(lengths),
        image_index=torch.tensor(index, dtype=torch.long),
        image_ids=list(uniq),
        row_ids=table.column("id").take(pa.array(rows)).to_pylist(),
        captions=table.column("caption").take(pa.array(rows)).to_pylist(),
        truncated=cut,
        skipped={k: v for k, v in skipped.items() if v},
    )


def load_images(
    folder: str | Path, splits: tuple[str, ...] | list[str]
) -> tuple[list[str], torch.Tensor]:
    """Unique image ids and embeddings (n_images, d) of `splits` (captions ignored)."""
    table = read_dataset(folder)
    split = np.asarray(table.column("split").to_pylist(), dtype=object)
    rows = np.flatnonzero(np.isin(split, list(splits)))
    image_ids = table.column("image_id").take(pa.array(rows)).to_pylist()
    first: dict[str, int] = {}
    for r, i in zip(rows.tolist(), image_ids):
        first.setdefault(i, r)
    emb = vectors(table.column("image_emb"))
    keep = np.fromiter(first.values(), dtype=np.int64, count=len(first))
    return list(first), torch.from_numpy(np.ascontiguousarray(emb[keep]))


def labelled_images(captions: CaptionSet, fraction: float, seed: int) -> CaptionSet:
    """The captions of a seeded random `fraction` of the images (all captions of an image
    are kept or dropped together): round(fraction x images), at least one if fraction > 0.
    The images are the first of one seeded permutation, so a smaller fraction's images
    are among a larger one's."""
    n = len(captions.image_ids)
    k = min(n, max(1, round(fraction * n))) if fraction > 0 else 0
    if k == n:
        return captions
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return captions.subset_images(perm[:k])


def split_images(captions: CaptionSet, n: int, seed: int) -> tuple[CaptionSet, CaptionSet]:
    """(the rest, the captions of `n` images drawn by a seeded permutation), file order."""
    perm = torch.randperm(len(captions.image_ids), generator=torch.Generator().manual_seed(seed))
    n = min(n, len(perm))
    return captions.subset_images(perm[n:]), captions.subset_images(perm[:n])


@dataclass
class TrainingData:
    """What `train_caption` reads: LAION and Flickr30k captions, the two domains' images,
    the shared token table and the CLIP they all come from (all on the training device)."""

    laion: CaptionSet  # LAION train captions (pretrain, adapt, finetune)
    laion_val: CaptionSet  # those of the held-out LAION images (`laion_val_images`)
    flickr30k_train: CaptionSet  # all Flickr30k train captions (they fix the finetune epoch)
    flickr30k_labelled: CaptionSet  # those of the labelled train images (finetune)
    flickr30k_val: CaptionSet  # Flickr30k val captions (validation loss)
    source_images: torch.Tensor  # (n, d) one embedding per LAION train image, captioned or not
    target_images: torch.Tensor  # (m, d) one per Flickr30k image of the target splits
    token_table: torch.Tensor  # (vocab, width) float32, on the CPU
    special_ids: dict[str, int]  # bos_token_id, eos_token_id, pad_token_id
    clip: dict[str, Any]  # model, revision, dim and token_embedding of the manifests
    flickr30k_text: CaptionSet | None = None  # all Flickr30k train captions with their
    # text embeddings in `image_emb` (the text arm; None: not loaded)
    flickr30k_val_text: CaptionSet | None = None  # the val captions with their unit text
    # embeddings (the selection set of a text arm without labelled images)

    @property
    def image_dim(self) -> int:
        return int(self.laion.image_emb.shape[1])


def same_clip(laion: dict[str, Any], flickr30k: dict[str, Any]) -> dict[str, Any]:
    """The CLIP both manifests name; a `UserError` if they name different ones."""
    keys = ("model", "revision", "dim")
    a, b = ({k: m.get(k) for k in keys} for m in (laion, flickr30k))
    if a != b:
        raise UserError(
            f"LAION and Flickr30k embeddings come from different CLIP models: {a} vs {b}"
        )
    return {**a, "token_embedding": laion.get("token_embedding", {})}


def check_token_table(table: TokenTable, clip: dict[str, Any], name: str, emb: str) -> None:
    """A `UserError` unless `table` (of the CLIP `name`) is the one the embeddings in `emb`
    were made with (`clip`, as `same_clip` gives): the same table by the manifests'
    `sha256`, or for manifests without one, the same CLIP revision."""
    want_sha = clip["token_embedding"].get("sha256")
    have, want = (table.sha256, want_sha) if want_sha else (table.revision, clip["revision"])
    if have != want:
        tables = f": token table {have}, theirs {want}" if want_sha else ""
        raise UserError(
            f"CLIP {name} ({table.revision}) is not the one the embeddings in {emb} were "
            f"made with ({clip['model']}, {clip['revision']}){tables}"
        )


def load_training_data(
    laion: str | Path,
    flickr30k: str | Path,
    clip: str | Path | None,
    max_len: int,
    target_splits: tuple[str, ...] | list[str],
    device: torch.device,
    labelled_fraction: float = 1.0,
    labelled_seed: int = 0,
    shift: TargetShift | None = None,
    laion_val_images: int = 0,
    text: bool = False,
) -> TrainingData:
    """LAION train and Flickr30k train/val captions cut to `max_len` tokens, the captions
    of a `labelled_fraction` of the Flickr30k train images (`labelled_images`, seeded by
    `labelled_seed`), the images of both domains (Flickr30k: those of `target_splits`),
    moved to `device`; the token table of the CLIP `clip` (None: the CLIP the manifests
    name), which must be the one the embeddings were made with. `shift` (the offset
    control) moves every Flickr30k image embedding. The captions of `laion_val_images`
    LAION images (drawn with `labelled_seed`) are held out of `laion` as `laion_val`; the
    discriminator still sees every LAION image. With `text`, also every Flickr30k train
    caption with its CLIP text embedding (`flickr30k_text`; the offset control leaves it:
    it moves images) and every val caption with its unit text embedding
    (`flickr30k_val_text`)."""
    info = same_clip(read_manifest(laion), read_manifest(flickr30k))
    if not (clip or info["model"]):
        raise UserError(f"{laion}/manifest.json names no CLIP: pass one with --clip")
    name = str(clip or info["model"])
    table = clip_token_table(name)
    check_token_table(table, info, name, f"{laion} and {flickr30k}")
    tok = info["token_embedding"]
    special = {k: int(tok[k]) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    ids = {"max_len": max_len, "pad_id": special["pad_token_id"], "eos_id": special["eos_token_id"]}
    source = load_captions(laion, ("train",), **ids)
    f_train = load_captions(flickr30k, ("train",), **ids)
    f_val = load_captions(flickr30k, ("val",), **ids)
    f_text = load_captions(flickr30k, ("train",), **ids, emb_column="text_emb") if text else None
    f_val_text = None
    if text:
        f_val_text = load_captions(flickr30k, ("val",), **ids, emb_column="text_emb")
        f_val_text.image_emb = torch.nn.functional.normalize(f_val_text.image_emb.float(), dim=-1)
    if len(source) == 0 or len(f_train) == 0:
        raise UserError(
            f"no training captions (LAION {len(source)}, Flickr30k train {len(f_train)})"
        )
    if shift is not None:
        for cs in (f_train, f_val):
            cs.image_emb = shift.apply(cs.image_emb)
    f_labelled = labelled_images(f_train, labelled_fraction, labelled_seed)
    source, source_val = split_images(source, laion_val_images, labelled_seed)
    if len(source) == 0:
        raise UserError(f"train_caption.laion_val_images: {laion_val_images} held-out LAION "
                        "images leave no LAION caption to train on")  # fmt: skip
    _, src_images = load_images(laion, ("train",))  # with the images that have no caption
    src_images = src_images.to(device)
    _, tgt_images = load_images(flickr30k, tuple(target_splits))
    tgt_images = shift.apply(tgt_images) if shift is not None else tgt_images
    if len(tgt_images) == 0:
        raise UserError(f"no Flickr30k images in target_splits {list(target_splits)}")
    sets = (source, source_val, f_train, f_labelled, f_val,
            *(c for c in (f_text, f_val_text) if c is not None))  # fmt: skip
    for cs in {id(c): c for c in sets}.values():
        # small enough to live on the device (145k x 512 fp16)
        cs.image_emb, cs.ids, cs.lengths = (
            x.to(device) for x in (cs.image_emb, cs.ids, cs.lengths)
        )
    return TrainingData(
        source, source_val, f_train, f_labelled, f_val, src_images, tgt_images.to(device),
        table.weight, special, info, f_text, f_val_text,
    )  # fmt: skip
