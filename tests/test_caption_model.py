"""Caption decoder, its data loader and the train_caption stage on tiny random data."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import save_file

from pipeline.caption.data import load_captions, load_images, load_token_table
from pipeline.caption.training import PLOT_COLUMNS, Trainer
from pipeline.embedding.files import read_table, vector_array, write_table
from pipeline.errors import UserError
from pipeline.nn.caption_decoder import (
    CaptionDecoder,
    DecoderConfig,
    DecoderSettings,
    load_caption_model,
    save_caption_model,
    split_batch,
)
from pipeline.settings import SettingError, load
from pipeline.stages.train_caption import Settings, main

ROOT = Path(__file__).resolve().parents[1]

VOCAB, WIDTH, DIM = 40, 16, 12
BOS, EOS, PAD = 2, 3, 0


def tiny_config(**kw) -> DecoderConfig:
    base = {
        "image_dim": DIM,
        "vocab_size": VOCAB,
        "token_width": WIDTH,
        "width": 16,
        "layers": 1,
        "heads": 2,
        "prefix_len": 2,
        "max_len": 10,
        "dropout": 0.0,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
    }
    return DecoderConfig(**{**base, **kw})


def write_emb_folder(folder: Path, rows: list[tuple], table: torch.Tensor, seed: int = 0) -> None:
    """rows: (image_id, split, caption token ids); image_emb depends on the image id only."""
    rng = np.random.default_rng(seed)
    vecs = {}
    for image_id, _, _ in rows:
        if image_id not in vecs:
            v = rng.normal(size=DIM)
            vecs[image_id] = v / np.linalg.norm(v)
    emb = np.stack([vecs[r[0]] for r in rows]).astype(np.float16)
    t = pa.table(
        {
            "id": [f"{r[0]}#{k}" for k, r in enumerate(rows)],
            "image_id": [r[0] for r in rows],
            "split": [r[1] for r in rows],
            "image_emb": vector_array(emb),
            "text_emb": vector_array(emb),
            "caption": [" ".join(map(str, r[2])) for r in rows],
            "token_ids": pa.array([r[2] for r in rows], type=pa.list_(pa.int32())),
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    write_table(folder / "part-00000.arrow", t)
    save_file({"weight": table.contiguous()}, str(folder / "token_embedding.safetensors"))
    tok = {
        "vocab_size": VOCAB,
        "width": WIDTH,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
    }
    (folder / "manifest.json").write_text(
        json.dumps(
            {
                "model": "tiny",
                "revision": "abc",
                "dim": DIM,
                "dtype": "float16",
                "normalized": True,
                "rows": len(rows),
                "token_embedding": tok,
            }
        )
    )


def random_rows(n_images: int, per_image: int, splits, seed: int) -> list[tuple]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_images):
        split = splits[i % len(splits)]
        for _ in range(per_image):
            body = rng.integers(4, VOCAB, size=rng.integers(1, 7)).tolist()
            rows.append((f"img{seed}_{i}", split, [BOS, *body, EOS]))
    return rows


@pytest.fixture
def emb_dirs(tmp_path):
    table = torch.randn(VOCAB, WIDTH, generator=torch.Generator().manual_seed(0))
    laion, flickr = tmp_path / "laion", tmp_path / "flickr30k"
    write_emb_folder(laion, random_rows(24, 1, ["train"], 1), table, seed=1)
    write_emb_folder(
        flickr, random_rows(12, 3, ["train", "train", "val", "test"], 2), table, seed=2
    )
    return laion, flickr


def test_load_captions_pads_truncates_and_groups_images(tmp_path):
    table = torch.randn(VOCAB, WIDTH)
    rows = [
        ("a", "train", [BOS, 5, 6, EOS]),
        ("a", "train", [BOS, 7, EOS]),
        ("b", "val", [BOS, 8, EOS]),
        ("c", "train", [BOS, 9, 10, 11, 12, 13, EOS]),
        ("d", "train", [BOS]),
    ]
    write_emb_folder(tmp_path, rows, table)
    cs = load_captions(tmp_path, ("train",), max_len=5, pad_id=PAD, eos_id=EOS)
    assert cs.ids.tolist() == [
        [BOS, 5, 6, EOS, PAD],
        [BOS, 7, EOS, PAD, PAD],
        [BOS, 9, 10, 11, EOS],
    ]
    assert cs.lengths.tolist() == [4, 3, 5]
    assert cs.truncated == 1 and cs.skipped == {"too_short": 1}
    assert cs.image_ids == ["a", "c"] and cs.image_index.tolist() == [0, 0, 1]
    assert cs.image_emb.dtype == torch.float16 and cs.image_emb.shape == (3, DIM)
    assert torch.equal(cs.images()[0], cs.image_emb[0]) and torch.equal(
        cs.images()[1], cs.image_emb[2]
    )
    ids, imgs = load_images(tmp_path, ["train", "val"])
    assert ids == ["a", "b", "c", "d"] and imgs.shape == (4, DIM)
    assert torch.equal(load_token_table(tmp_path), table)


def test_forward_shapes_and_padding_is_masked():
    torch.manual_seed(0)
    model = CaptionDecoder(tiny_config(), torch.randn(VOCAB, WIDTH)).eval()
    ids = torch.tensor([[BOS, 5, 6, EOS, PAD, PAD], [BOS, 7, 8, 9, 10, EOS]])
    lengths = torch.tensor([4, 6])
    inputs, targets, mask = split_batch(ids, lengths)
    assert mask.tolist() == [[True, True, True, False, False], [True] * 5]
    img = torch.randn(2, DIM)
    pred = model(img, inputs)
    assert pred.shape == (2, 5, WIDTH)
    loss = model.caption_loss(pred, targets, mask)
    other = ids.clone()
    other[0, 4:] = torch.tensor([30, 31])  # garbage in the padding changes nothing
    i2, t2, m2 = split_batch(other, lengths)
    assert torch.equal(model.caption_loss(model(img, i2), t2, m2), loss)


def test_decoder_config_rejects_bad_settings_and_resolves_the_target_scale():
    with pytest.raises(SettingError) as exc:
        DecoderSettings(loss="l1")
    assert exc.value.key == "loss"
    with pytest.raises(UserError, match="divisible"):
        DecoderSettings(width=30, heads=4)
    with pytest.raises(UserError, match="train_caption.model.colour: unknown"):
        load(Settings, {"train_caption": {"model": {"colour": "red"}}})
    with pytest.raises(UserError, match="train_caption.model.loss: expected one of"):
        load(Settings, {"train_caption": {"model": {"loss": "l1"}}})
    assert tiny_config(token_width=64).target_scale == 8.0
    assert tiny_config(target_norm=False).target_scale == 1.0
    assert tiny_config(target_scale=2.5).target_scale == 2.5
    with pytest.raises(UserError):
        tiny_config(bos_token_id=VOCAB)  # not a row of the table


def test_the_one_default_is_params_yaml():
    """The settings' defaults are the values of params.yaml (the default run)."""
    assert load(Settings, ROOT / "params.yaml") == Settings()
    assert Settings().model == DecoderSettings() and DecoderSettings().prefix_len == 4


@pytest.mark.parametrize("loss", ["mse", "cosine", "ce"])
def test_a_few_training_steps_lower_the_loss(loss):
    torch.manual_seed(0)
    model = CaptionDecoder(tiny_config(loss=loss), torch.randn(VOCAB, WIDTH))
    trainer = Trainer(model, Settings(lr=3e-3, warmup_steps=0), torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)
    img = torch.randn(8, DIM, generator=gen)
    ids = torch.randint(4, VOCAB, (8, 6), generator=gen)
    ids[:, 0], ids[:, -1] = BOS, EOS
    lengths = torch.full((8,), 6)
    dom = (torch.randn(8, DIM, generator=gen), torch.randn(8, DIM, generator=gen))
    first = trainer.step(img, ids, lengths, dom, 0.1)
    for _ in range(25):
        last = trainer.step(img, ids, lengths, dom, 0.1)
    assert last["caption_loss"] < 0.7 * first["caption_loss"]
    assert set(last) == {"caption_loss", "disc_loss", "adv_loss", "disc_acc"}


def test_save_load_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    model = CaptionDecoder(tiny_config(aux_ce=0.5), torch.randn(VOCAB, WIDTH)).eval()
    save_caption_model(model, tmp_path / "m", extra={"clip": {"model": "tiny"}})
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    back = load_caption_model(tmp_path / "m")
    assert back.config == model.config and isinstance(back.config, DecoderConfig)
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    assert torch.equal(back.target_table, model.target_table)  # derived tables rebuilt
    img, tok = torch.randn(3, DIM), torch.randint(0, VOCAB, (3, 4))
    assert torch.equal(back(img, tok), model(img, tok))
    with pytest.raises(UserError, match="not a caption model"):
        load_caption_model(tmp_path)
    info = json.loads((tmp_path / "m" / "config.json").read_text())
    info["model"]["heads"] = 3  # 16 is not divisible by 3
    (tmp_path / "m" / "config.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match="config.json: model.heads: width 16 is not divisible"):
        load_caption_model(tmp_path / "m")


def test_stage_writes_model_and_curves_deterministically(emb_dirs, tmp_path):
    laion, flickr = emb_dirs
    section = {
        "model": {"width": 16, "layers": 1, "heads": 2, "prefix_len": 2, "max_len": 10},
        "batch_size": 8,
        "domain_batch": 4,
        "pretrain_epochs": 2,
        "adapt_epochs": 1,
        "finetune_epochs": 2,
        "warmup_steps": 2,
        "disc_hidden": 8,
    }
    params = {"seed": 3, "train_caption": section}
    line = main("ada", laion, flickr, tmp_path / "m1", tmp_path / "p1.tsv", params)
    main("ada", laion, flickr, tmp_path / "m2", tmp_path / "p2.tsv", params)
    main("noada", laion, flickr, tmp_path / "m3", tmp_path / "p3.tsv", params)
    assert line.startswith("train_caption[ada]: 15 steps, 5 epochs on cpu, caption loss ")
    tsv1 = (tmp_path / "p1.tsv").read_text()
    assert tsv1 == (tmp_path / "p2.tsv").read_text()  # bit-reproducible
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "m1" / name).read_bytes() == (tmp_path / "m2" / name).read_bytes()
    lines = [ln.split("\t") for ln in tsv1.strip().split("\n")]
    assert lines[0] == list(PLOT_COLUMNS)
    assert [r[:2] for r in lines[1:]] == [
        ["1", "pretrain"],
        ["2", "pretrain"],
        ["3", "adapt"],
        ["4", "finetune"],
        ["5", "finetune"],
    ]
    assert lines[1][3] == "nan" and lines[3][3] != "nan"  # no domain loss while pretraining
    info = json.loads((tmp_path / "m1" / "config.json").read_text())
    s1 = info["training"]
    s3 = json.loads((tmp_path / "m3" / "config.json").read_text())["training"]
    # 24 LAION captions / 8 = 3 steps, 6 train images x 3 captions = 18 / 8 = 3 steps
    assert s1["steps"] == 2 * 3 + 1 * 3 + 2 * 3 == s3["steps"]
    assert s1["n_flickr30k_train_captions"] == 18 and s1["n_flickr30k_val_captions"] == 9
    noada = [ln.split("\t") for ln in (tmp_path / "p3.tsv").read_text().split("\n")[1:-1]]
    assert all(r[7] == "0" for r in noada) and float(lines[-1][7]) > 0
    # same data, same order: the pretrain phase (no adversary yet) is identical
    assert [r[2] for r in noada[:2]] == [r[2] for r in lines[1:3]]
    assert info["clip"]["model"] == "tiny" and info["model"]["vocab_size"] == VOCAB
    assert s1["variant"] == "ada" and s1["settings"]["model"]["width"] == 16
    # the config rebuilds the model: DecoderConfig = the settings + what the data fixes
    model = load_caption_model(tmp_path / "m1")
    want = DecoderSettings(**section["model"])
    assert dataclasses.asdict(want).items() <= {**dataclasses.asdict(model.config),
                                                "target_scale": None}.items()  # fmt: skip
    assert (model.config.image_dim, model.config.token_width) == (DIM, WIDTH)
    assert model.config.target_scale == WIDTH**0.5
    with pytest.raises(UserError, match="variant"):
        main("both", laion, flickr, tmp_path / "x", tmp_path / "x.tsv", params)


def test_cli_train_caption(emb_dirs, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    laion, flickr = emb_dirs
    params = tmp_path / "params.yaml"
    params.write_text(
        "seed: 1\ntrain_caption:\n  model: {width: 16, layers: 1, heads: 2, prefix_len: 2}\n"
        "  pretrain_epochs: 1\n  adapt_epochs: 1\n  finetune_epochs: 1\n  batch_size: 16\n"
    )

    def invoke(laion_dir: Path):
        args = ["train-caption", "--variant", "noada", "--laion", str(laion_dir)]
        args += ["--flickr30k", str(flickr), "--out", str(tmp_path / "m")]
        args += ["--plots", str(tmp_path / "p.tsv"), "--params", str(params)]
        return CliRunner().invoke(app, args)

    res = invoke(laion)
    assert res.exit_code == 0, res.output
    assert "train_caption[noada]" in res.output
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert (tmp_path / "p.tsv").read_text().count("\n") == 4
    bad = invoke(tmp_path / "nope")
    assert bad.exit_code == 2 and bad.output.startswith("error:")
    assert len(bad.output.strip().splitlines()) == 1


def test_load_captions_reads_several_shards_like_one(tmp_path):
    table = torch.randn(VOCAB, WIDTH)
    rows = random_rows(10, 2, ["train", "val"], seed=4)
    write_emb_folder(tmp_path / "one", rows, table, seed=4)
    write_emb_folder(tmp_path / "two", rows, table, seed=4)
    whole = read_table(tmp_path / "two" / "part-00000.arrow")
    write_table(tmp_path / "two" / "part-00000.arrow", whole.slice(0, 7))
    write_table(tmp_path / "two" / "part-00001.arrow", whole.slice(7))
    a = load_captions(tmp_path / "one", ("train",), pad_id=PAD, eos_id=EOS)
    b = load_captions(tmp_path / "two", ("train",), pad_id=PAD, eos_id=EOS)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.image_emb, b.image_emb)
    assert a.row_ids == b.row_ids and a.image_ids == b.image_ids and len(a) == 10
