"""prepare_vqa on a hand-made Visual Genome folder holding every schema variant and quirk.

The fixture (see `make_vg`) is small enough to count by hand; the expected numbers below
are derived in the comments next to each entry.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import UserError
from pipeline.formats import vg, vg_qa
from pipeline.formats.vg_qa import SCHEMA, SPLITS, build_vocab, split_of
from pipeline.stages import prepare_vqa
from pipeline.stages.prepare_vqa import main

# settings as flat keys; `write_params` puts each in its section
ALL_TRAIN = {"val_fraction": 0.0, "test_fraction": 0.0, "max_objects_per_image": 2}
SECTION_OF = {"val_fraction": "split", "test_fraction": "split", "top_k": "answers",
              "min_count": "answers"}  # fmt: skip


def write_params(path: Path, settings: dict) -> Path:
    """A params file: `seed` at the top level, the split and answers keys in their shared
    sections, the rest under `prepare_vqa`."""
    data: dict = {}
    for key, value in settings.items():
        if key == "seed":
            data["seed"] = value
        else:
            data.setdefault(SECTION_OF.get(key, "prepare_vqa"), {})[key] = value
    path.write_text(yaml.safe_dump(data))
    return path


def run(vg_dir: Path, out: Path, settings: dict) -> dict:
    """The stage end to end with `settings` (flat keys); its report.json."""
    params = write_params(out.parent / f"{out.name}.params.yaml", settings)
    main(vg_dir, out, params)
    return json.loads((out / "report.json").read_text())


def ent(oid, x=0, y=0, w=10, h=10, name=None, names=None, synsets=True):
    """A subject/object dict; `name` and `names` are only set when given."""
    d = {"object_id": oid, "x": x, "y": y, "w": w, "h": h} if oid is not None else \
        {"x": x, "y": y, "w": w, "h": h}  # fmt: skip
    if name is not None:
        d["name"] = name
    if names is not None:
        d["names"] = names
    if synsets:
        d["synsets"] = ["thing.n.01"]
    return d


def rel(pred, subj, obj, rid=0):
    return {"predicate": pred, "subject": subj, "object": obj, "relationship_id": rid,
            "synsets": []}  # fmt: skip


# image 1: 13 relationships -> 5 written, 8 skipped
IMAGE1 = [
    rel("ON", ent(10, 0, 0, 10, 10, name="Man"), ent(11, 5, 5, 10, 10, names=["Table"])),  # r0 ok
    rel(
        "  Next   To ",
        ent(12, 1, 2, 3, 4, names=["", "Dog"], synsets=False),
        ent(13, 2, 3, 4, 5, name="cat"),
    ),  # r1 ok: "next to", dog, cat
    rel("", ent(40, name="a"), ent(41, name="b")),  # r2 empty_predicate
    rel("on", ent(14, names=[]), ent(42, name="b")),  # r3 subject_no_name
    rel("on", ent(43, name="a"), ent(15)),  # r4 object_no_name (neither name nor names)
    rel("near", ent(10, name="man"), ent(10, name="man")),  # r5 self_relation (same id)
    rel(
        "on", ent(20, 50, 50, 5, 5, name="man "), ent(21, 60, 60, 5, 5, name="TABLE")
    ),  # r6 duplicate_triple of r0
    rel("wears", ent(22, 0, 0, 4, 4, name="Guy"), ent(23, 0, 0, 2, 2, name="hat")),  # r7 aliases
    rel("on", ent(24, 0, 0, 0, 5, name="a"), ent(25, name="b")),  # r8 bad_box (w = 0)
    {"predicate": "on", "object": ent(26, name="b")},  # r9 malformed (no subject)
    rel(
        "has", ent(30, 1.6, 2.4, 3.5, 4.49, name="dog"), ent(31, 5, 5, 1, 1, name="tail")
    ),  # r10 ok, float coords rounded
    rel(
        "on", ent(None, 1, 1, 2, 2, name="box"), ent(None, 1, 1, 2, 2, name="Box")
    ),  # r11 self_relation (same name and box)
    rel(
        "beside", ent(None, 0, 0, 5, 5, name="Man"), ent(None, 10, 0, 5, 5, name="man")
    ),  # r12 ok: man next to (another) man
]
RELATIONSHIPS = [
    {"relationships": IMAGE1, "image_id": 1},
    {
        "image_id": 2,
        "relationships": [  # image_data uses "id"; file in VG_100K_2
            rel("Holding", ent(50, names=["Woman"]), ent(51, name="umbrella")),
            rel("on", ent(52, name="man"), ent(53, name="table")),  # no dedupe across images
        ],
    },
    {"image_id": 3, "relationships": [rel("in", ent(60, name="dog"), ent(61, name="car"))]},
    {"image_id": 4, "relationships": [rel("on", ent(70, name="cat"), ent(71, name="table"))]},
    {
        "image_id": 99,
        "relationships": [  # not in image_data.json
            rel("on", ent(80, name="a"), ent(81, name="b")),
            rel("on", ent(82, name="a"), ent(83, name="b")),
        ],
    },
    {"image_id": 5},  # malformed entry: no relationships list
    {"relationships": [rel("on", ent(90, name="a"), ent(91, name="b"))]},  # no image id
]
# read 13+2+1+1+2+0+1 = 20; written 5+2+1+1 = 9
EXPECTED_SKIPPED = {
    "bad_box": 1,
    "duplicate_triple": 1,
    "empty_predicate": 1,
    "image_not_in_image_data": 2,
    "malformed": 1,
    "no_image_id": 1,
    "object_no_name": 1,
    "self_relation": 2,
    "subject_no_name": 1,
}
OBJECTS = [
    {
        "image_id": 1,
        "objects": [
            ent(100, 0, 0, 10, 10, names=["Tree"]),  # o0 area 100 (dropped by the cap of 2)
            ent(101, 0, 0, 20, 20, name="guy"),  # o1 area 400 -> "man"
            ent(102, names=[]),  # o2 no_name
            ent(101, 0, 0, 20, 20, names=["man"]),  # o3 duplicate_object
            ent(104, 0, 0, 30, 30, names=["sky"], synsets=False),  # o4 area 900
            ent(105, 0, 0, -1, 5, names=["grass"]),  # o5 bad_box
            "x",  # o6 malformed
        ],
        "image_url": "https://example.org/1.jpg",
    },
    {"image_id": 3, "objects": [ent(200, 1, 1, 5, 5, names=["Dog"])]},
    {"image_id": 99, "objects": [ent(300, names=["cup"])]},
]
IMAGE_DATA = [
    {"width": 800, "url": "u1", "height": 600, "image_id": 1, "coco_id": None, "flickr_id": None},
    {"width": 640, "url": "u2", "height": 480, "id": 2},  # v1.0 spelling
    {"width": 100, "height": 50, "image_id": 3},  # no file on disk
    {"width": 10, "height": 10, "image_id": 4},  # in both folders: VG_100K wins
    {"url": "no id here"},
]


def make_vg(root: Path) -> Path:
    vg_dir = root / "vg"
    (vg_dir / "VG_100K").mkdir(parents=True)
    (vg_dir / "VG_100K_2").mkdir()
    for rel_path in ("VG_100K/1.jpg", "VG_100K_2/2.jpg", "VG_100K/4.jpg", "VG_100K_2/4.jpg",
                     "VG_100K/7.jpg", "VG_100K/readme.txt"):  # fmt: skip
        (vg_dir / rel_path).write_bytes(b"jpg")
    (vg_dir / "relationships.json").write_text(json.dumps(RELATIONSHIPS))
    (vg_dir / "objects.json").write_text(json.dumps(OBJECTS))
    (vg_dir / "image_data.json").write_text(json.dumps(IMAGE_DATA))
    (vg_dir / "relationship_alias.txt").write_text("wearing,wears,is wearing\nnext to,beside\n")
    (vg_dir / "object_alias.txt").write_text("man,guy,men\n\nPerson , People\n")
    return vg_dir


@pytest.fixture
def vg_dir(tmp_path):
    return make_vg(tmp_path)


def rows(out: Path, split: str = "train") -> list[dict]:
    return pq.read_table(out / f"{split}.parquet").to_pylist()


def test_relationship_counts_add_up(vg_dir, tmp_path):
    saved = run(vg_dir, tmp_path / "qa", ALL_TRAIN)
    assert (saved["read"], saved["written"]) == (20, 9)
    assert saved["read"] == saved["written"] + saved["skipped_total"] == 20
    assert saved["skipped"] == EXPECTED_SKIPPED
    assert saved["ids"]["skipped:duplicate_triple"] == ["1/r6"]
    assert saved["ids"]["skipped:self_relation"] == ["1/r5", "1/r11"]
    assert saved["ids"]["skipped:image_not_in_image_data"] == ["99"]
    assert saved["json_entries"] == {
        "read": {"relationships": 7, "objects": 3},
        "malformed": {"relationships": 1, "objects": 0},
    }
    assert saved["json_backend"] == vg.json_backend()


def test_relation_rows_are_normalised(vg_dir, tmp_path):
    run(vg_dir, tmp_path / "qa", ALL_TRAIN)
    rel_rows = [r for r in rows(tmp_path / "qa") if r["qtype"] == "relation"]
    got = [(r["qid"], r["subject"], r["answer"], r["object"]) for r in rel_rows]
    assert got == [
        ("1/r0", "man", "on", "table"),
        ("1/r1", "dog", "next to", "cat"),
        ("1/r7", "man", "wearing", "hat"),
        ("1/r10", "dog", "has", "tail"),
        ("1/r12", "man", "next to", "man"),
        ("2/r0", "woman", "holding", "umbrella"),
        ("2/r1", "man", "on", "table"),
        ("3/r0", "dog", "in", "car"),
        ("4/r0", "cat", "on", "table"),
    ]
    first = rel_rows[0]
    assert first["question"] == "What is the relationship between man and table?"
    assert (first["subj_box"], first["obj_box"], first["union_box"]) == (
        [0, 0, 10, 10],
        [5, 5, 10, 10],
        [0, 0, 15, 15],
    )
    assert (first["width"], first["height"], first["image_path"]) == (800, 600, "VG_100K/1.jpg")
    r10 = rel_rows[3]
    assert r10["subj_box"] == [2, 2, 4, 4] and r10["union_box"] == [2, 2, 4, 4]
    assert rel_rows[1]["union_box"] == [1, 2, 5, 6]
    assert rel_rows[4]["union_box"] == [0, 0, 15, 5]


def test_image_ids_paths_and_sizes(vg_dir, tmp_path):
    rep = run(vg_dir, tmp_path / "qa", ALL_TRAIN)
    by_image = {r["image_id"]: (r["image_path"], r["width"], r["height"])
                for r in rows(tmp_path / "qa")}  # fmt: skip
    assert by_image == {
        1: ("VG_100K/1.jpg", 800, 600),
        2: ("VG_100K_2/2.jpg", 640, 480),  # "id" key in image_data.json
        3: (None, 100, 50),  # no file
        4: ("VG_100K/4.jpg", 10, 10),
    }
    images = rep["images"]
    assert images["in_image_data"] == 4
    assert images["files_found"] == 4  # 1, 2, 4, 7 (readme.txt ignored)
    assert images["files_per_folder"] == {"VG_100K": 3, "VG_100K_2": 1}
    assert images["missing_file"] == 1
    assert images["rows_without_image_file"] == 2  # 3/r0 and the object question 3/o0
    assert images["noted"] == {"image_data_entry_without_id": 1, "image_file_missing": 1}


def test_object_questions_capped_largest_first(vg_dir, tmp_path):
    rep = run(vg_dir, tmp_path / "qa", ALL_TRAIN)
    obj_rows = [r for r in rows(tmp_path / "qa") if r["qtype"] == "object"]
    got = [(r["qid"], r["answer"], r["subj_box"]) for r in obj_rows]
    assert got == [("1/o4", "sky", [0, 0, 30, 30]), ("1/o1", "man", [0, 0, 20, 20]),
                   ("3/o0", "dog", [1, 1, 5, 5])]  # fmt: skip
    for r in obj_rows:
        assert r["question"] == "What is this?"
        assert r["subject"] == r["answer"] and r["object"] is None
        assert r["obj_box"] is None and r["union_box"] is None
    objects = rep["objects"]
    assert (objects["read"], objects["written"]) == (9, 3)
    assert objects["skipped"] == {"bad_box": 1, "duplicate_object": 1, "image_not_in_image_data": 1,
                                  "malformed": 1, "no_name": 1, "over_image_cap": 1}  # fmt: skip
    assert objects["read"] == objects["written"] + objects["skipped_total"]


def test_object_cap_variants(vg_dir, tmp_path):
    uncapped = run(vg_dir, tmp_path / "a", {**ALL_TRAIN, "max_objects_per_image": None})
    assert uncapped["objects"]["written"] == 4  # sky, man, tree + dog
    none = run(vg_dir, tmp_path / "b", {**ALL_TRAIN, "max_objects_per_image": 0})
    assert none["objects"]["read"] == 0
    assert {r["qtype"] for r in rows(tmp_path / "b")} == {"relation"}
    assert none["written"] == 9


def test_dedupe_off_keeps_duplicate_triples(vg_dir, tmp_path):
    rep = run(vg_dir, tmp_path / "qa", {**ALL_TRAIN, "dedupe_triples": False})
    assert (rep["read"], rep["written"]) == (20, 10)
    assert "duplicate_triple" not in rep["skipped"]
    assert "1/r6" in {r["qid"] for r in rows(tmp_path / "qa")}


def test_answer_vocabulary_and_in_vocab(vg_dir, tmp_path):
    run(vg_dir, tmp_path / "qa", {**ALL_TRAIN, "top_k": 4, "min_count": 1})
    answers = json.loads((tmp_path / "qa" / "answers.json").read_text())
    # on x3, next to x2, then count-1 answers alphabetically: dog, has, holding, in, ...
    assert answers["answers"] == [
        {"answer": "on", "count": 3}, {"answer": "next to", "count": 2},
        {"answer": "dog", "count": 1}, {"answer": "has", "count": 1},
    ]  # fmt: skip
    assert (answers["top_k"], answers["min_count"]) == (4, 1)
    flagged = {r["qid"]: r["in_vocab"] for r in rows(tmp_path / "qa")}
    assert len(flagged) == 12 and sum(flagged.values()) == 7
    assert flagged["1/r7"] is False and flagged["3/o0"] is True  # wearing out, dog in
    run(vg_dir, tmp_path / "qa2", {**ALL_TRAIN, "top_k": 100, "min_count": 2})
    answers = json.loads((tmp_path / "qa2" / "answers.json").read_text())
    assert [a["answer"] for a in answers["answers"]] == ["on", "next to"]


def test_build_vocab_ties_and_limits():
    counts = Counter({"b": 2, "a": 2, "c": 5, "d": 1})
    assert build_vocab(counts, 10, 1) == [("c", 5), ("a", 2), ("b", 2), ("d", 1)]
    assert build_vocab(counts, 2, 1) == [("c", 5), ("a", 2)]
    assert build_vocab(counts, 10, 3) == [("c", 5)]


def test_splits_by_image_are_disjoint_and_deterministic(vg_dir, tmp_path):
    params = {"val_fraction": 0.5, "test_fraction": 0.25, "seed": 3, "max_objects_per_image": 2}
    rep = run(vg_dir, tmp_path / "a", params)
    run(vg_dir, tmp_path / "b", params)
    seen: dict[int, str] = {}
    total = 0
    for s in SPLITS:
        table = pq.read_table(tmp_path / "a" / f"{s}.parquet")
        assert table.schema == SCHEMA
        assert table.equals(pq.read_table(tmp_path / "b" / f"{s}.parquet"))
        for r in table.to_pylist():
            assert r["split"] == s == split_of(r["image_id"], 3, 0.5, 0.25)
            assert seen.setdefault(r["image_id"], s) == s
        total += table.num_rows
        counts = rep["splits"][s]
        assert counts["rows"] == table.num_rows == counts["relation"] + counts["object"]
        assert counts["images"] == len({r["image_id"] for r in table.to_pylist()})
    assert total == 12
    # the vocabulary counts train rows only
    answers = json.loads((tmp_path / "a" / "answers.json").read_text())["answers"]
    assert sum(a["count"] for a in answers) == rep["splits"]["train"]["rows"]


def test_split_of_fractions():
    got = Counter(split_of(i, 0, 0.1, 0.2) for i in range(20000))
    assert abs(got["val"] / 20000 - 0.1) < 0.01 and abs(got["test"] / 20000 - 0.2) < 0.01
    assert split_of(12345, 0, 0.1, 0.2) == split_of(12345, 0, 0.1, 0.2)
    assert Counter(split_of(i, 1, 0.1, 0.2) for i in range(20000)) != got  # seed matters


def test_small_row_groups_give_the_same_rows(vg_dir, tmp_path):
    run(vg_dir, tmp_path / "big", ALL_TRAIN)
    run(vg_dir, tmp_path / "small", {**ALL_TRAIN, "row_group_size": 2})
    # a buffer is flushed once it holds >= 2 rows after an image: 5 | 2 | 1+1 | 2 | 1
    assert pq.ParquetFile(tmp_path / "small" / "train.parquet").num_row_groups == 5
    assert pq.ParquetFile(tmp_path / "big" / "train.parquet").num_row_groups == 1
    big = pq.read_table(tmp_path / "big" / "train.parquet")
    assert big.equals(pq.read_table(tmp_path / "small" / "train.parquet"))
    assert big.schema == SCHEMA and big.schema.field("subj_box").type == pa.list_(pa.int32(), 4)
    assert not list((tmp_path / "small").glob(".*"))  # staged files removed


def test_empty_splits_are_written_with_the_schema(vg_dir, tmp_path):
    run(vg_dir, tmp_path / "qa", ALL_TRAIN)
    for s in ("val", "test"):
        table = pq.read_table(tmp_path / "qa" / f"{s}.parquet")
        assert table.num_rows == 0 and table.schema == SCHEMA


def test_missing_aliases_keep_raw_names(vg_dir, tmp_path):
    (vg_dir / "relationship_alias.txt").unlink()
    (vg_dir / "object_alias.txt").unlink()
    run(vg_dir, tmp_path / "qa", ALL_TRAIN)
    got = {r["qid"]: (r["subject"], r["answer"]) for r in rows(tmp_path / "qa")}
    assert got["1/r7"] == ("guy", "wears")
    assert got["1/r12"] == ("man", "beside")


@pytest.mark.parametrize("bad, match", [
    ("[{\"image_id\": 1, \"relationships\": [", "malformed JSON"),
    ("{\"image_id\": 1}", "expected a JSON array"),
])  # fmt: skip
def test_broken_json_is_a_user_error(vg_dir, tmp_path, bad, match):
    (vg_dir / "relationships.json").write_text(bad)
    with pytest.raises(UserError, match=match):
        run(vg_dir, tmp_path / "qa", ALL_TRAIN)
    assert not (tmp_path / "qa" / "train.parquet").exists()
    assert not list((tmp_path / "qa").glob(".*"))


def test_missing_inputs_are_user_errors(vg_dir, tmp_path):
    with pytest.raises(UserError, match="folder not found"):
        run(tmp_path / "nope", tmp_path / "qa", {})
    (vg_dir / "objects.json").unlink()
    with pytest.raises(UserError, match="objects.json not found"):
        run(vg_dir, tmp_path / "qa", {})
    rep = run(vg_dir, tmp_path / "qa", {**ALL_TRAIN, "max_objects_per_image": 0})
    assert rep["written"] == 9  # objects.json is not needed without object questions


@pytest.mark.parametrize("bad, key", [
    ({"val_fraction": 0.7, "test_fraction": 0.5}, "split.test_fraction"),
    ({"val_fraction": -0.1}, "split.val_fraction"), ({"top_k": 0}, "answers.top_k"),
    ({"min_count": 1.5}, "answers.min_count"),
    ({"max_objects_per_image": -1}, "prepare_vqa.max_objects_per_image"),
    ({"dedupe_triples": "yes"}, "prepare_vqa.dedupe_triples"),
    ({"row_group_size": 0}, "prepare_vqa.row_group_size"),
    ({"val_fraction": 0.1, "vg": "data/sample/vg"}, "prepare_vqa.vg"),  # paths are options now
])  # fmt: skip
def test_bad_params(vg_dir, tmp_path, bad, key):
    with pytest.raises(UserError, match=f"^params {key}: "):
        run(vg_dir, tmp_path / "qa", bad)
    assert not (tmp_path / "qa").exists()  # settings are checked before anything is written


def test_format_helpers(tmp_path):
    assert vg.normalize("  Next \t To\n") == "next to"
    assert vg.normalize(None) == ""
    dog = vg.Ent.from_dict({"name": " ", "names": ["", 3, "Dog"], "x": 1, "y": 2, "w": 3, "h": 4})
    assert (dog.name, dog.names, dog.w, dog.object_id) == (" ", ("", "Dog"), 3, None)
    assert vg.Ent.from_dict({"name": 5, "names": "not a list"}).names == ()
    assert vg.Ent.from_dict({"x": 1, "y": 2, "w": 0.4, "h": 4}).w == 0  # no box: w = h = 0
    assert vg.box_of({"x": 1, "y": 2, "w": 3, "h": 4}) == (1, 2, 3, 4)
    assert vg.box_of({"x": 1, "y": 2, "w": 3}) is None
    assert vg.box_of({"x": "1", "y": 2, "w": 3, "h": 4}) is None
    assert vg.box_of({"x": True, "y": 2, "w": 3, "h": 4}) is None
    assert vg.box_of({"x": 0.4, "y": 2.6, "w": 3.0, "h": 0.4}) is None  # h rounds to 0
    assert vg.image_id_of({"id": "17"}) == 17 and vg.image_id_of({"image_id": 3, "id": 4}) == 3
    alias = tmp_path / "a.txt"
    alias.write_text("man, Guy ,men\nman,bloke\nguy,dude\n\n")
    assert vg.load_aliases(alias) == {"guy": "man", "men": "man", "bloke": "man", "dude": "guy"}
    assert vg.load_aliases(tmp_path / "missing.txt") == {}
    norm = vg.Normalizer({"guy": "man"})
    assert norm(" GUY ") == "man" and norm(["unhashable"]) == "" and norm(None) == ""
    assert norm[("", " ", "Guy", "dog")] == "man" and norm[()] == norm[(" ",)] == ""


def test_cli_prepare_vqa(vg_dir, tmp_path):
    params = write_params(tmp_path / "params.yaml", {"seed": 0, **ALL_TRAIN})

    def invoke(*args: str):
        return CliRunner().invoke(app, ["prepare-vqa", *args, "--params", str(params)])

    res = invoke("--vg", str(vg_dir), "--out", str(tmp_path / "qa"))
    assert res.exit_code == 0, res.output
    assert "prepare_vqa: read 20, wrote 9" in res.output
    assert "objects: read 9, wrote 3; rows train/val/test 12/0/0" in res.output
    assert (tmp_path / "qa" / "train.parquet").exists()
    assert (tmp_path / "qa" / "answers.json").exists()
    res = invoke("--vg", str(tmp_path / "nope"), "--out", str(tmp_path / "qa2"))
    assert res.exit_code == 2
    assert res.output.strip().startswith("error:") and res.output.strip().count("\n") == 0
    res = invoke("--vg", str(vg_dir))  # paths are required options: no defaults
    assert res.exit_code == 2 and not (tmp_path / "qa2").exists()


def test_repeated_image_entry_is_skipped_and_counted(vg_dir, tmp_path):
    rels = json.loads((vg_dir / "relationships.json").read_text())
    first = next(e for e in rels if isinstance(e, dict) and e.get("relationships"))
    (vg_dir / "relationships.json").write_text(json.dumps([*rels, first]))
    base = run(make_vg(tmp_path / "clean"), tmp_path / "qa0", ALL_TRAIN)
    rep = run(vg_dir, tmp_path / "qa", ALL_TRAIN)
    n = len(first["relationships"])
    assert rep["read"] == base["read"] + n and rep["written"] == base["written"]
    assert rep["skipped"]["duplicate_image_entry"] == n
    assert rep["read"] == rep["written"] + sum(rep["skipped"].values())
    assert rows(tmp_path / "qa") == rows(tmp_path / "qa0")


def clean_entries(n: int) -> list[dict]:
    """Relationship entries msgspec takes as they are (ints, strings, objects)."""
    return [
        {"relationships": [rel("on", ent(10 * i, 0, 0, 5, 5, name="cup [a]"),
                               ent(10 * i + 1, 1, 1, 5, 5, names=["x}, {", "t"]))] * (i % 3),
         "image_id": i}
        for i in range(n)
    ]  # fmt: skip


QUIRKY = {"relationships": [rel("on", ent(1, 0.5, 0, 5, 5, name="a"), ent(2, name=None))],
          "image_id": "7"}  # fmt: skip
NESTED = {"relationships": [None, {"relationships": [1]}], "image_id": 8}  # a false cut
FILES = {
    "clean": json.dumps(clean_entries(40)),
    "indented": json.dumps(clean_entries(9), indent=1),
    "quirky middle": json.dumps([*clean_entries(20), QUIRKY, *clean_entries(20)]),
    "nested signature": json.dumps([*clean_entries(20), NESTED, *clean_entries(20)]),
    "not objects": json.dumps([1, None, *clean_entries(3), "x", [2]]),
    "empty": "[ ]",
    "huge int": json.dumps([*clean_entries(20), {"relationships": [], "image_id": 2**70}]),
    "lone surrogate": json.dumps(clean_entries(20))[:-1] + ', {"relationships": [{"predicate":'
    ' "\\ud800", "subject": {"x": 1, "y": 1, "w": 1, "h": 1}, "object": {"x": 1, "y": 1,'
    ' "w": 1, "h": 1}}]}]',
    "byte-order mark": "\ufeff" + json.dumps(clean_entries(3)),
    "truncated": json.dumps(clean_entries(20))[:-30],
    "trailing comma": json.dumps(clean_entries(20))[:-1] + ",]",
    "trailing garbage": json.dumps(clean_entries(20)) + " x",
}


@pytest.mark.parametrize("block", [40, 1000, 1 << 21])  # 40: no cut within 8 blocks
@pytest.mark.parametrize("name", FILES)
def test_iter_entries_reads_what_ijson_and_from_dict_read(tmp_path, monkeypatch, name, block):
    """Blocks by msgspec, fallbacks by ijson: the same entries and errors as ijson alone."""
    path = tmp_path / "relationships.json"
    path.write_text(FILES[name], encoding="utf-8")
    monkeypatch.setattr(vg, "BLOCK", block)

    def read(entries):
        try:
            return list(entries)
        except UserError as exc:
            return str(exc).split(" near byte")[0]

    got = read(vg.iter_entries(path, vg.RelEntry))
    assert got == read(map(vg.RelEntry.from_dict, vg.iter_array(path)))
    if name.startswith("t") or name == "byte-order mark":
        assert got == f"{path}: malformed JSON"
    elif name == "clean":
        assert got[5].relationships[0].object.names == ("x}, {", "t")


def test_a_cut_inside_a_nested_list_falls_back_to_ijson(tmp_path, monkeypatch):
    text = json.dumps([*clean_entries(5), NESTED, *clean_entries(5)])
    path = tmp_path / "relationships.json"
    path.write_text(text)
    # the first block ends in NESTED, after its inner '{"relationships"', the cut found
    monkeypatch.setattr(vg, "BLOCK", text.index('null, {"relationships"') + 30)
    got = list(vg.iter_entries(path, vg.RelEntry))
    assert got == list(map(vg.RelEntry.from_dict, vg.iter_array(path)))
    assert len(got) == 11 and got[5].relationships == [None, None]


def test_tiny_blocks_give_the_same_outputs(vg_dir, tmp_path, monkeypatch):
    run(vg_dir, tmp_path / "a", {})
    monkeypatch.setattr(vg, "BLOCK", 50)
    run(vg_dir, tmp_path / "b", {})
    for name in ("train.parquet", "val.parquet", "test.parquet", "answers.json", "report.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_row_groups_close_after_the_image_that_fills_them():
    assert vg_qa.row_groups([3, 1, 4, 1, 5], 4) == [4, 4, 6]
    assert vg_qa.row_groups([3, 1, 4, 1], 4) == [4, 4, 1]
    assert vg_qa.row_groups([], 4) == []


def test_objects_read_by_a_second_process_give_the_same_outputs(vg_dir, tmp_path, monkeypatch):
    settings = [{}, {"row_group_size": 2}]
    for k, params in enumerate(settings):
        run(vg_dir, tmp_path / f"one{k}", params)
    monkeypatch.setattr(prepare_vqa, "APART_BYTES", 0)  # objects.json by a second process
    for k, params in enumerate(settings):
        run(vg_dir, tmp_path / f"two{k}", params)
        for name in ("train.parquet", "val.parquet", "test.parquet", "answers.json", "report.json"):
            assert (tmp_path / f"one{k}" / name).read_bytes() == (
                tmp_path / f"two{k}" / name
            ).read_bytes()
        assert not list((tmp_path / f"two{k}").glob(".*"))


@pytest.mark.parametrize("broken", ["relationships.json", "objects.json"])
def test_errors_of_either_process_are_user_errors(vg_dir, tmp_path, monkeypatch, broken):
    monkeypatch.setattr(prepare_vqa, "APART_BYTES", 0)
    (vg_dir / broken).write_text('[{"image_id": 1, "objects": [')
    with pytest.raises(UserError, match=f"{broken}: malformed JSON"):
        run(vg_dir, tmp_path / "qa", ALL_TRAIN)
    assert not list((tmp_path / "qa").iterdir())
