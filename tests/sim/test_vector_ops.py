"""Vector-unit operations (vbin, vmap, vrow): exact integer semantics checked on hand-computed
cases, accuracy checked against float64 PyTorch/numpy, and whole programs through the
bit-exact model with tokens, race and initialisation checks."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from weft.hw.vector_numerics import fixed_point_scale
from weft.hw import vector_numerics as vn
from weft.hw.config import AcceleratorConfig, load_config
from weft.hw.isa import Instruction, IsaError, Opcode, assemble, disassemble
from weft.sim.golden import GoldenMachine, ProgramError, RaceError, UninitializedReadError
from weft.sim.vector_bench import slice_major

DEFAULT = load_config("default")
TINY = load_config("tiny")
C = DEFAULT.acc_row_elems
RNG_SEED = 1234


def word(m: int, s: int) -> int:
    """Scale word packed by hand: multiplier in bits 15..0, shift in bits 21..16."""
    return m | (s << 16)


def rhe(value: Fraction) -> int:
    return round(value)  # Python rounds a Fraction half to even


# ---------------------------------------------------------------------- ISA
def test_vector_ops_encode_and_assemble_with_function_names():
    text = ("vbin func=add a_mem=sp a=0x10 b_mem=acc b=0x20 dst_mem=sp dst=0x30 param=0x4 rows=8\n"
            "vmap func=gelu src_mem=acc src=0x0 dst_mem=sp dst=0x8 param=0x2 rows=3 wait=load signal=store\n"
            "vrow func=softmax src_mem=acc src=0x0 dst=0x40 param=0x9 rows=4 len=100 causal=1 unsigned=0 wide=0\n"
            "vrow func=softmax src_mem=acc src=0x0 dst=0x40 param=0x9 rows=4 len=100 causal=0 unsigned=0 wide=1\n")
    program = assemble(text)
    assert disassemble(program) == text
    for instr in program:
        assert Instruction.decode(instr.encode()) == instr
    assert program[2].func == 2 and program[2].len == 100
    assert program[2].wide == 0 and program[3].wide == 1
    # `wide` is bit 114 (after `unsigned`, bit 113); a flag left out of the text is 0.
    assert (int.from_bytes(program[3].encode(), "little") >> 113) & 3 == 0b10
    assert assemble("vrow func=softmax src_mem=acc src=0 dst=0x40 param=9 rows=4 len=100")[0].wide == 0
    assert Instruction.make(Opcode.VMAP, func="silu", src_mem=0, src=0, dst_mem=0, dst=0, param=0, rows=1).func == 2
    with pytest.raises(IsaError, match="not one of"):
        Instruction.make(Opcode.VMAP, func="tanh", src_mem=0, src=0, dst_mem=0, dst=0, param=0, rows=1)
    # Reserved function numbers still round-trip as numbers (the model refuses to run them).
    reserved = Instruction.make(Opcode.VROW, func=7, src_mem=1, src=0, dst=0, param=0, rows=1, len=1)
    assert "func=7" in str(reserved) and assemble(str(reserved))[0] == reserved


# ---------------------------------------------------------------------- exact: softmax
def softmax_exact(x, valid=None, *, scale=2e-3, unsigned=False, wide=False):
    x = np.asarray(x, dtype=np.int64)
    w = vn.softmax_params(scale, kv_len=x.shape[-1], cols=C).ravel()[0]
    return vn.softmax_rows(x, w, np.ones(x.shape, bool) if valid is None else valid, unsigned=unsigned, wide=wide)


def test_softmax_all_equal_rows_split_evenly():
    # e = 2^15 each; S = L * 2^15; R = floor(Q * 2^32 / S); p = rhe(2^15 * R / 2^32).
    assert softmax_exact([[7, 7, 7, 7]]).tolist() == [[32, 32, 32, 32]]  # 127/4 = 31.75
    assert softmax_exact([[7, 7, 7, 7]], unsigned=True).tolist() == [[64, 64, 64, 64]]  # 63.75
    assert softmax_exact([[-5, -5]]).tolist() == [[64, 64]]  # 63.5 -> even 64
    assert softmax_exact([[0, 0, 0]]).tolist() == [[42, 42, 42]]  # 42.33
    assert softmax_exact([[7, 7, 7, 7]], wide=True).tolist() == [[512] * 4]  # 2047/4 = 511.75
    assert softmax_exact([[0, 0, 0]], wide=True).tolist() == [[682] * 3]  # 682.33
    # wide takes precedence over unsigned
    assert softmax_exact([[0, 0, 0]], wide=True, unsigned=True).tolist() == [[682] * 3]


def test_softmax_length_one_and_extremes():
    assert softmax_exact([[123456]]).tolist() == [[127]]
    assert softmax_exact([[-(1 << 31)]], unsigned=True).tolist() == [[255]]
    assert softmax_exact([[5]], wide=True).tolist() == [[vn.SOFTMAX_WIDE_LEVELS]] == [[2047]]
    row = [(1 << 31) - 1, -(1 << 31), -(1 << 31)]  # difference 2^32 - 1: exponent saturates, e = 0
    assert softmax_exact([row]).tolist() == [[127, 0, 0]]


def test_softmax_masks_fully_masked_rows_give_zeros():
    x = np.zeros((4, 5), dtype=np.int64)
    none = vn.softmax_mask(4, 5, kv_len=0, causal=False, offset=0)
    assert not softmax_exact(x, none).any()
    causal = vn.softmax_mask(4, 5, kv_len=5, causal=True, offset=-2)  # rows 0, 1 see no key
    p = softmax_exact(x, causal)
    assert not p[:2].any()
    assert p[2].tolist() == [127, 0, 0, 0, 0] and p[3].tolist() == [64, 64, 0, 0, 0]


def test_softmax_causal_offset_decode_step():
    # Decode: one query row at position t attends to keys 0..t (offset = t), kv_len = t + 1.
    t, L = 5, 8
    mask = vn.softmax_mask(1, L, kv_len=t + 1, causal=True, offset=t)
    assert mask.tolist() == [[True] * 6 + [False] * 2]
    mask = vn.softmax_mask(3, 6, kv_len=4, causal=True, offset=1)  # both masks at once
    assert mask.astype(int).tolist() == [[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]]
    p = softmax_exact(np.zeros((3, 6), np.int64), mask)
    for r, n in enumerate((2, 3, 4)):
        assert p[r, :n].tolist() == [rhe(Fraction(127 * (1 << 15) * ((127 << 32) // (n << 15)), 127 << 32))] * n
        assert not p[r, n:].any()


def test_exp2_unit_is_exact_at_integer_exponents():
    # d * M / 2^s = k * 2^17 exactly: e = rshr(2^15, k).
    w = word(1 << 15, 15)  # u = d * 2^15 / 2^15 = d: a difference of 2^17 is one halving
    x = np.array([[0, -(1 << 17), -(2 << 17), -(15 << 17)]])
    p = vn.softmax_rows(x, w, np.ones(x.shape, bool), unsigned=True)
    total = (1 << 15) + (1 << 14) + (1 << 13) + 1
    recip = (255 << 32) // total
    expected = [rhe(Fraction(e * recip, 1 << 32)) for e in ((1 << 15), (1 << 14), (1 << 13), 1)]
    assert p.tolist() == [expected]


# ---------------------------------------------------------------------- exact: element-wise
def test_add_mul_scale_rounding_and_saturation():
    assert vn.vec_add([3, 5, -3, 100], [2, 0, 0, 100], word(1, 1), word(1, 1), vn.INT8).tolist() == [2, 2, -2, 100]
    assert vn.vec_add([127], [127], word(1, 0), word(1, 0), vn.INT8).tolist() == [127]
    assert vn.vec_add([127], [127], word(1, 0), word(1, 0), vn.INT32).tolist() == [254]
    assert vn.vec_mul([-7, 7], [9, 9], word(1, 2), vn.INT8).tolist() == [-16, 16]  # -15.75, 15.75
    assert vn.vec_scale([1 << 20, -(1 << 20), 3], word(1, 1), vn.INT8).tolist() == [127, -128, 2]
    assert vn.vec_scale([-128, 127], word(1, 0), vn.INT32).tolist() == [-128, 127]
    # Different shifts are aligned exactly: 3/2 + 5/8 = 2.125 -> 2; 1/2 + 1/2 = 1.
    assert vn.vec_add([3, 1], [5, 4], word(1, 1), word(1, 3), vn.INT8).tolist() == [2, 1]
    with pytest.raises(vn.VectorParamError, match="more than 15"):
        vn.vec_add([1], [1], word(1, 1), word(1, 17), vn.INT8)
    with pytest.raises(vn.VectorParamError, match="reserved bits"):
        vn.vec_scale([1], 1 << 22, vn.INT8)


def test_rope_quarter_turn_and_identity():
    x = np.array([[5, 7, -3, 4]])
    table = np.array([[0, 1 << 14, 1 << 14, 0]])  # pair 0: 90 degrees, pair 1: 0 degrees
    assert vn.vec_rope(x, table, word(1, 14), vn.INT8).tolist() == [[-7, 5, -3, 4]]


def test_gelu_silu_exact_points():
    w_in = vn.gelu_params(1 / 16, 1 / 16, cols=C).ravel()  # same scale in and out
    assert (w_in[1] & 0xFFFF, w_in[1] >> 16) == (1 << 15, 15)
    x = np.array([0, 100, -100, 127, -128])  # |x| / 16 >= 4: past the table, Phi = 1 or 0
    assert vn.vec_gelu(x, w_in[0], w_in[1]).tolist() == [0, 100, 0, 127, 0]
    w_s = vn.silu_params(1.0, 1.0, cols=C).ravel()
    assert vn.vec_silu(np.array([0, 20, -20, 1000]), w_s[0], w_s[1]).tolist() == [0, 20, 0, 127]
    # g(0) = 1/2 exactly, so x * g at the first segment start is exact.
    assert vn.pq_eval(vn.GELU_TABLE, 0) == 1 << 14 and vn.pq_eval(vn.SILU_TABLE, 0) == 1 << 14
    assert vn.pq_eval(vn.EXP2_TABLE, 0) == 1 << 15


# ---------------------------------------------------------------------- exact: rows
def test_row_max_sum_exact():
    x = np.array([[1, -5, 3], [(1 << 31) - 1, (1 << 31) - 1, 0]])
    assert vn.row_max(x).tolist() == [3, (1 << 31) - 1]
    assert vn.row_sum(x).tolist() == [-1, (1 << 31) - 1]  # saturated


def test_norms_of_constant_rows_give_the_bias():
    P = vn.layernorm_params(0.1, np.ones(4), np.array([0.5, -0.5, 0.0, 1.0]), 1 / 64, cols=4)
    sh, gain, bias = int(P[0, 0]), P[1].astype(np.int64), P[2].astype(np.int64)
    assert bias.tolist() == [32 << 16, -32 << 16, 0, 64 << 16]
    for row in ([9, 9, 9, 9], [-128, -128, -128, -128]):
        assert vn.layernorm_rows(np.array([row]), sh, gain, bias).tolist() == [[32, -32, 0, 64]]
    assert vn.layernorm_rows(np.array([[42]]), sh, gain[:1], bias[:1]).tolist() == [[32]]  # L = 1
    R = vn.rmsnorm_params(0.1, np.ones(4), 1 / 64, cols=4)
    assert vn.rmsnorm_rows(np.zeros((1, 4), np.int64), int(R[0, 0]), R[1]).tolist() == [[0, 0, 0, 0]]


def test_layernorm_two_values_exact():
    # x = [a, b]: normalised values are exactly -1 and +1; with gamma = 1, out_scale 1/32: -32, 32.
    P = vn.layernorm_params(1.0, np.ones(2), np.zeros(2), 1 / 32, cols=4)
    y = vn.layernorm_rows(np.array([[-3, 11], [100, -100]]), int(P[0, 0]), P[1, :2], P[2, :2])
    assert y.tolist() == [[-32, 32], [32, -32]]
    R = vn.rmsnorm_params(1.0, np.ones(2), 1 / 32, cols=4)
    assert vn.rmsnorm_rows(np.array([[5, -5], [7, 0]]), int(R[0, 0]), R[1, :2]).tolist() == [[32, -32], [45, 0]]


# ---------------------------------------------------------------------- parameter helpers
def test_fixed_point_matches_the_compiler_rule():
    for real in (1e-7, 3.3e-4, 0.5, 1.0, 1.7, 1234.5):
        m, s = fixed_point_scale(real)
        assert vn.fixed_point(real) == (int(m[0]), int(s[0]))


@pytest.mark.parametrize("table", [vn.EXP2_TABLE, vn.GELU_TABLE, vn.SILU_TABLE], ids=lambda t: t.name)
def test_coefficient_roms_approximate_their_functions(table):
    fitted = vn.fit_pq_table(table.reference, table.segments, table.segment_width, int(table.coeffs[0, 0]))
    assert np.array_equal(np.array(fitted), table.coeffs)  # reproducible from the fit
    z = np.arange(table.segments << vn.PQ_FRAC_BITS)
    exact = table.reference(z / (1 << vn.PQ_FRAC_BITS) * table.segment_width) * (1 << vn.PQ_OUT_BITS)
    assert np.abs(vn.pq_eval(table, z) - exact).max() < 4  # below 4 * 2^-15 = 1.2e-4 everywhere


def test_param_helpers_refuse_unrepresentable_scales():
    with pytest.raises(vn.VectorParamError, match="too large"):
        vn.softmax_params(1.0, kv_len=4, cols=C)
    with pytest.raises(vn.VectorParamError, match="non-negative"):
        vn.gelu_params(-1.0, 0.1, cols=C)


# ---------------------------------------------------------------------- accuracy vs float64
def test_softmax_accuracy_with_masks():
    rng = np.random.default_rng(RNG_SEED)
    M, L, scale = 24, 77, 1.5e-3
    scores = rng.normal(0, 3, (M, L)) + rng.standard_t(3, (M, L))
    x = np.rint(scores / scale).astype(np.int64)
    mask = vn.softmax_mask(M, L, kv_len=70, causal=True, offset=50)
    w = vn.softmax_params(scale, kv_len=70, causal_offset=50, cols=C).ravel()[0]
    ref = torch.softmax(torch.tensor(x * scale).masked_fill(~torch.tensor(mask), -math.inf), -1).numpy()
    for unsigned in (False, True):
        p = vn.softmax_rows(x, w, mask, unsigned=unsigned) * vn.softmax_output_scale(unsigned)
        assert np.abs(p - ref).max() <= 0.6 * vn.softmax_output_scale(unsigned) + 1e-3
        assert not p[~mask].any()
    # wide (1/2047): the output rounding plus the exp2 approximation (relative 6e-5 of p <= 1)
    p = vn.softmax_rows(x, w, mask, wide=True) * vn.softmax_output_scale(False, wide=True)
    assert np.abs(p - ref).max() <= 0.6 / 2047 + 1e-4
    assert not p[~mask].any()


@pytest.mark.parametrize("func", ["gelu", "silu"])
@pytest.mark.parametrize("wide", [False, True], ids=["int8-in", "int32-in"])
def test_gelu_silu_within_one_lsb(func, wide):
    rng = np.random.default_rng(RNG_SEED)
    xr = np.concatenate([rng.normal(0, 2, 4000), rng.standard_t(2, 1000) * 3, np.linspace(-20, 20, 2001)])
    in_scale, out_scale = (2e-4, 8 / 127) if wide else (6 / 127, 6 / 127)
    bounds = vn.INT32 if wide else vn.INT8
    x = vn.saturate(np.rint(xr / in_scale), bounds)
    params = (vn.gelu_params if func == "gelu" else vn.silu_params)(in_scale, out_scale, cols=C).ravel()
    y = (vn.vec_gelu if func == "gelu" else vn.vec_silu)(x, params[0], params[1])
    fn = torch.nn.functional.gelu if func == "gelu" else torch.nn.functional.silu
    ref = np.clip(fn(torch.tensor(x * in_scale, dtype=torch.float64)).numpy() / out_scale, -128, 127)
    assert np.abs(y - ref).max() <= 0.51  # the int8 rounding itself: the approximation adds < 0.01 LSB


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("wide", [False, True], ids=["int8-in", "int32-in"])
def test_norm_accuracy(rms, wide):
    rng = np.random.default_rng(RNG_SEED)
    M, L = 16, 200
    xr = rng.normal(0.4, 1.3, (M, L))
    xr[:, 7] *= 15  # an outlier channel, as real residual streams have
    in_scale = 1e-3 if wide else float(np.abs(xr).max() / 127)
    x = vn.saturate(np.rint(xr / in_scale), vn.INT32 if wide else vn.INT8)
    gamma, beta = rng.normal(1, 0.3, L), rng.normal(0, 0.2, L)
    xt = torch.tensor(x * in_scale)
    if rms:
        ref = (xt / torch.sqrt((xt * xt).mean(-1, keepdim=True)) * torch.tensor(gamma)).numpy()
    else:
        ref = torch.nn.functional.layer_norm(xt, (L,), torch.tensor(gamma), torch.tensor(beta), eps=0).numpy()
    out_scale = 2.0 ** -10  # fine output: measures the algorithm, not int8 rounding
    n = -(-L // C)
    if rms:
        P = vn.rmsnorm_params(in_scale, gamma, out_scale, cols=C)
        y = vn.rmsnorm_rows(x, int(P[0, 0]), P[1:1 + n].ravel()[:L], out=vn.INT32)
    else:
        P = vn.layernorm_params(in_scale, gamma, beta, out_scale, cols=C)
        y = vn.layernorm_rows(x, int(P[0, 0]), P[1:1 + n].ravel()[:L], P[1 + n:].ravel()[:L], out=vn.INT32)
    err = y * out_scale - ref
    assert np.linalg.norm(err) / np.linalg.norm(ref) < 1e-3
    assert np.abs(err).max() < 4 * out_scale


def test_rope_accuracy():
    rng = np.random.default_rng(RNG_SEED)
    pos, dh = np.arange(30, 46), 64
    x_scale, out_scale = 4 / 127, 4 / 127
    x = vn.saturate(np.rint(rng.normal(0, 1, (len(pos), dh)) / x_scale), vn.INT8)
    table = vn.rope_table(pos, dh)
    w = vn.rope_params(x_scale, out_scale, cols=C).ravel()[0]
    y = vn.vec_rope(x, table, w, vn.INT8)
    xc = torch.tensor(x * x_scale).view(len(pos), dh // 2, 2)
    ang = torch.tensor(pos, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, dh, 2) / dh)[None]
    c, s = torch.cos(ang), torch.sin(ang)
    ref = torch.stack([xc[..., 0] * c - xc[..., 1] * s, xc[..., 0] * s + xc[..., 1] * c], -1).reshape(len(pos), dh)
    assert np.abs(y - np.clip(ref.numpy() / out_scale, -128, 127)).max() <= 0.52


def test_add_mul_accuracy():
    rng = np.random.default_rng(RNG_SEED)
    a = rng.integers(-128, 128, 5000)
    b = rng.integers(-(1 << 20), 1 << 20, 5000)
    sa, sb, so = 0.031, 2.1e-6, 0.05
    w = vn.add_params(sa, sb, so, cols=C).ravel()
    y = vn.vec_add(a, b, w[0], w[1], vn.INT8)
    ref = np.clip((a * sa + b * sb) / so, -128, 127)
    assert np.abs(y - ref).max() <= 0.5 + 1e-3
    g = rng.integers(-128, 128, 5000)
    w = vn.mul_params(0.02, 2.1e-6, 0.01, cols=C).ravel()
    y = vn.vec_mul(g, b, w[0], vn.INT8)
    assert np.abs(y - np.clip(g * 0.02 * b * 2.1e-6 / 0.01, -128, 127)).max() <= 0.5 + 1e-3


# ---------------------------------------------------------------------- programs on the golden model
def _i(op, **kw):
    return Instruction.make(op, **kw)


def _load(mem, local, dram, rows, cols, stride, **tok):
    return _i(Opcode.LOAD, mem=mem, local=local, dram=dram, rows=rows, cols=cols, stride=stride, **tok)


def _store(mem, local, dram, rows, cols, stride, **tok):
    return _i(Opcode.STORE, mem=mem, local=local, dram=dram, rows=rows, cols=cols, stride=stride, **tok)


def slice_major_loads(mem, base, dram, M, L, E, esize):
    return [_load(mem, base + c * M, dram + c * E * esize, M, min(E, L - c * E), L * esize)
            for c in range(-(-L // E))]


def slice_major_stores(mem, base, dram, M, L, E, esize):
    return [_store(mem, base + c * M, dram + c * E * esize, M, min(E, L - c * E), L * esize)
            for c in range(-(-L // E))]


def with_tokens(instrs, *, signal=None, wait=None):
    """Last instruction signals (its queue's clock covers the earlier ones); first one waits."""
    instrs = list(instrs)
    if signal:
        instrs[-1] = instrs[-1].with_tokens(signal=signal)
    if wait:
        instrs[0] = instrs[0].with_tokens(wait=wait)
    return instrs


NONSQUARE = AcceleratorConfig.from_dict({
    "schema": 1, "name": "nonsquare", "array": {"rows": 8, "cols": 4}, "scratchpad": {"kib": 4, "banks": 1},
    "accumulator": {"kib": 4, "banks": 1}, "vector": {"lanes": 4}, "bus": {"data_bits": 32},
    "device_memory": {"mib": 1}, "clock_mhz": 100})


@pytest.mark.parametrize("cfg", [DEFAULT, TINY, NONSQUARE], ids=lambda c: c.name)
@pytest.mark.parametrize("causal", [False, True])
def test_softmax_program_through_the_golden_model(cfg, causal):
    """LOAD scores and parameters -> vrow softmax -> STORE, ordered by tokens; rows longer
    than one slice; the result equals the numerics on the logical tensor."""
    rng = np.random.default_rng(RNG_SEED)
    M, L, scale = 5, 3 * cfg.acc_row_elems + 3, 2e-3
    x = rng.integers(-4000, 4000, (M, L)).astype(np.int32)
    P = vn.softmax_params(scale, kv_len=L - 2, causal_offset=L - M - 1, cols=cfg.acc_row_elems)
    E_acc, E_sp = cfg.acc_row_elems, cfg.sp_row_elems
    X, PAR, OUT = 0x1000, 0x100, 0x8000
    g = GoldenMachine(cfg, memory_bytes=1 << 16)
    g.write(X, x.astype("<i4"))
    g.write(PAR, P.astype("<i4"))
    prog = slice_major_loads(1, 0, X, M, L, E_acc, 4) + [_load(1, 100, PAR, len(P), E_acc, E_acc * 4)]
    prog = with_tokens(prog, signal=["vector"])
    prog.append(_i(Opcode.VROW, func="softmax", src_mem=1, src=0, dst=8, param=100, rows=M, len=L,
                   causal=int(causal), wait=["load"], signal=["store"]))
    prog += with_tokens(slice_major_stores(0, 8, OUT, M, L, E_sp, 1), wait=["vector"])
    prog.append(_i(Opcode.HALT))
    stats = g.run(prog)
    assert stats.instructions["vrow"] == 1
    got = np.frombuffer(g.read(OUT, M * L), dtype=np.int8).reshape(M, L)
    mask = vn.softmax_mask(M, L, L - 2, causal, L - M - 1)
    expected = vn.softmax_rows(x, P.ravel()[0], mask)
    assert np.array_equal(got, expected)
    # Elements past L in the last scratchpad slice are zero.
    last = 8 + (-(-L // E_sp) - 1) * M
    assert not g.sp[last:last + M, L % E_sp or E_sp:].any()


@pytest.mark.parametrize("cfg", [DEFAULT, TINY, NONSQUARE], ids=lambda c: c.name)
@pytest.mark.parametrize("causal", [False, True])
def test_wide_softmax_program_writes_int32_probabilities_to_the_accumulator(cfg, causal):
    """`vrow softmax wide=1`: random int32 scores, key padding and (optionally) a causal mask,
    rows longer than one slice; int32 probabilities at 1/2047 land slice-major in the
    accumulator (its row width), equal to the numerics and within 0.6/2047 (+ the exp2
    approximation) of float softmax. `unsigned` is ignored when `wide` is set."""
    rng = np.random.default_rng(RNG_SEED + 1)
    E = cfg.acc_row_elems
    M, L, scale = 5, 3 * E + 3, 4e-9  # full-range int32 scores: real values within +-8.6
    n = -(-L // E)
    x = rng.integers(-(1 << 31), 1 << 31, (M, L)).astype(np.int32)
    kv_len, offset = L - 2, L - M - 2
    P = vn.softmax_params(scale, kv_len=kv_len, causal_offset=offset, cols=E)
    X, PAR, OUT = 0x1000, 0x100, 0x8000
    DST = 100 + len(P)  # the accumulator rows after the parameter row
    g = GoldenMachine(cfg, memory_bytes=1 << 16)
    g.write(X, x.astype("<i4"))
    g.write(PAR, P.astype("<i4"))
    prog = slice_major_loads(1, 0, X, M, L, E, 4) + [_load(1, 100, PAR, len(P), E, E * 4)]
    prog = with_tokens(prog, signal=["vector"])
    prog.append(_i(Opcode.VROW, func="softmax", src_mem=1, src=0, dst=DST, param=100, rows=M, len=L,
                   causal=int(causal), unsigned=1, wide=1, wait=["load"], signal=["store"]))
    prog += with_tokens(slice_major_stores(1, DST, OUT, M, L, E, 4), wait=["vector"])
    prog.append(_i(Opcode.HALT))
    g.run(prog)
    got = np.frombuffer(g.read(OUT, M * L * 4), dtype="<i4").reshape(M, L)
    mask = vn.softmax_mask(M, L, kv_len, causal, offset)
    assert np.array_equal(got, vn.softmax_rows(x, P.ravel()[0], mask, wide=True))
    assert got.min() >= 0 and got.max() <= 2047 and not got[~mask].any()
    assert got.max() > 255  # really the wide range, not int8/uint8
    ref = torch.softmax(torch.tensor(x * scale).masked_fill(~torch.tensor(mask), -math.inf), -1).numpy()
    assert np.abs(got / 2047 - ref).max() <= 0.6 / 2047 + 1e-4
    # The output spans n slices of M accumulator rows; elements past L in the last slice are zero.
    assert np.array_equal(g.acc[DST:DST + n * M], slice_major(got, E))


def test_wide_softmax_in_place_and_wide_ignored_by_other_functions():
    cfg = TINY
    rng = np.random.default_rng(RNG_SEED)
    E = cfg.acc_row_elems
    M, L = 3, 2 * E + 1
    x = rng.integers(-3000, 3000, (M, L)).astype(np.int32)
    P = vn.softmax_params(0.01, kv_len=L, cols=E)
    g = GoldenMachine(cfg, memory_bytes=1 << 14)
    g.write(0x1000, x.astype("<i4"))
    g.write(0x100, P.astype("<i4"))
    prog = with_tokens(slice_major_loads(1, 0, 0x1000, M, L, E, 4) + [_load(1, 50, 0x100, len(P), E, E * 4)],
                       signal=["vector"])
    prog += [
        _i(Opcode.VROW, func="max", src_mem=1, src=0, dst=40, param=0, rows=M, len=L, wide=1, wait=["load"]),
        _i(Opcode.VROW, func="softmax", src_mem=1, src=0, dst=0, param=50, rows=M, len=L, wide=1,
           signal=["store"]),  # in place: dst == src
        _store(1, 40, 0x2000, M, 1, 4, wait=["vector"]),
        _i(Opcode.HALT),
    ]
    g.run(prog)
    assert np.frombuffer(g.read(0x2000, M * 4), dtype="<i4").tolist() == x.max(1).tolist()
    expected = vn.softmax_rows(x, P.ravel()[0], np.ones((M, L), bool), wide=True)
    assert np.array_equal(g.acc[:3 * M], slice_major(expected, E))


def test_layernorm_then_gelu_then_add_program():
    cfg = DEFAULT
    rng = np.random.default_rng(RNG_SEED)
    M, L, E = 6, 40, cfg.acc_row_elems
    n = -(-L // E)
    x = rng.integers(-30000, 30000, (M, L)).astype(np.int32)
    gamma, beta = rng.normal(1, 0.2, L), rng.normal(0, 0.1, L)
    P_ln = vn.layernorm_params(1e-4, gamma, beta, 4 / 127, cols=E)
    P_g = vn.gelu_params(4 / 127, 3 / 127, cols=E)
    P_add = vn.add_params(3 / 127, 4 / 127, 5 / 127, cols=E)
    g = GoldenMachine(cfg, memory_bytes=1 << 16)
    g.write(0x1000, x.astype("<i4"))
    params = np.concatenate([P_ln, P_g, P_add])
    g.write(0x4000, params.astype("<i4"))
    rows_ln, rows_g = len(P_ln), len(P_g)
    prog = slice_major_loads(1, 0, 0x1000, M, L, E, 4) + [_load(1, 200, 0x4000, len(params), E, E * 4)]
    prog = with_tokens(prog, signal=["vector"])
    V = dict(rows=M * n)
    prog += [
        _i(Opcode.VROW, func="layernorm", src_mem=1, src=0, dst=0, param=200, rows=M, len=L, wait=["load"]),
        _i(Opcode.VMAP, func="gelu", src_mem=0, src=0, dst_mem=0, dst=100, param=200 + rows_ln, **V),
        _i(Opcode.VBIN, func="add", a_mem=0, a=100, b_mem=0, b=0, dst_mem=0, dst=100,
           param=200 + rows_ln + rows_g, signal=["store"], **V),
    ]
    prog += with_tokens(slice_major_stores(0, 100, 0x8000, M, L, E, 1), wait=["vector"])
    prog.append(_i(Opcode.HALT))
    g.run(prog)
    got = np.frombuffer(g.read(0x8000, M * L), dtype=np.int8).reshape(M, L)
    ln = vn.layernorm_rows(x, int(P_ln[0, 0]), P_ln[1:1 + n].ravel()[:L], P_ln[1 + n:].ravel()[:L])
    ge = vn.vec_gelu(ln, P_g[0, 0], P_g[0, 1])
    assert np.array_equal(got, vn.vec_add(ge, ln, P_add[0, 0], P_add[0, 1], vn.INT8))


def test_reductions_and_conversion_program():
    cfg = TINY
    M, L, E = 3, 10, cfg.sp_row_elems
    x = np.arange(M * L, dtype=np.int8).reshape(M, L) - 15
    g = GoldenMachine(cfg, memory_bytes=1 << 14)
    g.write(0x100, x)
    g.write(0x400, vn.scale_params(1.0, 1.0, cols=cfg.acc_row_elems).astype("<i4"))
    prog = with_tokens(slice_major_loads(0, 0, 0x100, M, L, E, 1) + [_load(1, 50, 0x400, 1, 4, 16)],
                       signal=["vector"])
    prog += [
        _i(Opcode.VROW, func="max", src_mem=0, src=0, dst=0, param=0, rows=M, len=L, wait=["load"]),
        _i(Opcode.VROW, func="sum", src_mem=0, src=0, dst=M, param=0, rows=M, len=L),
        _i(Opcode.VMAP, func="scale", src_mem=0, src=0, dst_mem=1, dst=10, param=50, rows=M * 3, signal=["store"]),
        _store(1, 0, 0x800, 2 * M, 1, 4, wait=["vector"]),
        _i(Opcode.HALT),
    ]
    g.run(prog)
    got = np.frombuffer(g.read(0x800, 2 * M * 4), dtype="<i4")
    assert got.tolist() == x.max(1).tolist() + x.astype(int).sum(1).tolist()
    assert np.array_equal(g.acc[10:10 + M, :4], x[:, :4])  # int8 -> int32 widening of slice 0


# ---------------------------------------------------------------------- refusals
def _machine_with_rows(cfg=TINY):
    g = GoldenMachine(cfg, memory_bytes=1 << 14)
    prog = [_load(0, 0, 0, 16, cfg.sp_row_elems, 4),
            _load(1, 0, 0, 32, cfg.acc_row_elems, 16, signal=["vector", "store"])]
    return g, prog


@pytest.mark.parametrize("instr, message", [
    (dict(op=Opcode.VROW, func=6, src_mem=1, src=0, dst=0, param=0, rows=1, len=1), "reserved"),
    (dict(op=Opcode.VMAP, func=3, src_mem=0, src=0, dst_mem=0, dst=0, param=0, rows=1), "reserved"),
    (dict(op=Opcode.VBIN, func="mul", a_mem=1, a=0, b_mem=1, b=4, dst_mem=0, dst=0, param=8, rows=2),
     "at most one operand"),
    (dict(op=Opcode.VBIN, func="add", a_mem=0, a=0, b_mem=0, b=4, dst_mem=0, dst=1, param=8, rows=2),
     "partly overlap"),
    (dict(op=Opcode.VROW, func="softmax", src_mem=1, src=0, dst=1, param=8, rows=2, len=4, wide=1),
     "partly overlap"),
    (dict(op=Opcode.VROW, func="softmax", src_mem=1, src=0, dst=0, param=8, rows=1, len=0), "len must be"),
    (dict(op=Opcode.VROW, func="softmax", src_mem=1, src=0, dst=0, param=8, rows=1000, len=4), "exceed"),
    (dict(op=Opcode.VROW, func="rmsnorm", src_mem=1, src=0, dst=0, param=8, rows=1, len=4), "shift"),
    (dict(op=Opcode.VMAP, func="gelu", src_mem=0, src=0, dst_mem=0, dst=8, param=9, rows=1), "reserved bits"),
])
def test_bad_vector_operands_are_program_errors(instr, message):
    g, prog = _machine_with_rows()
    g.write(0, np.full(512, 0xFF, np.uint8))  # parameter words all ones: reserved bits set, shift -1
    op = instr.pop("op")
    prog += [_i(op, wait=["load"], **instr), _i(Opcode.HALT)]
    with pytest.raises(ProgramError, match=message):
        g.run(prog)


def test_vector_ops_take_part_in_race_and_init_checks():
    g = GoldenMachine(TINY, memory_bytes=1 << 14)
    prog = [_load(1, 0, 0, 4, 4, 16),  # no token to the vector queue
            _i(Opcode.VMAP, func="scale", src_mem=1, src=0, dst_mem=0, dst=0, param=1, rows=1), _i(Opcode.HALT)]
    with pytest.raises(RaceError):
        GoldenMachine(TINY, memory_bytes=1 << 14).run(prog)
    prog = [_i(Opcode.VROW, func="max", src_mem=0, src=0, dst=0, param=0, rows=1, len=4), _i(Opcode.HALT)]
    with pytest.raises(UninitializedReadError, match="scratchpad row 0"):
        g.run(prog)
    # A store that reads the vector result without a token races with it.
    g, prog = _machine_with_rows()
    prog += [_i(Opcode.VROW, func="sum", src_mem=0, src=0, dst=20, param=0, rows=1, len=4, wait=["load"]),
             _store(1, 20, 0x1000, 1, 1, 4, wait=["load"]), _i(Opcode.HALT)]
    with pytest.raises(RaceError, match="row 20"):
        g.run(prog)


def test_numerics_benchmark_meets_its_targets_on_synthetic_data():
    from weft.sim.bench import bench_numerics

    rows, note = bench_numerics(cols=C, real=False)
    assert note == "synthetic data only"
    assert {r["op"].split(" ")[0] for r in rows} >= {"softmax", "gelu", "silu", "layernorm", "rmsnorm", "add",
                                                     "mul", "rope"}
    assert all(r["ok"] is not False for r in rows), [r for r in rows if r["ok"] is False]
    assert all(r["lsb"] <= 0.6 for r in rows if "int32 out" not in r["op"] and "algorithm" not in r["op"])
