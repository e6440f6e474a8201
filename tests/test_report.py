"""The report stage: one self-contained page with the tables, intervals, curves and
galleries; rendered in headless Chromium where it is installed."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app

CI = {"value": 0.5, "lo": 0.4, "hi": 0.6}


def world(tmp: Path) -> dict[str, Path]:
    """Detail files, plots, predictions, a QA table and images, as the stages write them."""
    metrics, pred = tmp / "metrics", tmp / "eval"
    (metrics / "plots").mkdir(parents=True)
    pred.mkdir()
    group = {"zeroshot": 0.8, "linear": 0.7, "n_train": 4, "n_test": 4, "chance": 0.05}
    (metrics / "clip_detail.json").write_text(json.dumps({
        "model": "models/clip_standin",
        "probes": {"photo_crop": {"category": group, "colour": group}},
    }))  # fmt: skip
    scores = {"bleu1": 0.6, "bleu2": 0.5, "bleu3": 0.4, "bleu4": 0.3, "cider": 0.7,
              "clipscore": 0.61, "refclipscore": 0.62, "wellformed": 0.5, "repeat4": 0.25,
              "form": {"n_captions": 2, "n_distinct": 2, "mean_len": 9.0,
                       "repeat4_rule_off": 0.75}}  # fmt: skip
    (metrics / "caption_detail.json").write_text(json.dumps({
        "noada": scores, "ada": scores, "nn": scores,
        "intervals": {"noada": {"bleu4": {"value": 0.3, "lo": 0.25, "hi": 0.35}},
                      "ada-noada": {"bleu4": {"value": -0.05, "lo": -0.08, "hi": -0.01}},
                      "references": {"clipscore": {"value": 0.71, "lo": 0.69, "hi": 0.73}}},
        "clipscore": {"references": {"clipscore": 0.71, "refclipscore": 0.72}},
        "form": {"references": {"n_captions": 10, "wellformed": 1.0, "repeat4": 0.0,
                                "n_distinct": 9, "mean_len": 12.34, "count_stated": 4,
                                "count_right": 1.0}},
        "settings": {"n_images": 2}, "method": {"intervals": "95% percentile bootstrap"},
    }))  # fmt: skip
    (metrics / "vqa_detail.json").write_text(json.dumps({
        "relation": {"n": 2, "model_top1": 0.5, "prior_top1": 0.0},
        "overall": {"n": 2, "model_top1": 0.5, "prior_top1": 0.0},
        "intervals": {"overall": {"head": CI, "prior": CI,
                                  "head-prior": {"value": 0.5, "lo": 0.1, "hi": 0.9}}},
        "settings": {"intervals": "95% percentile bootstrap of top-1"},
    }))  # fmt: skip
    (metrics / "plots/vqa.tsv").write_text(
        "epoch\ttrain_loss\tval_loss\n1\t1.0\t1.2\n2\t0.5\tnan\n"
    )
    flickr, vg = tmp / "flickr30k", tmp / "vg"
    (flickr / "flickr30k_images").mkdir(parents=True)
    (vg / "VG_100K").mkdir(parents=True)
    for k in range(2):
        Image.new("RGB", (96, 64), (200, 40 * k, 40)).save(flickr / f"flickr30k_images/{k}.jpg")
        Image.new("RGB", (96, 64), (40, 200, 40 * k)).save(vg / f"VG_100K/{k}.jpg")
    for system, file in (("noada", "noada"), ("ada", "ada"), ("nn", "nn_baseline")):
        lines = [{"image_id": str(k), "prediction": f"a <b>{system}</b> circle {k}",
                  "references": ["a red circle ."]} for k in range(2)]  # fmt: skip
        (pred / f"caption_{file}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    qa_rows = [{"qid": f"{k}/r0", "image_path": f"VG_100K/{k}.jpg", "qtype": "relation",
                "subj_box": [2, 2, 20, 20], "obj_box": [40, 10, 30, 30]} for k in range(2)]  # fmt: skip
    (tmp / "qa").mkdir()
    pq.write_table(pa.Table.from_pylist(qa_rows), tmp / "qa/test.parquet")
    vqa = [{"qid": f"{k}/r0", "qtype": "relation", "question": "What is the relationship "
            "between circle and square?", "answer": "on", "model": ["on" if k else "in"],
            "zeroshot": ["near"], "prior": ["on"], "majority": ["on"]} for k in range(2)]  # fmt: skip
    (pred / "vqa.jsonl").write_text("".join(json.dumps(x) + "\n" for x in vqa))
    return {"metrics": metrics, "predictions": pred, "qa": tmp / "qa", "flickr30k": flickr,
            "vg": vg, "out": tmp / "report/index.html"}  # fmt: skip


def build(tmp_path: Path) -> Path:
    paths = world(tmp_path)
    args = [f"--{k}={v}" for k, v in paths.items()]
    params = tmp_path / "params.yaml"
    params.write_text("report: {captions: 2, questions: 2, thumb_size: 48}\n")
    res = CliRunner().invoke(app, ["report", *args, "--params", str(params)])
    assert res.exit_code == 0, res.output
    assert "report: 2 captioned images (0 image files missing), 2 questions (0 missing)" in (
        res.output
    )
    return paths["out"]


def test_page_is_self_contained_with_tables_intervals_and_galleries(tmp_path):
    html = build(tmp_path).read_text()
    assert len(re.findall(r'<img src="data:image/jpeg;base64,', html)) == 4
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing loaded from elsewhere
    assert "<script" not in html
    assert '0.300 <span class="ci">[0.250, 0.350]</span>' in html  # value and interval
    assert 'class="sig">-0.050' in html  # a difference whose interval excludes 0
    # CLIPScore beside BLEU and CIDEr; the references' own, with its interval where it has one
    assert "<th>clipscore</th>" in html and "<th>refclipscore</th>" in html
    refs_row = re.search(r"<tr><td>references</td>.*?</tr>", html, re.DOTALL).group(0)
    assert '0.710 <span class="ci">[0.690, 0.730]</span>' in refs_row and "0.720" in refs_row
    # the form of each system's captions and of the references, in the same table
    heads = ["well-formed", "repeats a 4-gram", "... rule off", "distinct", "mean words",
             "count right"]  # fmt: skip
    assert "".join(f"<th>{h}</th>" for h in heads) in html
    noada = re.search(r"<tr><td>noada</td>.*?</tr>", html, re.DOTALL).group(0)
    cells = ["50.0%", "25.0%", "75.0%", "2/2", "9.0", "–"]
    assert "".join(f"<td>{c}</td>" for c in cells) in noada
    cells = ["100.0%", "0.0%", "–", "9/10", "12.3", "100.0% of 4"]
    assert "".join(f"<td>{c}</td>" for c in cells) in refs_row
    assert "&lt;b&gt;ada&lt;/b&gt;" in html  # captions are escaped
    assert html.count("✔") == 3 and html.count("✘") == 3  # head right once, prior twice
    assert html.count("<svg") == 1  # the one plot TSV given


def test_sweep_summaries_get_a_table_and_their_plot(tmp_path):
    paths = world(tmp_path)
    seeds = tmp_path / "seeds"
    seeds.mkdir()
    group = {"params": {"train_caption.labelled_fraction": 0.01, "train_caption.adv_weight": 1.0},
             "seeds": [0, 1, 2], "metrics": {
                 "caption.ada.cider": {"mean": 1.2, "std": 0.1, "min": 1.1, "max": 1.3, "n": 3},
                 "caption.ada-noada.cider": {"mean": 0.15, "std": 0.05, "min": 0.1, "max": 0.2,
                                             "n": 3}},
             "intervals": {"caption.ada-noada.cider": {"above": 2, "below": 0, "n": 3}}}  # fmt: skip
    other = json.loads(json.dumps(group))
    other["params"]["train_caption.labelled_fraction"] = 0
    summary = {"by": ["train_caption.labelled_fraction", "train_caption.adv_weight"],
               "groups": [other, group], "note": "the offset control"}  # fmt: skip
    (seeds / "adaptation_offset.json").write_text(json.dumps(summary))
    (seeds / "adaptation_offset.svg").write_text('<svg id="sweep-plot"></svg>')
    (seeds / "objectives.json").write_text(json.dumps(summary))  # not an adaptation sweep
    args = [f"--{k}={v}" for k, v in paths.items()]
    res = CliRunner().invoke(app, ["report", *args, "--sweeps", str(seeds)])
    assert res.exit_code == 0, res.output
    html = paths["out"].read_text()
    assert "<h3>offset</h3>" in html and "the offset control" in html
    assert html.count("<h3>") == 1 and '<svg id="sweep-plot">' in html
    # rows name the params that vary (not adv_weight), cells mean ± std and the seed counts
    assert "<td>labelled_fraction=0.01</td><td>3</td>" in html
    assert 'class="sig">0.150 ± 0.050\n<span class="ci">2↑ 0↓ of 3</span>' in html
    (seeds / "adaptation_broken.json").write_text("{not json")
    res = CliRunner().invoke(app, ["report", *args, "--sweeps", str(seeds)])
    assert res.exit_code == 2 and "adaptation_broken.json: not a `clipda seeds` summary" in (
        res.output
    )


def test_missing_metrics_folder_is_one_line(tmp_path):
    res = CliRunner().invoke(app, ["report", "--metrics", str(tmp_path / "nope"),
                                   "--predictions", ".", "--qa", ".", "--flickr30k", ".",
                                   "--vg", ".", "--out", str(tmp_path / "x.html")])  # fmt: skip
    assert res.exit_code == 2 and "metrics folder not found" in res.output


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="headless Chromium not installed (Debian: apt-get install chromium chromium-driver)",
)
def test_page_renders_in_headless_chromium(tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed")
    page = build(tmp_path)
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"):  # fmt: skip
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=DRIVER)
    driver = webdriver.Chrome(options=opts, service=service)
    try:
        driver.get(page.as_uri())
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert errors == []
        assert driver.execute_script("return document.querySelectorAll('table').length") >= 4
        widths = driver.execute_script(
            "return [...document.images].map(i => i.complete ? i.naturalWidth : 0)"
        )
        assert len(widths) == 4 and all(w == 48 for w in widths)
        driver.save_screenshot(str(tmp_path / "report.png"))
    finally:
        driver.quit()
