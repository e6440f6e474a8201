"""DDP training: pipeline.distributed helpers; train_vqa, train_caption on 2 CPU ranks (gloo).

The 2-process runs use the tiny planted-signal world of tests/test_vqa.py. With dropout 0
and every global batch full, DDP with per-rank batch b is the same optimisation as one
process with batch 2b (rank r's k-th batch is the r-th stride of the k-th 2b-block of the
shared permutation, and DDP averages the two ranks' mean-loss gradients), so the
2-process model must match the 1-process one up to float summation order.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.numpy import load_file
from test_caption_model import VOCAB, WIDTH, write_clip_folder, write_emb_dirs
from test_vqa import make_world

from pipeline import distributed
from pipeline.errors import UserError
from pipeline.stages import train_caption, train_vqa

ROOT = Path(__file__).resolve().parents[1]
# 120 train rows (60 train images x 2 questions): 4 full global batches of 2 x 15
CAPTION = {
    "seed": 3,
    "model": {"width": 16, "layers": 1, "heads": 2, "prefix_len": 2, "max_len": 10},
    "batch_size": 4,  # per rank
    "domain_batch": 2,
    "pretrain_epochs": 2,
    "adapt_epochs": 1,
    "finetune_epochs": 2,
    "warmup_steps": 2,
    "disc_hidden": 8,
    "laion_val_images": 2,
    "device": "cpu",
}
PARAMS = {"lr": 1e-2, "epochs": 3, "hidden": [32], "dropout": 0.0, "seed": 0, "device": "cpu"}


def vqa_params(path: Path, **changes) -> Path:
    """A params file (JSON is YAML) with PARAMS + `changes` as its train_vqa section."""
    section = {k: v for k, v in {**PARAMS, **changes}.items() if k != "seed"}
    path.write_text(json.dumps({"seed": PARAMS["seed"], "train_vqa": section}))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_shard_is_a_deterministic_disjoint_cover():
    order = np.random.default_rng(0).permutation(11)
    assert distributed.shard(order, 0, 1) is order  # world of 1: untouched
    parts = [distributed.shard(order, r, 3) for r in range(3)]
    assert [len(x) for x in parts] == [4, 4, 4]  # padded to equal lengths
    assert set(np.concatenate(parts)) == set(order)
    assert list(parts[1]) == list(order[1::3])  # strided by rank
    # the one pad is the wrap-around of the order's head, as in DistributedSampler
    assert sorted(np.concatenate(parts)) == sorted([*order, order[0]])
    assert len(distributed.shard(np.arange(4), 1, 2)) == 2  # divisible: no padding


def test_no_torchrun_env_means_single_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "3")
    assert (distributed.world_size(), distributed.rank(), distributed.is_main()) == (1, 0, True)
    assert distributed.all_reduce_sum([1.5, 2.0]) == [1.5, 2.0]
    assert distributed.all_reduce_mean(2.5) == 2.5
    with distributed.session("cpu") as device:
        assert device.type == "cpu" and not torch.distributed.is_initialized()


def _worker(rank: int, world: int, port: int, root: str, stage: str = "vqa") -> None:
    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    r = Path(root)
    # per-rank folders only to check that rank 1 writes nothing
    if stage == "caption":
        params = {"seed": 3, "train_caption": {k: v for k, v in CAPTION.items() if k != "seed"}}
        summary = train_caption.main(
            "ada",
            r / "laion",
            r / "flickr30k",
            r / f"m{rank}",
            r / f"p{rank}.tsv",
            params,
            clip=r / "clip",
        )
        (r / f"rank{rank}.txt").write_text(summary)
        return
    params = vqa_params(r / f"params{rank}.yaml", batch_size=15)
    summary = train_vqa.main(r / "qa", r / "emb", r / f"m{rank}", r / f"p{rank}.tsv", params)
    (r / f"rank{rank}.txt").write_text(summary)


def test_train_vqa_ddp_two_processes_matches_one(tmp_path):
    make_world(tmp_path, n_images=100)
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    s0, s1 = ((tmp_path / f"rank{r}.txt").read_text() for r in (0, 1))
    # gradients all-reduced: both ranks end with the same weights (digest in the summary)
    # and log the same losses
    assert "; rank 0/2, weights " in s0 and "; rank 1/2, weights " in s1
    assert s0.replace("rank 0/2", "rank 1/2") == s1
    # only rank 0 writes
    assert (tmp_path / "m0/model.safetensors").exists() and (tmp_path / "m0/report.json").exists()
    assert not (tmp_path / "m1").exists() and not (tmp_path / "p1.tsv").exists()
    lines = (tmp_path / "p0.tsv").read_text().splitlines()[1:]
    train_loss = [float(r.split("\t")[1]) for r in lines]
    val_loss = [float(r.split("\t")[2]) for r in lines]
    assert train_loss[-1] < train_loss[0] and val_loss[-1] < val_loss[0]
    cfg = json.loads((tmp_path / "m0/config.json").read_text())
    assert cfg["train"]["n_train"] == 120

    # the same optimisation in one process with the global batch
    single = vqa_params(tmp_path / "single.yaml", batch_size=30)
    train_vqa.main(tmp_path / "qa", tmp_path / "emb", tmp_path / "s", tmp_path / "ps.tsv", single)
    a = load_file(str(tmp_path / "m0/model.safetensors"))
    b = load_file(str(tmp_path / "s/model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-5, err_msg=k)
    last = (tmp_path / "ps.tsv").read_text().splitlines()[-1].split("\t")
    assert abs(float(last[1]) - train_loss[-1]) < 1e-4  # final train_loss
    assert abs(float(last[2]) - val_loss[-1]) < 1e-4  # final val_loss


def test_torchrun_cli_two_processes(tmp_path):
    qa, emb, _, _ = make_world(tmp_path, n_images=40)
    params = tmp_path / "params.yaml"
    params.write_text("seed: 1\ntrain_vqa:\n  epochs: 3\n  hidden: [16]\n  lr: 0.01\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "pipeline", "train-vqa", "--qa", str(qa), "--emb", str(emb),
        "--out", str(tmp_path / "m"), "--plots", str(tmp_path / "vqa.tsv"), "--params", str(params),
    ]  # fmt: skip
    res = subprocess.run(
        cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("train_vqa: read") == 2  # both ranks finish
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json",
        "model.safetensors",
        "report.json",
    ]
    lines = (tmp_path / "vqa.tsv").read_text().splitlines()
    assert len(lines) == 4
    assert float(lines[-1].split("\t")[1]) < float(lines[1].split("\t")[1])


def test_train_caption_two_processes_stay_in_sync(tmp_path):
    table = torch.randn(VOCAB, WIDTH, generator=torch.Generator().manual_seed(0))
    write_emb_dirs(tmp_path, table, ("tiny", "abc"))
    write_clip_folder(tmp_path / "clip", table)
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path), "caption"), nprocs=2, join=True)
    s0, s1 = ((tmp_path / f"rank{r}.txt").read_text() for r in (0, 1))
    # decoder and discriminator gradients averaged: identical weights on both ranks (digest
    # in the summary) and the same losses
    assert "; rank 0/2, weights " in s0 and "; rank 1/2, weights " in s1
    assert s0.replace("rank 0/2", "rank 1/2") == s1
    # 24 LAION captions / 2 ranks / 4 = 3 steps, 18 Flickr train captions -> 9 / 4 = 3 steps
    assert s0.startswith(f"train_caption[ada]: {2 * 3 + 1 * 3 + 2 * 3} steps, ")
    assert (tmp_path / "m0/model.safetensors").exists()
    assert not (tmp_path / "m1").exists() and not (tmp_path / "p1.tsv").exists()
    rows = [r.split("\t") for r in (tmp_path / "p0.tsv").read_text().split("\n")[1:-1]]
    assert [r[1] for r in rows] == ["pretrain", "pretrain", "adapt", "finetune", "finetune"]
    assert float(rows[-1][2]) < float(rows[0][2])  # caption loss went down
    assert rows[0][3] == "nan" and rows[2][3] != "nan" and float(rows[-1][7]) > 0


def _fake_gpus(monkeypatch, n: int) -> list:
    """CUDA reported available with `n` GPUs; set_device calls recorded, not made."""
    import torch

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(str(d)))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    return current


def test_each_torchrun_rank_takes_its_own_gpu(monkeypatch):
    import torch

    from pipeline.distributed import device_for

    current = _fake_gpus(monkeypatch, 4)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "6")
    monkeypatch.setenv("LOCAL_RANK", "2")
    for name in ("auto", "cuda"):
        assert device_for(name) == torch.device("cuda", 2)
    assert current == ["cuda:2", "cuda:2"]  # the current device: contexts open there
    with pytest.raises(UserError, match="'cuda:1' under torchrun would put every rank on one GPU"):
        device_for("cuda:1")
    assert device_for("cpu") == torch.device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "5")  # more ranks on the node than GPUs
    with pytest.raises(UserError, match="'cuda:5' asked for but this machine has 4 GPU"):
        device_for("auto")


def test_an_absent_gpu_index_is_a_one_line_error(monkeypatch):
    from pipeline.training import pick_device

    _fake_gpus(monkeypatch, 1)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert str(pick_device("cuda:0")) == "cuda:0"
    with pytest.raises(UserError, match=r"'cuda:3' asked for but this machine has 1 GPU\(s\)"):
        pick_device("cuda:3")


def test_embed_loads_clip_on_the_ranks_device(monkeypatch, tmp_path):
    """Under torchrun, embed's CLIP goes to cuda:LOCAL_RANK, not to GPU 0."""
    from pipeline.stages import embed

    _fake_gpus(monkeypatch, 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    seen = {}

    class Stop(Exception):
        pass

    def fake_load(clip, device):
        seen["device"] = device
        raise Stop

    monkeypatch.setattr(embed, "load_backbone", fake_load)
    (tmp_path / "in").mkdir()
    with pytest.raises(Stop):
        embed.main("laion", tmp_path / "in", tmp_path / "in", "clip", tmp_path / "out", None,
                   {"embed": {"device": "auto"}})  # fmt: skip
    assert seen["device"] == "cuda:1"
