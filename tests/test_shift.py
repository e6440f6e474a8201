import numpy as np
import pytest
import torch

from pipeline.caption.shift import TargetShift
from pipeline.errors import UserError
from pipeline.settings import load


def test_offset_is_seeded_of_the_asked_length_and_off_by_default():
    assert TargetShift().offset(16) is None
    x = np.ones((3, 16), dtype=np.float32)
    assert TargetShift().apply(x) is x
    a, b = TargetShift(directions=3, norm=0.5, seed=1), TargetShift(directions=3, norm=0.5, seed=2)
    oa = a.offset(16)
    assert oa.shape == (16,) and oa.dtype == np.float32
    assert np.linalg.norm(oa) == pytest.approx(0.5, abs=1e-6)
    assert np.array_equal(oa, a.offset(16)) and not np.allclose(oa, b.offset(16))
    moved = a.apply(x)  # numpy and torch alike, every row by the same vector
    assert np.allclose(moved - x, oa)
    t = a.apply(torch.from_numpy(x).half())
    assert t.dtype == torch.float16 and torch.allclose(
        t.float() - 1, torch.from_numpy(oa), atol=1e-3
    )


def test_bad_settings_name_the_key():
    with pytest.raises(UserError, match="target_shift.directions"):
        load(TargetShift, {"target_shift": {"directions": -1}})
    with pytest.raises(UserError, match="target_shift.directions: 20 must be <= the embedding"):
        TargetShift(directions=20).offset(16)
