"""The CLIP backbone loader on a tiny random checkpoint (offline, seconds)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_clip import make_tiny_clip

from pipeline.clip.backbone import load_backbone, preprocess_image, to_rgb, weights_sha256
from pipeline.errors import UserError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    rs = np.random.RandomState(seed)
    imgs = [
        Image.fromarray(rs.randint(0, 256, (size + 9, size + 3, 3), dtype=np.uint8))
        for _ in range(n)
    ]
    return torch.stack([preprocess_image(im, size) for im in imgs])


def test_layout_and_fields(tiny):
    names = sorted(p.name for p in tiny.iterdir())
    assert names == [
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    bb = load_backbone(tiny)
    assert bb.model_id == str(tiny.resolve())
    assert bb.revision == weights_sha256(tiny) and bb.revision.startswith("sha256:")
    assert (bb.image_size, bb.context_length, bb.dim) == (32, 16, 16)
    assert (bb.pad_token_id, bb.bos_token_id, bb.eos_token_id) == (0, 2, 3)
    assert bb.device.type == "cpu"
    with bb.autocast():  # no autocast on the CPU: fp32
        assert not torch.is_autocast_enabled("cpu")
    assert bb.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_tokenize_bos_eos_and_truncation(tiny):
    bb = load_backbone(tiny)
    short, long = bb.tokenize(["A red circle", "red " * 40])
    assert short[0] == 2 and short[-1] == 3 and len(short) == 5
    assert bb.tokenizer.decode(short, skip_special_tokens=True) == "a red circle"
    assert len(long) == 16 and long[0] == 2 and long[-1] == 3


def test_embeddings_normalised_and_padding_invariant(tiny):
    bb = load_backbone(tiny)
    alone = bb.encode_texts(["a cat"])
    batched = bb.encode_texts(["a cat", "two large dogs on a green sofa next to the table"])
    assert batched.shape == (2, 16) and batched.dtype == torch.float32
    torch.testing.assert_close(batched.norm(dim=1), torch.ones(2))
    torch.testing.assert_close(alone[0], batched[0], atol=1e-6, rtol=0)  # pooled at EOS, pad masked
    img = bb.encode_images(_images(3, 32))
    assert img.shape == (3, 16) and img.device.type == "cpu"
    torch.testing.assert_close(img.norm(dim=1), torch.ones(3))
    assert bb.encode_texts([]).shape == (0, 16)


def test_save_load_round_trip_identical(tiny, tmp_path):
    bb = load_backbone(tiny)
    pixels = _images(4, 32, seed=1)
    texts = ["a red circle on a blue square", "what is this?", "the man near the table"]
    img1, txt1 = bb.encode_images(pixels), bb.encode_texts(texts)
    out = tmp_path / "copy"
    bb.model.save_pretrained(out)
    bb.tokenizer.save_pretrained(out)
    (out / "preprocessor_config.json").write_bytes((tiny / "preprocessor_config.json").read_bytes())
    bb2 = load_backbone(out)
    assert bb2.revision == bb.revision  # same weights, same bytes
    assert bb2.tokenize(texts) == bb.tokenize(texts)
    assert torch.equal(bb2.encode_images(pixels), img1)
    assert torch.equal(bb2.encode_texts(texts), txt1)
    assert torch.equal(bb2.token_embedding(), bb.token_embedding())


def test_make_tiny_clip_is_deterministic(tiny, tmp_path):
    again = make_tiny_clip(tmp_path / "again")
    assert weights_sha256(again) == weights_sha256(tiny)


def test_token_embedding_table(tiny):
    bb = load_backbone(tiny)
    table = bb.token_embedding()
    vocab = bb.model.config.text_config.vocab_size
    assert table.shape == (vocab, 32) and table.dtype == torch.float32
    assert torch.equal(table, bb.model.text_model.embeddings.token_embedding.weight.detach())
    table.zero_()  # a copy: the model is untouched
    assert bb.model.text_model.embeddings.token_embedding.weight.abs().sum() > 0


@pytest.mark.parametrize(
    "h,w,mode",
    [
        (40, 60, "RGB"),
        (75, 33, "RGB"),
        (20, 25, "RGB"),
        (50, 50, "RGBA"),
        (37, 80, "L"),
        (32, 32, "RGB"),
        (300, 500, "CMYK"),
    ],
)
def test_preprocess_matches_clip_image_processor(tiny, h, w, mode):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil.from_pretrained(tiny)
    rs = np.random.RandomState(h * w)
    img = Image.fromarray(rs.randint(0, 256, (h, w, 4), dtype=np.uint8)).convert(mode)
    ref = proc(images=img, return_tensors="np")["pixel_values"][0]
    mine = preprocess_image(img, 32, proc.image_mean, proc.image_std).numpy()
    assert mine.shape == ref.shape == (3, 32, 32)
    # Same PIL bicubic resize on uint8, same crop offsets: only float rounding differs.
    assert np.abs(mine - ref).max() < 1e-5


def test_preprocess_is_picklable_partial(tiny):
    bb = load_backbone(tiny)
    fn = pickle.loads(pickle.dumps(bb.image_transform()))
    img = Image.new("RGB", (64, 48), (255, 0, 0))
    x = fn(img)
    assert x.shape == (3, 32, 32)
    expected = (1.0 - 0.48145466) / 0.26862954
    assert x[0, 0, 0].item() == pytest.approx(expected, abs=1e-6)


def test_to_rgb_scales_16_bit_grey():
    arr = np.array([[0, 32768, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    rgb = np.asarray(to_rgb(img))
    assert rgb.shape == (1, 3, 3)
    assert rgb[0, :, 0].tolist() == [0, 128, 255]


def test_bad_paths_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_backbone(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_backbone(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="folder or a hub id"):
        load_backbone(tmp_path / "file.txt")


def test_uint8_crop_then_normalize_equals_preprocess():
    from pipeline.clip.backbone import normalize_pixels, resize_crop

    rs = np.random.RandomState(3)
    img = Image.fromarray(rs.randint(0, 256, (50, 90, 3), dtype=np.uint8))
    crop = resize_crop(img, 32)
    assert crop.shape == (3, 32, 32) and crop.dtype == np.uint8
    x = normalize_pixels(torch.from_numpy(crop)[None])[0]
    torch.testing.assert_close(x, preprocess_image(img, 32), atol=1e-6, rtol=0)


def test_letterbox_pads_to_a_centred_square_with_the_mean_colour():
    from pipeline.clip.backbone import CLIP_MEAN_PIXEL, letterbox, letterbox_resize, mean_pixel

    assert CLIP_MEAN_PIXEL == mean_pixel() == (123, 117, 104)
    assert mean_pixel((0.5, 0.0, 1.0)) == (128, 0, 255)
    img = Image.new("RGB", (30, 10), (255, 0, 0))
    sq = letterbox(img)
    assert sq.size == (30, 30)
    arr = np.asarray(sq)
    assert (arr[10:20] == (255, 0, 0)).all()  # centred: 10 rows of fill above and below
    assert (arr[:10] == CLIP_MEAN_PIXEL).all() and (arr[20:] == CLIP_MEAN_PIXEL).all()
    assert letterbox(Image.new("L", (5, 5), 7)).mode == "RGB"  # squares only converted
    px = letterbox_resize(Image.new("RGB", (8, 20), (0, 0, 255)), 16, fill=(1, 2, 3))
    assert px.shape == (3, 16, 16) and px.dtype == np.uint8
    assert tuple(px[:, 8, 0]) == (1, 2, 3) and tuple(px[:, 8, 8]) == (0, 0, 255)
    # a square crop: letterbox_resize is the plain resize (as the standard preprocessing)
    rs = np.random.RandomState(5)
    square = Image.fromarray(rs.randint(0, 256, (20, 20, 3), dtype=np.uint8))
    from pipeline.clip.backbone import resize_crop

    assert np.array_equal(letterbox_resize(square, 32), resize_crop(square, 32))


def test_a_checkpoint_that_cannot_be_loaded_is_one_line(tmp_path):
    """A pickle that is not weights, a truncated safetensors file, a config without weights:
    a `UserError` naming the folder (the CLI prints it as one line), never random weights."""
    import pickle
    import shutil

    from typer.testing import CliRunner

    from pipeline.cli import app

    good = make_tiny_clip(tmp_path / "good")
    cases = {}
    for name in ("dict", "list", "truncated", "none"):
        shutil.copytree(good, tmp_path / name)
        (tmp_path / name / "model.safetensors").unlink()
        cases[name] = tmp_path / name
    torch.save({"not": "weights"}, cases["dict"] / "pytorch_model.bin")
    (cases["list"] / "pytorch_model.bin").write_bytes(pickle.dumps([1, 2, 3]))
    data = (good / "model.safetensors").read_bytes()
    (cases["truncated"] / "model.safetensors").write_bytes(data[: len(data) // 2])
    want = {
        "dict": "lacks 78 of the model's 78 weights",
        "list": "pytorch_model.bin holds something other than tensors",
        "truncated": "Error while deserializing header",
        "none": "no file named model.safetensors, or pytorch_model.bin",
    }
    for name, folder in cases.items():
        with pytest.raises(UserError, match=want[name]):
            load_backbone(folder, "cpu")
        (tmp_path / "in").mkdir(exist_ok=True)
        res = CliRunner().invoke(app, ["embed", "--dataset", "laion", "--input", str(tmp_path / "in"),
                                       "--images", str(tmp_path / "in"), "--clip", str(folder),
                                       "--out", str(tmp_path / "out")])  # fmt: skip
        assert res.exit_code == 2 and want[name] in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1, res.output
