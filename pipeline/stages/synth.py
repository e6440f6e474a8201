"""synth: write the sample world (Visual Genome, LAION, Flickr30k in their real formats).

Everything written is a pure function of the settings: the same seed gives the same bytes.
See `pipeline.synth.world` for what each dataset holds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

from pipeline.settings import check, load
from pipeline.synth.world import generate


@dataclass(frozen=True)
class Settings:
    """Sizes and realism of the sample world."""

    SECTION: ClassVar[str] = "synth"
    vg_images: int = 3000  # Visual Genome images (with quirks, ~2% have no image file)
    laion_samples: int = 1500  # LAION rows, downloaded or not
    laion_shard_size: int = 500  # rows per img2dataset shard (NNNNN.tar + .parquet)
    laion_fail_rate: float = 0.03  # share of LAION rows that failed to download
    flickr30k_images: int = 2000  # Flickr30k images, five captions each
    flickr30k_split: tuple[float, float, float] = (0.8, 0.1, 0.1)  # Karpathy train/val/test
    image_size: tuple[int, int] = (192, 144)  # width, height of every image, in pixels
    objects_per_image: tuple[int, int] = (2, 4)  # fewest, most objects placed in a scene
    flickr30k_style: Literal["photo", "clipart"] = (
        "photo"  # clipart: drawn as LAION (a control without domain shift)
    )
    laion_captions: Literal["alt_text", "sentences"] = (
        "alt_text"  # sentences: Flickr30k-style, one per image (a control: drawing style the only shift)
    )
    quirks: bool = True  # plant the real releases' flaws (see pipeline.synth.world)
    probe_images: int = 440  # CLIP probe set: images per style x kind (single, crop); 0 = none
    probe_scenes: int = 4800  # CLIP scene probes: whole scenes per style (half train, half test)
    seed: int = 0  # top-level `seed`: the world is a pure function of it

    def __post_init__(self) -> None:
        for key in ("vg_images", "laion_samples", "flickr30k_images", "probe_images",
                    "probe_scenes"):  # fmt: skip
            check(getattr(self, key) >= 0, key, "must be >= 0")
        check(self.laion_shard_size >= 1, "laion_shard_size", "must be >= 1")
        check(0 <= self.laion_fail_rate <= 1, "laion_fail_rate", "must be in [0, 1]")
        split = self.flickr30k_split
        check(min(split) >= 0 and abs(sum(split) - 1) < 1e-6, "flickr30k_split",
              "must be three shares >= 0 that sum to 1")  # fmt: skip
        check(min(self.image_size) >= 32, "image_size", "must be at least 32 x 32 pixels")
        lo, hi = self.objects_per_image
        check(1 <= lo <= hi, "objects_per_image", "must be [fewest, most] with 1 <= fewest <= most")
        check(self.probe_images == 0 or self.probe_images >= 44, "probe_images",
              "must be 0 or >= 44 (two rounds of the 22 categories: train, test)")  # fmt: skip


SETTINGS = (Settings,)


def main(out: Path, params: Path) -> str:
    """Write `out/{vg,laion,flickr30k}` and `out/SAMPLE_WORLD.json`; the one-line summary."""
    settings = load(Settings, params)
    t0 = time.perf_counter()
    info = generate(Path(out), settings)
    vg, laion, flickr30k = info["vg"], info["laion"], info["flickr30k"]
    return (
        f"synth: {vg['images']} VG images ({vg['relationships']} relationships), "
        f"{laion['downloaded']}/{laion['samples']} LAION pairs, "
        f"{flickr30k['images']} Flickr30k images ({flickr30k['captions']} captions), "
        f"{info['probes']['images']} CLIP probe images "
        f"in {time.perf_counter() - t0:.1f}s -> {out}"
    )
