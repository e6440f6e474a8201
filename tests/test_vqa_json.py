"""GQA and VQA v2 question files (`pipeline.formats.vqa_json`) and image ids kept as given,
each through `clipda prepare-qa-table -> embed -> train-vqa -> evaluate-vqa` with a tiny CLIP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
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
                           root / "model", "--clip", clip, "--metrics", root / "vqa",
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


def _gqa_expected(path: Path) -> tuple[dict, dict]:
    """Columns and skips of a GQA file as the whole-file decode gave them (json.load)."""
    cols: dict[str, list] = {c: [] for c in vqa_json.COLUMNS}
    skipped: dict[str, int] = {}
    for qid, q in json.loads(path.read_text(encoding="utf-8")).items():
        if not (q.get("answer") or "").strip():
            skipped["empty_answer"] = skipped.get("empty_answer", 0) + 1
            continue
        iid, qtype = str(q["imageId"]), (q.get("types") or {}).get("structural", "")
        for col, v in zip(vqa_json.COLUMNS, (qid, iid, f"{iid}.jpg", q["question"], q["answer"],
                                             qtype)):  # fmt: skip
            cols[col].append(v)
    return cols, skipped


def _vqa2_expected(questions: Path, annotations: Path, folder: str) -> tuple[dict, dict]:
    qs = json.loads(questions.read_text())
    sub = qs["data_subtype"]
    answers = {a["question_id"]: a for a in json.loads(annotations.read_text())["annotations"]}
    cols: dict[str, list] = {c: [] for c in vqa_json.COLUMNS}
    skipped: dict[str, int] = {}
    for q in qs["questions"]:
        a = answers.get(q["question_id"])
        if a is None or not (a.get("multiple_choice_answer") or "").strip():
            reason = "no_annotation" if a is None else "empty_answer"
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        path = f"{folder}COCO_{sub}_{q['image_id']:012d}.jpg"
        for col, v in zip(vqa_json.COLUMNS, (str(q["question_id"]), str(q["image_id"]), path,
                                             q["question"], a["multiple_choice_answer"],
                                             a.get("answer_type", ""))):  # fmt: skip
            cols[col].append(v)
    return cols, skipped


def _expected_table(cols: dict) -> pa.Table:
    return pa.table({c: pa.array(cols[c], pa.string()) for c in vqa_json.COLUMNS})


def _gqa_file(path: Path, n: int = 50) -> Path:
    """GQA questions with the release's fields and the cases the reader has to keep apart."""
    rng = np.random.default_rng(0)
    questions = {}
    for i in range(n):
        q = {
            "semantic": [{"operation": "select", "dependencies": [], "argument": f"cat ({i})"},
                         {"operation": "query", "dependencies": [0], "argument": "color"}],
            "entailed": [f"{i}1"], "equivalent": [f"{i}"], "question": f"Is the ‘cat’ \"{i}\"?",
            "imageId": int(rng.integers(1, 10**7)) if i % 3 == 0 else f"n{i:06d}",
            "isBalanced": bool(i % 2), "groups": {"global": None, "local": "12q-cat_color"},
            "answer": ("yes", "no", "", "  ", None, "ünïcode")[i % 6],
            "semanticStr": "select: cat -> query: color", "fullAnswer": "The cat is white.",
            "annotations": {"answer": {"0": "1234"}, "question": {}, "fullAnswer": {}},
            "types": ({"structural": "verify", "semantic": "attr", "detailed": "colorVerify"},
                      None, {"semantic": "rel"}, {"structural": "query"})[i % 4],
        }  # fmt: skip
        if i % 5 == 0:
            del q["types"]
        if i % 7 == 0:
            del q["answer"]
        questions[f"{20000000 + i}"] = q
    path.write_text(json.dumps(questions, ensure_ascii=False), encoding="utf-8")
    return path


def _vqa2_files(root: Path, n: int = 40, keys_last: bool = False) -> tuple[Path, Path]:
    questions = [{"image_id": 9 + 1000 * (i // 3), "question": f"What is {i}?",
                  "question_id": 90 + i} for i in range(n)]  # fmt: skip
    annotations = [
        {"question_id": 90 + i, "image_id": 9 + 1000 * (i // 3), "question_type": "what is",
         "answers": [{"answer": "x", "answer_confidence": "yes", "answer_id": k}
                     for k in range(10)],
         "multiple_choice_answer": ("cat", "2", "", None, "yes")[i % 5],
         **({} if i % 4 == 3 else {"answer_type": ("other", "number", "yes/no")[i % 3]})}
        for i in range(n) if i % 6 != 5
    ]  # fmt: skip
    info = {"info": {"year": 2017, "questions": [1]}, "task_type": "Open-Ended",
            "data_type": "mscoco", "license": {"name": "CC"},
            "data_subtype": "val2014"}  # fmt: skip
    body = {"questions": questions, **info} if keys_last else {**info, "questions": questions}
    (root / "q.json").write_text(json.dumps(body))
    (root / "a.json").write_text(json.dumps({**info, "annotations": annotations}))
    return root / "q.json", root / "a.json"


@pytest.mark.parametrize("chunk", [7, vqa_json.CHUNK])
def test_streamed_reads_equal_whole_decode(tmp_path, monkeypatch, chunk):
    """The streamed readers give the rows and skips a whole-file decode gives, in the same
    order and types, whether the rows fit one Arrow batch or take several."""
    monkeypatch.setattr(vqa_json, "CHUNK", chunk)
    gqa = _gqa_file(tmp_path / "gqa.json")
    table, skipped = vqa_json.read_gqa(gqa)
    cols, expected_skips = _gqa_expected(gqa)
    assert table.schema == vqa_json.SCHEMA and table.equals(_expected_table(cols))
    assert dict(skipped) == expected_skips and expected_skips["empty_answer"] > 0
    assert table.column("qid").num_chunks == (-(-table.num_rows // chunk))
    assert {"", "verify", "query"} <= set(cols["qtype"]) and "ünïcode" in cols["answer"]
    for keys_last in (False, True):
        root = tmp_path / f"vqa{keys_last}"
        (root / "val2014").mkdir(parents=True)
        q, a = _vqa2_files(root, keys_last=keys_last)
        for images, folder in ((root, "val2014/"), (tmp_path, "")):
            table, skipped = vqa_json.read_vqa2(q, a, images)
            cols, expected_skips = _vqa2_expected(q, a, folder)
            assert table.schema == vqa_json.SCHEMA and table.equals(_expected_table(cols))
            assert dict(skipped) == expected_skips
            assert set(expected_skips) == {"no_annotation", "empty_answer"}
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    table, skipped = vqa_json.read_gqa(empty)
    assert (table.num_rows, table.schema, dict(skipped)) == (0, vqa_json.SCHEMA, {})


def test_vqa2_keys_after_the_questions(tmp_path):
    """data_type / data_subtype after the questions array are read (and checked) as well."""
    qs = [{"image_id": 9, "question": "What?", "question_id": 1}]
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps({"annotations": [{"question_id": 1, "multiple_choice_answer": "a",
                                                "answer_type": "other"}]}))  # fmt: skip
    q = tmp_path / "q.json"
    q.write_text(json.dumps({"questions": qs, "data_subtype": "test2015"}))  # no data_type
    table, _ = vqa_json.read_vqa2(q, ann, tmp_path)
    assert table.column("image_path").to_pylist() == ["COCO_test2015_000000000009.jpg"]
    q.write_text(json.dumps({"questions": qs, "data_subtype": "x", "data_type": "abstract_v002"}))
    with pytest.raises(UserError, match="data_type 'abstract_v002'"):
        vqa_json.read_vqa2(q, ann, tmp_path)
    q.write_text(json.dumps({"data_type": "mscoco", "questions": qs, "info": {"data_subtype": 1}}))
    with pytest.raises(UserError, match="names no data_subtype"):
        vqa_json.read_vqa2(q, ann, tmp_path)
    q.write_text(json.dumps({"data_type": "mscoco", "questions": qs, "data_subtype": 2014}))
    with pytest.raises(UserError, match=r"not a VQA v2 questions file \(Expected `str`, got `int`"):
        vqa_json.read_vqa2(q, ann, tmp_path)


def test_bad_files_are_one_line_errors(tmp_path):
    """Truncated or malformed JSON and fields of the wrong type: one line naming the file."""
    gqa = _gqa_file(tmp_path / "gqa.json")
    q, a = _vqa2_files(tmp_path)
    text = {p: p.read_bytes() for p in (gqa, q, a)}

    def error(call, path: Path, content: bytes, match: str) -> str:
        path.write_bytes(content)
        with pytest.raises(UserError, match=match) as exc:
            call()
        path.write_bytes(text[path])
        assert "\n" not in str(exc.value) and str(path) in str(exc.value)
        return str(exc.value)

    def read_gqa():
        return vqa_json.read_gqa(gqa)

    def read_vqa2():
        return vqa_json.read_vqa2(q, a, tmp_path)

    for call, path in ((read_gqa, gqa), (read_vqa2, q), (read_vqa2, a)):
        for cut in (len(text[path]) // 2, len(text[path]) - 1, 0):
            error(call, path, text[path][:cut], "malformed JSON")
        error(call, path, text[path] + b" {}", "malformed JSON .*trailing garbage")
        error(call, path, text[path].replace(b"?", b"\xff", 1).replace(b"other", b"\xff", 1),
              "malformed JSON .*invalid bytes in UTF8")  # fmt: skip
    gqa_q = b'{"1": {"imageId": "a", "question": "q", "types": %s}}'
    vqa_q = (b'{"data_subtype": "a", "questions": '
             b'[{"image_id": "9", "question": "q", "question_id": 1}]}')  # fmt: skip
    wrong = [
        (read_gqa, gqa, b'{"1": {"imageId": 3.5, "question": "q"}}',
         r"not a GQA questions file \(Expected `int \| str`, got `float` - at `\$\['1'\].imageId`"),
        (read_gqa, gqa, gqa_q % b'{"structural": 1}',
         r"got `int` - at `\$\['1'\].types.structural`"),
        (read_gqa, gqa, gqa_q % b"[]", r"Expected `object \| null`, got `array`"),
        (read_gqa, gqa, b'{"1": {"imageId": "a"}}', "missing required field `question`"),
        (read_gqa, gqa, b'{"1": "x"}', "Expected `object`, got `str`"),
        (read_gqa, gqa, b"[]", r"Expected `object`, got `array` - at `\$`"),
        (read_vqa2, q, vqa_q, r"got `str` - at `\$.questions\[0\].image_id`"),
        (read_vqa2, q, b'{"data_subtype": "a", "questions": {}}', "Expected `array`, got"),
        (read_vqa2, q, b'{"data_subtype": "a"}', "missing required field `questions`"),
        (read_vqa2, a, b'{"annotations": [{"question_id": 1, "answer_type": null}]}',
         r"not a VQA v2 annotations file \(Expected `str`, got `null`"),
        (read_vqa2, a, b'{"annotations": [3]}', r"Expected `object`, got `int`"),
        (read_vqa2, a, b'{"data_type": "mscoco"}', "missing required field `annotations`"),
    ]  # fmt: skip
    for call, path, content, match in wrong:
        error(call, path, content, match)
