"""pipeline.caption.paired / `clipda caption-diff`: captions of two runs, paired."""

from __future__ import annotations

import json
import subprocess

import pytest
from typer.testing import CliRunner

from pipeline.caption.evaluation import score
from pipeline.caption.paired import paired
from pipeline.cli import app

COLOURS = ["red", "blue", "green", "pink", "black", "cyan"]
SHAPES = ["circle", "square", "star", "heart", "ring", "kite"]


def world(n=36):
    """n images, each with two references naming its own colour and shape."""
    ids = [str(100 + k) for k in range(n)]
    refs = []
    for k in range(n):
        c, s = COLOURS[k % 6], SHAPES[(k // 6) % 6]
        refs.append([f"there is a {c} {s} on the left .", f"a {c} {s} sits on the left ."])
    return ids, refs


def write(path, ids, preds, refs):
    lines = [json.dumps({"image_id": i, "prediction": p, "references": r})
             for i, p, r in zip(ids, preds, refs)]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def invoke(*args, resamples=100):
    """`clipda caption-diff ARGS`, with a params file of few resamples beside the first file."""
    params = f"{args[0]}.params.yaml".split(":")[-1]
    with open(params, "w") as f:
        f.write(f"seed: 0\nbootstrap:\n  resamples: {resamples}\n")
    return CliRunner().invoke(app, ["caption-diff", *map(str, args), "--params", params])


def test_identical_runs_differ_by_nothing(tmp_path):
    ids, refs = world()
    preds = [f"there is a red {SHAPES[k % 6]} ." for k in range(len(ids))]
    a = write(tmp_path / "a.jsonl", ids, preds, refs)
    b = write(tmp_path / "b.jsonl", ids, preds, refs)
    res = paired(a, b, resamples=200, level=0.95, seed=0)
    assert res["n"] == len(ids)
    assert res["scores"]["b-a"]["cider"] == {"value": 0.0, "lo": 0.0, "hi": 0.0}
    assert res["scores"]["a"]["cider"]["value"] == pytest.approx(score(preds, refs)["cider"])
    assert res["grounding"].startswith("no scene truth")


def test_better_run_has_an_interval_above_zero(tmp_path):
    ids, refs = world()
    worse = ["there is a red circle on the left ."] * len(ids)
    better = [r[0] for r in refs]
    a = write(tmp_path / "a.jsonl", ids, worse, refs)
    b = write(tmp_path / "b.jsonl", ids, better, refs)
    res = paired(a, b, resamples=200, level=0.95, seed=0)["scores"]
    diff = res["b-a"]["cider"]
    assert diff["value"] == pytest.approx(
        score(better, refs)["cider"] - score(worse, refs)["cider"], abs=1e-5
    )
    assert 0 < diff["lo"] < diff["value"] < diff["hi"]


def test_cli_prints_and_writes_json(tmp_path):
    ids, refs = world(12)
    a = write(tmp_path / "a.jsonl", ids, [r[1] for r in refs], refs)
    b = write(tmp_path / "b.jsonl", ids, [r[0] for r in refs], refs)
    res = invoke(a, b, "--out", tmp_path / "d.json")
    assert res.exit_code == 0, res.output
    assert "cider" in res.output and "b - a" in res.output
    saved = json.loads((tmp_path / "d.json").read_text())
    assert set(saved["scores"]) == {"a", "b", "b-a"}


def one_error(res, fragment):
    out = res.output.strip()
    assert res.exit_code == 2 and len(out.splitlines()) == 1, res.output
    assert out.startswith("error: ") and fragment in out, out


def test_runs_on_other_images_or_references_are_one_line_errors(tmp_path):
    ids, refs = world(6)
    preds = [r[0] for r in refs]
    a = write(tmp_path / "a.jsonl", ids, preds, refs)
    other = write(tmp_path / "b.jsonl", [i + "x" for i in ids], preds, refs)
    one_error(invoke(a, other), "different images")
    refs2 = [[r[0]] for r in refs]
    other = write(tmp_path / "c.jsonl", ids, preds, refs2)
    one_error(invoke(a, other), "different references")
    (tmp_path / "bad.jsonl").write_text('{"image_id": 1}\n')
    one_error(invoke(a, tmp_path / "bad.jsonl"), "line 1")


def test_rev_path_reads_a_file_at_a_git_revision(tmp_path, monkeypatch):
    ids, refs = world(24)
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args):
        subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=repo,
                       check=True, capture_output=True)  # fmt: skip

    git("init", "-q")
    git("commit", "-q", "--allow-empty", "-m", "0")
    write(repo / "p.jsonl", ids, ["there is a red circle ."] * len(ids), refs)
    git("add", "p.jsonl")
    git("commit", "-q", "-m", "1")
    write(repo / "p.jsonl", ids, [r[0] for r in refs], refs)
    git("commit", "-q", "-am", "2")
    (repo / "p.jsonl").write_text("changed since\n")  # the revisions are read, not this
    monkeypatch.chdir(repo)
    res = invoke("HEAD~1:p.jsonl", "HEAD:p.jsonl", "--out", tmp_path / "d.json")
    assert res.exit_code == 0, res.output
    diff = json.loads((tmp_path / "d.json").read_text())["scores"]["b-a"]["cider"]
    assert diff["lo"] > 0
    one_error(invoke("HEAD~2:p.jsonl", "HEAD:p.jsonl"), "cannot read p.jsonl at HEAD~2")
    one_error(invoke("nope:p.jsonl", "HEAD:p.jsonl"), "no such file, and 'nope' is not")


def test_user_mistakes_are_one_line_errors(tmp_path):
    ids, refs = world(6)
    a = write(tmp_path / "a.jsonl", ids, [r[0] for r in refs], refs)
    one_error(invoke(a, tmp_path), "no such file")
    one_error(invoke(a, tmp_path / "missing.jsonl"), "no such file")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    one_error(invoke(a, tmp_path / "bin.jsonl"), "not a text file")
    one_error(invoke(a, a, "--label", "seed"), "expected KEY=VALUE")
    one_error(invoke(a, a, "--label", "arm=[x"), "one number, word or boolean")
    one_error(invoke(a, a, "--label", "arm=[1, 2]"), "one number, word or boolean")
    one_error(invoke(a, a, resamples=0), "resamples is 0")


def test_labelled_results_summarise_over_seeds(tmp_path):
    ids, refs = world(24)
    worse = write(tmp_path / "w.jsonl", ids, ["there is a red circle ."] * len(ids), refs)
    better = write(tmp_path / "b.jsonl", ids, [r[0] for r in refs], refs)
    folder = tmp_path / "diffs"
    folder.mkdir()
    for seed in (0, 1):
        for arm, b in (("same", worse), ("better", better)):
            res = invoke(worse, b, "--label", f"seed={seed}", "--label", f"arm={arm}",
                         "--out", folder / f"{arm}{seed}.json")  # fmt: skip
            assert res.exit_code == 0, res.output
    out = tmp_path / "summary.json"
    res = CliRunner().invoke(app, ["seeds", "--diffs", str(folder), "--by", "arm",
                                   "--metric", "diff.b-a.cider", "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    groups = {g["params"]["arm"]: g for g in json.loads(out.read_text())["groups"]}
    assert groups["better"]["seeds"] == [0, 1]
    assert groups["better"]["intervals"]["diff.b-a.cider"] == {"above": 2, "below": 0, "n": 2}
    assert groups["same"]["intervals"]["diff.b-a.cider"] == {"above": 0, "below": 0, "n": 2}
    assert groups["same"]["metrics"]["diff.b-a.cider"]["mean"] == 0.0
    unlabelled = json.loads((folder / "same0.json").read_text()) | {"labels": {"arm": "x"}}
    (folder / "x.json").write_text(json.dumps(unlabelled))
    res = CliRunner().invoke(app, ["seeds", "--diffs", str(folder), "--out", str(out)])
    one_error(res, "x.json: no seed label")
    (folder / "x.json").write_text(json.dumps({"scores": {}, "labels": {"seed": 0}}))
    res = CliRunner().invoke(app, ["seeds", "--diffs", str(folder), "--out", str(out)])
    one_error(res, "x.json: not a caption-diff result")
