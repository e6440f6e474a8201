"""Export an embeddings folder to the clip-retrieval layout, with faiss indexes.

The layout is what `clip-retrieval inference` writes (clip_inference/writer.py) plus what
`clip-retrieval index` adds (clip_index.py), so that `clip-retrieval back` can serve `out`
as an index folder (clip_back.py reads `image.index`, `text.index`, `metadata/*.parquet`):

    img_emb/img_emb_{N}.npy           (rows, d) in the stored dtype, already L2-normalised
    text_emb/text_emb_{N}.npy         caption datasets only; zeros where a row has no caption
    metadata/metadata_{N}.parquet     caption rows: key (= image_id), caption, id, split;
                                      vg rows: key (= id), image_id, box ("x,y,w,h" or null)
    image.index, text.index           faiss, inner product; faiss id = row number
    export.json                       what was exported; written last (marks a finished export)

N counts from 0, zero-padded to the digits of the file count as clip-retrieval does, so the
name-sorted globs of clip back and autofaiss (embedding-reader) keep the row order.

`--device` (auto | cpu | cuda | cuda:N) picks where the indexes are built. A GPU needs a faiss
with GPU support (faiss-gpu, see docs/gpu.md; faiss-cpu has none). The whole index is built
on the GPU where faiss has a GPU version of it; otherwise an IVF index trains its k-means
there (`clustering_index`) and is filled on the CPU. The index saved is always a CPU index
(`index_gpu_to_cpu`), readable without a GPU. `cuda` asked for where faiss cannot use it is
a UserError; `auto` takes GPU 0 when faiss has GPU support and sees a GPU, else the CPU,
with a warning when torch sees a GPU that this faiss cannot use.
"""

from __future__ import annotations

import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.atomic import atomic_path, write_json
from pipeline.embedding.files import SHARD_GLOB, read_dataset, vectors
from pipeline.errors import UserError
from pipeline.readers import read_json

ROWS_PER_FILE = 1_000_000  # clip-retrieval inference's write_batch_size
FLAT_MAX = 100_000  # `--index auto`: exact IndexFlatIP up to this many rows, else IVF-PQ
TRAIN_MAX = 1 << 20  # rows sampled (float32 in RAM) to train an IVF index
NPROBE = 32  # inverted lists searched per query by an IVF index (saved in the index)
ADD_BATCH = 65_536  # rows converted to float32 at a time while filling an index
LAYOUT = ("img_emb", "text_emb", "metadata", "image.index", "text.index", "export.json")


def auto_index(n: int, d: int) -> str:
    """faiss factory string of `--index auto`: `Flat` (exact) up to FLAT_MAX rows, else
    `IVF{k},PQ{m}np`: k the power of two nearest 4*sqrt(n) (autofaiss's first choice, at
    most 65536), m the largest divisor of d <= d/4 (8-bit codes: d/4 bytes a vector); `np`:
    no polysemous training (index_factory's default for PQ, slow and unused here)."""
    if n <= FLAT_MAX:
        return "Flat"
    k = min(65_536, 2 ** round(math.log2(4 * math.sqrt(n))))
    m = max(x for x in range(1, max(1, d // 4) + 1) if d % x == 0)
    return f"IVF{k},PQ{m}np"


def _save_npy(path: Path, mat: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, mat, allow_pickle=False)


def _float32_rows(files: list[Path], rows: np.ndarray | None = None):
    """float32 batches of the npy files (memory-mapped), all rows or the sorted `rows`."""
    start = 0
    for f in files:
        mat = np.load(f, mmap_mode="r", allow_pickle=False)
        if rows is None:
            for i in range(0, len(mat), ADD_BATCH):
                yield np.ascontiguousarray(mat[i : i + ADD_BATCH], dtype=np.float32)
        else:
            pick = rows[(rows >= start) & (rows < start + len(mat))] - start
            yield np.ascontiguousarray(mat[pick], dtype=np.float32)
        start += len(mat)


def make_index(d: int, key: str):
    """An empty faiss index (inner product) from a factory string; a bad one is a UserError."""
    import faiss

    try:
        return faiss.index_factory(d, key, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        raise UserError(
            f"--index {key!r}: not a faiss index_factory string ({_last(exc)})"
        ) from None


def _last(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1] if text else type(exc).__name__


def index_device(name: str | None) -> int | None:
    """The GPU number (faiss's numbering, as CUDA's) `--device` builds the indexes on, or
    None for the CPU; a GPU asked for that faiss cannot use is a UserError."""
    import faiss

    name = (name or "auto").strip()
    if name == "cpu":
        return None
    if name != "auto" and not re.fullmatch(r"cuda(:\d+)?", name):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {name!r}")
    has_gpu = hasattr(faiss, "StandardGpuResources")
    count = faiss.get_num_gpus() if has_gpu else 0
    if name == "auto":
        if count:
            return 0
        if not has_gpu and _torch_sees_a_gpu():
            print(
                "warning: faiss has no GPU support (faiss-cpu is installed): building the "
                "index on the CPU (docs/gpu.md: installing faiss-gpu)",
                file=sys.stderr,
            )
        return None
    gpu = int(name.partition(":")[2] or 0)
    if not has_gpu:
        raise UserError(
            f"--device {name}: faiss has no GPU support (faiss-cpu is installed; "
            "docs/gpu.md says how to install faiss-gpu), use --device cpu"
        )
    if gpu >= count:
        raise UserError(f"--device {name}: faiss sees {count} GPU(s)")
    return gpu


def _torch_sees_a_gpu() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover (a base dependency)
        return False
    return torch.cuda.is_available()


def _on_gpu(index, gpu: int):
    """(the index to fill, what must live while it fills, where it is built): the whole
    index on GPU `gpu` where faiss has a GPU version of it, else for an IVF index its
    k-means there (`clustering_index`); None where faiss can do neither."""
    import faiss

    res = faiss.StandardGpuResources()
    try:
        return faiss.index_cpu_to_gpu(res, gpu, index), res, f"cuda:{gpu}"
    except RuntimeError:  # e.g. IVF-PQ codes of a size the GPU version lacks
        pass
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:  # not an IVF index
        return None
    flat = faiss.index_cpu_to_gpu(res, gpu, faiss.IndexFlat(ivf.d, ivf.quantizer.metric_type))
    ivf.clustering_index = flat
    return index, (res, flat), f"cuda:{gpu} (k-means), cpu"


def build_index(
    files: list[Path], n: int, d: int, key: str, path: Path, bar, gpu: int | None = None
) -> tuple[int | None, str]:
    """A faiss index (inner product) of the vectors of `files`, trained on a sample of at
    most TRAIN_MAX rows (seed 0) when it needs training, built on GPU `gpu` (None: the
    CPU; see `_on_gpu`), written atomically to `path` as a CPU index; an IVF index gets
    nprobe = min(nlist, NPROBE). Returns (nprobe or None, where it was built)."""
    import faiss

    cpu_index = index = make_index(d, key)
    keep, where = None, "cpu"
    if gpu is not None:
        placed = _on_gpu(cpu_index, gpu)
        if placed is None:
            raise UserError(f"--index {key!r}: faiss cannot build it on cuda:{gpu}")
        index, keep, where = placed
    if not index.is_trained:
        rows = np.sort(np.random.default_rng(0).choice(n, size=min(n, TRAIN_MAX), replace=False))
        sample, at = np.empty((len(rows), d), np.float32), 0  # no second copy of it
        for part in _float32_rows(files, rows):
            sample[at : at + len(part)], at = part, at + len(part)
        try:
            index.train(sample)
        except RuntimeError as exc:  # e.g. fewer rows than the index's centroids
            raise UserError(
                f"--index {key!r}: cannot train it on {n} rows ({_last(exc)})"
            ) from None
    for batch in _float32_rows(files):
        index.add(batch)
        bar.update(len(batch))
    if index is not cpu_index:  # built on the GPU: saved as its CPU copy (a portable file)
        cpu_index = faiss.index_gpu_to_cpu(index)
    nprobe = None
    try:
        ivf = faiss.extract_index_ivf(cpu_index)
        ivf.nprobe = nprobe = min(ivf.nlist, NPROBE)
        ivf.clustering_index = None  # the GPU k-means index, if any: not part of it
    except RuntimeError:  # not an IVF index
        pass
    with atomic_path(path) as tmp:
        faiss.write_index(cpu_index, str(tmp))
    del index, keep  # the GPU copy and its resources go after the CPU index is written
    return nprobe, where


def _metadata(sl: pa.Table, caption: bool) -> pa.Table:
    if caption:
        cols = {"key": sl.column("image_id"), "caption": sl.column("caption")}
        cols.update({c: sl.column(c) for c in ("id", "split") if c in sl.column_names})
        return pa.table(cols)
    cols = {"key": sl.column("id")}
    if "image_id" in sl.column_names:
        cols["image_id"] = sl.column("image_id")
    if "box" in sl.column_names:  # a string: clip back cannot return list cells
        cols["box"] = pc.binary_join(pc.cast(sl.column("box"), pa.list_(pa.string())), ",")
    return pa.table(cols)


def _clear(out: Path, overwrite: bool) -> None:
    """`out` must be absent or empty; with `overwrite`, a previous (or interrupted) export
    there is removed, but a folder that holds anything else is refused."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    entries = list(out.iterdir()) if out.is_dir() else []
    ours = [
        e for e in entries if e.name in LAYOUT or e.name.startswith(".") and e.name.endswith(".tmp")
    ]
    if len(ours) != len(entries):
        raise UserError(f"--out {out} holds files that are not part of an export")
    if entries and not overwrite:
        raise UserError(f"--out {out} is not empty (--overwrite replaces a previous export)")
    for e in ours:
        shutil.rmtree(e) if e.is_dir() else e.unlink()


def main(
    emb: Path,
    out: Path,
    rows_per_file: int = ROWS_PER_FILE,
    dtype: str = "keep",
    index: str = "auto",
    overwrite: bool = False,
    device: str = "auto",
) -> str:
    """Write `emb` (data/emb/<name>) to `out` in the clip-retrieval layout; one-line summary."""
    if not (Path(emb) / "manifest.json").is_file() or not any(Path(emb).glob(SHARD_GLOB)):
        raise UserError(f"{emb}: not an embeddings folder (no manifest.json and {SHARD_GLOB})")
    if rows_per_file < 1:
        raise UserError(f"--rows-per-file must be >= 1, got {rows_per_file}")
    if dtype not in ("keep", "float16", "float32"):
        raise UserError(f"--dtype must be keep, float16 or float32, got {dtype!r}")
    manifest = read_json(Path(emb) / "manifest.json")
    table = read_dataset(emb)
    if "image_emb" not in table.column_names:
        raise UserError(f"{emb}: its tables have no image_emb column")
    n, d = table.num_rows, table.schema.field("image_emb").type.list_size
    if n == 0:
        raise UserError(f"{emb}: no rows to export")
    caption = "caption" in table.column_names and "image_id" in table.column_names
    text = "text_emb" in table.column_names
    key = auto_index(n, d) if index == "auto" else "Flat" if index == "flat" else index
    make_index(d, key)  # a bad --index fails before anything is written
    device = (device or "auto").strip()
    gpu = index_device(device)  # and so does a GPU that faiss cannot use
    if gpu is not None and _on_gpu(make_index(d, key), gpu) is None:
        if device != "auto":
            raise UserError(f"--device {device}: faiss cannot build a {key!r} index on a GPU, "
                            "use --device cpu")  # fmt: skip
        print(f"warning: faiss cannot build a {key!r} index on a GPU: building it on the CPU",
              file=sys.stderr)  # fmt: skip
        gpu = None
    out = Path(out)
    _clear(out, overwrite)
    n_files = math.ceil(n / rows_per_file)
    width = len(str(n_files))
    kinds = {"img_emb": "image_emb", **({"text_emb": "text_emb"} if text else {})}
    names = {"image": "img_emb", **({"text": "text_emb"} if text else {})}
    bar = tqdm(
        total=n * (1 + len(names)), desc="export", unit="row", disable=not sys.stderr.isatty()
    )
    for i in range(n_files):  # one file's rows at a time, read from the memory map
        sl = table.slice(i * rows_per_file, rows_per_file)
        num = str(i).zfill(width)
        for kind, col in kinds.items():
            mat = vectors(sl.column(col))
            mat = mat if dtype == "keep" else mat.astype(dtype)
            null = sl.column(col).is_null().to_numpy(zero_copy_only=False)
            if null.any():  # a row without a caption has no text: a zero vector
                mat = np.array(mat)
                mat[null] = 0
            _save_npy(out / kind / f"{kind}_{num}.npy", mat)
        meta = _metadata(sl, caption)
        with atomic_path(out / "metadata" / f"metadata_{num}.parquet") as tmp:
            pq.write_table(meta, tmp)
        bar.update(sl.num_rows)
    for name, kind in names.items():
        files = sorted((out / kind).glob(f"{kind}_*.npy"))
        nprobe, built_on = build_index(files, n, d, key, out / f"{name}.index", bar, gpu)
    bar.close()
    index_files = [f"{name}.index" for name in names]
    write_json(
        out / "export.json",
        {
            "layout": "clip-retrieval",
            "source": str(emb),
            **{k: manifest.get(k) for k in ("dataset", "model", "revision", "normalized")},
            "dim": d,
            "dtype": str(mat.dtype),
            "rows": n,
            "files": n_files,
            "rows_per_file": rows_per_file,
            "metadata_columns": meta.column_names,
            "index": {
                "factory": key,
                "metric": "inner_product",
                "nprobe": nprobe,
                "files": index_files,
                "built_on": built_on,
            },
        },
    )
    note = "" if text else "; no text embeddings (image rows without captions): no text_emb"
    return (
        f"exported {n} rows of {manifest.get('dataset', emb)} ({mat.dtype}, dim {d}) to {out}: "
        f"{n_files} file(s) each of {', '.join(kinds)}, metadata; {' + '.join(index_files)} "
        f"({key}, inner product, built on {built_on}){note}"
    )
