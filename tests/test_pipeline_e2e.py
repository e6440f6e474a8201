"""End-to-end smoke run: the real `dvc.yaml` through `dvc repro`, at a tiny size.

The repository's dvc.yaml, params.yaml and pipeline/ are copied into a temporary folder,
the params are shrunk (only sizes, epochs and widths; every code path stays on), and
`dvc repro` runs every stage in order through the same `python -m pipeline` entry points a
user's run takes. A broken stage boundary fails here rather than in a user's run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.metrics.layout import read_rows

ROOT = Path(__file__).resolve().parents[1]

# Only sizes and lengths: what each stage does is the default run's.
TINY: dict[str, dict] = {
    "synth": {
        "vg_images": 40,
        "laion_samples": 80,
        "laion_shard_size": 40,
        "flickr30k_images": 30,
        "probe_scenes": 20,
    },
    "clip_bootstrap": {
        "epochs": 1,
        "model": {
            "width": 32,
            "layers": 1,
            "heads": 2,
            "image_size": 32,
            "patch_size": 8,
            "projection_dim": 32,
            "vocab_size": 300,
        },
        "warmup_steps": 2,
    },
    "embed": {"shard_size": 30, "num_workers": 1},
    "train_caption": {
        "model": {"width": 32, "layers": 1, "heads": 2},
        "pretrain_epochs": 1,
        "adapt_epochs": 1,
        "finetune_epochs": 1,
        "warmup_steps": 2,
        "laion_val_images": 8,
    },
    "evaluate_caption": {"beam_size": 2, "max_len": 12},
    "train_vqa": {"epochs": 1, "hidden": [32]},
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, val in over.items():
        out[key] = _merge(base.get(key) or {}, val) if isinstance(val, dict) else val
    return out


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    res = subprocess.run(
        cmd, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    assert res.returncode == 0, (
        f"{' '.join(cmd)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    )
    return res


@pytest.fixture(scope="module")
def repro(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("e2e")
    shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
    shutil.copytree(
        ROOT / "pipeline", work / "pipeline", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copy(ROOT / ".dvcignore", work / ".dvcignore")
    # the frozen stand-in CLIP comes with a clone (committed to git), as in a user's run
    shutil.copytree(ROOT / "models" / "clip_standin", work / "models" / "clip_standin")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (work / "params.yaml").write_text(yaml.safe_dump(_merge(params, TINY), sort_keys=False))
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "PYTHONHASHSEED": "0",
    }
    dvc = [sys.executable, "-m", "dvc"]
    _run([*dvc, "init", "--no-scm", "-q"], work, env)
    _run([*dvc, "commit", "-f", "-q", "clip_standin"], work, env)  # its dvc.lock entry
    _run([*dvc, "repro"], work, env)
    status = _run([*dvc, "status"], work, env)
    assert "up to date" in status.stdout, status.stdout
    return work


def test_every_stage_ran(repro):
    lock = yaml.safe_load((repro / "dvc.lock").read_text())["stages"]
    stages = yaml.safe_load((repro / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        if "foreach" in stage or "matrix" in stage:
            assert any(k.startswith(f"{name}@") for k in lock), name
        else:
            assert name in lock, name


def test_sample_world_written(repro):
    info = json.loads((repro / "data/sample/SAMPLE_WORLD.json").read_text())
    assert info["vg"]["images"] == 40 and info["flickr30k"]["captions"] == 150


def test_reports_account_for_every_input(repro):
    qa = json.loads((repro / "data/qa/report.json").read_text())
    assert qa["written"] + qa["skipped_total"] == qa["read"] > 0
    for name in ("vg", "laion", "flickr30k"):
        rep = json.loads((repro / f"data/emb/{name}/report.json").read_text())
        assert rep["written"] > 0, name
        manifest = json.loads((repro / f"data/emb/{name}/manifest.json").read_text())
        assert manifest["runtime"][0]["device"] == "cpu", name


def test_metrics_side_by_side(repro):
    clip = json.loads((repro / "metrics/clip.json").read_text())
    assert {"after", "zs_cat", "scene_rk"} <= set(clip)  # before, chance: the detail file
    caption = read_rows(repro / "metrics/caption")
    assert set(caption) == {"noada", "ada", "nn", "ada-noada", "noada-nn", "ada-nn"}
    assert all(0.0 <= caption[v]["bleu4"] <= 1.0 for v in ("noada", "ada", "nn"))
    assert -1.0 <= caption["ada-noada"]["bleu4"] <= 1.0
    vqa = read_rows(repro / "metrics/vqa")
    assert {"head", "zeroshot", "prior", "majority"} == set(vqa["overall"])
    assert {"head-zeroshot", "head-prior", "head-majority"} == set(vqa["overall_diff"])
    for name, tree in (("clip", clip), ("caption", caption), ("vqa", vqa)):
        assert all(isinstance(v, float) for v in _leaves(tree))  # headline: numbers only
        detail = json.loads((repro / f"metrics/{name}_detail.json").read_text())
        ran = detail["runtime"] if name == "clip" else detail["settings"]["runtime"]
        assert {"torch", "device", "threads"} <= set(ran), name  # what computed them
    for plot in ("clip.tsv", "vqa.tsv", "caption_noada.tsv", "caption_ada.tsv"):
        assert (repro / "metrics/plots" / plot).read_text().startswith("epoch")


def _leaves(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


def test_each_metrics_file_fits_200_columns_in_dvc_metrics_show(repro):
    """`dvc metrics show` of each declared metrics output: a table under 200 characters
    (a caption row per system, a VQA row per question type)."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    for target in ("metrics/clip.json", "metrics/caption", "metrics/vqa"):
        res = _run([sys.executable, "-m", "dvc", "metrics", "show", target], repro, env)
        lines = [line for line in res.stdout.splitlines() if line.strip()]
        assert len(lines) >= 2 and max(map(len, lines)) <= 200, res.stdout


def test_report_page_written(repro):
    html = (repro / "report/index.html").read_text()
    assert html.count("<table") >= 4 and 'src="data:image/jpeg;base64,' in html
