"""CLIPScore and RefCLIPScore: how well a caption fits its image as a CLIP sees it, without
and with the references (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation
Metric for Image Captioning", arXiv 2104.08718):

    CLIP-S(c, v)       = w * max(cos(t(c), v), 0)                                 w = 2.5
    RefCLIP-S(c, R, v) = H-Mean(CLIP-S(c, v), max(max_{r in R} cos(t(c), t(r)), 0))

with v the image's CLIP embedding, t the CLIP text embedding of `PROMPT` + the text ("A
photo depicts ", for candidates and references alike) and H-Mean(a, b) = 2ab / (a + b)
(0 where a + b = 0; the reference code divides 0 by 0 there). w scales CLIP-S only: the
harmonic mean takes the scaled CLIP-S and the unscaled text-text cosine, as the reference
implementation (github.com/jmhessel/clipscore, `clipscore.py`: `get_clip_score`,
`get_refonlyclipscore`, the F-score in `main`) does; it does not clip the text side at 0,
which differs only where every reference has a negative cosine with the candidate. Corpus
scores are means over the images (one candidate each).

The references' own scores, as a scale for the systems': CLIP-S of each reference against
its image, and RefCLIP-S of each reference against the image's other references (leave
one out: one reference fewer than a system is scored against; an image with a single
reference has no such score, NaN), each averaged over the image's references.

Embeddings come in as arrays and a text-encoding callable (any CLIP); they are
L2-normalised here and compared in float64.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

W = 2.5  # the paper's rescaling of CLIP-S
PROMPT = "A photo depicts "  # prefixed to every text before it is embedded

Encoder = Callable[[list[str]], np.ndarray]  # texts -> (n, d) text embeddings


def unit(x: np.ndarray) -> np.ndarray:
    """Rows of `x` L2-normalised, float64 (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def clip_s(text_emb: np.ndarray, image_emb: np.ndarray, w: float = W) -> np.ndarray:
    """(n,) CLIP-S of text i against image i: w * max(cos, 0)."""
    return w * np.maximum((unit(text_emb) * unit(image_emb)).sum(axis=-1), 0.0)


def harmonic_mean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise 2ab / (a + b), 0 where a + b = 0 (both are >= 0 here)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    total = a + b
    return np.where(total > 0, 2 * a * b / np.where(total > 0, total, 1.0), 0.0)


def ref_clip_s(clip_score: np.ndarray, ref_cos: np.ndarray) -> np.ndarray:
    """RefCLIP-S from CLIP-S and the best cosine with a reference (clipped at 0)."""
    return harmonic_mean(clip_score, np.maximum(ref_cos, 0.0))


class ClipScorer:
    """The test images with their references, embedded once; `score` then scores any
    system's captions (one per image) and `references` the references themselves."""

    def __init__(
        self, encode: Encoder, image_emb: np.ndarray, references: Sequence[Sequence[str]],
        w: float = W, prompt: str = PROMPT,
    ):  # fmt: skip
        if len(references) != len(image_emb):
            raise ValueError(f"{len(references)} reference lists for {len(image_emb)} images")
        self.encode, self.w, self.prompt = encode, w, prompt
        self.images = unit(image_emb)
        sizes = [len(rs) for rs in references]
        self.owner = np.repeat(np.arange(len(references)), sizes)  # image of each reference
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.refs = self._embed([r for rs in references for r in rs])

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        emb = unit(self.encode([self.prompt + t for t in texts]))
        if emb.shape != (len(texts), self.images.shape[1]):
            raise ValueError(f"text embeddings of shape {emb.shape} for {len(texts)} texts "
                             f"and {self.images.shape[1]}-d image embeddings")  # fmt: skip
        return emb

    def score(self, captions: Sequence[str]) -> dict[str, np.ndarray]:
        """Per image: `clipscore` (CLIP-S) and `refclipscore` (RefCLIP-S against all of
        the image's references) of `captions[i]`."""
        if len(captions) != len(self.images):
            raise ValueError(f"{len(captions)} captions for {len(self.images)} images")
        text = self._embed(captions)
        cs = clip_s(text, self.images, self.w)
        best = np.full(len(text), -np.inf)
        np.maximum.at(best, self.owner, (text[self.owner] * self.refs).sum(axis=1))
        return {"clipscore": cs, "refclipscore": ref_clip_s(cs, best)}

    def references(self) -> dict[str, np.ndarray]:
        """Per image, the mean over its references of their `clipscore` and leave-one-out
        `refclipscore` (NaN for an image with a single reference)."""
        n = len(self.images)
        cs = clip_s(self.refs, self.images[self.owner], self.w)
        own, loo = np.zeros(n), np.full(n, np.nan)
        for i in range(n):
            rows = np.arange(self.starts[i], self.starts[i + 1])
            own[i] = cs[rows].mean() if len(rows) else 0.0
            if len(rows) > 1:
                sim = self.refs[rows] @ self.refs[rows].T
                np.fill_diagonal(sim, -np.inf)
                loo[i] = ref_clip_s(cs[rows], sim.max(axis=1)).mean()
        return {"clipscore": own, "refclipscore": loo}


def corpus(per_image: dict[str, np.ndarray]) -> dict[str, float | None]:
    """The corpus score of each per-image score: the mean over the images that have one."""
    return {k: round(float(np.nanmean(v)), 6) if np.isfinite(v).any() else None
            for k, v in per_image.items()}  # fmt: skip


CLIPSCORE_DETAIL = {
    "clipscore": f"CLIPScore (Hessel et al. 2021, arXiv 2104.08718): {W} * max(cos, 0) of "
    "the CLIP text embedding of the prompted caption and the image's CLIP embedding (the "
    f"embeddings file's), prompt '{PROMPT}', mean over the images; text embeddings from "
    "the --clip CLIP (texts longer than its context are cut, as the reference code does; "
    "how many: clipscore.truncated)",
    "refclipscore": "RefCLIPScore: harmonic mean of the caption's CLIPScore and its best "
    "cosine (clipped at 0) with one of the image's references (prompted the same way), mean "
    "over the images; w scales the CLIPScore side only, as jmhessel/clipscore does",
    "clipscore_references": "the references' own: CLIPScore of each reference with its "
    "image, and RefCLIPScore of each against the image's other references (leave one out, "
    "so one reference fewer than the systems are scored against; images with a single "
    "reference left out), each averaged over the image's references, then over the images",
}
