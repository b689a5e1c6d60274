# amaranth: UnusedElaboratable=no
"""UART pieces of weft.hw.uart: CRC against binascii, the serial line in Amaranth's simulator,
parameter checks. The bridge end to end (frames, registers, memory, faults) runs in the twin:
tests/hil/test_uart_link.py and the ``uart`` HIL session."""

from __future__ import annotations

import binascii
import random

import pytest
from amaranth.hdl import Module, Signal
from amaranth.sim import Simulator

from weft.hw.config import load_config
from weft.hw.uart import (AXI4Arbiter, AXI4LiteArbiter, UartBridge, UartRx, UartTop, UartTx, clocks_per_bit,
                          crc16, crc16_update_bits)
from weft.sim.twin import has_uart_ports
from weft.sw.driver.uart import encode_request


def test_crc16_matches_binascii():
    rng = random.Random(4)
    for n in (0, 1, 2, 9, 64, 1000):
        data = bytes(rng.randrange(256) for _ in range(n))
        assert crc16(data) == binascii.crc_hqx(data, 0xFFFF)
    frame = encode_request(5, 3, 0x1234, 3, b"abc")
    assert binascii.crc_hqx(frame[1:], 0xFFFF) == 0  # CRC sent MSB first: the residue is 0


def test_crc16_rtl_update_matches_reference():
    crc, byte = Signal(16), Signal(8)
    m = Module()
    out = Signal(16)
    m.d.comb += out.eq(crc16_update_bits(crc, byte))
    sim = Simulator(m)
    rng = random.Random(7)
    cases = [(0xFFFF, 0x00), (0x0000, 0xFF), (0x1D0F, 0x31)] + [(rng.randrange(1 << 16), rng.randrange(256))
                                                                 for _ in range(200)]

    async def bench(ctx):
        for c, b in cases:
            ctx.set(crc, c)
            ctx.set(byte, b)
            assert ctx.get(out) == binascii.crc_hqx(bytes([b]), c), (hex(c), hex(b))

    sim.add_testbench(bench)
    sim.run()


@pytest.mark.parametrize("cpb", [4, 7])
def test_uart_tx_into_rx_loopback(cpb):
    """Bytes through UartTx's line into UartRx arrive intact, in order, at the line rate;
    the line idles high and each byte's start bit is low for clocks_per_bit cycles."""
    m = Module()
    m.submodules.tx = tx = UartTx(cpb)
    m.submodules.rx = rx = UartRx(cpb)
    m.d.comb += rx.rx.eq(tx.tx)
    data = [0x00, 0xFF, 0x55, 0xA5, 0x5A, 0x01, 0x80, 0x3C]
    got, lows = [], []
    sim = Simulator(m)
    sim.add_clock(1e-6)

    async def send(ctx):
        for b in data:
            ctx.set(tx.data.payload, b)
            ctx.set(tx.data.valid, 1)
            await ctx.tick().until(tx.data.ready)
        ctx.set(tx.data.valid, 0)

    async def watch(ctx):
        cycles = 0
        low = 0
        while len(got) < len(data) and cycles < 12 * cpb * len(data) + 100:
            await ctx.tick()
            cycles += 1
            if ctx.get(rx.data.valid):
                got.append(ctx.get(rx.data.payload))
            assert not ctx.get(rx.frame_error)
            if ctx.get(tx.tx) == 0:
                low += 1
            elif low:
                lows.append(low)
                low = 0
        assert cycles <= 10 * cpb * len(data) + len(data) + 20  # back to back at the line rate

    sim.add_process(send)
    sim.add_testbench(watch)
    sim.run()
    assert got == data
    # the start bit of 0x00 with its 8 zero data bits is one 9-bit low run
    assert lows[0] == 9 * cpb and min(lows) == cpb


def test_uart_rx_reports_a_framing_error():
    cpb = 4
    m = Module()
    m.submodules.rx = rx = UartRx(cpb)
    seen = {"err": 0, "bytes": 0}
    sim = Simulator(m)
    sim.add_clock(1e-6)

    async def bench(ctx):
        ctx.set(rx.rx, 1)
        await ctx.tick().repeat(5)
        for bit in [0] + [1, 0, 1, 0, 1, 0, 1, 0] + [0] * 3 + [1] * 4:  # stop bit 0: a break
            ctx.set(rx.rx, bit)
            for _ in range(cpb):
                await ctx.tick()
                seen["err"] += ctx.get(rx.frame_error)
                seen["bytes"] += ctx.get(rx.data.valid)

    sim.add_testbench(bench)
    sim.run()
    assert seen == {"err": 1, "bytes": 0}


def test_clocks_per_bit_and_bad_parameters():
    assert clocks_per_bit(100e6, 3_000_000) == 33
    assert clocks_per_bit(48e6, 115200) == 417
    with pytest.raises(ValueError, match="at least 4"):
        clocks_per_bit(10e6, 5_000_000)
    with pytest.raises(ValueError, match="off"):
        clocks_per_bit(25e6, 3_000_000)  # 8.33 cycles: 4% off
    with pytest.raises(ValueError, match="positive"):
        clocks_per_bit(0, 9600)
    with pytest.raises(ValueError, match="clocks_per_bit=2"):
        UartTx(2)
    with pytest.raises(TypeError, match="clocks_per_bit must be an int"):
        UartRx(4.0)
    with pytest.raises(ValueError, match="max_payload"):
        UartBridge(max_payload=3)
    with pytest.raises(ValueError, match="data_bits"):
        UartBridge(data_bits=24)
    with pytest.raises(ValueError, match="timeout_cycles"):
        UartBridge(clocks_per_bit=8, timeout_cycles=100)
    with pytest.raises(TypeError, match="AcceleratorConfig"):
        UartTop("tiny")


def test_signatures_and_twin_port_detection():
    b = UartBridge(data_bits=128)
    assert b.signature.members["mem"].signature.data_width == 128
    assert set(b.signature.members) == {"rx", "tx", "csr", "mem", "busy"}
    assert set(AXI4Arbiter().signature.members) == {"m0", "m1", "s"}
    assert set(AXI4LiteArbiter().signature.members) == {"m0", "m1", "s"}
    assert set(UartTop(load_config("tiny")).signature.members) >= {"axi", "csr", "irq", "uart_rx", "uart_tx",
                                                                  "uart_busy", "uart_clocks_per_bit"}
    text = "module t(uart_rx, uart_tx);\n  input uart_rx;\n  output uart_tx;\n  output uart_busy;\n" \
           "  output [15:0] uart_clocks_per_bit;\nendmodule\n"
    assert has_uart_ports(text)
    assert not has_uart_ports("module t(a);\n  input a;\nendmodule\n")
    with pytest.raises(ValueError, match="not \\['uart_busy'"):
        has_uart_ports(text.replace("  output uart_busy;\n", ""))


BENCH = "tests/hw/benches/uart_bridge_bench.py"


@pytest.mark.rtl
@pytest.mark.parametrize("data_bits", [32, 128])
def test_uart_bridge_bench(data_bits):
    """The bridge RTL, bit by bit on its line, against the bench's own protocol reference and
    cocotbext-axi RAM models on both buses."""
    from weft.sim.rtl import run_bench

    params = {"data_bits": data_bits, "clocks_per_bit": 4, "max_payload": 32, "timeout_cycles": 400, "seed": 3}
    bridge = UartBridge(data_bits=data_bits, clocks_per_bit=4, max_payload=32, timeout_cycles=400)
    run_bench(bridge, BENCH, params=params, name="uart_bridge_top")
