"""Caption decoding: greedy and beam search over the frozen token-embedding table.

The decoder predicts the *embedding* of the next token; each prediction is mapped to
tokens by nearest-neighbour search (faiss, batched queries) over the table rows in the
space the training loss measured: L2 to the regression targets for `mse`
(`IndexFlatL2`), inner product of unit vectors (cosine) for `cosine` / `ce`
(`IndexFlatIP`). BOS (and a pad id distinct from EOS) are never proposed. The index lives
where the decoder does: on the decoder's GPU (`cuda:N` -> faiss GPU N) when faiss has GPU
support (faiss-gpu, see docs/gpu.md), else on the CPU, with a one-line warning on stderr
when the decoder is on a GPU that faiss cannot use (the captions are the same either way,
only the search is slower, so a default install, faiss-cpu, still decodes on a GPU box).

Beam scores: for each hypothesis the top `n_cand` neighbours get similarities s_j
(cosine, or -||pred - row||² / 2 for L2, which equals the inner product up to terms
constant across candidates when rows have equal norms); the step's log-score is
log_softmax(s / T) over those candidates. A softmax (rather than raw negative distances)
makes the per-step scores comparable log-probabilities: a step where one token is far
closer than the rest costs almost nothing, an ambiguous step costs ~log(#close tokens),
and the tail beyond `n_cand` neighbours carries negligible mass at the small T used
(T = ce_temperature, i.e. the temperature of the `ce` loss; times target_scale² for L2).
Finished hypotheses are ranked by total score / length**length_penalty (length in tokens,
EOS counted, as Hugging Face `generate`): 0 ranks by the summed log-scores (short
captions win), 1 by the mean per token, above 1 favours longer ones still; it changes
only which finished hypothesis is returned, never the search itself. With beam size 1 the
search reduces to greedy decoding (where length_penalty has no effect).

Repetition (`no_repeat_ngram_size` n, as Hugging Face `generate`): a token that would
complete an n-gram already in the hypothesis is never proposed (its score is -inf); 0
turns the rule off. The search takes as many extra neighbours as the hypothesis has
banned tokens, so a banned one is skipped, never left as a hole: greedy takes the
nearest token not banned; beam search the best 2 * beam not banned, their log-scores
normalised over the `n_cand` nearest as without the rule (so hypotheses the rule does
not touch score exactly as without it).

`caption_embeddings` turns image embeddings into caption texts (evaluate_caption);
`caption_images` captions image files end to end (`clipda caption`).
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from pipeline.errors import UserError
from pipeline.nn.caption_decoder import TARGET, CaptionDecoder, read_model_info, reorder_cache
from pipeline.nn.caption_decoder import load_caption_model as _load
from pipeline.training import autocast, pick_device

_INDEX_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_WARNED: set[str] = set()  # faiss GPU warnings already printed (once per process)


def faiss_gpu(device: torch.device) -> int | None:
    """The faiss GPU number for a decoder on `device` (`cuda:N` -> N, `cuda` -> the current
    CUDA device), or None for a CPU index: the decoder is on the CPU, or faiss cannot use
    its GPU (then a one-line warning on stderr, once)."""
    if device.type != "cuda":
        return None
    gpu = device.index if device.index is not None else torch.cuda.current_device()
    if not hasattr(faiss, "StandardGpuResources"):
        why = "faiss has no GPU support (faiss-cpu is installed; docs/gpu.md: faiss-gpu)"
    elif gpu >= (count := faiss.get_num_gpus()):
        why = f"faiss sees {count} GPU(s), not cuda:{gpu}"
    else:
        return gpu
    if why not in _WARNED:
        _WARNED.add(why)
        print(f"warning: {why}: the token search runs on the CPU", file=sys.stderr)
    return None


class TokenIndex:
    """faiss nearest-neighbour index over a model's token table (search space as trained)."""

    def __init__(self, model: CaptionDecoder):
        cfg = model.config
        self.metric = model.search_space
        table = model.target_table if self.metric == "l2" else model.unit_table
        banned = {cfg.bos_token_id}
        if cfg.pad_token_id != cfg.eos_token_id:
            banned.add(cfg.pad_token_id)
        self.ids = np.array([i for i in range(len(table)) if i not in banned], dtype=np.int64)
        vecs = np.ascontiguousarray(table.detach().float().cpu().numpy()[self.ids])
        dim = vecs.shape[1]
        index = faiss.IndexFlatL2(dim) if self.metric == "l2" else faiss.IndexFlatIP(dim)
        self.gpu = faiss_gpu(_device(model))  # the decoder's GPU, None: a CPU index
        if self.gpu is not None:
            self._res = faiss.StandardGpuResources()  # lives as long as the index
            index = faiss.index_cpu_to_gpu(self._res, self.gpu, index)
        index.add(vecs)
        self.index = index
        self.size = len(self.ids)  # tokens it can propose

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k (similarity, token id) per query, best first; similarity is the cosine
        ('ip') or -squared L2 / 2 ('l2')."""
        q = queries.detach().float()
        if self.metric == "ip":
            q = F.normalize(q, dim=-1)
        dist, idx = self.index.search(np.ascontiguousarray(q.cpu().numpy()), k)
        sims = torch.from_numpy(dist if self.metric == "ip" else -0.5 * dist)
        return sims, torch.from_numpy(self.ids[idx])


def token_index(model: CaptionDecoder) -> TokenIndex:
    """The model's cached `TokenIndex` (the table is frozen, so it never goes stale)."""
    index = _INDEX_CACHE.get(model)
    if index is None:
        index = _INDEX_CACHE[model] = TokenIndex(model)
    return index


def _device(model: CaptionDecoder) -> torch.device:
    return model.token_table.device


def _max_steps(model: CaptionDecoder, max_len: int) -> int:
    return max(1, min(int(max_len), model.config.max_len - 1))


def banned_tokens(seq: Sequence[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already in `seq` (none when n <= 0)."""
    if n <= 0 or len(seq) < n - 1:
        return set()
    tail = tuple(seq[len(seq) - n + 1 :])
    return {seq[i + n - 1] for i in range(len(seq) - n + 1) if tuple(seq[i : i + n - 1]) == tail}


def _advance(out: list[list[int]], alive: torch.Tensor, nxt: torch.Tensor, eos: int, cache):
    """Append each alive row's next token (not EOS) to `out`; the rows still going, their
    last tokens and their cache rows (the cache unchanged once every row has ended)."""
    for row, tok in zip(alive.tolist(), nxt.tolist()):
        if tok != eos:
            out[row].append(tok)
    keep = nxt != eos
    if not keep.any():
        return alive[keep], nxt[keep][:, None], cache
    return alive[keep], nxt[keep][:, None], reorder_cache(cache, keep.nonzero().squeeze(1))


@torch.no_grad()
def greedy_search(
    model: CaptionDecoder,
    image_emb: torch.Tensor,
    max_len: int = 30,
    no_repeat_ngram_size: int = 0,
    domain: int = TARGET,
) -> list[list[int]]:
    """Nearest token (not banned by `no_repeat_ngram_size`) at every step until EOS or
    `max_len` tokens (`domain`: the domain token read, where the model has one)."""
    cfg, index, dev = model.config, token_index(model), _device(model)
    bos, eos = cfg.bos_token_id, cfg.eos_token_id
    n = len(image_emb)
    out: list[list[int]] = [[] for _ in range(n)]
    with autocast(dev):
        prefix = model.context(image_emb.to(dev), domain)
        last = torch.full((n, 1), bos, dtype=torch.long, device=dev)
        alive = torch.arange(n, device=dev)
        cache = None
        for _ in range(_max_steps(model, max_len)):
            pred, cache = model.decode_step(prefix if cache is None else None, last, cache)
            bans = [banned_tokens(out[row], no_repeat_ngram_size) for row in alive.tolist()]
            ids = index.search(pred, min(1 + max(map(len, bans)), index.size))[1].tolist()
            nxt = torch.tensor(  # EOS is never banned: some candidate is always left
                [next(t for t in row if t not in ban) for row, ban in zip(ids, bans)], device=dev
            )
            alive, last, cache = _advance(out, alive, nxt, eos, cache)
            if len(alive) == 0:
                break
    return out


@torch.no_grad()
def beam_search(
    model: CaptionDecoder,
    image_emb: torch.Tensor,
    beam_size: int = 3,
    max_len: int = 30,
    temperature: float | None = None,
    length_penalty: float = 1.0,
    n_cand: int = 32,
    no_repeat_ngram_size: int = 0,
    domain: int = TARGET,
) -> list[list[int]]:
    """Beam search with softmax-over-neighbours step scores, `length_penalty` and
    `no_repeat_ngram_size` (see module doc)."""
    cfg, index, dev = model.config, token_index(model), _device(model)
    bos, eos, k = cfg.bos_token_id, cfg.eos_token_id, int(beam_size)
    if temperature is None:
        temperature = cfg.ce_temperature
        if model.search_space == "l2":
            temperature *= float(cfg.target_scale) ** 2
    n_cand = min(max(n_cand, 2 * k), index.size)
    n = len(image_emb)
    beams: list[list[tuple[list[int], float]]] = [[([], 0.0)] for _ in range(n)]
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(n)]
    active = list(range(n))

    def norm(score: float, length: int) -> float:
        return score / max(length, 1) ** length_penalty

    with autocast(dev):
        prefix = model.context(image_emb.to(dev), domain)
        cache, parent = None, {}  # cache rows: the hypotheses of the previous step
        for _ in range(_max_steps(model, max_len)):
            rows = [(b, h) for b in active for h in range(len(beams[b]))]
            if cache is None:
                tokens = torch.full((len(rows), 1), bos, dtype=torch.long, device=dev)
                pref = prefix[torch.tensor([b for b, _ in rows], device=dev)]
                pred, cache = model.decode_step(pref, tokens, None)
            else:
                cache = reorder_cache(cache, torch.tensor([parent[r] for r in rows], device=dev))
                tokens = torch.tensor([[beams[b][h][0][-1]] for b, h in rows], device=dev)
                pred, cache = model.decode_step(None, tokens, cache)
            bans = [banned_tokens(beams[b][h][0], no_repeat_ngram_size) for b, h in rows]
            sims, ids = index.search(pred, min(n_cand + max(map(len, bans)), index.size))
            scaled = sims.double() / temperature
            logp = (scaled - torch.logsumexp(scaled[:, :n_cand], dim=-1, keepdim=True)).tolist()
            ids = ids.tolist()
            by_image: dict[int, list[tuple[float, int, int, int]]] = {b: [] for b in active}
            for r, (b, h) in enumerate(rows):
                base, ban = beams[b][h][1], bans[r]
                allowed = [(j, t) for j, t in enumerate(ids[r]) if t not in ban][: 2 * k]
                by_image[b].extend((base + logp[r][j], h, j, t) for j, t in allowed)
            still, row_of = [], {bh: r for r, bh in enumerate(rows)}
            for b in active:
                cands = sorted(by_image[b], key=lambda c: (-c[0], c[1], c[2]))
                new: list[tuple[list[int], float]] = []
                for rank, (score, h, _, tok) in enumerate(cands):
                    seq = beams[b][h][0]
                    if tok == eos:
                        if rank < k:
                            finished[b].append((norm(score, len(seq) + 1), seq))
                    else:
                        parent[(b, len(new))] = row_of[(b, h)]
                        new.append(([*seq, tok], score))
                    if len(new) == k:
                        break
                beams[b] = new
                if len(finished[b]) < k:
                    still.append(b)
            active = still
            if not active:
                break
    for b in active:
        finished[b].extend((norm(s, len(seq)), seq) for seq, s in beams[b])
    return [max(f, key=lambda c: c[0])[1] for f in finished]


@torch.no_grad()
def sample_search(
    model: CaptionDecoder,
    image_emb: torch.Tensor,
    samples: int,
    max_len: int = 30,
    temperature: float = 1.0,
    n_cand: int = 32,
    no_repeat_ngram_size: int = 0,
    domain: int = TARGET,
    seed: int = 0,
    first_row: int = 0,
) -> list[list[list[int]]]:
    """`samples` captions per image, each token drawn from the softmax over the `n_cand`
    nearest token rows not banned by `no_repeat_ngram_size` (the similarities of beam
    search's step scores, at the model's own temperature times `temperature`; beam search
    normalises over the `n_cand` nearest, banned ones included). Image i's draws come from
    its own stream, seeded by (`seed`, `first_row` + i): an image gets the same samples
    whatever else is in its batch."""
    cfg, index, dev = model.config, token_index(model), _device(model)
    bos, eos = cfg.bos_token_id, cfg.eos_token_id
    t = cfg.ce_temperature * temperature
    if model.search_space == "l2":
        t *= float(cfg.target_scale) ** 2
    steps = _max_steps(model, max_len)
    uniform = torch.from_numpy(np.concatenate([  # (rows, steps): one draw per token
        np.random.default_rng([seed, first_row + i]).random((samples, steps))
        for i in range(len(image_emb))] or [np.zeros((0, steps))]))  # fmt: skip
    m = len(image_emb) * samples
    out: list[list[int]] = [[] for _ in range(m)]
    with autocast(dev):
        prefix = model.context(image_emb.to(dev).repeat_interleave(samples, 0), domain)
        last = torch.full((m, 1), bos, dtype=torch.long, device=dev)
        alive, cache = torch.arange(m, device=dev), None
        for step in range(steps):
            pred, cache = model.decode_step(prefix if cache is None else None, last, cache)
            bans = [banned_tokens(out[row], no_repeat_ngram_size) for row in alive.tolist()]
            sims, ids = index.search(pred, min(n_cand + max(map(len, bans)), index.size))
            ids = ids.cpu()
            allowed = torch.ones(ids.shape, dtype=torch.bool)
            for r, ban in enumerate(bans):  # banned: never drawn
                if ban:
                    allowed[r] = torch.tensor([tok not in ban for tok in ids[r].tolist()])
            allowed &= allowed.cumsum(1) <= n_cand  # the n_cand nearest not banned
            scaled = (sims.double().cpu() / t).masked_fill(~allowed, float("-inf"))
            cdf = torch.softmax(scaled, dim=-1).cumsum(1)
            u = uniform[alive.cpu(), step][:, None] * cdf[:, -1:]  # inverse-CDF draw
            pick = (cdf <= u).sum(1, keepdim=True).clamp(max=ids.shape[1] - 1)
            nxt = ids.gather(1, pick).squeeze(1).to(dev)
            alive, last, cache = _advance(out, alive, nxt, eos, cache)
            if len(alive) == 0:
                break
    return [out[i * samples : (i + 1) * samples] for i in range(len(image_emb))]


def generate(
    model: CaptionDecoder,
    image_emb: torch.Tensor,
    beam_size: int = 1,
    max_len: int = 30,
    batch_size: int = 256,
    no_repeat_ngram_size: int = 0,
    length_penalty: float = 1.0,
    domain: int = TARGET,
    mbr_samples: int = 0,
    mbr_temperature: float = 1.0,
    seed: int = 0,
    first_row: int = 0,
) -> list[list[int]]:
    """Token ids (no BOS/EOS) of one caption per image embedding (n, d), decoded with the
    `domain` token (TARGET, Flickr30k's: what the model was fine-tuned to write; a model
    without domain tokens ignores it). With `mbr_samples` > 0, the caption is chosen by
    minimum Bayes risk (`pipeline.caption.mbr`) among the beam (or greedy) caption and
    that many sampled captions (`sample_search` at `mbr_temperature`; image i of
    `image_emb` seeded by (`seed`, `first_row` + i), so batches do not matter)."""
    from pipeline.caption.mbr import consensus_index

    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    if no_repeat_ngram_size < 0:
        raise ValueError(f"no_repeat_ngram_size must be >= 0, got {no_repeat_ngram_size}")
    if mbr_samples < 0 or mbr_temperature <= 0:
        raise ValueError(f"mbr_samples must be >= 0 and mbr_temperature > 0, got "
                         f"{mbr_samples} and {mbr_temperature}")  # fmt: skip
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    try:
        for start in range(0, len(image_emb), batch_size):
            chunk = image_emb[start : start + batch_size].float()
            if beam_size == 1:
                best = greedy_search(model, chunk, max_len, no_repeat_ngram_size, domain)
            else:
                best = beam_search(model, chunk, beam_size, max_len,
                                   length_penalty=length_penalty,
                                   no_repeat_ngram_size=no_repeat_ngram_size, domain=domain)  # fmt: skip
            if mbr_samples:
                drawn = sample_search(model, chunk, mbr_samples, max_len, mbr_temperature,
                                      no_repeat_ngram_size=no_repeat_ngram_size, domain=domain,
                                      seed=seed, first_row=first_row + start)  # fmt: skip
                pools = [[b, *d] for d, b in zip(drawn, best)]  # a tie keeps the beam's
                best = [pool[consensus_index(pool)] for pool in pools]
            out.extend(best)
    finally:
        model.train(was_training)
    return out


def load_caption_model(folder: str | Path, device: str | None = None) -> CaptionDecoder:
    """Load a caption model folder on `device` (default: CUDA when available)."""
    return _load(folder, pick_device(device or "auto"))


def ids_to_text(tokenizer, ids: Sequence[int]) -> str:
    """Decode generated ids: drop a leading BOS, cut at the first EOS, skip special tokens."""
    ids = [int(i) for i in ids]
    if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id:
        ids = ids[1:]
    eos = tokenizer.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return " ".join(tokenizer.decode(ids, skip_special_tokens=True).split())


def caption_embeddings(
    model: CaptionDecoder,
    image_emb: torch.Tensor,
    tokenizer,
    beam_size: int,
    max_len: int,
    batch_size: int = 256,
    label: str = "",
    no_repeat_ngram_size: int = 0,
    length_penalty: float = 1.0,
    domain: int = TARGET,
    mbr_samples: int = 0,
    mbr_temperature: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """One caption (text) per row of `image_emb`, decoded `batch_size` rows at a time
    (`generate`'s settings)."""
    from tqdm import tqdm

    texts: list[str] = []
    starts = range(0, len(image_emb), batch_size)
    for start in tqdm(starts, desc=f"caption {label}".strip(), disable=not sys.stderr.isatty()):
        out = generate(model, image_emb[start : start + batch_size], beam_size, max_len,
                       no_repeat_ngram_size=no_repeat_ngram_size,
                       length_penalty=length_penalty, domain=domain, mbr_samples=mbr_samples,
                       mbr_temperature=mbr_temperature, seed=seed, first_row=start)  # fmt: skip
        texts.extend(ids_to_text(tokenizer, ids) for ids in out)
    return texts


def caption_images(
    images: Sequence[str | Path],
    model: str | Path,
    clip: str | None = None,
    beam: int = 3,
    max_len: int = 30,
    no_repeat_ngram_size: int = 0,
    length_penalty: float = 1.0,
    device: str = "auto",
    domain: int = TARGET,
    mbr_samples: int = 0,
    mbr_temperature: float = 1.0,
    seed: int = 0,
) -> Iterator[tuple[str | Path, str]]:
    """(path, caption) for each image file: CLIP `clip` embeds it (decoded as `embed`
    decodes images), the decoder in folder `model` captions it (`generate`'s settings),
    both on `device`, with the `domain` token (a `UserError` for SOURCE where the model
    has none).

    `clip` None: the CLIP recorded in the model's config.json. A CLIP whose embedding size
    differs from the model's is a `UserError`; one with another revision than the model
    was trained on, a warning on stderr. Every image is embedded before the first caption
    is yielded, so an unreadable image fails before any output.
    """
    from pipeline.clip.backbone import embed_image, load_backbone

    if beam < 1:
        raise UserError(f"beam must be >= 1, got {beam}")
    if max_len < 1:
        raise UserError(f"max_len must be >= 1, got {max_len}")
    if no_repeat_ngram_size < 0:
        raise UserError(f"no_repeat_ngram_size must be >= 0, got {no_repeat_ngram_size}")
    if mbr_samples < 0 or mbr_temperature <= 0:
        raise UserError(f"mbr_samples must be >= 0 and mbr_temperature > 0, got "
                        f"{mbr_samples} and {mbr_temperature}")  # fmt: skip
    decoder = load_caption_model(model, device)
    if domain != TARGET and not decoder.config.domain_token:
        raise UserError(f"--domain source: {model} has no domain token (train it with "
                        "train_caption.model.domain_token: true)")  # fmt: skip
    trained_on = read_model_info(model).get("clip") or {}
    if clip is None:
        clip = trained_on.get("model")
        if not clip:
            raise UserError(f"{model}/config.json names no CLIP: pass one with --clip")
    bb = load_backbone(clip, device)
    want = decoder.config.image_dim
    if bb.dim != want:
        raise UserError(f"{clip} gives {bb.dim}-d embeddings, {model} expects {want}")
    if trained_on.get("revision") not in (None, bb.revision):
        was = f"{trained_on.get('model')} ({trained_on.get('revision')})"
        print(f"warning: {model} was trained on {was}, not {bb.revision}", file=sys.stderr)
    emb = torch.cat([embed_image(bb, path) for path in images])
    texts = caption_embeddings(decoder, emb, bb.tokenizer, beam, max_len,
                               no_repeat_ngram_size=no_repeat_ngram_size,
                               length_penalty=length_penalty, domain=domain,
                               mbr_samples=mbr_samples, mbr_temperature=mbr_temperature,
                               seed=seed)  # fmt: skip
    yield from zip(images, texts)
