"""Results over seeds: DVC experiments (`dvc exp show --json`) summarised per setting.

Run the pipeline once per seed as DVC experiments (see docs/results.md, "Seeds"), then
`clipda seeds` reads them: each finished experiment's params (params.yaml, flattened to
dotted keys) and headline metrics (`<file path under metrics/>.<key path>`, e.g. `caption.ada.cider` from
metrics/caption/ada.json: `pipeline.metrics.layout`).
Experiments are grouped by the params named with `--by` (none: one group); inside a group
every other param except `seed` must agree, or the summary would mix settings (a one-line
error names the param that differs). Each metric gets mean, sample standard deviation, min
and max over the group's seeds. With `--intervals`, each experiment's own bootstrap
intervals of the paired differences (`intervals` of its metrics/caption_detail.json, read
from its commit with git) are counted per group: of n seeds, how many intervals lie wholly
above 0 and how many wholly below.
"""

from __future__ import annotations

import fnmatch
import json
import math
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.metrics.layout import prefix


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists and scalars are leaves."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def exp_show(repo: Path, rev: str | None = None) -> list[dict[str, Any]]:
    """`dvc exp show --json` of the repository at `repo`: the experiments of `rev` (None:
    HEAD)."""
    cmd = ["dvc", "exp", "show", "--json"] + (["--rev", rev] if rev else [])
    try:
        res = subprocess.run(cmd, cwd=repo, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise UserError("dvc not found on the PATH (activate the virtualenv)") from None
    if res.returncode != 0:
        last = (res.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise UserError(f"dvc exp show failed: {last}")
    return json.loads(res.stdout)


def finished(shown: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each finished experiment as {name, params, metrics} (queued, running and failed
    ones, the workspace and the baseline commit left out)."""
    rows = []
    for commit in shown:
        for exp in commit.get("experiments") or []:
            state = (exp.get("executor") or {}).get("state", "success")
            rev = (exp.get("revs") or [{}])[0]
            data = rev.get("data") or {}
            if state != "success" or rev.get("error") or not data.get("metrics"):
                continue
            params = flatten((data.get("params") or {}).get("params.yaml", {}).get("data", {}))
            metrics = {}
            for file, entry in data["metrics"].items():  # metrics/caption/ada.json: caption.ada
                metrics.update(flatten(entry.get("data", {}), prefix(file)))
            rows.append({"name": exp.get("name") or rev.get("rev"), "rev": rev.get("rev"),
                         "params": params, "metrics": metrics})  # fmt: skip
    return rows


def key_value(item: str, option: str) -> tuple[str, Any]:
    """`KEY=VALUE` as (KEY, VALUE), VALUE read as YAML, so that `false`, `0.01` and `clipart`
    compare as the params file's values do; a malformed item is a one-line error naming
    `option`. A VALUE that is not YAML reads as None."""
    import yaml

    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise UserError(f"{option} {item!r}: expected KEY=VALUE")
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError:
        return key, None


def select(rows: list[dict[str, Any]], where: Sequence[str]) -> list[dict[str, Any]]:
    """The rows whose params match every `KEY=VALUE` of `where` (`key_value`)."""
    wanted = {}
    for item in where:
        key, value = key_value(item, "--where")
        if rows and not any(key in r["params"] for r in rows):
            raise UserError(f"--where {key}: no experiment has this param")
        wanted[key] = value
    return [r for r in rows if all(r["params"].get(k) == v for k, v in wanted.items())]


def detail_intervals(repo: Path, rev: str, detail: str = "metrics/caption_detail.json"
                     ) -> dict[str, tuple[float, float]]:  # fmt: skip
    """{"caption.ada-noada.cider": (lo, hi), ...} (named as the metrics): the paired
    differences' intervals in the detail file at commit `rev` ({} when it has none)."""
    res = subprocess.run(["git", "show", f"{rev}:{detail}"], cwd=repo, capture_output=True,
                         text=True, check=False)  # fmt: skip
    if res.returncode != 0:
        raise UserError(f"--intervals: no {detail} in experiment commit {rev}")
    out = {}
    for pair, node in (json.loads(res.stdout).get("intervals") or {}).items():
        if "-" not in pair:
            continue
        for metric, iv in node.items():
            if isinstance(iv, dict) and "lo" in iv and "hi" in iv:
                out[f"{prefix(detail).removesuffix('_detail')}.{pair}.{metric}"] = (
                    iv["lo"],
                    iv["hi"],
                )
    return out


def summarise(
    rows: list[dict[str, Any]], by: Sequence[str], metrics: Sequence[str] = ("*",)
) -> list[dict[str, Any]]:
    """Groups of `rows` by the params `by`, each with its seeds and per-metric statistics
    (metrics whose name matches one of the `metrics` glob patterns)."""
    if not rows:
        raise UserError("no finished experiments (run them first: see docs/results.md, 'Seeds')")
    for key in by:
        if not any(key in r["params"] for r in rows):
            raise UserError(f"--by {key}: no experiment has this param")
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r["params"].get(k) for k in by), []).append(r)
    out = []
    for values, members in sorted(groups.items(), key=lambda kv: [str(v) for v in kv[0]]):
        first = members[0]["params"]
        for r in members[1:]:
            for key in sorted(set(first) | set(r["params"])):
                if key != "seed" and key not in by and first.get(key) != r["params"].get(key):
                    raise UserError(
                        f"experiments {members[0]['name']} and {r['name']} differ in {key} "
                        f"({first.get(key)!r} vs {r['params'].get(key)!r}): add --by {key}"
                    )
        by_seed = {}
        for r in members:  # the same seed twice (a rerun): keep the first
            by_seed.setdefault(r["params"].get("seed"), r)
        names = sorted({m for r in by_seed.values() for m in r["metrics"]
                        if any(fnmatch.fnmatchcase(m, p) for p in metrics)})  # fmt: skip
        stats = {}
        for m in names:
            vals = [r["metrics"][m] for r in by_seed.values()
                    if isinstance(r["metrics"].get(m), int | float)]  # fmt: skip
            if vals:
                stats[m] = describe(vals)
        group = {"params": dict(zip(by, values)), "seeds": sorted(by_seed, key=str),
                 "experiments": [r["name"] for r in by_seed.values()], "metrics": stats}  # fmt: skip
        if any("intervals" in r for r in by_seed.values()):
            group["intervals"] = interval_counts([
                {k: v for k, v in r.get("intervals", {}).items()
                 if any(fnmatch.fnmatchcase(k, p) for p in metrics)}
                for r in by_seed.values()])  # fmt: skip
        out.append(group)
    return out


def interval_counts(per_seed: list[dict[str, tuple[float, float]]]) -> dict[str, dict[str, int]]:
    """For each difference: of the n seeds that have its interval, how many lie wholly
    above 0 and how many wholly below."""
    out: dict[str, dict[str, int]] = {}
    for ivs in per_seed:
        for key, (lo, hi) in sorted(ivs.items()):
            c = out.setdefault(key, {"above": 0, "below": 0, "n": 0})
            c["above"] += lo > 0
            c["below"] += hi < 0
            c["n"] += 1
    return out


def choose(
    groups: list[dict[str, Any]], by: Sequence[str], metric: str, against: str | None = None,
    higher: bool = False,
) -> list[dict[str, Any]]:  # fmt: skip
    """For each value of the first `by` param, the value of the second whose group has the
    best mean `metric` over its seeds (lowest, or highest with `higher`): a trade-off
    chosen on validation data pooled over seeds. With `against` (e.g. the λ = 0 arm's
    score in the same experiments), whether it would have scored better there."""
    best: dict[Any, dict[str, Any]] = {}
    for g in groups:
        stats = g["metrics"].get(metric)
        if stats is None:
            continue
        fixed, value = g["params"][by[0]], g["params"][by[1]]
        better = best.get(fixed) is None or (
            stats["mean"] > best[fixed]["mean"] if higher else stats["mean"] < best[fixed]["mean"]
        )
        if better:
            row = {by[0]: fixed, by[1]: value, "mean": stats["mean"], "std": stats["std"],
                   "n": stats["n"]}  # fmt: skip
            base = g["metrics"].get(against) if against else None
            if base is not None:
                row["against_mean"] = base["mean"]
                row["against_better"] = (base["mean"] > stats["mean"] if higher
                                         else base["mean"] < stats["mean"])  # fmt: skip
            best[fixed] = row
    if not best:
        raise UserError(f"--choose {metric}: no experiment has this metric")
    return [best[k] for k in sorted(best, key=str)]


def describe(values: Sequence[float]) -> dict[str, float]:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": round(mean, 6), "std": round(std, 6), "min": min(values),
            "max": max(values), "n": n}  # fmt: skip


def markdown(groups: list[dict[str, Any]]) -> str:
    """Metrics as rows, groups as columns: `mean ± std (n)`, and for a difference whose
    per-seed intervals were counted `[a↑ b↓]`: a seeds' intervals above 0, b below."""
    heads = [", ".join(f"{k}={v}" for k, v in g["params"].items()) or "all" for g in groups]
    names = sorted({m for g in groups for m in g["metrics"]})
    lines = ["| metric | " + " | ".join(heads) + " |", "|---" * (len(groups) + 1) + "|"]
    for m in names:
        cells = []
        for g in groups:
            s = g["metrics"].get(m)
            c = (g.get("intervals") or {}).get(m)
            mark = f" [{c['above']}↑ {c['below']}↓]" if c else ""
            cells.append(f"{s['mean']:.3f} ± {s['std']:.3f} ({s['n']}){mark}" if s else "–")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sweep_plot(groups: list[dict[str, Any]], by: Sequence[str], metrics: Sequence[str]) -> str:
    """SVG of each metric's mean over seeds (band: min..max) against the values of the
    first param of `by`, placed at even steps in sorted order; one line per metric and per
    combination of the other `by` params' values."""
    from pipeline.webpage.charts import line_chart

    x_key, rest = by[0], list(by[1:])
    values = sorted({g["params"][x_key] for g in groups},
                    key=lambda v: (not isinstance(v, int | float), v))  # fmt: skip
    pos = {v: i for i, v in enumerate(values)}
    series: dict[str, list[tuple[float, float]]] = {}
    bands: dict[str, list[tuple[float, float, float]]] = {}
    for g in groups:
        other = ", ".join(f"{k.rsplit('.', 1)[-1]}={g['params'][k]}" for k in rest)
        x = pos[g["params"][x_key]]
        for m in metrics:
            st = g["metrics"].get(m)
            if st:
                name = f"{m} ({other})" if other else m
                series.setdefault(name, []).append((x, st["mean"]))
                bands.setdefault(name, []).append((x, st["min"], st["max"]))
    for name, points in series.items():
        points.sort()
        bands[name].sort()
    ticks = [(i, str(v)) for i, v in enumerate(values)]
    return line_chart(f"mean over seeds (band: min-max) by {x_key}", series, x_key, "",
                      x_ticks=ticks, bands=bands)  # fmt: skip
