"""RTL tests of the whole core (bench: tests/hw/benches/core_bench.py).

Each case is a bundle from the GEMM kernel generator run first on the bit-exact model;
the RTL must leave exactly the same bytes in every output region.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from weft.compiler.gemm import build_gemm_bundle
from weft.hw.vector_numerics import fixed_point_scale
from weft.hw.bundle import Bundle
from weft.hw.config import load_config
from weft.hw.core import Core
from weft.hw.isa import Instruction, Opcode, encode_program
from weft.hw.registers import ErrorCause
from weft.sim.golden import GoldenMachine, pack_scale_word
from weft.sim.rtl import run_bench

BENCH = "tests/hw/benches/core_bench.py"


def bundle_case(name: str, bundle: Bundle, inputs: dict, config, **extra) -> dict:
    """Memory image before the run and expected output bytes, from the bit-exact model."""
    machine = GoldenMachine(config, memory_bytes=-(-bundle.memory_top() // 4096) * 4096)
    for segment in bundle.segments:
        machine.write(segment.address, segment.data)
    machine.write(bundle.program_address, bundle.program_bytes)
    for spec in bundle.inputs:
        spec.write_to(machine.memory, inputs[spec.name])
    image = machine.memory.tobytes()
    machine.run(machine.fetch_program(bundle.program_address, len(bundle.program)))
    expect = [(r.address, machine.read(r.address, r.size).hex()) for r in bundle.regions if r.kind == "output"]
    return {"name": name, "image": [(0, image.hex())], "program_addr": bundle.program_address,
            "program_count": len(bundle.program), "expect": expect, **extra}


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
    return bundle_case(f"gemm{M}x{N}x{K}{'_int8' if int8 else ''}", bundle, {"a": a}, config, **extra)


def _run(config, cases, tmp_path, seed=1):
    memory = max(len(bytes.fromhex(c["image"][0][1])) for c in cases)
    report = tmp_path / "report.json"
    run_bench(Core(config), BENCH, name=f"core_{config.name}",
              params={"seed": seed, "memory_bytes": max(memory, 1 << 16), "cases": cases, "report": str(report)})
    return json.loads(report.read_text())


@pytest.mark.rtl
def test_core_runs_gemm_programs_like_the_golden_model_tiny(tmp_path):
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
    cases.append(gemm_case(config, rng, 6, 6, 6, int8=True) | {"name": "after_error"})
    _run(config, cases, tmp_path)


@pytest.mark.rtl
def test_core_runs_gemm_programs_like_the_golden_model_default(tmp_path):
    config = load_config("default")
    rng = np.random.default_rng(6)
    cases = [
        gemm_case(config, rng, 20, 40, 50, int8=True, relu=True),
        gemm_case(config, rng, 33, 17, 35, int8=False),
    ]
    report = _run(config, cases, tmp_path)
    assert all(r["counters"]["array_busy"] > 0 for r in report)
