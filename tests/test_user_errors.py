"""User mistakes -- corrupt or wrongly shaped input files, bad params.yaml values -- end in
one `error: ...` line and exit code 2 (a `UserError`), never a traceback."""

from __future__ import annotations

import dataclasses
import importlib
import json
import types
import typing
from pathlib import Path

import pytest
import yaml
from test_vqa import make_world
from typer.testing import CliRunner

from pipeline.caption.data import read_manifest
from pipeline.cli import app
from pipeline.errors import UserError
from pipeline.formats.qa import list_qa
from pipeline.readers import read_json
from pipeline.settings import load
from pipeline.training import pick_device

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
    args += ["--plots", str(root / "vqa.tsv"), "--params", str(params)]
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


def test_vqa_head_of_another_backbone(world):
    """A head trained on one CLIP's embeddings, scored on another's: one line."""
    root, qa, emb = world
    assert train_vqa_cli(root, qa, emb).exit_code == 0
    info = json.loads((emb / "manifest.json").read_text())
    (emb / "manifest.json").write_text(json.dumps({**info, "model": "b", "revision": "r1"}))
    args = ["evaluate-vqa", "--qa", str(qa), "--emb", str(emb), "--model", str(root / "m")]
    args += ["--clip", "b", "--metrics", str(root / "vqa.json"), "--detail", str(root / "d.json")]
    args += ["--predictions", str(root / "vqa.jsonl")]
    out = one_error(CliRunner().invoke(app, args), "one backbone per run")
    assert "was trained on embeddings of CLIP fake-clip (r0)" in out and "b (r1)" in out


def test_broken_manifest_evaluate_caption(tmp_path):
    emb = tmp_path / "emb"
    emb.mkdir()
    (emb / "manifest.json").write_text("{not json")
    args = ["evaluate-caption", "--emb", str(emb), "--clip", str(tmp_path / "clip")]
    args += ["--model", str(tmp_path / "noada"), "--metrics", str(tmp_path / "caption.json")]
    args += ["--detail", str(tmp_path / "detail.json"), "--predictions", str(tmp_path / "eval")]
    res = CliRunner().invoke(app, args)
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
#
# Every key of every stage's settings, through the stage's own command: an unknown key, a
# value of the wrong type and a negative number are each one line naming `section.key`.
# Settings load before any input is touched, so the paths below need not exist.

DUMMY = "does-not-exist"
STAGE_ARGS = {
    "synth": ["--out", DUMMY],
    "clip_standin": ["--out", DUMMY],
    "clip_bootstrap": ["--laion", DUMMY, "--flickr30k", DUMMY, "--pretrained", "scratch",
                       "--out", DUMMY, "--metrics", DUMMY, "--detail", DUMMY, "--plots", DUMMY],
    "prepare_vqa": ["--vg", DUMMY, "--out", DUMMY],
    "embed": ["--dataset", "vg", "--input", DUMMY, "--images", DUMMY, "--clip", DUMMY,
              "--out", DUMMY],
    "train_caption": ["--variant", "noada", "--laion", DUMMY, "--flickr30k", DUMMY,
                      "--clip", DUMMY, "--out", DUMMY, "--plots", DUMMY],
    "evaluate_caption": ["--emb", DUMMY, "--clip", DUMMY, "--model", DUMMY, "--metrics", DUMMY,
                         "--detail", DUMMY, "--predictions", DUMMY],
    "train_vqa": ["--qa", DUMMY, "--emb", DUMMY, "--out", DUMMY, "--plots", DUMMY],
    "evaluate_vqa": ["--qa", DUMMY, "--emb", DUMMY, "--model", DUMMY, "--clip", DUMMY,
                     "--metrics", DUMMY, "--detail", DUMMY, "--predictions", DUMMY],
    "report": ["--metrics", DUMMY, "--predictions", DUMMY, "--qa", DUMMY, "--flickr30k", DUMMY,
               "--vg", DUMMY, "--out", DUMMY],
}  # fmt: skip


def _leaf_fields(cls, path=()):
    """(path of keys, type) of every settings leaf, nested sections included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "seed":
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _leaf_fields(tp, (*path, f.name))
        else:
            yield (*path, f.name), tp


def _wrong_type(tp) -> object:
    """A value no field of type `tp` accepts."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if typing.get_origin(tp) in (typing.Union, types.UnionType) else tp
    origin = typing.get_origin(base)
    if origin in (list, tuple, dict):
        return "abc"
    if base is str:
        return [1, 2]
    return "abc"  # bool, int, float, Literal


def _numeric(tp) -> bool:
    args = (
        typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    )
    return any(a in (int, float) for a in args)


def _cases():
    for stage in STAGE_ARGS:
        for cls in importlib.import_module(f"pipeline.stages.{stage}").SETTINGS:
            yield stage, cls.SECTION, ("not_a_key",), "unknown key", "x"
            for keys, tp in _leaf_fields(cls):
                yield stage, cls.SECTION, keys, "expected", _wrong_type(tp)
                if _numeric(tp):
                    yield stage, cls.SECTION, keys, "", -1


def _nest(keys: tuple, value) -> dict:
    return {keys[0]: value} if len(keys) == 1 else {keys[0]: _nest(keys[1:], value)}


@pytest.mark.parametrize(
    "stage, section, keys, fragment, value",
    list(_cases()),
    ids=lambda v: ".".join(v) if isinstance(v, tuple) else str(v),
)
def test_bad_param_is_one_line_naming_the_key(
    tmp_path, monkeypatch, stage, section, keys, fragment, value
):
    monkeypatch.chdir(tmp_path)  # relative dummy paths: nothing may be written anyway
    params = write_params(tmp_path / "params.yaml", **{section: _nest(keys, value)})
    args = [stage.replace("_", "-"), *STAGE_ARGS[stage], "--params", str(params)]
    res = CliRunner().invoke(app, args)
    one_error(res, f"params {section}.{'.'.join(keys)}: {fragment}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_every_stage_is_covered():
    stages = yaml.safe_load((Path(__file__).parents[1] / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGE_ARGS)


def test_exponent_string_is_a_float(tmp_path):
    from pipeline.stages.train_vqa import Settings

    params = tmp_path / "params.yaml"
    params.write_text("train_vqa:\n  lr: 1e-3\n")
    assert yaml.safe_load(params.read_text())["train_vqa"]["lr"] == "1e-3"  # PyYAML's reading
    assert load(Settings, params).lr == 0.001


def test_unknown_device():
    with pytest.raises(UserError, match="unknown device"):
        pick_device("cuda:x")
    with pytest.raises(UserError, match="unknown device"):
        pick_device("gpu")


@pytest.mark.parametrize("template", ["a photo of {answer", "{answer!z}", "a {subject}"])
def test_evaluate_vqa_bad_template(tmp_path, template):
    params = write_params(
        tmp_path / "params.yaml", evaluate_vqa={"templates": {"relation": template}}
    )
    args = [a if a != DUMMY else str(tmp_path / "x") for a in STAGE_ARGS["evaluate_vqa"]]
    res = CliRunner().invoke(app, ["evaluate-vqa", *args, "--params", str(params)])
    one_error(res, "evaluate_vqa.templates.relation")
