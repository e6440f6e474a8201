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
from pipeline.embedding.files import read_dataset, vector_array, vectors, write_table
from pipeline.metrics import cider_d, corpus_bleu_1to4, tokenize
from pipeline.metrics.layout import read_rows
from pipeline.stages.evaluate_caption import Settings

DIM = 16  # the tiny CLIP's: CLIPScore compares its text embeddings with these image embeddings
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


def make_embeddings(folder: Path, clip: Path, revision: str | None = None, dim=DIM) -> dict:
    """Two shards; test image i lies next to train image 2*i (its nearest neighbour)."""
    rng = np.random.default_rng(0)
    train_emb = _unit(rng.normal(size=(N_TRAIN, dim)))
    test_emb = _unit(
        train_emb[[2 * i for i in range(N_TEST)]] + 0.01 * rng.normal(size=(N_TEST, dim))
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
    manifest = {"model": str(clip), "dim": dim}
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
    assert ada["n_pred_under4"] == 0
    assert score(["a photo"] * N_TEST, test.captions)["n_pred_under4"] == N_TEST

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
    cmd += ["--metrics", str(root / f"m{out}"), "--detail", str(root / f"d{out}.json")]
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
         "--model", str(tmp_path / "models" / "ada"), "--metrics", str(tmp_path / "m"),
         "--detail", str(tmp_path / "d.json"), "--predictions", str(tmp_path / "eval"),
         "--params", params],
    )  # fmt: skip
    one_line(res, "embeddings folder not found")
    bad = _write_params(tmp_path / "bad.yaml", beam_size=0)
    one_line(
        invoke(tmp_path, clip_folder, "--params", str(bad)),
        "params evaluate_caption.beam_size: must be >= 1",
    )
    bad = _write_params(tmp_path / "bad.yaml", no_repeat_ngram_size=-1)
    one_line(
        invoke(tmp_path, clip_folder, "--params", str(bad)),
        "params evaluate_caption.no_repeat_ngram_size: must be >= 0 (0: off)",
    )
    bad = _write_params(tmp_path / "bad.yaml", mbr_samples=-2)
    one_line(
        invoke(tmp_path, clip_folder, "--params", str(bad)),
        "params evaluate_caption.mbr_samples: must be >= 0 (0: beam search alone)",
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
    one_line(invoke(tmp_path, clip_folder, "--params", params, models=("ada", "references")),
             "model folder name 'references' is reserved")  # fmt: skip
    assert not (tmp_path / "m").exists()


def test_cli_rejects_a_clip_whose_text_embeddings_do_not_match_the_images(tmp_path, clip_folder):
    make_embeddings(tmp_path / "emb", clip_folder, dim=8)  # CLIPScore needs the same space
    for v in ("noada", "ada"):
        (tmp_path / "models" / v).mkdir(parents=True)
        (tmp_path / "models" / v / "config.json").write_text("{}")
    params = str(_write_params(tmp_path / "params.yaml"))
    one_line(invoke(tmp_path, clip_folder, "--params", params),
             "gives 16-d text embeddings; the image embeddings are 8-d")  # fmt: skip


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


def _save_tiny_decoder(folder: Path, clip: Path, seed: int, domain_token: bool = False) -> None:
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
        domain_token=domain_token,
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
        headline = read_rows(tmp_path / f"m{k}")
        # a file per system (the --models, the baseline) and per paired difference
        assert set(headline) == {"noada", "ada", "nn", "ada-noada", "noada-nn", "ada-nn"}
        # the metrics file: headline numbers only, the same as in the detail file
        for system in ("noada", "ada", "nn"):
            assert list(headline[system])[:4] == ["bleu4", "cider", "clipscore", "refclipscore"]
            assert headline[system] == {m: details[k][system][m] for m in headline[system]}
        for pair in ("ada-noada", "noada-nn", "ada-nn"):
            a, b = pair.split("-")
            assert list(headline[pair]) == ["bleu4", "cider", "clipscore", "refclipscore"]
            for metric in headline[pair]:
                diff = details[k][a][metric] - details[k][b][metric]
                assert headline[pair][metric] == pytest.approx(diff, abs=2e-6)
    assert details[0] == details[1]
    detail = details[0]
    # a 95% bootstrap interval around every score and every paired difference
    ci = detail["intervals"]
    assert set(ci) == {"noada", "ada", "nn", "ada-noada", "noada-nn", "ada-nn", "references"}
    clip_metrics = {"clipscore", "refclipscore"}
    for name, metrics in ci.items():
        want = clip_metrics | (set() if name == "references" else {f"bleu{n}" for n in range(1, 5)}
                               | {"cider"})  # fmt: skip
        assert set(metrics) == want
        for metric, v in metrics.items():
            assert v["lo"] <= v["value"] <= v["hi"], (name, metric, v)
            if "-" not in name:
                point = detail["clipscore"][name] if name == "references" else detail[name]
                assert v["value"] == pytest.approx(point[metric], abs=2e-6)
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
    d = Settings()  # params.yaml here names neither: the defaults
    want = caption_embeddings(model, test_emb, tok, 2, 8, length_penalty=d.length_penalty,
                              no_repeat_ngram_size=d.no_repeat_ngram_size)  # fmt: skip
    assert [r["prediction"] for r in rows] == want
    # CLIPScore: 2.5 * max(cos, 0) of the --clip CLIP's embedding of "A photo depicts " +
    # each caption and its image's embedding; RefCLIPScore with the best reference
    from pipeline.clip.backbone import load_backbone

    bb = load_backbone(clip_folder, "cpu")
    image = torch.nn.functional.normalize(test_emb.double(), dim=1)

    def embed(texts):
        return bb.encode_texts(["A photo depicts " + t for t in texts]).double()

    text = embed([r["prediction"] for r in rows])
    refs = [embed(_test_captions(i)) for i in range(N_TEST)]
    cs = 2.5 * (text * image).sum(1).clamp(min=0)
    best = torch.stack([(refs[i] @ text[i]).max().clamp(min=0) for i in range(N_TEST)])
    assert detail["ada"]["clipscore"] == pytest.approx(cs.mean().item(), abs=1e-5)
    ref_cs = (2 * cs * best / (cs + best)).nan_to_num()
    assert detail["ada"]["refclipscore"] == pytest.approx(ref_cs.mean().item(), abs=1e-5)
    own = torch.stack([2.5 * (refs[i] @ image[i]).clamp(min=0).mean() for i in range(N_TEST)])
    refs_score = detail["clipscore"]["references"]
    assert refs_score["clipscore"] == pytest.approx(own.mean().item(), abs=1e-5)
    loo = []  # each reference against the image's other references
    for i in range(N_TEST):
        r_cs = 2.5 * (refs[i] @ image[i]).clamp(min=0)
        sim = (refs[i] @ refs[i].T).fill_diagonal_(-2).max(1).values.clamp(min=0)
        loo.append((2 * r_cs * sim / (r_cs + sim)).nan_to_num().mean())
    assert refs_score["refclipscore"] == pytest.approx(torch.stack(loo).mean().item(), abs=1e-5)
    assert refs_score["n_images_leave_one_out"] == N_TEST
    assert (detail["clipscore"]["prompt"], detail["clipscore"]["w"]) == ("A photo depicts ", 2.5)

    # texts longer than the CLIP's context (16 tokens here) are counted: they are cut
    def n_long(texts):
        return sum(len(tok("A photo depicts " + t)["input_ids"]) > 16 for t in texts)

    truncated = detail["clipscore"]["truncated"]
    assert set(truncated) == {"noada", "ada", "nn", "references"}
    assert truncated["ada"] == n_long([r["prediction"] for r in rows])
    assert truncated["references"] == n_long([c for r in rows for c in r["references"]])
    from pipeline.caption.evaluation import TextEncoder

    assert TextEncoder(str(clip_folder), DIM).count_truncated(["a red circle", "a dog " * 8]) == 1
    assert "2104.08718" in detail["method"]["clipscore"]

    s = detail["settings"]
    assert (s["n_images"], s["n_references"], s["split"]) == (N_TEST, 4 * N_TEST, "test")
    assert (s["beam_size"], s["max_len"], s["baseline_n_images"]) == (2, 8, N_TRAIN)
    assert (s["bleu_ref_length"], s["smoothing"]) == ("closest", "none")
    assert (s["paper_bleu_noada"], s["paper_bleu_ada"]) == (0.2805, 0.4116)
    assert s["runtime"]["device"] == "cpu" and s["runtime"]["torch"] == torch.__version__
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
    headline = read_rows(tmp_path / "mg")
    detail = json.loads((tmp_path / "dg.json").read_text())
    kinds = ("colours", "shapes", "objects", "relations")
    for system in ("noada", "ada", "nn"):
        assert list(headline[system])[:6] == ["bleu4", "cider", "clipscore", "refclipscore",
                                              "ground_p", "ground_r"]  # fmt: skip
        assert headline[system]["ground_p"] == detail[system]["ground_p"]
        assert set(detail[system]["grounding"]) >= set(kinds)
        # an interval for each kind's precision and recall, of the systems and differences
        for kind in kinds:
            for pr in ("p", "r"):
                v = detail["intervals"][system][f"{kind}_{pr}"]
                assert v["value"] == detail[system]["grounding"][kind][pr]
                assert v["lo"] <= v["value"] <= v["hi"]
    for pair in ("ada-noada", "noada-nn", "ada-nn"):
        a, b = pair.split("-")
        for kind in kinds:
            v = detail["intervals"][pair][f"{kind}_p"]
            want_diff = detail[a]["grounding"][kind]["p"] - detail[b]["grounding"][kind]["p"]
            assert v["value"] == pytest.approx(want_diff, abs=2e-6)
            assert v["lo"] <= v["value"] <= v["hi"]
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
        for key in ("bleu1", "bleu4", "cider", "repeat4"):
            assert plain_detail[system][key] == detail[system][key]
    # a scenes file that does not exist (real Flickr30k): no grounding, not an error
    res = invoke(tmp_path, clip_folder, "--params", params, "--scenes",
                 str(tmp_path / "nope.json"), out="n")  # fmt: skip
    assert res.exit_code == 0, res.output
    nn = read_rows(tmp_path / "mn")["nn"]
    assert not {"ground_p", "ground_r"} & set(nn) and "clipscore" in nn  # CLIPScore: no truth
    why = json.loads((tmp_path / "dn.json").read_text())["grounding"]
    assert why["scored"] is False and "nope.json does not exist" in why["why"]
    # a malformed one is a one-line error
    scenes.write_text('{"images": [{"filename": "te0.jpg"}]}')
    one_line(invoke(tmp_path, clip_folder, "--params", params, "--scenes", str(scenes)),
             "images[0] is malformed")  # fmt: skip


def test_form_of_the_captions_and_the_decode_with_the_rule_off(tmp_path, clip_folder):
    import torch
    from transformers import AutoTokenizer

    from pipeline.caption.decode import caption_embeddings, load_caption_model
    from pipeline.metrics.form import form
    from pipeline.synth.grammar import parses

    embs = make_embeddings(tmp_path / "emb", clip_folder)
    for seed, variant in enumerate(("noada", "ada")):
        _save_tiny_decoder(tmp_path / "models" / variant, clip_folder, seed)
    params = _write_params(tmp_path / "params.yaml", no_repeat_ngram_size=2, length_penalty=0.5)
    scenes = tmp_path / "scenes.json"
    _write_scenes(scenes, N_TEST)  # two objects in every scene
    res = invoke(tmp_path, clip_folder, "--params", str(params), "--scenes", str(scenes), out="f")
    assert res.exit_code == 0, res.output
    headline = read_rows(tmp_path / "mf")
    detail = json.loads((tmp_path / "df.json").read_text())
    s = detail["settings"]
    assert (s["no_repeat_ngram_size"], s["length_penalty"]) == (2, 0.5)
    tok = AutoTokenizer.from_pretrained(str(clip_folder))
    test_emb = torch.from_numpy(embs["test_emb"].astype(np.float16).astype(np.float32))
    looped = False
    for name in ("noada", "ada"):
        # the captions scored: with the rule; beside them the same decode with it off
        model = load_caption_model(tmp_path / "models" / name)
        on, off = (caption_embeddings(model, test_emb, tok, 2, 8, no_repeat_ngram_size=n,
                                      length_penalty=0.5) for n in (2, 0))  # fmt: skip
        rows = _jsonl(tmp_path / "evalf" / f"caption_{name}.jsonl")
        assert [r["prediction"] for r in rows] == on
        assert [r["prediction_rule_off"] for r in rows] == off
        looped |= on != off
        want = form(on, parses, [2] * N_TEST) | {"repeat4_rule_off": form(off)["repeat4"]}
        got = detail[name]["form"] | {k: detail[name][k] for k in ("wellformed", "repeat4")}
        assert got == want
        assert headline[name]["wellformed"] == want["wellformed"]
        assert headline[name]["repeat4"] == want["repeat4"]
    assert looped  # the rule changed some caption of these tiny decoders
    # the baseline: its form, no second decode; the references: a row of their own
    nn = [r["prediction"] for r in _jsonl(tmp_path / "evalf" / "caption_nn_baseline.jsonl")]
    assert detail["nn"]["form"] == {k: v for k, v in form(nn, parses, [2] * N_TEST).items()
                                    if k not in ("wellformed", "repeat4")}  # fmt: skip
    refs = [c for i in range(N_TEST) for c in _test_captions(i)]
    assert detail["form"]["scored"] is True
    assert detail["form"]["references"] == form(refs, parses, [2] * len(refs))
    assert detail["form"]["references"]["wellformed"] == 0.0  # not the sample world's style
    assert "repeat4" in detail["method"]["form"]
    # real data (no scene truth): no grammar, no counts, and the detail file says why
    res = invoke(tmp_path, clip_folder, "--params", str(params), out="r")
    assert res.exit_code == 0, res.output
    headline = read_rows(tmp_path / "mr")
    detail = json.loads((tmp_path / "dr.json").read_text())
    assert "wellformed" not in headline["ada"] and "repeat4" in headline["ada"]
    assert "count_right" not in detail["ada"]["form"]
    assert "repeat4_rule_off" in detail["ada"]["form"]
    assert detail["form"]["scored"] is False and "--scenes" in detail["form"]["why"]
    assert detail["form"]["references"] == form(refs)


def test_minimum_bayes_risk_decoding_is_what_the_stage_scores(tmp_path, clip_folder):
    import torch
    from transformers import AutoTokenizer

    from pipeline.caption.decode import caption_embeddings, load_caption_model

    embs = make_embeddings(tmp_path / "emb", clip_folder)
    for seed, variant in enumerate(("noada", "ada")):
        _save_tiny_decoder(tmp_path / "models" / variant, clip_folder, seed)
    params = _write_params(tmp_path / "params.yaml", mbr_samples=3, mbr_temperature=2.0)
    res = invoke(tmp_path, clip_folder, "--params", str(params), out="b")
    assert res.exit_code == 0, res.output
    detail = json.loads((tmp_path / "db.json").read_text())
    assert (detail["settings"]["mbr_samples"], detail["settings"]["mbr_temperature"]) == (3, 2.0)
    tok = AutoTokenizer.from_pretrained(str(clip_folder))
    test_emb = torch.from_numpy(embs["test_emb"].astype(np.float16).astype(np.float32))
    model = load_caption_model(tmp_path / "models" / "noada")
    rule = Settings()
    kw = {"no_repeat_ngram_size": rule.no_repeat_ngram_size, "length_penalty": 1.0}
    want = caption_embeddings(model, test_emb, tok, 2, 8, 4, **kw, mbr_samples=3,
                              mbr_temperature=2.0, seed=0)  # fmt: skip
    rows = _jsonl(tmp_path / "evalb" / "caption_noada.jsonl")
    assert [r["prediction"] for r in rows] == want
    assert want != caption_embeddings(model, test_emb, tok, 2, 8, 4, **kw)  # not the beam's


def test_a_domain_token_model_is_also_decoded_with_the_source_token(tmp_path, clip_folder):
    """For a model with a domain token, the detail file says what its captions look like
    with the source (LAION) token instead of the target's: well-formed and alt-text shares."""
    import torch
    from transformers import AutoTokenizer

    from pipeline.caption.decode import caption_embeddings, load_caption_model
    from pipeline.metrics.form import form
    from pipeline.nn.caption_decoder import SOURCE
    from pipeline.stages.evaluate_caption import Settings
    from pipeline.synth.grammar import parses

    embs = make_embeddings(tmp_path / "emb", clip_folder)
    _save_tiny_decoder(tmp_path / "models" / "noada", clip_folder, 0)
    _save_tiny_decoder(tmp_path / "models" / "ada", clip_folder, 1, domain_token=True)
    params = _write_params(tmp_path / "params.yaml")
    scenes = tmp_path / "scenes.json"
    _write_scenes(scenes, N_TEST)
    res = invoke(tmp_path, clip_folder, "--params", str(params), "--scenes", str(scenes), out="t")
    assert res.exit_code == 0, res.output
    detail = json.loads((tmp_path / "dt.json").read_text())
    assert "source_token" not in detail["noada"]["form"]
    tok = AutoTokenizer.from_pretrained(str(clip_folder))
    test_emb = torch.from_numpy(embs["test_emb"].astype(np.float16).astype(np.float32))
    model = load_caption_model(tmp_path / "models" / "ada")
    rule = Settings()  # the decode settings _write_params leaves at their defaults
    src = caption_embeddings(model, test_emb, tok, 2, 8, no_repeat_ngram_size=rule.no_repeat_ngram_size,
                             length_penalty=rule.length_penalty, domain=SOURCE)  # fmt: skip
    want = form(src, parses)
    assert detail["ada"]["form"]["source_token"] == {
        "wellformed": want["wellformed"], "alt_text": want["alt_text"], "examples": src[:3]}  # fmt: skip


def test_form_counts_shapes_against_each_image_scene():
    from pipeline.caption.evaluation import SceneTruth, form_scores, form_summary
    from pipeline.metrics.grounding import Scene

    obj = {"category": "circle", "colour": "red", "box": (0, 0, 5, 5)}
    scenes = [Scene({0: obj, 1: obj}, []), Scene({0: obj, 1: obj, 2: obj}, []), None]
    two = "There are 2 shapes : a red circle and a small red circle ."
    three = "There are 3 shapes : a red circle , a large red circle and a small red circle ."
    truth = SceneTruth(scenes, [[two], [two, three], [three]], source="scenes.json")
    out = form_scores([two, two, three], truth, rule_off=[two, two, two])
    # image 0: right; image 1: wrong; image 2: no scene to check against
    assert out["wellformed"] == 1.0 and out["repeat4"] == 0.0
    assert (out["form"]["count_stated"], out["form"]["count_right"]) == (2, 0.5)
    assert out["form"]["repeat4_rule_off"] == 0.0
    refs = form_summary(truth)["references"]
    assert (refs["n_captions"], refs["wellformed"]) == (4, 1.0)
    assert (refs["count_stated"], refs["count_right"]) == (3, pytest.approx(2 / 3))
    absent = SceneTruth([], [[two]], absent="no scene truth given (--scenes)")
    assert set(form_scores([two], absent)) == {"repeat4", "form"}
    assert "count_stated" not in form_scores([two], absent)["form"]


def _shifted_copy(src: Path, dst: Path) -> None:
    """The embedding folder `src` with every vector moved along its first axis: a LAION
    whose images and captions a line tells from those of `src`."""
    dst.mkdir(parents=True)
    table = read_dataset(src)
    cols = {}
    for name in ("image_emb", "text_emb"):
        x = vectors(table.column(name)).astype(np.float32)
        x[:, 0] += 3.0
        cols[name] = vector_array(_unit(x).astype(np.float16))
    for name in table.column_names:
        if name not in cols:
            cols[name] = table.column(name)
    write_table(dst / "part-00000.arrow", pa.table({n: cols[n] for n in table.column_names}))


def test_domain_gap_against_the_source_embeddings(tmp_path, clip_folder):
    make_embeddings(tmp_path / "emb", clip_folder)
    _shifted_copy(tmp_path / "emb", tmp_path / "laion")
    for seed, variant in enumerate(("noada", "ada")):
        _save_tiny_decoder(tmp_path / "models" / variant, clip_folder, seed)
    params = str(_write_params(tmp_path / "params.yaml"))
    res = invoke(tmp_path, clip_folder, "--params", params, "--laion", str(tmp_path / "laion"))
    assert res.exit_code == 0, res.output
    gap = json.loads((tmp_path / "d.json").read_text())["domain_gap"]
    assert gap["measured"] and "2(1 - 2ε)" in gap["how"]
    n = N_TRAIN + N_TEST + 1  # unique images per domain, every split; n // 2 of each fit
    assert (gap["image"]["n_fit"], gap["image"]["n_test"]) == (2 * (n // 2), 2 * (n - n // 2))
    rows = read_dataset(tmp_path / "emb").num_rows  # every caption row
    assert gap["text"]["n_fit"] + gap["text"]["n_test"] == 2 * rows
    for g in (gap["image"], gap["text"]):  # a line separates the two: d_A = 2
        assert (g["error"], g["a_distance"]) == (0.0, 2.0), g
    for name in ("noada", "ada"):  # each decoder's prefix of the same images, measured alike
        g = gap["prefix"][name]
        assert (
            g["n_test"] == 2 * (n - n // 2) and g["error_ci"][0] <= g["error"] <= g["error_ci"][1]
        )
        assert g["a_distance"] == pytest.approx(2 * (1 - 2 * g["error"]), abs=1e-3)
    res = invoke(tmp_path, clip_folder, "--params", params, out="x")  # no --laion: left out
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "dx.json").read_text())["domain_gap"] == {
        "measured": False, "why": "no --laion embeddings given"}  # fmt: skip
    missing = invoke(tmp_path, clip_folder, "--params", params, "--laion", str(tmp_path / "no"))
    one_line(missing, "LAION embeddings folder not found")
