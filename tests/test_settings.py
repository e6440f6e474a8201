"""The settings loader: typed fields, nested sections, top-level seed, one-line errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import pytest

from pipeline.errors import UserError
from pipeline.settings import Split, check, load, read_params


@dataclass(frozen=True)
class Inner:
    width: int = 8  # a width
    loss: Literal["mse", "ce"] = "mse"  # a choice


@dataclass(frozen=True)
class Demo:
    SECTION: ClassVar[str] = "demo"
    seed: int = 0  # top-level seed
    lr: float = 1e-3  # a float
    steps: int = 10  # an int
    on: bool = True  # a bool
    name: str = "x"  # a string
    cap: int | None = None  # None means no cap
    hidden: list[int] = field(default_factory=lambda: [4])  # a list
    size: tuple[int, int] = (2, 3)  # a pair
    model: Inner = field(default_factory=Inner)  # a nested section

    def __post_init__(self) -> None:
        check(self.steps >= 1, "steps", "must be >= 1")


def error(data: dict) -> str:
    with pytest.raises(UserError) as exc:
        load(Demo, data)
    assert "\n" not in str(exc.value)
    return str(exc.value)


def test_defaults_when_section_missing():
    assert load(Demo, {}) == Demo()


def test_values_cast_and_nested():
    s = load(
        Demo,
        {
            "seed": 7,
            "demo": {"lr": "5e-4", "steps": 3.0, "cap": 4, "hidden": [1, "2"],
                     "size": [5, 6], "model": {"loss": "ce"}},
        },
    )  # fmt: skip
    assert s.seed == 7 and s.lr == 5e-4 and s.steps == 3 and s.cap == 4
    assert s.hidden == [1, 2] and s.size == (5, 6)
    assert s.model == Inner(width=8, loss="ce")


@pytest.mark.parametrize(
    "section, key",
    [
        ({"stpes": 3}, "demo.stpes: unknown key"),
        ({"model": {"widht": 3}}, "demo.model.widht: unknown key"),
        ({"lr": "fast"}, "demo.lr: expected a number"),
        ({"steps": 2.5}, "demo.steps: expected an integer"),
        ({"on": "yes"}, "demo.on: expected true or false"),
        ({"name": 3}, "demo.name: expected a string"),
        ({"hidden": 4}, "demo.hidden: expected a list"),
        ({"hidden": ["a"]}, "demo.hidden[0]: expected an integer"),
        ({"size": [1]}, "demo.size: expected a list of 2 items"),
        ({"model": {"loss": "l1"}}, "demo.model.loss: expected one of mse, ce"),
        ({"model": 3}, "demo.model: expected a mapping"),
        ({"steps": 0}, "demo.steps: must be >= 1"),
        ({"steps": None}, "demo.steps: expected a value"),
        ({"seed": 1}, "demo.seed: set the top-level `seed`"),
    ],
)
def test_one_line_error_names_the_key(section, key):
    assert key in error({"demo": section})


def test_section_must_be_a_mapping():
    assert "demo: expected a mapping" in error({"demo": [1, 2]})


def test_shared_split_checks(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("split:\n  val_fraction: 0.6\n  test_fraction: 0.5\n")
    with pytest.raises(UserError, match="split.test_fraction"):
        load(Split, bad)


def test_params_file_errors(tmp_path):
    with pytest.raises(UserError, match="params file not found"):
        read_params(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1,\n")
    with pytest.raises(UserError, match="cannot parse"):
        read_params(broken)


def test_setting_error_survives_pickling():
    """train_caption's variants may raise it in a child process: it must cross back whole."""
    import pickle

    from pipeline.settings import SettingError

    back = pickle.loads(pickle.dumps(SettingError("model.width", "must be >= 1")))
    assert (back.key, back.message, str(back)) == ("model.width", "must be >= 1", "must be >= 1")
