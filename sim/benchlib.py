"""Helpers for cocotb benches run by :func:`weft.sim.rtl.run_bench` (imported inside the simulator).

Timing convention used by weft's benches: a bench drives inputs and samples outputs at
the clock's *falling* edge. The values sampled at falling edge ``n`` are the registered
state after rising edge ``n``; inputs written then are captured at rising edge ``n + 1``.
So an input presented in cycle ``c`` whose effect has latency ``L`` is seen at the
falling edge of cycle ``c + L`` on every simulator (no delta-cycle races between
Verilator and Icarus).
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Sequence

__all__ = ["params", "Cycle", "pack", "unpack"]

PARAMS_ENV = "WEFT_BENCH_PARAMS"


def params() -> dict[str, Any]:
    """The parameters the pytest side passed to :func:`weft.sim.rtl.run_bench`."""
    path = os.environ.get(PARAMS_ENV)
    if not path:
        raise RuntimeError(f"{PARAMS_ENV} is not set: run this bench through weft.sim.rtl.run_bench")
    with open(path) as fh:
        return json.load(fh)


def pack(values: Iterable[int], width: int) -> int:
    """Pack integers (two's complement, element 0 in the low bits) into one bit vector."""
    mask = (1 << width) - 1
    out = 0
    for i, v in enumerate(values):
        out |= (int(v) & mask) << (i * width)
    return out


def unpack(word: int, width: int, count: int, signed: bool = True) -> list[int]:
    """Inverse of :func:`pack`."""
    mask = (1 << width) - 1
    out = []
    for i in range(count):
        v = (word >> (i * width)) & mask
        if signed and v >> (width - 1):
            v -= 1 << width
        out.append(v)
    return out


class Cycle:
    """Clock, reset and a cycle counter for a DUT with Amaranth's ``clk``/``rst`` ports."""

    def __init__(self, dut, period_ns: int = 10):
        self.dut = dut
        self.period_ns = period_ns
        self.n = 0

    async def start(self, reset_cycles: int = 2, idle: Sequence[tuple[Any, int]] = ()) -> None:
        """Start the clock, drive ``idle`` (handle, value) pairs, pulse reset."""
        from cocotb.clock import Clock
        from cocotb.triggers import FallingEdge

        Clock(self.dut.clk, self.period_ns, unit="ns").start()
        for handle, value in idle:
            handle.value = value
        self.dut.rst.value = 1
        for _ in range(reset_cycles):
            await FallingEdge(self.dut.clk)
        self.dut.rst.value = 0
        self.n = 0

    async def next(self) -> int:
        """Wait for the next falling edge; returns the new cycle number."""
        from cocotb.triggers import FallingEdge

        await FallingEdge(self.dut.clk)
        self.n += 1
        return self.n
