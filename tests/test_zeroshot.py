"""Zero-shot CLIP ranking in blocks, and the block-wise prompt cache (`pipeline.vqa.zeroshot`).

A fake text encoder (each prompt hashed to a fixed random vector) and a fake split whose
image embeddings are random: no CLIP, no files but the cache in tmp_path.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pytest
from pyarrow import ipc

from pipeline.vqa.scores import TOP_K
from pipeline.vqa.zeroshot import PromptEncoder, zeroshot_rank

DIM = 8
ANSWERS = ["on", "near", "under", "has", "cat", "dog", "tree"]
TEMPLATE = "a photo of {subject} {answer} {object}"


def fake_encode(texts: list[str]) -> np.ndarray:
    seeds = [int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little") for t in texts]
    return np.stack([np.random.default_rng(s).standard_normal(DIM) for s in seeds])


class Counting:
    """fake_encode, recording the prompts asked for."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, texts):
        self.calls += texts
        return fake_encode(texts)


@dataclass
class FakeSplit:
    image: np.ndarray

    def image_emb(self, idx: np.ndarray) -> np.ndarray:
        return self.image[idx].copy()


def world(n: int = 60, seed: int = 0):
    rng = np.random.default_rng(seed)
    nouns = ["cat", "dog", "tree", "car"]
    meta = {
        "subject": [nouns[i] for i in rng.integers(0, 4, n)],
        "object": [nouns[i] for i in rng.integers(0, 3, n)],
        "question": ["q"] * n,
    }
    return FakeSplit(rng.standard_normal((n, DIM)).astype(np.float32)), meta


def rank(enc, data, meta, cand=(0, 1, 2, 3), template=TEMPLATE, block=65536, rows=None):
    rows = np.arange(len(data.image)) if rows is None else rows
    cand = np.asarray(cand, dtype=np.int64)
    return zeroshot_rank(enc, template, ANSWERS, data, rows, cand, meta, block)


def brute_force(data, meta, cand, rows):
    """Each row's candidates scored one by one: the reference top-k."""
    ids, vals = [], []
    for r in rows:
        prompts = [TEMPLATE.format(answer=ANSWERS[c], subject=meta["subject"][r],
                                   object=meta["object"][r]) for c in cand]  # fmt: skip
        text = fake_encode(prompts)
        text /= np.linalg.norm(text, axis=1, keepdims=True)
        image = data.image[r] / np.linalg.norm(data.image[r])
        scores = text @ image
        order = np.argsort(-scores, kind="stable")[:TOP_K]
        ids.append(np.asarray(cand)[order])
        vals.append(scores[order])
    return np.array(ids), np.array(vals)


@pytest.mark.parametrize("block", [1, 12, 20, 65536])
def test_blocks_give_the_top_k_of_scoring_everything(block):
    data, meta = world()
    rows = np.random.default_rng(1).permutation(len(data.image))[:50]
    cand = [3, 0, 2, 1, 5, 6]
    enc = PromptEncoder(Counting(), batch=4)
    ids, vals = rank(enc, data, meta, cand, block=block, rows=rows)
    want_ids, want_vals = brute_force(data, meta, cand, rows)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(vals, want_vals, rtol=1e-5, atol=1e-6)
    n_groups = len({(meta["subject"][r], meta["object"][r]) for r in rows})
    assert enc.embedded == len(enc.encode.calls) == n_groups * len(cand) and enc.cached == 0
    assert enc.blocks == -(-n_groups // max(1, block // len(cand)))


def run(cache, encode, revision="r0", **kw):
    data, meta = world()
    with PromptEncoder(encode, 4, cache, "clip", revision) as enc:
        out = rank(enc, data, meta, block=8, **kw)
    return enc, out


def test_the_cache_is_reused_and_kept_as_it_is(tmp_path):
    cache = tmp_path / "prompts.arrow"
    first, out1 = run(cache, Counting())
    assert first.cached == 0 and first.embedded == first.prompts > 0 and first.blocks > 2
    with ipc.open_file(str(cache)) as f:
        assert f.num_record_batches == first.blocks  # one record batch per block
        assert f.schema.metadata[b"revision"] == b"r0"
    stamp = cache.stat().st_mtime_ns
    second, out2 = run(cache, enc := Counting())
    assert enc.calls == [] and second.cached == first.prompts and second.embedded == 0
    assert cache.stat().st_mtime_ns == stamp  # nothing changed: not rewritten
    for a, b in zip(out1, out2):
        np.testing.assert_array_equal(a, b)
    assert list(tmp_path.iterdir()) == [cache]  # no temp file left behind


@pytest.mark.parametrize(
    "change", [{"template": "a picture of {subject} {answer} {object}"}, {"cand": (0, 1, 3, 4)}]
)
def test_a_changed_template_or_candidate_set_is_embedded_anew(tmp_path, change):
    cache = tmp_path / "prompts.arrow"
    run(cache, Counting())
    enc, got = run(cache, Counting(), **change)
    fresh, want = run(None, Counting(), **change)
    assert enc.embedded == fresh.embedded > 0 and enc.cached == 0
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    again, _ = run(cache, Counting(), **change)  # the cache now holds the new prompts
    assert again.embedded == 0 and again.cached == enc.prompts


def test_cached_blocks_are_reused_wherever_they_are(tmp_path):
    cache = tmp_path / "prompts.arrow"

    def both(first, second):
        data, meta = world()
        with PromptEncoder(Counting(), 4, cache, "clip", "r0") as enc:
            rank(enc, data, meta, cand=first, block=8)
            rank(enc, data, meta, cand=second, block=8)
        return enc

    made = both((0, 1, 2, 3), (4, 5))
    swapped = both((4, 5), (0, 1, 2, 3))  # all reused, out of place: the file is rewritten
    assert swapped.embedded == 0 and swapped.cached == made.embedded
    stamp = cache.stat().st_mtime_ns
    again = both((4, 5), (0, 1, 2, 3))  # now in place: kept as it is
    assert again.embedded == 0 and cache.stat().st_mtime_ns == stamp


def test_a_cache_of_another_revision_is_ignored_and_replaced(tmp_path):
    cache = tmp_path / "prompts.arrow"
    first, _ = run(cache, Counting(), revision="r0")
    enc, _ = run(cache, counting := Counting(), revision="r1")
    assert enc.cached == 0 and enc.embedded == len(counting.calls) == first.prompts
    with ipc.open_file(str(cache)) as f:
        assert f.schema.metadata[b"revision"] == b"r1"


def test_a_failed_run_leaves_the_cache_alone(tmp_path):
    cache = tmp_path / "prompts.arrow"
    run(cache, Counting())
    before = cache.read_bytes()
    data, meta = world()
    with pytest.raises(RuntimeError), PromptEncoder(Counting(), 4, cache, "clip", "r0") as enc:
        rank(enc, data, meta, cand=(4, 5), block=8)  # new prompts: a new file begun
        raise RuntimeError("interrupted")
    assert cache.read_bytes() == before and list(tmp_path.iterdir()) == [cache]


def test_a_block_is_reused_only_when_all_its_prompts_match(tmp_path):
    cache = tmp_path / "prompts.arrow"
    with PromptEncoder(Counting(), 2, cache, "clip", "r0") as enc:
        enc.embed_block(["a", "b", "c"])
    with PromptEncoder(counting := Counting(), 2, cache, "clip", "r0") as enc:
        emb, where = enc.embed_block(["c", "bb", "a", "c"])  # same size, first and last
    assert sorted(counting.calls) == ["a", "bb", "c"] and enc.cached == 0
    want = fake_encode(["c", "bb", "a", "c"])
    np.testing.assert_allclose(
        emb[where], want / np.linalg.norm(want, axis=1, keepdims=True), rtol=1e-6
    )
