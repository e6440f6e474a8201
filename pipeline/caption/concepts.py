"""Concepts: the words and word pairs of the training captions an image is tagged with.

A caption decoder conditioned on one CLIP vector must learn from captions alone which
objects the vector holds; each caption names only some of them, in one order. Explicit
concepts help (Wu et al. 2016, "What value do explicit high level concepts have in vision
to language problems?", arXiv 1506.01144; Yao et al. 2017, "Boosting image captioning
with attributes", arXiv 1611.01646): a multi-label classifier on the image predicts which
caption words it will show, and the decoder reads the predictions.

Here the concepts are the `k` most frequent token unigrams and bigrams of the captions the
decoder trains on (by the number of images whose captions hold them), leaving out those
of more than half the images ("a", "there is": they tell nothing of an image) and those
of fewer than `MIN_IMAGES`. Bigrams bind words that unigrams leave apart: "red circle"
is one concept, where "red" and "circle" may belong to two different objects. A caption
row's target is the set of concepts its own tokens hold; over an image's captions the
classifier learns how often each is said of it.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Hashable, Iterable, Iterator, Sequence

import torch

MIN_IMAGES = 5  # a concept is said of at least this many training images
MAX_SHARE = 0.5  # ... and of at most this share of them


def concept_vocabulary(
    rows: Iterable[tuple[Hashable, Sequence[int]]], k: int, special: Iterable[int]
) -> list[tuple[int, ...]]:
    """The `k` most frequent unigrams and bigrams of token ids over (image key, caption
    token ids) `rows`, counted once per image, without `special` ids; ties in id order."""
    special = set(special)
    per_image: dict[Hashable, set[tuple[int, ...]]] = {}
    for image, ids in rows:
        toks = [t for t in ids if t not in special]
        grams = per_image.setdefault(image, set())
        grams.update((t,) for t in toks)
        grams.update(itertools.pairwise(toks))
    count = Counter(g for grams in per_image.values() for g in grams)
    cap = MAX_SHARE * len(per_image)
    ok = [(n, g) for g, n in count.items() if MIN_IMAGES <= n <= cap]
    return [g for _, g in sorted(ok, key=lambda x: (-x[0], x[1]))[:k]]


def caption_rows(*sets) -> Iterator[tuple[Hashable, list[int]]]:
    """(image key, token ids) of every row of the `CaptionSet`s `sets`; images of different
    sets are different images."""
    for n, cs in enumerate(sets):
        for r in range(len(cs)):
            yield (n, int(cs.image_index[r])), cs.ids[r, : int(cs.lengths[r])].tolist()


class ConceptIndex(torch.nn.Module):
    """Caption token ids -> the 0/1 concept targets of each row, on the device, batched."""

    def __init__(self, ngrams: Sequence[Sequence[int]], vocab_size: int, k: int):
        """Concept j is `ngrams[j]`; the targets have `k` >= len(ngrams) columns (a small
        training set may fill fewer than the head has: the rest are never said)."""
        super().__init__()
        self.vocab_size = vocab_size
        uni = torch.full((vocab_size,), -1, dtype=torch.long)
        codes, where = [], []
        for j, g in enumerate(ngrams):
            if len(g) == 1:
                uni[g[0]] = j
            else:
                codes.append(g[0] * vocab_size + g[1])
                where.append(j)
        order = sorted(range(len(codes)), key=codes.__getitem__)
        self.register_buffer("uni", uni, persistent=False)
        sorted_codes = torch.tensor([codes[i] for i in order], dtype=torch.long)
        self.register_buffer("codes", sorted_codes, persistent=False)
        self.register_buffer("where", torch.tensor([where[i] for i in order], dtype=torch.long),
                             persistent=False)  # fmt: skip
        self.k = k

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, k) float targets of the caption rows `ids` (B, L); special ids (BOS, EOS,
        padding) are in no concept, so they match nothing."""
        out = torch.zeros(len(ids), self.k, device=ids.device)
        rows = torch.arange(len(ids), device=ids.device)[:, None].expand_as(ids)
        u = self.uni[ids]
        hit = u >= 0
        out[rows[hit], u[hit]] = 1.0
        if len(self.codes):
            code = ids[:, :-1] * self.vocab_size + ids[:, 1:]
            pos = torch.searchsorted(self.codes, code).clamp(max=len(self.codes) - 1)
            hit = self.codes[pos] == code
            out[rows[:, :-1][hit], self.where[pos][hit]] = 1.0
        return out
