"""RTL tests of the vector unit's VBIN / VMAP / VROW (weft.hw.vector.RowEngine) on the whole core.

Every case is a program LOAD (inputs, parameter rows) -> one vector instruction -> STORE,
run on the bit-exact model first (sim.golden) for the expected bytes, then on the RTL
core through sim.core_runner.run_cases: the RTL must leave the same bytes. One Verilator
build per configuration serves every case of that configuration.
"""

from __future__ import annotations

import numpy as np
import pytest

from weft.hw import vector_numerics as vn
from weft.hw.config import load_config
from weft.hw.isa import Instruction, Mem, Opcode, encode_program
from weft.hw.registers import ErrorCause
from weft.sim.core_runner import run_cases
from weft.sim.vector_bench import THROUGHPUT_LENGTHS, Prog, measure_throughput, raw_case, slice_major


def _word(rng, shift_lo=0, shift_hi=40):
    return int(vn.pack_scale_word(int(rng.integers(1, 1 << 16)), int(rng.integers(shift_lo, shift_hi + 1))))


def _values(rng, mem: Mem, shape, extreme=False):
    if mem == Mem.SP:
        return rng.integers(-128, 128, shape) if not extreme else rng.choice([-128, 127, 0, -1], shape)
    if extreme:
        return rng.choice([-(1 << 31), (1 << 31) - 1, 0, -1, 1], shape)
    return rng.integers(-(1 << 20), 1 << 20, shape)


# ---------------------------------------------------------------------- elementwise
def vmap_case(config, rng, func: str, src_mem: Mem, dst_mem: Mem, rows: int, *, words=None, extreme=False,
              inplace=False, name=None):
    p = Prog(config)
    E = p.E
    x = _values(rng, src_mem, (rows, E), extreme)
    p.load(src_mem, 8, x)
    if words is None:
        if func == "scale":
            words = [_word(rng, 0, 40 if src_mem == Mem.ACC else 12)]
        else:
            in_scale = float(rng.uniform(0.002, 0.2)) / (1 if src_mem == Mem.SP else 4000)
            words = list(vn.gelu_params(in_scale, float(rng.uniform(0.01, 0.1)) * (1 if dst_mem == Mem.SP else 1e-3),
                                        cols=E).ravel()[:2])
    p.load(Mem.ACC, 100, vn.param_rows(words, E))
    dst = 8 if inplace and src_mem == dst_mem else 40
    op = Instruction.make(Opcode.VMAP, func=func, src_mem=int(src_mem), src=8, dst_mem=int(dst_mem), dst=dst,
                          param=100, rows=rows)
    return p.case(name or f"vmap_{func}_{src_mem.name}_{dst_mem.name}", [op], [p.store(dst_mem, dst, rows)])


def vbin_case(config, rng, func: str, a_mem: Mem, b_mem: Mem, dst_mem: Mem, rows: int, *, extreme=False, name=None):
    p = Prog(config)
    E = p.E
    a = _values(rng, a_mem, (rows, E), extreme)
    if func == "rope":
        b = vn.rope_table(rng.integers(0, 100, rows), E).astype(np.int64)
        if b_mem == Mem.SP:
            b = np.clip(b >> 7, -128, 127)
    else:
        b = _values(rng, b_mem, (rows, E), extreme)
    p.load(a_mem, 8, a)
    p.load(b_mem, 60, b)
    if func == "add":
        sa = int(rng.integers(0, 30))
        sb = int(np.clip(sa + rng.integers(-15, 16), 0, 63))
        words = [int(vn.pack_scale_word(int(rng.integers(1, 1 << 16)), sa)),
                 int(vn.pack_scale_word(int(rng.integers(1, 1 << 16)), sb))]
    else:
        words = [_word(rng, 8, 50)]
    p.load(Mem.ACC, 120, vn.param_rows(words, E))
    op = Instruction.make(Opcode.VBIN, func=func, a_mem=int(a_mem), a=8, b_mem=int(b_mem), b=60, dst_mem=int(dst_mem),
                          dst=150, param=120, rows=rows)
    return p.case(name or f"vbin_{func}_{a_mem.name}_{b_mem.name}_{dst_mem.name}", [op],
                  [p.store(dst_mem, 150, rows)])


# ---------------------------------------------------------------------- row ops
def vrow_case(config, rng, func: str, M: int, L: int, *, src_mem: Mem = Mem.ACC, x=None, kv_len=None, offset=0,
              causal=False, unsigned=False, wide=False, inplace=False, name=None, in_scale=None, out_scale=None):
    p = Prog(config)
    E = p.E
    C = -(-L // E)
    if x is None:
        if func == "softmax":
            x = rng.integers(-3000, 3000, (M, L))
        elif src_mem == Mem.SP:
            x = rng.integers(-128, 128, (M, L))
        else:
            x = rng.integers(-(1 << 24), 1 << 24, (M, L))
    garbage = _values(rng, src_mem, (M, C * E))
    src, dst, param = 4, 4 + C * M + 3, 0
    p.load(src_mem, src, slice_major(np.asarray(x), E, garbage))
    if func == "softmax":
        params = vn.softmax_params(in_scale or 0.01, kv_len=L if kv_len is None else kv_len, causal_offset=offset, cols=E)
    elif func == "layernorm":
        params = vn.layernorm_params(1.0, rng.uniform(-2, 2, L), rng.uniform(-1, 1, L),
                                     out_scale or float(rng.uniform(0.02, 0.1)), cols=E)
    elif func == "rmsnorm":
        params = vn.rmsnorm_params(1.0, rng.uniform(-2, 2, L), out_scale or float(rng.uniform(0.02, 0.1)), cols=E)
    else:
        params = None
    if params is not None:
        if src_mem == Mem.ACC:
            param = src + C * M + 1
        else:
            param = 0
        p.load(Mem.ACC, param, params)
    if func in ("max", "sum"):
        dst = (src + C * M + 1) if src_mem == Mem.ACC else 0
        out = (Mem.ACC, dst, M)
    elif func in ("softmax", "layernorm", "rmsnorm") and wide:  # int32 to the accumulator, slice-major
        dst = src if inplace and src_mem == Mem.ACC else param + len(params) + 2
        out = (Mem.ACC, dst, C * M)
    else:
        dst = (src + C * M + 1) if src_mem == Mem.SP else 4
        out = (Mem.SP, dst, C * M)
    op = Instruction.make(Opcode.VROW, func=func, src_mem=int(src_mem), src=src, dst=dst, param=param, rows=M, len=L,
                          causal=int(causal), unsigned=int(unsigned), wide=int(wide))
    return p.case(name or f"vrow_{func}_{M}x{L}", [op], [p.store(*out)])


def illegal_case(config, name, instr: Instruction) -> dict:
    program = [instr, Instruction.make(Opcode.HALT)]
    return {"name": name, "image": [(0, encode_program(program).hex())], "program_addr": 0, "program_count": 2,
            "expect": [], "expect_cause": int(ErrorCause.ILLEGAL_INSTRUCTION)}


def elementwise_cases(config, rng) -> list[dict]:
    SP, ACC = Mem.SP, Mem.ACC
    cases = []
    for func in ("scale", "gelu", "silu"):
        for src, dst in ((ACC, SP), (SP, SP), (SP, ACC), (ACC, ACC)):
            cases.append(vmap_case(config, rng, func, src, dst, int(rng.integers(1, 9))))
        cases.append(vmap_case(config, rng, func, ACC, SP, 5, extreme=True, name=f"vmap_{func}_extreme"))
    cases.append(vmap_case(config, rng, "scale", SP, SP, 6, inplace=True, name="vmap_scale_inplace"))
    cases.append(vmap_case(config, rng, "gelu", ACC, ACC, 6, inplace=True, name="vmap_gelu_inplace_acc"))
    cases.append(vmap_case(config, rng, "scale", ACC, SP, 3, words=[int(vn.pack_scale_word(65535, 63))],
                           extreme=True, name="vmap_scale_shift63"))
    cases.append(vmap_case(config, rng, "scale", ACC, ACC, 3, words=[int(vn.pack_scale_word(65535, 0))],
                           extreme=True, name="vmap_scale_saturate32"))
    for func in ("add", "mul", "rope"):
        for a, b, d in ((SP, SP, SP), (ACC, SP, SP), (SP, ACC, ACC), (SP, SP, ACC)):
            cases.append(vbin_case(config, rng, func, a, b, d, int(rng.integers(1, 7))))
        cases.append(vbin_case(config, rng, func, ACC, SP, SP, 4, extreme=True, name=f"vbin_{func}_extreme"))
    cases.append(vbin_case(config, rng, "add", ACC, ACC, ACC, 5, extreme=True, name="vbin_add_acc_acc"))
    return cases


def row_cases(config, rng) -> list[dict]:
    E = config.acc_row_elems
    cases = []
    for func in ("max", "sum"):
        cases.append(vrow_case(config, rng, func, 3, 2 * E + 3))
        cases.append(vrow_case(config, rng, func, 2, 1, name=f"vrow_{func}_len1"))
        cases.append(vrow_case(config, rng, func, 3, E + 1, src_mem=Mem.SP, name=f"vrow_{func}_sp"))
        cases.append(vrow_case(config, rng, func, 2, 3 * E, x=np.full((2, 3 * E), (1 << 31) - 1) * np.array([[1], [-1]]),
                               name=f"vrow_{func}_extreme"))
    L = 3 * E + 2
    cases.append(vrow_case(config, rng, "softmax", 4, L))
    cases.append(vrow_case(config, rng, "softmax", 3, L, unsigned=True, name="softmax_u8"))
    cases.append(vrow_case(config, rng, "softmax", 5, L, kv_len=L - 3, causal=True, offset=1, name="softmax_causal"))
    cases.append(vrow_case(config, rng, "softmax", 4, L, causal=True, offset=-2, name="softmax_fully_masked_rows"))
    cases.append(vrow_case(config, rng, "softmax", 2, L, kv_len=0, name="softmax_kv0"))
    cases.append(vrow_case(config, rng, "softmax", 3, 1, name="softmax_len1"))
    cases.append(vrow_case(config, rng, "softmax", 2, L, x=np.full((2, L), 77), name="softmax_equal"))
    cases.append(vrow_case(config, rng, "softmax", 2, L, x=rng.choice([-(1 << 31), (1 << 31) - 1], (2, L)),
                           in_scale=0.3, name="softmax_extreme"))
    cases.append(vrow_case(config, rng, "softmax", 2, E, src_mem=Mem.SP, name="softmax_sp"))
    # wide: int32 probabilities (0..2047) to the accumulator; random full-range int32 scores
    int32 = dict(in_scale=4e-9)
    cases.append(vrow_case(config, rng, "softmax", 4, L, x=rng.integers(-(1 << 31), 1 << 31, (4, L)), wide=True,
                           name="softmax_wide", **int32))
    cases.append(vrow_case(config, rng, "softmax", 5, L, x=rng.integers(-(1 << 31), 1 << 31, (5, L)), wide=True,
                           kv_len=L - 3, causal=True, offset=1, name="softmax_wide_causal", **int32))
    cases.append(vrow_case(config, rng, "softmax", 4, L, wide=True, causal=True, offset=-2,
                           name="softmax_wide_fully_masked_rows"))
    cases.append(vrow_case(config, rng, "softmax", 3, L, wide=True, unsigned=True, kv_len=E + 1,
                           name="softmax_wide_over_unsigned"))
    cases.append(vrow_case(config, rng, "softmax", 3, 1, wide=True, name="softmax_wide_len1"))
    cases.append(vrow_case(config, rng, "softmax", 2, L, x=rng.choice([-(1 << 31), (1 << 31) - 1], (2, L)),
                           in_scale=0.3, wide=True, name="softmax_wide_extreme"))
    cases.append(vrow_case(config, rng, "softmax", 3, L, wide=True, inplace=True, name="softmax_wide_inplace"))
    cases.append(vrow_case(config, rng, "softmax", 2, E, src_mem=Mem.SP, wide=True, name="softmax_wide_sp"))
    cases.append(vrow_case(config, rng, "max", 3, E + 2, wide=True, name="vrow_max_wide_ignored"))
    for func in ("layernorm", "rmsnorm"):
        cases.append(vrow_case(config, rng, func, 3, 2 * E + 1))
        cases.append(vrow_case(config, rng, func, 2, E, src_mem=Mem.SP, name=f"{func}_sp"))
        cases.append(vrow_case(config, rng, func, 2, 1, name=f"{func}_len1"))
        cases.append(vrow_case(config, rng, func, 2, E + 3, x=np.full((2, E + 3), -5), name=f"{func}_equal"))
        cases.append(vrow_case(config, rng, func, 2, 2 * E, x=rng.choice([-(1 << 31), (1 << 31) - 1], (2, 2 * E)),
                               name=f"{func}_extreme"))
        cases.append(vrow_case(config, rng, func, 2, E, x=np.zeros((2, E), dtype=np.int64), name=f"{func}_zero"))
        # wide: int32 output to the accumulator; fine output scales put most values beyond int8
        cases.append(vrow_case(config, rng, func, 3, 2 * E + 1, wide=True, out_scale=2e-3, name=f"{func}_wide"))
        cases.append(vrow_case(config, rng, func, 2, E, src_mem=Mem.SP, wide=True, out_scale=4e-3,
                               name=f"{func}_wide_sp"))
        cases.append(vrow_case(config, rng, func, 2, E + 3, wide=True, inplace=True, out_scale=1e-3,
                               name=f"{func}_wide_inplace"))
        cases.append(vrow_case(config, rng, func, 2, 2 * E, x=rng.choice([-(1 << 31), (1 << 31) - 1], (2, 2 * E)),
                               wide=True, out_scale=5e-10, name=f"{func}_wide_extreme"))  # saturates int32
    return cases


def error_cases(config) -> list[dict]:
    return [
        illegal_case(config, "vbin_reserved", Instruction.make(Opcode.VBIN, func=3, a_mem=0, a=0, b_mem=0, b=0,
                                                               dst_mem=0, dst=0, param=0, rows=1)),
        illegal_case(config, "vmap_reserved", Instruction.make(Opcode.VMAP, func=3, src_mem=0, src=0, dst_mem=0,
                                                               dst=0, param=0, rows=1)),
        illegal_case(config, "vrow_reserved", Instruction.make(Opcode.VROW, func=6, src_mem=1, src=0, dst=0,
                                                               param=0, rows=1, len=4)),
        illegal_case(config, "vrow_len0", Instruction.make(Opcode.VROW, func=0, src_mem=1, src=0, dst=0,
                                                           param=0, rows=1, len=0)),
        illegal_case(config, "vbin_mul_two_acc", Instruction.make(Opcode.VBIN, func=1, a_mem=1, a=0, b_mem=1, b=0,
                                                                  dst_mem=0, dst=0, param=0, rows=1)),
    ]


@pytest.mark.rtl
@pytest.mark.parametrize("name", ["tiny", "default"])
def test_vector_ops_match_golden(name):
    config = load_config(name)
    rng = np.random.default_rng(11 if name == "tiny" else 12)
    cases = elementwise_cases(config, rng) + row_cases(config, rng) + error_cases(config)
    # the core still works after a refused instruction
    cases.append(vmap_case(config, rng, "gelu", Mem.ACC, Mem.SP, 3, name="after_errors"))
    run_cases(config, cases)


# ---------------------------------------------------------------------- concurrency with MATMUL
def overlap_cases(config, rng) -> list[dict]:
    """Three programs: a long matmul alone, a softmax alone, both with no token between them."""
    E = config.acc_row_elems
    R = config.array.rows
    m_rows, repeats = 120, 4
    M, L = 6, 5 * E
    C = -(-L // E)
    a = rng.integers(-128, 128, (m_rows, R))
    w = rng.integers(-128, 128, (R, E))
    x = rng.integers(-3000, 3000, (M, L))
    out = []
    for variant in ("matmul", "vector", "both"):
        p = Prog(config)
        p.load(Mem.SP, 0, a)
        p.load(Mem.SP, 200, w)
        src = m_rows + 8
        p.load(Mem.ACC, src, slice_major(x, E))
        p.load(Mem.ACC, src + C * M, vn.softmax_params(0.01, kv_len=L, cols=E))
        loads = list(p.loads)
        mm_ops = [Instruction.make(Opcode.PRELOAD, sp=200, k=R, n=E)]
        mm_ops += [Instruction.make(Opcode.MATMUL, a=0, acc=0, m=m_rows, k=R) for _ in range(repeats)]
        vec = Instruction.make(Opcode.VROW, func="softmax", src_mem=1, src=src, dst=300, param=src + C * M, rows=M, len=L)
        program = loads[:-1]
        signal = {"matmul": ["matmul"], "vector": ["vector"], "both": ["matmul", "vector"]}[variant]
        program.append(loads[-1].with_tokens(signal=signal))
        stores = []
        if variant != "vector":
            mm_ops[0] = mm_ops[0].with_tokens(wait=["load"])
            mm_ops[-1] = mm_ops[-1].with_tokens(signal=["store"])
            program += mm_ops
            stores.append(p.store(Mem.ACC, 0, m_rows).with_tokens(wait=["matmul"]))
        if variant != "matmul":
            program.append(vec.with_tokens(wait=["load"], signal=["store"]))
            stores.append(p.store(Mem.SP, 300, C * M).with_tokens(wait=["vector"]))
        program += stores + [Instruction.make(Opcode.HALT)]
        out.append(raw_case(f"overlap_{variant}", config, program, p.image, p.outs))
    return out


@pytest.mark.rtl
def test_matmul_and_vector_op_run_concurrently():
    config = load_config("tiny")
    rng = np.random.default_rng(21)
    report = run_cases(config, overlap_cases(config, rng))["cases"]
    cycles = {r["name"].split("_", 1)[1]: r["counters"]["cycles"] for r in report}
    # Both together finish well before the sum of each alone (the loads and stores are in all three).
    assert cycles["both"] < cycles["matmul"] + cycles["vector"] - 200, cycles
    print("overlap cycles:", cycles)


# ---------------------------------------------------------------------- wide softmax: results and cost
def wide_softmax_timing_cases(config, rng, L: int, M: int = 4) -> tuple[list[dict], np.ndarray, int]:
    """A softmax (int8 out) and a wide one (int32 out), each once and twice on the same int32 scores."""
    E = config.acc_row_elems
    C = -(-L // E)
    x = rng.integers(-(1 << 31), 1 << 31, (M, L))
    params = vn.softmax_params(4e-9, kv_len=L, cols=E)
    cases = []
    for wide in (0, 1):
        for times in (1, 2):
            p = Prog(config)
            p.load(Mem.ACC, 0, slice_major(x, E))
            p.load(Mem.ACC, C * M, params)
            dst = C * M + len(params) + 1 if wide else 0
            op = Instruction.make(Opcode.VROW, func="softmax", src_mem=1, src=0, dst=dst, param=C * M, rows=M, len=L,
                                  wide=wide)
            cases.append(p.case(f"softmax_wide{wide}_x{times}", [op] * times,
                                [p.store(Mem.ACC if wide else Mem.SP, dst, C * M)]))
    return cases, x, int(params.ravel()[0])


@pytest.mark.rtl
def test_wide_softmax_is_exact_and_costs_three_cycles_more_per_row():
    """The wide softmax's 43-step reciprocal (11-bit Q) against the 40-step one: per logical row
    exactly 3 cycles more; its int32 output is vn.softmax_rows(..., wide=True), slice-major."""
    config = load_config("tiny")
    E, M, L = config.acc_row_elems, 4, 5 * config.acc_row_elems + 1
    cases, x, word = wide_softmax_timing_cases(config, np.random.default_rng(41), L, M)
    expect = dict(cases[2]["expect"])  # wide, once: the bytes the RTL must leave
    (addr, raw), = expect.items()
    got = np.frombuffer(bytes.fromhex(raw), dtype="<i4").reshape(-1, E)
    assert np.array_equal(got, slice_major(vn.softmax_rows(x, word, np.ones((M, L), bool), wide=True), E))
    report = run_cases(config, cases)["cases"]
    cycles = {r["name"]: r["counters"]["cycles"] for r in report}
    per_row = {w: (cycles[f"softmax_wide{w}_x2"] - cycles[f"softmax_wide{w}_x1"]) / M for w in (0, 1)}
    print("softmax cycles per row (int8 out, wide):", per_row[0], per_row[1])
    assert per_row[1] - per_row[0] == 3, per_row


# ---------------------------------------------------------------------- throughput
# The programs and the measurement live in weft.sim.vector_bench (`weft bench vector`).
@pytest.mark.rtl
def test_vector_throughput_default():
    config = load_config("default")
    E = config.acc_row_elems
    per_row = measure_throughput(config)
    for (func, L), cycles in sorted(per_row.items()):
        print(f"{func:10s} L={L:5d}: {cycles:7.1f} cycles/row ({L / cycles:5.2f} elements/cycle)")
    C = {L: -(-L // E) for L in THROUGHPUT_LENGTHS}
    for L in THROUGHPUT_LENGTHS:
        assert per_row[("gelu", L)] <= C[L] + 4      # one on-chip row per cycle
        assert per_row[("add", L)] <= 2 * C[L] + 4   # two operand reads per row
        assert per_row[("softmax", L)] <= 3 * C[L] + 60
        assert per_row[("layernorm", L)] <= 5 * C[L] + 120
