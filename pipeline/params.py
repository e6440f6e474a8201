"""Reading `params.yaml`: each stage sees its own section plus the shared `seed`."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import UserError

DEFAULT_PARAMS = Path("params.yaml")


def load_params(section: str, path: str | Path | None = None) -> dict[str, Any]:
    """Return `params[section]` with the top-level `seed` merged in (section wins).

    A missing file gives an empty section (every stage has code defaults), a malformed
    file or section is a `UserError`.
    """
    path = Path(path) if path is not None else DEFAULT_PARAMS
    if not path.exists():
        if path != DEFAULT_PARAMS:
            raise UserError(f"params file not found: {path}")
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot parse {path}: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level must be a mapping")
    sect = data.get(section) or {}
    if not isinstance(sect, dict):
        raise UserError(f"{path}: section '{section}' must be a mapping")
    out = {"seed": data.get("seed", 0)}
    out.update(sect)
    return out


def _number(value: Any) -> float | None:
    """`value` as a float (numbers and numeric strings such as "1e-3"), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _cast(value: Any, default: Any, name: str) -> Any:
    def bad(expected: str) -> UserError:
        return UserError(f"params {name}: expected {expected}, got {value!r}")

    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise bad("true or false")
    if isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        num = _number(value)
        if num is not None and num.is_integer():
            return int(num)
        raise bad("an integer")
    if isinstance(default, float):
        num = _number(value)
        if num is None:
            raise bad("a number")
        return num
    if isinstance(default, str):
        if isinstance(value, str):
            return value
        raise bad("a string")
    return value  # lists, dicts, ...: the stage checks them itself


def typed(
    params: dict[str, Any],
    defaults: dict[str, Any],
    section: str,
    positive: Iterable[str] = (),
) -> dict[str, Any]:
    """`params` with each key that has a default cast to the type of that default.

    bool: true/false only; int: integers (also "3", 3.0); float: numbers, also strings
    such as "1e-3" (PyYAML reads exponents without a dot as strings); str: strings. Lists,
    dicts, keys with a `None` default or a `None` value and unknown keys pass through.
    Keys in `positive` must be > 0. A value that does not fit is a `UserError` naming
    `params <section>.<key>`.
    """
    out = dict(params)
    for key, default in defaults.items():
        if key in out and default is not None and out[key] is not None:
            out[key] = _cast(out[key], default, f"{section}.{key}")
    for key in positive:
        value = out.get(key)
        if value is not None and not value > 0:
            raise UserError(f"params {section}.{key}: must be > 0, got {value!r}")
    return out


def torch_device(name: str | None = "auto"):
    """`torch.device(name)`; "auto"/None/"" = cuda when available, else cpu.

    An unknown device name, or a CUDA device without CUDA, is a `UserError`.
    """
    import torch

    if not name or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(str(name))
    except (RuntimeError, ValueError, TypeError):
        raise UserError(f"unknown device {name!r} (use auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for but CUDA is not available")
    return device
