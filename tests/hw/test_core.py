"""RTL tests of the whole core (bench: weft.sim.core_bench, run by weft.sim.core_runner).

Each case is a bundle from the GEMM kernel generator run first on the bit-exact model;
the RTL must leave exactly the same bytes in every output region.
"""

from __future__ import annotations

import numpy as np
import pytest

from weft.compiler.gemm import build_gemm_bundle
from weft.hw.bundle import Bundle
from dataclasses import replace

from weft.hw.config import load_config
from weft.hw.isa import Instruction, Opcode, encode_program
from weft.hw.registers import ErrorCause
from weft.hw.vector_numerics import fixed_point_scale, pack_scale_word
from weft.sim.core_runner import program_case, run_cases


def gemm_case(config, rng, M, N, K, *, int8: bool, relu: bool = False, extreme: bool = False, **extra) -> dict:
    lo, hi = (-128, -127) if extreme else (-128, 128)
    a = rng.integers(lo, hi, (M, K), dtype=np.int8)
    b = rng.integers(lo, hi, (K, N), dtype=np.int8)
    kwargs = {}
    if int8:
        mult, shift = fixed_point_scale(rng.uniform(0.5, 2.0, N) / (128 * np.sqrt(K)))
        kwargs = {"bias": rng.integers(-30000, 30000, N).astype(np.int32), "scale_words": pack_scale_word(mult, shift),
                  "relu": relu}
    bundle = build_gemm_bundle(config, b, M, **kwargs)
    return program_case(f"gemm{M}x{N}x{K}{'_int8' if int8 else ''}", bundle, {"a": a}, config, **extra)


@pytest.mark.rtl
def test_core_without_row_engine_runs_gemm_and_refuses_vector_rows():
    """``vector.row_engine: false`` (the ulx3s build): GEMM + REQUANT as usual; a VBIN is an
    illegal instruction, and the core goes on with the next program."""
    tiny = load_config("tiny")
    config = replace(tiny, name="tiny_no_rows", vector=replace(tiny.vector, row_engine=False))
    rng = np.random.default_rng(8)
    vbin = Instruction.make(Opcode.VBIN, func="add", a_mem=1, a=0, b_mem=1, b=4, dst_mem=0, dst=0, param=8, rows=2)
    cases = [gemm_case(config, rng, 9, 6, 13, int8=True),
             {"name": "vbin", "image": [(0, encode_program([vbin, Instruction.make(Opcode.HALT)]).hex())],
              "program_addr": 0, "program_count": 2, "expect": [],
              "expect_cause": int(ErrorCause.ILLEGAL_INSTRUCTION)},
             gemm_case(config, rng, 5, 7, 6, int8=True) | {"name": "after_error"}]
    run_cases(config, cases)


@pytest.mark.rtl
def test_core_runs_gemm_programs_like_the_golden_model_tiny():
    config = load_config("tiny")
    rng = np.random.default_rng(5)
    cases = [
        gemm_case(config, rng, 7, 5, 9, int8=False),
        gemm_case(config, rng, 9, 6, 13, int8=True, relu=True),
        gemm_case(config, rng, 33, 10, 5, int8=True),
        gemm_case(config, rng, 4, 4, 40, int8=False, extreme=True),  # -128 * -128 accumulate chain
        gemm_case(config, rng, 17, 9, 11, int8=True, pause=0.3),  # backpressure on every AXI channel
    ]
    # An illegal instruction after a little work: the core stops with ILLEGAL_INSTRUCTION.
    bad = Bundle.for_config(config, program=[Instruction.make(Opcode.TOKEN, queue=0)], program_address=0)
    image = bytearray(encode_program(bad.program)) + bytes(16)  # opcode 0 follows
    cases.append({"name": "illegal", "image": [(0, bytes(image).hex())], "program_addr": 0, "program_count": 2,
                  "expect": [], "expect_cause": int(ErrorCause.ILLEGAL_INSTRUCTION)})
    # A program that deadlocks (a token nobody sends) is stopped by the watchdog.
    hang = [Instruction.make(Opcode.TOKEN, queue=1, wait=["load"]), Instruction.make(Opcode.HALT)]
    cases.append({"name": "watchdog", "image": [(0, encode_program(hang).hex())], "program_addr": 0,
                  "program_count": 2, "watchdog": 3000, "expect": [], "expect_cause": int(ErrorCause.WATCHDOG)})
    # PROGRAM_COUNT ends before any HALT.
    no_halt = [Instruction.make(Opcode.TOKEN, queue=0)]
    cases.append({"name": "no_halt", "image": [(0, encode_program(no_halt).hex())], "program_addr": 0,
                  "program_count": 1, "watchdog": 3000, "expect": [], "expect_cause": int(ErrorCause.NO_HALT)})
    cases.append(gemm_case(config, rng, 6, 6, 6, int8=True) | {"name": "after_errors"})
    run_cases(config, cases)


@pytest.mark.rtl
@pytest.mark.verilator_only  # a 16x16 core is minutes per case on Icarus
def test_core_runs_gemm_programs_like_the_golden_model_default():
    config = load_config("default")
    rng = np.random.default_rng(6)
    cases = [
        gemm_case(config, rng, 20, 40, 50, int8=True, relu=True),
        gemm_case(config, rng, 33, 17, 35, int8=False),
    ]
    report = run_cases(config, cases)["cases"]
    # Every row of A passes the array once per (K slice, column tile): M * ceil(K/16) * ceil(N/16).
    assert [r["counters"]["array_busy"] for r in report] == [20 * 4 * 3, 33 * 3 * 2]
