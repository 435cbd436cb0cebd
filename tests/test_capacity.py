import pytest

from vmoe.moe import compute_capacity


def test_spec_example():
    # S=32, K=2, E=32, factor 1.0 -> ceil(2) = 2 -> rounded up to 4
    assert compute_capacity(32 * 2, 32, 1.0) == 4


@pytest.mark.parametrize(
    "tokens, experts, factor, kwargs, expected",
    [
        (100, 8, 1.05, {}, 16),  # ceil(13.125) = 14 -> 16
        (100, 8, 1.05, {"multiple_of": None}, 14),
        (100, 8, 1.05, {"multiple_of": 0}, 14),
        (100, 8, 1.05, {"ceil_or_round": "round", "multiple_of": None}, 13),
        (394, 8, 1.0, {"multiple_of": 1}, 50),  # ceil(49.25)
        (10, 4, 0.5, {"multiple_of": None}, 2),  # ceil(1.25)
    ],
)
def test_values(tokens, experts, factor, kwargs, expected):
    assert compute_capacity(tokens, experts, factor, **kwargs) == expected


def test_below_one_raises_with_the_numbers():
    with pytest.raises(ValueError, match=r"0 < 1"):
        compute_capacity(4, 64, 0.1, ceil_or_round="round")


@pytest.mark.parametrize("factor", [0.0, -1.0])
def test_bad_factor(factor):
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        compute_capacity(10, 2, factor)


def test_bad_mode():
    with pytest.raises(ValueError, match="'floor'"):
        compute_capacity(10, 2, 1.0, ceil_or_round="floor")
