"""Integer-only numerics of the vector unit: the executable specification, and the
fixed-point parameters the compiler derives from real scales.

Everything here is pure numpy on int64 arrays (no floating point in any operation; floats
appear only in the ``*_params`` helpers that turn real scales into parameter words). The
bit-exact model (:mod:`weft.sim.golden`) calls these functions for the ``vbin``, ``vmap``
and ``vrow`` instructions, the compiler calls the ``*_params`` helpers, and the RTL vector
unit's tests compare against the same functions. docs/numerics.md explains each algorithm
and its error.

Why this module lives in :mod:`weft.hw`: it is a contract between the RTL generator (which
needs the coefficient ROMs and bit widths), the compiler (parameter derivation) and the
bit-exact model. The layering lets ``compiler`` and ``sim.golden`` import ``hw`` but not
the other way round, so the lowest layer every user can reach is ``hw``. It imports only
numpy and :mod:`weft.hw.isa`.

Hardware shape assumed by every algorithm: per lane, integer multiply (at most 32 x 16
then 48 x 16 bits), add, shift, compare, and a small coefficient ROM indexed by the top
bits of a value (the piecewise-quadratic unit, :func:`pq_eval`); per row, one sequential
divider and one sequential (digit-by-digit) integer square root, each used at most once.

Rounding rules (two, both exact):

* :func:`rshr` (``round half up``): ``floor((v + 2^(s-1)) / 2^s)``; used for every
  internal fixed-point step (one adder before the shifter);
* :func:`rshift_half_even` (round half to even, as REQUANT): used for every final
  conversion to the output type, which then saturates.
"""

from __future__ import annotations

import math

import numpy as np

from weft.hw.isa import REQUANT_MULT_BITS, REQUANT_SHIFT_BITS

__all__ = [
    "VectorParamError",
    "INT8", "UINT8", "INT32",
    "rshr", "rshift_half_even", "saturate", "bit_length", "isqrt",
    "pack_scale_word", "unpack_scale_word", "fixed_point", "fixed_point_scale", "requantize",
    "PQTable", "EXP2_TABLE", "GELU_TABLE", "SILU_TABLE", "pq_eval",
    "EXP_FRAC_BITS", "PQ_FRAC_BITS", "PQ_OUT_BITS", "SOFTMAX_RECIP_BITS",
    "NORM_Z_BITS", "NORM_SHIFT_MIN", "NORM_SHIFT_MAX", "ADD_ALIGN_MAX",
    "softmax_output_scale", "softmax_levels", "SOFTMAX_WIDE_LEVELS",
    "vec_add", "vec_mul", "vec_rope", "vec_scale", "vec_gelu", "vec_silu",
    "row_max", "row_sum", "softmax_rows", "layernorm_rows", "rmsnorm_rows",
    "softmax_mask",
    "add_params", "mul_params", "rope_params", "rope_table", "scale_params", "gelu_params", "silu_params",
    "softmax_params", "layernorm_params", "rmsnorm_params", "param_rows",
]

INT8 = (-128, 127)
UINT8 = (0, 255)
INT32 = (-(1 << 31), (1 << 31) - 1)

#: Fraction bits of the piecewise-quadratic unit's input (per segment) and output.
PQ_FRAC_BITS = 14
PQ_OUT_BITS = 15
#: Fraction bits of the base-2 exponent in softmax.
EXP_FRAC_BITS = 17
#: Softmax reciprocal: R = floor(Q * 2^32 / sum).
SOFTMAX_RECIP_BITS = 32
#: Levels of a wide softmax (``vrow softmax`` with ``wide``): int32 probabilities at 1/2047 in the
#: accumulator, 16x the resolution of int8 and exactly the range of a two-digit tensor
#: (``16 hi + lo``, both int8), so ``P v`` can stream them as two int8 planes.
SOFTMAX_WIDE_LEVELS = 2047
#: Normalised value z' = e / sqrt(V) in Q.20 (|z'| <= 1).
NORM_Z_BITS = 20
NORM_SHIFT_MIN, NORM_SHIFT_MAX = 16, 40
#: Largest difference between the two shifts of an add (alignment shifter width).
ADD_ALIGN_MAX = 15
_NORM_E_BITS = 15  # normalised deviations e fit 15 bits plus sign
_NORM_RECIP_BITS = 56


class VectorParamError(ValueError):
    """A parameter word or operand outside what the vector unit accepts."""


# ---------------------------------------------------------------------- primitives
def rshr(value, shift) -> np.ndarray:
    """Round-half-up right shift: ``floor((value + 2^(shift-1)) / 2^shift)``; shift 0 is exact."""
    value = np.asarray(value, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    half = np.where(shift > 0, np.int64(1) << np.maximum(shift - 1, 0), 0)
    return (value + half) >> shift


def rshift_half_even(value, shift) -> np.ndarray:
    """``value / 2**shift`` rounded to nearest, ties to even, exactly (|value| < 2^62).

    Shifts of 62 or more give the same result as 62.
    """
    value = np.asarray(value, dtype=np.int64)
    shift = np.minimum(np.asarray(shift, dtype=np.int64), 62)
    quotient = value >> shift  # floor division by 2**shift
    remainder = value - (quotient << shift)
    half = np.where(shift > 0, np.int64(1) << np.maximum(shift - 1, 0), 0)
    round_up = (shift > 0) & ((remainder > half) | ((remainder == half) & (quotient & 1 == 1)))
    return quotient + round_up


def saturate(value, bounds: tuple[int, int]) -> np.ndarray:
    return np.clip(np.asarray(value, dtype=np.int64), bounds[0], bounds[1])


def bit_length(value) -> np.ndarray:
    """Bits needed for each non-negative value (0 for 0), like ``int.bit_length``."""
    value = np.asarray(value, dtype=np.int64)
    out = np.zeros(value.shape, dtype=np.int64)
    v = value.copy()
    for step in (32, 16, 8, 4, 2, 1):
        big = v >= (np.int64(1) << step)
        out += np.where(big, step, 0)
        v = np.where(big, v >> step, v)
    return out + (v > 0)


def isqrt(value) -> np.ndarray:
    """floor(sqrt(value)) for each non-negative int64, exactly (digit-by-digit in hardware)."""
    flat = np.asarray(value, dtype=np.int64).ravel()
    if np.any(flat < 0):
        raise ValueError("isqrt of a negative value")
    return np.array([math.isqrt(int(v)) for v in flat], dtype=np.int64).reshape(np.shape(value))


def _floor_div(num, den) -> np.ndarray:
    """Exact floor division of non-negative int64 arrays (the per-row sequential divider)."""
    return np.asarray(num, dtype=np.int64) // np.asarray(den, dtype=np.int64)


# ---------------------------------------------------------------------- scale words
def pack_scale_word(multiplier, shift) -> np.ndarray:
    """Scale word(s) as REQUANT packs them: multiplier in bits 15..0, shift in bits 21..16."""
    multiplier = np.asarray(multiplier, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    if np.any((multiplier < 0) | (multiplier >= 1 << REQUANT_MULT_BITS)):
        raise VectorParamError(f"multiplier must be in [0, 2^{REQUANT_MULT_BITS})")
    if np.any((shift < 0) | (shift >= 1 << REQUANT_SHIFT_BITS)):
        raise VectorParamError(f"shift must be in [0, 2^{REQUANT_SHIFT_BITS})")
    return (multiplier | (shift << REQUANT_MULT_BITS)).astype(np.int32)


def unpack_scale_word(word, what: str = "scale word") -> tuple[int, int]:
    w = int(word) & 0xFFFFFFFF
    if w >> (REQUANT_MULT_BITS + REQUANT_SHIFT_BITS):
        raise VectorParamError(f"{what} 0x{w:08x} has reserved bits [31:22] set")
    return w & ((1 << REQUANT_MULT_BITS) - 1), (w >> REQUANT_MULT_BITS) & ((1 << REQUANT_SHIFT_BITS) - 1)


def fixed_point_scale(scale, *, max_shift: int = (1 << REQUANT_SHIFT_BITS) - 1) -> tuple[np.ndarray, np.ndarray]:
    """Nearest ``multiplier * 2**-shift`` to each non-negative real ``scale``.

    The multiplier is normalised into [2**15, 2**16) where the shift range allows, which
    keeps 16 significant bits (relative error at most 2**-16). Scales too small for the
    largest shift become the nearest representable value (0 when even that rounds away).
    """
    scale = np.atleast_1d(np.asarray(scale, dtype=np.float64))
    if np.any(~np.isfinite(scale)) or np.any(scale < 0):
        raise VectorParamError("scales must be finite and non-negative")
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
        raise VectorParamError(f"scale {scale.max()} is too large for a 16-bit multiplier (limit {top - 1})")
    return multiplier, shift


def fixed_point(real: float, *, what: str = "scale", max_shift: int = 63) -> tuple[int, int]:
    """:func:`fixed_point_scale` for one real, as Python ints; errors name ``what``."""
    try:
        m, s = fixed_point_scale(float(real), max_shift=max_shift)
    except VectorParamError as exc:
        raise VectorParamError(f"{what}: {exc} (got {real!r})") from None
    return int(m[0]), int(s[0])


def requantize(x, bias, scale_word, relu: bool = False) -> np.ndarray:
    """The REQUANT operation: bias, fixed-point scale, round half to even, saturate to int8, ReLU.

    ``bias`` and ``scale_word`` broadcast along the last axis (one per output channel).
    """
    words = np.asarray(scale_word, dtype=np.int64) & 0xFFFFFFFF
    if np.any(words >> (REQUANT_MULT_BITS + REQUANT_SHIFT_BITS)):
        raise VectorParamError("requant scale word has reserved bits [31:22] set")
    mult = words & ((1 << REQUANT_MULT_BITS) - 1)
    shift = (words >> REQUANT_MULT_BITS) & ((1 << REQUANT_SHIFT_BITS) - 1)
    total = np.asarray(x, dtype=np.int64) + np.asarray(bias, dtype=np.int64)  # 33 bits, no wrap
    y = np.clip(rshift_half_even(total * mult, shift), -128, 127)
    if relu:
        y = np.maximum(y, 0)
    return y.astype(np.int8)


# ---------------------------------------------------------------------- piecewise quadratic unit
class PQTable:
    """A coefficient ROM: ``segments`` quadratics, each on one segment of width 1 (the input
    is in Q.``PQ_FRAC_BITS`` segment units). Inputs at or past the last segment give ``end``."""

    def __init__(self, name: str, coeffs: list[list[int]], end: int, segment_width: float, reference):
        self.name = name
        self.coeffs = np.array(coeffs, dtype=np.int64)
        self.end = int(end)
        self.segment_width = float(segment_width)  # real input per segment, for parameter derivation
        self.reference = reference  # the real function approximated (for docs/tests)

    @property
    def segments(self) -> int:
        return len(self.coeffs)


def pq_eval(table: PQTable, z) -> np.ndarray:
    """Evaluate the piecewise quadratic at non-negative ``z`` (Q.14 segment units), result Q.15:

    ``seg = z >> 14``, ``r = z & 0x3fff``; ``c0[seg] + rshr(r * (c1[seg] + rshr(r * c2[seg], 14)), 14)``;
    ``table.end`` when ``seg >= segments``.
    """
    z = np.asarray(z, dtype=np.int64)
    seg = z >> PQ_FRAC_BITS
    r = z & ((1 << PQ_FRAC_BITS) - 1)
    inside = seg < table.segments
    c = table.coeffs[np.minimum(seg, table.segments - 1)]
    value = c[..., 0] + rshr(r * (c[..., 1] + rshr(r * c[..., 2], PQ_FRAC_BITS)), PQ_FRAC_BITS)
    return np.where(inside, value, table.end)


def _phi(x):
    return 0.5 * (1.0 + np.vectorize(math.erf)(np.asarray(x, dtype=np.float64) / math.sqrt(2.0)))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=np.float64)))


def _exp2neg(x):
    return np.exp2(-np.asarray(x, dtype=np.float64))


# Coefficients: least squares on 64 Chebyshev nodes per segment, rounded to integers
# (``fit_pq_table`` regenerates them); segment 0 has c0 pinned to the exact value at 0, so
# g(0) = 1/2 (GELU, SiLU) and 2^0 = 1 (exp2) exactly.
#: 2^-t for t in [0, 1): 8 segments of 1/8. Max error 1.93 * 2^-15.
EXP2_TABLE = PQTable("exp2", [
    [32768, -2838, 118], [30048, -2602, 108], [27554, -2386, 99], [25267, -2188, 91],
    [23170, -2006, 83], [21247, -1840, 76], [19484, -1687, 70], [17867, -1547, 64],
], end=16384, segment_width=1 / 8, reference=_exp2neg)
#: Phi(x) (standard normal CDF) for x in [0, 4): 16 segments of 1/4; 1 beyond. Max error 2.21 * 2^-15.
GELU_TABLE = PQTable("gelu", [
    [16384, 3283, -47], [19618, 3183, -142], [22657, 2894, -209], [25342, 2471, -243],
    [27569, 1980, -244], [29306, 1490, -218], [30579, 1053, -177], [31456, 698, -132],
    [32023, 435, -91], [32368, 255, -58], [32565, 140, -34], [32670, 72, -19],
    [32724, 35, -10], [32749, 16, -5], [32760, 7, -2], [32765, 3, -1],
], end=32768, segment_width=1 / 4, reference=_phi)
#: sigmoid(x) for x in [0, 16): 32 segments of 1/2; 1 beyond. Max error 3.94 * 2^-15.
SILU_TABLE = PQTable("silu", [
    [16384, 4132, -116], [20395, 3879, -317], [23955, 3226, -391], [26791, 2433, -363],
    [28863, 1704, -286], [30283, 1134, -204], [31215, 729, -137], [31808, 458, -88],
    [32179, 284, -55], [32408, 175, -34], [32549, 107, -21], [32635, 65, -13],
    [32687, 40, -8], [32719, 24, -5], [32738, 15, -3], [32750, 9, -2],
    [32757, 5, -1], [32761, 3, -1], [32764, 2, 0], [32766, 1, 0],
    [32767, 1, 0], [32767, 0, 0], [32767, 0, 0], [32768, 0, 0],
    [32768, 0, 0], [32768, 0, 0], [32768, 0, 0], [32768, 0, 0],
    [32768, 0, 0], [32768, 0, 0], [32768, 0, 0], [32768, 0, 0],
], end=32768, segment_width=1 / 2, reference=_sigmoid)


def fit_pq_table(reference, segments: int, width: float, pin0: int | None = None) -> list[list[int]]:
    """How the tables above were made (float; not part of any operation)."""
    t = (np.cos(np.pi * (np.arange(64) + 0.5) / 64) + 1) / 2
    basis = np.stack([np.ones_like(t), t, t * t], axis=1)
    out = []
    for k in range(segments):
        y = reference((k + t) * width)
        if k == 0 and pin0 is not None:  # value at 0 fixed exactly; fit the other two coefficients
            a, *_ = np.linalg.lstsq(basis[:, 1:], y - pin0 / 2 ** PQ_OUT_BITS, rcond=None)
            a = [pin0 / 2 ** PQ_OUT_BITS, *a]
        else:
            a, *_ = np.linalg.lstsq(basis, y, rcond=None)
        out.append([int(round(v * 2 ** PQ_OUT_BITS)) for v in a])
    return out


# ---------------------------------------------------------------------- element-wise operations
def _check_one_wide(a_wide: bool, b_wide: bool, what: str) -> None:
    if a_wide and b_wide:
        raise VectorParamError(f"{what}: at most one operand may be int32 (accumulator)")


def vec_add(a, b, word_a, word_b, out: tuple[int, int]) -> np.ndarray:
    """``sat(round_half_even(a * Ma / 2^sa + b * Mb / 2^sb))`` exactly: with s = max(sa, sb),
    ``rhe((a * Ma << (s - sa)) + (b * Mb << (s - sb)), s)``; the shifts may differ by at most
    :data:`ADD_ALIGN_MAX` (so the aligned sum stays below 2^63)."""
    ma, sa = unpack_scale_word(word_a, "add scale word a")
    mb, sb = unpack_scale_word(word_b, "add scale word b")
    if abs(sa - sb) > ADD_ALIGN_MAX:
        raise VectorParamError(f"add: the shifts of the two scale words differ by more than {ADD_ALIGN_MAX} "
                               f"(got {sa} and {sb})")
    s = max(sa, sb)
    total = ((np.asarray(a, dtype=np.int64) * ma) << (s - sa)) + ((np.asarray(b, dtype=np.int64) * mb) << (s - sb))
    return saturate(rshift_half_even(total, s), out)


def vec_mul(a, b, word, out: tuple[int, int]) -> np.ndarray:
    """``sat(round_half_even(a * b * M / 2^s))``; at most one operand is int32 (|a*b| < 2^38)."""
    m, s = unpack_scale_word(word, "mul scale word")
    return saturate(rshift_half_even(np.asarray(a, dtype=np.int64) * np.asarray(b, dtype=np.int64) * m, s), out)


def vec_rope(x, table, word, out: tuple[int, int]) -> np.ndarray:
    """Rotary embedding on interleaved pairs along the last axis (even length).

    ``table`` has the shape of ``x``: ``table[..., 2i] = cos``, ``table[..., 2i+1] = sin``
    (fixed point, e.g. Q.14 from :func:`rope_table`). For each pair (x0, x1), (c, s):
    ``y0 = sat(rhe((x0*c - x1*s) * M, sh))``, ``y1 = sat(rhe((x0*s + x1*c) * M, sh))``.
    """
    m, sh = unpack_scale_word(word, "rope scale word")
    x = np.asarray(x, dtype=np.int64)
    t = np.asarray(table, dtype=np.int64)
    if x.shape[-1] % 2:
        raise VectorParamError("rope: rows need an even number of elements")
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = t[..., 0::2], t[..., 1::2]
    y = np.empty_like(x)
    y[..., 0::2] = rshift_half_even((x0 * c - x1 * s) * m, sh)
    y[..., 1::2] = rshift_half_even((x0 * s + x1 * c) * m, sh)
    return saturate(y, out)


def vec_scale(x, word, out: tuple[int, int]) -> np.ndarray:
    """Type conversion / rescale: ``sat(round_half_even(x * M / 2^s))``."""
    m, s = unpack_scale_word(word, "scale word")
    return saturate(rshift_half_even(np.asarray(x, dtype=np.int64) * m, s), out)


def _gated(table: PQTable, x, word_in, word_out, out) -> np.ndarray:
    mz, sz = unpack_scale_word(word_in, f"{table.name} input scale word")
    mo, so = unpack_scale_word(word_out, f"{table.name} output scale word")
    x = np.asarray(x, dtype=np.int64)
    z = rshr(np.abs(x) * mz, sz)  # |x| in Q.14 segment units (< 2^48)
    g = pq_eval(table, z)  # g(|x|) in Q.15
    g = np.where(x < 0, (1 << PQ_OUT_BITS) - g, g)  # g(-x) = 1 - g(x)
    return saturate(rshift_half_even(x * g * mo, so + PQ_OUT_BITS), out)  # |x*g*M| < 2^62


def vec_gelu(x, word_in, word_out, out: tuple[int, int] = INT8) -> np.ndarray:
    """GELU(x) = x * Phi(x): ``y = sat(rhe(x * g * Mo, so + 15))`` with g = Phi(|x|) from
    :data:`GELU_TABLE` (mirrored for x < 0), ``z = rshr(|x| * Mz, sz)``."""
    return _gated(GELU_TABLE, x, word_in, word_out, out)


def vec_silu(x, word_in, word_out, out: tuple[int, int] = INT8) -> np.ndarray:
    """SiLU(x) = x * sigmoid(x), as :func:`vec_gelu` with :data:`SILU_TABLE`."""
    return _gated(SILU_TABLE, x, word_in, word_out, out)


# ---------------------------------------------------------------------- row operations
def row_max(x) -> np.ndarray:
    return np.asarray(x, dtype=np.int64).max(axis=-1)


def row_sum(x) -> np.ndarray:
    """Exact sum, saturated to int32."""
    return saturate(np.asarray(x, dtype=np.int64).sum(axis=-1), INT32)


def softmax_levels(unsigned: bool = False, wide: bool = False) -> int:
    """The output value of probability 1: 2047 (``wide``, int32), 255 (uint8) or 127 (int8)."""
    return SOFTMAX_WIDE_LEVELS if wide else 255 if unsigned else 127


def softmax_output_scale(unsigned: bool, wide: bool = False) -> float:
    """Real value of one output step: 1/2047 (``wide``), 1/255 (uint8) or 1/127 (int8)."""
    return 1.0 / softmax_levels(unsigned, wide)


def softmax_mask(rows: int, length: int, kv_len: int, causal: bool, offset: int) -> np.ndarray:
    """Valid keys: ``j < kv_len`` and, when causal, ``j <= r + offset`` (signed compares)."""
    j = np.arange(length, dtype=np.int64)[None, :]
    r = np.arange(rows, dtype=np.int64)[:, None]
    valid = np.broadcast_to(j < kv_len, (rows, length))
    if causal:
        valid = valid & (j <= r + offset)
    return valid


def softmax_rows(x, word, valid, *, unsigned: bool = False, wide: bool = False) -> np.ndarray:
    """Integer softmax along the last axis of int32 scores ``x`` (``valid``: boolean mask).

    Per row: ``m = max`` of valid x; for valid j ``u = min(rshr((m - x) * M, s), 2^22 - 1)``
    (base-2 exponent, Q.17); ``e = rshr(pq_exp2(u & 0x1ffff), u >> 17)`` (Q.15, masked: 0);
    ``S = sum e``; ``R = floor(Q * 2^32 / S)`` (one division per row, Q =
    :func:`softmax_levels`: 2047 wide, 255 or 127); ``p = min(Q, rhe(e * R, 32))``. Rows with
    no valid key give 0 everywhere.
    """
    m_in, s_in = unpack_scale_word(word, "softmax scale word")
    x = np.asarray(x, dtype=np.int64)
    valid = np.broadcast_to(np.asarray(valid, dtype=bool), x.shape)
    q = softmax_levels(unsigned, wide)
    big = np.int64(-(1 << 40))
    m = np.where(valid, x, big).max(axis=-1, keepdims=True)
    any_valid = valid.any(axis=-1, keepdims=True)
    d = np.where(valid, m - x, 0)  # 0 .. 2^32 - 1
    u = np.minimum(rshr(d * m_in, s_in), (1 << (EXP_FRAC_BITS + 5)) - 1)
    frac = u & ((1 << EXP_FRAC_BITS) - 1)
    # 8 segments per unit: the 17 fraction bits are already Q.14 segment units.
    e = rshr(pq_eval(EXP2_TABLE, frac), u >> EXP_FRAC_BITS)
    e = np.where(valid, e, 0)
    total = e.sum(axis=-1, keepdims=True)  # >= 2^15 when any key is valid, < 2^31
    recip = _floor_div(np.int64(q) << SOFTMAX_RECIP_BITS, np.maximum(total, 1))
    p = np.minimum(rshift_half_even(e * recip, SOFTMAX_RECIP_BITS), q)
    return np.where(any_valid & valid, p, 0)


def _norm_core(x, centered: bool) -> np.ndarray:
    """z' = e / sqrt(V) in Q.20 for each row (0 where the row is constant)."""
    x = np.asarray(x, dtype=np.int64)
    length = x.shape[-1]
    if centered:
        s1 = x.sum(axis=-1, keepdims=True)  # exact, < 2^47
        spread = x.max(axis=-1, keepdims=True) - x.min(axis=-1, keepdims=True)
        d = length * x - s1  # L * (x - mean), exact, < 2^48
        bits = int(bit_length(np.int64(length))) + bit_length(spread)
    else:
        d = x
        bits = bit_length(np.abs(x).max(axis=-1, keepdims=True))
    k = bits - _NORM_E_BITS
    e = np.where(k > 0, rshr(d, np.maximum(k, 0)), d << np.maximum(-k, 0))  # |e| <= 2^15
    v = (e * e).sum(axis=-1, keepdims=True)  # < 2^46 for L < 2^16
    s = isqrt(v << 16)  # sqrt(V) * 2^8 (one square root per row)
    inv = _floor_div(np.int64(1) << _NORM_RECIP_BITS, np.maximum(s, 1))  # one division per row
    z = rshr(e * inv, _NORM_RECIP_BITS - 8 - NORM_Z_BITS)
    return np.where(v > 0, z, 0)


def _norm_out(z, shift: int, gain, bias, out) -> np.ndarray:
    if not NORM_SHIFT_MIN <= shift <= NORM_SHIFT_MAX:
        raise VectorParamError(f"norm shift {shift} outside {NORM_SHIFT_MIN}..{NORM_SHIFT_MAX}")
    total = z * np.asarray(gain, dtype=np.int64) + (np.asarray(bias, dtype=np.int64) << (shift - 16))
    return saturate(rshift_half_even(total, shift), out)


def layernorm_rows(x, shift: int, gain, beta, out: tuple[int, int] = INT8) -> np.ndarray:
    """LayerNorm along the last axis with affine: ``y = sat(rhe(z' * G + (B << (sh - 16)), sh))``.

    ``z'`` (Q.20) from: ``d = L*x - sum(x)``; ``k = bitlen(L) + bitlen(max - min) - 15``;
    ``e = rshr(d, k)`` (or ``d << -k``); ``V = sum e^2``; ``s = isqrt(V << 16)``;
    ``inv = floor(2^56 / s)``; ``z' = rshr(e * inv, 28)``; constant rows give z' = 0.
    ``G`` = gamma * sqrt(L) / out_scale * 2^(sh - 20), ``B`` = beta / out_scale * 2^16.
    """
    return _norm_out(_norm_core(x, True), shift, gain, beta, out)


def rmsnorm_rows(x, shift: int, gain, out: tuple[int, int] = INT8) -> np.ndarray:
    """RMSNorm along the last axis: as :func:`layernorm_rows` with ``d = x``,
    ``k = bitlen(max |x|) - 15`` and no bias."""
    return _norm_out(_norm_core(x, False), shift, gain, 0, out)


# ---------------------------------------------------------------------- parameter derivation
def param_rows(words, cols: int) -> np.ndarray:
    """Lay header words out as accumulator rows (word i in row i // cols, column i % cols)."""
    words = np.asarray(words, dtype=np.int64)
    rows = max(1, -(-len(words) // cols))
    out = np.zeros(rows * cols, dtype=np.int64)
    out[:len(words)] = words
    return (out & 0xFFFFFFFF).astype(np.uint32).view(np.int32).reshape(rows, cols)


def _word(real: float, what: str, max_shift: int = 63) -> int:
    m, s = fixed_point(real, what=what, max_shift=max_shift)
    return int(pack_scale_word(m, s))


def add_params(a_scale: float, b_scale: float, out_scale: float, *, cols: int) -> np.ndarray:
    """Words for ``vbin func=add``: y = a * a_scale/out_scale + b * b_scale/out_scale.

    Each ratio gets its own 16-bit multiplier in [2^15, 2^16); when the ratios are more than
    2^15 apart the smaller one's shift is capped at the other's + 15 (fewer significant bits
    for a term that contributes under 2^-15 of the other per unit)."""
    (ma, sa), (mb, sb) = fixed_point(a_scale / out_scale, what="add ratio a"), fixed_point(b_scale / out_scale, what="add ratio b")
    if sa - sb > ADD_ALIGN_MAX:
        sa = sb + ADD_ALIGN_MAX
        ma = round(a_scale / out_scale * 2.0 ** sa)
    elif sb - sa > ADD_ALIGN_MAX:
        sb = sa + ADD_ALIGN_MAX
        mb = round(b_scale / out_scale * 2.0 ** sb)
    return param_rows([pack_scale_word(ma, sa), pack_scale_word(mb, sb)], cols)


def mul_params(a_scale: float, b_scale: float, out_scale: float, *, cols: int) -> np.ndarray:
    """Words for ``vbin func=mul``: y = a * b * a_scale * b_scale / out_scale."""
    return param_rows([_word(a_scale * b_scale / out_scale, "mul scale")], cols)


def rope_table(positions, head_dim: int, *, base: float = 10000.0, frac_bits: int = 14) -> np.ndarray:
    """Interleaved cos/sin table ``[len(positions), head_dim]`` in Q.``frac_bits`` (int32):
    element 2i holds cos(pos * base^(-2i/head_dim)), element 2i+1 the sin."""
    if head_dim % 2:
        raise VectorParamError("rope head_dim must be even")
    pos = np.asarray(positions, dtype=np.float64)[:, None]
    freq = base ** (-np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angle = pos * freq[None, :]
    out = np.empty((pos.shape[0], head_dim), dtype=np.int64)
    out[:, 0::2] = np.rint(np.cos(angle) * (1 << frac_bits))
    out[:, 1::2] = np.rint(np.sin(angle) * (1 << frac_bits))
    return out.astype(np.int32)


def rope_params(x_scale: float, out_scale: float, *, frac_bits: int = 14, cols: int) -> np.ndarray:
    """Words for ``vbin func=rope`` with a table from :func:`rope_table`."""
    return param_rows([_word(x_scale / out_scale / (1 << frac_bits), "rope scale")], cols)


def scale_params(in_scale: float, out_scale: float, *, cols: int) -> np.ndarray:
    """Words for ``vmap func=scale`` (type conversion): y = x * in_scale / out_scale."""
    return param_rows([_word(in_scale / out_scale, "conversion scale")], cols)


def _gated_params(table: PQTable, in_scale: float, out_scale: float, cols: int) -> np.ndarray:
    z_real = in_scale / table.segment_width * (1 << PQ_FRAC_BITS)  # |x| -> Q.14 segment units
    return param_rows([_word(z_real, f"{table.name} input scale"),
                       _word(in_scale / out_scale, f"{table.name} output scale", max_shift=63 - PQ_OUT_BITS)], cols)


def gelu_params(in_scale: float, out_scale: float, *, cols: int) -> np.ndarray:
    """Words for ``vmap func=gelu``: input and output real scales."""
    return _gated_params(GELU_TABLE, in_scale, out_scale, cols)


def silu_params(in_scale: float, out_scale: float, *, cols: int) -> np.ndarray:
    """Words for ``vmap func=silu``."""
    return _gated_params(SILU_TABLE, in_scale, out_scale, cols)


def softmax_params(input_scale: float, *, kv_len: int, causal_offset: int = 0, cols: int) -> np.ndarray:
    """Words for ``vrow func=softmax``: [scale word, kv_len, causal offset].

    The scale word maps a score difference to a base-2 exponent in Q.17:
    ``input_scale * log2(e) * 2^17`` (needs input_scale below about 0.346)."""
    word = _word(input_scale * math.log2(math.e) * (1 << EXP_FRAC_BITS), "softmax input scale")
    for name, value in (("kv_len", kv_len), ("causal_offset", causal_offset)):
        if not INT32[0] <= int(value) <= INT32[1]:
            raise VectorParamError(f"{name}={value} does not fit int32")
    return param_rows([word, int(kv_len), int(causal_offset)], cols)


def _norm_params(in_scale, gamma, beta, out_scale, cols: int) -> np.ndarray:
    gamma = np.asarray(gamma, dtype=np.float64).ravel()
    length = gamma.size
    if length < 1:
        raise VectorParamError("norm needs at least one channel")
    gain_real = gamma * math.sqrt(length) / out_scale  # z' is e / sqrt(V) = (x - mean) / (std sqrt(L))
    peak = float(np.abs(gain_real).max())
    shift = NORM_Z_BITS + 14 - (math.floor(math.log2(peak)) if peak > 0 else 0)  # max |G| in [2^14, 2^15)
    shift = min(max(shift, NORM_SHIFT_MIN), NORM_SHIFT_MAX)
    gain = np.rint(gain_real * 2.0 ** (shift - NORM_Z_BITS))
    if np.any(np.abs(gain) >= 1 << 31):
        raise VectorParamError("norm gain too large for int32 (gamma / out_scale too large)")
    n = -(-length // cols)
    rows = [param_rows([shift], cols)]
    padded = np.zeros(n * cols, dtype=np.int64)
    padded[:length] = gain
    rows.append(padded.reshape(n, cols).astype(np.int32))
    if beta is not None:
        b = np.rint(np.asarray(beta, dtype=np.float64).ravel() / out_scale * (1 << 16))
        if b.size != length:
            raise VectorParamError("beta and gamma lengths differ")
        b = np.clip(b, INT32[0], INT32[1])
        padded = np.zeros(n * cols, dtype=np.int64)
        padded[:length] = b
        rows.append(padded.reshape(n, cols).astype(np.int32))
    return np.concatenate(rows, axis=0)


def layernorm_params(in_scale: float, gamma, beta, out_scale: float, *, cols: int) -> np.ndarray:
    """Parameter rows for ``vrow func=layernorm``: header row (shift), ceil(L/cols) rows of G,
    ceil(L/cols) rows of B. ``in_scale`` does not enter (normalisation is scale-free); it
    is accepted so every helper takes the same real scales."""
    return _norm_params(in_scale, gamma, beta, out_scale, cols)


def rmsnorm_params(in_scale: float, weight, out_scale: float, *, cols: int) -> np.ndarray:
    """Parameter rows for ``vrow func=rmsnorm``: header row (shift), ceil(L/cols) rows of G."""
    return _norm_params(in_scale, weight, None, out_scale, cols)
