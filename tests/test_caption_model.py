"""Caption decoder, its data loader and the train_caption stage on tiny random data."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import save_file

from pipeline.caption.data import labelled_images, load_captions, load_images
from pipeline.caption.training import PLOT_COLUMNS, Trainer
from pipeline.clip.token_table import clip_token_table, table_sha256
from pipeline.embedding.files import read_table, vector_array, write_table
from pipeline.errors import UserError
from pipeline.nn.caption_decoder import (
    SOURCE,
    CaptionDecoder,
    DecoderConfig,
    DecoderSettings,
    load_caption_model,
    save_caption_model,
    split_batch,
)
from pipeline.settings import SettingError, load
from pipeline.stages import train_caption as stage
from pipeline.stages.train_caption import Settings, main, run

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


def write_clip_folder(folder: Path, table: torch.Tensor, revision: str = "abc") -> Path:
    """A CLIP folder as train_caption reads it: the token table clip_bootstrap writes."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"revision": revision}
    save_file({"weight": table.contiguous()}, str(folder / "token_embedding.safetensors"), meta)
    return folder


def write_emb_folder(
    folder: Path,
    rows: list[tuple],
    table: torch.Tensor,
    seed: int = 0,
    clip: tuple[str, str] = ("tiny", "abc"),
) -> None:
    """rows: (image_id, split, caption token ids or None: no caption); image_emb depends on
    the image id only. The manifest names the CLIP `clip` (model, revision) and fingerprints
    its `table`."""
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
            "caption": [None if r[2] is None else " ".join(map(str, r[2])) for r in rows],
            "token_ids": pa.array([r[2] for r in rows], type=pa.list_(pa.int32())),
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    write_table(folder / "part-00000.arrow", t)
    tok = {
        "vocab_size": table.shape[0],
        "width": table.shape[1],
        "bos_token_id": BOS,
        "eos_token_id": EOS,
        "pad_token_id": PAD,
        "sha256": table_sha256(table),
    }
    (folder / "manifest.json").write_text(
        json.dumps(
            {
                "model": clip[0],
                "revision": clip[1],
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


def write_emb_dirs(root: Path, table: torch.Tensor, clip: tuple[str, str]) -> tuple[Path, Path]:
    """LAION and Flickr30k embedding folders made with the CLIP `clip` of token `table`."""
    laion, flickr = root / "laion", root / "flickr30k"
    write_emb_folder(laion, random_rows(24, 1, ["train"], 1), table, seed=1, clip=clip)
    flickr_rows = random_rows(12, 3, ["train", "train", "val", "test"], 2)
    write_emb_folder(flickr, flickr_rows, table, seed=2, clip=clip)
    return laion, flickr


@pytest.fixture
def emb_dirs(tmp_path):
    """LAION and Flickr30k embedding folders, and the CLIP folder they name."""
    table = torch.randn(VOCAB, WIDTH, generator=torch.Generator().manual_seed(0))
    return *write_emb_dirs(tmp_path, table, ("tiny", "abc")), write_clip_folder(
        tmp_path / "clip", table
    )


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
    ids, imgs = load_images(tmp_path, ["train", "val"])
    assert ids == ["a", "b", "c", "d"] and imgs.shape == (4, DIM)


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


TINY = {
    "model": {"width": 16, "layers": 1, "heads": 2, "prefix_len": 2, "max_len": 10},
    "batch_size": 8,
    "domain_batch": 4,
    "pretrain_epochs": 1,
    "adapt_epochs": 1,
    "finetune_epochs": 2,
    "warmup_steps": 2,
    "disc_hidden": 8,
    "laion_val_images": 4,
    "text_weight": 0.0,  # the tests below are of the image arms; the text arm has its own
}


def test_stage_writes_model_and_curves_deterministically(emb_dirs, tmp_path):
    laion, flickr, clip = emb_dirs
    section = {**TINY, "pretrain_epochs": 2}
    params = {"seed": 3, "train_caption": section}
    line = main("ada", laion, flickr, tmp_path / "m1", tmp_path / "p1.tsv", params, clip)
    main("ada", laion, flickr, tmp_path / "m2", tmp_path / "p2.tsv", params, clip)
    main("noada", laion, flickr, tmp_path / "m3", tmp_path / "p3.tsv", params, clip)
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
    col = {c: k for k, c in enumerate(PLOT_COLUMNS)}
    assert lines[1][col["disc_loss"]] == "nan" != lines[3][col["disc_loss"]]  # none in pretrain
    # the LAION caption loss continues in finetune (source_weight 1 by default)
    assert [r[col["source_loss"]] == "nan" for r in lines[1:]] == [True] * 3 + [False] * 2
    info = json.loads((tmp_path / "m1" / "config.json").read_text())
    s1 = info["training"]
    s3 = json.loads((tmp_path / "m3" / "config.json").read_text())["training"]
    # 24 LAION captions / 8 = 3 steps, 6 train images x 3 captions = 18 / 8 = 3 steps
    assert s1["steps"] == 2 * 3 + 1 * 3 + 2 * 3 == s3["steps"]
    assert s1["n_flickr30k_train_captions"] == 18 and s1["n_flickr30k_val_captions"] == 9
    noada = [ln.split("\t") for ln in (tmp_path / "p3.tsv").read_text().split("\n")[1:-1]]
    assert all(r[col["lambda"]] == "0" for r in noada) and float(lines[-1][col["lambda"]]) > 0
    # same data, same order: the pretrain phase (no adversary yet) is identical
    assert [r[2] for r in noada[:2]] == [r[2] for r in lines[1:3]]
    assert s1["n_flickr30k_labelled_images"] == s1["n_flickr30k_train_images"] == 6
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
        main("both", laion, flickr, tmp_path / "x", tmp_path / "x.tsv", params, clip)


def test_variants_trained_together_are_those_trained_alone(emb_dirs, tmp_path):
    """`run` trains both variants (at once where the cores allow: CI has 2) with the
    numbers each gets alone."""
    laion, flickr, clip = emb_dirs
    params = {"seed": 3, "train_caption": TINY}
    lines = run(["noada", "ada"], laion, flickr, tmp_path / "m_{variant}",
                tmp_path / "p_{variant}.tsv", params, clip)  # fmt: skip
    assert [ln.split(":")[0] for ln in lines] == ["train_caption[noada]", "train_caption[ada]"]
    for v in ("noada", "ada"):
        main(v, laion, flickr, tmp_path / f"alone_{v}", tmp_path / f"alone_{v}.tsv", params, clip)
        for name in ("model.safetensors", "config.json"):
            got = (tmp_path / f"m_{v}" / name).read_bytes()
            assert got == (tmp_path / f"alone_{v}" / name).read_bytes()
        want = (tmp_path / f"alone_{v}.tsv").read_text()
        assert (tmp_path / f"p_{v}.tsv").read_text() == want
    with pytest.raises(UserError, match=r"--out .* must hold \{variant\}"):
        run(["noada", "ada"], laion, flickr, tmp_path / "m", tmp_path / "p_{variant}.tsv",
            params, clip)  # fmt: skip
    with pytest.raises(UserError, match="named twice"):
        run(["ada", "ada"], laion, flickr, tmp_path / "{variant}", tmp_path / "{variant}.tsv",
            params, clip)  # fmt: skip
    with pytest.raises(UserError, match="variant must be one of"):
        run(["noada", "both"], laion, flickr, tmp_path / "{variant}", tmp_path / "{variant}",
            params, clip)  # fmt: skip


def test_variants_train_at_once_only_on_cpu_cores_to_spare(monkeypatch):
    s = Settings()  # threads 1, device auto
    monkeypatch.setattr(stage, "pick_device", lambda name: torch.device("cpu"))
    monkeypatch.setattr(stage, "spare_cores", lambda busy: 2)
    assert stage.at_once(s, 2) and not stage.at_once(s, 1) and not stage.at_once(s, 3)
    assert not stage.at_once(dataclasses.replace(s, threads=0), 2)  # torch's default: all cores
    assert not stage.at_once(dataclasses.replace(s, threads=2), 2)
    monkeypatch.setattr(stage, "pick_device", lambda name: torch.device("cuda"))
    assert not stage.at_once(s, 2)


def _run(emb_dirs, out: Path, variant: str = "ada", **settings) -> tuple[dict, list[dict]]:
    """Train on the tiny folders; the run record and the plot rows (dicts)."""
    laion, flickr, clip = emb_dirs
    params = {"seed": 5, "train_caption": {**TINY, **settings}}
    main(variant, laion, flickr, out, out.with_suffix(".tsv"), params, clip)
    head, *rows = [ln.split("\t") for ln in out.with_suffix(".tsv").read_text().split("\n")[:-1]]
    record = json.loads((out / "config.json").read_text())["training"]
    return record, [dict(zip(head, r)) for r in rows]


def test_source_weight_and_labelled_fraction_change_the_data_not_the_schedule(emb_dirs, tmp_path):
    base, base_rows = _run(emb_dirs, tmp_path / "base")
    w0, w0_rows = _run(emb_dirs, tmp_path / "w0", source_weight=0)
    half, half_rows = _run(emb_dirs, tmp_path / "half", labelled_fraction=0.5)
    half_noada, _ = _run(emb_dirs, tmp_path / "half_noada", "noada", labelled_fraction=0.5)
    none, none_rows = _run(emb_dirs, tmp_path / "none", labelled_fraction=0)
    # the same steps whatever the weight and the fraction: 3 LAION steps per pretrain and
    # adapt epoch, 18 Flickr30k train captions / 8 = 3 steps per finetune epoch
    assert base["steps"] == w0["steps"] == half["steps"] == none["steps"] == 3 + 3 + 2 * 3
    finetune = [r["phase"] == "finetune" for r in base_rows]
    assert finetune == [False, False, True, True]
    # weight 0: no LAION captions in finetune (the schedule before issue 10)
    assert all(r["source_loss"] == "nan" for r in w0_rows)
    assert [r["source_loss"] != "nan" for r in base_rows] == finetune
    # before finetune the weight changes nothing
    assert base_rows[:2] == w0_rows[:2] and base_rows[:2] == half_rows[:2]
    assert w0_rows[2]["caption_loss"] != base_rows[2]["caption_loss"]
    # half of the 6 train images keep their 3 captions each, the same for both variants;
    # all 6 stay target-domain images
    for rec in (half, half_noada):
        assert (rec["n_flickr30k_labelled_images"], rec["n_flickr30k_labelled_captions"]) == (3, 9)
        assert (rec["n_flickr30k_train_images"], rec["n_target_images"]) == (6, 6)
    # fraction 0: unsupervised adaptation, LAION captions only in finetune
    assert none["n_flickr30k_labelled_captions"] == 0
    assert [r["caption_loss"] == "nan" for r in none_rows] == finetune
    assert all(r["source_loss"] != "nan" for r in none_rows[2:])
    with pytest.raises(UserError, match="train_caption.source_weight: must be > 0 when"):
        _run(emb_dirs, tmp_path / "nothing", labelled_fraction=0, source_weight=0)
    with pytest.raises(UserError, match="train_caption.labelled_fraction: must be in"):
        _run(emb_dirs, tmp_path / "over", labelled_fraction=1.5)


def test_labelled_images_keep_whole_images_seeded_and_nested(tmp_path):
    table = torch.randn(VOCAB, WIDTH)
    write_emb_folder(tmp_path, random_rows(20, 3, ["train"], seed=6), table, seed=6)
    cs = load_captions(tmp_path, ("train",), pad_id=PAD, eos_id=EOS)
    assert labelled_images(cs, 1.0, 0) is cs and len(labelled_images(cs, 0.0, 0)) == 0
    assert len(labelled_images(cs, 0.01, 0).image_ids) == 1  # at least one image if > 0
    small, big = labelled_images(cs, 0.2, 0), labelled_images(cs, 0.5, 0)
    assert (len(small.image_ids), len(big.image_ids)) == (4, 10)
    assert set(small.image_ids) <= set(big.image_ids)  # a smaller fraction's images are kept
    assert labelled_images(cs, 0.2, 0).image_ids == small.image_ids  # seeded
    assert labelled_images(cs, 0.2, 1).image_ids != small.image_ids
    # every caption of a kept image, rows in file order, image index rebuilt
    keep = [r for r in cs.row_ids if r.split("#")[0] in set(small.image_ids)]
    assert small.row_ids == keep and len(keep) == 3 * 4
    pos = {r: k for k, r in enumerate(cs.row_ids)}
    rows = torch.tensor([pos[r] for r in keep])
    assert torch.equal(small.ids, cs.ids[rows]) and torch.equal(small.image_emb, cs.image_emb[rows])
    assert [small.image_ids[i] for i in small.image_index] == [r.split("#")[0] for r in keep]
    assert small.captions == [cs.captions[r] for r in rows.tolist()]


def test_a_step_with_a_source_batch_is_the_weighted_sum_of_two_losses():
    """One forward of both batches (padded to one width) = two separate forwards."""
    torch.manual_seed(0)
    model = CaptionDecoder(tiny_config(), torch.randn(VOCAB, WIDTH))
    ref = CaptionDecoder(tiny_config(), model.token_table)
    ref.load_state_dict(model.state_dict())
    settings = Settings(lr=1e-9, warmup_steps=0, grad_clip=0, weight_decay=0, source_weight=0.3)
    trainer = Trainer(model, settings, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1)

    def batch(n: int, width: int, short: int):
        ids = torch.randint(4, VOCAB, (n, width), generator=gen)
        lengths = torch.full((n,), width)
        lengths[0] = short
        ids[:, 0] = BOS
        ids[torch.arange(n), lengths - 1] = EOS
        ids[0, short:] = PAD
        return torch.randn(n, DIM, generator=gen), ids, lengths

    target, source = batch(3, 6, 4), batch(5, 9, 3)  # different widths
    out = trainer.step(*target, None, 0.0, [("source_loss", 0.3, SOURCE, *source)])
    losses = []
    for emb, ids, lengths in (target, source):
        inputs, targets, mask = split_batch(ids, lengths)
        losses.append(ref.caption_loss(ref(emb, inputs, SOURCE), targets, mask))  # step: SOURCE
    (losses[0] + 0.3 * losses[1]).backward()
    assert out["caption_loss"].item() == pytest.approx(losses[0].item(), rel=1e-5)
    assert out["source_loss"].item() == pytest.approx(losses[1].item(), rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-4), name
    # a source batch alone (no labelled target captions): its weighted loss only
    only = trainer.step(None, None, None, None, 0.0, [("source_loss", 0.3, SOURCE, *source)])
    assert set(only) == {"source_loss"}


def test_cli_train_caption(emb_dirs, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    laion, flickr, clip = emb_dirs
    params = tmp_path / "params.yaml"
    params.write_text(
        "seed: 1\ntrain_caption:\n  model: {width: 16, layers: 1, heads: 2, prefix_len: 2}\n"
        "  pretrain_epochs: 1\n  adapt_epochs: 1\n  finetune_epochs: 1\n  batch_size: 16\n"
        "  laion_val_images: 4\n"
    )

    def invoke(laion_dir: Path, clip_dir: Path = clip):
        args = ["train-caption", "--variant", "noada", "--laion", str(laion_dir)]
        args += ["--flickr30k", str(flickr), "--clip", str(clip_dir), "--out", str(tmp_path / "m")]
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
    # another CLIP (another revision, another token table): one line naming both
    other = write_clip_folder(tmp_path / "other", torch.randn(VOCAB, WIDTH), revision="xyz")
    bad = invoke(laion, other)
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1
    assert bad.output.startswith(f"error: CLIP {other} (xyz) is not the one the embeddings in ")
    assert "(tiny, abc)" in bad.output
    # LAION and Flickr30k embeddings of two backbones in one run: one line naming both
    info = json.loads((laion / "manifest.json").read_text())
    mixed = tmp_path / "laion_b"
    shutil.copytree(laion, mixed)
    (mixed / "manifest.json").write_text(json.dumps({**info, "model": "b", "revision": "r9"}))
    bad = invoke(mixed)
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1
    assert "LAION and Flickr30k embeddings come from different CLIP models" in bad.output
    assert "'revision': 'r9'" in bad.output and "'revision': 'abc'" in bad.output


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


def test_keep_best_val_loss_saves_the_best_epoch(emb_dirs, tmp_path):
    laion, flickr, clip = emb_dirs
    params = {"seed": 3, "train_caption": {**TINY, "finetune_epochs": 4, "keep": "best_val_loss"}}
    line = main("noada", laion, flickr, tmp_path / "m", tmp_path / "p.tsv", params, clip)
    lines = [ln.split("\t") for ln in (tmp_path / "p.tsv").read_text().strip().split("\n")]
    val = [float(r[PLOT_COLUMNS.index("val_loss")]) for r in lines[1:]]
    best = val.index(min(val)) + 1
    training = json.loads((tmp_path / "m/config.json").read_text())["training"]
    assert (training["keep"], training["kept_epoch"]) == ("best_val_loss", best)
    assert line.endswith(f"kept epoch {best} (best_val_loss)")
    # the saved weights are that epoch's: their validation loss is the best one
    from pipeline.caption.data import load_training_data

    data = load_training_data(laion, flickr, clip, 10, ("train",), torch.device("cpu"))
    trainer = Trainer(
        load_caption_model(tmp_path / "m"), load(Settings, params), torch.device("cpu")
    )
    assert trainer.eval_loss(data.flickr30k_val) == pytest.approx(min(val), abs=1e-5)
    # keep: last saves the last epoch; the default is best_val_loss
    main("noada", laion, flickr, tmp_path / "l", tmp_path / "l.tsv",
         {"seed": 3, "train_caption": {**TINY, "finetune_epochs": 4, "keep": "last"}}, clip)  # fmt: skip
    training = json.loads((tmp_path / "l/config.json").read_text())["training"]
    assert (training["keep"], training["kept_epoch"]) == ("last", 1 + 1 + 4)
    assert Settings().keep == "best_val_loss"


def test_laion_images_without_a_caption_reach_the_discriminator_only(tmp_path):
    from pipeline.caption.data import load_training_data
    from pipeline.embedding.files import read_dataset, vectors
    from pipeline.stages.train_caption import main

    table = torch.randn(VOCAB, WIDTH, generator=torch.Generator().manual_seed(0))
    clip = write_clip_folder(tmp_path / "clip", table)
    laion, flickr = tmp_path / "laion", tmp_path / "flickr30k"
    rows = random_rows(6, 1, ["train"], 1)
    rows[2:2] = [("nocap0", "train", None)]
    write_emb_folder(laion, rows + [("nocap1", "train", None)], table, seed=1)
    write_emb_folder(flickr, random_rows(8, 2, ["train", "val"], 2), table, seed=2)
    data = load_training_data(laion, flickr, clip, 10, ("train",), torch.device("cpu"))
    assert len(data.laion) == 6 and data.laion.skipped == {"empty_caption": 2}
    assert not {"nocap0", "nocap1"} & set(data.laion.image_ids)
    # the domain discriminator sees all 8 LAION images, in file order
    stored = torch.from_numpy(vectors(read_dataset(laion).column("image_emb")).copy())
    assert torch.equal(data.source_images, stored)
    params = {"seed": 0, "train_caption": {**TINY, "finetune_epochs": 1}}
    main("ada", laion, flickr, tmp_path / "m", tmp_path / "p.tsv", params, clip)
    training = json.loads((tmp_path / "m/config.json").read_text())["training"]
    assert training["n_source_images"] == 8
    assert training["skipped_rows"] == {"empty_caption": 2}


def test_the_token_table_is_the_clip_folders(emb_dirs, tmp_path):
    """The decoder's frozen table comes from the CLIP folder (the embedding folders hold
    none), and it must be the table the embeddings were made with."""
    from pipeline.caption.data import load_training_data

    laion, flickr, clip = emb_dirs
    assert not {p.name for d in (laion, flickr) for p in d.iterdir()} & {
        "token_embedding.safetensors"
    }
    params = {"seed": 3, "train_caption": {**TINY, "finetune_epochs": 1}}
    main("noada", laion, flickr, tmp_path / "m", tmp_path / "p.tsv", params, clip)
    table = clip_token_table(clip).weight
    assert torch.equal(load_caption_model(tmp_path / "m").token_table, table)
    info = json.loads((tmp_path / "m" / "config.json").read_text())["clip"]
    assert info["token_embedding"]["sha256"] == table_sha256(table)

    def load(clip_dir):
        return load_training_data(laion, flickr, clip_dir, 10, ("train",), torch.device("cpu"))

    # the same revision, another table (a stale copy): its fingerprint tells
    stale = write_clip_folder(tmp_path / "stale", table + 1, revision="abc")
    with pytest.raises(UserError, match=r"\(tiny, abc\): token table sha256:\w+, theirs sha256:"):
        load(stale)
    # the same table under another revision passes (the table is all train_caption reads)
    assert torch.equal(load(write_clip_folder(tmp_path / "copy", table, "xyz")).token_table, table)
    # manifests without the fingerprint (made before it was recorded): the revision decides
    for folder in (laion, flickr):
        manifest = json.loads((folder / "manifest.json").read_text())
        del manifest["token_embedding"]["sha256"]
        (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"copy \(xyz\) is not the one .* \(tiny, abc\)$"):
        load(tmp_path / "copy")
    assert torch.equal(load(clip).token_table, table)


def test_a_plain_hugging_face_folder_gives_its_table(tmp_path):
    """A CLIP folder without token_embedding.safetensors (a downloaded checkpoint): the
    table is read from its weights; no --clip: the CLIP the manifests name."""
    from tiny_clip import make_tiny_clip

    from pipeline.clip.backbone import load_backbone

    hf = make_tiny_clip(tmp_path / "hf")
    bb = load_backbone(hf)
    laion, flickr = write_emb_dirs(tmp_path, bb.token_embedding(), (str(hf), bb.revision))
    params = {"seed": 3, "train_caption": {**TINY, "finetune_epochs": 1}}
    main("ada", laion, flickr, tmp_path / "m", tmp_path / "p.tsv", params)
    assert not (hf / "token_embedding.safetensors").exists()
    assert torch.equal(load_caption_model(tmp_path / "m").token_table, bb.token_embedding())


def test_the_offset_control_moves_every_flickr30k_image_and_no_laion_one(emb_dirs):
    from pipeline.caption.data import load_training_data
    from pipeline.caption.shift import TargetShift

    laion, flickr, clip = emb_dirs
    cpu = torch.device("cpu")
    plain = load_training_data(laion, flickr, clip, 10, ("train",), cpu, 0.5, 1)
    shift = TargetShift(directions=2, norm=0.7, seed=5)
    moved = load_training_data(laion, flickr, clip, 10, ("train",), cpu, 0.5, 1, shift)
    offset = torch.from_numpy(shift.offset(plain.image_dim))
    for name in ("flickr30k_train", "flickr30k_labelled", "flickr30k_val"):
        a, b = getattr(plain, name), getattr(moved, name)
        assert a.image_ids == b.image_ids  # the same images labelled, moved
        assert torch.allclose(
            (b.image_emb - a.image_emb).float(), offset.expand(len(a), -1), atol=2e-3
        )
    assert torch.allclose((moved.target_images - plain.target_images).float(),
                          offset.expand(len(plain.target_images), -1), atol=2e-3)  # fmt: skip
    assert torch.equal(moved.source_images, plain.source_images)
    assert torch.equal(moved.laion.image_emb, plain.laion.image_emb)


def test_the_domain_token_follows_the_prefix_after_the_reversal(emb_dirs, tmp_path):
    """With `domain_token`: the decoder reads [prefix ; domain vector ; tokens]; each
    domain's captions train with their own vector, the discriminator sees the prefix only,
    and the saved model captions with the target's."""
    from pipeline.caption.decode import caption_embeddings
    from pipeline.nn.caption_decoder import SOURCE, TARGET

    torch.manual_seed(0)
    model = CaptionDecoder(tiny_config(domain_token=True), torch.randn(VOCAB, WIDTH)).eval()
    img, tok = torch.randn(3, DIM), torch.randint(0, VOCAB, (3, 4))
    k = model.config.prefix_len
    assert model.prefix(img).shape[1] == k and model.context(img).shape[1] == k + 1
    assert torch.equal(model.context(img)[:, k], model.domain[TARGET].expand(3, -1))
    assert not torch.allclose(model(img, tok, SOURCE), model(img, tok, TARGET))
    mixed = model(img, tok, torch.tensor([SOURCE, TARGET, SOURCE]))  # one id per row
    assert torch.allclose(mixed[1], model(img[1:2], tok[1:2], TARGET)[0])
    assert torch.allclose(mixed[2], model(img[2:3], tok[2:3], SOURCE)[0])
    # a step on target captions moves the target vector only; source rows the source one
    trainer = Trainer(model, Settings(warmup_steps=0, weight_decay=0), torch.device("cpu"))
    ids = torch.tensor([[BOS, 5, 6, EOS]] * 3)
    before = model.domain.detach().clone()
    trainer.step(img, ids, torch.full((3,), 4), None, 0.0, (), TARGET)
    moved = (model.domain.detach() != before).any(1)
    assert moved.tolist() == [False, True]
    # the stage trains it (LAION captions SOURCE, Flickr30k TARGET) and decoding reads TARGET
    laion, flickr, clip = emb_dirs
    params = {
        "seed": 0,
        "train_caption": {**TINY, "model": {**TINY["model"], "domain_token": True}},
    }
    main("ada", laion, flickr, tmp_path / "m", tmp_path / "p.tsv", params, clip)
    saved = load_caption_model(tmp_path / "m")
    assert saved.config.domain_token and not torch.equal(saved.domain[0], saved.domain[1])

    class Tok:  # ids as text
        bos_token_id, eos_token_id = BOS, EOS

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(str(i) for i in ids)

    emb = torch.randn(2, DIM)
    want = caption_embeddings(saved, emb, Tok(), 1, 6)
    saved.domain.data[SOURCE] = saved.domain.data[TARGET]  # SOURCE's row is never read
    assert caption_embeddings(saved, emb, Tok(), 1, 6) == want


def test_the_kept_epoch_is_chosen_with_no_more_target_labels_than_training_had(
    emb_dirs, tmp_path, monkeypatch
):
    from pipeline.caption.data import load_training_data
    from pipeline.stages import train_caption as stage

    laion, flickr, clip = emb_dirs
    cpu = torch.device("cpu")
    data = load_training_data(laion, flickr, clip, 10, ("train",), cpu, 1.0, 2, None, 4)
    assert len(data.laion_val.image_ids) == 4 and len(data.laion.image_ids) == 24 - 4
    assert not set(data.laion_val.image_ids) & set(data.laion.image_ids)
    chosen, info = stage.selection_set(data, 7)  # 6 labelled images; 3 val images: all
    assert chosen is data.flickr30k_val and info == {"on": "flickr30k_val", "images": 3,
                                                     "of": 3, "domain": 1}  # fmt: skip
    monkeypatch.setattr(stage, "MIN_SELECT_IMAGES", 1)
    few = load_training_data(laion, flickr, clip, 10, ("train",), cpu, 0.1, 2, None, 4)
    chosen, info = stage.selection_set(few, 7)  # 1 labelled image: 1 val image
    assert len(few.flickr30k_labelled.image_ids) == 1 and info["images"] == 1
    assert len(chosen.image_ids) == 1 and set(chosen.image_ids) < set(few.flickr30k_val.image_ids)
    none = load_training_data(laion, flickr, clip, 10, ("train",), cpu, 0.0, 2, None, 4)
    chosen, info = stage.selection_set(none, 7)  # no label: the held-out LAION captions
    assert chosen is none.laion_val and info == {"on": "laion_val", "images": 4, "domain": 0}
    # the stage at fraction 0 keeps the epoch of the lowest held-out LAION loss
    params = {"seed": 0, "train_caption": {**TINY, "labelled_fraction": 0.0, "finetune_epochs": 3}}
    stage.main("ada", laion, flickr, tmp_path / "m", tmp_path / "p.tsv", params, clip)
    lines = [ln.split("\t") for ln in (tmp_path / "p.tsv").read_text().strip().split("\n")]
    col = {c: lines[0].index(c) for c in ("select_loss", "laion_val_loss")}
    select = [float(r[col["select_loss"]]) for r in lines[1:]]
    assert select == [float(r[col["laion_val_loss"]]) for r in lines[1:]]
    training = json.loads((tmp_path / "m/config.json").read_text())["training"]
    assert training["kept_epoch"] == select.index(min(select)) + 1
    assert training["selection"]["on"] == "laion_val"
    with pytest.raises(UserError, match="laion_val_images: must be > 0 when labelled_fraction"):
        load(Settings, {"train_caption": {"labelled_fraction": 0.0, "laion_val_images": 0}})


def test_the_text_arm_learns_every_flickr30k_train_caption_from_its_noisy_text(emb_dirs, tmp_path):
    """CapDec's arm: all Flickr30k train captions (labelled or not), each decoded from its
    own CLIP text embedding, unit-normalised plus seeded Gaussian noise, no image."""
    import csv

    from pipeline.caption.data import load_training_data
    from pipeline.caption.training import Arm

    laion, flickr, clip = emb_dirs
    part = flickr / "part-00000.arrow"
    t = read_table(part)
    text = np.random.default_rng(7).normal(size=(t.num_rows, DIM)).astype(np.float16)
    write_table(part, t.set_column(t.column_names.index("text_emb"), "text_emb",
                                   vector_array(text)))  # fmt: skip
    data = load_training_data(laion, flickr, clip, 10, ("train",), torch.device("cpu"), 0.0,
                              laion_val_images=2, text=True)  # fmt: skip
    arm_set, train = data.flickr30k_text, data.flickr30k_train
    assert len(data.flickr30k_labelled) == 0 and arm_set.row_ids == train.row_ids
    rows = [int(r.split("#")[1]) for r in arm_set.row_ids]
    assert torch.equal(arm_set.image_emb, torch.from_numpy(text[rows]))
    assert torch.equal(arm_set.ids, train.ids)

    idx = torch.tensor([0, 3])
    plain = Arm("text_loss", 1.0, 1, arm_set, torch.Generator().manual_seed(0)).batch(idx)
    assert torch.equal(plain[3], arm_set.image_emb[idx])
    noisy = [Arm("text_loss", 1.0, 1, arm_set, torch.Generator().manual_seed(0), 0.5).batch(idx)
             for _ in range(2)]  # fmt: skip
    assert torch.equal(noisy[0][3], noisy[1][3])  # seeded
    unit = torch.nn.functional.normalize(arm_set.image_emb[idx].float(), dim=-1)
    assert 0.2 < float((noisy[0][3] - unit).std()) < 0.8  # noise of std 0.5 on unit rows

    def run(name, **settings):
        params = {"seed": 0, "train_caption": {**TINY, "labelled_fraction": 0.0,
                                               "laion_val_images": 2, **settings}}  # fmt: skip
        summary = main("noada", laion, flickr, tmp_path / name, tmp_path / f"{name}.tsv", params,
                       clip)  # fmt: skip
        with open(tmp_path / f"{name}.tsv") as f:
            curve = list(csv.DictReader(f, delimiter="\t"))
        weights = load_caption_model(tmp_path / name).state_dict()
        return summary, curve, weights

    # with no labelled image the kept epoch is chosen on the val captions' own unit text
    # embeddings (the text arm's kind of label), not on LAION's
    from pipeline.stages.train_caption import selection_set

    chosen, info = selection_set(data, 7)
    assert chosen is data.flickr30k_val_text and info["on"] == "flickr30k_val_text"
    assert chosen.row_ids == data.flickr30k_val.row_ids and info["domain"] == 1
    norms = chosen.image_emb.float().norm(dim=-1)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)

    summary, curve, text_only = run("text", source_weight=0.0, text_weight=1.0)
    assert "text loss" in summary and "selection flickr30k_val_text" in summary
    finetune = [r for r in curve if r["phase"] == "finetune"]
    assert finetune and all(float(r["text_loss"]) > 0 for r in finetune)
    assert all(r["text_loss"] == "nan" for r in curve if r["phase"] != "finetune")
    _, _, without = run("source", source_weight=1.0)
    assert any(not torch.equal(text_only[k], without[k]) for k in without)
    with pytest.raises(UserError, match="source_weight"):
        load(Settings, {"train_caption": {"labelled_fraction": 0.0, "source_weight": 0.0,
                                          "text_weight": 0.0}})  # fmt: skip


def test_training_plan_phases_arms_and_one_adversary():
    from types import SimpleNamespace

    from pipeline.nn.caption_decoder import SOURCE, TARGET
    from pipeline.stages.train_caption import Settings, training_plan

    s = Settings(batch_size=10, pretrain_epochs=2, adapt_epochs=1, finetune_epochs=3,
                 lr=1e-3, finetune_lr=5e-4, text_weight=0.5, text_noise=0.04, seed=7)  # fmt: skip
    emb = torch.zeros(5, 4)
    data = SimpleNamespace(laion=list(range(45)), flickr30k_labelled=list(range(3)),
                           flickr30k_train=list(range(30)), flickr30k_text=list(range(30)),
                           source_images=emb, target_images=emb)  # fmt: skip
    plan = training_plan(s, data, strength=1.0)
    assert [(p.name, p.domain, p.rows, p.epochs, p.lr) for p in plan] == [
        ("pretrain", SOURCE, 45, 2, 1e-3), ("adapt", SOURCE, 45, 1, 1e-3),
        ("finetune", TARGET, 30, 3, 5e-4)]  # fmt: skip
    assert plan[0].adversary is None and plan[1].adversary is plan[2].adversary
    assert plan[1].adversary.total_steps == 1 * 5 + 3 * 3  # adapt + finetune steps
    assert plan[1].adversary.peak == s.adv_weight and plan[1].adversary.strength == 1.0
    assert [(a.name, a.domain, a.weight) for a in plan[2].beside] == [
        ("source_loss", SOURCE, 1.0), ("text_loss", TARGET, 0.5)]  # fmt: skip
    assert plan[2].beside[1].noise_std == pytest.approx(0.2)
    assert plan[0].beside == plan[1].beside == []
    no_source = training_plan(dataclasses.replace(s, source_weight=0.0), data, 0.0)
    assert [a.name for a in no_source[2].beside] == ["text_loss"]
