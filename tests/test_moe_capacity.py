import pytest

from vmoe.moe import compute_capacity


def test_design_doc_example():
    # S=32, K=2, E=32, factor 1.0 -> ceil(2) = 2 -> rounded up to 4
    assert compute_capacity(32 * 2, 32, 1.0) == 4


@pytest.mark.parametrize(
    "tokens, experts, factor, expected",
    [
        (100, 8, 1.05, 16),  # ceil(13.125) = 14 -> 16
        (394, 8, 1.0, 52),  # ceil(49.25) = 50 -> 52
        (10, 4, 0.5, 4),  # ceil(1.25) = 2 -> 4
        (64, 8, 1.0, 8),  # exactly 8: already a multiple of 4
        (0, 8, 1.0, None),  # no tokens: capacity 0 < 1
    ],
)
def test_values(tokens, experts, factor, expected):
    if expected is None:
        with pytest.raises(ValueError, match=r"ceil\(0 \* 1.0 / 8\) = 0 < 1"):
            compute_capacity(tokens, experts, factor)
    else:
        assert compute_capacity(tokens, experts, factor) == expected


def test_ceil_never_rounds_down_to_zero():
    # 4 * 0.1 / 64 = 0.00625: ceil gives 1 slot (then 4), never 0
    assert compute_capacity(4, 64, 0.1) == 4


@pytest.mark.parametrize("factor", [0.0, -1.0])
def test_bad_factor(factor):
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        compute_capacity(10, 2, factor)
