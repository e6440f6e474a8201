"""What every training stage shares: seeding, device, autocast, threads, curves, model folders.

`clip_bootstrap`, `train_caption` and `train_vqa` (and the inference code) use these and
no copies of them.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from pipeline.atomic import atomic_path, write_json, write_text
from pipeline.compute import autocast  # noqa: F401  (the one autocast; re-exported)
from pipeline.errors import UserError

WEIGHTS_FILE, CONFIG_FILE = "model.safetensors", "config.json"


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(name: str | None = "auto") -> torch.device:
    """`auto` (or None): cuda when available, else cpu; otherwise `cpu`, `cuda`, `cuda:N`.

    An unknown name, or a CUDA device without CUDA, is a `UserError`.
    """
    if not name or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(name))
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for but CUDA is not available")
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:
            raise UserError(f"device {name!r} asked for but this machine has {count} GPU(s) "
                            f"(cuda:0 to cuda:{count - 1})")  # fmt: skip
    return device


def spare_cores(busy: int) -> int:
    """The CPU cores this process may use (its affinity), less `busy` ones, at least 1: torch
    threads beside `busy` worker processes without oversubscribing the cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) - busy)


@contextlib.contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Run the block with `n` torch CPU threads (0: leave torch's default), then restore."""
    before = torch.get_num_threads()
    if n > 0:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def write_plot(path: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Per-epoch curve as a TSV for `dvc plots` (columns: the first row's keys)."""
    if not rows:
        raise ValueError(f"no rows for {path}")
    cols = list(rows[0])
    lines = ["\t".join(cols)] + ["\t".join(_cell(r.get(c)) for c in cols) for r in rows]
    write_text(path, "\n".join(lines) + "\n")


def save_model_folder(
    folder: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]
) -> None:
    """`folder/model.safetensors` (contiguous CPU tensors) + `folder/config.json`.

    `config` holds everything needed to rebuild the module (its config dataclass as a
    dict) plus what the model was trained on; never pickles.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_json(folder / CONFIG_FILE, config)


class BestEpoch:
    """The epoch to keep: the one with the highest `value` so far (the first of equals; a
    NaN, from a diverged run or no validation rows, never wins), a copy of its weights,
    and whether `patience` epochs have passed without a better one (0: never stop)."""

    def __init__(self, patience: int = 0):
        self.patience = patience
        self.epoch, self.value, self.state = 0, float("nan"), None

    def update(self, epoch: int, model: torch.nn.Module, value: float) -> None:
        if self.state is None or value > self.value:
            self.epoch, self.value = epoch, value
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def stop(self, epoch: int) -> bool:
        return 0 < self.patience <= epoch - self.epoch
