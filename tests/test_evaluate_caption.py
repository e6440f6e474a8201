"""The evaluate_caption stage on tiny generated embeddings (Arrow shards like `embed` writes)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from tiny_clip import make_tiny_clip
from typer.testing import CliRunner

from pipeline.caption.decode import ids_to_text
from pipeline.caption.evaluation import (
    load_image_captions,
    nearest_neighbour_captions,
    score,
    write_predictions,
)
from pipeline.cli import app
from pipeline.embedding.files import read_dataset, vector_array, write_table
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


def make_embeddings(folder: Path, clip: Path, revision: str | None = None) -> dict:
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
    manifest = {"model": str(clip), "dim": DIM}
    if revision:
        manifest["revision"] = revision
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return {"train_emb": train_emb, "test_emb": test_emb}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_test_images_baseline_and_scores(tmp_path, clip_folder):
    embs = make_embeddings(tmp_path / "emb", clip_folder)
    table = read_dataset(tmp_path / "emb")
    test = load_image_captions(table, "test")
    train = load_image_captions(table, "train")

    # one entry per test image (file order), the embedding of its first row, all captions
    assert test.image_ids == [f"te{i}" for i in range(N_TEST)] and len(train) == N_TRAIN
    expected_emb = embs["test_emb"].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(test.emb, expected_emb)
    assert test.captions == [_test_captions(i) for i in range(N_TEST)]

    refs = [[tokenize(c) for c in _test_captions(i)] for i in range(N_TEST)]
    # a system that predicts one of the references: BLEU-1..4 exactly 1
    ada = score([_test_captions(i)[0] for i in range(N_TEST)], test.captions)
    assert {k: ada[k] for k in ("bleu1", "bleu2", "bleu3", "bleu4")} == {
        "bleu1": 1.0,
        "bleu2": 1.0,
        "bleu3": 1.0,
        "bleu4": 1.0,
    }
    assert ada["cider"] == pytest.approx(cider_d(refs, [r[0] for r in refs])[0], abs=1e-6)
    assert ada["n_distinct"] == N_TEST
    assert score(["a photo of a thing"] * N_TEST, test.captions)["n_distinct"] == 1

    # the baseline answers the first caption of train image 2*i
    preds, neighbours = nearest_neighbour_captions(train, test)
    write_predictions(tmp_path / "eval" / "caption_nn_baseline.jsonl", test, preds, neighbours)
    base = _jsonl(tmp_path / "eval" / "caption_nn_baseline.jsonl")
    assert [r["image_id"] for r in base] == [f"te{i}" for i in range(N_TEST)]
    assert [r["neighbour_id"] for r in base] == [f"tr{2 * i}" for i in range(N_TEST)]
    want_preds = [_train_captions(2 * i)[0] for i in range(N_TEST)]
    assert [r["prediction"] for r in base] == want_preds
    assert [r["references"] for r in base] == [_test_captions(i) for i in range(N_TEST)]
    nn = score(preds, test.captions)
    hyps = [tokenize(p) for p in want_preds]
    for k, v in corpus_bleu_1to4(refs, hyps).items():
        assert nn[k] == pytest.approx(v, abs=1e-6)
    assert nn["cider"] == pytest.approx(cider_d(refs, hyps)[0], abs=1e-6)
    assert nn["bleu1"] > 0.0


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


def _write_params(path: Path, **extra) -> Path:
    import yaml

    section = {"beam_size": 2, "max_len": 8, "batch_size": 4, **extra}
    path.write_text(yaml.safe_dump({"seed": 0, "evaluate_caption": section}))
    return path


def invoke(root: Path, clip: Path, *args: str, out: str = "", models=("noada", "ada")):
    """`clipda evaluate-caption` on root/emb and root/models/<name>; outputs named by `out`."""
    cmd = ["evaluate-caption", "--emb", str(root / "emb"), "--clip", str(clip)]
    for name in models:
        cmd += ["--model", str(root / "models" / name)]
    cmd += ["--metrics", str(root / f"m{out}.json"), "--detail", str(root / f"d{out}.json")]
    cmd += ["--predictions", str(root / f"eval{out}"), *args]
    return CliRunner().invoke(app, cmd)


def one_line(res, fragment: str) -> str:
    assert res.exit_code == 2, res.output
    assert fragment in res.output and len(res.output.strip().splitlines()) == 1
    return res.output.strip()


def test_cli_user_errors(tmp_path, clip_folder):
    make_embeddings(tmp_path / "emb", clip_folder)
    params = str(_write_params(tmp_path / "params.yaml"))
    one_line(invoke(tmp_path, clip_folder, "--params", params), "caption model 'noada' not found")
    for v in ("noada", "ada"):
        (tmp_path / "models" / v).mkdir(parents=True)
        (tmp_path / "models" / v / "config.json").write_text("{}")
    res = CliRunner().invoke(
        app,
        ["evaluate-caption", "--emb", str(tmp_path / "nope"), "--clip", str(clip_folder),
         "--model", str(tmp_path / "models" / "ada"), "--metrics", str(tmp_path / "m.json"),
         "--detail", str(tmp_path / "d.json"), "--predictions", str(tmp_path / "eval"),
         "--params", params],
    )  # fmt: skip
    one_line(res, "embeddings folder not found")
    bad = _write_params(tmp_path / "bad.yaml", beam_size=0)
    one_line(
        invoke(tmp_path, clip_folder, "--params", str(bad)),
        "params evaluate_caption.beam_size: must be >= 1",
    )
    typo = _write_params(tmp_path / "typo.yaml", beam=3)
    one_line(
        invoke(tmp_path, clip_folder, "--params", str(typo)),
        "params evaluate_caption.beam: unknown key",
    )
    (tmp_path / "models" / "nn").mkdir()
    one_line(
        invoke(tmp_path, clip_folder, "--params", params, models=("ada", "nn")),
        "model folder name 'nn' is reserved",
    )
    assert not (tmp_path / "m.json").exists()


def test_cli_rejects_a_clip_the_embeddings_were_not_made_with(tmp_path, clip_folder):
    from pipeline.clip.backbone import weights_sha256

    params = str(_write_params(tmp_path / "params.yaml"))
    make_embeddings(tmp_path / "emb", clip_folder, revision="sha256:" + "0" * 64)
    one_line(invoke(tmp_path, clip_folder, "--params", params), "is not the one the embeddings")
    one_line(invoke(tmp_path, "openai/clip-vit-base-patch32", "--params", params),
             "is not the one the embeddings")  # fmt: skip
    # the right weights pass the check (and fail later, on the missing models)
    manifest = tmp_path / "emb" / "manifest.json"
    info = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**info, "revision": weights_sha256(clip_folder)}))
    one_line(invoke(tmp_path, clip_folder, "--params", params), "caption model 'noada' not found")
    # a decoder trained on another backbone's embeddings: one line naming both
    from pipeline.nn.caption_decoder import load_caption_model, save_caption_model

    for seed, variant in enumerate(("noada", "ada")):
        _save_tiny_decoder(tmp_path / "models" / variant, clip_folder, seed)
    other = {"model": "laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "revision": "abc123"}
    save_caption_model(load_caption_model(tmp_path / "models/ada"), tmp_path / "models/ada",
                       {"clip": other})  # fmt: skip
    msg = one_line(invoke(tmp_path, clip_folder, "--params", params), "one backbone per run")
    assert "models/ada was trained on embeddings of CLIP laion/CLIP-ViT-B-32" in msg
    assert f"(abc123), but {tmp_path / 'emb'} holds those of" in msg


def _save_tiny_decoder(folder: Path, clip: Path, seed: int) -> None:
    import torch

    from pipeline.nn.caption_decoder import CaptionDecoder, DecoderConfig, save_caption_model

    text_cfg = json.loads((clip / "config.json").read_text())["text_config"]
    torch.manual_seed(seed)
    table = torch.randn(text_cfg["vocab_size"], text_cfg["hidden_size"])
    cfg = DecoderConfig(
        image_dim=DIM,
        vocab_size=table.shape[0],
        token_width=table.shape[1],
        width=16,
        layers=1,
        heads=2,
        prefix_len=2,
        max_len=10,
        dropout=0.0,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    save_caption_model(CaptionDecoder(cfg, table), folder)


def test_end_to_end_with_saved_decoders(tmp_path, clip_folder):
    import torch
    from transformers import AutoTokenizer

    from pipeline.caption.decode import caption_embeddings, load_caption_model

    embs = make_embeddings(tmp_path / "emb", clip_folder)
    for seed, variant in enumerate(("noada", "ada")):
        _save_tiny_decoder(tmp_path / "models" / variant, clip_folder, seed)
    params = str(_write_params(tmp_path / "params.yaml"))
    details = []
    for k in range(2):  # twice: CPU runs are bit-reproducible
        res = invoke(tmp_path, clip_folder, "--params", params, out=str(k))
        assert res.exit_code == 0, res.output
        assert "noada: bleu4=" in res.output and "nn: bleu4=" in res.output
        details.append(json.loads((tmp_path / f"d{k}.json").read_text()))
        headline = json.loads((tmp_path / f"m{k}.json").read_text())
        # the --model order, then the baseline, then the paired differences that matter
        assert list(headline) == ["noada", "ada", "nn", "ada-noada", "noada-nn", "ada-nn"]
        # the metrics file: headline numbers only, the same as in the detail file
        for system in ("noada", "ada", "nn"):
            want = {"bleu4": details[k][system]["bleu4"], "cider": details[k][system]["cider"]}
            assert headline[system] == want
        for pair in ("ada-noada", "noada-nn", "ada-nn"):
            a, b = pair.split("-")
            for metric in ("bleu4", "cider"):
                diff = details[k][a][metric] - details[k][b][metric]
                assert headline[pair][metric] == pytest.approx(diff, abs=2e-6)
    assert details[0] == details[1]
    detail = details[0]
    # a 95% bootstrap interval around every score and every paired difference
    ci = detail["intervals"]
    assert set(ci) == {"noada", "ada", "nn", "ada-noada", "noada-nn", "ada-nn"}
    for name, metrics in ci.items():
        assert set(metrics) == {"bleu1", "bleu2", "bleu3", "bleu4", "cider"}
        for metric, v in metrics.items():
            assert v["lo"] <= v["value"] <= v["hi"], (name, metric, v)
            if "-" not in name:
                assert v["value"] == pytest.approx(detail[name][metric], abs=2e-6)
    assert "1000 resamples" in detail["method"]["intervals"]
    for system, file in (("noada", "noada"), ("ada", "ada"), ("nn", "nn_baseline")):
        assert set(detail[system]) >= {"bleu1", "bleu2", "bleu3", "bleu4", "cider"}
        rows = _jsonl(tmp_path / "eval0" / f"caption_{file}.jsonl")
        assert len(rows) == N_TEST
        assert all(isinstance(r["prediction"], str) for r in rows)
        assert all(len(r["references"]) == 4 for r in rows)
    # random decoders write at most max_len - 1 (= 7) tokens after BOS
    rows = _jsonl(tmp_path / "eval0" / "caption_ada.jsonl")
    assert all(len(r["prediction"].split()) <= 7 for r in rows)
    # each model captioned the test images' embeddings (first row of each) with the settings
    test_emb = torch.from_numpy(embs["test_emb"].astype(np.float16).astype(np.float32))
    tok = AutoTokenizer.from_pretrained(str(clip_folder))
    model = load_caption_model(tmp_path / "models" / "ada")
    assert [r["prediction"] for r in rows] == caption_embeddings(model, test_emb, tok, 2, 8)

    s = detail["settings"]
    assert (s["n_images"], s["n_references"], s["split"]) == (N_TEST, 4 * N_TEST, "test")
    assert (s["beam_size"], s["max_len"], s["baseline_n_images"]) == (2, 8, N_TRAIN)
    assert (s["bleu_ref_length"], s["smoothing"]) == ("closest", "none")
    assert (s["paper_bleu_noada"], s["paper_bleu_ada"]) == (0.2805, 0.4116)
    assert "closest" in detail["method"]["bleu_ref_length"]
    assert detail["method"]["clip_model"] == str(clip_folder)
    saved = json.loads((tmp_path / "eval0" / "caption_report.json").read_text())
    assert (saved["read"], saved["written"]) == (4 * N_TEST, N_TEST)
    assert saved["skipped_total"] == 0
    # no scene truth given: no grounding, and the detail file says why
    assert detail["grounding"] == {"scored": False, "why": "no scene truth given (--scenes)"}
    assert "ground_p" not in detail["nn"]


def _write_scenes(path: Path, n: int) -> None:
    """Scenes of test images 0..n-1: the object its references name (colour, shape) and
    a green star left of it."""
    images = []
    for i in range(n):
        c, s = COLOURS[i % 6], SHAPES[(i + 1) % 4]
        objects = [
            {"id": 0, "category": s, "colour": c, "size": "large", "box": [50, 10, 20, 20]},
            {"id": 1, "category": "star", "colour": "green", "size": "small", "box": [10, 10, 9, 9]},
        ]  # fmt: skip
        rels = [{"subject": 1, "predicate": "left of", "object": 0}]
        images.append({"filename": f"te{i}.jpg", "objects": objects, "relations": rels})
    path.write_text(json.dumps({"images": images}))


def test_grounding_where_the_scene_truth_exists(tmp_path, clip_folder):
    from pipeline.metrics.grounding import grounding, load_scenes, vocabulary

    make_embeddings(tmp_path / "emb", clip_folder)
    for seed, variant in enumerate(("noada", "ada")):
        _save_tiny_decoder(tmp_path / "models" / variant, clip_folder, seed)
    params = str(_write_params(tmp_path / "params.yaml"))
    scenes = tmp_path / "scenes.json"
    _write_scenes(scenes, N_TEST - 1)  # the last test image has no scene
    res = invoke(tmp_path, clip_folder, "--params", params, "--scenes", str(scenes), out="g")
    assert res.exit_code == 0, res.output
    assert "nn: bleu4=" in res.output and "ground_p=" in res.output
    headline = json.loads((tmp_path / "mg.json").read_text())
    detail = json.loads((tmp_path / "dg.json").read_text())
    for system in ("noada", "ada", "nn"):
        assert list(headline[system]) == ["bleu4", "cider", "ground_p", "ground_r"]
        assert headline[system]["ground_p"] == detail[system]["ground_p"]
        assert set(detail[system]["grounding"]) >= {"colours", "shapes", "objects", "relations"}
    # the baseline's grounding: its predictions against the scenes of images 0..4
    truth = load_scenes(scenes)
    ids = [f"te{i}" for i in range(N_TEST - 1)]
    base = [r["prediction"] for r in _jsonl(tmp_path / "evalg" / "caption_nn_baseline.jsonl")]
    want = grounding(base[: N_TEST - 1], [truth[i] for i in ids], vocabulary(truth))
    for key in ("ground_p", "ground_r"):
        assert detail["nn"][key] == want[key]
    g = detail["grounding"]
    assert (g["scored"], g["n_images"], g["n_images_without_scene"]) == (True, 5, 1)
    # the references name the colour and shape of their image's object: precision 1;
    # they name no relation the parser reads ("next to a man")
    refs = g["references"]
    assert refs["n_captions"] == 4 * 5
    assert refs["colours"]["p"] == refs["shapes"]["p"] == refs["objects"]["p"] == 1.0
    assert refs["relations"]["named"] == 0
    assert g["shuffled_references"]["objects"]["p"] < 1.0
    saved = json.loads((tmp_path / "evalg" / "caption_report.json").read_text())
    assert saved["noted"] == {"no_scene_for_grounding": 1}
    # BLEU and CIDEr do not change with grounding
    plain = invoke(tmp_path, clip_folder, "--params", params, out="p")
    assert plain.exit_code == 0, plain.output
    plain_detail = json.loads((tmp_path / "dp.json").read_text())
    for system in ("noada", "ada", "nn"):
        for key in ("bleu1", "bleu4", "cider", "n_distinct"):
            assert plain_detail[system][key] == detail[system][key]
    # a scenes file that does not exist (real Flickr30k): no grounding, not an error
    res = invoke(tmp_path, clip_folder, "--params", params, "--scenes",
                 str(tmp_path / "nope.json"), out="n")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert list(json.loads((tmp_path / "mn.json").read_text())["nn"]) == ["bleu4", "cider"]
    why = json.loads((tmp_path / "dn.json").read_text())["grounding"]
    assert why["scored"] is False and "nope.json does not exist" in why["why"]
    # a malformed one is a one-line error
    scenes.write_text('{"images": [{"filename": "te0.jpg"}]}')
    one_line(invoke(tmp_path, clip_folder, "--params", params, "--scenes", str(scenes)),
             "images[0] is malformed")  # fmt: skip
