"""Greedy / beam decoding through the faiss token index."""

import pytest
import torch

from pipeline.caption.decode import (
    beam_search,
    caption_images,
    generate,
    greedy_search,
    load_caption_model,
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

    clip, bb, model, paths = _tiny_clip_and_decoder(tmp_path)
    args = ["caption", *map(str, paths), "--model", str(tmp_path / "m"), "--clip", str(clip)]
    args += ["--beam", "2"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    pixels = []
    for p in paths:
        with Image.open(p) as img:
            pixels.append(bb.image_transform()(img))
    ids = generate(model, bb.encode_images(torch.stack(pixels)), beam_size=2)
    texts = [" ".join(bb.tokenizer.decode(i, skip_special_tokens=True).split()) for i in ids]
    assert res.output.splitlines() == [f"{p}\t{t}" for p, t in zip(paths, texts)]
    # without --clip: the CLIP named in the model's config.json
    res = CliRunner().invoke(app, [arg for arg in args if arg not in ("--clip", str(clip))])
    assert res.exit_code == 0, res.output
    assert res.output.splitlines() == [f"{p}\t{t}" for p, t in zip(paths, texts)]
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
