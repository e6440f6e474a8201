"""dvc.yaml and params.yaml agree with the code.

- each stage's `params:` list is exactly the sections its settings classes read;
- every key of params.yaml is read: by a stage's settings, or (`data:`) interpolated into
  dvc.yaml; and every settings field is used somewhere in the code;
- params.yaml loads into every settings class without an error, and gives its defaults;
- each stage's deps cover every pipeline module the stage imports (statically, including
  imports inside functions), so that changing code re-runs the stages it feeds.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
from pathlib import Path

import pytest
import yaml

from pipeline.settings import load

ROOT = Path(__file__).resolve().parents[1]
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
STAGES = DVC["stages"]
# The entry layer every `python -m pipeline ...` goes through; a change there is not a
# change of any stage's computation.
ENTRY = {"pipeline/__init__.py", "pipeline/__main__.py", "pipeline/cli.py"}


def body(stage: str) -> dict:
    return STAGES[stage].get("do", STAGES[stage])


def settings_classes(stage: str) -> tuple:
    return importlib.import_module(f"pipeline.stages.{stage}").SETTINGS


def sections_read(stage: str) -> set[str]:
    classes = settings_classes(stage)
    read = {cls.SECTION for cls in classes}
    if any(f.name == "seed" for cls in classes for f in dataclasses.fields(cls)):
        read.add("seed")
    return read


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_params_list_is_what_the_stage_reads(stage):
    assert set(body(stage).get("params", [])) == sections_read(stage)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_params_yaml_loads_into_the_stage_settings(stage):
    for cls in settings_classes(stage):
        load(cls, PARAMS)  # an unknown key or a bad value raises


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_the_one_default_is_params_yaml(stage):
    """Every settings default is the default run's value: params.yaml only restates it."""
    for cls in settings_classes(stage):
        assert load(cls, PARAMS) == cls()


def test_every_params_key_is_read():
    declared = {p for stage in STAGES for p in body(stage).get("params", [])}
    text = (ROOT / "dvc.yaml").read_text()
    interpolated = set(re.findall(r"\$\{data\.(\w+)\}", text))
    assert set(PARAMS) - {"data"} <= declared, "sections no stage reads"
    assert set(PARAMS["data"]) == interpolated, "data keys not passed by dvc.yaml"


def _fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        yield f.name
        tp = cls.__dataclass_fields__[f.name].default_factory
        if dataclasses.is_dataclass(tp):
            yield from _fields(tp)


def test_every_settings_field_is_used_by_the_code():
    code = "\n".join(p.read_text() for p in (ROOT / "pipeline").rglob("*.py"))
    classes = {cls for stage in STAGES for cls in settings_classes(stage)}
    unused = sorted(
        f"{cls.SECTION}.{name}"
        for cls in classes
        for name in _fields(cls)
        if name != "seed" and not re.search(rf"\.{name}\b", code)
    )
    assert not unused, f"settings that no code reads (as `.name`): {unused}"


def _imports(path: Path) -> set[str]:
    """pipeline.* modules imported anywhere in `path` (top level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("pipeline"):
                out.add(node.module)
                out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("pipeline"))
    return out


def _file(module: str) -> Path | None:
    base = ROOT / Path(*module.split("."))
    for cand in (base.with_suffix(".py"), base / "__init__.py"):
        if cand.is_file():
            return cand
    return None  # a name imported from a module, not a module


def module_closure(stage: str) -> set[str]:
    todo, seen = [f"pipeline.stages.{stage}"], set()
    while todo:
        path = _file(todo.pop())
        if path is None:
            continue
        rel = path.relative_to(ROOT).as_posix()
        if rel in seen:
            continue
        seen.add(rel)
        todo.extend(_imports(path))
        parent = path.parent  # a package's __init__ runs first, with its imports
        while parent != ROOT and (parent / "__init__.py").is_file():
            todo.append(".".join(parent.relative_to(ROOT).parts))
            parent = parent.parent
    return {f for f in seen - ENTRY if not _docstring_only(ROOT / f)}


def _docstring_only(path: Path) -> bool:
    """A package `__init__.py` holding only its docstring runs no code of a stage."""
    body = ast.parse(path.read_text()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_deps_cover_the_code_the_stage_runs(stage):
    deps = [str(d) for d in body(stage).get("deps", [])]
    missing = sorted(
        f
        for f in module_closure(stage)
        if not any(f == d or f.startswith(d.rstrip("/") + "/") for d in deps)
    )
    assert not missing, f"{stage}: add to deps: {missing}"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_deps_name_no_code_the_stage_does_not_run(stage):
    closure = module_closure(stage)
    code_deps = [str(d) for d in body(stage).get("deps", []) if str(d).startswith("pipeline")]
    stale = [d for d in code_deps if not any(f == d or f.startswith(d + "/") for f in closure)]
    assert not stale, f"{stage}: deps on code it does not import: {stale}"
