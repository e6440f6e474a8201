"""compute: precision by GPU capability, the deterministic mode, their records (CUDA
queries mocked: no GPU here)."""

from __future__ import annotations

import types

import pytest
import torch

from pipeline import compute
from pipeline.compute import Compute, resolve_precision, session
from pipeline.errors import UserError
from pipeline.settings import load

CUDA = torch.device("cuda", 0)


def _gpu(monkeypatch, bf16: bool, name: str = "Tesla T4"):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name)


def test_precision_follows_the_gpus_capability(monkeypatch):
    cpu = torch.device("cpu")
    assert {resolve_precision(p, cpu) for p in compute.PRECISIONS} == {"fp32"}  # CPU: fp32
    _gpu(monkeypatch, bf16=True, name="NVIDIA H100")
    assert [resolve_precision(p, CUDA) for p in ("auto", "bf16", "fp16", "fp32")] == [
        "bf16", "bf16", "fp16", "fp32"]  # fmt: skip
    _gpu(monkeypatch, bf16=False)  # pre-Ampere: auto falls back to fp16 (+ GradScaler)
    assert resolve_precision("auto", CUDA) == "fp16"
    with pytest.raises(UserError, match="compute.precision: bf16 asked for but Tesla T4 has no"):
        resolve_precision("bf16", CUDA)
    with pytest.raises(UserError, match="compute.precision"):
        load(Compute, {"compute": {"precision": "fp8"}})


def test_session_sets_and_restores_the_mode(monkeypatch):
    cpu = torch.device("cpu")
    was = torch.are_deterministic_algorithms_enabled()
    with session(Compute(), cpu) as got:  # auto: deterministic on the CPU
        assert got == {"precision": "fp32", "deterministic": True}
        assert torch.are_deterministic_algorithms_enabled() and compute.deterministic()
    assert torch.are_deterministic_algorithms_enabled() == was and not compute.deterministic()
    with session(Compute(deterministic="off"), cpu) as got:
        assert not got["deterministic"]
    _gpu(monkeypatch, bf16=False)
    with session(Compute(precision="auto"), CUDA) as got:  # auto: off on CUDA
        assert got == {"precision": "fp16", "deterministic": False}
        assert compute.precision(CUDA) == "fp16"  # what autocast and the scaler read
        assert compute.autocast(CUDA).fast_dtype == torch.float16
    with session(Compute(precision="fp32"), CUDA):
        assert compute.precision(CUDA) == "fp32"
    assert not compute.scaler(torch.device("cpu")).is_enabled()  # CPU: a pass-through


def test_shard_fingerprint_has_device_kind_and_precision(monkeypatch):
    from pipeline.embedding.shards import settings_fingerprint
    from pipeline.stages.embed import Settings

    config = types.SimpleNamespace(text_config=types.SimpleNamespace(vocab_size=10))
    bb = types.SimpleNamespace(revision="r", context_length=8, image_size=32, resize_size=None,
                               mean=(0.5,), std=(0.5,), device=torch.device("cpu"),
                               model=types.SimpleNamespace(config=config))  # fmt: skip
    on_cpu = settings_fingerprint("laion", bb, Settings())
    assert (on_cpu["device"], on_cpu["precision"]) == ("cpu", "fp32")
    _gpu(monkeypatch, bf16=True)
    bb.device = CUDA
    on_gpu = settings_fingerprint("laion", bb, Settings())
    assert (on_gpu["device"], on_gpu["precision"]) == ("cuda", "bf16")
    with session(Compute(precision="fp32"), CUDA):  # another precision: other shards
        assert settings_fingerprint("laion", bb, Settings())["precision"] == "fp32"
    assert "threads" not in on_cpu  # rounding only: recorded, not fingerprinted


def test_runtime_records_precision_and_mode():
    from pipeline.runtime import runtime

    with session(Compute(), torch.device("cpu")):
        ran = runtime("cpu")
    assert (ran["precision"], ran["deterministic"]) == ("fp32", True)
