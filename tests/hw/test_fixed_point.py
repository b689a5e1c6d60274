"""fixed_point_scale: real requantization scales to REQUANT (multiplier, shift) pairs."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weft.hw.vector_numerics import fixed_point_scale

BOUND = Fraction(1, 1 << 16)


def _check(scales: np.ndarray) -> None:
    mult, shift = fixed_point_scale(scales)
    assert mult.shape == shift.shape == scales.shape
    for s, m, k in zip(scales.tolist(), mult.tolist(), shift.tolist()):
        assert 0 <= m < 1 << 16, (s, m)
        assert 0 <= k <= 63, (s, k)
        exact = Fraction(s)  # the float's exact value
        approx = Fraction(m, 1 << k)
        assert abs(approx - exact) <= BOUND * exact, f"scale {s!r}: {m} * 2^-{k} is off by {float(abs(approx - exact) / exact):.3g}"


def test_log_spaced_scales_from_1e_6_to_1e3():
    _check(np.logspace(-6, 3, 4001))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.floats(min_value=1e-6, max_value=1e3, allow_nan=False, allow_infinity=False),
                min_size=1, max_size=32))
def test_random_scales_within_2_to_the_minus_16(values):
    _check(np.array(values, dtype=np.float64))


def test_documented_range_2_to_the_minus_48_up_to_65535():
    # docs/numerics.md: relative error at most 2^-16 for scales between 2^-48 and 2^16.
    _check(np.exp2(np.linspace(-48, 15.99997, 3001)))
    _check(np.array([2.0**-48, 65535.0, 65535.49]))


@pytest.mark.parametrize("scale, mult, shift", [
    (1.0, 32768, 15),              # by hand: 2^15 * 2^-15
    (0.5, 32768, 16),
    (0.75, 49152, 16),             # 0.75 * 2^16
    (2.0**-20, 32768, 35),
    (1 - 2.0**-20, 32768, 15),     # rounds up to 2^16 at shift 16: one bit of shift dropped
    (3.0, 49152, 14),
    (65535.0, 65535, 0),
])
def test_scales_by_hand(scale, mult, shift):
    m, s = fixed_point_scale(scale)
    assert (int(m[0]), int(s[0])) == (mult, shift)


def test_zero_scale_gives_multiplier_zero():
    mult, shift = fixed_point_scale(np.array([0.0, 1.0]))
    assert int(mult[0]) == 0 and 0 <= int(shift[0]) <= 63


def test_multiplier_is_normalised_where_the_shift_allows():
    mult, shift = fixed_point_scale(np.logspace(-6, 3, 500))
    assert np.all((mult >= 1 << 15) & (mult < 1 << 16))
    assert np.all((shift >= 0) & (shift <= 63))


def test_scales_below_the_shift_range():
    mult, shift = fixed_point_scale(np.array([2.0**-70, 1e-30]))
    assert mult.tolist() == [0, 0] and shift.tolist() == [63, 63]
    mult, shift = fixed_point_scale(2.0**-60)
    assert (int(mult[0]), int(shift[0])) == (8, 63)  # 2^-60 = 8 * 2^-63, exactly


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), -1e-9])
def test_invalid_scales(bad):
    with pytest.raises(ValueError, match="finite and non-negative"):
        fixed_point_scale(np.array([1.0, bad]))


@pytest.mark.parametrize("big", [65536.0, 1e6])
def test_too_large_scales(big):
    with pytest.raises(ValueError, match="too large"):
        fixed_point_scale(big)
