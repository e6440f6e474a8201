"""The evaluate_caption stage on tiny generated embeddings (Arrow shards like `embed` writes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from tiny_clip import make_tiny_clip
from typer.testing import CliRunner

from pipeline.embfile import vector_array, write_table
from pipeline.evaluate_caption import ids_to_text, run
from pipeline.metrics import cider_d, corpus_bleu_1to4, tokenize

DIM = 8
N_TRAIN, N_TEST = 12, 6
COLOURS = ["red", "green", "blue", "yellow", "white", "black"]
SHAPES = ["circle", "square", "triangle", "star"]


def _train_captions(j: int) -> list[str]:
    c, s = COLOURS[j % 6], SHAPES[j % 4]
    return [f"A {c} {s} on the table.", f"The {s} is {c}.", f"two {c} dogs near a {s}"]


def _test_captions(i: int) -> list[str]:
    c, s = COLOURS[i % 6], SHAPES[(i + 1) % 4]
    return [
        f"A {c} {s} on a chair.",
        f"a small {c} {s}",
        f"The {s} is {c} and large.",
        f"a {c} {s} next to a man",
    ]


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory) -> Path:
    return make_tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_embeddings(folder: Path, clip: Path) -> dict:
    """Two shards; test image i lies next to train image 2*i (its nearest neighbour)."""
    rng = np.random.default_rng(0)
    train_emb = _unit(rng.normal(size=(N_TRAIN, DIM)))
    test_emb = _unit(
        train_emb[[2 * i for i in range(N_TEST)]] + 0.01 * rng.normal(size=(N_TEST, DIM))
    )
    rows = []  # (image_id, split, emb, caption); rows of an image are not contiguous
    for j in range(N_TRAIN):
        rows += [(f"tr{j}", "train", train_emb[j], c) for c in _train_captions(j)]
    for i in range(N_TEST):
        caps = _test_captions(i)
        rows.insert(3 * i + 1, (f"te{i}", "test", test_emb[i], caps[0]))
        rows += [(f"te{i}", "test", test_emb[i], c) for c in caps[1:]]
    rows.append(("va0", "val", test_emb[0], "a validation caption"))
    folder.mkdir(parents=True)
    half = len(rows) // 2
    for s, part in enumerate([rows[:half], rows[half:]]):
        emb = np.stack([r[2] for r in part]).astype(np.float16)
        table = pa.table(
            {
                "id": [f"{r[0]}#{k}" for k, r in enumerate(part)],
                "image_id": [r[0] for r in part],
                "split": [r[1] for r in part],
                "image_emb": vector_array(emb),
                "text_emb": vector_array(emb),
                "caption": [r[3] for r in part],
                "token_ids": pa.array([[2, 3]] * len(part), pa.list_(pa.int32())),
            }
        )
        write_table(folder / f"part-{s:05d}.arrow", table)
    (folder / "manifest.json").write_text(json.dumps({"model": str(clip), "dim": DIM}))
    return {"train_emb": train_emb, "test_emb": test_emb}


def fake_captioner(calls: list):
    """'ada' answers each image's first reference, 'noada' always the same sentence."""

    def captioner(folder, emb, tokenizer, beam_size, max_len, batch_size, label):
        calls.append((Path(folder).name, emb.copy(), beam_size, max_len))
        if label == "ada":
            return [_test_captions(i)[0] for i in range(len(emb))]
        return ["a photo of a thing"] * len(emb)

    return captioner


def _model_folders(root: Path, variants=("noada", "ada")) -> Path:
    for v in variants:
        (root / v).mkdir(parents=True)
        (root / v / "config.json").write_text("{}")
    return root


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_run_with_fake_captioner(tmp_path, clip_folder):
    embs = make_embeddings(tmp_path / "emb", clip_folder)
    models = _model_folders(tmp_path / "models")
    calls: list = []
    params = {"beam_size": 2, "max_len": 12, "variants": ["noada", "ada"]}
    report = run(
        tmp_path / "emb",
        models,
        tmp_path / "m.json",
        tmp_path / "eval",
        params,
        captioner=fake_captioner(calls),
    )

    # the captioner saw the test images' embeddings (first row of each, file order)
    assert [c[0] for c in calls] == ["noada", "ada"]
    expected_emb = embs["test_emb"].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(calls[1][1], expected_emb)
    assert calls[0][2:] == (2, 12)

    metrics = json.loads((tmp_path / "m.json").read_text())
    assert set(metrics) == {"noada", "ada", "nn_baseline", "settings"}
    refs = [[tokenize(c) for c in _test_captions(i)] for i in range(N_TEST)]
    # 'ada' predicts one of the references: BLEU-1..4 exactly 1
    assert {k: metrics["ada"][k] for k in ("bleu1", "bleu2", "bleu3", "bleu4")} == {
        "bleu1": 1.0,
        "bleu2": 1.0,
        "bleu3": 1.0,
        "bleu4": 1.0,
    }
    assert metrics["ada"]["cider"] == pytest.approx(
        cider_d(refs, [r[0] for r in refs])[0], abs=1e-6
    )
    assert metrics["noada"]["n_distinct"] == 1 and metrics["ada"]["n_distinct"] == N_TEST

    # the baseline answers the first caption of train image 2*i
    base = _jsonl(tmp_path / "eval" / "caption_nn_baseline.jsonl")
    assert [r["image_id"] for r in base] == [f"te{i}" for i in range(N_TEST)]
    assert [r["neighbour_id"] for r in base] == [f"tr{2 * i}" for i in range(N_TEST)]
    preds = [_train_captions(2 * i)[0] for i in range(N_TEST)]
    assert [r["prediction"] for r in base] == preds
    assert [r["references"] for r in base] == [_test_captions(i) for i in range(N_TEST)]
    hyps = [tokenize(p) for p in preds]
    want = corpus_bleu_1to4(refs, hyps)
    for k, v in want.items():
        assert metrics["nn_baseline"][k] == pytest.approx(v, abs=1e-6)
    assert metrics["nn_baseline"]["cider"] == pytest.approx(cider_d(refs, hyps)[0], abs=1e-6)
    assert metrics["nn_baseline"]["bleu1"] > 0.0

    s = metrics["settings"]
    assert (s["n_images"], s["n_references"], s["split"]) == (N_TEST, 4 * N_TEST, "test")
    assert (s["beam_size"], s["max_len"], s["baseline_n_images"]) == (2, 12, N_TRAIN)
    assert (s["bleu_ref_length"], s["smoothing"]) == ("closest", "none")
    assert (s["paper_bleu_noada"], s["paper_bleu_ada"]) == (0.2805, 0.4116)
    assert (
        _jsonl(tmp_path / "eval" / "caption_noada.jsonl")[0]["prediction"] == "a photo of a thing"
    )
    assert report.read == 4 * N_TEST and report.written == N_TEST
    saved = json.loads((tmp_path / "eval" / "caption_report.json").read_text())
    assert saved["written"] == N_TEST and saved["skipped_total"] == 0
    assert "closest" in saved["method"]["bleu_ref_length"]
    assert saved["method"]["clip_model"] == str(clip_folder)


def test_ids_to_text_cuts_at_eos(clip_folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(clip_folder))
    ids = tok("A red circle, on the dog's mattress.")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    text = ids_to_text(tok, ids + ids[1:4])  # anything after EOS is ignored
    assert text == "a red circle , on the dog 's mattress ."
    assert tokenize(text) == tokenize("A red circle, on the dog's mattress.")
    assert ids_to_text(tok, ids[1:4]) == "a red circle"
    assert ids_to_text(tok, [tok.eos_token_id]) == ""


def _write_params(path: Path, emb: Path, models: Path, out: Path, pred: Path, **extra) -> Path:
    import yaml

    section = {
        "emb": str(emb),
        "models": str(models),
        "out": str(out),
        "pred_dir": str(pred),
        "beam_size": 2,
        "max_len": 8,
        "batch_size": 4,
        **extra,
    }
    path.write_text(yaml.safe_dump({"seed": 0, "evaluate_caption": section}))
    return path


def test_cli_user_errors(tmp_path, clip_folder):
    from pipeline.cli import app

    make_embeddings(tmp_path / "emb", clip_folder)
    params = _write_params(
        tmp_path / "params.yaml",
        tmp_path / "emb",
        tmp_path / "models",
        tmp_path / "m.json",
        tmp_path / "eval",
    )
    runner = CliRunner()
    res = runner.invoke(app, ["evaluate-caption", "--params", str(params)])
    assert res.exit_code == 2
    assert "caption model 'noada' not found" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = runner.invoke(
        app, ["evaluate-caption", "--params", str(params), "--emb", str(tmp_path / "nope")]
    )
    assert res.exit_code == 2 and "embeddings folder not found" in res.output
    bad = _write_params(
        tmp_path / "bad.yaml",
        tmp_path / "emb",
        tmp_path / "models",
        tmp_path / "m.json",
        tmp_path / "eval",
        beam_size=0,
    )
    res = runner.invoke(app, ["evaluate-caption", "--params", str(bad)])
    assert res.exit_code == 2 and "beam_size must be a positive integer" in res.output
    typo = _write_params(
        tmp_path / "typo.yaml",
        tmp_path / "emb",
        tmp_path / "models",
        tmp_path / "m.json",
        tmp_path / "eval",
        beam=3,
    )
    res = runner.invoke(app, ["evaluate-caption", "--params", str(typo)])
    assert res.exit_code == 2 and "unknown evaluate_caption params: ['beam']" in res.output
    assert not (tmp_path / "m.json").exists()


def _save_tiny_decoder(folder: Path, clip: Path, seed: int) -> None:
    import torch

    from pipeline.nn.caption_decoder import CaptionDecoder, save_caption_model

    text_cfg = json.loads((clip / "config.json").read_text())["text_config"]
    torch.manual_seed(seed)
    table = torch.randn(text_cfg["vocab_size"], text_cfg["hidden_size"])
    cfg = {
        "image_dim": DIM,
        "vocab_size": table.shape[0],
        "token_width": table.shape[1],
        "width": 16,
        "layers": 1,
        "heads": 2,
        "prefix_len": 2,
        "max_len": 10,
        "dropout": 0.0,
        "bos_token_id": 2,
        "eos_token_id": 3,
        "pad_token_id": 0,
    }
    save_caption_model(CaptionDecoder(cfg, table), folder)


def test_end_to_end_with_saved_decoders(tmp_path, clip_folder):
    pytest.importorskip("pipeline.decode")
    from pipeline.cli import app

    make_embeddings(tmp_path / "emb", clip_folder)
    for seed, variant in enumerate(("noada", "ada")):
        _save_tiny_decoder(tmp_path / "models" / variant, clip_folder, seed)
    outs = []
    for k in range(2):  # twice: CPU runs are bit-reproducible
        params = _write_params(
            tmp_path / f"p{k}.yaml",
            tmp_path / "emb",
            tmp_path / "models",
            tmp_path / f"m{k}.json",
            tmp_path / f"eval{k}",
        )
        res = CliRunner().invoke(app, ["evaluate-caption", "--params", str(params)])
        assert res.exit_code == 0, res.output
        assert "noada: bleu4=" in res.output and "nn_baseline: bleu4=" in res.output
        outs.append(json.loads((tmp_path / f"m{k}.json").read_text()))
    assert outs[0] == outs[1]
    for variant in ("noada", "ada", "nn_baseline"):
        assert set(outs[0][variant]) >= {"bleu1", "bleu2", "bleu3", "bleu4", "cider"}
        rows = _jsonl(tmp_path / "eval0" / f"caption_{variant}.jsonl")
        assert len(rows) == N_TEST
        assert all(isinstance(r["prediction"], str) for r in rows)
        assert all(len(r["references"]) == 4 for r in rows)
    # random decoders write at most max_len - 1 (= 7) tokens after BOS
    rows = _jsonl(tmp_path / "eval0" / "caption_ada.jsonl")
    assert all(len(r["prediction"].split()) <= 7 for r in rows)
