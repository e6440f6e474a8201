"""Any Hugging Face CLIP checkpoint (hub id or local folder) behind one small interface.

`load_backbone(name_or_path)` opens the model (`CLIPModel`), its tokenizer
(`AutoTokenizer`) and its image-processor settings (`preprocessor_config.json`) through
`from_pretrained`, whatever saved the folder (openai/clip-*, `clip_bootstrap`, the tests).
Embeddings are L2-normalised fp32 on the CPU; on CUDA the forward runs under bf16
autocast, on the CPU in fp32 (same code path).

transformers 5: `get_image_features` / `get_text_features` return an output object whose
`.pooler_output` is the *projected* embedding (the projection is applied inside).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import pickle
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.compute import autocast, scaler
from pipeline.errors import UserError
from pipeline.training import pick_device

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The token-embedding table a CLIP folder may hold beside its weights
# (`pipeline.clip.token_table`); not a weight file, so not part of the revision.
TOKEN_TABLE_FILE = "token_embedding.safetensors"


# --------------------------------------------------------------------------- images


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB copy of `img`: transparency composited on white (as transformers does), 16-bit
    and 32-bit grey scaled down to 8 bits (PIL's own convert would clip them), CMYK, grey
    and palette images converted."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def resize_crop(img: Image.Image, size: int, resize: int | None = None) -> np.ndarray:
    """RGB, shortest side to `resize` (default `size`) bicubic, center crop: uint8 (3, size, size).

    The long side becomes `int(resize * long / short)`; the crop's top/left offset is
    `(dim - size) // 2`, with zero padding when the image is smaller (as transformers).
    """
    img = to_rgb(img)
    short = size if resize is None else resize
    w, h = img.size
    if w <= h:
        new_w, new_h = short, int(short * h / w)
    else:
        new_w, new_h = int(short * w / h), short
    if (new_w, new_h) != (w, h):
        img = img.resize((max(new_w, 1), max(new_h, 1)), resample=Image.Resampling.BICUBIC)
    arr = _center_crop(np.asarray(img, dtype=np.uint8), size)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def mean_pixel(mean: Sequence[float] = OPENAI_CLIP_MEAN) -> tuple[int, int, int]:
    """The CLIP's mean colour as 8-bit RGB (rounded): the letterbox fill, which normalises
    to about 0 in every channel."""
    r, g, b = (min(255, max(0, round(float(m) * 255))) for m in mean)
    return r, g, b


CLIP_MEAN_PIXEL = mean_pixel(OPENAI_CLIP_MEAN)  # (123, 117, 104)


def letterbox(img: Image.Image, fill: tuple[int, int, int] = CLIP_MEAN_PIXEL) -> Image.Image:
    """RGB `img` padded to a square of its longest side, centred, the rest `fill`.

    LLaVA's `expand2square` (fill: the CLIP's mean colour): unlike a center crop it keeps
    every pixel, so both objects of a wide union box survive.
    """
    img = to_rgb(img)
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new("RGB", (side, side), tuple(fill))
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def letterbox_resize(
    img: Image.Image, size: int, fill: tuple[int, int, int] = CLIP_MEAN_PIXEL
) -> np.ndarray:
    """A box crop as the model sees it: `letterbox`, then bicubic resize to `size` x `size`
    (straight to the input size, no center crop): uint8 (3, size, size)."""
    img = letterbox(img, fill)
    if img.size != (size, size):
        img = img.resize((size, size), resample=Image.Resampling.BICUBIC)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def normalize_pixels(
    x: torch.Tensor,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> torch.Tensor:
    """uint8 (n, 3, H, W) or (3, H, W) -> float32 scaled to [0, 1] and normalised."""
    shape = (3, 1, 1)
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(shape)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(shape)
    return (x.float() * (1 / 255) - m) / s


def preprocess_image(
    img: Image.Image,
    size: int,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    resize: int | None = None,
) -> torch.Tensor:
    """CLIPImageProcessor's steps in plain PIL + numpy (picklable, fine in DataLoader workers).

    `resize_crop` (RGB, bicubic shortest-side resize, center crop), then scale to [0, 1]
    and normalise with `mean` / `std`. Returns a float32 tensor (3, size, size).
    """
    out = resize_crop(img, size, resize).astype(np.float32) * np.float32(1 / 255)
    out -= np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    out /= np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return torch.from_numpy(out)


def _center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    h, w = arr.shape[:2]
    if h < size or w < size:  # pad with zeros first, as transformers' center_crop does
        ph, pw = max(size, h), max(size, w)
        padded = np.zeros((ph, pw, arr.shape[2]), dtype=arr.dtype)
        top, left = -(-(ph - h) // 2), -(-(pw - w) // 2)
        padded[top : top + h, left : left + w] = arr
        arr, h, w = padded, ph, pw
    top, left = (h - size) // 2, (w - size) // 2
    return arr[top : top + size, left : left + size]


# --------------------------------------------------------------------------- backbone


@dataclass
class Backbone:
    """A CLIP model with its tokenizer and image settings; see `load_backbone`."""

    model: torch.nn.Module  # transformers.CLIPModel
    tokenizer: object
    image_size: int
    mean: tuple
    std: tuple
    device: torch.device  # the forward runs under `compute.autocast` (CUDA only)
    model_id: str  # hub id, or folder path (relative when inside the working directory)
    revision: str  # hub commit hash, or "sha256:<hex>" of the weights
    context_length: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    resize_size: int | None = None  # shortest side before the crop when it differs from image_size
    _scaler: torch.amp.GradScaler | None = field(default=None, repr=False)

    @property
    def dim(self) -> int:
        return int(self.model.config.projection_dim)

    def image_transform(self) -> functools.partial:
        """Picklable `PIL.Image -> (3, S, S) tensor` for DataLoader workers."""
        return functools.partial(
            preprocess_image,
            size=self.image_size,
            mean=self.mean,
            std=self.std,
            resize=self.resize_size,
        )

    def autocast(self):
        """Autocast at `compute.precision` on CUDA, a no-op on the CPU (`pipeline.compute`)."""
        return autocast(self.device)

    def scaler(self) -> torch.amp.GradScaler:
        """The GradScaler of training steps on this backbone (one, kept: its scale adapts)."""
        if self._scaler is None:
            self._scaler = scaler(self.device)
        return self._scaler

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) preprocessed pixels -> (n, d) L2-normalised fp32 on the CPU."""
        with torch.inference_mode(), self.autocast():
            pixels = pixels.to(self.device, non_blocking=True)
            out = self.model.get_image_features(pixel_values=pixels).pooler_output
        return _normalise(out)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids with BOS ... EOS, truncated to the context length (EOS kept)."""
        if not texts:
            return []
        enc = self.tokenizer(
            list(texts),
            truncation=True,
            max_length=self.context_length,
            add_special_tokens=True,
        )
        return [list(map(int, ids)) for ids in enc["input_ids"]]

    def encode_token_ids(self, ids: list[list[int]]) -> torch.Tensor:
        """Token id lists (as `tokenize` gives) -> (n, d) L2-normalised fp32 on the CPU."""
        if not ids:
            return torch.zeros((0, self.dim), dtype=torch.float32)
        n, longest = len(ids), max(len(x) for x in ids)
        input_ids = torch.full((n, longest), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, longest), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        with torch.inference_mode(), self.autocast():
            out = self.model.get_text_features(
                input_ids=input_ids.to(self.device, non_blocking=True),
                attention_mask=mask.to(self.device, non_blocking=True),
            ).pooler_output
        return _normalise(out)

    def encode_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """Texts -> (n, d) L2-normalised fp32 on the CPU (tokenised as `tokenize` does)."""
        ids = self.tokenize(texts)
        parts = [
            self.encode_token_ids(ids[i : i + batch_size]) for i in range(0, len(ids), batch_size)
        ]
        return torch.cat(parts) if parts else torch.zeros((0, self.dim), dtype=torch.float32)

    def token_embedding(self) -> torch.Tensor:
        """The text model's token-embedding table (vocab, width), fp32 on the CPU."""
        weight = self.model.text_model.embeddings.token_embedding.weight
        return weight.detach().to("cpu", torch.float32).clone()


def _portable(folder: str) -> str:
    """A folder inside the working directory as a relative path (manifests and metrics in
    git stay valid in another clone); anything else absolute."""
    path, cwd = Path(folder), Path.cwd().resolve()
    return str(path.relative_to(cwd)) if path.is_relative_to(cwd) else str(path)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return torch.nn.functional.normalize(x, dim=-1).cpu()


def weight_files(folder: str | Path) -> list[Path]:
    """The weight files transformers loads from a folder: `model.safetensors`, else its
    shards (`model-*.safetensors`), else `pytorch_model*.bin`. Other files (the token table
    `clip_bootstrap` writes, LAION's `open_clip_model.safetensors`) are not the model's."""
    folder = Path(folder)
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    return sorted(folder.glob("model-*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))


def weights_sha256(folder: str | Path) -> str:
    """`sha256:<hex>` over the folder's `weight_files` (the same for a copy of the folder
    with only those)."""
    files = weight_files(folder)
    h = hashlib.sha256()
    for f in files:
        if len(files) > 1:
            h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()


def _hub_commit(repo_id: str) -> str:
    """Commit hash of the cached hub snapshot that `from_pretrained` just used."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(path, str) and "/snapshots/" in path:
        return Path(path).parent.name
    return "unknown"


def _image_settings(source: str) -> tuple[int, int | None, tuple, tuple]:
    """(crop size, shortest-edge resize or None, mean, std) from preprocessor_config.json."""
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        cfg, _ = ImageProcessingMixin.get_image_processor_dict(source)
    except OSError as exc:
        raise UserError(
            f"{source}: no usable preprocessor_config.json ({exc})".splitlines()[0]
        ) from None
    crop = cfg.get("crop_size", cfg.get("size", 224))
    crop = crop if isinstance(crop, int) else crop.get("height", crop.get("shortest_edge"))
    size = cfg.get("size", crop)
    size = size if isinstance(size, int) else size.get("shortest_edge", size.get("height"))
    mean = tuple(float(v) for v in cfg.get("image_mean", OPENAI_CLIP_MEAN))
    std = tuple(float(v) for v in cfg.get("image_std", OPENAI_CLIP_STD))
    return int(crop), (None if int(size) == int(crop) else int(size)), mean, std


@contextlib.contextmanager
def quiet_transformers():
    """No per-tensor progress bars from transformers while loading or saving."""
    from transformers.utils import logging as hf_logging

    was_enabled, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # its load report: what is wrong is raised, in one line
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_backbone(name_or_path: str | Path, device: str | None = "auto") -> Backbone:
    """Open a CLIP checkpoint: a local folder in the Hugging Face layout or a hub id, on
    `device` (`auto`: cuda when available, else cpu; see `training.pick_device`)."""
    from safetensors import SafetensorError
    from transformers import AutoTokenizer, CLIPModel

    name = str(name_or_path)
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise UserError(f"{local}: not a CLIP checkpoint folder (no config.json)")
        source = str(local.resolve())
    elif local.exists():
        raise UserError(f"{local}: a CLIP checkpoint must be a folder or a hub id")
    elif name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise UserError(f"CLIP checkpoint folder not found: {name}")
    else:
        source = name  # hub id
    dev = pick_device(device)
    try:
        with quiet_transformers(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            model, info = CLIPModel.from_pretrained(source, dtype=torch.float32,
                                                    output_loading_info=True)  # fmt: skip
            tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError, SafetensorError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if isinstance(exc, pickle.UnpicklingError):
            msg = "pytorch_model.bin holds something other than tensors (torch.load refused it)"
        where = "folder" if local.is_dir() else "(no such folder; hub)"
        raise UserError(f"cannot load CLIP checkpoint {where} '{name}': {msg}") from None
    params = dict(model.named_parameters())
    missing = sorted(k for k in info["missing_keys"] if k in params)
    if missing:
        raise UserError(f"CLIP checkpoint '{name}' lacks {len(missing)} of the model's "
                        f"{len(params)} weights (e.g. {missing[0]}): not the weights of this "
                        "CLIP config")  # fmt: skip
    image_size, resize, mean, std = _image_settings(source)
    model.eval().to(dev)
    text_cfg = model.config.text_config
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else text_cfg.eos_token_id
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else text_cfg.bos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    context = min(int(tokenizer.model_max_length), int(text_cfg.max_position_embeddings))
    revision = weights_sha256(source) if local.is_dir() else _hub_commit(source)
    return Backbone(
        model=model,
        tokenizer=tokenizer,
        image_size=image_size,
        mean=mean,
        std=std,
        device=dev,
        model_id=_portable(source) if local.is_dir() else source,
        revision=revision,
        context_length=context,
        bos_token_id=int(bos),
        eos_token_id=int(eos),
        pad_token_id=int(pad),
        resize_size=resize,
    )


def embed_image(backbone, image: str | Path, box=None) -> torch.Tensor:
    """(1, d) CLIP embedding of the image or of its box crop (letterboxed with the CLIP's
    mean colour, `letterbox_resize`), decoded as embed decodes."""
    from pipeline.imagedecode import BAD_BOX, decode_image, read_bytes

    data = read_bytes(str(image))
    if data is None:
        raise UserError(f"image not found: {image}")
    decoded = decode_image(
        data,
        backbone.image_size,
        backbone.resize_size,
        boxes=(box,) if box else (),
        whole=box is None,
        fill=mean_pixel(backbone.mean),
    )
    if decoded.skip:
        raise UserError(f"cannot use image {image}: {decoded.skip}")
    if decoded.bad_boxes:
        raise UserError(f"--box {box} lies outside the image {image} ({BAD_BOX})")
    pixels = normalize_pixels(torch.from_numpy(decoded.pixels), backbone.mean, backbone.std)
    return backbone.encode_images(pixels)
