"""`clipda synth`: write the sample world in the real on-disk formats.

- `vg/`: Visual Genome v1.4 JSON (image_data, objects, relationships, alias files) and
  images in `VG_100K/` and `VG_100K_2/`, with the release's quirks: "name" vs "names",
  predicates in mixed case and spacing, synonyms, missing synsets, the odd self-relation
  or empty predicate, and relationships of images whose file is missing.
- `laion/`: img2dataset webdataset shards (`NNNNN.tar` + `NNNNN.parquet` +
  `NNNNN_stats.json`) of clipart images with keyword alt-text; some rows failed to download.
- `flickr30k/`: `flickr30k_images/`, `results.csv` (`| `-separated, with one row missing a
  separator as in the real file) and `dataset_flickr30k.json` (Karpathy splits), five
  sentences per image, photo-style images: a real domain shift from the LAION-like source.
- `probes/`: the CLIP probe set (`pipeline.synth.webdata.write_probes`): single-object
  images and object crops in both styles with their category and colour, and whole
  scenes with every object, read by `clip_bootstrap` to measure what the CLIP sees.

Everything is a pure function of the settings (`pipeline.stages.synth.Settings`): the
seed and the sizes.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import shutil
import tarfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipeline.atomic import atomic_path, write_json, write_text
from pipeline.errors import UserError
from pipeline.settings import as_dict
from pipeline.synth.captions import alt_text, sentences
from pipeline.synth.render import render
from pipeline.synth.scene import Obj, make_scene
from pipeline.synth.webdata import write_probes

if TYPE_CHECKING:
    from pipeline.stages.synth import Settings

MARKER = "SAMPLE_WORLD.json"
DATASETS = ("vg", "laion", "flickr30k", "probes")
SCENES_FILE = "scenes.json"  # flickr30k/: the truth of every scene, read by evaluation only
REL_ALIASES = {
    "next to": ["beside", "by"],
    "in": ["inside", "within"],
    "below": ["under", "beneath"],
    "on": ["on top of", "atop"],
}
OBJ_ALIASES = {"circle": ["round"], "square": ["box"]}


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _scene(rng: random.Random, settings: Settings):
    lo, hi = settings.objects_per_image
    w, h = settings.image_size
    return make_scene(rng, w, h, rng.randint(lo, hi))


def _prepare_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    for name in DATASETS:
        if (out / name).exists() and not (out / MARKER).exists():
            raise UserError(
                f"refusing to overwrite {out / name}: it was not written by clipda synth"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to --out {out}: {exc.strerror or exc}") from None
    for name in DATASETS:
        shutil.rmtree(out / name, ignore_errors=True)


# --------------------------------------------------------------------------- Visual Genome


def _vg_name(rng: random.Random, name: str, quirks: bool) -> str:
    if quirks and name in OBJ_ALIASES and rng.random() < 0.1:
        return rng.choice(OBJ_ALIASES[name])
    if quirks and rng.random() < 0.05:
        return name.capitalize()
    return name


def _vg_predicate(rng: random.Random, pred: str, quirks: bool) -> str:
    if not quirks:
        return pred
    r = rng.random()
    if pred in REL_ALIASES and r < 0.2:
        return rng.choice(REL_ALIASES[pred])
    if r < 0.3:
        return pred.upper()
    if r < 0.4:
        return " " + pred.replace(" ", "  ") + " "
    return pred


def _vg_obj(o: Obj, oid: int, name: str, rng: random.Random, quirks: bool, list_names: bool):
    d: dict[str, Any] = {
        "object_id": oid,
        "x": o.box[0],
        "y": o.box[1],
        "w": o.box[2],
        "h": o.box[3],
    }
    d["names" if list_names else "name"] = [name] if list_names else name
    if not (quirks and rng.random() < 0.1):
        d["synsets"] = [f"{o.category}.n.01"]
    return d


def write_vg(out: Path, settings: Settings) -> dict:
    seed = settings.seed
    rng = random.Random(f"{seed}-vg")
    nrng = np.random.default_rng([seed, 1])
    quirks = settings.quirks
    n = settings.vg_images
    width, height = settings.image_size
    image_data, objects, relationships = [], [], []
    next_oid, next_rid, n_rel, n_missing = 1_000_000, 4_000_000, 0, 0
    for i in range(n):
        image_id = i + 1
        objs, rels = _scene(rng, settings)
        folder = "VG_100K_2" if image_id > 0.8 * n else "VG_100K"
        missing = quirks and rng.random() < 0.02
        if not missing:
            img = render(objs, width, height, "photo", nrng)
            _write_bytes(out / "vg" / folder / f"{image_id}.jpg", _jpeg(img))
        else:
            n_missing += 1
        image_data.append(
            {
                "image_id": image_id,
                "url": f"https://example.org/{folder}/{image_id}.jpg",
                "width": width,
                "height": height,
                "coco_id": None,
                "flickr_id": None,
            }
        )
        oids = list(range(next_oid, next_oid + len(objs)))
        next_oid += len(objs)
        names = [_vg_name(rng, o.category, quirks) for o in objs]
        objects.append(
            {
                "image_id": image_id,
                "objects": [
                    _vg_obj(o, oid, nm, rng, quirks, True) for o, oid, nm in zip(objs, oids, names)
                ],
            }
        )
        rel_list = []
        for s, pred, o in rels:
            rel_list.append(
                {
                    "relationship_id": next_rid,
                    "predicate": _vg_predicate(rng, pred, quirks),
                    "synsets": [f"{pred.replace(' ', '_')}.r.01"],
                    "subject": _vg_obj(objs[s], oids[s], names[s], rng, quirks, rng.random() < 0.5),
                    "object": _vg_obj(objs[o], oids[o], names[o], rng, quirks, rng.random() < 0.5),
                }
            )
            next_rid += 1
        if quirks and rng.random() < 0.02:  # a self-relation, as the real data has
            rel_list.append(
                {
                    "relationship_id": next_rid,
                    "predicate": "near",
                    "synsets": [],
                    "subject": _vg_obj(objs[0], oids[0], names[0], rng, quirks, True),
                    "object": _vg_obj(objs[0], oids[0], names[0], rng, quirks, False),
                }
            )
            next_rid += 1
        if quirks and rng.random() < 0.02 and len(objs) > 1:  # an empty predicate
            rel_list.append(
                {
                    "relationship_id": next_rid,
                    "predicate": "",
                    "synsets": [],
                    "subject": _vg_obj(objs[1], oids[1], names[1], rng, quirks, True),
                    "object": _vg_obj(objs[0], oids[0], names[0], rng, quirks, True),
                }
            )
            next_rid += 1
        n_rel += len(rel_list)
        relationships.append({"image_id": image_id, "relationships": rel_list})
    vg = out / "vg"
    write_text(vg / "image_data.json", json.dumps(image_data))
    write_text(vg / "objects.json", json.dumps(objects))
    write_text(vg / "relationships.json", json.dumps(relationships))
    write_text(
        vg / "relationship_alias.txt",
        "".join(",".join([k, *v]) + "\n" for k, v in REL_ALIASES.items()),
    )
    write_text(
        vg / "object_alias.txt", "".join(",".join([k, *v]) + "\n" for k, v in OBJ_ALIASES.items())
    )
    return {"images": n, "relationships": n_rel, "missing_image_files": n_missing}


# --------------------------------------------------------------------------- LAION


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_laion(out: Path, settings: Settings) -> dict:
    seed = settings.seed
    rng = random.Random(f"{seed}-laion")
    nrng = np.random.default_rng([seed, 2])
    width, height = settings.image_size
    n, per_shard = settings.laion_samples, settings.laion_shard_size
    laion = out / "laion"
    laion.mkdir(parents=True, exist_ok=True)
    ok_total = 0
    for shard in range((n + per_shard - 1) // per_shard):
        rows = []
        with (
            atomic_path(laion / f"{shard:05d}.tar") as tmp,
            tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar,
        ):
            for idx in range(min(per_shard, n - shard * per_shard)):
                key = f"{shard:05d}{idx:04d}"
                objs, rels = _scene(rng, settings)
                if settings.laion_captions == "sentences":
                    caption = sentences(rng, objs, rels, 1)[0]
                else:
                    caption = alt_text(rng, objs, rels)
                failed = rng.random() < settings.laion_fail_rate
                row = {
                    "url": f"https://example.org/img/{key}.jpg",
                    "caption": caption,
                    "key": key,
                    "status": "failed_to_download" if failed else "success",
                    "error_message": "HTTP Error 404: Not Found" if failed else None,
                    "width": None if failed else width,
                    "height": None if failed else height,
                    "original_width": None if failed else width * 2,
                    "original_height": None if failed else height * 2,
                    "exif": None if failed else "{}",
                    "sha256": None,
                }
                if not failed:
                    jpg = _jpeg(render(objs, width, height, "clipart", nrng))
                    row["sha256"] = hashlib.sha256(jpg).hexdigest()
                    _tar_add(tar, f"{key}.jpg", jpg)
                    _tar_add(tar, f"{key}.txt", caption.encode())
                    _tar_add(tar, f"{key}.json", json.dumps(row).encode())
                    ok_total += 1
                rows.append(row)
        with atomic_path(laion / f"{shard:05d}.parquet") as tmp:
            pq.write_table(pa.Table.from_pylist(rows), tmp)
        ok = sum(r["status"] == "success" for r in rows)
        write_json(
            laion / f"{shard:05d}_stats.json",
            {
                "count": len(rows),
                "successes": ok,
                "failed_to_download": len(rows) - ok,
                "failed_to_resize": 0,
                "duration": 0.0,
                "start_time": 0.0,
                "end_time": 0.0,
                "status_dict": {"success": ok, "HTTP Error 404: Not Found": len(rows) - ok},
            },
        )
    return {"samples": n, "downloaded": ok_total, "captions": settings.laion_captions}


# --------------------------------------------------------------------------- Flickr30k


def write_flickr30k(out: Path, settings: Settings) -> dict:
    seed = settings.seed
    rng = random.Random(f"{seed}-flickr30k")
    nrng = np.random.default_rng([seed, 3])
    width, height = settings.image_size
    n = settings.flickr30k_images
    f_train, f_val, _ = settings.flickr30k_split
    root = out / "flickr30k"
    csv_lines = ["image_name| comment_number| comment"]
    karpathy, scenes, sentid = [], [], 0
    for i in range(n):
        name = f"{1000000 + 7919 * i}.jpg"
        objs, rels = _scene(rng, settings)
        _write_bytes(
            root / "flickr30k_images" / name,
            _jpeg(render(objs, width, height, settings.flickr30k_style, nrng)),
        )
        scenes.append(scene_truth(name, objs, rels))
        sents = sentences(rng, objs, rels, 5)
        split = "train" if i < f_train * n else ("val" if i < (f_train + f_val) * n else "test")
        entry = {"filename": name, "imgid": i, "split": split, "sentids": [], "sentences": []}
        for k, s in enumerate(sents):
            flaw = settings.quirks and i == 7 and k == 4  # the real file's missing separator
            sep = " " if flaw else "| "
            csv_lines.append(f"{name}| {k}{sep}{s}")
            tokens = re.findall(r"[a-z0-9]+", s.lower())  # Karpathy tokens: no punctuation
            entry["sentences"].append({"tokens": tokens, "raw": s, "imgid": i, "sentid": sentid})
            entry["sentids"].append(sentid)
            sentid += 1
        karpathy.append(entry)
    write_text(root / "results.csv", "\n".join(csv_lines) + "\n")
    write_text(
        root / "dataset_flickr30k.json", json.dumps({"images": karpathy, "dataset": "flickr30k"})
    )
    write_text(root / SCENES_FILE, json.dumps({"images": scenes}))
    return {"images": n, "captions": sentid, "style": settings.flickr30k_style}


def scene_truth(filename: str, objs: list[Obj], rels: list[tuple[int, str, int]]) -> dict:
    """What a scene holds, for grounding scores only (no stage trains on it)."""
    return {
        "filename": filename,
        "objects": [
            {
                "id": o.object_id,
                "category": o.category,
                "colour": o.colour,
                "size": o.size,
                "box": list(o.box),
            }
            for o in objs
        ],
        "relations": [{"subject": a, "predicate": p, "object": b} for a, p, b in rels],  # ids
    }


def generate(out: Path, settings: Settings) -> dict[str, Any]:
    """Write the three datasets and `SAMPLE_WORLD.json` under `out`; return what it holds."""
    out = Path(out)
    _prepare_out(out)
    sizes = as_dict(settings)
    del sizes["seed"]
    info = {
        "seed": settings.seed,
        "params": sizes,
        "vg": write_vg(out, settings),
        "laion": write_laion(out, settings),
        "flickr30k": write_flickr30k(out, settings),
        "probes": write_probes(
            out / "probes",
            settings.probe_images,
            settings.seed,
            settings.image_size,
            settings.objects_per_image,
            settings.probe_scenes,
        ),
    }
    write_json(out / MARKER, info)
    return info
