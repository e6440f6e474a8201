"""`clipda export`: an embeddings folder -> the clip-retrieval layout (npy, parquet, faiss)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.embedding import export
from pipeline.embedding.files import read_dataset, vectors, write_table
from pipeline.embedding.tables import caption_table, image_table
from pipeline.formats import laion
from pipeline.report import Report

DIM = 16


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    mat = rng.standard_normal((n, DIM)).astype(np.float32)
    return mat / np.linalg.norm(mat, axis=1, keepdims=True)


def manifest(folder: Path, dataset: str, dtype: str, rows: int) -> None:
    info = {"model": "tiny-clip", "revision": "r1", "dataset": dataset, "dim": DIM,
            "dtype": dtype, "normalized": True, "rows": rows}  # fmt: skip
    (folder / "manifest.json").write_text(json.dumps(info))


def make_captions(folder: Path, n: int = 300, dtype: str = "float16", per_image: int = 1) -> Path:
    """A caption-shaped embeddings folder of `n` rows in three shards, `per_image` caption
    rows per image (1: LAION, 5: Flickr30k); row 5 is an image without a caption."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    cuts = [0, n // 3, 2 * n // 3, n]
    for k, (a, b) in enumerate(itertools.pairwise(cuts)):
        keys = [f"{i // per_image:09d}" for i in range(a, b)]
        captions = [None if i == 5 else f"a red circle {i}" for i in range(a, b)]
        rows = {"id": [f"{key}#{i % per_image}" for key, i in zip(keys, range(a, b))],
                "image_id": keys, "split": [("train", "val", "test")[int(k) % 3] for k in keys],
                "caption": captions,
                "token_ids": [None if c is None else [1, 5, 2] for c in captions]}  # fmt: skip
        table = caption_table(rows, unit(rng, b - a), unit(rng, b - a), DIM, dtype)
        write_table(folder / f"part-{k:05d}.arrow", table)
    manifest(folder, "laion", dtype, n)
    return folder


def make_vg(folder: Path) -> Path:
    """A vg-shaped folder: whole images (box null) and crops, no captions, no text_emb."""
    folder.mkdir(parents=True)
    rows = {"id": ["1", "1@0,0,4,4", "2", "2@1,2,3,4"], "image_id": ["1", "1", "2", "2"],
            "box": [None, [0, 0, 4, 4], None, [1, 2, 3, 4]]}  # fmt: skip
    write_table(folder / "part-00000.arrow", image_table(rows, unit(np.random.default_rng(1), 4),
                                                         DIM, "float32"))  # fmt: skip
    manifest(folder, "vg", "float32", 4)
    return folder


def invoke(*args):
    """`clipda export ARGS` in-process."""
    return CliRunner().invoke(app, ["export", *map(str, args)])


def one_error(res, fragment: str) -> None:
    out = res.output.strip()
    assert res.exit_code == 2 and len(out.splitlines()) == 1, (res.exit_code, res.output)
    assert out.startswith("error: ") and fragment in out, out


def read_back(out: Path):
    """Every chunk through the LAION precomputed reader (what `embed --input out` uses)."""
    report = Report("t")
    rows = [laion.read_precomputed(c, report) for c in laion.precomputed_chunks(out)]
    return rows, report


@pytest.mark.parametrize("dtype,per_image", [("float16", 1), ("float32", 1), ("float16", 5)])
def test_round_trip_through_the_laion_reader(tmp_path, dtype, per_image):
    src = make_captions(tmp_path / "emb", dtype=dtype, per_image=per_image)
    out = tmp_path / "out"
    res = invoke("--emb", src, "--out", out, "--rows-per-file", 128)
    assert res.exit_code == 0, res.output
    assert "300 rows" in res.output and "image.index + text.index" in res.output
    names = sorted(p.name for p in (out / "img_emb").iterdir())
    assert names == ["img_emb_0.npy", "img_emb_1.npy", "img_emb_2.npy"]  # 128 + 128 + 44 rows
    assert max(p.name for p in (out / "metadata").iterdir()) == "metadata_2.parquet"
    table = read_dataset(src)
    stored = {c: vectors(table.column(c)).copy() for c in ("image_emb", "text_emb")}
    no_text = table.column("text_emb").is_null().to_numpy(zero_copy_only=False)
    assert no_text.sum() == 1 and stored["text_emb"][no_text].any()  # values under the null
    stored["text_emb"][no_text] = 0  # written as a zero vector: no text
    for kind, col in (("img_emb", "image_emb"), ("text_emb", "text_emb")):
        mats = [np.load(out / kind / f"{kind}_{i}.npy") for i in range(3)]
        assert all(m.dtype == np.dtype(dtype) for m in mats)  # the stored dtype is kept
        assert np.array_equal(np.concatenate(mats), stored[col])  # byte for byte
    rows, report = read_back(out)
    assert report.skipped == {} and report.read == 300 and report.noted["empty_caption"] == 1
    assert [i for r in rows for i in r.ids] == table.column("id").to_pylist()
    assert [i for r in rows for i in r.image_ids] == table.column("image_id").to_pylist()
    assert [c for r in rows for c in r.captions] == table.column("caption").to_pylist()
    assert [x for r in rows for x in r.splits] == table.column("split").to_pylist()
    # another tool's folder (no export.json): its `id` / `split` columns are not ours
    (out / "export.json").rename(tmp_path / "export.json")
    foreign, _ = read_back(out)
    assert [i for r in foreign for i in r.ids] == [f"{k}#0" for k in table["image_id"].to_pylist()]
    assert {x for r in foreign for x in r.splits} == {"train"}
    (tmp_path / "export.json").rename(out / "export.json")
    captioned = np.array([c is not None for c in table.column("caption").to_pylist()])
    for got, col in ((np.concatenate([r.image_emb for r in rows]), "image_emb"),
                     (np.concatenate([r.text_emb for r in rows]), "text_emb")):  # fmt: skip
        want = stored[col].astype(np.float32)  # the reader renormalises: within float eps
        keep = captioned if col == "text_emb" else slice(None)  # no caption: text unused
        unit_want = want[keep] / np.linalg.norm(want[keep], axis=1, keepdims=True)
        assert np.allclose(got[keep], unit_want, atol=1e-6)
    meta = pq.read_table(out / "metadata" / "metadata_0.parquet")
    assert meta.column_names == ["key", "caption", "id", "split"]
    info = json.loads((out / "export.json").read_text())
    assert (info["model"], info["revision"], info["rows"], info["files"]) == ("tiny-clip", "r1",
                                                                              300, 3)  # fmt: skip
    assert info["dtype"] == dtype and info["index"]["factory"] == "Flat"


def test_the_index_finds_each_stored_vector_first(tmp_path):
    out = tmp_path / "out"
    assert invoke("--emb", make_captions(tmp_path / "emb"), "--out", out).exit_code == 0
    assert [p.name for p in (out / "img_emb").iterdir()] == ["img_emb_0.npy"]  # default size
    table = read_dataset(tmp_path / "emb")
    for name, col in (("image", "image_emb"), ("text", "text_emb")):
        index = faiss.read_index(str(out / f"{name}.index"))
        assert index.ntotal == 300 and index.metric_type == faiss.METRIC_INNER_PRODUCT
        rows = np.array([0, 99, 100, 250, 299])
        query = vectors(table.column(col))[rows].astype(np.float32)
        _, found = index.search(query, 3)
        assert found[:, 0].tolist() == rows.tolist()


def test_ivf_indexes_and_dtype_option(tmp_path, monkeypatch):
    src = make_captions(tmp_path / "emb")
    res = invoke("--emb", src, "--out", tmp_path / "ivf", "--index", "IVF8,Flat")
    assert res.exit_code == 0, res.output
    ivf = faiss.read_index(str(tmp_path / "ivf" / "image.index"))
    assert faiss.extract_index_ivf(ivf).nprobe == 8 and ivf.ntotal == 300
    monkeypatch.setattr(export, "FLAT_MAX", 100)  # auto above the threshold: IVF-PQ
    assert export.auto_index(300, DIM) == "IVF64,PQ4np"
    res = invoke("--emb", src, "--out", tmp_path / "pq", "--dtype", "float32")
    assert res.exit_code == 0, res.output
    pq_index = faiss.read_index(str(tmp_path / "pq" / "text.index"))
    assert isinstance(faiss.downcast_index(pq_index), faiss.IndexIVFPQ) and pq_index.ntotal == 300
    assert np.load(tmp_path / "pq" / "img_emb" / "img_emb_0.npy").dtype == np.float32
    assert export.auto_index(10**6, 512) == "IVF4096,PQ128np"


def test_ten_files_or_more_are_zero_padded(tmp_path):
    """As clip-retrieval's writer: N has the digits of the file count, so that name order
    (clip back's metadata glob, autofaiss's npy list) is row order."""
    out = tmp_path / "out"
    assert invoke("--emb", make_captions(tmp_path / "emb", n=30), "--out", out,
                  "--rows-per-file", 3).exit_code == 0  # fmt: skip
    for kind, ext in (("img_emb", "npy"), ("text_emb", "npy"), ("metadata", "parquet")):
        names = sorted(p.name for p in (out / kind).iterdir())
        assert names == [f"{kind}_{i:02d}.{ext}" for i in range(10)]
    keys = [k for name in names for k in pq.read_table(out / kind / name)["key"].to_pylist()]
    assert keys == [f"{i:09d}" for i in range(30)]


def test_padded_files_round_trip_through_the_laion_reader(tmp_path):
    out = tmp_path / "out"
    assert invoke("--emb", make_captions(tmp_path / "emb", n=30), "--out", out,
                  "--rows-per-file", 3).exit_code == 0  # fmt: skip
    rows, report = read_back(out)
    assert report.skipped == {}
    assert [i for r in rows for i in r.image_ids] == [f"{i:09d}" for i in range(30)]


def test_vg_folder_has_no_text(tmp_path):
    out = tmp_path / "out"
    res = invoke("--emb", make_vg(tmp_path / "emb"), "--out", out)
    assert res.exit_code == 0, res.output
    assert "no text_emb" in res.output
    assert sorted(p.name for p in out.iterdir()) == [
        "export.json", "image.index", "img_emb", "metadata"]  # fmt: skip
    meta = pq.read_table(out / "metadata" / "metadata_0.parquet").to_pylist()
    assert meta[1] == {"key": "1@0,0,4,4", "image_id": "1", "box": "0,0,4,4"}
    assert meta[0]["box"] is None
    assert np.load(out / "img_emb" / "img_emb_0.npy").dtype == np.float32


def test_one_line_errors_and_overwrite(tmp_path):
    src = make_captions(tmp_path / "emb", n=30)
    one_error(invoke("--emb", tmp_path, "--out", tmp_path / "o"), "not an embeddings folder")
    vg_text = make_vg(tmp_path / "novec")
    table = read_dataset(vg_text).drop_columns(["image_emb"])
    write_table(vg_text / "part-00000.arrow", table)
    one_error(invoke("--emb", vg_text, "--out", tmp_path / "o"), "no image_emb column")
    one_error(invoke("--emb", src, "--out", tmp_path / "o", "--index", "Nope12"), "--index")
    one_error(invoke("--emb", src, "--out", tmp_path / "o", "--index", "IVF64,Flat"), "train")
    one_error(invoke("--emb", src, "--out", tmp_path / "o", "--rows-per-file", 0), ">= 1")
    one_error(invoke("--emb", src, "--out", tmp_path / "o", "--dtype", "int8"), "--dtype")
    one_error(invoke("--emb", src, "--out", src), "not part of an export")
    out = tmp_path / "out"
    assert invoke("--emb", src, "--out", out, "--rows-per-file", 3).exit_code == 0
    one_error(invoke("--emb", src, "--out", out), "--overwrite")
    res = invoke("--emb", src, "--out", out, "--overwrite")
    assert res.exit_code == 0, res.output
    assert [p.name for p in (out / "img_emb").iterdir()] == ["img_emb_0.npy"]  # old files gone
    (out / "notes.txt").write_text("mine")
    one_error(invoke("--emb", src, "--out", out, "--overwrite"), "not part of an export")


def test_embed_takes_the_export_as_precomputed_input(tmp_path):
    from tiny_clip import make_tiny_clip

    from pipeline.clip.backbone import load_backbone
    from pipeline.embedding.dataset import embed_dataset
    from pipeline.settings import Split
    from pipeline.stages.embed import Settings

    bb = load_backbone(make_tiny_clip(tmp_path / "clip"))
    assert bb.dim == DIM
    src = make_captions(tmp_path / "emb", n=40)
    assert invoke("--emb", src, "--out", tmp_path / "x", "--rows-per-file", 16).exit_code == 0
    settings = Settings(num_workers=0, shard_size=16, dtype="float16")
    report = embed_dataset("laion", tmp_path / "x", tmp_path / "again", bb, settings, Split())
    assert report.written == 40
    before, after = read_dataset(src), read_dataset(tmp_path / "again")
    for col in ("id", "image_id", "caption"):  # (the fixture's token ids are made up)
        assert after.column(col).to_pylist() == before.column(col).to_pylist()
    for col in ("token_ids", "text_emb"):  # the row without a caption: null both ways
        assert after.column(col).is_null().to_pylist() == before.column(col).is_null().to_pylist()
    captioned = before.column("caption").is_valid().to_numpy(zero_copy_only=False)
    for col in ("image_emb", "text_emb"):  # renormalised in float32, stored in float16 again
        a, b = (vectors(t.column(col)).astype(np.float32) for t in (after, before))
        rows = captioned if col == "text_emb" else slice(None)
        assert np.abs(a[rows] - b[rows]).max() <= 1e-3
    assert not vectors(after.column("text_emb"))[~captioned].any()  # zeros under the null


class FakeGpuIndex:
    """What the fake index_cpu_to_gpu returns: the CPU index behind a proxy that faiss's
    write_index and extract_index_ivf refuse, as they refuse a real GPU index."""

    def __init__(self, index, gpu: int):
        self.inner, self.gpu = index, gpu

    def __getattr__(self, name):
        if name == "this":  # SWIG's handle: without it, no faiss function takes the proxy
            raise AttributeError(name)
        return getattr(self.inner, name)


def fake_gpus(monkeypatch, count: int = 2, whole=lambda index: True) -> dict[str, list]:
    """faiss with GPU support and `count` GPUs on this CPU-only machine; the calls made.
    `whole(index)` False: faiss has no GPU version of that index (index_cpu_to_gpu raises)."""
    calls: dict[str, list] = {"to_gpu": [], "to_cpu": []}

    def to_gpu(res, gpu, index):
        assert isinstance(res, faiss.StandardGpuResources)
        name = type(faiss.downcast_index(index)).__name__
        calls["to_gpu"].append((gpu, name))
        if isinstance(faiss.downcast_index(index), faiss.IndexFlat):
            return index  # (a clustering index must be a real faiss index)
        if not whole(index):
            raise RuntimeError(f"Error in faiss::gpu: no GPU version of {name}")
        return FakeGpuIndex(index, gpu)

    def to_cpu(index):
        assert isinstance(index, FakeGpuIndex)
        calls["to_cpu"].append(index.gpu)
        return index.inner

    monkeypatch.setattr(faiss, "StandardGpuResources", type("Res", (), {}), raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: count)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", to_cpu, raising=False)
    return calls


@pytest.mark.parametrize("device,gpu", [("cuda:1", 1), ("cuda", 0), ("auto", 0)])
def test_the_index_is_built_on_the_asked_gpu_and_saved_as_a_cpu_index(
    tmp_path, monkeypatch, device, gpu
):
    calls = fake_gpus(monkeypatch, count=2)
    src, out = make_captions(tmp_path / "emb"), tmp_path / "out"
    res = invoke("--emb", src, "--out", out, "--device", device, "--index", "IVF8,Flat")
    assert res.exit_code == 0, res.output
    assert f"built on cuda:{gpu})" in res.output
    # a check before anything is written, then image.index and text.index
    assert calls["to_gpu"] == [(gpu, "IndexIVFFlat")] * 3 and calls["to_cpu"] == [gpu, gpu]
    info = json.loads((out / "export.json").read_text())["index"]
    assert info["built_on"] == f"cuda:{gpu}" and info["nprobe"] == 8
    table = read_dataset(src)
    for name, col in (("image", "image_emb"), ("text", "text_emb")):
        index = faiss.read_index(str(out / f"{name}.index"))  # a CPU index, readable here
        assert faiss.extract_index_ivf(index).nprobe == 8 and index.ntotal == 300
        _, found = index.search(vectors(table.column(col))[[0, 299]].astype(np.float32), 1)
        assert found[:, 0].tolist() == [0, 299]


def test_an_ivf_index_without_a_gpu_version_trains_its_kmeans_on_the_gpu(tmp_path, monkeypatch):
    calls = fake_gpus(monkeypatch, whole=lambda index: False)  # e.g. PQ128 codes
    out = tmp_path / "out"
    res = invoke("--emb", make_captions(tmp_path / "emb"), "--out", out, "--device", "cuda:1",
                 "--index", "IVF8,PQ4np")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert calls["to_gpu"] == [(1, "IndexIVFPQ"), (1, "IndexFlat")] * 3 and calls["to_cpu"] == []
    info = json.loads((out / "export.json").read_text())["index"]
    assert info["built_on"] == "cuda:1 (k-means), cpu"
    index = faiss.read_index(str(out / "image.index"))
    assert isinstance(faiss.downcast_index(index), faiss.IndexIVFPQ) and index.ntotal == 300


def test_a_gpu_that_faiss_cannot_use_is_a_one_line_error_or_a_warning(tmp_path, monkeypatch):
    src = make_captions(tmp_path / "emb", n=30)
    if hasattr(faiss, "StandardGpuResources"):  # a faiss-gpu install: make it faiss-cpu
        monkeypatch.delattr(faiss, "StandardGpuResources")
    for device in ("cuda", "cuda:0"):  # asked for: an error, before anything is written
        one_error(invoke("--emb", src, "--out", tmp_path / "o", "--device", device),
                  "faiss has no GPU support")  # fmt: skip
        assert not (tmp_path / "o").exists()
    one_error(invoke("--emb", src, "--out", tmp_path / "o", "--device", "gpu"), "--device must")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    res = invoke("--emb", src, "--out", tmp_path / "a")  # auto, no GPU anywhere: quiet
    assert res.exit_code == 0 and "warning" not in res.output and "built on cpu" in res.output
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)  # auto, a GPU faiss cannot use
    res = invoke("--emb", src, "--out", tmp_path / "b")
    assert res.exit_code == 0, res.output
    assert "warning: faiss has no GPU support" in res.output and "built on cpu" in res.output
    calls = fake_gpus(monkeypatch, count=2, whole=lambda index: False)
    one_error(invoke("--emb", src, "--out", tmp_path / "o", "--device", "cuda:2"),
              "faiss sees 2 GPU(s)")  # fmt: skip
    one_error(invoke("--emb", src, "--out", tmp_path / "o", "--device", "cuda", "--index",
                     "HNSW8"), "cannot build a 'HNSW8' index on a GPU")  # fmt: skip
    res = invoke("--emb", src, "--out", tmp_path / "c", "--index", "HNSW8")  # auto: the CPU
    assert res.exit_code == 0, res.output
    assert "warning: faiss cannot build a 'HNSW8' index" in res.output
    assert json.loads((tmp_path / "c" / "export.json").read_text())["index"]["built_on"] == "cpu"
    assert calls["to_cpu"] == []
