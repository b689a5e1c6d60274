"""Bit-exact model: GEMM results against numpy, requantization against exact rational
arithmetic, and the refusal of programs whose result would depend on timing."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weft.compiler.gemm import GemmError, build_gemm_bundle, plan_gemm
from weft.hw.bundle import BundleError
from weft.hw.config import AcceleratorConfig, load_config
from weft.hw.isa import assemble
from weft.hw.vector_numerics import rshift_half_even as round_shift_half_even
from weft.sim.golden import (
    DeadlockError,
    GoldenMachine,
    ProgramError,
    RaceError,
    UninitializedReadError,
    pack_scale_word,
    requantize,
    run_bundle,
)

TINY = load_config("tiny")
DEFAULT = load_config("default")
INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1


# ---------------------------------------------------------------------- independent references
def ref_requant(x: int, bias: int, mult: int, shift: int, relu: bool = False) -> int:
    """REQUANT per docs/numerics.md, in exact rational arithmetic (round() on a Fraction
    rounds half to even)."""
    q = round(Fraction((int(x) + int(bias)) * int(mult), 1 << int(shift)))
    q = min(127, max(-128, q))
    return max(q, 0) if relu else q


def ref_requant_matrix(acc: np.ndarray, bias, mult, shift, relu: bool) -> np.ndarray:
    out = np.empty(acc.shape, dtype=np.int64)
    for (i, j), x in np.ndenumerate(acc):
        out[i, j] = ref_requant(int(x), int(bias[j]), int(mult[j]), int(shift[j]), relu)
    return out


def ref_word(mult, shift) -> np.ndarray:
    """Scale words packed by hand: multiplier in bits 15..0, shift in bits 21..16."""
    return np.array([(int(m) | (int(s) << 16)) for m, s in zip(mult, shift)], dtype=np.uint32).view(np.int32)


def wrap32(value: int) -> int:
    return ((value + (1 << 31)) % (1 << 32)) - (1 << 31)


def matmul64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return a.astype(np.int64) @ b.astype(np.int64)


def _machine(config: AcceleratorConfig, size: int = 1 << 16) -> GoldenMachine:
    return GoldenMachine(config, memory_bytes=size)


def _with(config: AcceleratorConfig, **queues) -> AcceleratorConfig:
    data = config.to_dict()
    data["queues"] = {**data["queues"], **queues}
    return AcceleratorConfig.from_dict(data)


# ---------------------------------------------------------------------- GEMM through bundles
TINY_SHAPES = [(1, 1, 1), (1, 7, 5), (5, 1, 9), (7, 5, 3), (13, 11, 9), (33, 6, 17), (2, 9, 1), (6, 3, 22)]
DEFAULT_SHAPES = [(1, 1, 1), (3, 17, 33), (21, 5, 19), (17, 33, 1)]
CASES = [("tiny", s) for s in TINY_SHAPES] + [("default", s) for s in DEFAULT_SHAPES]
CONFIGS = {"tiny": TINY, "default": DEFAULT}


@pytest.mark.parametrize("name, shape", CASES, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in CASES])
def test_int32_gemm_matches_numpy(name, shape):
    config = CONFIGS[name]
    M, N, K = shape
    rng = np.random.default_rng(M * 10_000 + N * 100 + K)
    a = rng.integers(-128, 128, (M, K), dtype=np.int8)
    b = rng.integers(-128, 128, (K, N), dtype=np.int8)
    bundle = build_gemm_bundle(config, b, M)
    out, stats = run_bundle(bundle, {"a": a}, config)
    assert out["c"].dtype == np.dtype("<i4")
    np.testing.assert_array_equal(out["c"], matmul64(a, b))
    assert stats.macs == M * N * K
    assert stats.bytes_stored == M * N * 4
    assert stats.max_tokens <= config.queues.token_max


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("name, shape", CASES, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in CASES])
def test_int8_gemm_with_bias_and_requant_matches_reference(name, shape, relu):
    config = CONFIGS[name]
    M, N, K = shape
    rng = np.random.default_rng(M * 10_000 + N * 100 + K + 7 * relu)
    a = rng.integers(-128, 128, (M, K), dtype=np.int8)
    b = rng.integers(-128, 128, (K, N), dtype=np.int8)
    bias = rng.integers(-(1 << 20), 1 << 20, N)
    bias[0] = INT32_MAX if N > 2 else bias[0]
    bias[-1] = INT32_MIN if N > 2 else bias[-1]
    mult = rng.integers(0, 1 << 16, N)
    shift = rng.integers(6, 22, N)
    words = ref_word(mult, shift)
    np.testing.assert_array_equal(pack_scale_word(mult, shift), words)
    bundle = build_gemm_bundle(config, b, M, bias=bias.astype(np.int32), scale_words=words, relu=relu)
    out, stats = run_bundle(bundle, {"a": a}, config)
    assert out["c"].dtype == np.int8
    expected = ref_requant_matrix(matmul64(a, b), bias, mult, shift, relu)
    np.testing.assert_array_equal(out["c"], expected)
    assert stats.bytes_stored == M * N
    if relu:
        assert out["c"].min() >= 0


def _largest_k(config: AcceleratorConfig, output: str) -> int:
    def fits(k):
        try:
            plan_gemm(config, 1, 1, k, output=output)
            return True
        except GemmError:
            return False
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


@pytest.mark.parametrize("value_a, value_b", [(-128, -128), (-128, 127), (127, 127)])
def test_extreme_values_at_the_largest_k_on_tiny(value_a, value_b):
    K = _largest_k(TINY, "int32")
    with pytest.raises(GemmError):
        plan_gemm(TINY, 1, 1, K + 1, output="int32")
    M, N = 1, 3  # one row block and one column tile: K / 4 steps
    a = np.full((M, K), value_a, np.int8)
    b = np.full((K, N), value_b, np.int8)
    out, _ = run_bundle(build_gemm_bundle(TINY, b, M), {"a": a}, TINY)
    assert np.all(out["c"] == value_a * value_b * K)


def test_int8_output_at_the_largest_k_on_tiny():
    K = _largest_k(TINY, "int8")
    a = np.full((1, K), -128, np.int8)
    b = np.full((K, 3), -128, np.int8)
    mult, shift = [1, 3, 65535], [20, 24, 40]
    bias = np.array([0, -5, INT32_MAX], dtype=np.int32)
    out, _ = run_bundle(build_gemm_bundle(TINY, b, 1, bias=bias, scale_words=ref_word(mult, shift)), {"a": a}, TINY)
    expected = [ref_requant(16384 * K, int(bias[j]), mult[j], shift[j]) for j in range(3)]
    assert out["c"].tolist() == [expected]


def test_all_minus_128_on_default_across_tiles():
    # 17 x 17 output (two column tiles, a partial one), K = 2049: 129 K slices, the last of one row.
    M, N, K = 17, 17, 2049
    a = np.full((M, K), -128, np.int8)
    b = np.full((K, N), -128, np.int8)
    out, _ = run_bundle(build_gemm_bundle(DEFAULT, b, M), {"a": a}, DEFAULT)
    assert np.all(out["c"] == 16384 * K)


def test_accumulating_up_to_int32_max_is_exact_and_one_more_tile_wraps():
    # The largest K the default fits gives 16384 * K just below 2^31 (docs/numerics.md: any
    # K below 2^17 is exact). Check that edge directly: start the accumulator one full
    # 16-deep tile of (-128) * (-128) below INT32_MAX, accumulate that tile (exactly
    # INT32_MAX, no wrap), then once more (wraps).
    cfg = DEFAULT
    tile = 16 * 16384  # 262144 > int16: products and sums must be computed wide
    start = INT32_MAX - tile
    m = _machine(cfg)
    m.write(0x000, np.array([start, start - 5, INT32_MIN + tile, 0] + [0] * 12, "<i4"))
    m.write(0x100, np.full((16, 16), -128, np.int8))
    w = np.full((16, 16), -128, np.int8)
    w[:, 2] = 127  # column 2: 16 * (-128 * 127) = -260096
    w[:, 3] = 0
    m.write(0x200, w)
    m.run(assemble("""
        load mem=acc local=0x0 dram=0x0 rows=1 cols=16 stride=0x40
        load mem=sp local=0x0 dram=0x200 rows=16 cols=16 stride=0x10
        load mem=sp local=0x10 dram=0x100 rows=1 cols=16 stride=0x10 signal=matmul
        preload sp=0x0 k=16 n=16 wait=load
        matmul a=0x10 acc=0x0 m=1 k=16 accumulate=1 signal=store
        store mem=acc local=0x0 dram=0x300 rows=1 cols=4 stride=0x10 wait=matmul signal=matmul
        matmul a=0x10 acc=0x0 m=1 k=16 accumulate=1 wait=store signal=store
        store mem=acc local=0x0 dram=0x400 rows=1 cols=4 stride=0x10 wait=matmul
        halt
    """))
    once = np.frombuffer(m.read(0x300, 16), "<i4").tolist()
    twice = np.frombuffer(m.read(0x400, 16), "<i4").tolist()
    assert once == [INT32_MAX, INT32_MAX - 5, INT32_MIN + tile - 260096, 0]
    assert twice == [wrap32(INT32_MAX + tile), wrap32(INT32_MAX - 5 + tile), wrap32(INT32_MIN + tile - 2 * 260096), 0]
    assert twice[0] == INT32_MIN + tile - 1  # by hand


# ---------------------------------------------------------------------- requantization
REQUANT_CASES = [
    # x, bias, multiplier, shift, relu, expected (hand-computed)
    (5, 0, 1, 1, False, 2),            # 2.5 -> 2 (even)
    (7, 0, 1, 1, False, 4),            # 3.5 -> 4 (even)
    (3, 0, 1, 1, False, 2),            # 1.5 -> 2
    (1, 0, 1, 1, False, 0),            # 0.5 -> 0
    (-1, 0, 1, 1, False, 0),           # -0.5 -> 0
    (-3, 0, 1, 1, False, -2),          # -1.5 -> -2
    (-5, 0, 1, 1, False, -2),          # -2.5 -> -2
    (-7, 0, 1, 1, False, -4),          # -3.5 -> -4
    (0x180, 0, 1, 8, False, 2),        # 1.5 -> 2
    (0x280, 0, 1, 8, False, 2),        # 2.5 -> 2
    (-0x180, 0, 1, 8, False, -2),      # -1.5 -> -2
    (-0x280, 0, 1, 8, False, -2),      # -2.5 -> -2
    (3, 0, 1, 2, False, 1),            # 0.75 -> 1
    (-3, 0, 1, 2, False, -1),          # -0.75 -> -1
    (5, 0, 3, 2, False, 4),            # 3.75 -> 4
    (-5, 0, 3, 2, False, -4),          # -3.75 -> -4
    (0x181, 0, 1, 8, False, 2),        # just above 1.5
    (0x27F, 0, 1, 8, False, 2),        # just below 2.5
    (127, 0, 1, 0, False, 127),
    (128, 0, 1, 0, False, 127),        # saturate high
    (1000, 0, 1, 0, False, 127),
    (-128, 0, 1, 0, False, -128),
    (-129, 0, 1, 0, False, -128),      # saturate low
    (-1000, 0, 1, 0, False, -128),
    (255, 0, 1, 1, False, 127),        # 127.5 -> 128 -> saturated
    (-257, 0, 1, 1, False, -128),      # -128.5 -> -128 (even)
    (-7, 3, 5, 0, False, -20),         # shift 0: exact
    (INT32_MAX, INT32_MAX, 65535, 63, False, 0),
    (INT32_MIN, INT32_MIN, 65535, 63, False, 0),
    (INT32_MAX, 0, 0, 0, False, 0),    # multiplier 0
    (-5, -100, 0, 7, False, 0),
    (1, 0, 65535, 16, False, 1),       # 0.99998 -> 1
    (-1, 0, 65535, 16, False, -1),
    (100, 0, 65535, 16, False, 100),   # 99.9985 -> 100
    (1 << 20, 0, 65535, 30, False, 64),  # 63.999 -> 64
    (INT32_MAX, INT32_MAX, 1, 26, False, 64),   # (2^32 - 2) / 2^26: the 33-bit sum must not wrap
    (INT32_MIN, INT32_MIN, 1, 26, False, -64),  # -2^32 / 2^26
    (INT32_MAX, 1, 1, 31, False, 1),            # 2^31 / 2^31
    (INT32_MIN, -1, 1, 31, False, -1),
    (INT32_MAX, INT32_MAX, 65535, 47, False, 2),  # (2^32 - 2) * 65535 / 2^47 = 1.99997
    (-7, 0, 1, 1, True, 0),            # relu
    (7, 0, 1, 1, True, 4),
    (-1000, 0, 1, 0, True, 0),
    (1000, 0, 1, 0, True, 127),
    (-1, 0, 1, 1, True, 0),
    (INT32_MIN, INT32_MIN, 1, 26, True, 0),
]


@pytest.mark.parametrize("x, bias, mult, shift, relu, expected", REQUANT_CASES)
def test_requantize_corner_cases(x, bias, mult, shift, relu, expected):
    assert ref_requant(x, bias, mult, shift, relu) == expected  # the reference agrees with the hand value
    word = ref_word([mult], [shift])
    got = requantize(np.array([[x]], dtype=np.int32), np.array([bias], dtype=np.int32), word, relu)
    assert got.dtype == np.int8
    assert int(got[0, 0]) == expected


def _requant_on_machine(cases) -> list[int]:
    """Run up to 16 cases (one per accumulator column of the default) through REQUANT."""
    cfg = DEFAULT
    n = cfg.array.cols
    assert len(cases) <= n and len({c[4] for c in cases}) == 1
    relu = cases[0][4]
    x = np.zeros(n, "<i4")
    bias = np.zeros(n, "<i4")
    words = np.zeros(n, "<i4")
    for j, (cx, cb, cm, cs, _, _) in enumerate(cases):
        x[j], bias[j], words[j] = cx, cb, ref_word([cm], [cs])[0]
    m = _machine(cfg)
    m.write(0x000, x)
    m.write(0x100, np.concatenate([bias, words]))
    m.run(assemble(f"""
        load mem=acc local=0x0 dram=0x0 rows=1 cols={n} stride=0x40
        load mem=acc local=0x2 dram=0x100 rows=2 cols={n} stride=0x40 signal=vector
        requant src=0x0 dst=0x5 rows=1 param=0x2 relu={int(relu)} wait=load signal=store
        store mem=sp local=0x5 dram=0x200 rows=1 cols={n} stride=0x10 wait=vector
        halt
    """))
    return np.frombuffer(m.read(0x200, len(cases)), np.int8).tolist()


@pytest.mark.parametrize("relu", [False, True])
def test_requant_instruction_corner_cases(relu):
    cases = [c for c in REQUANT_CASES if c[4] == relu]
    for start in range(0, len(cases), 16):
        chunk = cases[start:start + 16]
        assert _requant_on_machine(chunk) == [c[5] for c in chunk]


int32s = st.integers(INT32_MIN, INT32_MAX)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(int32s, int32s, st.integers(0, 65535), st.integers(0, 63), st.booleans()),
                min_size=1, max_size=8))
def test_requantize_matches_exact_arithmetic(cases):
    for x, b, mult, shift, relu in cases:
        got = requantize(np.array([x], np.int32), np.array([b], np.int32), ref_word([mult], [shift]), relu)
        assert int(got[0]) == ref_requant(x, b, mult, shift, relu)


odd = st.integers(-(1 << 19), (1 << 19) - 1).map(lambda v: 2 * v + 1)


@settings(max_examples=300, deadline=None)
@given(odd, st.integers(0, (1 << 15) - 1).map(lambda v: 2 * v + 1), st.integers(1, 12), st.booleans(),
       st.integers(INT32_MIN, INT32_MAX))
def test_requantize_exact_ties(c, mult, shift, relu, split):
    # (x + b) * mult / 2^shift = c * mult / 2 with c * mult odd: exactly halfway between
    # two integers, so the result is the even one of them.
    total = c << (shift - 1)  # |total| <= 2^31: inside the 33-bit sum range
    x = max(INT32_MIN, min(INT32_MAX, split))
    b = total - x
    if not INT32_MIN <= b <= INT32_MAX:
        x, b = total // 2, total - total // 2
    lower = (c * mult - 1) // 2  # the value is lower + 0.5
    expected = lower if lower % 2 == 0 else lower + 1
    expected = min(127, max(-128, expected))
    expected = max(expected, 0) if relu else expected
    got = requantize(np.array([x], np.int32), np.array([b], np.int32), ref_word([mult], [shift]), relu)
    assert int(got[0]) == expected == ref_requant(x, b, mult, shift, relu)


@pytest.mark.parametrize("word", [1 << 22, (1 << 22) | 5, 1 << 30, -(1 << 31), -1])
def test_reserved_scale_bits_are_rejected(word):
    with pytest.raises(ValueError, match="reserved bits"):
        requantize(np.array([1], np.int32), np.array([0], np.int32), np.array([word], dtype=np.int64).astype(np.int32))


def test_reserved_scale_bits_are_rejected_by_the_instruction():
    m = _machine(TINY)
    m.write(0, np.array([1, 2, 3, 4, 0, 0, 0, 0, 1, 1, 1 << 22, 1], "<i4"))
    with pytest.raises(ProgramError, match="reserved bits"):
        m.run(assemble("""
            load mem=acc local=0x0 dram=0x0 rows=3 cols=4 stride=0x10 signal=vector
            requant src=0x0 dst=0x0 rows=1 param=0x1 relu=0 wait=load
            halt
        """))


def test_pack_scale_word_rejects_out_of_range():
    with pytest.raises(ValueError):
        pack_scale_word(1 << 16, 0)
    with pytest.raises(ValueError):
        pack_scale_word(1, 64)
    with pytest.raises(ValueError):
        pack_scale_word(-1, 0)
    assert int(pack_scale_word(65535, 63)) == 0x3FFFFF


@pytest.mark.parametrize("value, shift, expected", [
    (5, 1, 2), (7, 1, 4), (-5, 1, -2), (-7, 1, -4), (9, 0, 9), (-9, 0, -9),
    (6, 2, 2), (-6, 2, -2), (10, 2, 2), (-10, 2, -2), (11, 2, 3), (-11, 2, -3),
    ((1 << 49) - 1, 62, 0), (-(1 << 49), 63, 0), (3 << 59, 60, 2), (5 << 58, 59, 2), (-(3 << 58), 59, -2),
])
def test_round_shift_half_even_by_hand(value, shift, expected):
    assert int(round_shift_half_even(np.array([value], np.int64), shift)[0]) == expected


# ---------------------------------------------------------------------- instruction semantics
def test_accumulate_wraps_modulo_2_32():
    initial = [INT32_MAX - 10, INT32_MAX, INT32_MIN, INT32_MIN + 5]
    w_row = [127, 1, -1, -128]
    a_row = [127, 127, 127, 127]
    m = _machine(TINY)
    m.write(0x000, np.array(initial, "<i4"))
    m.write(0x100, np.array(w_row * 4, np.int8))
    m.write(0x200, np.array(a_row, np.int8))
    m.run(assemble("""
        load mem=acc local=0x0 dram=0x0 rows=1 cols=4 stride=0x10
        load mem=sp local=0x0 dram=0x100 rows=4 cols=4 stride=0x4
        load mem=sp local=0x4 dram=0x200 rows=1 cols=4 stride=0x4 signal=matmul
        preload sp=0x0 k=4 n=4 wait=load
        matmul a=0x4 acc=0x0 m=1 k=4 accumulate=1 signal=store
        store mem=acc local=0x0 dram=0x300 rows=1 cols=4 stride=0x10 wait=matmul
        halt
    """))
    got = np.frombuffer(m.read(0x300, 16), "<i4").tolist()
    products = [4 * 127 * w for w in w_row]  # 64516, 508, -508, -65024
    assert got == [wrap32(i + p) for i, p in zip(initial, products)]
    assert got[0] == -(1 << 31) + 64505  # (2^31 - 11 + 64516) wrapped, by hand
    assert got[2] == INT32_MAX - 507


def test_matmul_overwrite_preload_zeroing_and_partial_k():
    rng = np.random.default_rng(3)
    w = rng.integers(-128, 128, (4, 4), dtype=np.int8)
    a = rng.integers(-128, 128, (3, 4), dtype=np.int8)
    m = _machine(TINY)
    m.write(0x100, w)
    m.write(0x200, a)
    m.write(0x000, np.full(12, 77, "<i4"))
    m.run(assemble("""
        load mem=acc local=0x0 dram=0x0 rows=3 cols=4 stride=0x10
        load mem=sp local=0x0 dram=0x100 rows=4 cols=4 stride=0x4
        load mem=sp local=0x4 dram=0x200 rows=3 cols=4 stride=0x4 signal=matmul
        preload sp=0x0 k=3 n=2 wait=load
        matmul a=0x4 acc=0x0 m=3 k=2 accumulate=0 signal=store
        store mem=acc local=0x0 dram=0x300 rows=3 cols=4 stride=0x10 wait=matmul
        halt
    """))
    got = np.frombuffer(m.read(0x300, 48), "<i4").reshape(3, 4)
    w_loaded = np.zeros((4, 4), np.int64)
    w_loaded[:3, :2] = w[:3, :2]  # preload k=3 n=2 zeroes the rest
    np.testing.assert_array_equal(got, a[:, :2].astype(np.int64) @ w_loaded[:2])  # matmul k=2


def test_load_zero_fills_beyond_cols_and_store_writes_only_cols():
    cfg = DEFAULT  # scratchpad rows of 16 int8, accumulator rows of 16 int32
    m = _machine(cfg)
    m.write(0x000, np.arange(1, 33, dtype=np.int8))
    m.write(0x100, np.array([-1, -2, -3, -4, -5, -6, -7, -8, -9, -10], np.int8))
    m.write(0x400, np.arange(100, 132, dtype="<i4"))
    m.write(0x500, np.array([-7, 8, -9], "<i4"))
    m.memory[0x800:0xA00] = 0xEE
    m.run(assemble("""
        load mem=sp local=0x0 dram=0x0 rows=2 cols=16 stride=0x10
        load mem=sp local=0x0 dram=0x100 rows=2 cols=5 stride=0x5
        load mem=acc local=0x3 dram=0x400 rows=2 cols=16 stride=0x40
        load mem=acc local=0x3 dram=0x500 rows=2 cols=3 stride=0x0 signal=store
        store mem=sp local=0x0 dram=0x800 rows=2 cols=16 stride=0x10 wait=load
        store mem=acc local=0x3 dram=0x900 rows=2 cols=16 stride=0x40
        store mem=sp local=0x0 dram=0x9a0 rows=1 cols=3 stride=0x0
        halt
    """))
    sp = np.frombuffer(m.read(0x800, 32), np.int8).reshape(2, 16)
    assert sp[0].tolist() == [-1, -2, -3, -4, -5] + [0] * 11
    assert sp[1].tolist() == [-6, -7, -8, -9, -10] + [0] * 11
    acc = np.frombuffer(m.read(0x900, 128), "<i4").reshape(2, 16)
    assert acc.tolist() == [[-7, 8, -9] + [0] * 13] * 2  # stride 0 repeats one row
    assert list(m.read(0x9a0, 5)) == [0xFF, 0xFE, 0xFD, 0xEE, 0xEE]  # only 3 bytes stored


def test_rows_zero_moves_nothing():
    m = _machine(TINY)
    m.memory[0x100:0x110] = 9
    stats = m.run(assemble("""
        load mem=sp local=0x0 dram=0x0 rows=0 cols=4 stride=0x4
        halt
    """))
    assert stats.bytes_loaded == 0


# ---------------------------------------------------------------------- deadlocks
def test_deadlock_wait_for_a_token_nobody_sends():
    with pytest.raises(DeadlockError) as info:
        _machine(TINY).run(assemble("""
            token queue=matmul wait=load
            halt
        """))
    message = str(info.value)
    assert "matmul: instruction 0" in message and "token from load" in message
    assert "halt" in message


def test_deadlock_two_queues_waiting_on_each_other():
    with pytest.raises(DeadlockError) as info:
        _machine(TINY).run(assemble("""
            token queue=load wait=matmul signal=matmul
            token queue=matmul wait=load signal=load
            halt
        """))
    message = str(info.value)
    assert "load: instruction 0" in message and "token from matmul" in message
    assert "matmul: instruction 1" in message and "token from load" in message


FIFO_BLOCKED = """
    token queue=matmul wait=load
    token queue=matmul
    token queue=matmul
    token queue=matmul
    token queue=matmul
    token queue=load signal=matmul
    halt
"""


def test_deadlock_dispatch_blocked_by_a_full_queue():
    assert TINY.queues.depth == 4  # the first 4 matmul tokens fill the FIFO; the 5th blocks dispatch
    with pytest.raises(DeadlockError) as info:
        _machine(TINY).run(assemble(FIFO_BLOCKED))
    message = str(info.value)
    assert "full matmul queue" in message
    assert "instruction 4" in message and "depth 4" in message
    assert "token from load" in message


def test_same_program_runs_with_a_deeper_queue():
    stats = _machine(_with(TINY, depth=8)).run(assemble(FIFO_BLOCKED))
    assert stats.per_queue == {"matmul": 5, "load": 1}


def test_full_token_counter_stalls_until_the_consumer_drains():
    config = _with(TINY, token_max=1)
    # The matmul consumer is held back by a vector token that arrives late, so the load
    # producer finds its counter full (1 token) and must stall, not fail.
    program = assemble("""
        token queue=store signal=vector
        token queue=vector wait=store signal=matmul
        load mem=sp local=0x0 dram=0x0 rows=1 cols=4 stride=0x4 signal=matmul
        load mem=sp local=0x1 dram=0x4 rows=1 cols=4 stride=0x4 signal=matmul
        load mem=sp local=0x2 dram=0x8 rows=1 cols=4 stride=0x4 signal=matmul
        token queue=matmul wait=load,vector
        token queue=matmul wait=load
        preload sp=0x0 k=3 n=4 wait=load
        halt
    """)
    stats = _machine(config).run(program)
    assert stats.max_tokens == 1
    assert stats.leftover_tokens == {}
    assert stats.instructions["load"] == 3 and stats.per_queue["matmul"] == 3


def test_token_counter_full_forever_is_a_deadlock():
    config = _with(TINY, token_max=1)
    with pytest.raises(DeadlockError, match="counter full at 1"):
        _machine(config).run(assemble("""
            token queue=load signal=matmul
            token queue=load signal=matmul
            halt
        """))


# ---------------------------------------------------------------------- races
RACE_TEMPLATE = """
    load mem=sp local=0x0 dram=0x200 rows=8 cols=4 stride=0x4 {first}
    load mem=sp local=0x4 dram=0x100 rows=4 cols=4 stride=0x4 {second}
    {fence}
    preload sp=0x0 k=4 n=4 wait=load
    matmul a=0x4 acc=0x0 m=4 k=4 accumulate=0 signal=store
    store mem=acc local=0x0 dram=0x300 rows=4 cols=4 stride=0x10 wait=matmul
    halt
"""


def _race_machine():
    rng = np.random.default_rng(11)
    a = rng.integers(-128, 128, (4, 4), dtype=np.int8)
    w = rng.integers(-128, 128, (8, 4), dtype=np.int8)
    m = _machine(TINY)
    m.write(0x100, a)
    m.write(0x200, w)
    return m, a, w


def test_load_overwriting_rows_the_matmul_reads_without_a_token_is_a_race():
    m, _, _ = _race_machine()
    with pytest.raises(RaceError) as info:
        m.run(assemble(RACE_TEMPLATE.format(first="signal=matmul", second="", fence="")))
    message = str(info.value)
    assert "scratchpad row" in message
    assert "instruction 1" in message and "instruction 3" in message


@pytest.mark.parametrize("first, second, fence", [
    ("", "signal=matmul", ""),  # the token covers the second load
    ("signal=matmul", "signal=matmul", ""),
    ("signal=matmul", "", "fence"),  # with the token leftover, a fence orders it instead
])
def test_ordered_version_of_the_racy_program_passes(first, second, fence):
    m, a, w = _race_machine()
    text = RACE_TEMPLATE.format(first=first, second=second, fence=fence)
    if first and second:
        text = text.replace("preload sp=0x0 k=4 n=4 wait=load", "token queue=matmul wait=load\n"
                            "    preload sp=0x0 k=4 n=4 wait=load")
    m.run(assemble(text))
    got = np.frombuffer(m.read(0x300, 64), "<i4").reshape(4, 4)
    np.testing.assert_array_equal(got, matmul64(a, w[:4]))


def test_device_memory_race_between_store_and_load():
    base = """
        load mem=sp local=0x0 dram=0x0 rows=1 cols=4 stride=0x4 signal=store
        store mem=sp local=0x0 dram=0x100 rows=1 cols=4 stride=0x4 wait=load {store_signal}
        load mem=sp local=0x1 dram=0x102 rows=1 cols=4 stride=0x4 {load_wait}
        halt
    """
    m = _machine(TINY)
    m.write(0, np.array([1, 2, 3, 4], np.int8))
    with pytest.raises(RaceError, match="device memory"):
        m.run(assemble(base.format(store_signal="", load_wait="")))
    m = _machine(TINY)
    m.write(0, np.array([1, 2, 3, 4], np.int8))
    m.run(assemble(base.format(store_signal="signal=load", load_wait="wait=store")))
    assert m.sp[1].tolist() == [3, 4, 0, 0]


def test_write_write_race_between_queues():
    m = _machine(TINY)
    with pytest.raises(RaceError, match="both write"):
        m.run(assemble("""
            load mem=acc local=0x0 dram=0x0 rows=3 cols=4 stride=0x10 signal=vector
            requant src=0x0 dst=0x8 rows=1 param=0x1 relu=0 wait=load
            load mem=sp local=0x8 dram=0x0 rows=1 cols=4 stride=0x4
            halt
        """))


def test_a_machine_kept_between_runs_orders_each_run_after_the_last():
    """A run that halted is complete: the next run on the same machine (a bundle kept loaded,
    one run per decode step) uses the rows it wrote without tokens, and finds them written."""
    m = _machine(TINY)
    m.write(0, np.arange(4, dtype="<i4"))
    m.run(assemble("load mem=acc local=0x0 dram=0x0 rows=1 cols=4 stride=0x10\nhalt"))
    for _ in range(2):
        m.run(assemble("store mem=acc local=0x0 dram=0x100 rows=1 cols=4 stride=0x10\nhalt"))
        assert np.frombuffer(m.read(0x100, 16), "<i4").tolist() == [0, 1, 2, 3]


# ---------------------------------------------------------------------- uninitialised, malformed
def test_matmul_on_never_written_scratchpad_rows():
    with pytest.raises(UninitializedReadError, match="scratchpad row 8"):
        _machine(TINY).run(assemble("""
            load mem=sp local=0x0 dram=0x0 rows=4 cols=4 stride=0x4 signal=matmul
            preload sp=0x0 k=4 n=4 wait=load
            matmul a=0x8 acc=0x0 m=1 k=4 accumulate=0
            halt
        """))


@pytest.mark.parametrize("text, words", [
    ("matmul a=0x0 acc=0x0 m=1 k=1 accumulate=0", "no weights"),
    ("store mem=acc local=0x5 dram=0x0 rows=1 cols=4 stride=0x0", "accumulator row 5"),
    ("preload sp=0x3 k=1 n=1", "scratchpad row 3"),
    ("requant src=0x0 dst=0x0 rows=1 param=0x2 relu=0", "accumulator row"),
])
def test_reads_of_never_written_rows(text, words):
    with pytest.raises(UninitializedReadError, match=words):
        _machine(TINY).run(assemble(text + "\nhalt"))


def test_accumulate_onto_never_written_accumulator():
    with pytest.raises(UninitializedReadError, match="accumulator row 0"):
        _machine(TINY).run(assemble("""
            load mem=sp local=0x0 dram=0x0 rows=4 cols=4 stride=0x4 signal=matmul
            preload sp=0x0 k=4 n=4 wait=load
            matmul a=0x0 acc=0x0 m=1 k=4 accumulate=1
            halt
        """))


@pytest.mark.parametrize("text", ["", "fence", "load mem=sp local=0x0 dram=0x0 rows=1 cols=4 stride=0x4"])
def test_program_without_halt(text):
    with pytest.raises(ProgramError, match="without HALT"):
        _machine(TINY).run(assemble(text))


SP_ROWS, ACC_ROWS = TINY.sp_rows, TINY.acc_rows  # 1024 and 256, 4 elements each
INIT = "load mem=sp local=0x0 dram=0x0 rows=8 cols=4 stride=0x4 signal=matmul\npreload sp=0x0 k=4 n=4 wait=load\n"
OUT_OF_RANGE = [
    ("sp-rows", f"load mem=sp local={SP_ROWS - 1} dram=0x0 rows=2 cols=4 stride=0x4", "exceed the scratchpad"),
    ("acc-rows", f"load mem=acc local={ACC_ROWS} dram=0x0 rows=1 cols=4 stride=0x10", "exceed the accumulator"),
    ("dram-end", "load mem=sp local=0x0 dram=0xfffe rows=1 cols=4 stride=0x4", "outside the 65536-byte memory"),
    ("dram-stride", "load mem=sp local=0x0 dram=0x0 rows=3 cols=4 stride=0x8000", "outside"),
    ("store-dram", "store mem=sp local=0x0 dram=0xffff0 rows=1 cols=1 stride=0x0", "outside"),
    ("sp-cols", "load mem=sp local=0x0 dram=0x0 rows=1 cols=5 stride=0x4", "cols=5 exceeds"),
    ("acc-cols", "load mem=acc local=0x0 dram=0x0 rows=1 cols=5 stride=0x4", "cols=5 exceeds"),
    ("preload-k0", "preload sp=0x0 k=0 n=4", "k must be in 1..4"),
    ("preload-k5", "preload sp=0x0 k=5 n=4", "k must be in 1..4"),
    ("preload-n5", "preload sp=0x0 k=4 n=5", "n in 1..4"),
    ("preload-rows", f"preload sp={SP_ROWS - 2} k=4 n=4", "exceed the scratchpad"),
    ("matmul-k", "matmul a=0x0 acc=0x0 m=1 k=5 accumulate=0", "k must be in 1..4"),
    ("matmul-a", f"{INIT}matmul a={SP_ROWS - 1} acc=0x0 m=2 k=4 accumulate=0", "exceed the scratchpad"),
    ("matmul-acc", f"{INIT}matmul a=0x0 acc={ACC_ROWS - 1} m=2 k=4 accumulate=0", "exceed the accumulator"),
    ("requant-param", f"requant src=0x0 dst=0x0 rows=1 param={ACC_ROWS - 1} relu=0", "exceed the accumulator"),
    ("requant-dst", f"requant src=0x0 dst={SP_ROWS} rows=1 param=0x0 relu=0", "exceed the scratchpad"),
]


@pytest.mark.parametrize("text, words", [c[1:] for c in OUT_OF_RANGE], ids=[c[0] for c in OUT_OF_RANGE])
def test_out_of_range_operands(text, words):
    m = _machine(TINY)
    with pytest.raises(ProgramError, match=words):
        m.run(assemble(text + "\nhalt"))


def test_config_without_row_engine_refuses_vector_row_instructions():
    from dataclasses import replace

    config = replace(TINY, name="tiny_no_rows", vector=replace(TINY.vector, row_engine=False))
    m = _machine(config)
    with pytest.raises(ProgramError, match=r"instruction 0.*no vector row engine.*VMAP"):
        m.run(assemble("vmap func=gelu src_mem=acc src=0x0 dst_mem=sp dst=0x0 param=0x1 rows=1\nhalt"))


def test_fetch_of_an_illegal_program_is_a_program_error():
    m = _machine(TINY)
    with pytest.raises(ProgramError, match="illegal opcode"):
        m.fetch_program(0x100, 2)


def test_host_access_outside_memory():
    m = _machine(TINY, 256)
    with pytest.raises(ProgramError):
        m.write(250, bytes(10))
    with pytest.raises(ProgramError):
        m.read(-1, 2)


# ---------------------------------------------------------------------- run_bundle inputs
def test_run_bundle_checks_inputs():
    b = np.ones((3, 2), np.int8)
    bundle = build_gemm_bundle(TINY, b, 2)
    with pytest.raises(BundleError, match="missing inputs: a"):
        run_bundle(bundle, {}, TINY)
    with pytest.raises(BundleError, match="unknown inputs: x"):
        run_bundle(bundle, {"a": np.zeros((2, 3), np.int8), "x": np.zeros(1)}, TINY)
    with pytest.raises(BundleError, match="outside int8"):
        run_bundle(bundle, {"a": np.full((2, 3), 300)}, TINY)
    out, _ = run_bundle(bundle, {"a": np.array([[1, 2, 3], [-4, 5, 6]])}, TINY)  # int64 in range: converted
    np.testing.assert_array_equal(out["c"], [[6, 6], [7, 7]])


@pytest.mark.parametrize("k, n", [(4, 4), (3, 2), (1, 4)])
def test_transposed_preload_multiplies_by_rows_stored_row_major(k, n):
    """preload transpose=1 takes W = S[:n, :k].T, so matmul gives A @ S.T (attention's Q K^T)."""
    config = load_config("tiny")
    rng = np.random.default_rng(k * 10 + n)
    a = rng.integers(-128, 128, (5, 4), dtype=np.int8)
    s = rng.integers(-128, 128, (4, 4), dtype=np.int8)  # rows of K, stored as they come
    machine = GoldenMachine(config, memory_bytes=4096)
    machine.write(0x100, a.tobytes())
    machine.write(0x200, s.tobytes())
    machine.run(assemble(f"""
        load mem=sp local=0x0 dram=0x100 rows=5 cols=4 stride=0x4
        load mem=sp local=0x10 dram=0x200 rows=4 cols=4 stride=0x4 signal=matmul
        preload sp=0x10 k={k} n={n} transpose=1 wait=load
        matmul a=0x0 acc=0x0 m=5 k={k} accumulate=0 signal=store
        store mem=acc local=0x0 dram=0x300 rows=5 cols=4 stride=0x10 wait=matmul
        halt
    """))
    got = np.frombuffer(machine.read(0x300, 5 * 16), dtype="<i4").reshape(5, 4)
    expected = np.zeros((5, 4), dtype=np.int64)
    expected[:, :n] = a[:, :k].astype(np.int64) @ s[:n, :k].astype(np.int64).T
    np.testing.assert_array_equal(got, expected)
