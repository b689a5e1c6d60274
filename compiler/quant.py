"""Fixed-point helpers shared by every pass that emits REQUANT parameters."""

from __future__ import annotations

import numpy as np

from weft.hw.isa import REQUANT_MULT_BITS, REQUANT_SHIFT_BITS

__all__ = ["fixed_point_scale"]


def fixed_point_scale(scale: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Nearest ``multiplier * 2**-shift`` to each positive real ``scale``.

    The multiplier is normalised into [2**15, 2**16) where the shift range allows, which
    keeps 16 significant bits (relative error below 2**-16). Scales too small for the
    largest shift become the smallest representable value, or 0 when even that rounds away.
    """
    scale = np.atleast_1d(np.asarray(scale, dtype=np.float64))
    if np.any(~np.isfinite(scale)) or np.any(scale < 0):
        raise ValueError("requantization scales must be finite and non-negative")
    max_shift = (1 << REQUANT_SHIFT_BITS) - 1
    top = 1 << REQUANT_MULT_BITS
    with np.errstate(divide="ignore"):
        exponent = np.where(scale > 0, np.floor(np.log2(np.where(scale > 0, scale, 1.0))), 0).astype(np.int64)
    # scale = f * 2**exponent with f in [1, 2): multiplier = f * 2**15, shift = 15 - exponent.
    shift = np.clip(REQUANT_MULT_BITS - 1 - exponent, 0, max_shift)
    multiplier = np.rint(scale * np.exp2(shift)).astype(np.int64)
    overflow = multiplier >= top  # rounding carried into bit 16: drop one bit of shift
    shift = np.where(overflow & (shift > 0), shift - 1, shift)
    multiplier = np.where(overflow, np.rint(scale * np.exp2(shift)), multiplier).astype(np.int64)
    if np.any(multiplier >= top):
        raise ValueError(f"requantization scale {scale.max()} is too large (limit {float(top - 1)})")
    return multiplier, shift
