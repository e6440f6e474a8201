"""GQA and VQA v2 question files (`pipeline.formats.vqa_json`) and image ids kept as given,
each through `clipda prepare-qa-table -> embed -> train-vqa -> evaluate-vqa` with a tiny CLIP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from tiny_clip import make_tiny_clip
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import UserError
from pipeline.formats import qa_table, vqa_json
from pipeline.settings import Answers, Split

THINGS = ("cat", "dog", "sofa")
COLOURS = ("red", "green", "blue")


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def image(path: Path, k: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(k).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def gqa_world(root: Path, n_images: int = 18) -> dict:
    """GQA's train_balanced_questions.json shape: {qid: {imageId, question, answer, types}},
    string image ids, some of them not numbers (as GQA's "n161313")."""
    questions = {}
    for i in range(n_images):
        iid = f"n{i:06d}" if i % 2 else str(2354786 + i)
        image(root / "images" / f"{iid}.jpg", i)
        questions[f"{i}0"] = {
            "imageId": iid, "question": "What animal is this?", "answer": THINGS[i % 3],
            "types": {"structural": "query", "semantic": "obj", "detailed": "objWhat"},
            "fullAnswer": "It is a cat.", "semantic": [{"operation": "select"}],
        }  # fmt: skip
        questions[f"{i}1"] = {
            "imageId": iid, "question": f"Is the {THINGS[i % 3]} {COLOURS[i % 3]}?",
            "answer": ("yes", "no")[i % 2], "types": {"structural": "verify"},
        }  # fmt: skip
    questions["empty"] = {"imageId": "n999999", "question": "What is it?", "answer": ""}
    path = root / "train_balanced_questions.json"
    path.write_text(json.dumps(questions))
    return {"input": path, "images": root / "images", "extra": [], "n": 2 * n_images}


def vqa2_world(root: Path, n_images: int = 18) -> dict:
    """VQA v2: questions + annotations JSON, COCO image names under train2014/."""
    questions, annotations = [], []
    for i in range(n_images):
        iid = 9 + 1000 * i
        image(root / "train2014" / f"COCO_train2014_{iid:012d}.jpg", i)
        for k, (q, a, t) in enumerate(
            [("What animal is this?", THINGS[i % 3], "other"),
             ("How many animals are there?", str(1 + i % 2), "number")]
        ):  # fmt: skip
            qid = iid * 10 + k
            questions.append({"image_id": iid, "question": q, "question_id": qid})
            annotations.append(
                {"question_id": qid, "image_id": iid, "multiple_choice_answer": a,
                 "answer_type": t, "question_type": "what", "answers": [{"answer": a}] * 10}
            )  # fmt: skip
    questions.append({"image_id": 9, "question": "No answer?", "question_id": 1})
    info = {"task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": "train2014"}
    (root / "q.json").write_text(json.dumps({"info": {}, **info, "questions": questions}))
    (root / "a.json").write_text(json.dumps({"annotations": annotations, **info}))
    return {"input": root / "q.json", "images": root, "extra": ["--annotations", root / "a.json"],
            "n": 2 * n_images}  # fmt: skip


def test_image_ids_kept_as_given():
    assert qa_table.image_ids(2354786, "x.jpg") == (2354786, "2354786")
    assert qa_table.image_ids("2354786", "x.jpg") == (2354786, "2354786")
    assert qa_table.image_ids(7.0, "x.jpg") == (7, "7")
    for given in ("n161313", "007", "-3", "COCO 1"):
        assert qa_table.image_ids(given, "x.jpg") == (qa_table.stable_image_id(given), given)
    assert qa_table.image_ids(None, "a/b.jpg") == (qa_table.stable_image_id("a/b.jpg"), None)
    assert qa_table.image_ids(" ", "a/b.jpg")[1] is None
    assert qa_table.image_ids("²", "x.jpg") == (qa_table.stable_image_id("²"), "²")  # not ASCII


def test_detect_and_reader_errors(tmp_path):
    gqa = gqa_world(tmp_path / "g", 3)
    vqa = vqa2_world(tmp_path / "v", 3)
    assert vqa_json.detect(gqa["input"]) == "gqa"
    assert vqa_json.detect(vqa["input"]) == "vqa2"
    (tmp_path / "rows.json").write_text('{"image": "a.jpg", "question": "q", "answer": "a"}\n')
    assert vqa_json.detect(tmp_path / "rows.json") is None  # JSON lines: the generic table
    convert = qa_table.convert
    with pytest.raises(UserError, match="pass its answers with --annotations"):
        convert(vqa["input"], tmp_path / "o1", 0, Split(), Answers())
    with pytest.raises(UserError, match="--annotations is for a VQA v2 questions file"):
        convert(gqa["input"], tmp_path / "o2", 0, Split(), Answers(), annotations=vqa["input"])
    with pytest.raises(UserError, match="not a VQA v2 annotations file"):
        convert(vqa["input"], tmp_path / "o3", 0, Split(), Answers(), annotations=gqa["input"])
    with pytest.raises(UserError, match="is a VQA v2 annotations file: pass the questions"):
        convert(tmp_path / "v/a.json", tmp_path / "o5", 0, Split(), Answers())
    # JSON lines named .json with GQA's column name, and a JSON array: generic tables
    rows = [{"image": f"images/{r['imageId']}.jpg", "imageId": r["imageId"],
             "question": r["question"], "answer": r["answer"]}
            for r in json.loads(gqa["input"].read_text()).values() if r["answer"]]  # fmt: skip
    (tmp_path / "g/lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "g/array.json").write_text(json.dumps(rows))
    assert vqa_json.detect(tmp_path / "g/lines.json") is None
    assert vqa_json.detect(tmp_path / "g/array.json") == "array"
    for name in ("lines", "array"):
        rep = convert(tmp_path / f"g/{name}.json", tmp_path / name, 0, Split(), Answers())
        assert (rep.read, rep.written, dict(rep.skipped), dict(rep.noted)) == (6, 6, {}, {})
    for split in ("train", "val", "test"):
        a, b = (pq.read_table(tmp_path / n / f"{split}.parquet") for n in ("lines", "array"))
        assert a.equals(b)
    (tmp_path / "bad.json").write_text('[{"image": "a.jpg"}, 3]')
    with pytest.raises(UserError, match="not a JSON array of row objects"):
        convert(tmp_path / "bad.json", tmp_path / "o6", 0, Split(), Answers())
    broken = tmp_path / "broken.json"
    broken.write_text('{"1": {"imageId": "n1", "question": "q?", "answer": ')
    with pytest.raises(UserError, match="malformed JSON"):
        convert(broken, tmp_path / "o4", 0, Split(), Answers())


@pytest.fixture(scope="module", params=["gqa", "vqa2"])
def table_world(request, tmp_path_factory):
    """One released-format QA file through the four commands, as a user runs them."""
    root = tmp_path_factory.mktemp(request.param)
    world = (gqa_world if request.param == "gqa" else vqa2_world)(root)
    clip = make_tiny_clip(root / "clip")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump({
        "seed": 0, "split": {"val_fraction": 0.2, "test_fraction": 0.2},
        "embed": {"num_workers": 0, "vg_crops": False, "batch_size": 8},
        "train_vqa": {"lr": 1e-2, "epochs": 3, "hidden": [32]},
    }))  # fmt: skip
    runs = {
        "prepare": invoke("prepare-qa-table", "--input", world["input"], "--out", root / "qa",
                          "--images", world["images"], *world["extra"], "--params", params),
        "embed": invoke("embed", "--dataset", "vg", "--input", root / "qa", "--images",
                        world["images"], "--clip", clip, "--out", root / "emb", "--params", params),
        "train": invoke("train-vqa", "--qa", root / "qa", "--emb", root / "emb", "--out",
                        root / "model", "--plots", root / "vqa.tsv", "--params", params),
        "evaluate": invoke("evaluate-vqa", "--qa", root / "qa", "--emb", root / "emb", "--model",
                           root / "model", "--clip", clip, "--metrics", root / "vqa.json",
                           "--detail", root / "detail.json", "--predictions", root / "vqa.jsonl",
                           "--params", params),
    }  # fmt: skip
    return request.param, root, world, runs


def test_released_format_through_embed_train_evaluate(table_world):
    kind, root, world, runs = table_world
    for name, res in runs.items():
        assert res.exit_code == 0, f"{name}: {res.output}"
    report = json.loads((root / "qa/report.json").read_text())
    skipped = {"empty_answer": 1} if kind == "gqa" else {"no_annotation": 1}
    assert (report["read"], report["written"], report["skipped"]) == (
        world["n"] + 1, world["n"], skipped,
    )  # fmt: skip
    assert report["noted"] == {}  # every image found
    rows = [r for s in ("train", "val", "test") for r in pq.read_table(root / f"qa/{s}.parquet")
            .to_pylist()]  # fmt: skip
    assert len(rows) == world["n"] and {r["split"] for r in rows} == {"train", "val", "test"}
    for r in rows:  # the id as given, and the int id the stages join on
        given = r["source_image_id"]
        assert r["image_id"] == qa_table.image_ids(given, "")[0]
        if kind == "gqa":
            assert Path(r["image_path"]).name == f"{given}.jpg"
            assert r["qtype"] in ("query", "verify")
        else:
            assert Path(r["image_path"]).name == f"COCO_train2014_{int(given):012d}.jpg"
            assert r["qtype"] in ("other", "number")
    if kind == "gqa":
        assert any(not r["source_image_id"].isdigit() for r in rows)
    embed = json.loads((root / "emb/report.json").read_text())
    assert embed["skipped"] == {} and embed["written"] == world["n"] // 2  # images
    train = json.loads((root / "model/report.json").read_text())
    assert train["skipped"] == {}
    detail = json.loads((root / "detail.json").read_text())
    test_rows = [r for r in rows if r["split"] == "test"]
    assert detail["overall"]["n"] == len(test_rows)
    for method in ("model", "zeroshot", "prior", "majority"):
        assert 0.0 <= detail["overall"][f"{method}_top1"] <= 1.0
    preds = [json.loads(line) for line in (root / "vqa.jsonl").read_text().splitlines()]
    assert len(preds) == len(test_rows)
    by_qid = {r["qid"]: r for r in test_rows}
    for p in preds:  # predictions name the image as the dataset does
        assert p["source_image_id"] == by_qid[p["qid"]]["source_image_id"]
        assert p["answer"] == by_qid[p["qid"]]["answer"]
