"""Which CLIP checkpoint made an embeddings folder, and one backbone per run.

`manifest.json` names the CLIP (`model`, `revision`) and, where the CLIP folder records it,
where that checkpoint came from (`origin`: clip_bootstrap's `clip_source.json`,
convert-open-clip's `open_clip.json`). A model trained on one CLIP's embeddings and scored
on another's is an error, not a number.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import UserError
from pipeline.readers import read_json

ORIGIN_FILES = ("clip_source.json", "open_clip.json")


def checkpoint_origin(model_id: str) -> dict:
    """The provenance records of a CLIP folder ({} for a hub id or a folder without any)."""
    folder = Path(model_id)
    return {f.stem: read_json(f) for f in (folder / n for n in ORIGIN_FILES) if f.is_file()}


def check_trained_on(trained: dict, manifest: dict, model: Path, emb: Path) -> None:
    """A `UserError` (one line) when the model in `model`, trained on the embeddings of the
    CLIP `trained` ({model, revision}), meets the embeddings in `emb` (`manifest`) of
    another CLIP; not checked when either names no revision."""
    have, want = trained.get("revision"), manifest.get("revision")
    if have and want and have != want:
        raise UserError(
            f"{model} was trained on embeddings of CLIP {trained.get('model')} ({have}), but "
            f"{emb} holds those of {manifest.get('model')} ({want}): one backbone per run"
        )
