"""An open_clip checkpoint (ViT image tower + text transformer) as a Hugging Face CLIP folder.

open_clip's `CLIP` keeps the text tower at the top level (`token_embedding`,
`positional_embedding`, `transformer.resblocks.{i}`, `ln_final`, `text_projection`) and the
image tower under `visual.` (`conv1`, `class_embedding`, `positional_embedding`, `ln_pre`,
`transformer.resblocks.{i}`, `ln_post`, `proj`). A block holds `ln_1`, `attn.in_proj_weight/
bias` (q, k, v stacked), `attn.out_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`; `proj` and
`text_projection` are (width, embed) matrices used as `x @ proj`: transposed Linear weights.
`_pairs` maps this layout onto `transformers.CLIPModel`'s, both ways.

The model config is open_clip's JSON (`model_configs/*.json`, or a hub `open_clip_config.json`
with `model_cfg` + `preprocess_cfg`), else inferred from the shapes as open_clip did for
OpenAI's weights: heads = width // 64 (its default head width), except the 1280..1792-wide
image towers of ViT-H/g/bigG/e, which have 16 heads in all of open_clip's configs.

Images: open_clip's `PreprocessCfg` default (OpenAI mean/std, bicubic resize of the shortest
side, center crop) is what CLIP's processor does, except that torchvision's crop rounds an odd
margin half to even where transformers floors it (one pixel at most).

Text pooling: open_clip pools at the highest token id (`pool_type: argmax`, its default) or at
the first EOS (`pool_type: eos`); transformers at the first EOS, or at the highest id when the
text config's `eos_token_id` is 2 (its legacy path, as in LAION's own Hugging Face exports).
The two are the same token when EOS is the tokenizer's highest id (OpenAI's BPE: 49407): the
config then carries the tokenizer's ids. An argmax model with another tokenizer gets the
legacy ids 0/1/2, so that transformers pools as open_clip does (the project reads special ids
from the tokenizer, never from these). `open_clip.json` records which (`text_pooling`).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path

import torch

from pipeline.clip.backbone import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from pipeline.errors import UserError

GLOBALS = {  # open_clip key -> CLIPModel key
    "logit_scale": "logit_scale",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "text_projection": "text_projection.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.proj": "visual_projection.weight",
}
TRANSPOSED = {"text_projection", "visual.proj"}
NORMS = {  # module names, `.weight` and `.bias` each
    "ln_final": "text_model.final_layer_norm",
    "visual.ln_pre": "vision_model.pre_layrnorm",  # sic: HF's spelling
    "visual.ln_post": "vision_model.post_layernorm",
}
BLOCK = {"ln_1": "layer_norm1", "attn.out_proj": "self_attn.out_proj", "ln_2": "layer_norm2",
         "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}  # fmt: skip
VISION_HEADS = {1280: 16, 1408: 16, 1664: 16, 1792: 16}  # inferred; else width // 64
IGNORED = {"attn_mask", "input_resolution", "context_length", "vocab_size"}  # no weights
OTHER_TOWERS = {  # key prefix -> what it is: only the standard ViT + text transformer convert
    "visual.layer1.": "a ModifiedResNet image tower",
    "visual.attnpool.": "a ModifiedResNet image tower",
    "visual.trunk.": "a timm image tower",
    "text.": "a Hugging Face text tower",
    "text_decoder.": "a CoCa text decoder",
    "visual.attn_pool": "attentional pooling (CoCa)",
    "logit_bias": "a SigLIP-style logit bias",
    "text_model.": "a Hugging Face CLIPModel state dict (no conversion needed)",
}
# open_clip's CLIPVisionCfg / CLIPTextCfg defaults of what the conversion reads
VISION_DEFAULTS = {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16,
                   "head_width": 64, "mlp_ratio": 4.0}  # fmt: skip
TEXT_DEFAULTS = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8,
                 "layers": 12, "mlp_ratio": 4.0}  # fmt: skip
REFUSED = {  # settings that the weights do not show -> the values that convert
    "vision_cfg.pool_type": ("tok",),
    "text_cfg.pool_type": ("argmax", "eos"),
    "text_cfg.no_causal_mask": (False,),
    "vision_cfg.act_kwargs": (None,),
    "text_cfg.act_kwargs": (None,),
    "vision_cfg.norm_kwargs": (None,),
    "text_cfg.norm_kwargs": (None,),
}


def _pairs(text_layers: int, vision_layers: int) -> dict[str, str]:
    """open_clip key -> CLIPModel key; `{}` in the latter: the q/k/v thirds of `in_proj_*`."""
    pairs, modules = dict(GLOBALS), dict(NORMS)
    towers = (("", "text_model", text_layers), ("visual.", "vision_model", vision_layers))
    for tower, model, layers in towers:
        for i in range(layers):
            oc, hf = f"{tower}transformer.resblocks.{i}.", f"{model}.encoder.layers.{i}."
            modules.update({oc + a: hf + b for a, b in BLOCK.items()})
            for p in ("weight", "bias"):
                pairs[f"{oc}attn.in_proj_{p}"] = f"{hf}self_attn.{{}}_proj.{p}"
    pairs.update({f"{a}.{p}": f"{b}.{p}" for a, b in modules.items() for p in ("weight", "bias")})
    return pairs


def _count(keys, pattern: str) -> int:
    """How many distinct layer numbers (group 1 of `pattern`) the keys hold."""
    return len({m.group(1) for k in keys if (m := re.match(pattern, k))})


def open_clip_to_hf(sd: dict, text_layers: int, vision_layers: int) -> dict:
    """open_clip state dict -> CLIPModel state dict; a missing or unused key is a UserError."""
    left, out = dict(sd), {}
    for oc, hf in _pairs(text_layers, vision_layers).items():
        if oc not in left:
            raise UserError(f"the checkpoint has no '{oc}' (expected in open_clip's CLIP layout)")
        t = left.pop(oc)
        if "{}" in hf:
            out.update({hf.format(n): c.clone() for n, c in zip("qkv", t.chunk(3))})
        else:
            out[hf] = t.t().contiguous() if oc in TRANSPOSED else t
    if unused := sorted(set(left) - IGNORED):
        raise UserError(f"unknown key '{unused[0]}' in the checkpoint ({len(unused)} unused)")
    return out


def hf_to_open_clip(sd: dict) -> dict:
    """CLIPModel state dict -> open_clip's `CLIP` layout (the inverse of `open_clip_to_hf`)."""
    text = _count(sd, r"text_model\.encoder\.layers\.(\d+)\.")
    vision = _count(sd, r"vision_model\.encoder\.layers\.(\d+)\.")
    out = {}
    for oc, hf in _pairs(text, vision).items():
        if "{}" in hf:
            out[oc] = torch.cat([sd[hf.format(n)] for n in "qkv"])
        else:
            out[oc] = sd[hf].t().contiguous() if oc in TRANSPOSED else sd[hf]
    return out


def read_state_dict(path: Path) -> dict:
    """The tensors of a `.safetensors` or weights-only torch file, unwrapped as open_clip's
    `load_state_dict` does (`state_dict`, `module.`; also a CustomTextCLIP's `text.`)."""
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:  # unpickles tensors and plain containers only, never other objects
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise UserError(f"{path}: holds pickled Python objects, not only tensors") from None
    except Exception as exc:  # noqa: BLE001 - a damaged file, whatever the reader says
        raise UserError(f"{path}: not a readable checkpoint ({exc})".splitlines()[0]) from None
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    if not isinstance(sd, dict) or not sd:
        raise UserError(f"{path}: holds no state dict")
    if all(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    if "text.positional_embedding" in sd:  # a CustomTextCLIP with the standard text tower
        sd = {k.removeprefix("text."): v for k, v in sd.items()}
    for key, value in sd.items():
        if what := next((w for p, w in OTHER_TOWERS.items() if key.startswith(p)), None):
            raise UserError(f"{path}: {what} ('{key}') is not supported, only a ViT CLIP")
        if not isinstance(value, torch.Tensor) and key not in IGNORED:
            raise UserError(f"{path}: '{key}' is a {type(value).__name__}, not a tensor")
    return sd


def infer_config(sd: dict) -> dict:
    """open_clip's model config of the weights, from their shapes (standard towers)."""
    for key in ("visual.conv1.weight", "visual.positional_embedding", "ln_final.weight",
                "positional_embedding", "token_embedding.weight", "text_projection"):  # fmt: skip
        if key not in sd:
            raise UserError(f"cannot infer the model config: the checkpoint has no '{key}'")
    vw, _, _, patch = sd["visual.conv1.weight"].shape
    tw = sd["ln_final.weight"].shape[0]
    if vw % 64 or tw % 64:
        raise UserError(f"cannot infer the heads of {vw}/{tw}-wide towers: pass --model-config")
    fc = "transformer.resblocks.0.mlp.c_fc.weight"  # MLP width / width: open_clip's mlp_ratio
    vision_mlp = sd[f"visual.{fc}"].shape[0] / vw if f"visual.{fc}" in sd else 4.0
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    heads = VISION_HEADS.get(vw, vw // 64)
    vision = {"image_size": int(patch * grid), "patch_size": int(patch), "width": int(vw),
              "layers": _count(sd, r"visual\.transformer\.resblocks\.(\d+)\."),
              "head_width": int(vw // heads), "mlp_ratio": vision_mlp}  # fmt: skip
    text = {"context_length": sd["positional_embedding"].shape[0], "width": int(tw),
            "vocab_size": sd["token_embedding.weight"].shape[0], "heads": int(tw // 64),
            "layers": _count(sd, r"transformer\.resblocks\.(\d+)\."),
            "mlp_ratio": sd[fc].shape[0] / tw if fc in sd else 4.0}  # fmt: skip
    return {"embed_dim": sd["text_projection"].shape[1], "vision_cfg": vision, "text_cfg": text}


def read_config(path: Path) -> tuple[dict, dict]:
    """(model config, preprocess config) from open_clip's JSON, with its defaults filled in."""
    try:
        raw = json.loads(path.read_text())
        cfg = raw.get("model_cfg", raw)
        v, t = cfg["vision_cfg"], cfg["text_cfg"]
        vision = {k: v.get(k, d) for k, d in VISION_DEFAULTS.items()}
        text = {k: t.get(k, d) for k, d in TEXT_DEFAULTS.items()}
        if t.get("pool_type") == "eos":  # pools at the first EOS, as Hugging Face does
            text.update(pool_type="eos", eos_id=t.get("eos_id"))
        model = {"embed_dim": cfg["embed_dim"], "quick_gelu": bool(cfg.get("quick_gelu", False))}
        for size in ("image_size", "patch_size"):  # open_clip allows [h, w]
            if isinstance(vision[size], list) and len(set(vision[size])) == 1:
                vision[size] = vision[size][0]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{path}: not an open_clip model config ({exc!r})") from None
    for name, accepted in REFUSED.items():
        section, key = name.split(".")
        if (value := cfg[section].get(key, accepted[0])) not in accepted:
            ok = " or ".join(map(repr, accepted))
            raise UserError(f"{path}: {name}={value!r} is not supported, only {ok}")
    for section, values in (("vision_cfg", vision), ("text_cfg", text)):
        for key, value in values.items():
            if not isinstance(value, float | int) and key != "pool_type":
                raise UserError(f"{path}: {section}.{key}={value!r} is not a ViT CLIP's number")
    return {**model, "vision_cfg": vision, "text_cfg": text}, raw.get("preprocess_cfg") or {}


def image_settings(preprocess: dict) -> tuple[tuple, tuple]:
    """(mean, std) of open_clip's preprocess config; resizes CLIP's processor lacks refused."""
    for key, ok in (("resize_mode", "shortest"), ("interpolation", "bicubic")):
        if preprocess.get(key, ok) != ok:
            raise UserError(f"preprocess_cfg.{key}={preprocess[key]!r} is not supported ({ok})")
    mean = tuple(float(x) for x in preprocess.get("mean", OPENAI_CLIP_MEAN))
    std = tuple(float(x) for x in preprocess.get("std", OPENAI_CLIP_STD))
    return mean, std


def _tower(c: dict, heads: int, act: str, embed_dim: int) -> dict:
    """The settings of one Hugging Face CLIP tower (open_clip: MLP int(width * mlp_ratio);
    round() keeps an inferred ratio, MLP width / width, exact)."""
    return {
        "hidden_size": c["width"],
        "intermediate_size": round(c["width"] * c["mlp_ratio"]),
        "num_hidden_layers": c["layers"],
        "num_attention_heads": heads,
        "hidden_act": act,
        "projection_dim": embed_dim,
    }


LEGACY_IDS = {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2}  # transformers: argmax


def text_pooling(cfg: dict, tokenizer) -> str:
    """How the converted text tower must pool (module docstring): "eos" (at the tokenizer's
    EOS) or "argmax" (the legacy config ids); a `UserError` when transformers cannot."""
    eos, highest = tokenizer.eos_token_id, max(tokenizer.get_vocab().values())
    if cfg["text_cfg"].get("pool_type", "argmax") == "argmax":
        return "eos" if eos == highest else "argmax"
    if eos == LEGACY_IDS["eos_token_id"] and eos != highest:
        raise UserError("text_cfg.pool_type eos with EOS id 2: transformers would pool that "
                        "text tower at the highest token id")  # fmt: skip
    return "eos"


def hf_config(cfg: dict, tokenizer, act: str, pooling: str = "eos"):
    """The `CLIPConfig` of open_clip model config `cfg` with the tokenizer's special ids, or
    the legacy ones for `pooling` "argmax" (`text_pooling`); not `checkpoint.hf_clip_config`:
    open_clip's towers differ in width, depth and heads."""
    from transformers import CLIPConfig

    v, t, embed, eos = cfg["vision_cfg"], cfg["text_cfg"], cfg["embed_dim"], tokenizer.eos_token_id
    pad = eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos, "pad_token_id": pad}
    ids = LEGACY_IDS if pooling == "argmax" else ids
    try:
        text = _tower(t, t["heads"], act, embed) | ids
        text |= {"vocab_size": t["vocab_size"], "max_position_embeddings": t["context_length"]}
        vision = _tower(v, v["width"] // v["head_width"], act, embed)
        vision |= {"image_size": v["image_size"], "patch_size": v["patch_size"]}
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=embed)
    except (ValueError, ZeroDivisionError) as exc:
        raise UserError(f"bad model config: {exc}".splitlines()[0]) from None


def load_tokenizer(name: str, vocab_size: int):
    """The tokenizer of folder or hub id `name`; it must have `vocab_size` ids and an EOS."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load tokenizer '{name}' ({exc})".splitlines()[0]) from None
    if len(tok) != vocab_size or tok.eos_token_id is None:
        raise UserError(f"tokenizer '{name}' has {len(tok)} tokens (EOS: {tok.eos_token_id}), "
                        f"the checkpoint's token embedding {vocab_size}")  # fmt: skip
    return tok


def checked_model(config, weights: dict):
    """`CLIPModel(config)` holding `weights`, every parameter filled with the right shape
    (built on the meta device: no random init of a large model)."""
    from transformers import CLIPModel

    with torch.device("meta"):
        model = CLIPModel(config)
    expected = model.state_dict()
    if missing := sorted(set(expected) - set(weights)):
        raise UserError(f"the converted weights lack '{missing[0]}' ({len(missing)} missing)")
    if extra := sorted(set(weights) - set(expected)):
        raise UserError(f"the converted weights have an unknown '{extra[0]}'")
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            want = tuple(expected[key].shape)
            raise UserError(f"'{key}' has shape {tuple(value.shape)}, the config says {want}")
    model.load_state_dict(weights, strict=True, assign=True)
    return model


def main(
    checkpoint: Path, out: Path, *, tokenizer: str, model_config: Path | None, quick_gelu: bool
) -> str:
    """Convert open_clip `checkpoint` into the Hugging Face CLIP folder `out` (atomically)."""
    from pipeline.atomic import write_json
    from pipeline.clip.backbone import weights_sha256
    from pipeline.clip.checkpoint import save_checkpoint, save_image_settings, staged_folder

    checkpoint = Path(checkpoint)
    sd = read_state_dict(checkpoint)
    cfg, preprocess = read_config(Path(model_config)) if model_config else (infer_config(sd), {})
    cfg["quick_gelu"] = bool(quick_gelu or cfg.get("quick_gelu"))
    mean, std = image_settings(preprocess)
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    tok = load_tokenizer(tokenizer, t["vocab_size"])
    if t.get("pool_type") == "eos" and t["eos_id"] != tok.eos_token_id:
        raise UserError(
            f"text_cfg.eos_id={t['eos_id']} is not the tokenizer's EOS {tok.eos_token_id}"
        )
    act = "quick_gelu" if cfg["quick_gelu"] else "gelu"
    pooling = text_pooling(cfg, tok)
    config = hf_config(cfg, tok, act, pooling)
    model = checked_model(config, open_clip_to_hf(sd, t["layers"], v["layers"]))
    with open(checkpoint, "rb") as fh:
        sha = "sha256:" + hashlib.file_digest(fh, "sha256").hexdigest()
    record = {
        "source": checkpoint.name,
        "sha256": sha,
        "model_config": cfg,
        "model_config_from": Path(model_config).name if model_config else "the weights' shapes",
        "quick_gelu": cfg["quick_gelu"],
        "image_mean": list(mean),
        "image_std": list(std),
        "text_pooling": pooling,  # "argmax": the config carries the legacy ids 0/1/2
    }
    with staged_folder(out) as tmp:
        save_checkpoint(model, lambda f: tok.save_pretrained(str(f)), tmp, v["image_size"])
        if (mean, std) != (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD):  # save_checkpoint wrote OpenAI's
            save_image_settings(tmp, v["image_size"], mean, std)
        write_json(tmp / "open_clip.json", record)
    return (
        f"convert-open-clip: {checkpoint.name} -> {out} (ViT {v['layers']}x{v['width']}/"
        f"{v['patch_size']} at {v['image_size']} px, text {t['layers']}x{t['width']}, "
        f"embed {cfg['embed_dim']}, heads {v['width'] // v['head_width']}/{t['heads']}, {act}, "
        f"text pooled at {'the highest id' if pooling == 'argmax' else 'EOS'}; "
        f"{weights_sha256(out)[:19]})"
    )
