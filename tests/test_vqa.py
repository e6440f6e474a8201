"""VQA: head + losses, training, the frequency baselines, evaluate, `ask`, the generic QA table.

Hand-made data/qa parquet and random Arrow embeddings (with a planted signal: an image's
embedding is the sum of its answers' embeddings plus noise), all in tmp_path.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image
from tiny_clip import make_tiny_clip
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.embedding.files import vector_array, write_table
from pipeline.errors import UserError
from pipeline.formats import qa_table
from pipeline.formats.vg_qa import SCHEMA, split_of
from pipeline.metrics.layout import read_rows
from pipeline.nn.vqa_head import (
    HeadOutput,
    VQAHead,
    VQAHeadConfig,
    answer_scores,
    cosine_loss,
    head_config,
    load_head,
    save_head,
    vqa_loss,
)
from pipeline.settings import Answers, Split
from pipeline.stages import evaluate_vqa, train_vqa
from pipeline.vqa import zeroshot
from pipeline.vqa.baselines import FrequencyPrior

PREDICATES = ["on", "has", "near", "under"]
OBJECTS = ["cat", "dog", "tree", "car", "cup"]
DIM = 16


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def qa_row(i, image_id, qtype, question, answer, subject, obj, split, vocab):
    return {
        "qid": f"{image_id}/{qtype[0]}{i}",
        "image_id": image_id,
        "image_path": None,
        "width": 100,
        "height": 100,
        "qtype": qtype,
        "question": question,
        "answer": answer,
        "subject": subject,
        "object": obj,
        "subj_box": [0, 0, 10, 10],
        "obj_box": None,
        "union_box": None,
        "in_vocab": answer in vocab,
        "split": split,
    }


def write_qa(qa: Path, rows: dict[str, list[dict]], answers: list[str], counts: dict) -> None:
    qa.mkdir(parents=True, exist_ok=True)
    for split, rs in rows.items():
        pq.write_table(pa.Table.from_pylist(rs, schema=SCHEMA), qa / f"{split}.parquet")
    entries = [{"answer": a, "count": counts.get(a, 0)} for a in answers]
    (qa / "answers.json").write_text(json.dumps({"answers": entries, "top_k": 99}))


def write_emb(emb: Path, image_ids, image_emb, questions, q_emb, answers, a_emb, manifest):
    """Two image shards (so lookups cross shard borders), texts.arrow, manifest.json."""
    emb.mkdir(parents=True, exist_ok=True)
    ids = [str(i) for i in image_ids]
    img = np.asarray(image_emb, dtype=np.float16)
    half = len(ids) // 2
    for k, sl in enumerate((slice(0, half), slice(half, None))):
        table = pa.table({"id": ids[sl], "image_emb": vector_array(img[sl])})
        write_table(emb / f"part-{k:05d}.arrow", table)
    texts = pa.table(
        {
            "id": [f"q{i}" for i in range(len(questions))] + [f"a{i}" for i in range(len(answers))],
            "kind": ["question"] * len(questions) + ["answer"] * len(answers),
            "text": list(questions) + list(answers),
            "text_emb": vector_array(np.concatenate([q_emb, a_emb]).astype(np.float16)),
        }
    )
    write_table(emb / "texts.arrow", texts)
    (emb / "manifest.json").write_text(json.dumps({"dim": img.shape[1], **manifest}))


def make_world(root: Path, n_images: int = 100, seed: int = 0, oov_every: int = 0):
    """qa/ + emb/ with one relation and one object question per image."""
    rng = np.random.default_rng(seed)
    answers = PREDICATES + OBJECTS
    a_emb = unit(rng.normal(size=(len(answers), DIM))).astype(np.float32)
    rows: dict[str, list[dict]] = {s: [] for s in ("train", "val", "test")}
    image_ids, image_emb, questions, counts = [], [], {}, {}
    for i in range(n_images):
        split = ("train", "train", "train", "val", "test")[i % 5]
        pred = PREDICATES[rng.integers(len(PREDICATES))]
        s, o = (str(x) for x in rng.choice(OBJECTS, 2, replace=False))
        thing = OBJECTS[rng.integers(len(OBJECTS))]
        image_id = 1000 + i
        vec = a_emb[answers.index(pred)] + a_emb[answers.index(thing)]
        image_emb.append(unit(vec + 0.3 * rng.normal(size=DIM)))
        image_ids.append(image_id)
        rq = f"What is the relationship between {s} and {o}?"
        ans = "beside" if oov_every and i % oov_every == 0 else pred
        for qtype, q, a, subj, obj in (
            ("relation", rq, ans, s, o),
            ("object", "What is this?", thing, thing, None),
        ):
            questions.setdefault(q, None)
            counts[a] = counts.get(a, 0) + (split == "train")
            rows[split].append(qa_row(i, image_id, qtype, q, a, subj, obj, split, answers))
    write_qa(root / "qa", rows, answers, counts)
    q_emb = unit(rng.normal(size=(len(questions), DIM)))
    write_emb(
        root / "emb",
        image_ids,
        image_emb,
        list(questions),
        q_emb,
        answers,
        a_emb,
        {"model": "fake-clip", "revision": "r0"},
    )
    return root / "qa", root / "emb", answers, a_emb


def fake_text_encoder(answers: list[str], a_emb: np.ndarray):
    """Prompt -> the embedding of the answer word it names (a perfectly aligned 'CLIP')."""

    def encode(texts: list[str]) -> np.ndarray:
        out = []
        for t in texts:
            hits = [w for w in t.split() if w in PREDICATES] or [t.split()[-1]]
            out.append(a_emb[answers.index(hits[0])])
        return np.array(out)

    return encode


FAST = {"lr": 1e-2, "epochs": 4, "hidden": [64], "lr_step_size": 1, "lr_gamma": 0.8}


def write_params(path: Path, seed: int = 0, **sections) -> Path:
    path.write_text(yaml.safe_dump({"seed": seed, **sections}))
    return path


def train(qa: Path, emb: Path, out: Path, plots: Path, **settings) -> str:
    """`train_vqa.main` with `settings` as the params file's `train_vqa:` section."""
    params = write_params(out.parent / f"{out.name}.params.yaml", train_vqa=settings)
    return train_vqa.main(qa=qa, emb=emb, out=out, plots=plots, params=params)


def evaluate(qa: Path, emb: Path, model: Path, out: Path, clip="fake-clip", cache=None, **settings):
    """`evaluate_vqa.main` writing out/{vqa/,detail.json,vqa.jsonl} -> (summary, headline,
    detail); `settings` is the params file's `evaluate_vqa:` section."""
    out.mkdir(parents=True, exist_ok=True)
    summary = evaluate_vqa.main(
        qa=qa, emb=emb, model=model, clip=clip, metrics=out / "vqa",
        detail=out / "detail.json", predictions=out / "vqa.jsonl", prompt_cache=cache,
        params=write_params(out / "params.yaml", evaluate_vqa=settings),
    )  # fmt: skip
    headline, detail = read_rows(out / "vqa"), json.loads((out / "detail.json").read_text())
    return summary, headline, detail


def head(fusion="concat", hidden=(512,), dropout=0.1, dim=DIM, out_dim=None, loss="cosine",
         n_answers=0, input_norm="none") -> VQAHead:  # fmt: skip
    cfg = head_config(dim, out_dim or dim, fusion, hidden, dropout, loss, n_answers, input_norm)
    return VQAHead(cfg)


# ------------------------------------------------------------------ head and losses


def test_cosine_loss_zero_for_identical_and_known_values():
    x = torch.randn(7, DIM)
    assert cosine_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_loss(x, 3.0 * x).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert cosine_loss(x, -x).item() == pytest.approx(2.0, abs=1e-6)
    e = torch.eye(2)
    assert cosine_loss(e[:1], e[1:]).item() == pytest.approx(1.0, abs=1e-7)


def test_losses_of_the_two_outputs():
    answers = torch.eye(3)
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    emb = torch.tensor([[0.0, 3.0, 0.0]])  # cos to answer 0: 0
    label = torch.tensor([0])
    ce = -torch.log_softmax(logits[0], 0)[0].item()
    assert vqa_loss("ce", HeadOutput(None, logits), answers, label).item() == pytest.approx(ce)
    assert vqa_loss("cosine", HeadOutput(emb, None), answers, label).item() == pytest.approx(1.0)
    both = vqa_loss("both", HeadOutput(emb, logits), answers, label)
    assert both.item() == pytest.approx(ce + 1.0, abs=1e-6)
    with pytest.raises(UserError, match="loss must be"):
        vqa_loss("mse", HeadOutput(emb, logits), answers, label)
    with pytest.raises(UserError, match="classifier"):
        vqa_loss("both", HeadOutput(emb, None), answers, label)
    # ranking: the classifier's logits when there is one, else cosines to the answers
    assert torch.equal(answer_scores(HeadOutput(emb, logits), answers), logits)
    cos = answer_scores(HeadOutput(emb, None), answers)
    assert torch.allclose(cos, torch.tensor([[0.0, 1.0, 0.0]]))


@pytest.mark.parametrize("fusion,width", [("concat", 2 * DIM), ("product", DIM), ("both", 3 * DIM)])
def test_fusion_widths(fusion, width):
    net = head(fusion=fusion, hidden=[5], dropout=0.5, out_dim=8, loss="both", n_answers=6)
    assert net.trunk[0].in_features == width
    assert [type(m).__name__ for m in net.trunk] == ["Linear", "ReLU", "Dropout"]
    emb, logits = net(torch.randn(3, DIM), torch.randn(3, DIM))
    assert emb.shape == (3, 8) and logits.shape == (3, 6)
    with pytest.raises(UserError):
        VQAHeadConfig(dim=DIM, out_dim=8, fusion="sum", hidden=[5], dropout=0.0)


def test_a_loss_builds_only_the_outputs_it_trains():
    # DDP rejects parameters no loss reaches: cosine has no classifier, ce no embedding layer
    assert head(loss="cosine", n_answers=6).classifier is None
    ce = head(loss="ce", n_answers=6)
    assert ce.to_answer is None and ce.classifier.out_features == 6
    both = head(loss="both", n_answers=6, input_norm="layernorm")
    assert both.to_answer is not None and both.classifier is not None
    # unit-norm CLIP inputs have components ~ 1/sqrt(d); LayerNorm gives them unit scale
    x = torch.nn.functional.normalize(torch.randn(64, DIM), dim=-1)
    fused = both.norm(torch.cat([x, x.flip(0)], dim=-1))
    assert fused.std().item() == pytest.approx(1.0, abs=0.05)
    assert isinstance(head().norm, torch.nn.Identity)
    with pytest.raises(UserError, match="input_norm"):
        head(input_norm="batch")
    with pytest.raises(UserError, match="loss must be"):
        head(loss="mse")


@pytest.mark.parametrize("loss", ["cosine", "ce", "both"])
def test_loss_decreases_over_a_few_steps(loss):
    torch.manual_seed(0)
    answers = torch.nn.functional.normalize(torch.randn(6, DIM), dim=-1)
    labels = torch.arange(6).repeat(4)
    image = answers[labels] + 0.1 * torch.randn(len(labels), DIM)
    question = torch.randn(len(labels), DIM)
    model = head(hidden=[32], dropout=0.0, loss=loss, n_answers=6, input_norm="layernorm")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        value = vqa_loss(loss, model(image, question), answers, labels)
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("loss", ["cosine", "both"])
def test_save_load_round_trip(tmp_path, loss):
    model = head(fusion="both", hidden=[12, 7], out_dim=5, loss=loss, n_answers=4,
                 input_norm="layernorm").eval()  # fmt: skip
    emb = torch.randn(4, 5)
    save_head(model, tmp_path, emb, {"answers": list("abcd")})
    again, emb2, cfg = load_head(tmp_path)
    x, q = torch.randn(2, DIM), torch.randn(2, DIM)
    for a, b in zip(model(x, q), again(x, q)):
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(model.scores(x, q, emb), again.scores(x, q, emb2))
    assert torch.equal(emb, emb2)
    assert cfg["answers"] == list("abcd") and cfg["head"]["hidden"] == [12, 7]
    assert cfg["head"]["n_answers"] == (4 if loss == "both" else 0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(UserError):
        load_head(tmp_path / "nope")
    # weights that do not fit the config (another head's, an older layout): one line
    save_head(head(hidden=[3]), tmp_path / "other", emb, {})
    (tmp_path / "other/config.json").write_text((tmp_path / "config.json").read_text())
    with pytest.raises(UserError, match="re-run train_vqa"):
        load_head(tmp_path / "other")


# ------------------------------------------------------------------ training


def test_train_learns_and_is_deterministic(tmp_path):
    qa, emb, answers, _ = make_world(tmp_path, n_images=150, oov_every=7)
    train(qa, emb, tmp_path / "m1", tmp_path / "p1.tsv", **{**FAST, "epochs": 6})
    train(qa, emb, tmp_path / "m2", tmp_path / "p2.tsv", **{**FAST, "epochs": 6})
    w1 = (tmp_path / "m1/model.safetensors").read_bytes()
    assert w1 == (tmp_path / "m2/model.safetensors").read_bytes()
    tsv = (tmp_path / "p1.tsv").read_text()
    assert tsv == (tmp_path / "p2.tsv").read_text()
    lines = [line.split("\t") for line in tsv.splitlines()]
    assert lines[0] == ["epoch", "train_loss", "val_loss", "val_top1", "lr", "best_epoch"]
    assert [int(r[0]) for r in lines[1:]] == [1, 2, 3, 4, 5, 6]
    train_loss = [float(r[1]) for r in lines[1:]]
    val_loss = [float(r[2]) for r in lines[1:]]
    assert train_loss[-1] < 0.7 * train_loss[0] and val_loss[-1] < val_loss[0]
    # StepLR: lr times lr_gamma every lr_step_size epochs
    assert [float(r[4]) for r in lines[1:4]] == [1e-2, 8e-3, 6.4e-3]
    # rows whose answer is outside the vocabulary are skipped for training, and counted
    n_oov_train = sum(1 for i in range(150) if i % 7 == 0 and i % 5 < 3)
    r1 = json.loads((tmp_path / "m1/report.json").read_text())
    assert r1["skipped"]["answer_out_of_vocab"] >= n_oov_train
    cfg = json.loads((tmp_path / "m1/config.json").read_text())
    assert cfg["answers"] == answers and cfg["clip"] == "fake-clip"
    assert cfg["qtype_candidates"] == {"object": [4, 5, 6, 7, 8], "relation": [0, 1, 2, 3]}


def read_plot(path: Path) -> list[dict[str, float]]:
    lines = [line.split("\t") for line in path.read_text().splitlines()]
    return [dict(zip(lines[0], map(float, r))) for r in lines[1:]]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_early_stopping_keeps_the_best_epochs_weights(tmp_path):
    qa, emb, _, _ = make_world(tmp_path, n_images=60)
    # lr 0.05 without decay overfits: val loss falls for a few epochs, then rises
    steep = {"lr": 5e-2, "lr_gamma": 1.0, "hidden": [64], "dropout": 0.0, "epochs": 10}
    summary = train(qa, emb, tmp_path / "a", tmp_path / "a.tsv", **steep,
                    early_stop="val_loss", patience=0)  # fmt: skip
    rows = read_plot(tmp_path / "a.tsv")
    assert len(rows) == 10  # patience 0: every epoch runs
    val_loss = [r["val_loss"] for r in rows]
    best = int(np.argmin(val_loss)) + 1
    assert best < 10 and val_loss[-1] > val_loss[best - 1]  # the best is not the last
    # the plot's best-so-far column, config.json and report.json name the kept epoch
    assert [int(r["best_epoch"]) for r in rows][-1] == best
    cfg = json.loads((tmp_path / "a/config.json").read_text())
    assert (cfg["train"]["best_epoch"], cfg["train"]["epochs_run"]) == (best, 10)
    report = json.loads((tmp_path / "a/report.json").read_text())
    assert report["best_epoch"] == best and report["best_val_loss"] == pytest.approx(min(val_loss))
    assert f"kept epoch {best} of 10 (val_loss)" in summary
    # the saved weights are those of epoch `best`: the same run stopped there by hand ...
    train(qa, emb, tmp_path / "b", tmp_path / "b.tsv", **{**steep, "epochs": best},
          early_stop="none")  # fmt: skip
    kept, at_best = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert kept.keys() == at_best.keys()
    assert all(torch.equal(kept[k], at_best[k]) for k in kept)
    # ... and not those of the last epoch
    train(qa, emb, tmp_path / "c", tmp_path / "c.tsv", **steep, early_stop="none")
    last = weights(tmp_path / "c")
    assert not all(torch.equal(kept[k], last[k]) for k in kept)
    assert json.loads((tmp_path / "c/config.json").read_text())["train"]["best_epoch"] == 10
    # patience: stop `patience` epochs after the best, same weights
    train(qa, emb, tmp_path / "d", tmp_path / "d.tsv", **steep, early_stop="val_loss", patience=2)
    assert len(read_plot(tmp_path / "d.tsv")) == best + 2
    assert all(torch.equal(kept[k], v) for k, v in weights(tmp_path / "d").items())
    # val_top1 (the default criterion): the first epoch with the highest val top-1
    train(qa, emb, tmp_path / "e", tmp_path / "e.tsv", **steep, patience=0)
    top1 = [r["val_top1"] for r in read_plot(tmp_path / "e.tsv")]
    cfg = json.loads((tmp_path / "e/config.json").read_text())
    assert cfg["train"]["best_epoch"] == int(np.argmax(top1)) + 1
    # no validation rows: nothing to watch, the last epoch is kept and the report says so
    empty = pa.Table.from_pylist([], schema=SCHEMA)
    pq.write_table(empty, qa / "val.parquet")
    train(qa, emb, tmp_path / "f", tmp_path / "f.tsv", **{**steep, "epochs": 3})
    report = json.loads((tmp_path / "f/report.json").read_text())
    assert report["noted"] == {"no_validation_rows_early_stop_off": 1}
    assert (report["best_epoch"], report["early_stop"], report["best_val_top1"]) == (
        3,
        "none",
        None,
    )


def test_train_errors_are_user_errors(tmp_path):
    qa, emb, _, _ = make_world(tmp_path, n_images=10)
    with pytest.raises(UserError, match="loss"):
        train(qa, emb, tmp_path / "m", tmp_path / "p.tsv", loss="mse")
    with pytest.raises(UserError, match="texts.arrow"):
        train(qa, tmp_path / "qa", tmp_path / "m", tmp_path / "p.tsv")


# ------------------------------------------------------------------ baselines and evaluate


def prior_world(root: Path):
    """Hand-made train/test tables with known frequency-baseline answers."""
    answers = ["near", "on", "under", "has", "cat", "dog"]
    train = [  # relation counts: near 3, on 2, under 1; object: cat 2, dog 1
        ("relation", "cat", "dog", "on"),
        ("relation", "cat", "dog", "on"),
        ("relation", "cat", "dog", "near"),
        ("relation", "cup", "tree", "under"),
        ("relation", "car", "tree", "near"),
        ("relation", "car", "tree", "near"),
        ("object", "cat", None, "cat"),
        ("object", "cat", None, "cat"),
        ("object", "dog", None, "dog"),
    ]
    test = [
        ("relation", "cat", "dog", "on"),  # prior: on (pair) / majority: near
        ("relation", "cup", "tree", "near"),  # prior: under / majority: near
        ("relation", "dog", "cat", "has"),  # unseen pair -> qtype ranking: near
        ("relation", "cat", "dog", "beside"),  # out of vocabulary
        ("object", "dog", None, "dog"),  # prior = majority = cat (question text only)
    ]
    rows = {}
    for split, spec in (("train", train), ("val", train[:2]), ("test", test)):
        rows[split] = []
        for i, (qtype, s, o, a) in enumerate(spec):
            q = f"What is the relationship between {s} and {o}?" if o else "What is this?"
            rows[split].append(qa_row(i, 10 * i + len(split), qtype, q, a, s, o, split, answers))
    write_qa(root / "qa", rows, answers, {})
    questions = sorted({r["question"] for rs in rows.values() for r in rs})
    image_ids = sorted({r["image_id"] for rs in rows.values() for r in rs})
    rng = np.random.default_rng(0)
    write_emb(
        root / "emb",
        image_ids,
        unit(rng.normal(size=(len(image_ids), DIM))),
        questions,
        unit(rng.normal(size=(len(questions), DIM))),
        answers,
        unit(rng.normal(size=(len(answers), DIM))),
        {"model": "fake-clip", "revision": "r0"},
    )
    return root / "qa", root / "emb", answers


def test_frequency_prior_on_hand_made_table(tmp_path):
    qa, _, answers = prior_world(tmp_path)
    train = pq.read_table(qa / "train.parquet")
    label = [answers.index(a) for a in train.column("answer").to_pylist()]
    prior = FrequencyPrior(train.append_column("label", pa.array(label, pa.int64())))

    def names(ids):
        return [answers[i] for i in ids]

    q_rel = "What is the relationship between {} and {}?"
    assert names(prior.prior("relation", "cat", "dog", q_rel)) == ["on", "near", "under"]
    assert names(prior.prior("relation", "Cup ", "tree", q_rel)) == ["under", "near", "on"]
    assert names(prior.prior("relation", "dog", "cat", q_rel)) == ["near", "on", "under"]
    assert names(prior.majority("relation")) == ["near", "on", "under"]
    # object questions: the subject column holds the answer, the prior must not look at it
    assert names(prior.prior("object", "dog", None, "What is this?")) == ["cat", "dog"]
    assert names(prior.majority("object")) == ["cat", "dog"]


def test_evaluate_metrics_exact_for_baselines(tmp_path):
    qa, emb, _ = prior_world(tmp_path)
    train(qa, emb, tmp_path / "model", tmp_path / "plots.tsv", **{**FAST, "epochs": 1})
    summary, headline, m = evaluate(qa, emb, tmp_path / "model", tmp_path / "eval", zeroshot=False)
    rel, obj, overall = m["relation"], m["object"], m["overall"]
    assert (rel["n"], rel["n_out_of_vocab"], obj["n"], overall["n"]) == (4, 1, 1, 5)
    assert rel["prior_top1"] == 0.25 and rel["majority_top1"] == 0.25
    assert rel["prior_top5"] == 0.5  # 'has' is never a train relation answer: no candidate
    assert rel["majority_top5"] == 0.5
    # mean per-class over in-vocab classes on / near / has: prior (1 + 0 + 0) / 3
    assert rel["prior_mean_class_acc"] == pytest.approx(1 / 3, abs=1e-6)
    assert rel["majority_mean_class_acc"] == pytest.approx(1 / 3, abs=1e-6)
    assert obj["prior_top1"] == 0.0 and obj["prior_top5"] == 1.0
    assert overall["prior_top1"] == 0.2
    assert "zeroshot_top1" not in rel and "model_top1" in rel
    assert m["settings"]["split"] == "test" and m["settings"]["n_samples"] == 5
    assert m["settings"]["model_loss"] == "both" and m["settings"]["model_best_epoch"] == 1
    # the headline: top-1 of every method overall, of the head (and zero-shot) per type
    assert headline["overall"] == {
        "head": overall["model_top1"], "prior": 0.2, "majority": overall["majority_top1"]
    }  # fmt: skip
    assert headline["relation"] == {"head": rel["model_top1"]}
    assert set(headline) == {"overall", "relation", "object", "overall_diff"}
    assert headline["overall_diff"] == {
        "head-prior": pytest.approx(overall["model_top1"] - 0.2, abs=1e-6),
        "head-majority": pytest.approx(overall["model_top1"] - overall["majority_top1"], abs=1e-6),
    }
    # 95% bootstrap intervals of every top-1 and difference, per group (detail file)
    ci = m["intervals"]
    assert set(ci) == {"relation", "object", "overall"}
    assert set(ci["overall"]) == {"head", "prior", "majority", "head-prior", "head-majority"}
    assert ci["overall"]["prior"]["value"] == 0.2 and ci["object"]["prior"] == {
        "value": 0.0, "lo": 0.0, "hi": 0.0}  # one question, always wrong  # fmt: skip
    assert all(v["lo"] <= v["value"] <= v["hi"] for g in ci.values() for v in g.values())
    preds = [json.loads(line) for line in (tmp_path / "eval/vqa.jsonl").read_text().splitlines()]
    assert [p["prior"][0] for p in preds] == ["on", "under", "near", "on", "cat"]
    assert all(set(p["model"]) <= {"near", "on", "under"} for p in preds[:4])
    assert summary.startswith("evaluate_vqa: read 5, wrote 5")


def test_evaluate_zeroshot_with_prompt_cache(tmp_path, monkeypatch):
    qa, emb, answers, a_emb = make_world(tmp_path, n_images=100)
    train(qa, emb, tmp_path / "model", tmp_path / "plots.tsv", **FAST)
    calls = []
    base = fake_text_encoder(answers, a_emb)

    def encode(texts):
        calls.append(list(texts))
        return base(texts)

    monkeypatch.setattr(zeroshot, "load_text_encoder", lambda clip: (encode, clip, "r0"))
    cache = tmp_path / "prompts.arrow"
    summary, _, m = evaluate(qa, emb, tmp_path / "model", tmp_path / "e1", cache=cache,
                             prompt_batch=7)  # fmt: skip
    prompts = [t for c in calls for t in c]
    assert len(prompts) == len(set(prompts)) == m["settings"]["prompts"]
    n = len(prompts)
    assert summary.splitlines()[0].endswith(f"; prompts {n} ({n} embedded, 0 cached)")
    assert max(len(c) for c in calls) == 7
    assert "a photo of a cat" in prompts
    assert any(t.startswith("a photo of ") and " on " in t for t in prompts)
    # the aligned fake CLIP ranks by the planted signal: far above the majority answer
    assert m["relation"]["zeroshot_top1"] > m["relation"]["majority_top1"] + 0.2
    assert m["object"]["zeroshot_top1"] > m["object"]["majority_top1"] + 0.2
    assert m["relation"]["model_top1"] > m["relation"]["majority_top1"]
    calls.clear()
    summary, _, m2 = evaluate(qa, emb, tmp_path / "model", tmp_path / "e2", cache=cache,
                              prompt_batch=7)  # fmt: skip
    assert calls == []  # every prompt came from the cache
    assert summary.splitlines()[0].endswith(f"; prompts {n} (0 embedded, {n} cached)")
    assert m2 == m
    assert read_rows(tmp_path / "e1/vqa") == read_rows(tmp_path / "e2/vqa")
    assert (tmp_path / "e1/vqa.jsonl").read_bytes() == (tmp_path / "e2/vqa.jsonl").read_bytes()
    # the CLIP must be the one the embeddings were made with (manifest revision r0)
    monkeypatch.setattr(zeroshot, "load_text_encoder", lambda clip: (encode, clip, "r1"))
    with pytest.raises(UserError, match="revision r1"):
        evaluate(qa, emb, tmp_path / "model", tmp_path / "e3")


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_train_and_evaluate(tmp_path):
    qa, emb, _, _ = make_world(tmp_path, n_images=40)
    params = tmp_path / "params.yaml"
    params.write_text(
        "seed: 1\ntrain_vqa:\n  epochs: 2\n  hidden: [16]\nevaluate_vqa:\n  zeroshot: false\n"
    )
    paths = ["--qa", qa, "--emb", emb, "--params", params]
    res = invoke("train-vqa", *paths, "--out", tmp_path / "m", "--plots", tmp_path / "vqa.tsv")
    assert res.exit_code == 0, res.output
    assert "train_vqa: read" in res.output
    assert len((tmp_path / "vqa.tsv").read_text().splitlines()) == 3
    res = invoke(
        "evaluate-vqa", *paths, "--model", tmp_path / "m", "--clip", "fake-clip",
        "--metrics", tmp_path / "vqa", "--detail", tmp_path / "vqa_detail.json",
        "--predictions", tmp_path / "vqa.jsonl",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "relation (n=" in res.output and "prior" in res.output
    headline = read_rows(tmp_path / "vqa")
    assert set(headline) == {"overall", "relation", "object", "overall_diff"}
    res = invoke("train-vqa", *paths[2:], "--qa", tmp_path / "nope", "--out", tmp_path / "m2",
                 "--plots", tmp_path / "p2.tsv")  # fmt: skip
    assert res.exit_code == 2
    assert res.output.strip().startswith("error:") and len(res.output.strip().splitlines()) == 1


# ------------------------------------------------------------------ generic QA table


def write_images(folder: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.jpg")


def generic_rows(n_images: int) -> list[dict]:
    preds, things = ["on", "under", "near"], ["cat", "dog", "sofa"]
    rows = []
    for i in range(n_images):
        s, o = things[i % 3], things[(i + 1) % 3]
        split = ("train", "train", "train", "train", "val", "test")[i % 6]
        rows.append(
            {
                "image": f"imgs/{i}.jpg",
                "question": f"What is the relationship between {s} and {o}?",
                "answer": preds[i % 3],
                "qtype": "relation",
                "subject": s,
                "object": o,
                "split": split,
            }
        )
        rows.append(
            {
                "image": f"imgs/{i}.jpg",
                "question": "What is this?",
                "answer": things[i % 3],
                "qtype": "object",
                "subject": None,
                "object": None,
                "split": split,
            }
        )
    rows.append(
        {
            "image": "imgs/missing.jpg",
            "question": "What is this?",
            "answer": "cat",
            "qtype": "object",
            "subject": None,
            "object": None,
            "split": "train",
        }
    )
    rows.append(
        {
            "image": "imgs/1.jpg",
            "question": "What is this?",
            "answer": " ",
            "qtype": "object",
            "subject": None,
            "object": None,
            "split": "train",
        }
    )
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    cols = list(rows[0])
    lines = [",".join(cols)] + [",".join(str(r[c] or "") for c in cols) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def test_qa_table_formats_and_hash_split(tmp_path):
    write_images(tmp_path / "imgs", 30)
    rows = generic_rows(30)
    # JSONL without a split column: splits by image hash, never straddling
    plain = [{k: v for k, v in r.items() if k != "split"} for r in rows]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in plain) + "\n")
    rep = qa_table.convert(tmp_path / "t.jsonl", tmp_path / "qa1", 3, Split(), Answers())
    assert (rep.read, rep.written, dict(rep.skipped)) == (62, 61, {"empty_answer": 1})
    assert rep.noted == {"missing_image": 1}
    seen: dict[int, str] = {}
    for split in ("train", "val", "test"):
        t = pq.read_table(tmp_path / "qa1" / f"{split}.parquet")
        assert t.schema == qa_table.TABLE_SCHEMA and t.schema.remove(len(SCHEMA)) == SCHEMA
        assert set(t.column("source_image_id").to_pylist()) == {None}  # the table gives none
        for iid, path in zip(t.column("image_id").to_pylist(), t.column("image_path").to_pylist()):
            assert seen.setdefault(iid, split) == split
            if path is not None:
                assert iid == qa_table.stable_image_id(Path(path).relative_to(tmp_path).as_posix())
    assert sum(rep.extra["splits"][s]["rows"] for s in ("train", "val", "test")) == 61
    # CSV and parquet with a split column give identical tables
    write_csv(tmp_path / "t.csv", rows)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    qa_table.convert(tmp_path / "t.csv", tmp_path / "qa2", 0, Split(), Answers())
    qa_table.convert(tmp_path / "t.parquet", tmp_path / "qa3", 0, Split(), Answers())
    for name in ("train.parquet", "val.parquet", "test.parquet", "answers.json"):
        a, b = tmp_path / "qa2" / name, tmp_path / "qa3" / name
        if name.endswith(".json"):
            assert a.read_text() == b.read_text()
        else:
            assert pq.read_table(a).equals(pq.read_table(b))
    answers = json.loads((tmp_path / "qa2/answers.json").read_text())["answers"]
    # counts 11 (10 + the row with a missing image), 10, then 5 each, ties by text
    assert [(a["answer"], a["count"]) for a in answers] == [
        ("cat", 11),
        ("on", 10),
        ("dog", 5),
        ("near", 5),
        ("sofa", 5),
        ("under", 5),
    ]
    test = pq.read_table(tmp_path / "qa2/test.parquet")
    assert set(test.column("split").to_pylist()) == {"test"} and test.num_rows == 10
    (tmp_path / "bad.csv").write_text("img,q\nx,y\n")
    with pytest.raises(UserError, match="lacks column"):
        qa_table.convert(tmp_path / "bad.csv", tmp_path / "qa4", 0, Split(), Answers())


def test_qa_table_with_no_usable_train_row_names_the_skip_reasons(tmp_path):
    write_images(tmp_path / "imgs", 6)
    rows = generic_rows(6)
    no_path = [{**r, "image": ""} for r in rows[:-3]] + [{**r, "question": " "} for r in rows[-3:]]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in no_path) + "\n")
    with pytest.raises(UserError) as err:
        qa_table.convert(tmp_path / "t.jsonl", tmp_path / "qa", 0, Split(), Answers())
    msg = str(err.value)
    want = f"{len(rows)} rows read, skipped no_image_path {len(rows) - 3}, empty_question 3"
    assert f"no train answers: {want}, " in msg
    assert "0 kept (train 0, val 0, test 0)" in msg and "split column" not in msg
    # rows kept, none in train: the split column is the thing to check
    val_only = [{**r, "split": "val"} for r in rows]
    (tmp_path / "v.jsonl").write_text("\n".join(json.dumps(r) for r in val_only) + "\n")
    with pytest.raises(UserError, match="check the split column"):
        qa_table.convert(tmp_path / "v.jsonl", tmp_path / "qa2", 0, Split(), Answers())


def test_qa_table_cli_reads_seed_split_and_answers(tmp_path):
    write_images(tmp_path / "imgs", 12)
    rows = [{k: v for k, v in r.items() if k not in ("split", "qtype")} for r in generic_rows(12)]
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    params = tmp_path / "params.yaml"

    def invoke(text: str, *extra: str):
        params.write_text(text)
        args = ["prepare-qa-table", "--input", str(tmp_path / "t.jsonl"), "--out",
                str(tmp_path / "qa"), "--params", str(params), *extra]  # fmt: skip
        return CliRunner().invoke(app, args)

    res = invoke("seed: 3\nsplit:\n  val_fraction: 0.3\nanswers:\n  top_k: 2\n",
                 "--default-qtype", "vqa")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert res.output.startswith("prepare_qa_table: read 26, wrote 25")
    answers = json.loads((tmp_path / "qa/answers.json").read_text())
    assert len(answers["answers"]) == 2 and answers["top_k"] == 2
    for split in ("train", "val", "test"):
        t = pq.read_table(tmp_path / "qa" / f"{split}.parquet").to_pylist()
        assert {r["qtype"] for r in t} <= {"vqa"}
        assert all(r["split"] == split == split_of(r["image_id"], 3, 0.3, 0.1) for r in t)
    # the old `qa_table:` section is gone: its keys are errors naming them
    res = invoke("qa_table:\n  top_k: 50\n")
    assert res.exit_code == 2 and res.output.startswith("error: params qa_table.top_k: unknown")
    res = invoke("split:\n  val_fraction: 1.5\n")
    assert res.exit_code == 2 and res.output.startswith("error: params split.val_fraction:")


@pytest.fixture(scope="module")
def clip_world(tmp_path_factory):
    """Generic QA table -> prepare-qa-table -> embed (tiny CLIP) -> train -> evaluate."""
    from pipeline.clip.backbone import load_backbone
    from pipeline.embedding.dataset import embed_dataset
    from pipeline.stages.embed import Settings as EmbedSettings

    root = tmp_path_factory.mktemp("vqa_clip")
    clip = make_tiny_clip(root / "clip")
    write_images(root / "imgs", 24)
    write_csv(root / "table.csv", generic_rows(24))
    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "prepare-qa-table",
            "--input",
            str(root / "table.csv"),
            "--out",
            str(root / "qa"),
            "--params",
            str(root / "none.yaml"),
        ],
    )
    assert res.exit_code != 0  # a named params file must exist
    (root / "params.yaml").write_text("seed: 0\nanswers:\n  top_k: 50\n")
    res = runner.invoke(
        app,
        [
            "prepare-qa-table",
            "--input",
            str(root / "table.csv"),
            "--out",
            str(root / "qa"),
            "--params",
            str(root / "params.yaml"),
        ],
    )
    assert res.exit_code == 0, res.output
    reports = {
        "embed": embed_dataset(
            "vg",
            root / "qa",
            root / "emb",
            load_backbone(clip),
            EmbedSettings(num_workers=0, vg_crops=False),
            Split(),
            images=root,
        )
    }
    train(root / "qa", root / "emb", root / "model", root / "vqa.tsv",
          **{**FAST, "hidden": [32], "epochs": 3})  # fmt: skip
    reports["train"] = json.loads((root / "model/report.json").read_text())
    evaluate(root / "qa", root / "emb", root / "model", root / "eval", clip=str(clip),
             cache=root / "prompts.arrow")  # fmt: skip
    return root, clip, reports


def test_generic_table_through_embed_train_evaluate(clip_world):
    root, clip, reports = clip_world
    assert dict(reports["embed"].skipped) == {"missing_file": 1}
    assert reports["train"]["skipped"] == {"no_image_embedding": 1}
    assert reports["train"]["n_train"] == 16 * 2 and reports["train"]["n_val"] == 8
    m = json.loads((root / "eval/detail.json").read_text())
    assert (m["relation"]["n"], m["object"]["n"], m["overall"]["n"]) == (4, 4, 8)
    for method in ("model", "zeroshot", "prior", "majority"):
        for k in ("top1", "top5", "mean_class_acc"):
            assert 0.0 <= m["overall"][f"{method}_{k}"] <= 1.0
    # 3 candidate answers per type: top-5 always hits
    assert m["overall"]["model_top5"] == m["overall"]["zeroshot_top5"] == 1.0
    # relation prior: (subject, object) fixes the answer in this table
    assert m["relation"]["prior_top1"] == 1.0
    s = m["settings"]
    assert s["clip"] == str(clip.resolve()) and s["clip_revision"].startswith("sha256:")
    # test images 5, 11, 17, 23 all ask about (sofa, cat): 1 pair x 3 answers + 3 object
    # prompts, each embedded once
    assert s["prompts"] == 1 * 3 + 3


def test_ask_end_to_end_with_tiny_clip(clip_world):
    from pipeline.clip.backbone import embed_image, load_backbone
    from pipeline.embedding.files import read_dataset, vectors
    from pipeline.vqa.ask import ask

    root, clip, _ = clip_world
    res = ask(
        root / "imgs/3.jpg",
        "what is the relationship between the Cat and  dog",
        root / "model",
        top=2,
    )
    assert res.question.text == "What is the relationship between cat and dog?"
    assert (res.question.subject, res.question.object) == ("cat", "dog")
    assert len(res.model) == len(res.zeroshot) == 2
    assert {a for a, _ in res.model + res.zeroshot} <= {"on", "under", "near"}
    assert res.model[0][1] >= res.model[1][1]
    # the same CLIP and preprocessing as embed: the image embedding matches the cached one
    bb = load_backbone(clip)
    mine = embed_image(bb, root / "imgs/3.jpg").numpy()[0]
    table = read_dataset(root / "emb")
    row = table.column("id").to_pylist().index(str(qa_table.stable_image_id("imgs/3.jpg")))
    assert np.abs(vectors(table.column("image_emb"))[row] - mine).max() < 2e-3
    # zero-shot scores are image . prompt cosines
    prompt = f"a photo of cat {res.zeroshot[0][0]} dog"
    want = float(bb.encode_texts([prompt]).numpy()[0] @ mine)
    assert res.zeroshot[0][1] == pytest.approx(want, abs=1e-5)
    # `ask --box` crops as embed does: a wide box is letterboxed with the CLIP's mean colour
    from pipeline.clip.backbone import letterbox_resize, mean_pixel, normalize_pixels

    wide = embed_image(bb, root / "imgs/3.jpg", box=(0, 10, 40, 12)).numpy()[0]
    crop = Image.open(root / "imgs/3.jpg").convert("RGB").crop((0, 10, 40, 22))
    pixels = torch.from_numpy(letterbox_resize(crop, bb.image_size, mean_pixel(bb.mean)))
    want = bb.encode_images(normalize_pixels(pixels[None], bb.mean, bb.std)).numpy()[0]
    assert np.allclose(wide, want, atol=1e-5)
    obj = ask(root / "imgs/3.jpg", "What is this?", root / "model", box=(0, 0, 20, 20), top=3)
    assert obj.question.qtype == "object" and obj.template == "a photo of a {answer}"
    assert {a for a, _ in obj.model} == {"cat", "dog", "sofa"}
    # the head's scores: P(answer | image, question) among the 3 candidates
    assert sum(p for _, p in obj.model) == pytest.approx(1.0, abs=1e-5)

    runner = CliRunner()
    res = runner.invoke(
        app,
        [
            "ask",
            str(root / "imgs/3.jpg"),
            "What is this?",
            "--box",
            "0,0,20,20",
            "--model",
            str(root / "model"),
            "--top",
            "2",
            "--params",
            str(root / "params.yaml"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert "VQA head" in res.output and "zero-shot CLIP" in res.output
    for args, msg in (
        (["How many cats are there?"], "cannot use the question"),
        (["What is this?", "--box", "1,2,3"], "--box must be"),
        (["What is this?", "--box", "500,500,10,10"], "outside the image"),
        *(
            [(["What is this?", "--device", "cuda:1"], "device 'cuda:1' asked for")]
            if not torch.cuda.is_available()
            else []
        ),
    ):
        res = runner.invoke(
            app,
            [
                "ask",
                str(root / "imgs/3.jpg"),
                *args,
                "--model",
                str(root / "model"),
                "--params",
                str(root / "params.yaml"),
            ],
        )
        assert res.exit_code == 2, res.output
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0]


def test_parse_question_and_box():
    from pipeline.vqa.ask import parse_box, parse_question

    q = parse_question("What is the relation between a Red  Sofa and the mattress?")
    assert (q.qtype, q.subject, q.object) == ("relation", "red sofa", "mattress")
    assert q.text == "What is the relationship between red sofa and mattress?"
    assert parse_question("what is that").text == "What is this?"
    # a model trained on a generic table with one free-form question type takes any question
    free = parse_question("How many cats? ", ["object", "other", "relation"])
    assert (free.qtype, free.text) == ("other", "How many cats?")
    with pytest.raises(UserError, match="cannot use the question"):
        parse_question("How many cats?", ["object", "relation"])
    assert parse_box("1, 2,30,40.4") == (1, 2, 30, 40)
    assert parse_box(None) is None
    for bad in ("1,2,3", "a,b,c,d", "0,0,0,5", "-1,0,4,4"):
        with pytest.raises(UserError):
            parse_box(bad)
