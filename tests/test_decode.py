"""Greedy / beam decoding through the faiss token index."""

import pytest
import torch

from pipeline.caption import decode as decode_module
from pipeline.caption.decode import (
    TokenIndex,
    banned_tokens,
    beam_search,
    caption_images,
    generate,
    greedy_search,
    load_caption_model,
    sample_search,
    token_index,
)
from pipeline.caption.training import Trainer
from pipeline.errors import UserError
from pipeline.nn.caption_decoder import (
    CaptionDecoder,
    DecoderConfig,
    reorder_cache,
    save_caption_model,
)
from pipeline.stages.train_caption import Settings

VOCAB, WIDTH, DIM = 30, 16, 8
BOS, EOS, PAD = 1, 2, 0


def tiny_model(loss: str = "mse", seed: int = 0, **kw) -> CaptionDecoder:
    torch.manual_seed(seed)
    cfg = {
        "image_dim": DIM,
        "vocab_size": VOCAB,
        "token_width": WIDTH,
        "width": 32,
        "layers": 2,
        "heads": 2,
        "prefix_len": 2,
        "max_len": 12,
        "dropout": 0.0,
        "loss": loss,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "domain_token": False,  # decoding, not the token (the same random draws as before it)
        **kw,
    }
    return CaptionDecoder(DecoderConfig(**cfg), torch.randn(VOCAB, WIDTH))


@pytest.mark.parametrize("loss", ["mse", "cosine", "ce"])
def test_index_finds_each_table_row_and_never_proposes_bos_or_pad(loss):
    model = tiny_model(loss)
    index = token_index(model)
    assert index.metric == ("l2" if loss == "mse" else "ip")
    assert token_index(model) is index  # cached
    rows = model.target_table if loss == "mse" else model.unit_table * 3.0
    _, ids = index.search(rows, 1)
    expected = list(range(VOCAB))
    expected[BOS] = ids[BOS, 0].item()  # BOS is not in the index: some other token
    expected[PAD] = ids[PAD, 0].item()
    assert ids[:, 0].tolist() == expected
    assert BOS not in ids[:, 0].tolist() and PAD not in ids[:, 0].tolist()
    top = index.search(rows, 5)[0]
    assert torch.all(top[:, :-1] >= top[:, 1:])  # best first


def test_greedy_follows_the_nearest_token_until_eos_and_respects_max_len():
    model = tiny_model().eval()
    img = torch.randn(5, DIM, generator=torch.Generator().manual_seed(3))
    out = greedy_search(model, img, max_len=6)
    assert len(out) == 5
    # replay by hand: at every step the next token is the nearest row to the prediction
    index = token_index(model)
    with torch.no_grad():
        for b, seq in enumerate(out):
            tokens, produced = [BOS], []
            for _ in range(6):
                pred = model(img[b : b + 1], torch.tensor([tokens]))[:, -1]
                tok = index.search(pred, 1)[1][0, 0].item()
                if tok == EOS:
                    break
                produced.append(tok)
                tokens.append(tok)
            assert seq == produced
            assert len(seq) <= 6 and BOS not in seq and EOS not in seq


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_beam_size_one_equals_greedy(loss):
    model = tiny_model(loss, seed=1).eval()
    img = torch.randn(16, DIM, generator=torch.Generator().manual_seed(4))
    greedy = generate(model, img, beam_size=1, max_len=10)
    assert beam_search(model, img, beam_size=1, max_len=10) == greedy
    assert greedy_search(model, img, max_len=10) == greedy
    assert len({tuple(s) for s in greedy}) > 1  # not one repeated caption


def _repeats(seq: list[int], n: int) -> bool:
    grams = [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]
    return len(set(grams)) < len(grams)


def test_banned_tokens_are_those_that_complete_an_ngram_already_there():
    assert banned_tokens([5, 6, 7, 5, 6], 3) == {7}
    assert banned_tokens([5, 6, 7, 5, 6, 9, 5, 6], 3) == {7, 9}
    assert banned_tokens([5, 6, 7, 5, 6], 2) == {7}  # after 6: "6 7" is there
    assert banned_tokens([5, 6, 7], 1) == {5, 6, 7}
    assert banned_tokens([5, 6, 7, 5, 6], 0) == set()  # 0: the rule is off
    assert banned_tokens([5], 3) == set() and banned_tokens([], 2) == set()


@pytest.mark.parametrize("beam", [1, 3])
def test_no_repeat_ngram_stops_a_looping_decoder(beam):
    """A random tiny decoder loops ("11 8 11 8 ..."); with no_repeat_ngram_size 3 no
    caption repeats a 3-gram, and captions the rule never touches stay the same."""
    model = tiny_model(seed=0, max_len=24).eval()
    img = torch.randn(8, DIM, generator=torch.Generator().manual_seed(0))
    off = generate(model, img, beam_size=beam, max_len=23)
    on = generate(model, img, beam_size=beam, max_len=23, no_repeat_ngram_size=3)
    assert all(_repeats(seq, 3) for seq in off)  # the model's own looping
    assert not any(_repeats(seq, 3) for seq in on)
    assert all(seq and EOS not in seq and BOS not in seq for seq in on)
    assert generate(model, img, beam_size=beam, max_len=23, no_repeat_ngram_size=24) == off
    calm = tiny_model(seed=2, max_len=24).eval()  # writes 6 tokens, no repeated 3-gram
    assert not any(_repeats(seq, 3) for seq in generate(calm, img, beam_size=beam, max_len=23))
    assert generate(calm, img, beam_size=beam, max_len=23, no_repeat_ngram_size=3) == generate(
        calm, img, beam_size=beam, max_len=23
    )


def test_greedy_with_the_rule_takes_the_nearest_token_not_banned():
    model = tiny_model(seed=0, max_len=24).eval()
    img = torch.randn(4, DIM, generator=torch.Generator().manual_seed(1))
    out = greedy_search(model, img, max_len=20, no_repeat_ngram_size=2)
    index = token_index(model)
    with torch.no_grad():  # replay: every candidate in order, the first that repeats no 2-gram
        for b, seq in enumerate(out):
            tokens: list[int] = []
            for _ in range(20):
                pred = model(img[b : b + 1], torch.tensor([[BOS, *tokens]]))[:, -1]
                ranked = index.search(pred, index.size)[1][0].tolist()
                tok = next(t for t in ranked if not _repeats([*tokens, t], 2))
                if tok == EOS:
                    break
                tokens.append(tok)
            assert seq == tokens
    assert beam_search(model, img, beam_size=1, max_len=20, no_repeat_ngram_size=2) == out


def _sequence_score(model: CaptionDecoder, emb: torch.Tensor, seq: list[int], steps: int):
    """(summed log-score, length) of `seq` as beam search scores it (module doc): each
    step's log_softmax(sims / T) over the 32 nearest tokens, EOS counted where it ended."""
    index, temp = token_index(model), model.config.ce_temperature
    tokens = seq + ([EOS] if len(seq) < steps else [])
    total = 0.0
    with torch.no_grad():
        for t, tok in enumerate(tokens):
            pred = model(emb[None], torch.tensor([[BOS, *tokens[:t]]]))[:, -1]
            sims, ids = index.search(pred, min(32, index.size))
            logp = torch.log_softmax(sims[0].double() / temp, dim=-1)
            total += float(logp[ids[0].tolist().index(tok)])
    return total, len(tokens)


def test_length_penalty_ranks_finished_captions_by_score_over_length_power():
    model = tiny_model("ce", seed=6, max_len=16).eval()
    img = 10 * torch.randn(16, DIM, generator=torch.Generator().manual_seed(6))
    penalties = (0.0, 1.0, 3.0)
    outs = {lp: beam_search(model, img, beam_size=4, max_len=15, length_penalty=lp)
            for lp in penalties}  # fmt: skip
    lengths = {lp: [len(s) for s in out] for lp, out in outs.items()}
    # the finished set does not depend on the penalty: a larger one never picks a shorter
    # caption, and here it picks longer ones
    assert all(a <= b <= c for a, b, c in zip(*lengths.values()))
    assert sum(lengths[0.0]) < sum(lengths[1.0]) < sum(lengths[3.0])
    for b in range(len(img)):  # each pick is the best of all picks by its own ranking
        scored = {lp: _sequence_score(model, img[b], outs[lp][b], 15) for lp in penalties}
        for lp in penalties:
            own = scored[lp][0] / scored[lp][1] ** lp
            assert all(own >= s / n**lp - 1e-6 for s, n in scored.values()), (b, lp)


def _memorising_model(loss: str):
    """A tiny decoder trained until it reproduces 3 captions of 3 images exactly."""
    model = tiny_model(loss, seed=2)
    trainer = Trainer(model, Settings(lr=3e-3, warmup_steps=0, grad_clip=0), torch.device("cpu"))
    img = torch.nn.functional.normalize(
        torch.randn(3, DIM, generator=torch.Generator().manual_seed(5)), dim=-1
    )
    caps = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 5]]
    ids = torch.full((3, 7), PAD)
    for i, c in enumerate(caps):
        ids[i, : len(c) + 2] = torch.tensor([BOS, *c, EOS])
    lengths = torch.tensor([len(c) + 2 for c in caps])
    for _ in range(150):
        trainer.step(img, ids, lengths, None, 0.0)
    return model.eval(), img, caps


@pytest.mark.parametrize("loss", ["mse", "cosine", "ce"])
def test_trained_decoder_reproduces_its_captions_greedy_and_beam(loss):
    model, img, caps = _memorising_model(loss)
    assert generate(model, img, beam_size=1) == caps
    assert generate(model, img, beam_size=3) == caps


def test_save_load_round_trip_gives_identical_captions(tmp_path):
    model = tiny_model("mse", seed=7).eval()
    img = torch.randn(12, DIM, generator=torch.Generator().manual_seed(8))
    save_caption_model(model, tmp_path / "m")
    back = load_caption_model(tmp_path / "m", device="cpu")
    assert back is not model
    for beam in (1, 3):
        assert generate(back, img, beam_size=beam) == generate(model, img, beam_size=beam)


def test_sampling_is_seeded_and_obeys_the_repetition_rule():
    model = tiny_model(seed=0, max_len=24).eval()
    img = torch.randn(4, DIM, generator=torch.Generator().manual_seed(3))
    a = sample_search(model, img, 5, max_len=23, temperature=3.0, no_repeat_ngram_size=3, seed=1)
    assert [len(per) for per in a] == [5, 5, 5, 5]
    assert a == sample_search(model, img, 5, max_len=23, temperature=3.0,
                              no_repeat_ngram_size=3, seed=1)  # fmt: skip
    assert a != sample_search(model, img, 5, max_len=23, temperature=3.0,
                              no_repeat_ngram_size=3, seed=2)  # fmt: skip
    assert len({tuple(seq) for per in a for seq in per}) > 4  # they differ
    assert not any(_repeats(seq, 3) for per in a for seq in per)
    assert all(EOS not in seq and BOS not in seq for per in a for seq in per)


@pytest.mark.parametrize("loss", ["mse", "ce"])
def test_a_trained_decoder_samples_and_mbr_give_its_captions(loss):
    model, img, caps = _memorising_model(loss)
    got = sample_search(model, img, 4, temperature=0.1, seed=0)
    assert got == [[c] * 4 for c in caps]
    assert generate(model, img, beam_size=3, mbr_samples=4) == caps


def test_mbr_chooses_among_the_samples_and_the_beam_caption():
    model = tiny_model(seed=0, max_len=24).eval()
    img = torch.randn(6, DIM, generator=torch.Generator().manual_seed(4))
    beam = generate(model, img, beam_size=2, max_len=10, no_repeat_ngram_size=3)
    drawn = sample_search(model, img, 3, max_len=10, temperature=2.0, no_repeat_ngram_size=3,
                          seed=7)  # fmt: skip
    got = generate(model, img, beam_size=2, max_len=10, no_repeat_ngram_size=3, mbr_samples=3,
                   mbr_temperature=2.0, seed=7)  # fmt: skip
    assert all(g in [*d, b] for g, d, b in zip(got, drawn, beam))
    assert got != beam  # some image chose a sample
    # an image's samples are its own: the same in any batch, at any position
    late = sample_search(model, img[3:], 3, max_len=10, temperature=2.0,
                         no_repeat_ngram_size=3, seed=7, first_row=3)  # fmt: skip
    assert late == drawn[3:]
    for batch in (1, 4):
        assert generate(model, img, beam_size=2, max_len=10, no_repeat_ngram_size=3,
                        mbr_samples=3, mbr_temperature=2.0, seed=7, batch_size=batch) == got  # fmt: skip
    with pytest.raises(ValueError):
        generate(model, img, mbr_samples=-1)


def test_generate_batches_and_rejects_bad_beam():
    model = tiny_model().eval()
    img = torch.randn(7, DIM, generator=torch.Generator().manual_seed(9))
    assert generate(model, img, beam_size=2, batch_size=3) == generate(model, img, beam_size=2)
    assert generate(model, img[:0]) == []
    with pytest.raises(ValueError):
        generate(model, img, beam_size=0)


def _tiny_clip_and_decoder(tmp_path):
    """A tiny CLIP, a random decoder on its token table (saved with the CLIP's name), and
    two images."""
    from PIL import Image
    from tiny_clip import make_tiny_clip

    from pipeline.clip.backbone import load_backbone

    clip = make_tiny_clip(tmp_path / "clip")
    bb = load_backbone(clip, device="cpu")
    table = bb.token_embedding()
    cfg = DecoderConfig(
        image_dim=bb.dim,
        vocab_size=table.shape[0],
        token_width=table.shape[1],
        width=32,
        layers=1,
        heads=2,
        prefix_len=2,
        max_len=8,
        bos_token_id=bb.bos_token_id,
        eos_token_id=bb.eos_token_id,
        pad_token_id=bb.pad_token_id,
    )
    torch.manual_seed(0)
    model = CaptionDecoder(cfg, table).eval()
    info = {"clip": {"model": str(clip), "revision": bb.revision}}
    save_caption_model(model, tmp_path / "m", extra=info)
    paths = []
    for name, colour in (("red.png", (220, 30, 30)), ("blue.jpg", (30, 70, 220))):
        Image.new("RGB", (48, 40), colour).save(tmp_path / name)
        paths.append(tmp_path / name)
    return clip, bb, model, paths


def test_cli_caption_prints_one_decoded_caption_per_image(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.stages.evaluate_caption import Settings as Decoding

    clip, bb, model, paths = _tiny_clip_and_decoder(tmp_path)
    args = ["caption", *map(str, paths), "--model", str(tmp_path / "m"), "--clip", str(clip)]
    args += ["--beam", "2"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    pixels = []
    for p in paths:
        with Image.open(p) as img:
            pixels.append(bb.image_transform()(img))
    emb = bb.encode_images(torch.stack(pixels))

    def texts(**decoding) -> list[str]:
        ids = generate(model, emb, **decoding)
        return [" ".join(bb.tokenizer.decode(i, skip_special_tokens=True).split()) for i in ids]

    # evaluate_caption's defaults for what is not given
    d = Decoding()
    mbr = {"mbr_samples": d.mbr_samples, "mbr_temperature": d.mbr_temperature}
    want = texts(beam_size=2, max_len=d.max_len, no_repeat_ngram_size=d.no_repeat_ngram_size,
                 length_penalty=d.length_penalty, **mbr)  # fmt: skip
    assert res.output.splitlines() == [f"{p}\t{t}" for p, t in zip(paths, want)]
    given = ["--no-repeat-ngram", "1", "--length-penalty", "2.5", "--beam", "3"]
    res = CliRunner().invoke(app, [*args, *given])
    assert res.exit_code == 0, res.output
    other = texts(beam_size=3, max_len=d.max_len, no_repeat_ngram_size=1, length_penalty=2.5,
                  **mbr)  # fmt: skip
    assert res.output.splitlines() == [f"{p}\t{t}" for p, t in zip(paths, other)]
    given = ["--mbr-samples", "3", "--mbr-temperature", "2", "--seed", "5"]
    res = CliRunner().invoke(app, [*args, *given])
    assert res.exit_code == 0, res.output
    drawn = texts(beam_size=2, max_len=d.max_len, no_repeat_ngram_size=d.no_repeat_ngram_size,
                  length_penalty=d.length_penalty, mbr_samples=3, mbr_temperature=2.0, seed=5)  # fmt: skip
    assert res.output.splitlines() == [f"{p}\t{t}" for p, t in zip(paths, drawn)]
    bad = CliRunner().invoke(app, [*args, "--mbr-samples", "-1"])
    assert bad.exit_code == 2 and bad.output.startswith("error: mbr_samples must be >= 0")
    assert all(len(set(t.split())) == len(t.split()) for t in other)  # no word twice
    bad = CliRunner().invoke(app, [*args, "--no-repeat-ngram", "-1"])
    assert bad.exit_code == 2 and bad.output == "error: no_repeat_ngram_size must be >= 0, got -1\n"
    res = CliRunner().invoke(app, [*args, "--device", "cpu"])  # a device: the same captions
    assert res.exit_code == 0 and res.output.splitlines() == [
        f"{p}\t{t}" for p, t in zip(paths, want)
    ]
    if not torch.cuda.is_available():
        bad = CliRunner().invoke(app, [*args, "--device", "cuda:1"])
        assert bad.exit_code == 2 and bad.output.startswith("error: device 'cuda:1' asked for")
    # without --clip: the CLIP named in the model's config.json
    res = CliRunner().invoke(app, [arg for arg in args if arg not in ("--clip", str(clip))])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == [f"{p}\t{t}" for p, t in zip(paths, want)]
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    bad = CliRunner().invoke(app, [*args[:1], str(tmp_path / "bad.jpg"), *args[3:]])
    assert bad.exit_code == 2 and bad.output.startswith("error: cannot use image")


def test_caption_images_rejects_bad_beam_and_max_len(tmp_path):
    clip, _, _, paths = _tiny_clip_and_decoder(tmp_path)
    with pytest.raises(UserError, match="beam must be >= 1"):
        list(caption_images(paths, tmp_path / "m", str(clip), beam=0))
    with pytest.raises(UserError, match="max_len must be >= 1"):
        list(caption_images(paths, tmp_path / "m", str(clip), max_len=0))
    greedy = list(caption_images(paths, tmp_path / "m", None, beam=1, max_len=3))
    assert [p for p, _ in greedy] == paths and all(len(t.split()) <= 3 for _, t in greedy)


def _reference_greedy(model: CaptionDecoder, image_emb: torch.Tensor, steps: int) -> list:
    """Greedy decoding without a cache: the whole sequence re-run at every step."""
    from pipeline.caption.decode import token_index

    index, out = token_index(model), []
    for e in image_emb:
        prefix, seq = model.prefix(e[None]), [BOS]
        for _ in range(steps):
            tok = int(index.search(model.decode(prefix, torch.tensor([seq]))[:, -1], 1)[1][0, 0])
            if tok == EOS:
                break
            seq.append(tok)
        out.append(seq[1:])
    return out


@torch.no_grad()
def test_key_value_cache_gives_the_full_recompute_predictions():
    model = tiny_model(seed=3).eval()
    torch.manual_seed(0)
    emb = torch.randn(4, DIM)
    tokens = torch.randint(3, VOCAB, (4, 7))
    prefix = model.prefix(emb)
    pred, cache = model.decode_step(prefix, tokens[:, :1], None)
    torch.testing.assert_close(pred, model.decode(prefix, tokens[:, :1])[:, -1])
    for t in range(1, 7):
        keep = torch.tensor([3, 1, 0, 2])  # hypotheses reordered between steps
        tokens, prefix = tokens[keep], prefix[keep]
        cache = reorder_cache(cache, keep)
        pred, cache = model.decode_step(None, tokens[:, t : t + 1], cache)
        torch.testing.assert_close(pred, model.decode(prefix, tokens[:, : t + 1])[:, -1])
    assert cache[0][0].shape[2] == model.config.prefix_len + 7
    # greedy with the cache = greedy re-running the sequence
    assert greedy_search(model, emb, 8) == _reference_greedy(model, emb, 8)


def _fake_faiss_gpus(monkeypatch, count: int) -> list[int]:
    """faiss with GPU support and `count` GPUs, on this CPU-only machine: index_cpu_to_gpu
    records the GPU number it is given and keeps the (CPU) index."""
    import faiss

    calls: list[int] = []

    def to_gpu(res, gpu, index):
        assert isinstance(res, faiss.StandardGpuResources)
        calls.append(gpu)
        return index

    monkeypatch.setattr(faiss, "StandardGpuResources", type("Res", (), {}), raising=False)
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: count)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    monkeypatch.setattr(decode_module, "_WARNED", set())
    return calls


@pytest.mark.parametrize("device,gpu", [("cuda:1", 1), ("cuda:0", 0), ("cuda", 2)])
def test_the_token_index_goes_to_the_decoders_gpu(monkeypatch, capsys, device, gpu):
    calls = _fake_faiss_gpus(monkeypatch, count=3)
    monkeypatch.setattr(decode_module, "_device", lambda model: torch.device(device))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)  # `cuda`: the current one
    model = tiny_model("ce")
    index = TokenIndex(model)
    assert calls == [gpu] and index.gpu == gpu
    _, ids = index.search(model.unit_table, 1)  # (the fake keeps the CPU index)
    assert ids[EOS, 0].item() == EOS
    assert capsys.readouterr().err == ""


def test_a_cpu_decoder_keeps_a_cpu_index_on_a_gpu_box(monkeypatch, capsys):
    calls = _fake_faiss_gpus(monkeypatch, count=2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert TokenIndex(tiny_model()).gpu is None and calls == []  # --device cpu is kept
    assert capsys.readouterr().err == ""


def test_a_gpu_faiss_cannot_use_is_one_warning_not_silence(monkeypatch, capsys):
    import faiss

    monkeypatch.setattr(decode_module, "_device", lambda model: torch.device("cuda:0"))
    monkeypatch.setattr(decode_module, "_WARNED", set())
    if hasattr(faiss, "StandardGpuResources"):  # a faiss-gpu install: make it faiss-cpu
        monkeypatch.delattr(faiss, "StandardGpuResources")
    for seed in (0, 1):  # two models: one warning
        index = TokenIndex(tiny_model(seed=seed))
        queries = torch.randn(3, WIDTH, generator=torch.Generator().manual_seed(seed))
        assert index.gpu is None and index.search(queries, 1)[1].shape == (3, 1)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("warning: faiss has no GPU support"), err
    calls = _fake_faiss_gpus(monkeypatch, count=1)  # faiss-gpu, but cuda:1 is not its
    monkeypatch.setattr(decode_module, "_device", lambda model: torch.device("cuda:1"))
    assert TokenIndex(tiny_model()).gpu is None and calls == []
    assert "faiss sees 1 GPU(s), not cuda:1" in capsys.readouterr().err
