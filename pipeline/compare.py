"""`clipda compare`: is each headline difference between two sets of metrics within noise?

Sides. `clipda compare [A [B]]`: no argument compares a = HEAD with b = the workspace's
metrics/ (what `dvc repro` on a new machine leaves); one compares a = A with b = the
workspace; two compare a = A with b = B. The difference is b - a, as in `dvc metrics diff`,
and a is the baseline: the noise is estimated on its side. A side is a folder holding the
metrics files (caption/, vqa/, clip.json and caption_detail.json, ...; the older one-file
caption.json and vqa.json too: `pipeline.metrics.layout`; a folder with a metrics/
subfolder, e.g. another clone, works too) or else a git revision or a DVC experiment name.
Revisions are read with `git show REV:metrics/<file>`: every metrics file,
the detail files with their intervals included, is committed to git (cache: false), so git
reads them at any commit in milliseconds without DVC (`dvc metrics show` would leave out the
detail files, `dvc.api` goes through DVC's repository machinery for files git already has).
An experiment name is looked up among DVC's experiment refs (refs/exps/<baseline>/<name>).

Rows: every headline number (`<file>.<key path>`, e.g. `caption.ada.cider`, as
`clipda seeds` names them) present on both sides, sorted by file then key.

Noise rule, for the difference d = b - a of each row:
1. Seed spread (seed-to-seed variation: training and, here, the sample world): the
   standard deviation of the metric over the seeds of a's setting, from `--seeds FILE` (the
   JSON `clipda seeds --out` writes; of several groups, the one whose params equal a's
   params.yaml), else from the DVC experiments run from a's commit with a's params except
   `seed`, with a's own metrics, when they span at least two seeds. Within noise when
   |d| <= 2.8 sd (1.96 x sqrt(2): the 95% band of the difference of two runs, each with
   the seeds' sd). Not the seeds' min-max range: a standard deviation is a scale, so it carries
   over to a commit whose numbers have moved (a seeds file made at an older commit), where
   a range would call every moved number beyond noise; and with 3 seeds a fourth run falls
   outside their range with probability 1/2.
2. Else the 95% bootstrap interval of a's value in a's detail file ("intervals"): within
   noise when |d| <= half its width. It resamples the test items only and says nothing of
   seed-to-seed variation: such rows say "test sampling only".
3. Else "no noise estimate". Equal values are "same" whatever the noise.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import UserError
from pipeline.experiments import exp_show, finished, flatten, summarise
from pipeline.metrics.layout import STEMS, prefix, read_tree

HEADLINE = STEMS
DETAILS = tuple(f"{stem}_detail" for stem in HEADLINE)
SEED_SDS = 2.8  # within noise: |diff| <= SEED_SDS x the seed sd (95% band of a difference)
BOOTSTRAP_NOTE = "bootstrap, test sampling only"
KEY_WIDTH = 26  # metric keys (less the file) longer than this are shortened


@dataclass
class Side:
    label: str
    files: dict[str, Any]  # file stem ("caption", "caption_detail", ...) -> its JSON
    params: dict[str, Any] | None  # flattened params.yaml of the side, where found
    rev: str | None = None  # the commit, for a side read from git

    def headline(self) -> dict[str, float]:
        out = {}
        for stem in HEADLINE:
            for key, v in flatten(self.files.get(stem, {}), stem).items():
                if isinstance(v, int | float) and not isinstance(v, bool):
                    out[key] = float(v)
        return out

    def interval(self, key: str) -> tuple[float, float] | None:
        """The 95% bootstrap interval of `key` in the detail file's `intervals`, at the key's
        path (vqa's `overall_diff.head-x` at `overall.head-x`)."""
        stem, first, *rest = key.split(".")
        intervals = (self.files.get(f"{stem}_detail") or {}).get("intervals") or {}
        node = intervals.get(first) or intervals.get(first.removesuffix("_diff"))
        for part in rest:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict) and all(
            isinstance(node.get(k), int | float) for k in ("lo", "hi")
        ):
            return float(node["lo"]), float(node["hi"])
        return None


def git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=False)


def read_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{where}: not JSON ({exc})") from None


def read_files(load, listdir) -> dict[str, Any]:
    """{stem: headline tree} and {stem_detail: JSON} of one metrics folder, where present."""
    files = {s: read_tree(load, listdir, s) for s in HEADLINE}
    files |= {s: load(f"{s}.json") for s in DETAILS}
    return {k: v for k, v in files.items() if v is not None}


def read_folder(folder: Path, label: str) -> Side:
    def present(f: Path) -> bool:
        return any((f / f"{s}.json").is_file() or (f / s).is_dir() for s in HEADLINE)

    if not present(folder) and (folder / "metrics").is_dir():
        folder = folder / "metrics"

    def load(name: str) -> Any:
        path = folder / name
        return read_json(path.read_text(), str(path)) if path.is_file() else None

    def listdir(name: str) -> list[str]:
        return sorted(p.name for p in (folder / name).glob("*.json"))

    files = read_files(load, listdir)
    if not any(s in files for s in HEADLINE):
        raise UserError(f"{folder}: no metrics files (caption/, clip.json, vqa/)")
    params = next((p for p in (folder / "params.yaml", folder.parent / "params.yaml")
                   if p.is_file()), None)  # fmt: skip
    return Side(label, files, flatten(yaml.safe_load(params.read_text()) or {}) if params else None)


def resolve(repo: Path, rev: str) -> str:
    """The commit of a git revision or of a DVC experiment name."""
    if git(repo, "rev-parse", "--git-dir").returncode != 0:
        raise UserError(f"{rev}: not a folder, and {repo} is not a git repository")
    res = git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    if res.returncode == 0:
        return res.stdout.strip()
    refs = git(repo, "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps").stdout
    shas = {sha for sha, ref in (line.split(" ", 1) for line in refs.splitlines())
            if ref.count("/") == 4 and ref.rsplit("/", 1)[1] == rev}  # fmt: skip
    if len(shas) > 1:
        raise UserError(f"{rev}: more than one DVC experiment has this name; give its commit")
    if not shas:
        raise UserError(f"{rev}: not a folder, a git revision or a DVC experiment name")
    return shas.pop()


def read_rev(repo: Path, rev: str) -> Side:
    sha = resolve(repo, rev)

    def load(name: str) -> Any:
        res = git(repo, "show", f"{sha}:metrics/{name}")
        return read_json(res.stdout, f"{rev}:metrics/{name}") if res.returncode == 0 else None

    def listdir(name: str) -> list[str]:
        res = git(repo, "ls-tree", "--name-only", f"{sha}:metrics/{name}")
        return res.stdout.split() if res.returncode == 0 else []

    files = read_files(load, listdir)
    if not any(s in files for s in HEADLINE):
        raise UserError(f"{rev}: no metrics files at this revision (metrics/caption/, ...)")
    res = git(repo, "show", f"{sha}:params.yaml")
    params = flatten(yaml.safe_load(res.stdout) or {}) if res.returncode == 0 else None
    label = rev if sha.startswith(rev) else f"{rev} ({sha[:7]})"
    return Side(label, files, params, rev=sha)


def load_side(arg: str | None, repo: Path) -> Side:
    if arg is None:
        return read_folder(repo / "metrics", "workspace (metrics/)")
    if Path(arg).is_dir():
        return read_folder(Path(arg), arg)
    return read_rev(repo, arg)


def seeds_from_file(path: Path, params: dict[str, Any] | None) -> dict[str, Any]:
    """The per-metric stats of a `clipda seeds --out` file's group for a's params."""
    data = read_json(path.read_text(), str(path))
    groups = data.get("groups") if isinstance(data, dict) else None
    if not isinstance(groups, list) or not groups:
        raise UserError(f"{path}: not a `clipda seeds --out` file (no groups)")
    if len(groups) > 1:
        groups = [g for g in groups if params is not None
                  and all(params.get(k) == v for k, v in g["params"].items())]  # fmt: skip
        if len(groups) != 1:
            by = ", ".join(data.get("by") or [])
            why = "none is a's params.yaml setting" if params else "a has no params.yaml"
            raise UserError(f"{path}: several groups (by {by}) and {why}; make one for a's "
                            "setting with `clipda seeds --out FILE`")  # fmt: skip
    return groups[0]["metrics"]


def seeds_from_experiments(repo: Path, sha: str) -> tuple[dict[str, Any], list[str]] | None:
    """Stats over the seeds of the DVC experiments run from commit `sha` with its params
    except `seed` (and of the commit itself), with their names; None under two seeds."""
    if not git(repo, "for-each-ref", f"refs/exps/{sha[:2]}/{sha[2:]}/").stdout.strip():
        return None  # no experiments of this commit: don't start DVC
    try:
        shown = exp_show(repo, sha)
    except UserError:
        return None
    base = next((c for c in shown if c.get("rev") == sha), None)
    if base is None:
        return None
    data = base.get("data") or {}
    params = flatten(((data.get("params") or {}).get("params.yaml") or {}).get("data") or {})
    metrics = {}
    for file, entry in (data.get("metrics") or {}).items():
        metrics.update(flatten(entry.get("data") or {}, prefix(file)))
    own = {"name": sha[:7], "params": params, "metrics": metrics}

    def setting(p):
        return {k: v for k, v in p.items() if k != "seed"}

    rows = [r for r in finished(shown) + [own] if setting(r["params"]) == setting(params)]
    if len({r["params"].get("seed") for r in rows}) < 2:
        return None
    group = summarise(rows, [])[0]
    return group["metrics"], group["experiments"]


@dataclass
class Row:
    key: str
    a: float
    b: float
    noise: float | None  # the largest |b - a| within noise
    source: str
    verdict: str  # same | within | BEYOND | ?

    @property
    def diff(self) -> float:
        return self.b - self.a


def judge(a: Side, b: Side, seeds: dict[str, Any] | None) -> list[Row]:
    va, vb = a.headline(), b.headline()
    rows = []
    for key in sorted(set(va) & set(vb), key=lambda k: k.split(".")):
        stats = (seeds or {}).get(key)
        iv = a.interval(key)
        if isinstance(stats, dict) and stats.get("n", 0) >= 2:
            noise, source = SEED_SDS * stats["std"], f"seed spread ({stats['n']} seeds)"
        elif iv is not None:
            noise, source = (iv[1] - iv[0]) / 2, BOOTSTRAP_NOTE
        else:
            noise, source = None, "no noise estimate"
        d = abs(vb[key] - va[key])
        verdict = ("same" if va[key] == vb[key] else "?" if noise is None
                   else "within" if d <= noise + 1e-9 else "BEYOND")  # fmt: skip
        rows.append(Row(key, va[key], vb[key], noise, source, verdict))
    return rows


def num(v: float | None, sign: bool = False) -> str:
    if v is None:
        return "-"
    fmt = ".4f" if v == 0 or 0.0005 <= abs(v) < 1000 else ".1e"  # 4 decimals show it
    return f"{v:+{fmt}}" if sign else f"{v:{fmt}}"


def short(key: str, width: int = KEY_WIDTH) -> str:
    """`key` in `width` characters: the middle gives way to an ellipsis."""
    if len(key) <= width:
        return key
    tail = (width - 1) // 2
    return key[: width - 1 - tail] + "…" + key[-tail:]


def render(rows: list[Row], a: Side, b: Side, seeds_from: str, only: tuple[int, int]) -> str:
    """The table, one section per file, in 100 columns (keys over KEY_WIDTH shortened)."""
    lines = [
        f"a: {a.label}",
        f"b: {b.label}",
        f"diff = b - a; noise (a's side) = {SEED_SDS} x the seed sd, else half a's 95% interval",
        f"seeds: {seeds_from}",
        "",
        f"{'metric':<{KEY_WIDTH + 2}} {'a':>7} {'b':>7} {'diff':>8} {'noise':>7}  verdict source",
    ]
    stem = None
    for r in rows:
        if r.key.split(".")[0] != stem:
            stem = r.key.split(".")[0]
            lines.append(stem)
        lines.append(f"  {short(r.key.split('.', 1)[1]):<{KEY_WIDTH}} {num(r.a):>7} {num(r.b):>7} "
                     f"{num(r.diff, True):>8} {num(r.noise):>7}  {r.verdict:<6}  {r.source}")  # fmt: skip
    beyond = sum(r.verdict == "BEYOND" for r in rows)
    unknown = sum(r.verdict == "?" for r in rows)
    summary = f"{beyond} of {len(rows)} headline numbers differ beyond noise"
    if unknown:
        summary += f"; {unknown} more differ with no noise estimate"
    if any(only):
        summary += f" ({only[0]} only in a, {only[1]} only in b: not compared)"
    return "\n".join(lines + ["", summary])


def main(args: list[str], seeds: Path | None, repo: Path) -> str:
    if len(args) > 2:
        raise UserError(f"at most two REV_OR_DIR, got {len(args)}: {' '.join(args)}")
    a = load_side(args[0] if args else "HEAD", repo)
    b = load_side(args[1] if len(args) == 2 else None, repo)
    stats, seeds_from = None, "none (no --seeds; no DVC experiments of a over 2+ seeds)"
    if seeds is not None:
        stats, seeds_from = seeds_from_file(seeds, a.params), str(seeds)
    elif a.rev is not None and (found := seeds_from_experiments(repo, a.rev)) is not None:
        stats, names = found
        more = ", ..." if len(names) > 4 else ""
        seeds_from = f"{len(names)} DVC experiments of a ({', '.join(map(str, names[:4]))}{more})"
    rows = judge(a, b, stats)
    ka, kb = set(a.headline()), set(b.headline())
    return render(rows, a, b, seeds_from, (len(ka - kb), len(kb - ka)))
