"""Caption dataset readers: Flickr30k caption files and LAION (img2dataset, precomputed)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.errors import UserError
from pipeline.formats import flickr30k, laion
from pipeline.report import Report
from pipeline.settings import Split

SPLIT = Split()  # the shared hash-split fractions


def _jpeg(color=(200, 30, 30), size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def _flickr(
    root: Path,
    csv: str | None = None,
    token: str | None = None,
    karpathy=None,
    images=("1.jpg", "2.jpg", "3.jpg"),
) -> Path:
    (root / "flickr30k_images").mkdir(parents=True)
    for name in images:
        (root / "flickr30k_images" / name).write_bytes(_jpeg())
    if csv is not None:
        (root / "results.csv").write_text(csv)
    if token is not None:
        (root / "results_20130124.token").write_text(token)
    if karpathy is not None:
        (root / "dataset_flickr30k.json").write_text(json.dumps(karpathy))
    return root


CSV = (
    "image_name| comment_number| comment\n"
    "1.jpg| 0| A red circle .\n"
    "1.jpg| 1| a pipe | inside\n"
    "1.jpg| 2 A dog runs .\n"  # separator missing: recovered
    "1.jpg 3| A cat sits .\n"  # the other separator missing: recovered
    "2.jpg| 0| \n"  # empty caption
    "garbage without any structure\n"  # malformed
    "2.jpg| 1| Two dogs .\n"
    "2.jpg| 1| Two dogs again .\n"  # duplicate id
    "4.jpg| 0| no such image .\n"  # missing file
)


def test_results_csv_rows_separators_and_skips(tmp_path):
    listing = flickr30k.list_flickr30k(_flickr(tmp_path, csv=CSV), SPLIT)
    assert [(i.id, i.captions) for i in listing.items] == [
        (
            "1",
            (
                ("1#0", "A red circle ."),
                ("1#1", "a pipe | inside"),
                ("1#2", "A dog runs ."),
                ("1#3", "A cat sits ."),
            ),
        ),
        ("2", (("2#1", "Two dogs ."),)),
    ]
    rep = listing.report.to_dict()
    assert rep["read"] == 9 == 5 + rep["skipped_total"]  # caption rows: listed or skipped
    assert rep["skipped"] == {
        "duplicate_row": 1,
        "empty_caption": 1,
        "malformed_row": 1,
        "missing_file": 1,
    }
    assert rep["noted"] == {"csv_missing_separator": 2}
    assert rep["ids"]["noted:csv_missing_separator"] == ["1#2", "1#3"]
    assert rep["ids"]["skipped:malformed_row"] == ["results.csv:7"]
    assert rep["ids"]["skipped:missing_file"] == ["4"]  # image ids
    assert listing.extra["split_source"] == "hash of file name"
    images = {"read": 1, "written": 0, "skipped_by_reason": {"missing_file": 1}}
    assert listing.extra["images"] == images  # the images this listing dropped
    assert {i.split for i in listing.items} <= {"train", "val", "test"}
    assert listing.items[0].path == str(tmp_path / "flickr30k_images" / "1.jpg")


def test_token_file_and_karpathy_splits(tmp_path):
    token = "1.jpg#0\tA red circle .\n2.jpg#0\tTwo dogs .\nbroken line\n3.jpg#7\t\n"
    karpathy = {
        "images": [
            {"filename": "1.jpg", "split": "test", "sentences": [{"raw": "unused"}]},
            {"filename": "2.jpg", "split": "restval", "sentences": []},
        ],
        "dataset": "flickr30k",
    }
    listing = flickr30k.list_flickr30k(_flickr(tmp_path, token=token, karpathy=karpathy), SPLIT)
    assert [(i.id, i.split, i.captions) for i in listing.items] == [
        ("1", "test", (("1#0", "A red circle ."),)),
        ("2", "train", (("2#0", "Two dogs ."),)),
    ]
    rep = listing.report.to_dict()
    assert rep["skipped"] == {"empty_caption": 1, "malformed_row": 1}
    assert listing.extra == {
        "caption_source": "results_20130124.token",
        "split_source": "dataset_flickr30k.json",
        "images": {"read": 0, "written": 0, "skipped_by_reason": {}},
    }


def test_karpathy_only_and_missing_split(tmp_path):
    karpathy = {
        "images": [
            {
                "filename": "1.jpg",
                "split": "val",
                "sentences": [{"raw": "one ."}, {"raw": "two ."}],
            },
            {"filename": "2.jpg", "split": "train", "sentences": [{"tokens": ["a", "dog"]}]},
        ]
    }
    listing = flickr30k.list_flickr30k(_flickr(tmp_path, karpathy=karpathy), SPLIT)
    assert [(i.id, i.split, i.captions) for i in listing.items] == [
        ("1", "val", (("1#0", "one ."), ("1#1", "two ."))),
        ("2", "train", (("2#0", "a dog"),)),
    ]
    assert listing.report.read == 3
    # a csv row for an image outside the Karpathy file gets a hash split, noted
    (tmp_path / "results.csv").write_text("3.jpg| 0| x .\n")
    listing = flickr30k.list_flickr30k(tmp_path, SPLIT)
    assert listing.items[0].split == flickr30k.hash_split(
        "3.jpg", SPLIT.val_fraction, SPLIT.test_fraction
    )
    assert listing.report.noted == {"not_in_karpathy_split": 1}


def test_flickr_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        flickr30k.list_flickr30k(tmp_path / "nope", SPLIT)
    with pytest.raises(UserError, match="no results.csv"):
        flickr30k.list_flickr30k(_flickr(tmp_path), SPLIT)


def test_hash_split_is_stable():
    splits = [flickr30k.hash_split(f"{i}.jpg", 0.05, 0.05) for i in range(2000)]
    assert splits == [flickr30k.hash_split(f"{i}.jpg", 0.05, 0.05) for i in range(2000)]
    assert 0.85 < splits.count("train") / 2000 < 0.95


def test_hash_split_follows_the_split_settings(tmp_path):
    """Without dataset_flickr30k.json the shared `split` fractions decide (one definition)."""
    images = [f"{i}.jpg" for i in range(60)]
    csv = "".join(f"{name}| 0| a dog .\n" for name in images)
    root = _flickr(tmp_path, csv=csv, images=images)
    seen = {}
    for split in (Split(), Split(val_fraction=0.3, test_fraction=0.4), Split(0.0, 0.0)):
        got = [i.split for i in flickr30k.list_flickr30k(root, split).items]
        want = [flickr30k.hash_split(n, split.val_fraction, split.test_fraction) for n in images]
        assert got == want
        seen[split] = set(got)
    assert seen[Split()] == {"train", "val", "test"} and seen[Split(0.0, 0.0)] == {"train"}


# --------------------------------------------------------------------------- LAION


def _add(tar: tarfile.TarFile, name: str, data: bytes, kind=tarfile.REGTYPE, link="") -> None:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname = (len(data) if kind == tarfile.REGTYPE else 0), kind, link
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def make_laion(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    with tarfile.open(root / "00000.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        for key, caption, status in [
            ("000000000", "a red square", "success"),
            ("000000001", "failed one", "failed_to_download"),
            ("000000002", "   ", "success"),  # empty caption
            ("000000003", "from parquet only", "success"),  # no .txt member
            ("000000004", "no tar member", "success"),  # absent from the tar
        ]:
            rows.append(
                {
                    "key": key,
                    "caption": caption,
                    "status": status,
                    "error_message": "HTTP Error 404" if status != "success" else None,
                }
            )
            if status != "success" or key == "000000004":
                continue
            _add(tar, f"{key}.jpg", _jpeg())
            if key != "000000003":
                _add(tar, f"{key}.txt", caption.encode())
            _add(tar, f"{key}.json", json.dumps({"key": key}).encode())
        _add(tar, "/abs/evil.jpg", _jpeg())
        _add(tar, "../evil.jpg", _jpeg())
        _add(tar, "sub/../../evil2.txt", b"x")
        _add(tar, "000000009.jpg", b"", kind=tarfile.SYMTYPE, link="/etc/passwd")
        _add(tar, "000000010.txt", b"caption without image")
    pq.write_table(pa.Table.from_pylist(rows), root / "00000.parquet")
    (root / "00000_stats.json").write_text(json.dumps({"count": 5}))
    return root


def test_webdataset_listing(tmp_path):
    root = make_laion(tmp_path / "laion")
    listing = laion.list_webdataset(root)
    assert [(i.id, i.member, i.captions) for i in listing.items] == [
        ("000000000", "000000000.jpg", (("000000000#0", "a red square"),)),
        ("000000002", "000000002.jpg", (("000000002#0", None),)),  # image only: no caption
        ("000000003", "000000003.jpg", (("000000003#0", "from parquet only"),)),
    ]
    rep = listing.report.to_dict()
    assert rep["noted"] == {"empty_caption": 1}
    assert rep["ids"]["noted:empty_caption"] == ["000000002"]
    # contrastive pairs need a caption: that listing skips it by the same reason
    pairs = laion.list_webdataset(root, captionless=False)
    assert [i.id for i in pairs.items] == ["000000000", "000000003"]
    assert pairs.report.skipped["empty_caption"] == 1 and not pairs.report.noted
    assert rep["skipped"] == {  # one per sample (key); the 4 unsafe members are 4 keys
        "img2dataset_failed": 1,
        "missing_image_in_tar": 1,
        "missing_tar_member": 1,
        "unsafe_tar_member": 4,
    }
    assert rep["ids"]["skipped:unsafe_tar_member"] == [
        "00000.tar:/abs/evil.jpg",
        "00000.tar:../evil.jpg",
        "00000.tar:sub/../../evil2.txt",
        "00000.tar:000000009.jpg",
    ]
    assert rep["ids"]["skipped:img2dataset_failed"] == ["000000001"]
    assert rep["read"] == 10 == len(listing.items) + rep["skipped_total"]
    assert listing.extra["img2dataset_failures"] == {"HTTP Error 404": 1}
    assert not (tmp_path / "evil.jpg").exists() and not (Path("/abs/evil.jpg")).exists()
    # member bytes come through extractfile, unsafe names are refused
    reader = laion.TarReader()
    assert reader.read(str(root / "00000.tar"), "000000000.jpg") == _jpeg()
    assert reader.read(str(root / "00000.tar"), "../evil.jpg") is None
    assert reader.read(str(root / "00000.tar"), "000000009.jpg") is None
    reader.close()


def test_unreadable_tar_is_reported(tmp_path):
    root = make_laion(tmp_path / "laion")
    (root / "00001.tar").write_bytes(b"this is not a tar archive" * 40)
    listing = laion.list_webdataset(root)
    rep = listing.report
    assert rep.skipped["unreadable_tar"] == 1  # no parquet: the tar counts as one sample
    assert rep.read == len(listing.items) + sum(rep.skipped.values())
    # with a parquet, each successful row of the unreadable tar is skipped
    rows = [{"key": k, "caption": "c", "status": "success"} for k in ("a", "b")]
    pq.write_table(pa.Table.from_pylist(rows), root / "00001.parquet")
    listing = laion.list_webdataset(root)
    rep = listing.report
    assert rep.skipped["unreadable_tar"] == 2 and rep.noted["unreadable_tar"] == 1
    assert rep.read == len(listing.items) + sum(rep.skipped.values())


def test_unsafe_and_duplicate_members_of_kept_samples(tmp_path):
    root = tmp_path / "laion"
    root.mkdir()
    with tarfile.open(root / "00000.tar", "w", format=tarfile.GNU_FORMAT) as tar:
        _add(tar, "k1.jpg", _jpeg())
        _add(tar, "k1.txt", b"kept")
        _add(tar, "k1.jpg", _jpeg((0, 0, 0)))  # duplicate: the first wins
        _add(tar, "k1.png", b"", kind=tarfile.SYMTYPE, link="/etc/passwd")
        _add(tar, "k2.jpg", b"", kind=tarfile.SYMTYPE, link="/etc/passwd")
        _add(tar, "k2.txt", b"image is a link")
    listing = laion.list_webdataset(root)
    rep = listing.report.to_dict()
    assert [i.id for i in listing.items] == ["k1"]
    assert rep["read"] == 2 and rep["skipped"] == {"unsafe_tar_member": 1}
    assert rep["ids"]["skipped:unsafe_tar_member"] == ["00000.tar:k2.jpg"]
    assert rep["noted"] == {"duplicate_tar_member": 1, "unsafe_tar_member": 1}


def test_precomputed_rows(tmp_path):
    root = tmp_path / "pre"
    for d in ("img_emb", "text_emb", "metadata"):
        (root / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    img = rng.standard_normal((4, 8)).astype(np.float32)
    img[1] *= 3.0  # not unit length: renormalised
    img[3] = np.nan  # unusable
    txt = rng.standard_normal((4, 8)).astype(np.float16)
    np.save(root / "img_emb" / "img_emb_0.npy", img)
    np.save(root / "text_emb" / "text_emb_0.npy", txt)
    meta = [
        {"key": "k0", "caption": "a"},
        {"key": "k1", "caption": "b"},
        {"key": "k2", "caption": ""},
        {"key": "k3", "caption": "d"},
    ]
    pq.write_table(pa.Table.from_pylist(meta), root / "metadata" / "metadata_0.parquet")
    np.save(root / "img_emb" / "img_emb_10.npy", img[:2])
    np.save(root / "img_emb" / "img_emb_2.npy", img[:2])
    assert laion.is_precomputed(root)
    chunks = laion.precomputed_chunks(root)
    assert [c.n for c in chunks] == [0, 2, 10]
    assert chunks[1].text_emb is None and chunks[1].metadata is None
    rep = Report("embed")
    rows = laion.read_precomputed(chunks[0], rep)
    # k2 has no caption: its image embedding is kept, caption None
    assert rows.ids == ["k0#0", "k1#0", "k2#0"] and rows.captions == ["a", "b", None]
    assert np.allclose(np.linalg.norm(rows.image_emb, axis=1), 1.0, atol=1e-6)
    assert np.allclose(rows.image_emb[1], img[1] / np.linalg.norm(img[1]), atol=1e-6)
    assert np.allclose(rows.image_emb[2], img[2] / np.linalg.norm(img[2]), atol=1e-6)
    assert rep.skipped == {"bad_image_embedding": 1} and rep.noted["empty_caption"] == 1
    assert rep.noted["renormalized"] >= 1 and rep.read == 4
    rep2 = Report("embed")
    assert laion.read_precomputed(chunks[1], rep2).ids == []  # no metadata: mismatch
    assert rep2.skipped == {"precomputed_chunk_mismatch": 2} and rep2.read == 2
