"""Per-step warmup + decay factors against hand-computed values."""
import math

import pytest

from vmoe.train.schedule import warmup_decay_factor


def f(step, **kw):
    return warmup_decay_factor(step, **{"warmup_steps": 4, "total_steps": 12, **kw})


def test_linear_warmup_starts_above_zero_and_reaches_peak():
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_decay():
    assert f(4) == 1.0                                    # progress 0
    assert f(8) == pytest.approx(0.5)                     # progress 1/2
    assert f(10) == pytest.approx(0.5 * (1 + math.cos(0.75 * math.pi)))  # 0.1464
    assert f(12) == pytest.approx(0.0) and f(50) == pytest.approx(0.0)   # clipped after the end


def test_linear_and_constant_decay_and_floor():
    assert f(6, decay="linear") == pytest.approx(0.75)
    assert f(12, decay="linear", min_lr_ratio=0.1) == pytest.approx(0.1)
    assert f(8, min_lr_ratio=0.2) == pytest.approx(0.2 + 0.8 * 0.5)
    assert f(11, decay="constant") == 1.0
    assert warmup_decay_factor(0, warmup_steps=0, total_steps=1) == 1.0


def test_bad_settings():
    with pytest.raises(ValueError, match="decay"):
        f(0, decay="step")
    with pytest.raises(ValueError, match="min_lr_ratio"):
        f(0, min_lr_ratio=2.0)
    with pytest.raises(ValueError, match="total_steps"):
        warmup_decay_factor(0, warmup_steps=1, total_steps=0)
