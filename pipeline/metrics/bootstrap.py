"""95% intervals by the percentile bootstrap over test items (Efron & Tibshirani 1993).

A resample draws n of the n test items (images, questions) with replacement; it is given
as a row of `weights`: how often each item was drawn. Every metric here is a function of
per-item statistics and the weights, so 1,000 resamples cost a few matrix products:

- accuracy, CLIPScore, RefCLIPScore: the weighted mean of per-item values (correctness,
  per-image scores);
- corpus BLEU-n (`bleu_stats` / `bleu_from_sums`): the clipped n-gram matches, n-gram
  counts, hypothesis and closest-reference lengths are summed with the weights, then
  combined as nltk's `corpus_bleu` does (see `pipeline.metrics.bleu`);
- CIDEr-D (`CiderBootstrap`): recomputed on each resample, idf included. A drawn image
  counts as often as it is drawn, in the document frequencies too, as if the resampled
  corpus were scored by `pipeline.metrics.cider.cider_d`. Because the clipped numerator
  is sum_g min(h_g, r_g) r_g idf_g^2 and the norms are sqrt(sum_g t_g^2 idf_g^2), each is
  a sparse matrix times the resample's idf^2 vector;
- grounding: summed counts, as `pipeline.metrics.grounding` does.

A paired difference (system A - system B) is taken on the same resamples, so the
interval of the difference accounts for the two being scored on the same items.
`tests/test_bootstrap_ci.py` checks every metric on explicit resamples against the exact
scorer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from pipeline.metrics.cider import NGram, ngram_counts

Metric = Callable[[np.ndarray], np.ndarray]  # (B, n) weights -> (B,) values


BLOCK = 1 << 22  # weights (resamples x items) made and scored at a time: 32 MB of float64


def weight_blocks(n: int, resamples: int, seed: int) -> Iterator[np.ndarray]:
    """The rows of `resample_weights(n, resamples, seed)`, a block of rows at a time (the
    same draws: each row is drawn in turn from one generator), so that memory stays flat
    however many items (277k questions at full VG: 2.2 GB of weights at once)."""
    rng = np.random.default_rng([seed, 2024])
    rows = max(1, BLOCK // max(n, 1))
    for start in range(0, resamples, rows):
        size = min(rows, resamples - start)
        yield rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(np.float64)


def resample_weights(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) float64: how often each of n items is drawn in each resample."""
    return np.concatenate(list(weight_blocks(n, resamples, seed)) or [np.zeros((0, n))])


def interval(samples: np.ndarray, level: float) -> tuple[float, float]:
    """The percentile interval of bootstrap `samples` at `level` (0.95: 2.5%, 97.5%);
    NaN samples (a masked mean's resample without items) are left out."""
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.nanpercentile(samples, [tail, 100 - tail])
    return round(float(lo), 6), round(float(hi), 6)


def summarise(
    metrics: dict[str, Metric], n: int, resamples: int, level: float, seed: int,
    pairs: Sequence[tuple[str, str]] = (),
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Point value and interval of each metric, and of each paired difference `a - b`:
    {name: {"value", "lo", "hi"}} with names `a` and `a-b`."""
    full = np.ones((1, n))
    parts: dict[str, list[np.ndarray]] = {k: [] for k in metrics}
    for w in weight_blocks(n, resamples, seed):
        for k, f in metrics.items():
            parts[k].append(f(w))
    samples = {k: np.concatenate(v) for k, v in parts.items()}
    point = {k: float(f(full)[0]) for k, f in metrics.items()}
    out = {}
    for k in metrics:
        lo, hi = interval(samples[k], level)
        out[k] = {"value": round(point[k], 6), "lo": lo, "hi": hi}
    for a, b in pairs:
        lo, hi = interval(samples[a] - samples[b], level)
        out[f"{a}-{b}"] = {"value": round(point[a] - point[b], 6), "lo": lo, "hi": hi}
    return out


def mean_metric(values: np.ndarray, mask: np.ndarray | None = None) -> Metric:
    """The weighted mean of per-item `values` (accuracy from 0/1 correctness); with `mask`,
    over the items where it is true only (NaN for a resample that drew none of them)."""
    v = np.asarray(values, dtype=np.float64)
    if mask is None:
        return lambda w: (w @ v) / w.sum(axis=1)
    m = np.asarray(mask, dtype=np.float64)
    vm = np.where(m > 0, v, 0.0)

    def metric(w: np.ndarray) -> np.ndarray:
        den = w @ m
        return np.where(den > 0, (w @ vm) / np.where(den > 0, den, 1.0), np.nan)

    return metric


# --- BLEU -------------------------------------------------------------------------------


def bleu_stats(refs: Sequence[Sequence[Sequence[str]]], hyps: Sequence[Sequence[str]]):
    """(n, 10) per-image BLEU statistics: clipped matches and counts of orders 1..4 (nltk
    counts max(1, #n-grams)), the hypothesis length and the closest reference length."""
    out = np.zeros((len(hyps), 10))
    for i, (rs, h) in enumerate(zip(refs, hyps)):
        best: dict[NGram, int] = {}  # each n-gram's most occurrences in one reference
        for r in rs:
            for g, c in ngram_counts(r).items():
                best[g] = max(best.get(g, 0), c)
        for g, c in ngram_counts(h).items():
            out[i, len(g) - 1] += min(c, best.get(g, 0))
            out[i, 4 + len(g) - 1] += c
        out[i, 4:8] = np.maximum(out[i, 4:8], 1)
        out[i, 8] = len(h)
        out[i, 9] = min((len(r) for r in rs), key=lambda rl: (abs(rl - len(h)), rl))
    return out


def bleu_from_sums(sums: np.ndarray, order: int) -> np.ndarray:
    """Corpus BLEU-`order` from (B, 10) summed statistics: uniform weights, the brevity
    penalty against the summed closest reference lengths, 0 where an order has no match."""
    match, total, c, r = sums[:, :4], sums[:, 4:8], sums[:, 8], sums[:, 9]
    with np.errstate(divide="ignore", invalid="ignore"):
        logp = np.log(match[:, :order] / total[:, :order]).mean(axis=1)
        bp = np.where(c > r, 1.0, np.exp(1.0 - r / np.maximum(c, 1e-300)))
        score = bp * np.exp(logp)
    return np.where((match[:, :order] > 0).all(axis=1) & (c > 0), score, 0.0)


def bleu_metric(stats: np.ndarray, order: int) -> Metric:
    return lambda w: bleu_from_sums(w @ stats, order)


# --- CIDEr-D ----------------------------------------------------------------------------


class CiderBootstrap:
    """CIDEr-D of one system on weighted resamples of its images (see the module doc).

    Sparse matrices over the n-grams g of the corpus: `presence` (image x g: g occurs in
    one of the image's references), `num` ((image, ref, order) x g: min(h_g, r_g) r_g),
    `hyp_sq` ((image, order) x g: h_g^2), `ref_sq` ((image, ref, order) x g: r_g^2).
    """

    def __init__(
        self, refs: Sequence[Sequence[Sequence[str]]], hyps: Sequence[Sequence[str]],
        max_n: int = 4, sigma: float = 6.0, chunk: int = 100,
    ):  # fmt: skip
        self.n, self.max_n, self.chunk = len(hyps), max_n, chunk
        index: dict[NGram, int] = {}
        pres, num, hsq, rsq = ([], [], []), ([], [], []), ([], [], []), ([], [], [])
        pair_image, pair_order, penalty, ref_row_image = [], [], [], []
        n_refs = np.array([len(rs) for rs in refs], dtype=np.float64)

        def add(coo, row, g, v):
            coo[0].append(row)
            coo[1].append(index.setdefault(g, len(index)))
            coo[2].append(v)

        for i, (rs, h) in enumerate(zip(refs, hyps)):
            hc = ngram_counts(h, max_n)
            for g, c in hc.items():
                add(hsq, i * max_n + len(g) - 1, g, float(c * c))
            seen = set()
            for r in rs:
                rc = ngram_counts(r, max_n)
                seen.update(rc)
                base = len(ref_row_image) * max_n
                for g, c in rc.items():
                    add(rsq, base + len(g) - 1, g, float(c * c))
                    if g in hc:
                        add(num, base + len(g) - 1, g, float(min(hc[g], c) * c))
                pen = math.exp(-((len(h) - len(r)) ** 2) / (2 * sigma**2))
                for k in range(max_n):
                    pair_image.append(i)
                    pair_order.append(k)
                    penalty.append(pen)
                ref_row_image.append(i)
            for g in seen:
                add(pres, i, g, 1.0)
        v = len(index)
        n_rows = len(ref_row_image) * max_n
        self.presence = _sparse(pres, (self.n, v))
        self.num = _sparse(num, (n_rows, v))
        self.hyp_sq = _sparse(hsq, (self.n * max_n, v))
        self.ref_sq = _sparse(rsq, (n_rows, v))
        self.pair_image = torch.tensor(pair_image)
        self.hyp_row = self.pair_image * max_n + torch.tensor(pair_order)
        # per (image, ref, order): penalty x 10 / (max_n x refs of the image)
        self.scale = torch.tensor(penalty, dtype=torch.float64) * 10.0 / max_n
        self.scale /= torch.from_numpy(n_refs)[self.pair_image]

    def per_image(self, weights: np.ndarray) -> np.ndarray:
        """(B, n) per-image CIDEr-D under the idf of each resample."""
        w = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float64))
        df = torch.sparse.mm(self.presence.t(), w.T)  # (v, B)
        total = w.sum(dim=1)  # N of each resample (the image count, with repeats)
        idf = torch.log(total)[None, :] - torch.log(torch.clamp(df, min=1.0))
        idf2 = idf * idf
        num = torch.sparse.mm(self.num, idf2)
        hyp = torch.sparse.mm(self.hyp_sq, idf2).sqrt()[self.hyp_row]
        ref = torch.sparse.mm(self.ref_sq, idf2).sqrt()
        norm = hyp * ref
        sim = torch.where(norm != 0, num / torch.where(norm != 0, norm, 1.0), num)
        sim = sim * self.scale[:, None]
        out = torch.zeros((self.n, w.shape[0]), dtype=torch.float64)
        out.index_add_(0, self.pair_image, sim)
        return out.T.numpy()

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        """(B,) corpus CIDEr-D of each resample (the weighted mean of its image scores)."""
        out = []
        for s in range(0, len(weights), self.chunk):
            w = weights[s : s + self.chunk]
            out.append((w * self.per_image(w)).sum(axis=1) / w.sum(axis=1))
        return np.concatenate(out)


def _sparse(coo: tuple[list, list, list], shape: tuple[int, int]) -> torch.Tensor:
    idx = torch.tensor([coo[0], coo[1]], dtype=torch.long).reshape(2, -1)
    vals = torch.tensor(coo[2], dtype=torch.float64)
    return torch.sparse_coo_tensor(idx, vals, shape, check_invariants=True).coalesce()


# --- grounding --------------------------------------------------------------------------


def ratio_metric(counts: np.ndarray, parts: Sequence[tuple[int, int]]) -> Metric:
    """The mean over `parts` (numerator column, denominator column) of the ratio of the
    weighted column sums of `counts` (0 where a denominator sums to 0), as grounding's
    micro-averaged precision / recall."""
    c = np.asarray(counts, dtype=np.float64)

    def metric(w: np.ndarray) -> np.ndarray:
        s = w @ c
        vals = [np.where(s[:, d] > 0, s[:, a] / np.where(s[:, d] > 0, s[:, d], 1), 0.0)
                for a, d in parts]  # fmt: skip
        return np.mean(vals, axis=0)

    return metric
