"""The embed stage with a tiny CLIP: Arrow output read back zero-copy, resume after a kill,
process sharding, bad inputs counted, the LAION embedding layout taken as is, the CLI."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from pyarrow import ipc
from test_formats_caption import make_laion
from tiny_clip import make_tiny_clip
from typer.testing import CliRunner

from pipeline.clip.backbone import (
    letterbox_resize,
    load_backbone,
    normalize_pixels,
    preprocess_image,
)
from pipeline.clip.token_table import table_sha256
from pipeline.embedding.dataset import embed_dataset
from pipeline.embedding.encoders import PixelNormalizer
from pipeline.embedding.files import read_dataset, read_table, vectors
from pipeline.embedding.shards import parse_shard, resolve_shard
from pipeline.errors import UserError
from pipeline.imagedecode import decode_image, open_rgb, resize_crop
from pipeline.settings import Split, load
from pipeline.stages.embed import Settings

S = Settings(batch_size=4, num_workers=0, shard_size=3, dtype="float16", vg_crops=False)


def run(dataset: str, src: Path, out: Path, bb, settings: Settings = S, **kw):
    """`embed_dataset` with the test settings and the shared split."""
    return embed_dataset(dataset, src, out, bb, settings, Split(), **kw)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def bb(clip_dir):
    return load_backbone(clip_dir)


def _img(seed: int, size=(48, 36)) -> Image.Image:
    rs = np.random.RandomState(seed)
    return Image.fromarray(rs.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _save(img: Image.Image, path: Path, fmt="JPEG", **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kw)
    return path


def make_flickr(root: Path, n: int = 10) -> Path:
    lines = ["image_name| comment_number| comment"]
    for i in range(n):
        _save(_img(i), root / "flickr30k_images" / f"{100 + i}.jpg")
        for k in range(2):
            lines.append(f"{100 + i}.jpg| {k}| a red circle {i} on a blue square {k} .")
    (root / "results.csv").write_text("\n".join(lines) + "\n")
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _content(folder: Path) -> dict[str, object]:
    """The parts' tables and metadata and the manifest, without the `runtime` each process
    records (its threads and deterministic mode differ between a CLI and a test process)."""
    out: dict[str, object] = {}
    for p in sorted(folder.glob("part-*.arrow")):
        table = ipc.open_file(p).read_all()
        meta = {k: v for k, v in (table.schema.metadata or {}).items() if k != b"clipda.runtime"}
        out[p.name] = (table.replace_schema_metadata(None), meta)
    manifest = json.loads((folder / "manifest.json").read_text())
    out["manifest.json"] = {k: v for k, v in manifest.items() if k != "runtime"}
    return out


# --------------------------------------------------------------------------- output


def test_caption_rows_match_the_model(tmp_path, bb):
    src = make_flickr(tmp_path / "f", n=5)
    rep = run("flickr30k", src, tmp_path / "out", bb)
    assert (rep.read, rep.written) == (10, 10)
    table = read_dataset(tmp_path / "out")
    assert table.column_names == [
        "id",
        "image_id",
        "split",
        "image_emb",
        "text_emb",
        "caption",
        "token_ids",
    ]
    assert table.schema.field("image_emb").type == pa.list_(pa.float16(), 16)
    assert table.column("id").to_pylist()[:3] == ["100#0", "100#1", "101#0"]
    captions = table.column("caption").to_pylist()
    assert table.column("token_ids").to_pylist() == bb.tokenize(captions)
    text = vectors(table.column("text_emb")).astype(np.float32)
    assert np.allclose(text, bb.encode_texts(captions).numpy(), atol=2e-3)
    pixels = torch.stack(
        [
            preprocess_image(Image.open(src / "flickr30k_images" / f"{100 + i}.jpg"), 32)
            for i in range(5)
        ]
    )
    expect = bb.encode_images(pixels).numpy()
    image = vectors(table.column("image_emb")).astype(np.float32)
    assert np.allclose(image[::2], expect, atol=2e-3) and np.array_equal(image[0], image[1])
    assert np.allclose(np.linalg.norm(image, axis=1), 1, atol=2e-3)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["revision"] == bb.revision and manifest["dim"] == 16
    assert (manifest["rows"], manifest["shards"], manifest["dtype"]) == (10, 2, "float16")
    # the token table stays in the CLIP folder: the manifest records its facts only
    tok = manifest["token_embedding"]
    assert (tok["vocab_size"], tok["width"]) == tuple(bb.token_embedding().shape)
    assert tok["sha256"] == table_sha256(bb.token_embedding()) and "file" not in tok
    assert not (tmp_path / "out" / "token_embedding.safetensors").exists()
    # what wrote the parts: recorded, not fingerprinted (another thread count recomputes nothing)
    from pipeline.runtime import runtime

    assert manifest["runtime"] == [runtime("cpu")]
    assert manifest["runtime"][0]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    before, written = torch.get_num_threads(), []
    try:
        torch.set_num_threads(before + 1)
        run("flickr30k", src, tmp_path / "out", bb, on_shard_written=written.append)
    finally:
        torch.set_num_threads(before)
    again = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert written == [] and again["runtime"] == manifest["runtime"]


def test_an_old_token_table_is_removed_and_the_shards_kept(tmp_path, bb):
    """A folder from before the table moved to the CLIP folder: no recompute, no table."""
    src = make_flickr(tmp_path / "f", n=4)
    out = tmp_path / "out"
    run("flickr30k", src, out, bb)
    parts = {k: v for k, v in _files(out).items() if k.startswith("part-")}
    (out / "token_embedding.safetensors").write_bytes(b"an old copy of the table")
    written = []
    run("flickr30k", src, out, bb, on_shard_written=written.append)
    assert written == [] and not (out / "token_embedding.safetensors").exists()
    assert {k: v for k, v in _files(out).items() if k.startswith("part-")} == parts


def test_uint8_path_equals_preprocess_image(bb):
    img = _img(3, size=(61, 40))
    norm = PixelNormalizer(bb)
    ours = norm(torch.from_numpy(resize_crop(img, 32)[None]))[0]
    assert torch.equal(ours, preprocess_image(img, 32, bb.mean, bb.std))


def test_arrow_memory_mapped_zero_copy(tmp_path, bb):
    src = make_flickr(tmp_path / "f", n=3)
    run("flickr30k", src, tmp_path / "out", bb, replace(S, shard_size=100))
    path = tmp_path / "out" / "part-00000.arrow"
    source = pa.memory_map(str(path), "r")
    table = ipc.open_file(source).read_all()
    mat = vectors(table.column("image_emb"))
    source.seek(0)
    whole = source.read_buffer()  # the whole mapping, zero-copy
    assert whole.address <= mat.ctypes.data < whole.address + whole.size
    region = np.frombuffer(whole, dtype=np.uint8)
    assert np.shares_memory(mat, region)  # the numpy view points into the mapped file
    assert mat.shape == (6, 16) and mat.dtype == np.float16 and not mat.flags.owndata
    before = pa.total_allocated_bytes()
    table = read_table(path)
    view = vectors(table.column("text_emb"))
    assert pa.total_allocated_bytes() - before == 0  # nothing copied into Arrow memory
    assert view.shape == (6, 16)
    with pytest.raises(ValueError):  # the mapping is read-only
        view[0, 0] = 1


# --------------------------------------------------------------------------- resume, shards


def test_killed_run_resumes_to_identical_output(tmp_path, bb):
    src = make_flickr(tmp_path / "f", n=10)  # 4 shards of 3, 3, 3, 1 images
    run("flickr30k", src, tmp_path / "full", bb)

    class Killed(Exception):
        pass

    def kill_after_first(k):
        raise Killed(k)

    with pytest.raises(Killed):
        run("flickr30k", src, tmp_path / "resumed", bb, on_shard_written=kill_after_first)
    names = sorted(p.name for p in (tmp_path / "resumed").iterdir())
    assert names == ["part-00000.arrow"]
    written = []
    rep = run(
        "flickr30k",
        src,
        tmp_path / "resumed",
        bb,
        replace(S, num_workers=2),
        on_shard_written=written.append,
    )
    assert written == [1, 2, 3]  # shard 0 was not recomputed
    assert rep.written == 20
    assert _files(tmp_path / "resumed") == _files(tmp_path / "full")
    again = []
    run("flickr30k", src, tmp_path / "resumed", bb, on_shard_written=again.append)
    assert again == []
    # a changed input file invalidates only its own shard
    _save(_img(99), src / "flickr30k_images" / "104.jpg")
    run("flickr30k", src, tmp_path / "resumed", bb, on_shard_written=again.append)
    assert again == [1]


def _touch_all(folder: Path, when: int) -> None:
    for p in folder.rglob("*"):
        os.utime(p, ns=(when, when))


def test_copied_inputs_are_not_recomputed(tmp_path, bb):
    """A copy / git clone / dvc checkout gives new mtimes, same bytes: nothing recomputed,
    same output bytes (shards are fingerprinted by content, not by mtime or path)."""
    src = make_flickr(tmp_path / "f", n=7)  # shards of 3, 3, 1 images
    out = tmp_path / "out"
    run("flickr30k", src, out, bb)
    before = _files(out)
    # the same path, files replaced by copies with other mtimes (a dvc checkout)
    shutil.move(src, tmp_path / "orig")
    shutil.copytree(tmp_path / "orig", src)
    _touch_all(src, 1_000_000_000_123_456_789)
    written = []
    run("flickr30k", src, out, bb, on_shard_written=written.append)
    assert written == [] and _files(out) == before
    # another folder (a clone elsewhere): the parts are kept, byte for byte
    clone = tmp_path / "clone"
    shutil.copytree(src, clone)
    _touch_all(clone, 1_500_000_000_000_000_000)
    run("flickr30k", clone, out, bb, on_shard_written=written.append)
    parts = {k: v for k, v in before.items() if k.startswith("part-")}
    assert written == [] and {k: v for k, v in _files(out).items() if k in parts} == parts
    # one image's bytes changed: only its shard is recomputed
    (clone / "flickr30k_images" / "104.jpg").write_bytes(
        _save(_img(99), tmp_path / "x.jpg").read_bytes()
    )
    run("flickr30k", clone, out, bb, on_shard_written=written.append)
    assert written == [1]
    after = _files(out)
    assert after["part-00001.arrow"] != parts["part-00001.arrow"]
    assert [after[k] for k in ("part-00000.arrow", "part-00002.arrow")] == [
        parts[k] for k in ("part-00000.arrow", "part-00002.arrow")
    ]


def test_file_stamp_reads_the_ends_of_the_file(tmp_path):
    from pipeline.embedding.items import STAMP_BLOCK, file_stamp

    f = tmp_path / "big.bin"
    data = bytearray(os.urandom(3 * STAMP_BLOCK))
    f.write_bytes(data)
    stamp = file_stamp(f)
    assert stamp.startswith(f"{len(data)}:")
    os.utime(f, ns=(1, 1))
    assert file_stamp(f) == stamp  # mtime is not part of it
    for pos in (0, len(data) - 1):
        changed = bytearray(data)
        changed[pos] ^= 0xFF
        f.write_bytes(changed)
        assert file_stamp(f) != stamp
    assert file_stamp(tmp_path / "none") is None and file_stamp(tmp_path) is None


def test_process_shards_and_torchrun_env(tmp_path, bb, monkeypatch):
    src = make_flickr(tmp_path / "f", n=7)
    run("flickr30k", src, tmp_path / "one", bb)
    first = []
    run("flickr30k", src, tmp_path / "two", bb, shard=(0, 2), on_shard_written=first.append)
    assert first == [0, 2] and not (tmp_path / "two" / "manifest.json").exists()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    second = []
    rep = run("flickr30k", src, tmp_path / "two", bb, on_shard_written=second.append)
    assert second == [1] and rep.written == 14
    assert _files(tmp_path / "two") == _files(tmp_path / "one")
    assert resolve_shard(None) == (1, 2)
    with pytest.raises(UserError):
        parse_shard("2/2")
    with pytest.raises(UserError):
        parse_shard("a/b")


# --------------------------------------------------------------------------- bad input


def _cmyk_jpeg(path):
    return _save(_img(5).convert("CMYK"), path)


def _exif_jpeg(path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    return _save(_img(6, size=(40, 24)), path, exif=exif)


def _png16(path):
    arr = (np.arange(30 * 20, dtype=np.uint16).reshape(20, 30) * 100).astype(np.uint16)
    return _save(Image.fromarray(arr), path, "PNG")


def test_every_bad_input_is_counted(tmp_path, bb):
    root = tmp_path / "f"
    imgs = root / "flickr30k_images"
    good = _save(_img(1), imgs / "1.jpg")
    data = good.read_bytes()
    (imgs / "2.jpg").write_bytes(data[: len(data) // 2])  # truncated
    (imgs / "3.jpg").write_bytes(b"")  # zero bytes
    (imgs / "4.jpg").write_text("this is not an image")
    _cmyk_jpeg(imgs / "5.jpg")
    _save(_img(7).convert("L"), imgs / "6.png", "PNG")
    _save(_img(8).convert("RGBA"), imgs / "7.png", "PNG")
    _png16(imgs / "8.png")
    _exif_jpeg(imgs / "9.jpg")
    long = " ".join(["red circle"] * 20)
    rows = [
        "image_name| comment_number| comment",
        "1.jpg| 0| a red circle .",
        "1.jpg| 1 a blue square .",  # missing separator
        "1.jpg| 2| ",
        f"1.jpg| 3| {long}",  # empty, too long
        "2.jpg| 0| x .",
        "3.jpg| 0| x .",
        "4.jpg| 0| x .",
        "5.jpg| 0| x .",
        "6.png| 0| x .",
        "7.png| 0| x .",
        "8.png| 0| x .",
        "9.jpg| 0| x .",
        "10.jpg| 0| missing file .",
    ]
    (root / "results.csv").write_text("\n".join(rows) + "\n")
    rep = run("flickr30k", root, tmp_path / "out", bb)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["skipped"] == {  # caption rows, under their image's reason
        "empty_caption": 1,
        "empty_file": 1,
        "missing_file": 1,
        "not_an_image": 1,
        "truncated_image": 1,
    }
    assert saved["noted"] == {
        "16bit_converted": 1,
        "alpha_converted": 1,
        "caption_truncated": 1,
        "cmyk_converted": 1,
        "csv_missing_separator": 1,
        "exif_orientation_applied": 1,
        "grayscale_converted": 1,
    }
    ids = saved["ids"]
    assert ids["skipped:truncated_image"] == ["2"] and ids["skipped:empty_file"] == ["3"]
    assert ids["skipped:not_an_image"] == ["4"] and ids["skipped:missing_file"] == ["10"]
    assert ids["noted:cmyk_converted"] == ["5"] and ids["noted:16bit_converted"] == ["8"]
    assert ids["noted:exif_orientation_applied"] == ["9"]
    assert ids["noted:caption_truncated"] == ["1#3"]
    assert ids["skipped:empty_caption"] == ["1#2"]
    assert rep.written == 8  # 3 captions of 1.jpg, one each for 5..9
    # every caption row read is written or skipped once
    assert saved["read"] == 13 == saved["written"] + saved["skipped_total"]
    assert saved["images"] == {
        "read": 10,
        "written": 6,
        "skipped_by_reason": {
            "empty_file": 1,
            "missing_file": 1,
            "not_an_image": 1,
            "truncated_image": 1,
        },
    }
    table = read_dataset(tmp_path / "out")
    assert table.column("image_id").to_pylist() == ["1", "1", "1", "5", "6", "7", "8", "9"]
    assert max(len(t) for t in table.column("token_ids").to_pylist()) == bb.context_length


def test_counts_are_caption_rows(tmp_path, bb):
    """A missing and a junk image skip each of their caption rows under their reason."""
    src = make_flickr(tmp_path / "f", n=10)  # 2 captions per image
    (src / "flickr30k_images" / "103.jpg").unlink()
    (src / "flickr30k_images" / "105.jpg").write_text("not an image")
    rep = run("flickr30k", src, tmp_path / "out", bb)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (saved["read"], saved["written"], saved["skipped_total"]) == (20, 16, 4)
    assert saved["read"] == saved["written"] + saved["skipped_total"]
    assert saved["skipped"] == {"missing_file": 2, "not_an_image": 2}
    assert saved["ids"]["skipped:missing_file"] == ["103"]
    assert saved["ids"]["skipped:not_an_image"] == ["105"]
    assert saved["images"] == {
        "read": 10,
        "written": 8,
        "skipped_by_reason": {"missing_file": 1, "not_an_image": 1},
    }
    assert rep.summary() == "embed: read 20, wrote 16, skipped missing_file=2, not_an_image=2"


def test_decoding_conversions():
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    _img(6, size=(40, 24)).save(buf, format="JPEG", exif=exif)
    img, notes = open_rgb(buf.getvalue())
    assert img.size == (24, 40) and notes == ["exif_orientation_applied"]
    buf = io.BytesIO()
    arr = np.full((4, 5), 65535, dtype=np.uint16)
    Image.fromarray(arr).save(buf, format="PNG")
    img, notes = open_rgb(buf.getvalue())
    assert img.mode == "RGB" and notes == ["16bit_converted"]
    assert np.asarray(img).min() == 255  # scaled, not clipped from the low byte
    big = io.BytesIO()
    _img(0, size=(400, 300)).save(big, format="JPEG")
    img, _ = open_rgb(big.getvalue(), draft_size=64)
    assert img.size == (100, 75)  # decoded at 1/4 scale, shortest side still >= 64
    d = decode_image(big.getvalue(), 32, boxes=((0, 0, 10, 10), (500, 500, 5, 5)))
    assert d.pixels.shape == (2, 3, 32, 32) and d.bad_boxes == [1]
    assert decode_image(None, 32).skip == "missing_file"


def _two_objects(fmt="PNG") -> tuple[bytes, tuple[int, int, int, int]]:
    """A grey 200 x 100 image with a red square at the far left and a blue one at the far
    right, and their union box (x, y, w, h) = (10, 40, 180, 30), 6:1 wide."""
    arr = np.full((100, 200, 3), 200, dtype=np.uint8)
    arr[40:70, 10:40] = (255, 0, 0)
    arr[40:70, 160:190] = (0, 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue(), (10, 40, 180, 30)


def _colour_pixels(pixels: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    """(3, S, S) uint8 -> (S, S) mask of pixels within 40 of `rgb` in every channel."""
    diff = np.abs(pixels.astype(np.int16) - np.array(rgb, dtype=np.int16).reshape(3, 1, 1))
    return (diff <= 40).all(axis=0)


def test_wide_union_box_is_letterboxed_and_keeps_both_objects():
    data, union = _two_objects()
    d = decode_image(data, 32, boxes=(union,), whole=False)
    assert d.pixels.shape == (1, 3, 32, 32) and d.skip is None
    px = d.pixels[0]
    red, blue = _colour_pixels(px, (255, 0, 0)), _colour_pixels(px, (0, 0, 255))
    # both objects survive, each about 30/180 of the width (~5 px of 32) and in its own half
    assert red.sum() >= 15 and blue.sum() >= 15
    assert np.flatnonzero(red.any(axis=0)).max() < 16 <= np.flatnonzero(blue.any(axis=0)).min()
    # the rows above and below the 6:1 strip are the CLIP's mean colour (123, 117, 104) ...
    assert (px[:, :8] == np.array([123, 117, 104], np.uint8).reshape(3, 1, 1)).all()
    assert (px[:, -8:] == np.array([123, 117, 104], np.uint8).reshape(3, 1, 1)).all()
    # ... which normalises to about 0 in every channel
    assert normalize_pixels(torch.from_numpy(px[:, :8])).abs().max() < 0.01
    # the old preprocessing (shortest side, center crop) would have cut both objects off
    img, _ = open_rgb(data)
    old = resize_crop(img.crop((10, 40, 190, 70)), 32)
    assert not _colour_pixels(old, (255, 0, 0)).any()
    assert not _colour_pixels(old, (0, 0, 255)).any()
    # the whole image keeps the CLIP's standard preprocessing
    whole = decode_image(data, 32).pixels[0]
    assert np.array_equal(whole, resize_crop(img, 32))
    # a tall box (above / below) is padded left and right
    tall = decode_image(data, 32, boxes=((160, 0, 30, 100),), whole=False).pixels[0]
    assert (tall[:, :, :10] == np.array([123, 117, 104], np.uint8).reshape(3, 1, 1)).all()
    assert _colour_pixels(tall, (0, 0, 255)).sum() >= 15
    # another CLIP's mean colour is the fill it is given
    grey = decode_image(data, 32, boxes=(union,), whole=False, fill=(0, 0, 0)).pixels[0]
    assert (grey[:, :8] == 0).all()


def test_laion_webdataset_through_the_stage(tmp_path, bb):
    root = make_laion(tmp_path / "laion")
    rep = run("laion", root, tmp_path / "out", bb)
    table = read_dataset(tmp_path / "out")
    assert table.column("id").to_pylist() == ["000000000#0", "000000002#0", "000000003#0"]
    assert set(table.column("split").to_pylist()) == {"train"}
    assert rep.skipped["unsafe_tar_member"] == 4 and rep.skipped["img2dataset_failed"] == 1
    # the sample without a caption keeps its image embedding; no caption, tokens, text
    assert table.column("caption").to_pylist()[1] is None and rep.noted["empty_caption"] == 1
    assert table.column("token_ids").null_count == table.column("text_emb").null_count == 1
    assert table.column("image_emb").null_count == 0
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["read"] == 10 == saved["written"] + saved["skipped_total"]
    # a sample whose image does not decode is one skipped caption row
    shutil.copytree(root, tmp_path / "bad")
    with tarfile.open(tmp_path / "bad" / "00000.tar", "a") as tar:
        info = tarfile.TarInfo("000000011.jpg")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"junk"))
        info = tarfile.TarInfo("000000011.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"cap"))
    run("laion", tmp_path / "bad", tmp_path / "out2", bb)
    saved = json.loads((tmp_path / "out2" / "report.json").read_text())
    assert saved["read"] == 11 == saved["written"] + saved["skipped_total"]
    assert saved["skipped"]["not_an_image"] == 1 and saved["written"] == 3
    assert saved["images"] == {"read": 4, "written": 3, "skipped_by_reason": {"not_an_image": 1}}
    assert not (tmp_path / "evil.jpg").exists() and not (tmp_path / "laion" / "sub").exists()


# --------------------------------------------------------------------------- precomputed LAION


def _precomputed(root: Path, dim: int, n: int = 5, text: bool = True) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(1)
    img = rng.standard_normal((n, dim)).astype(np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt = rng.standard_normal((n, dim)).astype(np.float32)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    for d in ("img_emb", "text_emb", "metadata"):
        (root / d).mkdir(parents=True, exist_ok=True)
    np.save(root / "img_emb" / "img_emb_0.npy", img.astype(np.float16))
    if text:
        np.save(root / "text_emb" / "text_emb_0.npy", txt.astype(np.float16))
    meta = [{"key": f"{i:09d}", "caption": f"a red circle {i}", "url": "u"} for i in range(n)]
    pq.write_table(pa.Table.from_pylist(meta), root / "metadata" / "metadata_0.parquet")
    return img, txt


def test_precomputed_layout_is_taken_as_is(tmp_path, bb, monkeypatch):
    img, txt = _precomputed(tmp_path / "pre", bb.dim)

    def forbidden(*a, **k):
        raise AssertionError("the model must not run on precomputed embeddings")

    monkeypatch.setattr(bb, "encode_images", forbidden)
    monkeypatch.setattr(bb, "encode_token_ids", forbidden)
    monkeypatch.setattr(bb, "encode_texts", forbidden)
    rep = run("laion", tmp_path / "pre", tmp_path / "out", bb)
    table = read_dataset(tmp_path / "out")
    assert rep.written == 5 and table.num_rows == 5
    assert table.column("id").to_pylist()[0] == "000000000#0"
    assert np.array_equal(vectors(table.column("image_emb")), img.astype(np.float16))
    assert np.array_equal(vectors(table.column("text_emb")), txt.astype(np.float16))
    assert table.column("token_ids").to_pylist() == bb.tokenize(table.column("caption").to_pylist())
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["rows"] == 5 and manifest["sources"][0]["path"].endswith("img_emb_0.npy")


@pytest.mark.parametrize("text", [True, False])
def test_precomputed_row_without_caption_keeps_its_image(tmp_path, bb, text):
    img, _ = _precomputed(tmp_path / "pre", bb.dim, text=text)
    meta = pq.read_table(tmp_path / "pre/metadata/metadata_0.parquet").to_pylist()
    meta[1]["caption"], meta[3]["caption"] = None, "  "
    pq.write_table(pa.Table.from_pylist(meta), tmp_path / "pre/metadata/metadata_0.parquet")
    if text:  # the text embedding of a row without a caption is not looked at
        txt = np.load(tmp_path / "pre/text_emb/text_emb_0.npy")
        txt[1] = 0
        np.save(tmp_path / "pre/text_emb/text_emb_0.npy", txt)
    rep = run("laion", tmp_path / "pre", tmp_path / "out", bb)
    table = read_dataset(tmp_path / "out")
    assert rep.written == 5 and not rep.skipped and rep.noted["empty_caption"] == 2
    assert np.array_equal(vectors(table.column("image_emb")), img.astype(np.float16))
    assert table.column("caption").to_pylist()[1::2] == [None, None]
    for col in ("token_ids", "text_emb"):
        assert table.column(col).is_null().to_pylist() == [False, True, False, True, False]
    assert not vectors(table.column("text_emb"))[1::2].any()  # nothing kept under the nulls
    if not text:  # computed for the 3 captioned rows only
        assert rep.noted["text_emb_computed"] == 3
    captioned = table.filter(table.column("caption").is_valid())
    assert captioned.column("token_ids").to_pylist() == bb.tokenize(
        captioned.column("caption").to_pylist()
    )


def test_manifest_names_where_the_checkpoint_came_from(tmp_path, clip_dir):
    """A converted open_clip checkpoint (open_clip.json) passed through clip_bootstrap
    (clip_source.json): the manifest carries both records; a plain folder neither."""
    clip = tmp_path / "clip"
    shutil.copytree(clip_dir, clip)
    made = {"source": "open_clip_model.safetensors", "sha256": "sha256:ab", "quick_gelu": False}
    (clip / "open_clip.json").write_text(json.dumps(made))
    source = {"mode": "passthrough", "pretrained": "models/laion-b32", "seed": 0}
    (clip / "clip_source.json").write_text(json.dumps(source))
    _precomputed(tmp_path / "pre", bb_dim := load_backbone(clip).dim)
    run("laion", tmp_path / "pre", tmp_path / "out", load_backbone(clip))
    manifest = json.loads((tmp_path / "out/manifest.json").read_text())
    assert manifest["origin"] == {"clip_source": source, "open_clip": made}
    assert manifest["dim"] == bb_dim
    run("laion", tmp_path / "pre", tmp_path / "plain", load_backbone(clip_dir))
    assert "origin" not in json.loads((tmp_path / "plain/manifest.json").read_text())


def test_precomputed_dim_mismatch_and_missing_text(tmp_path, bb):
    _precomputed(tmp_path / "wrong", bb.dim + 1)
    with pytest.raises(UserError, match="dim"):
        run("laion", tmp_path / "wrong", tmp_path / "o1", bb)
    _precomputed(tmp_path / "notext", bb.dim, text=False)
    rep = run("laion", tmp_path / "notext", tmp_path / "o2", bb)
    table = read_dataset(tmp_path / "o2")
    expect = bb.encode_texts(table.column("caption").to_pylist()).numpy()
    assert np.allclose(vectors(table.column("text_emb")).astype(np.float32), expect, atol=2e-3)
    assert rep.noted["text_emb_computed"] == 5


# --------------------------------------------------------------------------- VG


def make_qa(root: Path) -> tuple[Path, Path]:
    vg = root / "vg"
    _save(_img(1, size=(60, 40)), vg / "VG_100K" / "1.jpg")
    _save(_img(2, size=(50, 50)), vg / "VG_100K_2" / "2.jpg")
    qa = root / "qa"
    qa.mkdir(parents=True)
    rows = [
        {
            "qid": "q1",
            "image_id": 2,
            "image_path": "VG_100K_2/2.jpg",
            "qtype": "relation",
            "question": "What is the relationship between sofa and mattress?",
            "answer": "on",
            "subj_box": [0, 0, 10, 10],
            "union_box": [0, 0, 20, 30],
        },
        {
            "qid": "q2",
            "image_id": 1,
            "image_path": None,
            "qtype": "object",
            "question": "What is this?",
            "answer": "orange",
            "subj_box": [5, 5, 10, 10],
            "union_box": None,
        },
        {
            "qid": "q3",
            "image_id": 3,
            "image_path": "VG_100K/3.jpg",
            "qtype": "object",
            "question": "What is this?",
            "answer": "sofa",
            "subj_box": [5, 5, 10, 10],
            "union_box": None,
        },
    ]
    box = pa.list_(pa.int32(), 4)
    schema = pa.schema(
        [
            ("qid", pa.string()),
            ("image_id", pa.int64()),
            ("image_path", pa.string()),
            ("qtype", pa.string()),
            ("question", pa.string()),
            ("answer", pa.string()),
            ("subj_box", box),
            ("union_box", box),
        ]
    )
    pq.write_table(pa.Table.from_pylist(rows[:2], schema), qa / "train.parquet")
    pq.write_table(pa.Table.from_pylist(rows[2:], schema), qa / "val.parquet")
    answers = {"answers": [{"answer": "on", "count": 1}, {"answer": "orange", "count": 1}]}
    (qa / "answers.json").write_text(json.dumps(answers))
    return qa, vg


def test_vg_images_crops_and_texts(tmp_path, bb):
    qa, vg = make_qa(tmp_path)
    rep = run("vg", qa, tmp_path / "out", bb, replace(S, vg_crops=True), images=vg)
    table = read_dataset(tmp_path / "out")
    assert table.column("id").to_pylist() == ["1", "1@5,5,10,10", "2", "2@0,0,20,30"]
    assert table.column("box").to_pylist() == [None, [5, 5, 10, 10], None, [0, 0, 20, 30]]
    assert rep.skipped == {"missing_file": 1} and rep.to_dict()["ids"]["skipped:missing_file"] == [
        "3"
    ]
    texts = read_table(tmp_path / "out" / "texts.arrow")
    assert texts.column("id").to_pylist() == ["q0", "q1", "a0", "a1"]
    assert texts.column("kind").to_pylist() == ["question", "question", "answer", "answer"]
    assert texts.column("text").to_pylist() == [
        "What is the relationship between sofa and mattress?",
        "What is this?",
        "on",
        "orange",
    ]
    emb = vectors(texts.column("text_emb")).astype(np.float32)
    assert np.allclose(emb, bb.encode_texts(texts.column("text").to_pylist()).numpy(), atol=2e-3)
    crop = Image.open(vg / "VG_100K" / "1.jpg").convert("RGB").crop((5, 5, 15, 15))
    expect = bb.encode_images(preprocess_image(crop, 32, bb.mean, bb.std)[None]).numpy()[0]
    assert np.allclose(vectors(table.column("image_emb"))[1].astype(np.float32), expect, atol=2e-3)
    # a 20 x 30 union box is letterboxed to a square, not center-cropped
    crop = Image.open(vg / "VG_100K_2" / "2.jpg").convert("RGB").crop((0, 0, 20, 30))
    pixels = torch.from_numpy(letterbox_resize(crop, 32))[None]
    expect = bb.encode_images(normalize_pixels(pixels, bb.mean, bb.std)).numpy()[0]
    assert np.allclose(vectors(table.column("image_emb"))[3].astype(np.float32), expect, atol=2e-3)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["texts_rows"] == 4 and manifest["rows"] == 4


# --------------------------------------------------------------------------- CLI


def flickr30k_opts(src: Path, clip: Path, out: Path, params: Path) -> dict:
    """The options dvc.yaml passes for flickr30k (its images are inside --input)."""
    return {"--dataset": "flickr30k", "--input": src, "--images": src, "--clip": clip,
            "--out": out, "--params": params}  # fmt: skip


def cli_args(opts: dict) -> list[str]:
    return [str(x) for option, value in opts.items() for x in (option, value)]


def invoke(opts: dict):
    """`clipda embed OPTIONS` in-process (CliRunner)."""
    from pipeline.cli import app

    return CliRunner().invoke(app, ["embed", *cli_args(opts)])


def test_cli(tmp_path, clip_dir):
    src = make_flickr(tmp_path / "f", n=2)
    params = tmp_path / "params.yaml"
    params.write_text("seed: 0\nembed:\n  num_workers: 1\n  shard_size: 1\n")
    res = invoke(flickr30k_opts(src, clip_dir, tmp_path / "o", params))
    assert res.exit_code == 0, res.output
    assert "read 4, wrote 4" in res.output
    assert sorted(p.name for p in (tmp_path / "o").glob("part-*.arrow")) == [
        "part-00000.arrow",
        "part-00001.arrow",
    ]
    ok = flickr30k_opts(src, clip_dir, tmp_path / "x", params)
    for changes, msg in [
        ({"--dataset": "coco"}, "must be one of"),
        ({"--dataset": "laion", "--input": tmp_path / "none"}, "not found"),
        ({"--images": tmp_path / "none"}, "not found"),
        ({"--images": tmp_path}, "--images"),  # laion / flickr30k: must be the --input folder
        ({"--shard": "3/2"}, "bad shard"),
        ({"--clip": tmp_path / "nomodel"}, "not found"),
    ]:
        res = invoke({**ok, **changes})
        assert res.exit_code == 2 and msg in res.output, res.output
    for required in ("--input", "--images", "--clip", "--out"):  # path options have no default
        res = invoke({k: v for k, v in ok.items() if k != required})
        assert res.exit_code == 2 and required in res.output, res.output


def test_two_concurrent_processes(tmp_path, clip_dir, bb):
    """Two CLI processes (--shard 0/2 and torchrun-style env 1/2) at once: same bytes."""
    import subprocess
    import sys

    src = make_flickr(tmp_path / "f", n=5)
    run("flickr30k", src, tmp_path / "one", bb, replace(S, shard_size=1))
    params = tmp_path / "params.yaml"
    params.write_text("embed:\n  num_workers: 0\n  shard_size: 1\n")
    opts = flickr30k_opts(src, clip_dir, tmp_path / "two", params)
    cmd = [sys.executable, "-m", "pipeline", "embed", *cli_args(opts)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    procs = [
        subprocess.Popen([*cmd, "--shard", "0/2"], env=env),
        subprocess.Popen(cmd, env={**env, "RANK": "1", "WORLD_SIZE": "2"}),
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    assert _content(tmp_path / "two") == _content(tmp_path / "one")


def test_bad_params_are_one_line_errors(tmp_path, clip_dir):
    for section, key, value in [
        ("embed", "batch_size", "abc"),
        ("embed", "batch_size", 0),
        ("embed", "text_batch_size", -1),
        ("embed", "shard_size", 1.5),
        ("embed", "num_workers", -1),
        ("embed", "num_workers", "two"),
        ("split", "val_fraction", "lots"),
        ("split", "test_fraction", 1.5),
        ("embed", "dtype", "int8"),
        ("embed", "threads", -1),
        ("embed", "device", "gpu"),
        ("embed", "torch_threads", 2),  # renamed to `threads`: an unknown key now
    ]:
        cls = Settings if section == "embed" else Split
        with pytest.raises(UserError, match=f"{section}.{key}"):
            load(cls, {section: {key: value}})
    split = load(Split, {"split": {"val_fraction": "1e-3", "test_fraction": "2E-2"}})
    assert (split.val_fraction, split.test_fraction) == (0.001, 0.02)
    assert load(Settings, {"embed": {"batch_size": "8", "device": "cuda:1"}}).batch_size == 8
    # through the CLI: one line, exit 2, before any input is looked at (--input is absent)
    params = tmp_path / "params.yaml"
    params.write_text("embed:\n  batch_size: abc\n")
    res = invoke(flickr30k_opts(tmp_path / "none", clip_dir, tmp_path / "o", params))
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "embed.batch_size" in res.output and len(res.output.strip().splitlines()) == 1


def test_default_threads_leave_the_decode_workers_their_cores(monkeypatch):
    """embed.threads 0: torch threads = cores - num_workers (at least 1), no oversubscription."""
    import pipeline.stages.embed as stage
    from pipeline import training

    monkeypatch.setattr(training.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert training.spare_cores(2) == 1 and training.spare_cores(0) == 2
    monkeypatch.setattr(training.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert training.spare_cores(2) == 14
    seen = []
    monkeypatch.setattr(stage, "cpu_threads", lambda n: seen.append(n) or _Stop())
    with pytest.raises(_Halt):
        stage.main("flickr30k", Path("."), Path("."), "clip", Path("out"), None,
                   {"embed": {"num_workers": 3}})  # fmt: skip
    assert seen == [13]


class _Halt(Exception):
    pass


class _Stop:
    def __enter__(self):
        raise _Halt

    def __exit__(self, *exc):
        return False
