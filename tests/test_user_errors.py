"""User mistakes -- corrupt or wrongly shaped input files, bad params.yaml values -- end in
one `error: ...` line and exit code 2 (a `UserError`), never a traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from test_vqa import make_world
from typer.testing import CliRunner

from pipeline import train_vqa
from pipeline.caption_data import read_manifest
from pipeline.cli import app
from pipeline.errors import UserError
from pipeline.formats.qa import list_qa
from pipeline.nn.caption_decoder import make_config
from pipeline.params import load_params, torch_device, typed
from pipeline.readers import read_json
from pipeline.train_caption import merged_params

JUNK = b"this is not a parquet, arrow or json file\n"


def one_error(res, *fragments: str) -> str:
    """Assert exit code 2 and exactly one `error:` line (containing `fragments`)."""
    out = res.output.strip()
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert len(out.splitlines()) == 1, out
    assert out.startswith("error: "), out
    assert "Traceback" not in res.output
    for f in fragments:
        assert f in out, out
    return out


def write_params(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump({"seed": 0, **sections}))
    return path


@pytest.fixture
def world(tmp_path):
    qa, emb, _, _ = make_world(tmp_path, n_images=10)
    return tmp_path, qa, emb


def train_vqa_cli(root: Path, qa: Path, emb: Path, params: Path | None = None, **vqa):
    params = params or write_params(root / "params.yaml", train_vqa={"epochs": 1, **vqa})
    args = ["train-vqa", "--qa", str(qa), "--emb", str(emb), "--out", str(root / "m")]
    args += ["--plots", str(root / "plots"), "--params", str(params)]
    return CliRunner().invoke(app, args)


# ---------------------------------------------------------------- corrupt input files


def test_junk_parquet_in_qa_folder(world):
    root, qa, emb = world
    (qa / "train.parquet").write_bytes(JUNK)
    res = train_vqa_cli(root, qa, emb)
    one_error(res, "train.parquet", "not a readable Parquet file")
    # the embed stage's listing of the same folder
    with pytest.raises(UserError, match="not a readable Parquet file"):
        list_qa(qa, root / "images")


@pytest.mark.parametrize("name", ["part-00000.arrow", "texts.arrow"])
def test_junk_arrow_file(world, name):
    root, qa, emb = world
    (emb / name).write_bytes(JUNK)
    res = train_vqa_cli(root, qa, emb)
    one_error(res, name, "not a readable Arrow IPC file")


def test_broken_manifest_train_vqa(world):
    root, qa, emb = world
    (emb / "manifest.json").write_text('{"dim": 16,')
    one_error(train_vqa_cli(root, qa, emb), "manifest.json", "not valid JSON")


def test_broken_manifest_evaluate_caption(tmp_path):
    emb = tmp_path / "emb"
    emb.mkdir()
    (emb / "manifest.json").write_text("{not json")
    section = {
        "emb": str(emb),
        "models": str(tmp_path / "models"),
        "out": str(tmp_path / "caption.json"),
        "pred_dir": str(tmp_path / "eval"),
    }
    params = write_params(tmp_path / "params.yaml", evaluate_caption=section)
    res = CliRunner().invoke(app, ["evaluate-caption", "--params", str(params)])
    one_error(res, "manifest.json", "not valid JSON")
    with pytest.raises(UserError, match="not valid JSON"):
        read_manifest(emb)


def test_manifest_that_is_a_list(world):
    root, qa, emb = world
    (emb / "manifest.json").write_text("[1, 2]")
    one_error(train_vqa_cli(root, qa, emb), "manifest.json", "expected an object")


def test_answers_json_that_is_a_list(world):
    root, qa, emb = world
    (qa / "answers.json").write_text(json.dumps(["on", "has"]))
    one_error(train_vqa_cli(root, qa, emb), "answers.json", "expected an object")
    with pytest.raises(UserError, match="expected an object"):
        list_qa(qa, root / "images")


def test_answers_entries_of_the_wrong_shape(world):
    root, qa, emb = world
    (qa / "answers.json").write_text(json.dumps({"answers": ["on", "has"]}))
    one_error(train_vqa_cli(root, qa, emb), "answers.json")


def test_read_json(tmp_path):
    path = tmp_path / "x.json"
    path.write_bytes(b"\xff\xfe junk")
    with pytest.raises(UserError, match="not valid JSON"):
        read_json(path)
    path.write_text('"a string"')
    with pytest.raises(UserError, match="expected an object at the top level, got a string"):
        read_json(path)
    assert read_json(path, expect=str) == "a string"
    assert read_json(path, expect=None) == "a string"
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "missing.json")


# ---------------------------------------------------------------- bad params values


def train_caption_cli(tmp_path: Path, **section):
    params = write_params(tmp_path / "params.yaml", train_caption=section)
    args = ["train-caption", "--variant", "noada", "--params", str(params)]
    args += ["--laion", str(tmp_path / "laion"), "--flickr", str(tmp_path / "flickr")]
    args += ["--out", str(tmp_path / "m"), "--plots", str(tmp_path / "plots")]
    return CliRunner().invoke(app, args)


def test_train_caption_lr_not_a_number(tmp_path):
    res = train_caption_cli(tmp_path, lr="abc")
    one_error(res, "params train_caption.lr: expected a number, got 'abc'")


def test_train_caption_zero_heads_and_batch(tmp_path):
    res = train_caption_cli(tmp_path, model={"heads": 0})
    one_error(res, "train_caption.model.heads", "> 0")
    one_error(train_caption_cli(tmp_path, batch_size=0), "train_caption.batch_size", "> 0")
    with pytest.raises(UserError, match="heads must be >= 1"):
        make_config(heads=0)


def test_train_vqa_bad_device_and_lr(world):
    root, qa, emb = world
    one_error(train_vqa_cli(root, qa, emb, device="gpu"), "unknown device 'gpu'")
    one_error(
        train_vqa_cli(root, qa, emb, lr="abc"), "params train_vqa.lr: expected a number, got 'abc'"
    )
    with pytest.raises(UserError, match="unknown device"):
        torch_device("cuda:x")


@pytest.mark.parametrize("template", ["a photo of {answer", "{answer!z}", "a {subject}"])
def test_evaluate_vqa_bad_template(world, template):
    root, qa, emb = world
    params = write_params(root / "params.yaml", evaluate_vqa={"templates": {"relation": template}})
    args = ["evaluate-vqa", "--qa", str(qa), "--emb", str(emb), "--model", str(root / "m")]
    args += ["--out", str(root / "vqa.json"), "--predictions", str(root / "vqa.jsonl")]
    res = CliRunner().invoke(app, [*args, "--params", str(params)])
    one_error(res, "evaluate_vqa.templates.relation")


def test_exponent_string_is_a_float(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("train_caption:\n  lr: 1e-3\ntrain_vqa:\n  lr: 1e-3\n")
    p = load_params("train_caption", params)
    assert p["lr"] == "1e-3"  # what PyYAML makes of it
    assert merged_params(p)["lr"] == 0.001
    assert train_vqa.settings(load_params("train_vqa", params))["lr"] == 0.001


def test_typed_casts():
    defaults = {"n": 3, "x": 0.5, "flag": False, "name": "a", "xs": [1], "opt": None}
    out = typed(
        {"n": "4", "x": 2, "flag": "true", "name": "b", "xs": "a,b", "opt": 7, "other": "?"},
        defaults,
        "s",
    )
    assert out == {"n": 4, "x": 2.0, "flag": True, "name": "b", "xs": "a,b", "opt": 7, "other": "?"}
    assert isinstance(out["x"], float)
    assert typed({"n": 5.0}, defaults, "s")["n"] == 5
    for key, value, msg in [
        ("n", "abc", "params s.n: expected an integer, got 'abc'"),
        ("n", 2.5, "expected an integer"),
        ("n", True, "expected an integer"),
        ("x", True, "expected a number"),
        ("flag", 1, "expected true or false"),
        ("flag", "yes", "expected true or false"),
        ("name", 3, "expected a string"),
    ]:
        with pytest.raises(UserError, match=msg):
            typed({key: value}, defaults, "s")
    with pytest.raises(UserError, match="params s.n: must be > 0, got 0"):
        typed({"n": 0}, defaults, "s", positive=("n",))
