"""GEMM kernel generator: plans that fit (or say what does not), programs that are
deadlock- and race-free on the bit-exact model and compute numpy's result."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weft.compiler.gemm import (GemmError, build_gemm_bundle, gemm_program, gemv_params, gemv_program, plan_gemm,
                                plan_gemv)
from weft.hw.bundle import Bundle
from weft.hw.config import AcceleratorConfig, load_config
from weft.hw.isa import Opcode
from weft.sim.golden import GoldenMachine, run_bundle

TINY = load_config("tiny")
ULX3S = load_config("ulx3s")
DEFAULT = load_config("default")


def _with_queues(config: AcceleratorConfig, **queues) -> AcceleratorConfig:
    data = config.to_dict()
    data["queues"] = {**data["queues"], **queues}
    return AcceleratorConfig.from_dict(data)


SHALLOW = _with_queues(TINY, depth=2, token_max=2)  # smallest FIFOs and token counters a GEMM accepts
CONFIGS = {"tiny": TINY, "ulx3s": ULX3S, "default": DEFAULT, "shallow": SHALLOW}


def ref_requant(x: int, bias: int, mult: int, shift: int, relu: bool) -> int:
    q = min(127, max(-128, round(Fraction((x + bias) * mult, 1 << shift))))  # round(): half to even
    return max(q, 0) if relu else q


def _align(x: int) -> int:
    return (x + 255) & ~255


def run_gemm(config, plan, a, b, *, bias=None, mult=None, shift=None, relu=False, pad=(0, 0, 0)):
    """Lay the operands out by hand (rows padded by ``pad`` bytes), run the generated
    program on the bit-exact model and return (output, stats)."""
    M, K = a.shape
    N = b.shape[1]
    int8 = plan.output == "int8"
    esize = 1 if int8 else 4
    a_stride, b_stride, out_stride = K + pad[0], N + pad[1], N * esize + pad[2]
    a_addr = 0
    b_addr = _align(a_addr + M * a_stride)
    p_addr = _align(b_addr + K * b_stride)
    out_addr = _align(p_addr + 8 * N)
    size = _align(out_addr + M * out_stride) + 256
    machine = GoldenMachine(config, memory_bytes=size)
    for i in range(M):
        machine.write(a_addr + i * a_stride, a[i])
    for t in range(K):
        machine.write(b_addr + t * b_stride, b[t])
    if int8:
        words = np.array([int(m) | (int(s) << 16) for m, s in zip(mult, shift)], dtype=np.uint32)
        machine.write(p_addr, np.asarray(bias, dtype="<i4"))
        machine.write(p_addr + 4 * N, words.astype("<u4"))
    program = gemm_program(config, plan, a_addr=a_addr, b_addr=b_addr, out_addr=out_addr,
                           params_addr=p_addr if int8 else None, a_stride=a_stride, b_stride=b_stride,
                           out_stride=out_stride, relu=relu)
    stats = machine.run(program)
    dtype = np.int8 if int8 else np.dtype("<i4")
    out = np.stack([np.frombuffer(machine.read(out_addr + i * out_stride, N * esize), dtype) for i in range(M)])
    return out, stats, program


def _expected(a, b, output, bias, mult, shift, relu):
    exact = a.astype(np.int64) @ b.astype(np.int64)
    if output == "int32":
        return exact
    out = np.empty_like(exact)
    for (i, j), x in np.ndenumerate(exact):
        out[i, j] = ref_requant(int(x), int(bias[j]), int(mult[j]), int(shift[j]), relu)
    return out


# ---------------------------------------------------------------------- programs on the model
@st.composite
def gemm_cases(draw):
    name = draw(st.sampled_from(sorted(CONFIGS)))
    config = CONFIGS[name]
    limit = 24 if name != "default" else 12
    M, N, K = (draw(st.integers(1, limit)) for _ in range(3))
    output = draw(st.sampled_from(["int8", "int32"]))
    max_block_rows = draw(st.sampled_from([None, 1, 2, 3, 5]))
    b_slots = draw(st.integers(1, min(5, config.queues.token_max)))
    relu = draw(st.booleans())
    pad = draw(st.sampled_from([(0, 0, 0), (3, 5, 7)]))
    seed = draw(st.integers(0, 2**32 - 1))
    return name, M, N, K, output, max_block_rows, b_slots, relu, pad, seed


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gemm_cases())
def test_generated_programs_are_correct_deadlock_and_race_free(case):
    name, M, N, K, output, max_block_rows, b_slots, relu, pad, seed = case
    config = CONFIGS[name]
    rng = np.random.default_rng(seed)
    a = rng.integers(-128, 128, (M, K), dtype=np.int8)
    b = rng.integers(-128, 128, (K, N), dtype=np.int8)
    bias = rng.integers(-(1 << 18), 1 << 18, N)
    mult = rng.integers(0, 1 << 16, N)
    shift = rng.integers(8, 24, N)
    plan = plan_gemm(config, M, N, K, output=output, max_block_rows=max_block_rows, b_slots=b_slots)
    # DeadlockError / RaceError / UninitializedReadError would be raised by the model.
    out, stats, program = run_gemm(config, plan, a, b, bias=bias, mult=mult, shift=shift, relu=relu, pad=pad)
    np.testing.assert_array_equal(out, _expected(a, b, output, bias, mult, shift, relu))
    assert stats.max_tokens <= config.queues.token_max
    assert stats.macs == M * N * K
    assert program[-1].opcode == Opcode.HALT


FIXED_SHAPES = [(1, 1, 1), (4, 4, 4), (5, 3, 7), (9, 9, 9), (17, 2, 33), (2, 17, 5), (19, 13, 11)]


@pytest.mark.parametrize("shape", FIXED_SHAPES, ids=["x".join(map(str, s)) for s in FIXED_SHAPES])
@pytest.mark.parametrize("max_block_rows, b_slots", [(None, 2), (1, 1), (2, 3), (3, 6)])
def test_many_shapes_on_tiny(shape, max_block_rows, b_slots):
    M, N, K = shape
    rng = np.random.default_rng(M * 10_000 + N * 100 + K)
    a = rng.integers(-128, 128, (M, K), dtype=np.int8)
    b = rng.integers(-128, 128, (K, N), dtype=np.int8)
    for output in ("int32", "int8"):
        plan = plan_gemm(TINY, M, N, K, output=output, max_block_rows=max_block_rows, b_slots=b_slots)
        bias, mult, shift = rng.integers(-5000, 5000, N), rng.integers(1, 1 << 16, N), rng.integers(10, 20, N)
        out, stats, _ = run_gemm(TINY, plan, a, b, bias=bias, mult=mult, shift=shift)
        np.testing.assert_array_equal(out, _expected(a, b, output, bias, mult, shift, False))
        assert stats.max_tokens <= TINY.queues.token_max


def test_many_b_slots_on_small_shapes_stay_race_free():
    # Several row blocks of one step each: the A slot of block i is reused by block i + 2,
    # two steps later; B slots beyond that must not let the load run ahead of the matmul.
    a = np.arange(-60, 60, dtype=np.int8).reshape(40, 3)
    b = np.arange(9, dtype=np.int8).reshape(3, 3)
    for b_slots in (2, 3, 4, 8):
        plan = plan_gemm(TINY, 40, 3, 3, output="int32", max_block_rows=2, b_slots=b_slots)
        assert plan.b_slots <= (plan.n_tiles + 1) * plan.k_tiles
        out, _, _ = run_gemm(TINY, plan, a, b)
        np.testing.assert_array_equal(out, a.astype(np.int64) @ b.astype(np.int64))


# ---------------------------------------------------------------------- plans
@st.composite
def plan_cases(draw):
    config = CONFIGS[draw(st.sampled_from(["tiny", "ulx3s", "default"]))]
    M, N = draw(st.integers(1, 5000)), draw(st.integers(1, 300))
    K = draw(st.integers(1, 600))
    return (config, M, N, K, draw(st.sampled_from(["int8", "int32"])), draw(st.sampled_from([None, 1, 7, 100])),
            draw(st.integers(0, 64)), draw(st.integers(0, 16)))


@settings(max_examples=200, deadline=None)
@given(plan_cases())
def test_plan_slots_are_disjoint_and_inside_the_memories(case):
    config, M, N, K, output, max_block_rows, sp_base, acc_base = case
    try:
        plan = plan_gemm(config, M, N, K, output=output, max_block_rows=max_block_rows,
                         sp_base=sp_base, acc_base=acc_base)
    except GemmError:
        return
    R, C = config.array.rows, config.array.cols
    assert plan.k_tiles == -(-K // R) and plan.n_tiles == -(-N // C)
    assert plan.m_blocks * plan.mb >= M > (plan.m_blocks - 1) * plan.mb
    assert 1 <= plan.mb <= (max_block_rows or M)
    sp = [(s, s + plan.mb * plan.k_tiles) for s in plan.sp_a] + [(s, s + R) for s in plan.sp_b]
    if len(plan.sp_a) == 1:  # one A slot only where it is race-free (see plan_gemm)
        assert plan.b_slots <= plan.k_tiles
    sp += [(s, s + plan.mb) for s in plan.sp_out]
    acc = [(s, s + plan.mb) for s in plan.acc_tile] + [(s, s + 2) for s in plan.acc_param]
    for intervals, base, rows in ((sp, sp_base, config.sp_rows), (acc, acc_base, config.acc_rows)):
        intervals.sort()
        assert intervals[0][0] >= base and intervals[-1][1] <= rows
        for (_, end), (start, _) in zip(intervals, intervals[1:]):
            assert end <= start, f"overlapping slots {intervals}"
    assert len(plan.sp_a) in (1, 2) and len(plan.acc_tile) == 2
    assert len(plan.sp_out) == (2 if output == "int8" else 0) and len(plan.acc_param) == len(plan.sp_out)


def test_gemm_that_does_not_fit_the_scratchpad():
    # K = 4096 on tiny: 1024 slices of 4; one row block needs one A copy of 1024 rows,
    # 2 B tiles of 4 rows and 2 output rows = 1034 rows; tiny has 1024.
    with pytest.raises(GemmError) as info:
        plan_gemm(TINY, 8, 8, 4096)
    message = str(info.value)
    assert "does not fit" in message and "8x8x4096" in message
    assert "scratchpad needs 1034 rows, 1024 free (short by 10)" in message
    assert "accumulator" not in message  # only the memory that is short is named


def test_gemm_that_does_not_fit_the_accumulator():
    # 2 accumulator tiles of one row + 2 parameter slots of 2 rows = 6 rows; 5 are free.
    with pytest.raises(GemmError) as info:
        plan_gemm(TINY, 4, 4, 4, acc_base=TINY.acc_rows - 5)
    message = str(info.value)
    assert "accumulator needs 6 rows, 5 free (short by 1)" in message
    assert "scratchpad" not in message


def test_largest_k_fits_and_one_more_slice_does_not():
    # int32 output on tiny: one A slot of k_tiles rows + 2 B tiles of 4 rows <= 1024 rows
    # -> k_tiles <= 1016 -> K <= 4064.
    plan = plan_gemm(TINY, 1, 1, 4064, output="int32")
    assert plan.k_tiles == 1016 and plan.mb == 1 and len(plan.sp_a) == 1
    with pytest.raises(GemmError, match="scratchpad"):
        plan_gemm(TINY, 1, 1, 4065, output="int32")


@pytest.mark.parametrize("kwargs, words", [
    (dict(M=0, N=1, K=1), "M=0"),
    (dict(M=1, N=0, K=1), "N=0"),
    (dict(M=1, N=1, K=-3), "K=-3"),
    (dict(M=1, N=1, K=1, output="int16"), "int16"),
    (dict(M=1, N=1, K=1, b_slots=0), "b_slots"),
])
def test_plan_argument_errors(kwargs, words):
    with pytest.raises(GemmError, match=words):
        plan_gemm(TINY, **kwargs)


def test_token_max_too_small_for_the_kernel():
    with pytest.raises(GemmError, match="token_max"):
        plan_gemm(_with_queues(TINY, token_max=1), 4, 4, 4)
    with pytest.raises(GemmError, match="token_max"):
        plan_gemm(_with_queues(TINY, token_max=2), 40, 4, 8, b_slots=3)


def test_int8_program_needs_params():
    plan = plan_gemm(TINY, 2, 2, 2)
    with pytest.raises(GemmError, match="params_addr"):
        gemm_program(TINY, plan, a_addr=0, b_addr=0x100, out_addr=0x200)


def test_program_without_halt_on_request():
    plan = plan_gemm(TINY, 2, 2, 2, output="int32")
    program = gemm_program(TINY, plan, a_addr=0, b_addr=0x100, out_addr=0x200, halt=False)
    assert all(i.opcode != Opcode.HALT for i in program)


# ---------------------------------------------------------------------- bundles
def test_build_gemm_bundle_errors():
    w = np.zeros((4, 4), np.int8)
    with pytest.raises(GemmError, match="2-D int8"):
        build_gemm_bundle(TINY, w.astype(np.int32), 4)
    with pytest.raises(GemmError, match="2-D int8"):
        build_gemm_bundle(TINY, np.zeros(4, np.int8), 4)
    with pytest.raises(GemmError, match="scale_words"):
        build_gemm_bundle(TINY, w, 4, output="int8")
    with pytest.raises(GemmError, match="only to int8"):
        build_gemm_bundle(TINY, w, 4, bias=np.zeros(4, np.int32))


def test_gemm_bundle_layout_and_round_trip():
    rng = np.random.default_rng(5)
    w = rng.integers(-128, 128, (9, 6), dtype=np.int8)
    words = np.full(6, (1 << 16) | 1, dtype=np.int32)  # multiplier 1, shift 1
    bundle = build_gemm_bundle(TINY, w, 7, bias=np.arange(6, dtype=np.int32), scale_words=words)
    regions = sorted(bundle.regions, key=lambda r: r.address)
    for r, nxt in zip(regions, regions[1:]):
        assert r.address + r.size <= nxt.address and r.address % 128 == 0
    assert bundle.segments[0].data == w.tobytes()
    assert bundle.metadata["M"] == 7 and bundle.metadata["N"] == 6 and bundle.metadata["K"] == 9
    again = Bundle.from_bytes(bundle.to_bytes(), config=TINY)
    assert again == bundle
    a = rng.integers(-128, 128, (7, 9), dtype=np.int8)
    out, stats = run_bundle(again, {"a": a}, TINY)
    exact = a.astype(np.int64) @ w.astype(np.int64)
    expected = [[ref_requant(int(exact[i, j]), j, 1, 1, False) for j in range(6)] for i in range(7)]
    assert out["c"].tolist() == expected
    assert stats.max_tokens <= TINY.queues.token_max


def test_gemm_bundle_runs_on_a_config_with_minimal_queues():
    rng = np.random.default_rng(9)
    w = rng.integers(-128, 128, (13, 10), dtype=np.int8)
    a = rng.integers(-128, 128, (21, 13), dtype=np.int8)
    out, stats = run_bundle(build_gemm_bundle(SHALLOW, w, 21), {"a": a}, SHALLOW)
    np.testing.assert_array_equal(out["c"], a.astype(np.int64) @ w.astype(np.int64))
    assert stats.max_tokens <= 2


# ---------------------------------------------------------------------- weight-streaming GEMV
def run_gemv(config, plan, x, w, *, bias, mult, shift, relu=False):
    """``x @ w`` (x: 1 x K, w: K x N) with W^T laid out row-major, on the bit-exact model."""
    K, N = w.shape
    int8 = plan.output == "int8"
    C = config.array.cols
    slices = -(-N // C)
    x_addr = 0
    wt_addr = _align(K)
    col_addr = _align(wt_addr + N * K)
    p_addr = _align(col_addr + 4 * slices * C)
    out_addr = _align(p_addr + 8 * slices * C)
    machine = GoldenMachine(config, memory_bytes=_align(out_addr + 4 * N) + 256)
    machine.write(x_addr, x.ravel())
    machine.write(wt_addr, np.ascontiguousarray(w.T))
    words = np.array([int(m) | (int(s) << 16) for m, s in zip(mult, shift)], dtype=np.int64)
    machine.write(p_addr, gemv_params(config, bias, words).astype("<i4"))
    program = gemv_program(config, plan, x_addr=x_addr, wt_addr=wt_addr, out_addr=out_addr,
                           col_addr=col_addr if int8 else None, params_addr=p_addr if int8 else None, relu=relu)
    stats = machine.run(program)
    out = np.frombuffer(machine.read(out_addr, N * (1 if int8 else 4)), np.int8 if int8 else np.dtype("<i4"))
    return out[None], stats, program


GEMV_SHAPES = [(1, 1), (4, 4), (3, 7), (17, 33), (40, 9), (64, 20)]


@pytest.mark.parametrize("config_name", ["tiny", "shallow", "default"])
@pytest.mark.parametrize("shape", GEMV_SHAPES, ids=["x".join(map(str, s)) for s in GEMV_SHAPES])
@pytest.mark.parametrize("max_block_rows, w_slots", [(None, 4), (3, 1), (7, 2)])
def test_gemv_programs_compute_numpy_and_are_race_free(config_name, shape, max_block_rows, w_slots):
    config = CONFIGS[config_name]
    N, K = shape
    w_slots = min(w_slots, config.queues.token_max)
    rng = np.random.default_rng(N * 1000 + K)
    x = rng.integers(-128, 128, (1, K), dtype=np.int8)
    w = rng.integers(-128, 128, (K, N), dtype=np.int8)
    bias, mult, shift = rng.integers(-(1 << 18), 1 << 18, N), rng.integers(0, 1 << 16, N), rng.integers(8, 24, N)
    for output in ("int8", "int32"):
        plan = plan_gemv(config, N, K, output=output, w_slots=w_slots, max_block_rows=max_block_rows)
        relu = output == "int8" and N % 2 == 0
        out, stats, program = run_gemv(config, plan, x, w, bias=bias, mult=mult, shift=shift, relu=relu)
        np.testing.assert_array_equal(out, _expected(x, w, output, bias, mult, shift, relu))
        assert stats.max_tokens <= config.queues.token_max
        assert stats.macs >= N * K  # the array multiplies the whole stationary column


def test_gemv_requant_in_several_passes():
    """More output rows than a third of the accumulator: the requant runs in passes."""
    config = _with_queues(TINY, depth=2)
    N = (config.acc_rows // 3) * config.array.cols * 2 + 3
    K = 5
    rng = np.random.default_rng(7)
    x = rng.integers(-128, 128, (1, K), dtype=np.int8)
    w = rng.integers(-128, 128, (K, N), dtype=np.int8)
    bias, mult, shift = rng.integers(-5000, 5000, N), rng.integers(1, 1 << 16, N), rng.integers(10, 20, N)
    plan = plan_gemv(config, N, K)
    assert -(-N // config.array.cols) > plan.g
    out, _, _ = run_gemv(config, plan, x, w, bias=bias, mult=mult, shift=shift)
    np.testing.assert_array_equal(out, _expected(x, w, "int8", bias, mult, shift, False))


def test_gemv_plan_errors():
    with pytest.raises(GemmError, match="output must be"):
        plan_gemv(TINY, 4, 4, output="int16")
    with pytest.raises(GemmError, match="N=0"):
        plan_gemv(TINY, 0, 4)
    with pytest.raises(GemmError, match="token_max"):
        plan_gemv(SHALLOW, 4, 4, w_slots=4)
    with pytest.raises(GemmError, match="params_addr and col_addr"):
        gemv_program(TINY, plan_gemv(TINY, 4, 4), x_addr=0, wt_addr=0, out_addr=0)


def test_gemv_bundle_round_trip_and_errors():
    from weft.compiler.gemm import build_gemv_bundle

    rng = np.random.default_rng(3)
    w = rng.integers(-128, 128, (21, 13), dtype=np.int8)
    a = rng.integers(-128, 128, (1, 21), dtype=np.int8)
    mult, shift, bias = rng.integers(1, 1 << 16, 13), rng.integers(10, 20, 13), rng.integers(-999, 999, 13)
    words = (mult | (shift << 16)).astype(np.int32)
    for scale_words, output in ((words, "int8"), (None, "int32")):
        bundle = Bundle.from_bytes(build_gemv_bundle(TINY, w, bias=bias if output == "int8" else None,
                                                     scale_words=scale_words).to_bytes(), config=TINY)
        assert bundle.metadata["kernel"] == "gemv" and bundle.outputs[0].dtype == output
        out, _ = run_bundle(bundle, {"a": a}, TINY)
        np.testing.assert_array_equal(out["c"].reshape(1, 13), _expected(a, w, output, bias, mult, shift, False))
    with pytest.raises(GemmError, match="2-D int8"):
        build_gemv_bundle(TINY, w.astype(np.int16))
    with pytest.raises(GemmError, match="bias applies only"):
        build_gemv_bundle(TINY, w, bias=bias)


# ---------------------------------------------------------------------- two-digit A
@pytest.mark.parametrize("config_name", ["tiny", "shallow", "default"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 3, 7), (19, 13, 11), (40, 20, 33)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("max_block_rows", [None, 3])
def test_two_digit_a_computes_the_wide_product(config_name, shape, max_block_rows):
    """A = 16 * hi + lo (two int8 planes): the kernel's result is requant(A @ B + bias) of the
    12-bit A, computed here in numpy int64."""
    from weft.compiler.gemm import digit_gemm_params

    config = CONFIGS[config_name]
    M, N, K = shape
    rng = np.random.default_rng(M + 100 * N + 10_000 * K)
    a12 = rng.integers(-2047, 2048, (M, K))
    hi = np.clip(np.rint(a12 / 16), -128, 127).astype(np.int64)  # as the vector unit splits: hi saturates
    lo = a12 - 16 * hi
    b = rng.integers(-128, 128, (K, N), dtype=np.int8)
    bias, mult, shift = rng.integers(-5000, 5000, N), rng.integers(1, 1 << 16, N), rng.integers(14, 24, N)
    plan = plan_gemm(config, M, N, K, max_block_rows=max_block_rows, a_digits=True)
    a_addr, plane = 0, _align(M * K)
    b_addr = 2 * plane
    p_addr = _align(b_addr + K * N)
    out_addr = _align(p_addr + 12 * (N + config.array.cols))
    machine = GoldenMachine(config, memory_bytes=_align(out_addr + M * N) + 256)
    machine.write(a_addr, hi.astype(np.int8))
    machine.write(a_addr + plane, lo.astype(np.int8))
    machine.write(b_addr, b)
    words = (mult | (shift << 16)).astype(np.int64)
    machine.write(p_addr, digit_gemm_params(config, bias, words).astype("<i4"))
    program = gemm_program(config, plan, a_addr=a_addr, b_addr=b_addr, out_addr=out_addr, params_addr=p_addr,
                           a_plane=plane)
    stats = machine.run(program)
    out = np.frombuffer(machine.read(out_addr, M * N), np.int8).reshape(M, N)
    exact = a12 @ b.astype(np.int64)
    want = np.array([[ref_requant(int(exact[i, j]), int(bias[j]), int(mult[j]), int(shift[j]), False)
                      for j in range(N)] for i in range(M)])
    np.testing.assert_array_equal(out, want)
    assert stats.max_tokens <= config.queues.token_max
    assert stats.macs == 2 * M * N * K


@pytest.mark.parametrize("config_name", ["tiny", "default"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (19, 13, 11), (40, 20, 33)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("digits", [False, True])
@pytest.mark.parametrize("biased", [False, True])
def test_wide_output_adds_bias_and_column_factors(config_name, shape, digits, biased):
    """``wide`` output: ``rhe(((16 hi + lo) @ B + bias) * f_n * M / 2^s)`` per element in int32,
    the residual's int32 hand-off, computed here in numpy int64 (round half to even)."""
    from weft.compiler.gemm import wide_gemm_params

    config = CONFIGS[config_name]
    M, N, K = shape
    rng = np.random.default_rng(7 + M + 100 * N + 10_000 * K)
    a = rng.integers(-2047, 2048, (M, K)) if digits else rng.integers(-128, 128, (M, K))
    hi = np.clip(np.rint(a / 16), -128, 127).astype(np.int64) if digits else a
    lo = a - 16 * hi
    b = rng.integers(-128, 128, (K, N), dtype=np.int8)
    bias, factors = rng.integers(-50_000, 50_000, N) * biased, rng.integers(1, 128, N)
    mult, shift = 3, 5
    plan = plan_gemm(config, M, N, K, output="wide", a_digits=digits, max_block_rows=7)
    plane = _align(M * K)
    b_addr = 2 * plane
    p_addr = _align(b_addr + K * N)
    params = wide_gemm_params(config, bias, factors, int(mult | (shift << 16)))
    out_addr = _align(p_addr + params.size)
    machine = GoldenMachine(config, memory_bytes=_align(out_addr + 4 * M * N) + 256)
    machine.write(0, hi.astype(np.int8))
    machine.write(plane, lo.astype(np.int8))
    machine.write(b_addr, b)
    machine.write(p_addr, params)
    program = gemm_program(config, plan, a_addr=0, b_addr=b_addr, out_addr=out_addr, params_addr=p_addr,
                           a_plane=plane if digits else None, wide_bias=biased)
    stats = machine.run(program)
    out = np.frombuffer(machine.read(out_addr, 4 * M * N), "<i4").reshape(M, N)
    prod = (a @ b.astype(np.int64) + bias) * factors * mult
    q, r = np.divmod(prod, 1 << shift)  # round half to even
    half = 1 << (shift - 1)
    want = q + ((r > half) | ((r == half) & (q % 2 == 1)))
    np.testing.assert_array_equal(out, np.clip(want, -2**31, 2**31 - 1))
    assert stats.max_tokens <= config.queues.token_max


def test_two_digit_a_errors():
    with pytest.raises(GemmError, match="needs int8 or wide output"):
        plan_gemm(TINY, 4, 4, 4, output="int32", a_digits=True)
    with pytest.raises(GemmError, match="a_plane"):
        gemm_program(TINY, plan_gemm(TINY, 4, 4, 4, a_digits=True), a_addr=0, b_addr=0, out_addr=0, params_addr=0)


@pytest.mark.parametrize("config_name", ["tiny", "default"])
@pytest.mark.parametrize("shape", [(1, 1), (17, 33), (64, 20)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("output", ["int8", "int32"])
def test_gemv_two_digit_x_computes_the_wide_product(config_name, shape, output):
    """x = 16 * hi + lo as two stationary columns, combined by vbin rope: x12 @ W in numpy int64."""
    from weft.compiler.gemm import gemv_digit_consts

    config = CONFIGS[config_name]
    N, K = shape
    rng = np.random.default_rng(N + 1000 * K)
    x12 = rng.integers(-2047, 2048, K)
    hi = np.clip(np.rint(x12 / 16), -128, 127).astype(np.int64)
    lo = x12 - 16 * hi
    w = rng.integers(-128, 128, (K, N), dtype=np.int8)
    bias, mult, shift = rng.integers(-5000, 5000, N), rng.integers(1, 1 << 16, N), rng.integers(14, 24, N)
    C = config.array.cols
    slices = -(-N // C)
    x_addr, plane = 0, _align(K)
    wt_addr = 2 * plane
    consts = _align(wt_addr + N * K)
    col_addr = consts + 256
    p_addr = _align(col_addr + 4 * slices * C)
    out_addr = _align(p_addr + 8 * slices * C)
    machine = GoldenMachine(config, memory_bytes=_align(out_addr + 4 * N) + 256)
    machine.write(x_addr, hi.astype(np.int8))
    machine.write(x_addr + plane, lo.astype(np.int8))
    machine.write(wt_addr, np.ascontiguousarray(w.T))
    machine.write(consts, gemv_digit_consts())
    words = (mult | (shift << 16)).astype(np.int64)
    machine.write(p_addr, gemv_params(config, bias, words).astype("<i4"))
    plan = plan_gemv(config, N, K, output=output, x_digits=True, max_block_rows=7)
    program = gemv_program(config, plan, x_addr=x_addr, wt_addr=wt_addr, out_addr=out_addr,
                           col_addr=col_addr if output == "int8" else None,
                           params_addr=p_addr if output == "int8" else None, x_plane=plane, digit_consts=consts)
    stats = machine.run(program)
    int8 = output == "int8"
    out = np.frombuffer(machine.read(out_addr, N * (1 if int8 else 4)), np.int8 if int8 else np.dtype("<i4"))
    exact = x12 @ w.astype(np.int64)
    want = exact if not int8 else np.array([ref_requant(int(exact[j]), int(bias[j]), int(mult[j]), int(shift[j]), False)
                                            for j in range(N)])
    np.testing.assert_array_equal(out, want)
    assert stats.max_tokens <= config.queues.token_max
