"""How a stage computes on its device: the autocast precision and the deterministic mode
(params `compute`, read by every stage that runs torch).

- **precision** `auto | bf16 | fp16 | fp32`, for CUDA only (CPU runs are always fp32):
  `auto` is bf16 where the GPU supports it (Ampere and later), else fp16, whose training
  steps scale the loss with a `torch.amp.GradScaler` (`Scaler`); `bf16` on a GPU without
  bf16 support is a one-line error (a T4 emulates it slowly, a V100 has no kernels for it
  in the CUDA 13 wheels); `fp32` turns autocast off.
- **deterministic** `auto | on | off`: `auto` is on for CPU runs and off on CUDA. On:
  `torch.use_deterministic_algorithms(True, warn_only=True)` (an op without a
  deterministic kernel warns, it does not fail), cuDNN's benchmark off and deterministic
  on, and `CUBLAS_WORKSPACE_CONFIG=:4096:8` for cuBLAS (set before the first CUDA call).
  On a GPU, deterministic runs cost time (bench/gpu_smoke.sh measures how much) and still
  differ across GPU models, CUDA and torch versions; CPU runs are bitwise identical on the
  same CPU capability, threads and torch (docs/reproducibility.md).

`session(compute, device)` applies both for the duration of a stage; `autocast(device)`
(`pipeline.training`) and `Scaler` read the precision in force. The resolved precision
and mode are recorded with the runtime (`pipeline.runtime`) and the precision is part of
embed's shard fingerprint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import ClassVar, Literal

import torch

from pipeline.errors import UserError
from pipeline.settings import check

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CUBLAS = ":4096:8"


@dataclasses.dataclass(frozen=True)
class Compute:
    """Precision and determinism of the torch stages (module docstring)."""

    SECTION: ClassVar[str] = "compute"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # CUDA autocast dtype
    deterministic: Literal["auto", "on", "off"] = "auto"  # auto: on for CPU runs, off on CUDA

    def __post_init__(self) -> None:
        check(self.precision in PRECISIONS, "precision", f"must be one of {', '.join(PRECISIONS)}")
        check(self.deterministic in ("auto", "on", "off"), "deterministic",
              "must be auto, on or off")  # fmt: skip


_state = {"precision": "auto", "deterministic": False}


def resolve_precision(name: str, device: torch.device) -> str:
    """The dtype name autocast uses for `name` on `device` (fp32: none)."""
    if device.type != "cuda" or name == "fp32":
        return "fp32"
    bf16_ok = torch.cuda.is_bf16_supported(including_emulation=False)
    if name == "auto":
        return "bf16" if bf16_ok else "fp16"
    if name == "bf16" and not bf16_ok:
        gpu = torch.cuda.get_device_name(device)
        raise UserError(f"compute.precision: bf16 asked for but {gpu} has no bf16 support "
                        "(use auto, fp16 or fp32)")  # fmt: skip
    return name


def precision(device: torch.device) -> str:
    """The precision in force for `device` (the current session's; auto outside one)."""
    return resolve_precision(_state["precision"], device)


def deterministic() -> bool:
    return bool(_state["deterministic"])


@contextlib.contextmanager
def session(compute: Compute, device: torch.device) -> Iterator[dict[str, object]]:
    """Apply `compute` on `device` for the block; yields {precision, deterministic} as
    resolved (for the outputs), restores the previous state after."""
    resolved = resolve_precision(compute.precision, device)
    det = compute.deterministic == "on" or (compute.deterministic == "auto"
                                            and device.type != "cuda")  # fmt: skip
    before = dict(_state), torch.are_deterministic_algorithms_enabled()
    cudnn = torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic
    if det:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS)
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    _state.update(precision=compute.precision, deterministic=det)
    try:
        yield {"precision": resolved, "deterministic": det}
    finally:
        _state.clear()
        _state.update(before[0])
        torch.use_deterministic_algorithms(before[1])
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn


def autocast(device: torch.device, enabled: bool = True):
    """Autocast at the precision in force on CUDA when `enabled`; a no-op on the CPU."""
    name = precision(device) if enabled else "fp32"
    return torch.autocast(device.type, dtype=DTYPES.get(name, torch.bfloat16),
                          enabled=name != "fp32")  # fmt: skip


def scaler(device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 on CUDA (else its calls pass through)."""
    return torch.amp.GradScaler(device.type, enabled=precision(device) == "fp16")
