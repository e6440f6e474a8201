"""embed: cache CLIP image and text embeddings of one dataset as Arrow shards (resumable).

`--dataset vg` reads prepare_vqa's tables (`--input`, data/qa) and their images under
`--images` (the Visual Genome folder holding VG_100K*/). laion and flickr30k hold their
images inside the dataset folder, so for them `--images` must name the `--input` folder
(dvc.yaml passes it twice so that both stay a dependency); anything else is an error.
Shards, resume, `--shard i/n` and the output files: see `pipeline.embedding`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from pipeline.clip.backbone import load_backbone
from pipeline.compute import Compute
from pipeline.compute import session as compute_session
from pipeline.distributed import device_for
from pipeline.embedding.dataset import check_dataset, embed_dataset
from pipeline.embedding.shards import parse_shard
from pipeline.errors import UserError
from pipeline.settings import Split, check, check_device, load
from pipeline.training import cpu_threads, seed_everything, spare_cores


@dataclass(frozen=True)
class Settings:
    """How images and texts are decoded, batched and stored."""

    SECTION: ClassVar[str] = "embed"
    batch_size: int = 64  # images per forward
    text_batch_size: int = 256  # texts per forward
    num_workers: int = 2  # DataLoader decode workers (0: decode in the main process)
    dtype: Literal["float16", "float32"] = "float16"  # how embeddings are stored
    shard_size: int = 10000  # images per part-NNNNN.arrow (unit of resume and of --shard)
    vg_crops: bool = True  # vg: also embed the question boxes (object box, union box)
    draft: bool = True  # JPEG draft mode for images >= 2x the model's input size
    device: str = "auto"  # auto | cpu | cuda | cuda:N (e.g. one GPU per --shard process)
    threads: int = 0  # torch CPU threads (0: the cores left beside the decode workers, >= 1)
    seed: int = 0  # top-level `seed`

    def __post_init__(self) -> None:
        for key in ("batch_size", "text_batch_size", "shard_size"):
            check(getattr(self, key) >= 1, key, "must be >= 1")
        for key in ("num_workers", "threads"):
            check(getattr(self, key) >= 0, key, "must be >= 0")
        check_device(self.device)


SETTINGS = (Settings, Split, Compute)


def main(
    dataset: str, input: Path, images: Path, clip: str, out: Path, shard: str | None,
    params: Path,
) -> str:  # fmt: skip
    """Embed `dataset` from `input` (+ `images`) with the CLIP `clip` into `out`; summary."""
    settings, split, compute = load(Settings, params), load(Split, params), load(Compute, params)
    check_dataset(dataset)
    rank_world = parse_shard(shard)
    input, images, out = Path(input), Path(images), Path(out)
    for option, path in (("--input", input), ("--images", images)):
        if not path.exists():
            raise UserError(f"{option} not found: {path}")
    if dataset != "vg" and images.resolve() != input.resolve():
        raise UserError(f"--images: {dataset} images are read from --input; pass {input} again")
    seed_everything(settings.seed)
    t0 = time.perf_counter()
    device = device_for(settings.device)  # under torchrun: the rank's GPU
    with (
        cpu_threads(settings.threads or spare_cores(settings.num_workers)),
        compute_session(compute, device),
    ):
        backbone = load_backbone(clip, device=str(device))
        report = embed_dataset(
            dataset, input, out, backbone, settings, split, images=images, shard=rank_world
        )
    crops = report.extra.get("crops")
    rows = " (written rows: whole images + question-box crops)" if crops else ""
    return f"{report.summary()}{rows} in {time.perf_counter() - t0:.1f}s -> {out}"
