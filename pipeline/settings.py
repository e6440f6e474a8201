"""Typed settings: one frozen dataclass per params.yaml section, one loader.

A stage's hyperparameters are a frozen dataclass whose field defaults are the only
defaults in the code (nanoGPT's `GPTConfig` is the model). `load(Cls, params_file)` maps
the section `Cls.SECTION` of params.yaml onto it:

- an unknown key, a value of the wrong type or a bad value is a `UserError` naming
  `section.key` (the CLI prints it as one line, exit 2);
- a field typed as another dataclass reads the nested mapping (`train_caption.model`);
- a field named `seed` reads the top-level `seed` (the one seed of a run).

Types understood: bool, int, float (numbers and numeric strings such as "1e-3", which
PyYAML reads as strings), str, `Literal[...]`, `X | None`, `list[X]` / `tuple[X, ...]` /
`tuple[X, Y]`, `dict[str, X]` and nested dataclasses. Range checks live in the class's
`__post_init__` through `check(...)`, so they name the key too.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml

from pipeline.errors import UserError

DEFAULT_PARAMS = Path("params.yaml")
T = TypeVar("T")


class SettingError(UserError):
    """A bad value for one key; `key` is relative to its section."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key
        self.message = message

    def __reduce__(self):  # rebuilt from both arguments (a child process raises it too)
        return (SettingError, (self.key, self.message))


def check(ok: bool, key: str, message: str) -> None:
    """Raise a `SettingError` for `key` unless `ok` (use in `__post_init__`)."""
    if not ok:
        raise SettingError(key, message)


DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device(value: str, key: str = "device") -> None:
    """The one word for a torch device in settings: auto | cpu | cuda | cuda:N."""
    check(DEVICE.fullmatch(value) is not None, key,
          f"unknown device {value!r} (use auto, cpu, cuda or cuda:N)")  # fmt: skip


def read_params(path: str | Path | None = None) -> dict[str, Any]:
    """The whole params file as a mapping; a missing default file reads as empty."""
    path = Path(path) if path is not None else DEFAULT_PARAMS
    if not path.exists():
        if path == DEFAULT_PARAMS:
            return {}
        raise UserError(f"params file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot parse {path}: {exc}".splitlines()[0]) from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: top level must be a mapping")
    return data


def load(cls: type[T], params: str | Path | dict[str, Any] | None = None) -> T:
    """`cls` filled from section `cls.SECTION` of `params` (a file or an already-read dict).

    Missing keys keep their defaults; see the module docstring for the rules.
    """
    data = params if isinstance(params, dict) else read_params(params)
    section = cls.SECTION  # type: ignore[attr-defined]
    raw = data.get(section)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(f"params {section}: expected a mapping, got {raw!r}")
    if "seed" in {f.name for f in dataclasses.fields(cls)}:  # type: ignore[arg-type]
        if "seed" in raw:
            raise UserError(f"params {section}.seed: set the top-level `seed` instead")
        if "seed" in data:
            raw = {**raw, "seed": data["seed"]}
    return from_mapping(cls, raw, section)


def from_mapping(cls: type[T], raw: dict[str, Any], where: str) -> T:
    """Build dataclass `cls` from `raw`, every error naming `where.key`."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise UserError(
            f"params {where}.{unknown[0]}: unknown key (known: {', '.join(sorted(fields))})"
        )
    values = {k: convert(v, hints[k], f"{where}.{k}") for k, v in raw.items()}
    try:
        return cls(**values)
    except SettingError as exc:
        raise UserError(f"params {where}.{exc.key}: {exc.message}") from None


def as_dict(obj: Any) -> dict[str, Any]:
    """A settings object as plain JSON-ready data (tuples become lists)."""
    return _plain(dataclasses.asdict(obj))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def convert(value: Any, tp: Any, name: str) -> Any:
    """`value` checked (and cast where lossless) against type `tp`; `UserError` otherwise."""

    def bad(expected: str) -> UserError:
        return UserError(f"params {name}: expected {expected}, got {value!r}")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise bad("a value")
        rest = [a for a in args if a is not type(None)]
        errors = []
        for a in rest:
            try:
                return convert(value, a, name)
            except UserError as exc:
                errors.append(exc)
        raise errors[0]
    if tp is Any:
        return value
    if origin is Literal:
        if value in args:
            return value
        raise bad("one of " + ", ".join(str(a) for a in args))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad("a mapping")
        return from_mapping(tp, value, name)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        if origin is list:
            return [convert(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(v, args[0], f"{name}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad(f"a list of {len(args)} items")
        return tuple(convert(v, a, f"{name}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        return {str(k): convert(v, args[1], f"{name}.{k}") for k, v in value.items()}
    if value is None:
        raise bad("a value")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        num = _number(value)
        if num is not None and num.is_integer():
            return int(num)
        raise bad("an integer")
    if tp is float:
        num = _number(value)
        if num is None:
            raise bad("a number")
        return num
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad("a string")
    raise TypeError(f"settings type {tp!r} of {name} is not supported")


# Sections read by more than one stage ---------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Split:
    """Hash split by image where a dataset ships none: Visual Genome, Flickr30k without
    `dataset_flickr30k.json`, QA tables without a split column. One definition, so that
    the CLIP bootstrap and `embed` can never disagree on what is test."""

    SECTION: ClassVar[str] = "split"
    val_fraction: float = 0.1  # share of images in val
    test_fraction: float = 0.1  # share of images in test

    def __post_init__(self) -> None:
        for key in ("val_fraction", "test_fraction"):
            check(0 <= getattr(self, key) < 1, key, "must be in [0, 1)")
        check(self.val_fraction + self.test_fraction < 1, "test_fraction",
              "val_fraction + test_fraction must be < 1")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Answers:
    """Answer vocabulary of a QA table, counted on its train split."""

    SECTION: ClassVar[str] = "answers"
    top_k: int = 1000  # most frequent train answers kept
    min_count: int = 1  # ... that occur at least this often

    def __post_init__(self) -> None:
        check(self.top_k >= 1, "top_k", "must be >= 1")
        check(self.min_count >= 1, "min_count", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class Bootstrap:
    """The 95% intervals of the evaluations: a percentile bootstrap over test items (images,
    questions), seeded by the top-level `seed` (`pipeline.metrics.bootstrap`)."""

    SECTION: ClassVar[str] = "bootstrap"
    resamples: int = 1000  # resamples of the test items (0: no intervals)
    level: float = 0.95  # coverage of the percentile interval
    seed: int = 0  # top-level `seed`: the resamples

    def __post_init__(self) -> None:
        check(self.resamples >= 0, "resamples", "must be >= 0 (0: no intervals)")
        check(0 < self.level < 1, "level", "must be in (0, 1)")
