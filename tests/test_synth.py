"""The sample world: determinism, the real formats read back by their conventions, errors."""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.settings import load
from pipeline.stages.synth import Settings
from pipeline.synth.scene import PREDICATES, predicate
from pipeline.synth.world import REL_ALIASES, generate

SMALL = {
    "vg_images": 40,
    "laion_samples": 30,
    "laion_shard_size": 20,
    "flickr30k_images": 20,
    "laion_fail_rate": 0.1,
    "probe_images": 44,
    "probe_scenes": 6,
}


def small(seed: int) -> Settings:
    return Settings(**SMALL, seed=seed)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate(out, small(3))
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_help_lists_commands():
    res = CliRunner().invoke(app, ["--help"])
    assert res.exit_code == 0
    assert "synth" in res.output


def test_same_seed_gives_identical_bytes(world, tmp_path):
    generate(tmp_path / "again", small(3))
    first, again = _files(world), _files(tmp_path / "again")
    assert first.keys() == again.keys()
    assert first == again
    generate(tmp_path / "other", small(4))
    other = _files(tmp_path / "other")
    assert other["flickr30k/results.csv"] != first["flickr30k/results.csv"]


def test_visual_genome_schema_and_geometry(world):
    vg = world / "vg"
    images = json.loads((vg / "image_data.json").read_text())
    assert len(images) == 40 and all(
        {"image_id", "width", "height", "url"} <= set(i) for i in images
    )
    objects = json.loads((vg / "objects.json").read_text())
    assert all("names" in o for entry in objects for o in entry["objects"])
    rels = json.loads((vg / "relationships.json").read_text())
    alias = {a: canon for canon, al in REL_ALIASES.items() for a in al}
    kinds, seen_preds, n_checked = Counter(), set(), 0
    for entry in rels:
        for r in entry["relationships"]:
            for role in ("subject", "object"):
                kinds["names" if "names" in r[role] else "name"] += 1
            pred = " ".join(r["predicate"].lower().split())
            pred = alias.get(pred, pred)
            s, o = r["subject"], r["object"]
            if not pred or s["object_id"] == o["object_id"]:
                continue  # the planted quirks
            box = lambda d: (d["x"], d["y"], d["w"], d["h"])
            assert predicate(box(s), box(o)) == pred, r
            seen_preds.add(pred)
            n_checked += 1
    assert kinds["name"] > 0 and kinds["names"] > 0  # v1.4's mix
    assert n_checked > 40
    assert len(seen_preds) >= 6
    files = {p.stem for p in (vg / "VG_100K").glob("*.jpg")} | {
        p.stem for p in (vg / "VG_100K_2").glob("*.jpg")
    }
    assert len(files) <= 40 and (vg / "VG_100K_2").is_dir()
    assert (vg / "relationship_alias.txt").read_text().startswith("next to,beside")


def test_laion_webdataset_shards(world):
    laion = world / "laion"
    shards = sorted(laion.glob("*.tar"))
    assert [p.name for p in shards] == ["00000.tar", "00001.tar"]
    total_ok = 0
    for tar_path in shards:
        table = pq.read_table(tar_path.with_suffix(".parquet")).to_pylist()
        stats = json.loads((laion / f"{tar_path.stem}_stats.json").read_text())
        ok = [r for r in table if r["status"] == "success"]
        assert stats["count"] == len(table) and stats["successes"] == len(ok)
        with tarfile.open(tar_path) as tar:
            names = tar.getnames()
            assert sorted(names) == sorted(
                f"{r['key']}.{e}" for r in ok for e in ("jpg", "txt", "json")
            )
            for r in ok:
                assert tar.extractfile(f"{r['key']}.txt").read().decode() == r["caption"]
                img = Image.open(io.BytesIO(tar.extractfile(f"{r['key']}.jpg").read()))
                assert img.size == (192, 144) and img.mode == "RGB"
        total_ok += len(ok)
    assert 0 < total_ok < 30  # some rows failed to download, like a real img2dataset run


def test_flickr30k_csv_and_karpathy(world):
    root = world / "flickr30k"
    lines = (root / "results.csv").read_text().splitlines()
    assert lines[0] == "image_name| comment_number| comment"
    parsed = [line.split("| ") for line in lines[1:]]
    good = [p for p in parsed if len(p) == 3]
    assert len(parsed) - len(good) == 1  # the real file's missing separator
    assert len(good) == 20 * 5 - 1
    karpathy = json.loads((root / "dataset_flickr30k.json").read_text())
    assert karpathy["dataset"] == "flickr30k"
    splits = Counter(i["split"] for i in karpathy["images"])
    assert splits == {"train": 16, "val": 2, "test": 2}
    for img in karpathy["images"]:
        assert len(img["sentences"]) == 5 and img["sentids"] == [
            s["sentid"] for s in img["sentences"]
        ]
        assert (root / "flickr30k_images" / img["filename"]).is_file()
        for s in img["sentences"]:
            assert s["tokens"] == re.findall(r"[a-z0-9]+", s["raw"].lower())


def test_world_covers_categories_and_predicates():
    import random

    from pipeline.synth.scene import make_scene

    rng, cats, preds = random.Random(0), set(), set()
    for _ in range(200):
        objs, rels = make_scene(rng, 192, 144, 4)
        cats |= {o.category for o in objs}
        preds |= {p for _, p, _ in rels}
    assert len(cats) >= 20 and preds == set(PREDICATES)


@pytest.mark.parametrize("kind", ["file", "under-file", "foreign"])
def test_invalid_out_is_one_line_error(tmp_path, kind):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"synth": SMALL}))
    target = tmp_path / "target"
    if kind in ("file", "under-file"):
        target.write_text("x")
        if kind == "under-file":
            target = target / "sub"
    else:
        (target / "vg").mkdir(parents=True)  # someone's real data: never deleted
    res = CliRunner().invoke(app, ["synth", "--out", str(target), "--params", str(params)])
    assert res.exit_code == 2
    assert res.output.strip().count("\n") == 0 and res.output.startswith("error:")
    if kind == "foreign":
        assert (target / "vg").is_dir()


def test_cli_writes_three_datasets(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"seed": 1, "synth": SMALL}))
    res = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "w"), "--params", str(params)])
    assert res.exit_code == 0, res.output
    assert {p.name for p in (tmp_path / "w").iterdir()} >= {"vg", "laion", "flickr30k"}
    info = json.loads((tmp_path / "w" / "SAMPLE_WORLD.json").read_text())
    assert info["seed"] == 1 and info["params"]["flickr30k_images"] == 20
    assert load(Settings, params) == small(1)


@pytest.mark.parametrize("section, message", [
    ({"flickr_images": 20}, "params synth.flickr_images: unknown key"),
    ({"image_size": [192]}, "params synth.image_size: expected a list of 2 items"),
    ({"flickr30k_split": [0.8, 0.1, 0.2]}, "params synth.flickr30k_split: must be"),
    ({"objects_per_image": [3, 2]}, "params synth.objects_per_image: must be"),
    ({"laion_shard_size": 0}, "params synth.laion_shard_size: must be >= 1"),
])  # fmt: skip
def test_bad_settings_are_one_line_errors(tmp_path, section, message):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"synth": section}))
    res = CliRunner().invoke(app, ["synth", "--out", str(tmp_path / "w"), "--params", str(params)])
    assert res.exit_code == 2 and res.output.startswith(f"error: {message}"), res.output
    assert res.output.count("\n") == 1 and not (tmp_path / "w").exists()


def test_unwritable_out_is_one_line_error(tmp_path):
    if os.geteuid() == 0:  # root writes through file modes: use a kernel filesystem instead
        target = Path("/sys/kernel/clipda-test")
        if not Path("/sys/kernel").is_dir():
            pytest.skip("no /sys/kernel to stand for an unwritable folder")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "out"
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"synth": SMALL}))
    res = CliRunner().invoke(app, ["synth", "--out", str(target), "--params", str(params)])
    assert res.exit_code == 2
    assert res.output.startswith("error: cannot write to --out") and res.output.count("\n") == 1


def test_flickr30k_scene_truth_matches_images_and_geometry(world):
    scenes = json.loads((world / "flickr30k/scenes.json").read_text())["images"]
    karpathy = json.loads((world / "flickr30k/dataset_flickr30k.json").read_text())["images"]
    assert [s["filename"] for s in scenes] == [k["filename"] for k in karpathy]
    n_rel = 0
    for scene in scenes:
        boxes = {o["id"]: o["box"] for o in scene["objects"]}
        assert all(o["category"] and o["colour"] for o in scene["objects"])
        for r in scene["relations"]:
            assert predicate(boxes[r["subject"]], boxes[r["object"]]) == r["predicate"]
            n_rel += 1
    assert n_rel > 0


def test_flickr30k_clipart_style_is_a_control_without_domain_shift(world, tmp_path):
    generate(tmp_path / "clipart", Settings(**SMALL, seed=3, flickr30k_style="clipart"))
    same = ("flickr30k/dataset_flickr30k.json", "flickr30k/scenes.json", "vg/objects.json")
    for name in same:  # same scenes and captions ...
        assert (world / name).read_bytes() == (tmp_path / "clipart" / name).read_bytes()
    img = "flickr30k/flickr30k_images/1000000.jpg"  # ... drawn in the other style
    assert (world / img).read_bytes() != (tmp_path / "clipart" / img).read_bytes()


def test_laion_sentences_are_a_control_where_drawing_style_is_the_only_shift(world, tmp_path):
    from pipeline.metrics import tokenize
    from pipeline.synth.grammar import parses

    generate(tmp_path / "sent", Settings(**SMALL, seed=3, laion_captions="sentences"))

    def captions(root: Path) -> list[str]:
        return [c for p in sorted((root / "laion").glob("*.parquet"))
                for c in pq.read_table(p).column("caption").to_pylist()]  # fmt: skip

    alt, sent = captions(world), captions(tmp_path / "sent")
    assert len(alt) == len(sent) == SMALL["laion_samples"]
    assert all(parses(tokenize(c)) for c in sent)  # the Flickr30k references' grammar
    assert not any(parses(tokenize(c)) for c in alt)  # alt-text keywords are no sentence
    flickr = "flickr30k/dataset_flickr30k.json"  # the Flickr30k side is untouched
    assert (world / flickr).read_bytes() == (tmp_path / "sent" / flickr).read_bytes()


def test_probe_set_is_balanced_and_decodes_as_embed_does(world):
    from pipeline.synth.scene import CATEGORIES, COLOURS

    rows = json.loads((world / "probes" / "labels.json").read_text())["items"]
    assert len(rows) == 4 * 44 + 2 * 6
    scenes = [r for r in rows if r["kind"] == "scene"]
    assert len(scenes) == 12 and all(len(r["objects"]) >= 2 for r in scenes)
    rows = [r for r in rows if r["kind"] != "scene"]
    groups = Counter((r["style"], r["kind"], r["split"]) for r in rows)
    assert set(groups) == {(s, k, sp) for s in ("clipart", "photo") for k in ("single", "crop")
                           for sp in ("train", "test")}  # fmt: skip
    for style in ("clipart", "photo"):
        for kind in ("single", "crop"):
            cats = Counter(r["category"] for r in rows if (r["style"], r["kind"]) == (style, kind))
            assert cats == Counter({c: 2 for c in CATEGORIES})  # balanced
    assert {r["colour"] for r in rows} <= set(COLOURS)
    for r in rows:
        with Image.open(world / "probes" / r["file"]) as img:
            w, h = img.size
        if r["kind"] == "crop":  # a VG-style object box inside its scene
            x, y, bw, bh = r["box"]
            assert 0 <= x and 0 <= y and x + bw <= w and y + bh <= h and min(bw, bh) >= 8
        else:
            assert r["box"] is None and w == h


def test_objects_are_large_enough_to_be_seen():
    """Every object is >= 16% of the canvas height: letterboxed to the CLIP's 64 px input,
    an object crop fills it (4 patches of 16), and a large one is >= 30%."""
    import random as _random

    from pipeline.synth.scene import SIZES, make_scene, single_object

    rng = _random.Random(3)
    for _ in range(200):
        objs, rels = make_scene(rng, 192, 144, rng.randint(2, 4))
        for o in objs:
            assert o.box[3] >= int(144 * SIZES["small"][0])
            if o.size == "large":
                assert o.box[3] >= int(144 * SIZES["large"][0])
        for a, p, b in rels:
            assert predicate(objs[a].box, objs[b].box) == p
    for cat in ("rectangle", "circle"):
        o = single_object(rng, 144, 144, cat, "red", (0.5, 0.95))
        x, y, w, h = o.box
        assert 0 < x and 0 < y and x + w < 144 and y + h < 144 and h >= 72


def test_vocabulary_covers_questions_and_captions():
    from pipeline.synth.captions import vocabulary_text

    words = set(" ".join(vocabulary_text()).lower().split())
    for w in ("what", "is", "the", "relationship", "between", "this", "beside", "parallelogram",
              "cyan", "left", "of", "there", "shapes", "photo"):  # fmt: skip
        assert w in words, w
