"""The headline metrics on disk: one small JSON per row of `dvc metrics show`.

A stage's headline is a tree {row: {metric: value}} (caption: a row per system and per
paired difference; VQA: a row per question type and `overall_diff`). `write_rows` writes it
as one file per row into a folder (metrics/caption/noada.json, metrics/caption/ada-noada.json,
metrics/vqa/overall.json, ...), which dvc.yaml declares as a metrics directory, so
`dvc metrics show metrics/caption` prints one row per system with a few columns (well under
200 characters) instead of one 750-character row. `metrics/clip.json` stays one file.

A metric's name is its file's path under metrics/ with dots for slashes, then its key:
`caption.ada.cider`, the same name the single-file layout (metrics/caption.json, still read
by `read_tree`) gave, so `clipda seeds` and `clipda compare` read either.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from pipeline.atomic import write_json

STEMS = ("caption", "clip", "vqa")  # the headline metrics under metrics/: a file or a folder


def write_rows(folder: Path, tree: dict[str, dict[str, Any]]) -> None:
    """One JSON file per row of `tree` in `folder`; files of rows no longer in it removed."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.json"):
        if stale.stem not in tree:
            stale.unlink()
    for row, values in tree.items():
        write_json(folder / f"{row}.json", values)


def read_rows(folder: Path) -> dict[str, dict[str, Any]]:
    """The tree `write_rows` wrote into `folder`."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))}


def prefix(path: str) -> str:
    """The metric-name prefix of a metrics file: metrics/caption/ada.json -> caption.ada,
    metrics/clip.json -> clip (a path outside metrics/: its stem)."""
    p = PurePosixPath(path)
    parts = p.with_suffix("").parts
    if "metrics" in parts[:-1]:
        parts = parts[parts.index("metrics") + 1 :]
        return ".".join(parts)
    return p.stem


def read_tree(load: Callable[[str], Any], listdir: Callable[[str], list[str]], stem: str) -> Any:
    """The headline tree of `stem` under a metrics folder: from the `stem`/ folder of row
    files, else from `stem`.json (clip's, and the older one-file layout of caption and vqa);
    None if neither. `load(name)` gives a file's parsed JSON (None: absent), `listdir(name)`
    a folder's file names ([] if absent)."""
    rows = sorted(n for n in listdir(stem) if n.endswith(".json"))
    if rows:
        return {n.removesuffix(".json"): load(f"{stem}/{n}") for n in rows}
    return load(f"{stem}.json")
