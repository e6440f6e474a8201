"""A LAION-style Hugging Face CLIP folder (as laion/CLIP-ViT-B-32-laion2B-s34B-b79K ships beside
its open_clip weights) through every user-facing path: load, embed, the decoder's token table,
train-caption + caption, evaluate-vqa's zero-shot ranking and ask.

What makes LAION's folders differ from the project's own tiny CLIPs (tests/tiny_clip.py):
- GELU (`hidden_act: gelu`) in both towers, not QuickGELU;
- OpenAI's byte-level BPE tokenizer (CLIPTokenizer, `</w>` word ends) whose two highest ids are
  `<|startoftext|>` and `<|endoftext|>`, with pad `<|endoftext|>` (some repos: `!`, id 0);
- the legacy text_config ids `bos 0, pad 1, eos 2`, which are not the tokenizer's: with
  `eos_token_id == 2` transformers pools the text at `input_ids.argmax(-1)`, the EOS only
  because EOS is the last id.
`make_laion_clip` builds such a folder offline at tiny sizes: a hand-made byte-level BPE (every
word of `WORDS` merged into one token) and a random gelu CLIP.
"""

from __future__ import annotations

import io
import itertools
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_embed import make_flickr
from test_vqa import generic_rows, write_csv, write_images
from tiny_clip import WORDS
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.clip.backbone import embed_image, load_backbone, weights_sha256
from pipeline.clip.token_table import clip_token_table, table_sha256
from pipeline.embedding.files import read_dataset, read_table, vectors
from pipeline.metrics.layout import read_rows

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
LEGACY_IDS = {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2}  # LAION's config.json
EMBED_PARAMS = (
    "seed: 0\nembed:\n  num_workers: 0\n  vg_crops: false\n  shard_size: 8\n"
    "split:\n  val_fraction: 0.25\n  test_fraction: 0.25\n"
)
# a hub open_clip_config.json (model_cfg + preprocess_cfg) of the tiny model: as LAION's,
# plus the head width (open_clip's default 64 is wider than the tiny towers)
OPEN_CLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8,
                       "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 643, "width": 32, "heads": 2,
                     "layers": 2},
    },
    "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                       "std": [0.26862954, 0.26130258, 0.27577711]},
}  # fmt: skip
TINY_CAPTION = {  # as tests/test_caption_model.py's TINY
    "model": {"width": 16, "layers": 1, "heads": 2, "prefix_len": 2, "max_len": 10},
    "batch_size": 8,
    "domain_batch": 4,
    "pretrain_epochs": 1,
    "adapt_epochs": 1,
    "finetune_epochs": 1,
    "warmup_steps": 2,
    "disc_hidden": 8,
    "laion_val_images": 4,
}


# --------------------------------------------------------------------------- the folder


def invoke(*args):
    """`clipda ARGS...` in-process."""
    return CliRunner().invoke(app, [str(a) for a in args])


def byte_level_bpe(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """OpenAI CLIP's vocabulary layout at a tiny size: the 256 byte characters, the same with
    `</w>`, the merges (each word of `words` ends as one token), then BOS and EOS last."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": i + 256 for i, c in enumerate(chars)}
    ranks: dict[tuple[str, str], int] = {}

    def bpe(parts: list[str]) -> list[str]:  # lowest-ranked pair first, as BPE applies them
        while len(parts) > 1:
            pairs = enumerate(itertools.pairwise(parts))
            rank, i = min((ranks.get(p, len(ranks)), i) for i, p in pairs)
            if rank == len(ranks):
                break
            parts = [*parts[:i], parts[i] + parts[i + 1], *parts[i + 2 :]]
        return parts

    for word in words:
        parts = bpe([*word[:-1], word[-1] + "</w>"])
        while len(parts) > 1:  # a new merge ranks last: the words before keep their tokens
            ranks[(parts[0], parts[1])] = len(ranks)
            vocab[parts[0] + parts[1]] = len(vocab)
            parts = bpe(parts)
    vocab[BOS], vocab[EOS] = len(vocab), len(vocab) + 1
    return vocab, list(ranks)


def make_laion_clip(folder: Path, pad: str = EOS) -> Path:
    """A tiny LAION-style CLIP folder (width 32, 2 layers, 32 px, patch 8, context 16, gelu,
    legacy config ids 0/1/2; `pad`: the tokenizer's pad token) with LAION's files: the
    Hugging Face ones, the slow tokenizer's and the same weights in open_clip's layout.
    Deterministic; torch's global generator is left as it was."""
    from safetensors.torch import save_file
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    from pipeline.clip.checkpoint import save_checkpoint
    from pipeline.clip.open_clip import hf_to_open_clip

    vocab, merges = byte_level_bpe(sorted(set(WORDS.split())))
    tok = CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad, model_max_length=16)
    common = {"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 2, "hidden_act": "gelu", "projection_dim": 16}  # fmt: skip
    text = {**common, "vocab_size": len(vocab), "max_position_embeddings": 16, **LEGACY_IDS}
    vision = {**common, "image_size": 32, "patch_size": 8}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(config)
    save_checkpoint(model, lambda f: tok.save_pretrained(str(f)), folder, image_size=32)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    open_clip = hf_to_open_clip(model.state_dict())
    save_file(open_clip, str(folder / "open_clip_model.safetensors"))
    (folder / "open_clip_config.json").write_text(json.dumps(OPEN_CLIP_CONFIG))
    return folder


@pytest.fixture(scope="module")
def laion_clip(tmp_path_factory) -> Path:
    return make_laion_clip(tmp_path_factory.mktemp("laion_clip") / "clip")


@pytest.fixture(scope="module")
def bb(laion_clip):
    return load_backbone(laion_clip, device="cpu")


def eos_pooled(bb, texts: list[str]) -> torch.Tensor:
    """Text embeddings written out by hand: the final hidden state at the EOS position,
    projected and L2-normalised (one text at a time: no padding)."""
    out = []
    with torch.inference_mode():
        for ids in bb.tokenize(texts):
            hidden = bb.model.text_model(input_ids=torch.tensor([ids])).last_hidden_state
            out.append(bb.model.text_projection(hidden[0, ids.index(bb.eos_token_id)]))
    return torch.nn.functional.normalize(torch.stack(out), dim=-1)


def test_the_folder_is_laion_shaped(laion_clip, tmp_path):
    from transformers import AutoTokenizer

    assert sorted(p.name for p in laion_clip.iterdir()) == [
        "config.json", "merges.txt", "model.safetensors", "open_clip_config.json",
        "open_clip_model.safetensors", "preprocessor_config.json", "tokenizer.json",
        "tokenizer_config.json", "vocab.json",
    ]  # fmt: skip
    config = json.loads((laion_clip / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert {k: text[k] for k in LEGACY_IDS} == LEGACY_IDS
    assert text["hidden_act"] == vision["hidden_act"] == "gelu"
    tok = json.loads((laion_clip / "tokenizer_config.json").read_text())
    assert tok["tokenizer_class"] == "CLIPTokenizer"
    assert (tok["bos_token"], tok["eos_token"], tok["pad_token"]) == (BOS, EOS, EOS)
    vocab = json.loads((laion_clip / "vocab.json").read_text())
    assert (vocab[BOS], vocab[EOS]) == (len(vocab) - 2, len(vocab) - 1) == (641, 642)
    assert text["vocab_size"] == len(vocab) and vocab["!"] == 0
    # vocab.json + merges.txt alone (no tokenizer.json) make the same tokenizer
    slow = tmp_path / "slow"
    slow.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (slow / name).write_bytes((laion_clip / name).read_bytes())
    texts = ["What is the relationship between cat and dog?", "an orange sofa!!", "héllo 42"]
    fast, plain = (AutoTokenizer.from_pretrained(str(f)) for f in (laion_clip, slow))
    assert fast(texts)["input_ids"] == plain(texts)["input_ids"]
    pre = json.loads((laion_clip / "preprocessor_config.json").read_text())
    assert pre["crop_size"] == {"height": 32, "width": 32} and pre["size"]["shortest_edge"] == 32


# --------------------------------------------------------------------------- load_backbone


def test_special_ids_come_from_the_tokenizer(bb):
    assert (bb.bos_token_id, bb.eos_token_id, bb.pad_token_id) == (641, 642, 642)
    assert (bb.image_size, bb.context_length, bb.dim) == (32, 16, 16)
    # the legacy config survives loading: transformers' argmax pooling is the one exercised
    assert bb.model.text_model.eos_token_id == 2
    act = bb.model.text_model.encoder.layers[0].mlp.activation_fn
    assert type(act).__name__ == "GELUActivation"
    assert type(bb.model.vision_model.encoder.layers[0].mlp.activation_fn) is type(act)
    ids = bb.tokenize(["A red circle on the sofa?", "red " * 40])
    names = bb.tokenizer.convert_ids_to_tokens(ids[0])
    assert names == [BOS, "a</w>", "red</w>", "circle</w>", "on</w>", "the</w>", "sofa</w>",
                     "?</w>", EOS]  # fmt: skip
    assert len(ids[1]) == 16 and (ids[1][0], ids[1][-1]) == (641, 642)  # truncated, EOS kept
    assert bb.tokenizer.decode(ids[0], skip_special_tokens=True) == "a red circle on the sofa ?"


TEXTS = ["a cat", "two large dogs on a green sofa next to the table", "what is this?", "red " * 30]


def test_text_embeddings_pool_at_the_eos(bb):
    got = bb.encode_texts(TEXTS)
    torch.testing.assert_close(got, eos_pooled(bb, TEXTS), atol=1e-5, rtol=0)
    # padding (a batch of different lengths, padded with the EOS id) changes nothing
    for i, text in enumerate(TEXTS):
        torch.testing.assert_close(bb.encode_texts([text])[0], got[i], atol=1e-6, rtol=0)
    # and the position matters: the state before the EOS is another embedding
    ids = bb.tokenize(["a cat"])[0]
    with torch.inference_mode():
        hidden = bb.model.text_model(input_ids=torch.tensor([ids])).last_hidden_state[0]
        before = torch.nn.functional.normalize(bb.model.text_projection(hidden[-2]), dim=-1)
    assert (before - got[0]).abs().max() > 1e-2


def test_a_pad_of_id_0_as_some_laion_repos_have(laion_clip, bb, tmp_path):
    """Same weights, tokenizer pad `!` (id 0): the same embeddings, padded or not."""
    other = make_laion_clip(tmp_path / "clip", pad="!")
    assert weights_sha256(other) == weights_sha256(laion_clip)
    bang = load_backbone(other, device="cpu")
    assert (bang.bos_token_id, bang.eos_token_id, bang.pad_token_id) == (641, 642, 0)
    got = bang.encode_texts(TEXTS)
    torch.testing.assert_close(got, bb.encode_texts(TEXTS), atol=1e-6, rtol=0)
    torch.testing.assert_close(bang.encode_texts(TEXTS[:1])[0], got[0], atol=1e-6, rtol=0)


def test_convert_open_clip_without_quick_gelu_embeds_the_same(laion_clip, bb, tmp_path):
    """The folder's open_clip weights and config, converted by `convert-open-clip` (gelu: no
    --quick-gelu) with its tokenizer: the config then names the tokenizer's ids, and the
    pooling there (the first EOS) picks the token the legacy argmax picks."""
    out = tmp_path / "hf"
    res = invoke("convert-open-clip", "--checkpoint", laion_clip / "open_clip_model.safetensors",
                 "--tokenizer", laion_clip, "--out", out,
                 "--model-config", laion_clip / "open_clip_config.json")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "gelu" in res.output and "quick_gelu" not in res.output
    text = json.loads((out / "config.json").read_text())["text_config"]
    assert (text["hidden_act"], text["bos_token_id"], text["eos_token_id"]) == ("gelu", 641, 642)
    assert json.loads((out / "open_clip.json").read_text())["text_pooling"] == "eos"
    conv = load_backbone(out, device="cpu")
    assert conv.model.text_model.eos_token_id == 642  # the non-legacy pooling
    assert conv.tokenize(TEXTS) == bb.tokenize(TEXTS)
    torch.testing.assert_close(conv.encode_texts(TEXTS), bb.encode_texts(TEXTS), atol=1e-6, rtol=0)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(conv.encode_images(pixels), bb.encode_images(pixels), atol=1e-6,
                               rtol=0)  # fmt: skip
    assert torch.equal(clip_token_table(str(out)).weight, bb.token_embedding())


# --------------------------------------------------------------------------- clip_bootstrap


@pytest.fixture(scope="module")
def passed_through(tmp_path_factory, laion_clip) -> Path:
    """`clipda clip-bootstrap --pretrained <the folder>` with finetune off: the copy."""
    root = tmp_path_factory.mktemp("bootstrap")
    params = root / "params.yaml"
    params.write_text("seed: 0\nclip_bootstrap:\n  finetune: false\n  heldout_fraction: 0.4\n")
    res = invoke("clip-bootstrap", "--laion", make_laion_shard(root / "laion"),
                 "--flickr30k", make_flickr(root / "flickr30k", n=4), "--pretrained", laion_clip,
                 "--out", root / "clip", "--metrics", root / "clip.json",
                 "--detail", root / "detail.json", "--plots", root / "clip.tsv",
                 "--params", params)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "passthrough" in res.output
    return root / "clip"


def test_clip_bootstrap_passes_the_folder_through(passed_through, bb):
    copy = load_backbone(passed_through, device="cpu")
    assert (copy.bos_token_id, copy.eos_token_id, copy.pad_token_id) == (641, 642, 642)
    assert copy.model.text_model.eos_token_id == 2  # the config's bytes, copied
    assert copy.tokenize(TEXTS) == bb.tokenize(TEXTS)
    assert torch.equal(copy.encode_texts(TEXTS), bb.encode_texts(TEXTS))
    table = clip_token_table(str(passed_through))
    assert torch.equal(table.weight, bb.token_embedding()) and table.revision == copy.revision


def test_the_pass_through_copy_keeps_the_revision(passed_through, laion_clip):
    source = json.loads((passed_through / "clip_source.json").read_text())
    assert weights_sha256(passed_through) == source["pretrained_revision"]


# --------------------------------------------------------------------------- embed


def make_laion_shard(root: Path, n: int = 16) -> Path:
    """An img2dataset webdataset shard: {key}.jpg + {key}.txt, captions from `WORDS`."""
    words = WORDS.split()
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "00000.tar", "w") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(buf, "JPEG")
            caption = " ".join(words[(3 * i + k) % len(words)] for k in range(2 + i % 4))
            for name, data in (("jpg", buf.getvalue()), ("txt", caption.encode())):
                info = tarfile.TarInfo(f"{i:09d}.{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return root


@pytest.fixture(scope="module")
def caption_world(tmp_path_factory, laion_clip):
    """LAION and Flickr30k embedded by `clipda embed` with the LAION-style CLIP."""
    root = tmp_path_factory.mktemp("caption_world")
    params = root / "params.yaml"
    params.write_text(EMBED_PARAMS)
    for name, src in (("laion", make_laion_shard(root / "laion")),
                      ("flickr30k", make_flickr(root / "flickr30k", n=12))):  # fmt: skip
        out = root / "emb" / name
        res = invoke("embed", "--dataset", name, "--input", src, "--images", src,
                     "--clip", laion_clip, "--out", out, "--params", params)  # fmt: skip
        assert res.exit_code == 0, res.output
    return root


@pytest.mark.parametrize("name", ["laion", "flickr30k"])
def test_embed_caption_rows_use_the_tokenizers_ids(caption_world, bb, name):
    emb = caption_world / "emb" / name
    manifest = json.loads((emb / "manifest.json").read_text())
    tok = manifest["token_embedding"]
    assert {k: tok[k] for k in LEGACY_IDS} == {"bos_token_id": 641, "pad_token_id": 642,
                                                "eos_token_id": 642}  # fmt: skip
    assert (tok["vocab_size"], tok["width"]) == (643, 32)
    assert tok["sha256"] == table_sha256(bb.token_embedding())
    assert manifest["revision"] == bb.revision and manifest["dim"] == 16
    table = read_dataset(emb)
    captions = table.column("caption").to_pylist()
    token_ids = table.column("token_ids").to_pylist()
    assert len(captions) >= 16 and token_ids == bb.tokenize(captions)
    assert all(ids[0] == 641 and ids[-1] == 642 and 642 not in ids[:-1] for ids in token_ids)
    text = vectors(table.column("text_emb")).astype(np.float32)
    np.testing.assert_allclose(text, eos_pooled(bb, captions).numpy(), atol=2e-3, rtol=0)


# --------------------------------------------------------------------------- captions


def test_the_token_table_is_the_models(laion_clip, bb):
    table = clip_token_table(str(laion_clip))
    weight = bb.model.text_model.embeddings.token_embedding.weight.detach()
    assert torch.equal(table.weight, weight) and table.weight.shape == (643, 32)
    assert table.revision == bb.revision == weights_sha256(laion_clip)


@pytest.fixture(scope="module")
def caption_model(caption_world, laion_clip) -> Path:
    from pipeline.stages.train_caption import main

    emb, out = caption_world / "emb", caption_world / "caption"
    params = {"seed": 0, "train_caption": TINY_CAPTION}
    line = main("ada", emb / "laion", emb / "flickr30k", out, out.with_suffix(".tsv"), params,
                str(laion_clip))  # fmt: skip
    assert line.startswith("train_caption[ada]: ")
    return out


def test_train_caption_decodes_with_the_tokenizers_ids(caption_model, laion_clip, bb):
    from pipeline.nn.caption_decoder import load_caption_model

    model = load_caption_model(caption_model)
    c = model.config
    assert (c.bos_token_id, c.eos_token_id, c.pad_token_id) == (641, 642, 642)
    assert torch.equal(model.token_table, bb.token_embedding())
    info = json.loads((caption_model / "config.json").read_text())["clip"]
    assert info["token_embedding"]["sha256"] == table_sha256(bb.token_embedding())


def test_caption_images_and_the_cli(caption_world, caption_model, laion_clip, bb):
    from pipeline.caption.decode import caption_images, generate, ids_to_text, load_caption_model

    images = sorted((caption_world / "flickr30k" / "flickr30k_images").glob("*.jpg"))[:3]
    got = list(caption_images(images, caption_model, str(laion_clip), beam=1, max_len=6))
    assert [p for p, _ in got] == images
    emb = torch.cat([embed_image(bb, p) for p in images])
    ids = generate(load_caption_model(caption_model, "cpu"), emb, beam_size=1, max_len=6)
    assert all(641 not in x and 642 not in x and 1 <= len(x) <= 6 for x in ids)
    assert [t for _, t in got] == [ids_to_text(bb.tokenizer, x) for x in ids]
    # without --clip: the CLIP the embedding manifests name, this folder
    assert list(caption_images(images, caption_model, None, beam=1, max_len=6)) == got
    for _, text in got:  # decoded without special tokens or byte-level word marks
        assert isinstance(text, str) and not re.search(r"<\||</w>", text)
    res = invoke("caption", *images, "--model", caption_model, "--clip", laion_clip, "--beam", 2,
                 "--max-len", 6)  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = res.output.strip("\n").split("\n")
    assert [ln.split("\t")[0] for ln in lines] == [str(p) for p in images]
    assert all(not re.search(r"<\||</w>", ln) for ln in lines)


# --------------------------------------------------------------------------- VQA


@pytest.fixture(scope="module")
def vqa_world(tmp_path_factory, laion_clip):
    """Generic QA table -> prepare-qa-table -> embed -> train-vqa -> evaluate-vqa (--clip)."""
    root = tmp_path_factory.mktemp("vqa_world")
    write_images(root / "imgs", 24)
    write_csv(root / "table.csv", generic_rows(24))
    params = root / "params.yaml"
    params.write_text(EMBED_PARAMS + "answers:\n  top_k: 50\ntrain_vqa:\n  epochs: 3\n"
                      "  hidden: [32]\n  lr: 0.01\n")  # fmt: skip
    steps = [
        ("prepare-qa-table", "--input", root / "table.csv", "--out", root / "qa"),
        ("embed", "--dataset", "vg", "--input", root / "qa", "--images", root, "--clip",
         laion_clip, "--out", root / "emb"),
        ("train-vqa", "--qa", root / "qa", "--emb", root / "emb", "--out", root / "model",
         "--plots", root / "vqa.tsv"),
        ("evaluate-vqa", "--qa", root / "qa", "--emb", root / "emb", "--model", root / "model",
         "--clip", laion_clip, "--metrics", root / "vqa", "--detail", root / "detail.json",
         "--predictions", root / "vqa.jsonl", "--prompt-cache", root / "prompts.arrow"),
    ]  # fmt: skip
    for step in steps:
        res = invoke(*step, "--params", params)
        assert res.exit_code == 0, (step[0], res.output)
    return root


def test_vg_texts_and_zeroshot_metrics(vqa_world, laion_clip, bb):
    texts = read_table(vqa_world / "emb" / "texts.arrow")
    words = texts.column("text").to_pylist()
    got = vectors(texts.column("text_emb")).astype(np.float32)
    np.testing.assert_allclose(got, eos_pooled(bb, words).numpy(), atol=2e-3, rtol=0)
    manifest = json.loads((vqa_world / "emb" / "manifest.json").read_text())
    tok = manifest["token_embedding"]
    assert {k: tok[k] for k in LEGACY_IDS} == {"bos_token_id": 641, "pad_token_id": 642,
                                                "eos_token_id": 642}  # fmt: skip
    detail = json.loads((vqa_world / "detail.json").read_text())
    assert detail["settings"]["clip"] == str(laion_clip.resolve())
    assert detail["settings"]["clip_revision"] == bb.revision and detail["settings"]["prompts"]
    for k in ("top1", "top5", "mean_class_acc"):
        assert 0.0 <= detail["overall"][f"zeroshot_{k}"] <= 1.0
    assert detail["overall"]["zeroshot_top5"] == 1.0  # 3 candidates per question type
    assert "zeroshot" in read_rows(vqa_world / "vqa")["overall"]


def test_ask_scores_are_image_prompt_cosines(vqa_world, laion_clip, bb):
    from pipeline.vqa.ask import ask

    image = vqa_world / "imgs" / "3.jpg"
    res = ask(image, "what is the relationship between the Cat and dog", vqa_world / "model",
              clip=str(laion_clip), top=3)  # fmt: skip
    assert res.clip == bb.model_id and len(res.model) == len(res.zeroshot) == 3
    mine = embed_image(bb, image)[0]
    prompts = [f"a photo of cat {a} dog" for a, _ in res.zeroshot]
    want = (eos_pooled(bb, prompts) @ mine).tolist()
    assert [s for _, s in res.zeroshot] == pytest.approx(want, abs=1e-5)
    # without --clip: the CLIP recorded in the model folder, this one
    default = ask(
        image, "What is the relationship between cat and dog?", vqa_world / "model", top=3
    )
    assert (default.clip, default.zeroshot, default.model) == (res.clip, res.zeroshot, res.model)
    out = invoke("ask", image, "What is the relationship between cat and dog?", "--model",
                 vqa_world / "model", "--clip", laion_clip, "--top", 3, "--params",
                 vqa_world / "params.yaml")  # fmt: skip
    assert out.exit_code == 0, out.output
    assert "VQA head" in out.output and "zero-shot CLIP" in out.output
    printed = out.output.split("zero-shot CLIP")[1].strip().splitlines()[1:]
    ranked = [(ln.split()[1], float(ln.split()[2])) for ln in printed]
    assert ranked == [(a, pytest.approx(s, abs=1e-4)) for a, s in res.zeroshot]
