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

ROOT = Path(__file__).resolve().parents[1]

# Only sizes and lengths: what each stage does is the default run's.
TINY: dict[str, dict] = {
    "synth": {"vg_images": 40, "laion_samples": 80, "laion_shard_size": 40, "flickr_images": 30},
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, val in over.items():
        out[key] = _merge(base.get(key) or {}, val) if isinstance(val, dict) else val
    return out


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res


@pytest.fixture(scope="module")
def repro(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("e2e")
    shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
    shutil.copytree(ROOT / "pipeline", work / "pipeline",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / ".dvcignore", work / ".dvcignore")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (work / "params.yaml").write_text(yaml.safe_dump(_merge(params, TINY), sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "PYTHONHASHSEED": "0"}
    dvc = [sys.executable, "-m", "dvc"]
    _run([*dvc, "init", "--no-scm", "-q"], work, env)
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
