"""pipeline.experiments / `clipda seeds`: DVC experiments summarised over seeds."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.errors import UserError
from pipeline.experiments import finished, summarise


def exp(name, seed, fraction, cider, state="success", lr=0.001):
    params = {"seed": seed, "train_caption": {"labelled_fraction": fraction, "lr": lr}}
    metrics = {"metrics/caption.json": {"data": {"ada": {"cider": cider}, "ada-noada": {
        "cider": round(cider - 0.5, 6)}}}, "metrics/vqa.json": {"data": {"overall": {"head": 0.8}}}}  # fmt: skip
    return {"name": name, "executor": {"state": state}, "revs": [{
        "rev": name, "error": None,
        "data": {"params": {"params.yaml": {"data": params}}, "metrics": metrics}}]}  # fmt: skip


def shown(*exps):
    """The shape of `dvc exp show --json`: the workspace, then the commit with its exps."""
    return [{"rev": "workspace", "experiments": None, "data": {}},
            {"rev": "abc", "name": "main", "experiments": list(exps), "data": {}}]  # fmt: skip


def test_groups_by_param_with_stats_over_seeds():
    rows = finished(shown(
        exp("a", 0, 1.0, 0.6), exp("b", 1, 1.0, 0.8), exp("c", 2, 1.0, 0.7),
        exp("d", 0, 0.1, 0.3), exp("e", 1, 0.1, 0.5),
        exp("q", 2, 0.1, 9.9, state="queued"), exp("f", 2, 0.1, 9.9, state="failed"),
    ))  # fmt: skip
    assert [r["name"] for r in rows] == ["a", "b", "c", "d", "e"]
    assert rows[0]["metrics"] == {"caption.ada.cider": 0.6, "caption.ada-noada.cider": 0.1,
                                  "vqa.overall.head": 0.8}  # fmt: skip
    groups = summarise(rows, ["train_caption.labelled_fraction"], ["caption.ada.*"])
    assert [g["params"] for g in groups] == [{"train_caption.labelled_fraction": 0.1},
                                             {"train_caption.labelled_fraction": 1.0}]  # fmt: skip
    full = groups[1]
    assert full["seeds"] == [0, 1, 2] and list(full["metrics"]) == ["caption.ada.cider"]
    s = full["metrics"]["caption.ada.cider"]
    assert (s["mean"], s["min"], s["max"], s["n"]) == (0.7, 0.6, 0.8, 3)
    assert s["std"] == pytest.approx(0.1)  # sample standard deviation
    assert groups[0]["metrics"]["caption.ada.cider"]["n"] == 2


def test_mixed_settings_in_a_group_are_an_error():
    rows = finished(shown(exp("a", 0, 1.0, 0.6), exp("b", 1, 1.0, 0.8, lr=0.01)))
    with pytest.raises(UserError, match="differ in train_caption.lr .* add --by train_caption.lr"):
        summarise(rows, [])
    with pytest.raises(UserError, match="no finished experiments"):
        summarise([], [])
    with pytest.raises(UserError, match="--by nope: no experiment has this param"):
        summarise(rows, ["nope"])


def test_cli_writes_json_table_and_plot(tmp_path):
    saved = tmp_path / "exps.json"
    saved.write_text(json.dumps(shown(exp("a", 0, 1.0, 0.6), exp("b", 1, 1.0, 0.8),
                                      exp("c", 0, 0.0, 0.2), exp("d", 1, 0.0, 0.4))))  # fmt: skip
    out, plot = tmp_path / "seeds.json", tmp_path / "sweep.svg"
    res = CliRunner().invoke(app, [
        "seeds", "--out", str(out), "--exp-json", str(saved), "--plot", str(plot),
        "--by", "train_caption.labelled_fraction", "--metric", "caption.ada.cider",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "| caption.ada.cider | 0.300 ± 0.141 (2) | 0.700 ± 0.141 (2) |" in res.output
    summary = json.loads(out.read_text())
    assert summary["by"] == ["train_caption.labelled_fraction"] and len(summary["groups"]) == 2
    svg = plot.read_text()
    assert svg.startswith("<svg") and "caption.ada.cider" in svg and "<polygon" in svg
    res = CliRunner().invoke(app, ["seeds", "--out", str(out), "--exp-json", str(saved),
                                   "--plot", str(plot)])  # fmt: skip
    assert res.exit_code == 2 and "--plot needs a --by" in res.output


def test_plot_draws_a_line_per_value_of_the_other_params(tmp_path):
    saved = tmp_path / "exps.json"
    saved.write_text(json.dumps(shown(
        exp("a", 0, 1.0, 0.6), exp("b", 0, 0.0, 0.2),
        exp("c", 0, 1.0, 0.9, lr=0.01), exp("d", 0, 0.0, 0.5, lr=0.01),
    )))  # fmt: skip
    plot = tmp_path / "sweep.svg"
    res = CliRunner().invoke(app, [
        "seeds", "--out", str(tmp_path / "s.json"), "--exp-json", str(saved), "--plot", str(plot),
        "--by", "train_caption.labelled_fraction", "--by", "train_caption.lr",
        "--metric", "caption.ada.cider",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    svg = plot.read_text()
    assert "caption.ada.cider (lr=0.001)" in svg and "caption.ada.cider (lr=0.01)" in svg
    res = CliRunner().invoke(app, [
        "seeds", "--out", str(tmp_path / "s.json"), "--exp-json", str(saved), "--plot", str(plot),
        "--by", "train_caption.labelled_fraction", "--metric", "caption.*",
        "--where", "train_caption.lr=0.01", "--plot-metric", "caption.ada-noada.*",
    ])  # fmt: skip
    assert res.exit_code == 0, res.output
    svg = plot.read_text()
    assert "caption.ada-noada.cider" in svg and "caption.ada.cider" not in svg
    assert json.loads((tmp_path / "s.json").read_text())["groups"][0]["metrics"].keys() == {
        "caption.ada.cider",
        "caption.ada-noada.cider",
    }


def test_choose_the_trade_off_per_fraction_on_pooled_validation(tmp_path):
    """adv_weight per labelled fraction: the lowest mean selection loss over seeds, and
    whether λ = 0 (the noada arm of the same experiments) scored better there."""

    def run(name, seed, fraction, weight, ada, noada):
        e = exp(name, seed, fraction, 1.0)
        data = e["revs"][0]["data"]
        data["params"]["params.yaml"]["data"]["train_caption"]["adv_weight"] = weight
        data["metrics"]["metrics/caption.json"]["data"] = {
            "ada": {"select_loss": ada}, "noada": {"select_loss": noada}}  # fmt: skip
        return e

    exps = [run("a0", 0, 0.1, 0.3, 2.0, 2.2), run("a1", 1, 0.1, 0.3, 2.2, 2.2),
            run("b0", 0, 0.1, 1.0, 1.9, 2.2), run("b1", 1, 0.1, 1.0, 2.1, 2.2),  # best at 0.1
            run("c0", 0, 1.0, 0.3, 1.5, 1.4), run("c1", 1, 1.0, 0.3, 1.7, 1.4),  # best at 1.0
            run("d0", 0, 1.0, 1.0, 1.8, 1.4), run("d1", 1, 1.0, 1.0, 1.8, 1.4)]  # fmt: skip
    path = tmp_path / "exps.json"
    path.write_text(json.dumps(shown(*exps)))
    by = ["--by", "train_caption.labelled_fraction", "--by", "train_caption.adv_weight"]
    res = CliRunner().invoke(app, ["seeds", "--exp-json", str(path), "--out", str(tmp_path / "o.json"),
                                   *by, "--metric", "caption.*", "--choose",
                                   "caption.ada.select_loss", "--against",
                                   "caption.noada.select_loss"])  # fmt: skip
    assert res.exit_code == 0, res.output
    chosen = json.loads((tmp_path / "o.json").read_text())["chosen"]
    assert [(c["train_caption.labelled_fraction"], c["train_caption.adv_weight"]) for c in chosen] == [
        (0.1, 1.0), (1.0, 0.3)]  # fmt: skip
    assert chosen[0]["mean"] == pytest.approx(2.0) and not chosen[0]["against_better"]
    assert chosen[1]["mean"] == pytest.approx(1.6) and chosen[1]["against_better"]  # λ=0: 1.4
    assert "chosen: train_caption.labelled_fraction=1.0: train_caption.adv_weight=0.3" in res.output
    assert "caption.noada.select_loss 1.4000: better" in res.output
    one = CliRunner().invoke(app, ["seeds", "--exp-json", str(path), "--out", str(tmp_path / "x"),
                                   "--by", "train_caption.adv_weight", "--choose", "caption.ada.select_loss"])  # fmt: skip
    assert one.exit_code == 2 and "--choose needs two --by params" in one.output


def test_row_files_are_named_as_the_one_file_layout_was():
    """metrics/caption/ada.json (one file per row, `pipeline.metrics.layout`) names its
    metrics caption.ada.*, as metrics/caption.json's "ada" did."""
    from pipeline.metrics.layout import prefix

    assert prefix("metrics/caption/ada-noada.json") == "caption.ada-noada"
    assert prefix("metrics/clip.json") == "clip" and prefix("other/m.json") == "m"
    e = exp("a", 0, 1.0, 0.6)
    data = e["revs"][0]["data"]
    data["metrics"] = {"metrics/caption/ada.json": {"data": {"cider": 0.6}},
                       "metrics/caption/ada-noada.json": {"data": {"cider": 0.1}},
                       "metrics/vqa/overall.json": {"data": {"head": 0.8}}}  # fmt: skip
    assert finished(shown(e))[0]["metrics"] == finished(shown(exp("a", 0, 1.0, 0.6)))[0]["metrics"]


def test_per_seed_intervals_are_counted_above_and_below_zero(tmp_path):
    import subprocess

    from pipeline.experiments import detail_intervals, markdown

    repo = tmp_path / "repo"
    (repo / "metrics").mkdir(parents=True)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    revs = []
    for lo, hi in ((0.05, 0.2), (-0.1, 0.1), (-0.3, -0.01)):  # above, neither, below
        detail = {"intervals": {"ada": {"cider": {"value": 1.0, "lo": 0.9, "hi": 1.1}},
                                "ada-noada": {"cider": {"value": 0.0, "lo": lo, "hi": hi}}}}  # fmt: skip
        (repo / "metrics" / "caption_detail.json").write_text(json.dumps(detail))
        subprocess.run([*git, "add", "-A"], check=True)
        subprocess.run([*git, "commit", "-qm", "x"], check=True)
        revs.append(subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                   check=True).stdout.strip())  # fmt: skip
    assert detail_intervals(repo, revs[0]) == {"caption.ada-noada.cider": (0.05, 0.2)}
    rows = finished(shown(exp("a", 0, 1.0, 0.6), exp("b", 1, 1.0, 0.8), exp("c", 2, 1.0, 0.7)))
    for r, rev in zip(rows, revs, strict=True):
        r["intervals"] = detail_intervals(repo, rev)
    (group,) = summarise(rows, [], ["caption.ada-noada.*"])
    assert group["intervals"] == {"caption.ada-noada.cider": {"above": 1, "below": 1, "n": 3}}
    assert "0.200 ± 0.100 (3) [1↑ 1↓]" in markdown([group])
    with pytest.raises(UserError, match="no metrics/caption_detail.json in experiment commit"):
        detail_intervals(repo, "0" * 40)


def test_where_keeps_the_experiments_of_one_setting():
    from pipeline.experiments import select

    rows = finished(shown(exp("a", 0, 1.0, 0.6), exp("b", 0, 0.01, 0.8), exp("c", 1, 0.01, 0.7)))
    assert [r["name"] for r in select(rows, ["train_caption.labelled_fraction=0.01"])] == ["b", "c"]
    assert [r["name"] for r in select(rows, ["seed=1", "train_caption.lr=0.001"])] == ["c"]
    with pytest.raises(UserError, match="--where nope: no experiment has this param"):
        select(rows, ["nope=1"])
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        select(rows, ["seed"])
