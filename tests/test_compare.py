"""pipeline.compare / `clipda compare`: headline differences judged against noise."""

from __future__ import annotations

import json
import subprocess

import pytest
from typer.testing import CliRunner

from pipeline import compare
from pipeline.cli import app
from pipeline.compare import main
from pipeline.metrics.layout import write_rows


def iv(value, half):
    return {"value": value, "lo": round(value - half, 6), "hi": round(value + half, 6)}


def write_metrics(folder, ada=1.0, noada=1.2, head=0.8, r1=0.5, half=0.1, one_file=True):
    """Tiny metrics files in the shapes evaluate_caption, evaluate_vqa, clip_bootstrap write
    (caption and vqa: one file, the older layout, or with `one_file` False a folder of row
    files, as now); every interval is value +- `half`."""
    folder.mkdir(parents=True, exist_ok=True)
    diff = round(ada - noada, 6)
    caption = {"ada": {"cider": ada, "wellformed": 0.9}, "noada": {"cider": noada},
               "ada-noada": {"cider": diff}}  # fmt: skip
    detail = {"intervals": {"ada": {"cider": iv(ada, half)}, "noada": {"cider": iv(noada, half)},
                            "ada-noada": {"cider": iv(diff, half)}}, "settings": {}}  # fmt: skip
    vqa = {"overall": {"head": head}, "overall_diff": {"head-prior": round(head - 0.1, 6)}}
    vqa_detail = {"intervals": {"overall": {"head": iv(head, half),
                                            "head-prior": iv(round(head - 0.1, 6), half)}}}  # fmt: skip
    clip = {"after": {"i2t_r1": r1}, "chance_r1": 0.01}
    for name, data in [("caption", caption), ("caption_detail", detail), ("vqa", vqa),
                       ("vqa_detail", vqa_detail), ("clip", clip), ("clip_detail", {})]:  # fmt: skip
        if one_file or name not in ("caption", "vqa"):
            (folder / f"{name}.json").write_text(json.dumps(data))
        else:
            write_rows(folder / name, data)
    return folder


def rows(text):
    """{metric: (verdict, source)} from the table (keys with their file's stem)."""
    out, stem = {}, None
    for line in text.splitlines():
        if line in ("caption", "clip", "vqa"):
            stem = line
        elif line.startswith("  "):
            cells = line.split(maxsplit=6)
            out[f"{stem}.{cells[0]}"] = (cells[5], cells[6])
    return out


def test_bootstrap_verdicts_both_ways(tmp_path):
    a = write_metrics(tmp_path / "a", half=0.1)
    b = write_metrics(tmp_path / "b", ada=1.05, noada=1.5, head=0.8, r1=0.6, half=0.4)
    text = main([str(a), str(b)], None, tmp_path)
    got = rows(text)
    assert got["caption.ada.cider"] == ("within", "bootstrap, test sampling only")  # 0.05
    assert got["caption.noada.cider"] == ("BEYOND", "bootstrap, test sampling only")  # 0.3
    assert got["caption.ada-noada.cider"][0] == "BEYOND"  # -0.25
    assert got["caption.ada.wellformed"] == ("same", "no noise estimate")
    assert got["vqa.overall.head"][0] == "same"
    assert got["vqa.overall_diff.head-prior"] == ("same", "bootstrap, test sampling only")
    assert got["clip.after.i2t_r1"] == ("?", "no noise estimate")
    assert list(got) == ["caption.ada.cider", "caption.ada.wellformed", "caption.ada-noada.cider",
                         "caption.noada.cider", "clip.after.i2t_r1", "clip.chance_r1",
                         "vqa.overall.head", "vqa.overall_diff.head-prior"]  # fmt: skip
    assert "\ncaption\n" in text and "diff = b - a" in text
    assert "  noada.cider                 1.2000  1.5000  +0.3000  0.1000  BEYOND" in text
    assert text.endswith("2 of 8 headline numbers differ beyond noise; "
                         "1 more differ with no noise estimate")  # fmt: skip
    assert max(len(line) for line in text.splitlines()) <= 100
    # the other way round the noise is b's (intervals +- 0.4): the 0.3 is within it
    back = rows(main([str(b), str(a)], None, tmp_path))
    assert back["caption.noada.cider"][0] == "within"
    assert back["caption.ada-noada.cider"][0] == "within"


def seeds_file(path, groups, by=()):
    path.write_text(json.dumps({"by": list(by), "groups": groups}))
    return path


def group(params, std, n=3):
    stats = {"mean": 1.0, "std": std, "min": 0.9, "max": 1.1, "n": n}
    return {"params": params, "seeds": list(range(n)), "experiments": [],
            "metrics": {"caption.noada.cider": stats, "clip.after.i2t_r1": stats}}  # fmt: skip


def test_seed_spread_rule_with_a_seeds_file(tmp_path):
    a = write_metrics(tmp_path / "a", half=0.1)
    b = write_metrics(tmp_path / "b", noada=1.5, r1=0.6, half=0.1)
    one = seeds_file(tmp_path / "seeds.json", [group({}, 0.2)])
    got = rows(text := main([str(a), str(b)], one, tmp_path))
    # 0.3 <= 2 x 0.2: within the seed spread, though beyond the bootstrap half-width 0.1
    assert got["caption.noada.cider"] == ("within", "seed spread (3 seeds)")
    assert got["clip.after.i2t_r1"] == ("within", "seed spread (3 seeds)")  # 0.1 <= 0.4
    assert got["caption.ada-noada.cider"] == ("BEYOND", "bootstrap, test sampling only")
    assert f"seeds: {one}" in text
    narrow = seeds_file(tmp_path / "narrow.json", [group({}, 0.1)])
    assert rows(main([str(a), str(b)], narrow, tmp_path))["caption.noada.cider"][0] == "BEYOND"
    single = seeds_file(tmp_path / "single.json", [group({}, 0.0, n=1)])  # no spread: bootstrap
    got = rows(main([str(a), str(b)], single, tmp_path))
    assert got["caption.noada.cider"] == ("BEYOND", "bootstrap, test sampling only")


def test_seeds_file_groups_match_the_baseline_params(tmp_path):
    a = write_metrics(tmp_path / "a" / "metrics", half=0.1)
    b = write_metrics(tmp_path / "b", noada=1.5, half=0.1)
    by = ["train_caption.labelled_fraction"]
    sweep = seeds_file(tmp_path / "sweep.json", [
        group({"train_caption.labelled_fraction": 0.1}, 0.01),
        group({"train_caption.labelled_fraction": 1.0}, 0.2)], by)  # fmt: skip
    (tmp_path / "a" / "params.yaml").write_text(
        "seed: 0\ntrain_caption:\n  labelled_fraction: 1.0\n"
    )
    # a is the folder above metrics/ here: the params.yaml beside metrics/ is a's
    got = rows(main([str(tmp_path / "a"), str(b)], sweep, tmp_path))
    assert got["caption.noada.cider"][0] == "within"  # the 1.0 group's sd 0.2, not 0.01
    (tmp_path / "a" / "params.yaml").write_text("train_caption:\n  labelled_fraction: 0.5\n")
    res = CliRunner().invoke(app, ["compare", str(a), str(b), "--seeds", str(sweep)])
    assert res.exit_code == 2, res.output
    assert "several groups (by train_caption.labelled_fraction) and none is a's" in res.output


def git(repo, *args):
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo,
                   check=True, capture_output=True)  # fmt: skip


@pytest.fixture
def repo(tmp_path):
    """A git repository with two commits of metrics/ (cider 1.0 in one-file caption.json
    and vqa.json, then 1.05 in the row folders caption/ and vqa/) and the workspace at
    cider 1.5."""
    root = tmp_path / "repo"
    write_metrics(root / "metrics")
    (root / "params.yaml").write_text("seed: 0\n")
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "first")
    for name in ("caption", "vqa"):
        (root / "metrics" / f"{name}.json").unlink()
    write_metrics(root / "metrics", ada=1.05, one_file=False)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "second")
    write_metrics(root / "metrics", ada=1.5, one_file=False)
    return root


def test_git_revisions_and_the_workspace(repo):
    got = rows(text := main([], None, repo))  # HEAD vs the workspace
    assert text.startswith("a: HEAD (") and "b: workspace (metrics/)" in text
    assert got["caption.ada.cider"] == ("BEYOND", "bootstrap, test sampling only")  # 0.45
    assert rows(main(["HEAD~1", "HEAD"], None, repo))["caption.ada.cider"][0] == "within"
    assert rows(main(["HEAD~1"], None, repo))["caption.ada.cider"][0] == "BEYOND"
    # a folder against a revision: a's detail file gives the noise
    wide = write_metrics(repo.parent / "wide", ada=1.0, half=0.6)
    assert rows(main([str(wide)], None, repo))["caption.ada.cider"][0] == "within"
    # a DVC experiment is a ref under refs/exps/<baseline>/<name>
    sha = subprocess.run(["git", "rev-parse", "HEAD~1"], cwd=repo, capture_output=True,
                         text=True, check=True).stdout.strip()  # fmt: skip
    git(repo, "update-ref", "refs/exps/ab/cdef0123/lucky-seed", sha)
    assert main(["lucky-seed", "HEAD"], None, repo).startswith(f"a: lucky-seed ({sha[:7]})")


def test_seed_spread_from_the_dvc_experiments_of_the_baseline(repo, monkeypatch):
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True,
                         text=True, check=True).stdout.strip()  # fmt: skip
    git(repo, "update-ref", f"refs/exps/{sha[:2]}/{sha[2:]}/exp-one", sha)

    def entry(name, seed, cider, lr=0.001):
        data = {"params": {"params.yaml": {"data": {"seed": seed, "lr": lr}}},
                "metrics": {"metrics/caption.json": {"data": {"ada": {"cider": cider}}}}}  # fmt: skip
        return {"name": name, "executor": {"state": "success"},
                "revs": [{"rev": name, "error": None, "data": data}]}  # fmt: skip

    def exp_show(where, rev):
        assert rev == sha
        base = entry("base", 0, 1.05)["revs"][0]["data"]
        return [{"rev": "workspace", "experiments": None, "data": {}},
                {"rev": sha, "data": base, "experiments": [
                    entry("exp-one", 1, 1.55), entry("exp-two", 2, 1.3),
                    entry("other-lr", 3, 9.0, lr=0.1)]}]  # fmt: skip

    monkeypatch.setattr(compare, "exp_show", exp_show)
    text = main([], None, repo)
    # seeds 1.05, 1.55, 1.3: sd 0.25, so the workspace's +0.45 is within 2.8 sd
    assert rows(text)["caption.ada.cider"] == ("within", "seed spread (3 seeds)")
    assert rows(text)["caption.noada.cider"][1] == "bootstrap, test sampling only"
    assert "seeds: 3 DVC experiments of a (exp-one, exp-two, " in text  # other-lr left out


def test_user_mistakes_are_one_line_errors(repo, tmp_path, monkeypatch):
    monkeypatch.chdir(repo)
    runner = CliRunner()
    ok = runner.invoke(app, ["compare", "HEAD~1"])
    assert ok.exit_code == 0 and "headline numbers differ beyond noise" in ok.output
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, message in [
        (["nosuch-rev"], "nosuch-rev: not a folder, a git revision or a DVC experiment name"),
        ([str(empty)], f"{empty}: no metrics files (caption/, clip.json, vqa/)"),
        (["HEAD", "HEAD", "HEAD"], "at most two REV_OR_DIR"),
    ]:
        res = runner.invoke(app, ["compare", *args])
        assert res.exit_code == 2, res.output
        assert res.output.startswith(f"error: {message}") and res.output.count("\n") == 1
    monkeypatch.chdir(tmp_path)  # not a git repository
    res = runner.invoke(app, ["compare"])
    assert res.exit_code == 2 and "HEAD: not a folder, and" in res.output
    assert "is not a git repository" in res.output


def test_the_row_layout_reads_as_the_one_file_layout(tmp_path):
    """metrics/caption/ada.json gives caption.ada.cider, as metrics/caption.json did."""
    old = write_metrics(tmp_path / "old")
    new = write_metrics(tmp_path / "new", one_file=False)
    assert (new / "caption" / "ada-noada.json").is_file() and not (new / "caption.json").exists()
    got = rows(main([str(old), str(new)], None, tmp_path))
    assert len(got) == 8 and {v[0] for v in got.values()} == {"same"}
    assert compare.read_folder(new, "n").headline() == compare.read_folder(old, "o").headline()
