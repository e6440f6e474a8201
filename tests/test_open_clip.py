"""`clipda convert-open-clip`: an open_clip checkpoint becomes a Hugging Face CLIP folder that
embeds exactly as the model it came from (round trip through `hf_to_open_clip`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_clip import make_tiny_clip
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.clip.backbone import load_backbone
from pipeline.clip.checkpoint import ClipModelConfig, build_scratch_checkpoint
from pipeline.clip.open_clip import hf_to_open_clip
from pipeline.clip.token_table import clip_token_table

TEXTS = ["a red circle on a blue square.", "what is this?", "two small dogs"]

# open_clip's `CLIP` state-dict keys of a 1-layer model (read off open_clip's src/open_clip/
# model.py `CLIP.__init__`, transformer.py `VisionTransformer`, `TextTransformer`,
# `ResidualAttentionBlock` and `Attention`); `attn_mask` is a non-persistent buffer.
OPEN_CLIP_KEYS_1_LAYER = {
    "logit_scale", "token_embedding.weight", "positional_embedding", "text_projection",
    "ln_final.weight", "ln_final.bias",
    "transformer.resblocks.0.ln_1.weight", "transformer.resblocks.0.ln_1.bias",
    "transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.0.attn.in_proj_bias",
    "transformer.resblocks.0.attn.out_proj.weight", "transformer.resblocks.0.attn.out_proj.bias",
    "transformer.resblocks.0.ln_2.weight", "transformer.resblocks.0.ln_2.bias",
    "transformer.resblocks.0.mlp.c_fc.weight", "transformer.resblocks.0.mlp.c_fc.bias",
    "transformer.resblocks.0.mlp.c_proj.weight", "transformer.resblocks.0.mlp.c_proj.bias",
    "visual.class_embedding", "visual.positional_embedding", "visual.proj", "visual.conv1.weight",
    "visual.ln_pre.weight", "visual.ln_pre.bias", "visual.ln_post.weight", "visual.ln_post.bias",
    "visual.transformer.resblocks.0.ln_1.weight", "visual.transformer.resblocks.0.ln_1.bias",
    "visual.transformer.resblocks.0.attn.in_proj_weight",
    "visual.transformer.resblocks.0.attn.in_proj_bias",
    "visual.transformer.resblocks.0.attn.out_proj.weight",
    "visual.transformer.resblocks.0.attn.out_proj.bias",
    "visual.transformer.resblocks.0.ln_2.weight", "visual.transformer.resblocks.0.ln_2.bias",
    "visual.transformer.resblocks.0.mlp.c_fc.weight",
    "visual.transformer.resblocks.0.mlp.c_fc.bias",
    "visual.transformer.resblocks.0.mlp.c_proj.weight",
    "visual.transformer.resblocks.0.mlp.c_proj.bias",
}  # fmt: skip

# open_clip's model config of the tiny CLIP (tests/tiny_clip.py): heads 2 = width 32 / 16; it
# pools its text at the EOS (id 3, not the tokenizer's highest id), as transformers does
TINY_CONFIG = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 213, "width": 32, "heads": 2, "layers": 2,
                 "pool_type": "eos", "eos_id": 3},
}  # fmt: skip


def invoke(*args):
    return CliRunner().invoke(app, ["convert-open-clip", *map(str, args)])


def one_error(res, *fragments: str) -> str:
    out = res.output.strip()
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    assert len(out.splitlines()) == 1 and out.startswith("error: "), out
    assert all(f in out for f in fragments), out
    return out


def open_clip_weights(folder: Path) -> dict:
    return hf_to_open_clip(load_backbone(folder, device="cpu").model.state_dict())


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    """A 1-layer CLIP whose widths (64) open_clip's inference understands: 1 head each."""
    model = ClipModelConfig(vocab_size=300, context_length=16, width=64, layers=1, heads=1,
                            image_size=32, patch_size=8, projection_dim=16)  # fmt: skip
    texts = ["a red circle on a blue square.", "what is this? two small dogs"]
    with torch.random.fork_rng(devices=[]):
        return build_scratch_checkpoint(texts, model, tmp_path_factory.mktemp("wide"), seed=0)


def assert_same_embeddings(a: Path, b: Path, texts: bool = True) -> None:
    x, y = load_backbone(a, device="cpu"), load_backbone(b, device="cpu")
    pixels = torch.randn(
        3, 3, x.image_size, x.image_size, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(x.encode_images(pixels), y.encode_images(pixels), atol=1e-6, rtol=0)
    if texts:
        torch.testing.assert_close(x.encode_texts(TEXTS), y.encode_texts(TEXTS), atol=1e-6, rtol=0)
    assert (x.image_size, x.mean, x.std, x.context_length) == (
        y.image_size, y.mean, y.std, y.context_length)  # fmt: skip
    assert x.tokenize(TEXTS) == y.tokenize(TEXTS)


def test_the_key_layout_is_open_clips(tiny):
    weights = open_clip_weights(tiny)
    assert {k for k in weights if ".resblocks.1." not in k} == OPEN_CLIP_KEYS_1_LAYER
    # (width, embed) matrices used as `x @ proj`; q, k, v stacked along dim 0
    assert weights["visual.proj"].shape == weights["text_projection"].shape == (32, 16)
    assert weights["visual.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)


def _block(w: dict, prefix: str, x, heads: int, causal: bool = False):
    """open_clip's ResidualAttentionBlock (QuickGELU), written from its transformer.py."""
    F, d = torch.nn.functional, x.shape[-1]

    def ln(name, t):
        return F.layer_norm(t, (d,), w[f"{prefix}{name}.weight"], w[f"{prefix}{name}.bias"])

    def lin(name, t):
        return F.linear(t, w[f"{prefix}{name}.weight"], w[f"{prefix}{name}.bias"])

    qkv = F.linear(
        ln("ln_1", x), w[f"{prefix}attn.in_proj_weight"], w[f"{prefix}attn.in_proj_bias"]
    )
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    a = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).flatten(2)
    x = x + lin("attn.out_proj", a)
    h = lin("mlp.c_fc", ln("ln_2", x))
    return x + lin("mlp.c_proj", h * torch.sigmoid(1.702 * h))


@pytest.mark.parametrize("pool_type", ["eos", "argmax"])
def test_open_clips_own_forward_gives_the_same_embeddings(tiny, tmp_path, pool_type):
    """The open_clip-layout weights, run as open_clip's CLIP runs them (VisionTransformer and
    CLIP.encode_text with its text_global_pool, re-read here), embed as the converted Hugging
    Face model does; with either pooling, though the tiny tokenizer's EOS (3) is not its
    highest id (212): argmax pooling gets the legacy config ids."""
    F, w = torch.nn.functional, open_clip_weights(tiny)
    ckpt = tmp_path / "tiny.safetensors"
    save_file(w, str(ckpt))
    text_cfg = {
        k: v for k, v in TINY_CONFIG["text_cfg"].items() if k not in ("pool_type", "eos_id")
    }
    if pool_type == "eos":
        text_cfg |= {"pool_type": "eos", "eos_id": 3}
    config = write_json(tmp_path / "c.json", {**TINY_CONFIG, "text_cfg": text_cfg})
    out = tmp_path / "hf"
    res = invoke("--checkpoint", ckpt, "--tokenizer", tiny, "--out", out, "--model-config", config)
    assert res.exit_code == 0, res.output
    pooled = "the highest id" if pool_type == "argmax" else "EOS"
    assert f"text pooled at {pooled}" in res.output
    record = json.loads((out / "open_clip.json").read_text())
    assert record["text_pooling"] == pool_type
    text_config = json.loads((out / "config.json").read_text())["text_config"]
    want = (0, 1, 2) if pool_type == "argmax" else (2, 0, 3)  # bos, pad, eos
    assert tuple(text_config[f"{k}_token_id"] for k in ("bos", "pad", "eos")) == want
    bb = load_backbone(out, device="cpu")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    x = F.conv2d(pixels, w["visual.conv1.weight"], stride=8).flatten(2).transpose(1, 2)
    x = torch.cat([w["visual.class_embedding"].expand(2, 1, 32), x], dim=1)
    x = x + w["visual.positional_embedding"]
    x = F.layer_norm(x, (32,), w["visual.ln_pre.weight"], w["visual.ln_pre.bias"])
    for i in range(2):
        x = _block(w, f"visual.transformer.resblocks.{i}.", x, heads=2)
    x = F.layer_norm(x[:, 0], (32,), w["visual.ln_post.weight"], w["visual.ln_post.bias"])
    with torch.inference_mode():
        hf = bb.model.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(x @ w["visual.proj"], hf, atol=1e-5, rtol=1e-5)

    ids = torch.tensor(bb.tokenize(["a red circle"]))
    x = w["token_embedding.weight"][ids] + w["positional_embedding"][: ids.shape[1]]
    for i in range(2):
        x = _block(w, f"transformer.resblocks.{i}.", x, heads=2, causal=True)
    x = F.layer_norm(x, (32,), w["ln_final.weight"], w["ln_final.bias"])
    # open_clip's text_global_pool: at the highest token id, or at the first EOS
    at = ids[0].argmax() if pool_type == "argmax" else ids[0].tolist().index(bb.eos_token_id)
    assert (ids[0].argmax() != ids[0].tolist().index(bb.eos_token_id)).item()  # they differ
    x = x[0, at]
    with torch.inference_mode():
        hf = bb.model.get_text_features(input_ids=ids).pooler_output[0]
    torch.testing.assert_close(x @ w["text_projection"], hf, atol=1e-5, rtol=1e-5)
    assert bb.eos_token_id == 3  # the project's ids come from the tokenizer, either way


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_round_trip_embeds_as_the_original(tiny, tmp_path, suffix):
    weights = open_clip_weights(tiny)
    ckpt = tmp_path / f"open_clip{suffix}"
    if suffix == ".safetensors":
        save_file(weights, str(ckpt))
    else:  # as open_clip's training saves: wrapped, with DDP's `module.` prefix
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in weights.items()}}, ckpt)
    config = write_json(tmp_path / "ViT-tiny.json", TINY_CONFIG)
    out = tmp_path / "hf"
    res = invoke("--checkpoint", ckpt, "--tokenizer", tiny, "--out", out, "--model-config", config)
    assert res.exit_code == 0, res.output
    assert res.output.startswith("convert-open-clip: ")
    assert_same_embeddings(tiny, out)
    assert torch.equal(clip_token_table(str(out)).weight, clip_token_table(str(tiny)).weight)
    record = json.loads((out / "open_clip.json").read_text())
    assert record["source"] == ckpt.name and record["quick_gelu"] is True
    assert record["sha256"] == "sha256:" + hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert record["model_config"]["vision_cfg"]["head_width"] == 16
    assert not list(tmp_path.glob(".hf.*"))  # the staging folder is gone


def test_the_inferred_config_is_the_given_one(wide, tmp_path):
    ckpt = tmp_path / "wide.safetensors"
    save_file(open_clip_weights(wide), str(ckpt))
    res = invoke("--checkpoint", ckpt, "--tokenizer", wide, "--out", tmp_path / "a", "--quick-gelu")
    assert res.exit_code == 0, res.output
    # inferred: open_clip's default argmax pooling, which this tokenizer (EOS 3 of 300) makes
    # another token than the original's EOS pooling: the images embed the same, texts not
    assert_same_embeddings(wide, tmp_path / "a", texts=False)
    assert "heads 1/1, quick_gelu, text pooled at the highest id" in res.output
    inferred = json.loads((tmp_path / "a" / "open_clip.json").read_text())["model_config"]
    assert inferred["vision_cfg"]["head_width"] == 64 and inferred["text_cfg"]["heads"] == 1
    config = write_json(tmp_path / "wide.json", inferred)
    res = invoke("--checkpoint", ckpt, "--tokenizer", wide, "--out", tmp_path / "b",
                 "--model-config", config)  # fmt: skip
    assert res.exit_code == 0, res.output
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_quick_gelu_reaches_the_config(wide, tmp_path):
    ckpt = tmp_path / "wide.safetensors"
    save_file(open_clip_weights(wide), str(ckpt))
    for flag, act in (([], "gelu"), (["--quick-gelu"], "quick_gelu")):
        out = tmp_path / act
        assert invoke("--checkpoint", ckpt, "--tokenizer", wide, "--out", out, *flag).exit_code == 0
        config = json.loads((out / "config.json").read_text())
        assert config["text_config"]["hidden_act"] == config["vision_config"]["hidden_act"] == act
    assert load_backbone(tmp_path / "gelu").model.config.vision_config.hidden_act == "gelu"


def test_a_hub_config_brings_its_image_settings(tiny, tmp_path):
    """open_clip's hub layout (`open_clip_config.json`: model_cfg + preprocess_cfg); the
    weights stored in half precision stay so."""
    ckpt = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.half() for k, v in open_clip_weights(tiny).items()}, str(ckpt))
    mean, std = [0.5, 0.5, 0.5], [0.25, 0.5, 0.75]
    hub = {"model_cfg": TINY_CONFIG, "preprocess_cfg": {"mean": mean, "std": std}}
    config = write_json(tmp_path / "open_clip_config.json", hub)
    out = tmp_path / "hf"
    res = invoke("--checkpoint", ckpt, "--tokenizer", tiny, "--out", out, "--model-config", config)
    assert res.exit_code == 0, res.output
    bb = load_backbone(out, device="cpu")
    assert (list(bb.mean), list(bb.std), bb.image_size) == (mean, std, 32)
    assert {v.dtype for v in load_file(str(out / "model.safetensors")).values()} == {torch.float16}


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (
            {"text_cfg": {**TINY_CONFIG["text_cfg"], "act_kwargs": {"approximate": "tanh"}}},
            "act_kwargs",
        ),
        (
            {"vision_cfg": {**TINY_CONFIG["vision_cfg"], "layers": [1, 1, 1, 1]}},
            "vision_cfg.layers",
        ),
        ({"vision_cfg": {**TINY_CONFIG["vision_cfg"], "width": 48}}, "config says (48,)"),
        ({"preprocess_cfg": {"resize_mode": "squash"}}, "resize_mode"),
    ],
)
def test_a_model_config_the_weights_cannot_follow_is_refused(tiny, tmp_path, change, fragment):
    ckpt = tmp_path / "tiny.safetensors"
    save_file(open_clip_weights(tiny), str(ckpt))
    config = write_json(tmp_path / "c.json", {**TINY_CONFIG, **change})
    res = invoke("--checkpoint", ckpt, "--tokenizer", tiny, "--out", tmp_path / "o",
                 "--model-config", config)  # fmt: skip
    one_error(res, fragment)


def test_heads_that_cannot_be_inferred_need_the_model_config(tiny, tmp_path):
    ckpt = tmp_path / "tiny.safetensors"
    save_file(open_clip_weights(tiny), str(ckpt))
    res = invoke("--checkpoint", ckpt, "--tokenizer", tiny, "--out", tmp_path / "o")
    one_error(res, "32-wide", "--model-config")
    assert not (tmp_path / "o").exists()


def test_a_resnet_tower_is_refused(tiny, tmp_path):
    weights = {k: v for k, v in open_clip_weights(tiny).items() if not k.startswith("visual.")}
    weights["visual.layer1.0.conv1.weight"] = torch.zeros(8, 8, 1, 1)
    weights["visual.attnpool.positional_embedding"] = torch.zeros(50, 32)
    ckpt = tmp_path / "rn.safetensors"
    save_file(weights, str(ckpt))
    res = invoke("--checkpoint", ckpt, "--tokenizer", tiny, "--out", tmp_path / "o")
    one_error(res, "ModifiedResNet", "visual.")


def test_a_leftover_key_is_named(tiny, tmp_path):
    weights = open_clip_weights(tiny)
    weights["visual.transformer.resblocks.0.ls_1.gamma"] = torch.ones(32)  # LayerScale
    ckpt = tmp_path / "ls.safetensors"
    save_file(weights, str(ckpt))
    config = write_json(tmp_path / "c.json", TINY_CONFIG)
    res = invoke("--checkpoint", ckpt, "--tokenizer", tiny, "--out", tmp_path / "o",
                 "--model-config", config)  # fmt: skip
    one_error(res, "visual.transformer.resblocks.0.ls_1.gamma")


def test_a_tokenizer_of_another_vocab_is_refused(tiny, tmp_path):
    weights = open_clip_weights(tiny)
    weights["token_embedding.weight"] = torch.zeros(300, 32)
    ckpt = tmp_path / "v.safetensors"
    save_file(weights, str(ckpt))
    text_cfg = {**TINY_CONFIG["text_cfg"], "vocab_size": 300}
    config = write_json(tmp_path / "c.json", {**TINY_CONFIG, "text_cfg": text_cfg})
    res = invoke("--checkpoint", ckpt, "--tokenizer", tiny, "--out", tmp_path / "o",
                 "--model-config", config)  # fmt: skip
    one_error(res, "213 tokens", "300")


class Payload:
    """Unpickling this would create a file: a weights-only load must refuse it first."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_pickled_object_is_refused_not_run(tiny, tmp_path):
    marker = tmp_path / "ran"
    ckpt = tmp_path / "evil.pt"
    torch.save({"state_dict": open_clip_weights(tiny), "extra": Payload(marker)}, ckpt)
    res = invoke("--checkpoint", ckpt, "--tokenizer", tiny, "--out", tmp_path / "o")
    one_error(res, "evil.pt", "pickled")
    assert not marker.exists()
