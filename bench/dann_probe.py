"""DANN diagnostics: train_caption's phases, printing per epoch how far apart the domains are.

Runs the stage's own data loading, `Trainer` and λ schedule on two embedding folders (the
params file plus `--set` overrides; `--finetune 0` stops after adapt, where the GRL acts
alone) and prints per epoch, beside the target (Flickr30k val) and LAION val caption
losses, the discriminator's accuracy and loss, and λ:

- `gap`: the distance between the two domains' mean prefixes (the features the
  discriminator sees), in units of the mean distance of a LAION val prefix to its mean;
- `offset`: with `target_shift` on, mean ‖prefix(x + o) - prefix(x)‖ over the Flickr30k val
  images, in the same unit: how much of the offset control's shift the adapter still lets
  through (0: invariant to it, what domain-adversarial training should reach).

This is the experiment that showed the GRL game diverging on the offset control (issue 20;
docs/results.md): without `train_caption.disc_penalty` both numbers grow ~100x in the
first adapt epoch while the discriminator flips between right and wrong.

    .venv/bin/python bench/dann_probe.py --laion data/emb/laion --flickr30k data/emb/flickr30k \\
        --set target_shift.directions=4 --set train_caption.disc_penalty=10 --finetune 0
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from scale import with_overrides

from pipeline.caption.data import load_training_data
from pipeline.caption.shift import TargetShift
from pipeline.caption.training import Trainer, grl_strength
from pipeline.nn.caption_decoder import SOURCE, CaptionDecoder, DecoderConfig
from pipeline.settings import load
from pipeline.stages.train_caption import Settings, training_plan
from pipeline.training import cpu_threads, seed_everything


@torch.no_grad()
def distances(model, source: torch.Tensor, target: torch.Tensor, offset) -> tuple[float, float]:
    """(gap, offset response) of the prefixes, in units of the source rows' spread."""
    model.eval()
    ps, pt = model.prefix(source).flatten(1), model.prefix(target).flatten(1)
    unit = (ps - ps.mean(0)).norm(dim=1).mean()
    gap = float((pt.mean(0) - ps.mean(0)).norm() / unit)
    if offset is None:
        return gap, float("nan")
    p0 = model.prefix(target - offset).flatten(1)
    return gap, float((pt - p0).norm(dim=1).mean() / unit)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--laion", type=Path, required=True)
    ap.add_argument("--flickr30k", type=Path, required=True)
    ap.add_argument("--clip", default=None, help="the CLIP of the token table (default: theirs)")
    ap.add_argument("--params", type=Path, default=REPO / "params.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--variant", default="ada", choices=["noada", "ada"])
    ap.add_argument("--finetune", type=int, default=None, help="finetune epochs (default: params)")
    a = ap.parse_args()
    params = with_overrides(yaml.safe_load(a.params.read_text()), a.set)
    if a.finetune is not None:
        params["train_caption"]["finetune_epochs"] = a.finetune
    s, shift = load(Settings, params), load(TargetShift, params)
    dev = torch.device("cpu")
    with cpu_threads(s.threads):
        seed_everything(s.seed)
        data = load_training_data(a.laion, a.flickr30k, a.clip, s.model.max_len,
                                  s.target_splits, dev, s.labelled_fraction, s.seed + 2, shift,
                                  s.laion_val_images, text=s.text_weight > 0)  # fmt: skip
        config = DecoderConfig.for_data(
            s.model, image_dim=data.image_dim, token_table=data.token_table, **data.special_ids
        )
        tr = Trainer(CaptionDecoder(config, data.token_table), s, dev)
        o = shift.offset(data.image_dim)
        o = None if o is None else torch.from_numpy(o)
        val_t = torch.unique(data.flickr30k_val.image_emb, dim=0)
        val_s = torch.unique(data.laion_val.image_emb, dim=0)
        plan = training_plan(s, data, grl_strength(a.variant))
        g = torch.Generator().manual_seed(s.seed)
        print(f"# {a.variant} {' '.join(a.set)}")
        print(
            "epoch\tphase\tval_loss\tlaion_val\tdisc_acc\tdisc_loss\tlambda\tgap\toffset\tseconds"
        )
        t0, epoch = time.perf_counter(), 0
        for phase in plan:
            for _ in range(phase.epochs):
                st = tr.epoch(phase.captions, phase.lr, g, phase.adversary, rows=phase.rows,
                              beside=phase.beside, data_domain=phase.domain)  # fmt: skip
                gap, off = distances(tr.model, val_s, val_t, o)
                epoch += 1
                print(f"{epoch}\t{phase.name}\t{tr.eval_loss(data.flickr30k_val):.3f}\t"
                      f"{tr.eval_loss(data.laion_val, domain=SOURCE):.3f}\t{st['disc_acc']:.3f}\t"
                      f"{st['disc_loss']:.3f}\t{st['lambda']:.2f}\t{gap:.2f}\t{off:.2f}\t"
                      f"{time.perf_counter() - t0:.0f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
