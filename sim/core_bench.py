"""cocotb bench of weft.hw.core.Core: whole programs from device memory to device memory.

The pytest side (tests/hw/test_core.py) sends cases: the device-memory image a bundle
needs (program, constants, inputs) and the bytes the bit-exact model left in each
output region. This bench loads the image into a cocotbext-axi AxiRam, programs the core
through AXI4-Lite exactly as the driver does (PROGRAM_ADDR, PROGRAM_COUNT, IRQ_ENABLE,
CONTROL.start), waits for the interrupt, checks STATUS and compares every output byte.
It also reads the performance counters and reports them back through a JSON file.
"""

from __future__ import annotations

import json
import os
import random

import cocotb
from cocotb.triggers import ClockCycles, First, RisingEdge
from cocotbext.axi import AxiBus, AxiLiteBus, AxiLiteMaster, AxiRam

from weft.hw.registers import COUNTERS, register
from weft.sim.benchlib import Cycle, params


def _pauser(rng: random.Random, p: float):
    while True:
        yield rng.random() < p


async def _reg_read(csr, name: str) -> int:
    return int.from_bytes(await csr.read(register(name).offset, 4), "little")


async def _reg_write(csr, name: str, value: int) -> None:
    await csr.write(register(name).offset, int(value).to_bytes(4, "little"))


@cocotb.test()
async def run_cases(dut):
    p = params()
    rng = random.Random(p["seed"])
    clock = Cycle(dut)
    # The bus models drive their idle values through reset (Icarus shows X on outputs that
    # depend combinationally on still-undriven inputs).
    ram = AxiRam(AxiBus.from_prefix(dut, "axi_"), dut.clk, dut.rst, size=p["memory_bytes"])
    csr = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "csr_"), dut.clk, dut.rst)
    await clock.start()
    report = []
    for case in p["cases"]:
        if case.get("pause"):
            for ch in (ram.write_if.aw_channel, ram.write_if.w_channel, ram.write_if.b_channel,
                       ram.read_if.ar_channel, ram.read_if.r_channel):
                ch.set_pause_generator(_pauser(random.Random(rng.random()), case["pause"]))
        else:
            for ch in (ram.write_if.aw_channel, ram.write_if.w_channel, ram.write_if.b_channel,
                       ram.read_if.ar_channel, ram.read_if.r_channel):
                ch.clear_pause_generator()
        ram.write(0, bytes(p["memory_bytes"]))
        for address, hex_bytes in case["image"]:
            ram.write(address, bytes.fromhex(hex_bytes))
        await _reg_write(csr, "PROGRAM_ADDR", case["program_addr"])
        await _reg_write(csr, "PROGRAM_COUNT", case["program_count"])
        await _reg_write(csr, "WATCHDOG", case.get("watchdog", 0))
        await _reg_write(csr, "IRQ_ENABLE", 0b11)
        await _reg_write(csr, "IRQ_STATUS", 0b11)  # clear both (W1C)
        before = {name: await _read_counter(csr, base) for name, base, _ in COUNTERS}
        await _reg_write(csr, "CONTROL", 1)
        limit = case.get("max_cycles", 2_000_000)
        await First(RisingEdge(dut.irq), ClockCycles(dut.clk, limit))
        assert int(dut.irq.value), f"{case['name']}: no interrupt within {limit} cycles"
        status = await _reg_read(csr, "STATUS")
        busy, done, error, cause = status & 1, status >> 1 & 1, status >> 2 & 1, status >> 8 & 0xFF
        after = {name: await _read_counter(csr, base) for name, base, _ in COUNTERS}
        counters = {k: after[k] - before[k] for k in after}
        expect_cause = case.get("expect_cause", 0)
        assert not busy, f"{case['name']}: STATUS.busy after the interrupt"
        if expect_cause:
            assert error and cause == expect_cause, f"{case['name']}: STATUS {status:#x}, expected cause {expect_cause}"
        else:
            assert done and not error, f"{case['name']}: STATUS {status:#x} (error cause {cause})"
            for address, hex_bytes in case["expect"]:
                want = bytes.fromhex(hex_bytes)
                got = ram.read(address, len(want))
                if got != want:
                    first = next(i for i in range(len(want)) if got[i] != want[i])
                    raise AssertionError(f"{case['name']}: device memory differs from the bit-exact model at "
                                         f"0x{address + first:x} (got {got[first]:#04x}, expected {want[first]:#04x}; "
                                         f"{sum(a != b for a, b in zip(got, want))} of {len(want)} bytes differ)")
        report.append({"name": case["name"], "counters": counters})
        dut._log.info("%s: %s", case["name"], counters)
    out = os.environ.get("WEFT_BENCH_REPORT") or p.get("report")
    if out:
        with open(out, "w") as fh:
            json.dump(report, fh)


async def _read_counter(csr, base: str) -> int:
    lo = await _reg_read(csr, f"{base}_LO")  # latches HI
    hi = await _reg_read(csr, f"{base}_HI")
    return hi << 32 | lo
