"""cocotb bench for weft.hw.uart.UartBridge (run by tests/hw/test_uart.py).

The bench plays the host's UART bit by bit on ``rx`` (8N1, ``clocks_per_bit`` cycles a bit)
and samples ``tx`` mid-bit. Registers: cocotbext-axi's AxiLiteRam on ``csr__*``; memory:
AxiRam on ``mem__*``. Reference: the protocol written out here on its own (frame layout,
``binascii.crc_hqx``), a ``bytearray`` per bus for the expected contents, and the expected
answer of every request (status, payload). Random register and memory accesses at any
address and length, then faults: a bad CRC (answered BAD_CRC, no effect), unknown command,
bad lengths, bad register address, a write repeated with its sequence number (answered,
not executed again: the RAM is changed behind the bridge's back in between), INFO (forgets
the number), and a frame cut short (dropped silently after ``timeout_cycles``).
"""

from __future__ import annotations

import binascii
import random
import struct

import cocotb
from cocotb.triggers import FallingEdge, ReadOnly
from cocotbext.axi import AxiBus, AxiLiteBus, AxiLiteRam, AxiRam

from weft.sim.benchlib import Cycle, params

P = params()
CPB = P["clocks_per_bit"]
MAXP = P["max_payload"]
BUS_BYTES = P["data_bits"] // 8
TIMEOUT = P["timeout_cycles"]
MEM_SIZE = 1 << 14
OK, BAD_CRC, BAD_COMMAND, BAD_LENGTH, BAD_ADDRESS = 0, 1, 2, 3, 4
INFO, REG_READ, REG_WRITE, MEM_READ, MEM_WRITE = 1, 2, 3, 4, 5


def frame(cmd, seq, addr, length, payload=b""):
    body = bytes([cmd, seq]) + struct.pack("<IH", addr, length) + payload
    return b"\xA5" + body + binascii.crc_hqx(body, 0xFFFF).to_bytes(2, "big")


class Line:
    def __init__(self, dut):
        self.dut = dut
        self.rx_bytes: list[int] = []

    async def send(self, data: bytes):
        for b in data:
            for bit in [0] + [(b >> i) & 1 for i in range(8)] + [1]:
                self.dut.rx.value = bit
                for _ in range(CPB):
                    await FallingEdge(self.dut.clk)

    async def listen(self):
        dut = self.dut
        while True:
            await FallingEdge(dut.clk)
            if int(dut.tx.value) == 0:
                for _ in range(CPB // 2):
                    await FallingEdge(dut.clk)
                assert int(dut.tx.value) == 0, "start bit glitch"
                v = 0
                for i in range(8):
                    for _ in range(CPB):
                        await FallingEdge(dut.clk)
                    v |= int(dut.tx.value) << i
                for _ in range(CPB):
                    await FallingEdge(dut.clk)
                assert int(dut.tx.value) == 1, "stop bit is 0"
                self.rx_bytes.append(v)

    async def answer(self, limit=20000):
        """Parse one answer frame from the received bytes (waiting up to `limit` cycles)."""
        for _ in range(limit):
            b = self.rx_bytes
            if len(b) >= 6 and len(b) >= 8 + (b[4] | b[5] << 8):
                n = b[4] | b[5] << 8
                fr = bytes(b[:8 + n])
                del b[:8 + n]
                assert fr[0] == 0x5A, f"answer starts with {fr[0]:#x}"
                assert binascii.crc_hqx(fr[1:6 + n], 0xFFFF) == int.from_bytes(fr[6 + n:], "big"), "answer CRC"
                return fr[1], fr[2], fr[3], fr[6:6 + n]
            await FallingEdge(self.dut.clk)
        raise AssertionError(f"no answer in {limit} cycles (have {bytes(self.rx_bytes)!r})")


async def setup(dut):
    cyc = Cycle(dut)
    await cyc.start(idle=[(dut.rx, 1)])
    regs = AxiLiteRam(AxiLiteBus.from_prefix(dut, "csr_"), dut.clk, dut.rst, size=4096)
    ram = AxiRam(AxiBus.from_prefix(dut, "mem_"), dut.clk, dut.rst, size=MEM_SIZE)
    line = Line(dut)
    cocotb.start_soon(line.listen())
    return regs, ram, line


async def request(line, cmd, seq, addr, length, payload=b""):
    await line.send(frame(cmd, seq, addr, length, payload))
    return await line.answer()


@cocotb.test()
async def test_random_accesses(dut):
    regs, ram, line = await setup(dut)
    rng = random.Random(P.get("seed", 1))
    ref_mem = bytearray(MEM_SIZE)
    ref_regs = bytearray(4096)
    ram.write(0, bytes(MEM_SIZE))
    regs.write(0, bytes(4096))
    c, s, st, info = await request(line, INFO, 0x77, 0, 0)
    assert (c, s, st) == (INFO, 0x77, OK)
    assert info == bytes([1, BUS_BYTES]) + struct.pack("<HH", MAXP, CPB), info
    for seq in range(1, 60):
        kind = rng.choice(["rr", "rw", "mr", "mw", "mw"])
        if kind == "rw":
            off, v = rng.randrange(1024) * 4, rng.getrandbits(32)
            assert await request(line, REG_WRITE, seq, off, 4, struct.pack("<I", v)) == (REG_WRITE, seq, OK, b"")
            ref_regs[off:off + 4] = struct.pack("<I", v)
        elif kind == "rr":
            off = rng.choice([rng.randrange(1024) * 4] + [o for o in range(0, 4096, 4) if any(ref_regs[o:o + 4])][:3])
            assert await request(line, REG_READ, seq, off, 4) == (REG_READ, seq, OK, bytes(ref_regs[off:off + 4]))
        elif kind == "mw":
            n = rng.randint(1, MAXP)
            a = rng.randrange(MEM_SIZE - n)
            data = bytes(rng.getrandbits(8) for _ in range(n))
            assert await request(line, MEM_WRITE, seq, a, n, data) == (MEM_WRITE, seq, OK, b"")
            ref_mem[a:a + n] = data
        else:
            n = rng.randint(1, MAXP)
            a = rng.randrange(MEM_SIZE - n)
            assert await request(line, MEM_READ, seq, a, n) == (MEM_READ, seq, OK, bytes(ref_mem[a:a + n]))
    assert ram.read(0, MEM_SIZE) == bytes(ref_mem)
    assert regs.read(0, 4096) == bytes(ref_regs)


@cocotb.test()
async def test_faults(dut):
    regs, ram, line = await setup(dut)
    ram.write(0, bytes(MEM_SIZE))
    data = bytes(range(1, 1 + min(MAXP, 20)))
    good = frame(MEM_WRITE, 5, 0x101, len(data), data)
    bad = bytearray(good)
    bad[12] ^= 0x01
    assert await line.send(bytes(bad)) is None
    assert (await line.answer())[2] == BAD_CRC
    assert ram.read(0x101, len(data)) == bytes(len(data))
    assert await request(line, 99, 6, 0, 0) == (99, 6, BAD_COMMAND, b"")
    assert (await request(line, REG_READ, 7, 0, 8))[2] == BAD_LENGTH
    assert (await request(line, REG_READ, 8, 0x1000, 4))[2] == BAD_ADDRESS
    assert (await request(line, REG_WRITE, 9, 0x6, 4, b"\0" * 4))[2] == BAD_ADDRESS
    assert (await request(line, MEM_READ, 10, 0, 0))[2] == BAD_LENGTH
    await line.send(frame(MEM_READ, 11, 0, MAXP + 1)[:9])  # the header alone: answered at once
    assert (await line.answer())[:3] == (MEM_READ, 11, BAD_LENGTH)
    for _ in range(40 * CPB):
        await FallingEdge(dut.clk)
    # the write, its replay, and a new number after INFO
    assert await request(line, MEM_WRITE, 5, 0x101, len(data), data) == (MEM_WRITE, 5, OK, b"")
    assert ram.read(0x101, len(data)) == data
    ram.write(0x101, b"\xEE" * len(data))
    assert await request(line, MEM_WRITE, 5, 0x101, len(data), data) == (MEM_WRITE, 5, OK, b"")
    assert ram.read(0x101, len(data)) == b"\xEE" * len(data), "a repeated write was executed again"
    assert (await request(line, INFO, 12, 0, 0))[2] == OK
    assert await request(line, MEM_WRITE, 5, 0x101, len(data), data) == (MEM_WRITE, 5, OK, b"")
    assert ram.read(0x101, len(data)) == data
    # a frame cut short: no answer; after the bridge's timeout the next frame is served
    await line.send(frame(MEM_WRITE, 13, 0x300, len(data), data)[:7])
    for _ in range(TIMEOUT + 50):
        await FallingEdge(dut.clk)
    assert not line.rx_bytes, "a cut-short frame was answered"
    assert await request(line, REG_READ, 14, 0, 4) == (REG_READ, 14, OK, bytes(regs.read(0, 4)))
    assert ram.read(0x300, len(data)) == bytes(len(data))
    await ReadOnly()
