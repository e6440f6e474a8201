"""Reading `params.yaml`: each stage sees its own section plus the shared `seed`."""

from __future__ import annotations

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
    except yaml.YAMLError as exc:
        raise UserError(f"cannot parse {path}: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level must be a mapping")
    sect = data.get(section) or {}
    if not isinstance(sect, dict):
        raise UserError(f"{path}: section '{section}' must be a mapping")
    out = {"seed": data.get("seed", 0)}
    out.update(sect)
    return out
