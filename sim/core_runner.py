"""Run bundles on the RTL core under cocotb and compare with the bit-exact model.

:func:`program_case` turns a bundle and its inputs into a case for the bench
(:mod:`weft.sim.core_bench`): the device-memory image before the run and, from the
bit-exact model, the bytes every output (and in-place input) region must hold after it.
:func:`run_cases` builds the core (cached), runs the cases in one simulator session and
returns each case's performance counters and the wall time.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Mapping

import numpy as np

from weft.hw.bundle import Bundle
from weft.hw.config import AcceleratorConfig
from weft.hw.core import Core
from weft.sim.golden import GoldenMachine
from weft.sim.rtl import run_bench

__all__ = ["BENCH", "program_case", "run_cases"]

#: The cocotb module that drives the core like the host driver does.
BENCH = str(Path(__file__).with_name("core_bench.py"))


def program_case(name: str, bundle: Bundle, inputs: Mapping[str, np.ndarray], config: AcceleratorConfig,
                 **extra) -> dict:
    """Memory image before the run and the expected output bytes, from the bit-exact model."""
    bundle.check_config(config)
    machine = GoldenMachine(config, memory_bytes=-(-bundle.memory_top() // 4096) * 4096)
    for segment in bundle.segments:
        machine.write(segment.address, segment.data)
    machine.write(bundle.program_address, bundle.program_bytes)
    for spec in bundle.inputs:
        spec.write_to(machine.memory, np.asarray(inputs[spec.name]).astype(spec.np_dtype))
    image = machine.memory.tobytes()
    machine.run(machine.fetch_program(bundle.program_address, len(bundle.program)))
    # outputs, and inputs the program updates in place (a KV cache)
    expect = [(r.address, machine.read(r.address, r.size).hex()) for r in bundle.regions
              if r.kind in ("output", "inout")]
    return {"name": name, "image": [(0, image.hex())], "program_addr": bundle.program_address,
            "program_count": len(bundle.program), "expect": expect, **extra}


def run_cases(config: AcceleratorConfig, cases: list[dict], *, seed: int = 1, simulator: str | None = None) -> dict:
    """Run ``cases`` on the core; raises if any output differs. Returns counters and timing."""
    memory = max(len(bytes.fromhex(c["image"][0][1])) for c in cases if c["image"])
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        start = time.monotonic()
        result = run_bench(Core(config), BENCH, name=f"core_{config.name}", simulator=simulator,
                           params={"seed": seed, "memory_bytes": max(memory, 1 << 16), "cases": cases,
                                   "report": str(report)})
        wall = time.monotonic() - start
        cases_report = json.loads(report.read_text())
    return {"cases": cases_report, "wall_s": wall, "run_s": result.run_s, "build_s": result.build_s,
            "built": result.built}
