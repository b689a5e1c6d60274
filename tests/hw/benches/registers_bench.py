"""cocotb bench for weft.hw.registers.Registers (run by tests/hw/test_registers.py).

Reference: the register table itself (weft.hw.registers.REGISTERS) read as a spec: reset
values, access types (RO ignores writes, RW keeps byte-enabled writes, W1C clears written
ones, W1S pulses), unmapped offsets answer SLVERR, 64-bit counters read LO-then-HI give
the value at the LO read, irq = |(IRQ_STATUS & IRQ_ENABLE).
"""

from __future__ import annotations

import random

import cocotb
from cocotb.triggers import FallingEdge, ReadOnly
from cocotbext.axi import AxiLiteBus, AxiLiteMaster, AxiResp

from weft.hw.config import load_config
from weft.hw.registers import (COUNTERS, REGISTERS, Access, control_layout, counters_layout, irq_layout,
                               register, reset_value, status_layout)
from weft.sim.benchlib import Cycle, params

P = params()
CONFIG = load_config(P["config"])
SEED = P.get("seed", 1)


def offsets(layout) -> dict[str, tuple[int, int]]:
    return {name: (f.offset, f.width) for name, f in layout}


CTRL = offsets(control_layout())
STATUS = offsets(status_layout())
IRQ = offsets(irq_layout())
CNT = offsets(counters_layout())


def field(value: int, where: tuple[int, int]) -> int:
    off, width = where
    return (value >> off) & ((1 << width) - 1)


def pack(values: dict[str, int], fields: dict[str, tuple[int, int]]) -> int:
    out = 0
    for name, v in values.items():
        off, width = fields[name]
        out |= (v & ((1 << width) - 1)) << off
    return out


class Env:
    def __init__(self, dut):
        self.dut = dut
        self.master = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "csr_"), dut.clk, dut.rst)
        self.pulses = {"start": 0, "soft_reset": 0}

    async def start(self):
        dut = self.dut
        await Cycle(dut).start(reset_cycles=3, idle=[(dut.status, 0), (dut.irq_set, 0), (dut.counters, 0)])
        cocotb.start_soon(self._watch())

    async def _watch(self):
        while True:
            await FallingEdge(self.dut.clk)
            await ReadOnly()
            ctrl = int(self.dut.control.value)
            for name in self.pulses:
                self.pulses[name] += field(ctrl, CTRL[name])

    async def read(self, offset: int) -> tuple[int, AxiResp]:
        r = await self.master.read(offset, 4)
        return int.from_bytes(r.data, "little"), r.resp

    async def rd(self, offset: int) -> int:
        value, resp = await self.read(offset)
        assert resp == AxiResp.OKAY, f"read 0x{offset:02x}: {resp!r}"
        return value

    async def write(self, offset: int, value: int, nbytes: int = 4) -> AxiResp:
        r = await self.master.write(offset, value.to_bytes(nbytes, "little"))
        return r.resp

    async def wr(self, offset: int, value: int, nbytes: int = 4):
        resp = await self.write(offset, value, nbytes)
        assert resp == AxiResp.OKAY, f"write 0x{offset:02x}: {resp!r}"

    async def cycles(self, n: int):
        for _ in range(n):
            await FallingEdge(self.dut.clk)


@cocotb.test()
async def test_reset_values(dut):
    """Every register reads its documented reset value; CONFIG_HASH is config.hash32."""
    env = Env(dut)
    await env.start()
    for reg in REGISTERS:
        if reg.source in ("status", "counter"):
            continue
        got = await env.rd(reg.offset)
        want = 0 if reg.access is Access.W1S else reset_value(reg, CONFIG)
        assert got == want, f"{reg.name}: 0x{got:08x} != 0x{want:08x}"
    assert await env.rd(register("CONFIG_HASH").offset) == CONFIG.hash32
    assert await env.rd(register("ID").offset) == int.from_bytes(b"WEFT", "little")
    info = await env.rd(register("CONFIG_INFO").offset)
    assert info & 0xFF == CONFIG.array.rows and info >> 8 & 0xFF == CONFIG.array.cols
    assert info >> 24 == CONFIG.bus_bytes
    assert int(dut.irq.value) == 0


@cocotb.test()
async def test_access_types(dut):
    """RW (with byte enables), RO writes ignored, unmapped offsets SLVERR, control outputs."""
    env = Env(dut)
    await env.start()
    rng = random.Random(SEED)
    rw = [r for r in REGISTERS if r.access is Access.RW]
    values = {}
    for reg in rw:
        values[reg.name] = rng.getrandbits(32)
        await env.wr(reg.offset, values[reg.name])
    for reg in rw:
        assert await env.rd(reg.offset) == values[reg.name], reg.name
    # byte-enabled write: only byte 2 of SCRATCH changes
    scratch = register("SCRATCH").offset
    await env.wr(scratch + 2, 0xA5, nbytes=1)
    want = (values["SCRATCH"] & ~0x00FF0000) | 0xA5 << 16
    assert await env.rd(scratch) == want
    # the RW registers that drive the core
    await env.cycles(1)
    ctrl = int(dut.control.value)
    assert field(ctrl, CTRL["program_addr"]) == values["PROGRAM_ADDR"]
    assert field(ctrl, CTRL["program_count"]) == values["PROGRAM_COUNT"]
    assert field(ctrl, CTRL["watchdog"]) == values["WATCHDOG"]
    # RO registers ignore writes (OKAY)
    for name in ("ID", "VERSION", "CONFIG_HASH", "CONFIG_INFO"):
        reg = register(name)
        await env.wr(reg.offset, 0xDEADBEEF)
        assert await env.rd(reg.offset) == reset_value(reg, CONFIG), name
    # unmapped offsets: SLVERR, reads 0, writes have no effect
    used = {r.offset for r in REGISTERS}
    for off in (0x30, 0x3C, max(used) + 4, 0xFFC):
        assert off not in used
        value, resp = await env.read(off)
        assert resp == AxiResp.SLVERR and value == 0, (hex(off), resp, value)
        assert await env.write(off, 1) == AxiResp.SLVERR
    assert await env.rd(scratch) == want


@cocotb.test()
async def test_control_pulses(dut):
    """CONTROL is W1S: each written 1 is exactly one cycle of start / soft_reset; reads 0."""
    env = Env(dut)
    await env.start()
    ctrl = register("CONTROL")
    bit = {f.name: 1 << f.lsb for f in ctrl.fields}
    await env.wr(ctrl.offset, bit["start"])
    await env.cycles(3)
    assert env.pulses == {"start": 1, "soft_reset": 0}, env.pulses
    await env.wr(ctrl.offset, bit["start"] | bit["soft_reset"])
    await env.wr(ctrl.offset, 0)
    await env.wr(ctrl.offset, bit["soft_reset"])
    await env.cycles(3)
    assert env.pulses == {"start": 2, "soft_reset": 2}, env.pulses
    assert await env.rd(ctrl.offset) == 0


@cocotb.test()
async def test_status_and_irq(dut):
    """STATUS mirrors its inputs; IRQ_STATUS set by strobes, W1C, irq = |(status & enable)."""
    env = Env(dut)
    await env.start()
    st = register("STATUS")
    dut.status.value = pack({"busy": 1, "error": 1, "error_cause": 4}, STATUS)
    value = await env.rd(st.offset)
    fields = {f.name: (value >> f.lsb) & ((1 << f.width) - 1) for f in st.fields}
    assert fields == {"busy": 1, "done": 0, "error": 1, "error_cause": 4}, fields

    ien, ist = register("IRQ_ENABLE").offset, register("IRQ_STATUS").offset
    done_bit = 1 << next(f.lsb for f in register("IRQ_STATUS").fields if f.name == "done")
    err_bit = 1 << next(f.lsb for f in register("IRQ_STATUS").fields if f.name == "error")

    async def strobe(**kw):
        await FallingEdge(dut.clk)
        dut.irq_set.value = pack(kw, IRQ)
        await FallingEdge(dut.clk)
        dut.irq_set.value = 0

    await strobe(done=1)
    await env.cycles(1)
    assert await env.rd(ist) == done_bit
    assert int(dut.irq.value) == 0, "irq without enable"
    await env.wr(ien, err_bit)
    await env.cycles(1)
    assert int(dut.irq.value) == 0, "done is pending but only error is enabled"
    await env.wr(ien, done_bit | err_bit)
    await env.cycles(1)
    assert int(dut.irq.value) == 1
    await env.wr(ist, done_bit)  # W1C
    await env.cycles(1)
    assert await env.rd(ist) == 0 and int(dut.irq.value) == 0
    await strobe(error=1)
    await env.cycles(1)
    assert int(dut.irq.value) == 1 and await env.rd(ist) == err_bit
    await env.wr(ist, 0)  # writing 0 clears nothing
    assert await env.rd(ist) == err_bit
    await env.wr(ist, err_bit | done_bit)
    assert await env.rd(ist) == 0
    await env.cycles(1)
    assert int(dut.irq.value) == 0

    # a hardware set in the very cycle of a W1C clear of the same bit wins
    write = cocotb.start_soon(env.wr(ist, done_bit))
    for _ in range(50):
        await FallingEdge(dut.clk)
        if int(dut.csr__awvalid.value) and int(dut.csr__wvalid.value) and int(dut.csr__awready.value):
            dut.irq_set.value = pack({"done": 1}, IRQ)  # handshake and strobe at the same edge
            await FallingEdge(dut.clk)
            dut.irq_set.value = 0
            break
    else:
        raise AssertionError("the write was never accepted")
    await write
    assert await env.rd(ist) == done_bit
    await env.wr(ist, done_bit)
    assert await env.rd(ist) == 0


@cocotb.test()
async def test_counter_latch(dut):
    """Reading _LO latches _HI: the pair read gives the value at the LO read."""
    env = Env(dut)
    await env.start()
    rng = random.Random(SEED + 1)
    values = {m: rng.getrandbits(64) for m, _, _ in COUNTERS}
    dut.counters.value = pack(values, CNT)
    for member, base, _ in COUNTERS:
        lo = await env.rd(register(f"{base}_LO").offset)
        # the counters move on before HI is read: HI must still match the LO read
        moved = dict(values, **{member: values[member] + (1 << 32) * 7 + 5})
        dut.counters.value = pack(moved, CNT)
        hi = await env.rd(register(f"{base}_HI").offset)
        assert hi << 32 | lo == values[member], f"{base}: 0x{hi:08x}_{lo:08x} != 0x{values[member]:016x}"
        dut.counters.value = pack(values, CNT)
    # interleaved pairs: each counter has its own shadow
    a, b = COUNTERS[0][1], COUNTERS[1][1]
    lo_a = await env.rd(register(f"{a}_LO").offset)
    lo_b = await env.rd(register(f"{b}_LO").offset)
    hi_a = await env.rd(register(f"{a}_HI").offset)
    hi_b = await env.rd(register(f"{b}_HI").offset)
    assert hi_a << 32 | lo_a == values[COUNTERS[0][0]]
    assert hi_b << 32 | lo_b == values[COUNTERS[1][0]]
