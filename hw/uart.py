"""UART bridge: register and memory access to the core over a serial line.

Pieces (all in the ``sync`` domain, synchronous reset):

* :class:`UartTx`, :class:`UartRx`: 8N1 serial, ``clocks_per_bit`` clock cycles per bit
  (:func:`clocks_per_bit` computes it from the clock and the baud rate, refusing rates the
  clock cannot make within 2%).
* :class:`UartBridge`: a frame parser with CRC-16/CCITT that masters an AXI4-Lite bus
  (the core's ``csr``) and an AXI4 bus (device memory). Protocol below; the host side is
  :class:`weft.sw.driver.uart.UartTransport`.
* :class:`AXI4LiteArbiter`, :class:`AXI4Arbiter`: two masters onto one slave.
* :class:`UartTop`: the core with a bridge beside it; the bridge's register master and an
  external ``csr`` port share the core's register block, and the bridge's memory master
  shares the core's ``axi`` port. This is what the system twin runs for the UART path
  (and what a board top with on-chip or external memory wraps).

Protocol (version 1; all multi-byte fields little-endian except the CRC):

Request: ``A5 | cmd | seq | addr u32 | len u16 | payload (len bytes, writes only) | crc16``.
Response: ``5A | cmd | seq | status | len u16 | payload (len bytes) | crc16``.
``crc16`` is CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, ``binascii.crc_hqx(x, 0xFFFF)``)
over every byte after the sync byte, sent most significant byte first (so the CRC over a
whole frame after the sync byte is 0).

Commands: ``INFO`` (1; answers ``u8 version, u8 bus bytes, u16 max payload, u16 clocks per
bit``; also forgets the last sequence number), ``REG_READ`` (2, len 4; answers the value),
``REG_WRITE`` (3, len 4, payload the value; all byte lanes), ``MEM_READ`` (4, len
1..max_payload; answers the bytes), ``MEM_WRITE`` (5, len 1..max_payload bytes of payload).
Status: 0 OK, 1 bad CRC, 2 unknown command, 3 bad length, 4 bad address (register offset
outside the window or not 4-aligned), ``0x40 | resp`` an AXI error response (SLVERR 0x42,
DECERR 0x43; the access still ran to its end; a read answers no payload).

A write whose ``seq`` and ``cmd`` equal the previous good frame's is a host retry after a
lost answer: it is not executed again, the previous status is answered (so a retried
``CONTROL.start`` does not start twice). A frame with a bad CRC, an unknown command or a bad
length is answered with that status and no side effect; a frame that stops arriving for
``timeout_cycles`` is dropped silently (the host times out and retries). Bytes that arrive
while the bridge executes or answers are dropped (the host waits for each answer).
"""

from __future__ import annotations

import enum

from amaranth.hdl import Cat, Const, Module, Mux, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out, connect

from .axi import AXI4LiteSignature, AXI4Signature, Burst
from .config import AcceleratorConfig

__all__ = [
    "PROTOCOL_VERSION", "SYNC_REQUEST", "SYNC_RESPONSE", "Cmd", "Status", "crc16", "crc16_update_bits",
    "clocks_per_bit", "UartTx", "UartRx", "UartBridge", "AXI4LiteArbiter", "AXI4Arbiter", "UartTop",
]

PROTOCOL_VERSION = 1
SYNC_REQUEST = 0xA5
SYNC_RESPONSE = 0x5A
CRC_INIT = 0xFFFF
CRC_POLY = 0x1021


class Cmd(enum.IntEnum):
    INFO = 1
    REG_READ = 2
    REG_WRITE = 3
    MEM_READ = 4
    MEM_WRITE = 5


class Status(enum.IntEnum):
    OK = 0
    BAD_CRC = 1
    BAD_COMMAND = 2
    BAD_LENGTH = 3
    BAD_ADDRESS = 4
    SLVERR = 0x42
    DECERR = 0x43


def _crc16_step(crc: int, byte: int) -> int:
    crc ^= byte << 8
    for _ in range(8):
        crc = ((crc << 1) ^ CRC_POLY) & 0xFFFF if crc & 0x8000 else (crc << 1) & 0xFFFF
    return crc


def crc16(data: bytes, crc: int = CRC_INIT) -> int:
    """CRC-16/CCITT-FALSE, bit by bit (the RTL's reference; tests check it against binascii)."""
    for byte in data:
        crc = _crc16_step(crc, byte)
    return crc


# The byte update is linear over GF(2) in (crc, byte): each next-state bit is the XOR of the
# input bits whose unit vectors set it.
_CRC_TAPS = [([i for i in range(16) if (_crc16_step(1 << i, 0) >> o) & 1],
              [j for j in range(8) if (_crc16_step(0, 1 << j) >> o) & 1]) for o in range(16)]


def crc16_update_bits(crc, byte):
    """Amaranth expression: ``crc`` (16 bits) updated with ``byte`` (8 bits), MSB first
    (one level of XOR trees, no loop: combinational, one byte per cycle)."""
    bits = []
    for crc_taps, byte_taps in _CRC_TAPS:
        terms = [crc[i] for i in crc_taps] + [byte[j] for j in byte_taps]
        x = terms[0]
        for t in terms[1:]:
            x = x ^ t
        bits.append(x)
    return Cat(*bits)


def clocks_per_bit(clock_hz: float, baud: float, *, tolerance: float = 0.02) -> int:
    """Clock cycles per UART bit for ``baud`` at ``clock_hz``; refuses a baud rate the clock
    cannot make within ``tolerance`` (2%: 8N1 tolerates about 4% between two ends), or one
    that leaves fewer than 4 cycles per bit."""
    if not (isinstance(clock_hz, (int, float)) and clock_hz > 0):
        raise ValueError(f"clock_hz must be a positive number, got {clock_hz!r}")
    if not (isinstance(baud, (int, float)) and baud > 0):
        raise ValueError(f"baud must be a positive number, got {baud!r}")
    n = round(clock_hz / baud)
    if n < 4:
        raise ValueError(f"baud {baud:g} at a {clock_hz:g} Hz clock leaves {clock_hz / baud:.2f} cycles per bit; "
                         f"the UART needs at least 4 (baud <= {clock_hz / 4:g})")
    err = abs(clock_hz / n - baud) / baud
    if err > tolerance:
        raise ValueError(f"baud {baud:g} at {clock_hz:g} Hz: the nearest divisor {n} gives {clock_hz / n:g} baud, "
                         f"{err:.1%} off (more than {tolerance:.0%})")
    return n


def _check_cpb(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"clocks_per_bit must be an int, got {type(value).__name__} {value!r}")
    if not 4 <= value < (1 << 16):
        raise ValueError(f"clocks_per_bit={value} is out of range (4..65535; use clocks_per_bit(clock_hz, baud))")
    return value


class UartTx(wiring.Component):
    """8N1 transmitter. ``data`` is a stream of bytes; ``tx`` the line (idle high).

    Throughput: one byte per ``10 * clocks_per_bit`` cycles; ``data.ready`` is high while
    the line is idle, and the byte's start bit begins the cycle after the handshake.
    """

    def __init__(self, clocks_per_bit: int):
        self.clocks_per_bit = _check_cpb(clocks_per_bit)
        super().__init__({"data": In(stream.Signature(8)), "tx": Out(1, init=1)})

    def elaborate(self, platform):
        m = Module()
        cpb = self.clocks_per_bit
        shift = Signal(10)          # stop, data[7:0], start; shifted out LSB first
        bits = Signal(range(11))    # bits left to send
        count = Signal(range(cpb))
        m.d.comb += self.data.ready.eq(bits == 0)
        with m.If(bits == 0):
            with m.If(self.data.valid):
                m.d.sync += [shift.eq(Cat(Const(0, 1), self.data.payload, Const(1, 1))), bits.eq(10),
                             count.eq(cpb - 1), self.tx.eq(0)]
        with m.Else():
            with m.If(count == 0):
                m.d.sync += [count.eq(cpb - 1), bits.eq(bits - 1), shift.eq(shift >> 1)]
                m.d.sync += self.tx.eq(Mux(bits == 1, 1, shift[1]))
            with m.Else():
                m.d.sync += count.eq(count - 1)
        return m


class UartRx(wiring.Component):
    """8N1 receiver. ``rx`` is the line (synchronised with two flip-flops here);
    ``data`` gives each byte for one cycle (``always_ready``: a UART cannot wait);
    ``frame_error`` pulses for a byte whose stop bit was 0 (the byte is dropped).

    Samples each bit in its middle: a byte appears about ``9.5 * clocks_per_bit + 3``
    cycles after its start bit begins; accepts back-to-back bytes at the line rate.
    """

    def __init__(self, clocks_per_bit: int):
        self.clocks_per_bit = _check_cpb(clocks_per_bit)
        super().__init__({"rx": In(1, init=1), "data": Out(stream.Signature(8, always_ready=True)),
                          "frame_error": Out(1)})

    def elaborate(self, platform):
        m = Module()
        cpb = self.clocks_per_bit
        s1 = Signal(init=1)
        s2 = Signal(init=1)
        m.d.sync += [s1.eq(self.rx), s2.eq(s1)]
        count = Signal(range(cpb))
        bit = Signal(range(10))
        shift = Signal(8)
        m.d.sync += [self.data.valid.eq(0), self.frame_error.eq(0)]
        with m.FSM():
            with m.State("IDLE"):
                with m.If(~s2):
                    m.d.sync += count.eq(cpb // 2 - 1)
                    m.next = "START"
            with m.State("START"):
                with m.If(count == 0):
                    with m.If(s2):            # a glitch, not a start bit
                        m.next = "IDLE"
                    with m.Else():
                        m.d.sync += [count.eq(cpb - 1), bit.eq(0)]
                        m.next = "DATA"
                with m.Else():
                    m.d.sync += count.eq(count - 1)
            with m.State("DATA"):
                with m.If(count == 0):
                    m.d.sync += [count.eq(cpb - 1), shift.eq(Cat(shift[1:], s2)), bit.eq(bit + 1)]
                    with m.If(bit == 7):
                        m.next = "STOP"
                with m.Else():
                    m.d.sync += count.eq(count - 1)
            with m.State("STOP"):
                with m.If(count == 0):
                    with m.If(s2):
                        m.d.sync += [self.data.payload.eq(shift), self.data.valid.eq(1)]
                        m.next = "IDLE"
                    with m.Else():
                        m.d.sync += self.frame_error.eq(1)
                        m.next = "BREAK"
                with m.Else():
                    m.d.sync += count.eq(count - 1)
            with m.State("BREAK"):             # wait for the line to return high
                with m.If(s2):
                    m.next = "IDLE"
        return m


class UartBridge(wiring.Component):
    """Frame parser and bus master (protocol in this module's docstring).

    Parameters: ``data_bits`` (the memory bus width), ``clocks_per_bit`` (>= 4),
    ``max_payload`` (bytes per frame, 4..4096, buffered in a LUT memory so a frame's CRC is
    checked before anything is written), ``csr_addr_bits`` (register window), and
    ``timeout_cycles`` (a frame whose next byte does not come in this many cycles is dropped).

    Ports: ``rx``/``tx`` (the line), ``csr`` (AXI4-Lite master), ``mem`` (AXI4 master, single
    beat transfers of one bus word with byte strobes, ID 0), ``busy`` (the bridge is inside a
    frame, executing or answering; low while it waits for a sync byte).

    Latency and throughput: the serial line dominates. A request is executed after its last
    CRC byte (about 10 * clocks_per_bit + 3 cycles after that byte starts); a memory access
    costs a few cycles per bus word (AR/R or AW+W/B, one word at a time); the answer then goes
    out at one byte per 10 * clocks_per_bit cycles. Frame overhead: 11 bytes per request
    (+ payload on writes), 8 per answer (+ payload on reads).
    """

    def __init__(self, *, data_bits: int = 32, clocks_per_bit: int = 4, max_payload: int = 256,
                 csr_addr_bits: int = 12, timeout_cycles: int = 1 << 20):
        self._check_args(data_bits=data_bits, clocks_per_bit=clocks_per_bit, max_payload=max_payload,
                         csr_addr_bits=csr_addr_bits, timeout_cycles=timeout_cycles)
        self.clocks_per_bit = clocks_per_bit
        self.data_bits = data_bits
        self.max_payload = max_payload
        self.csr_addr_bits = csr_addr_bits
        self.timeout_cycles = timeout_cycles
        super().__init__({
            "rx": In(1, init=1), "tx": Out(1, init=1),
            "csr": Out(AXI4LiteSignature(addr_width=csr_addr_bits, data_width=32)),
            "mem": Out(AXI4Signature(addr_width=32, data_width=data_bits)),
            "busy": Out(1),
        })

    @staticmethod
    def _check_args(*, data_bits, clocks_per_bit, max_payload, csr_addr_bits, timeout_cycles):
        if data_bits not in (8, 16, 32, 64, 128, 256, 512):
            raise ValueError(f"data_bits={data_bits!r} must be a power of two from 8 to 512")
        _check_cpb(clocks_per_bit)
        if isinstance(max_payload, bool) or not isinstance(max_payload, int) or not 4 <= max_payload <= 4096:
            raise ValueError(f"max_payload={max_payload!r} must be an int from 4 to 4096")
        if isinstance(csr_addr_bits, bool) or not isinstance(csr_addr_bits, int) or not 3 <= csr_addr_bits <= 32:
            raise ValueError(f"csr_addr_bits={csr_addr_bits!r} must be an int from 3 to 32")
        if isinstance(timeout_cycles, bool) or not isinstance(timeout_cycles, int) or \
                timeout_cycles < 20 * clocks_per_bit:
            raise ValueError(f"timeout_cycles={timeout_cycles!r} must be an int of at least two byte times "
                             f"({20 * clocks_per_bit} cycles)")

    def info_bytes(self) -> bytes:
        return bytes([PROTOCOL_VERSION, self.data_bits // 8]) + self.max_payload.to_bytes(2, "little") + \
            self.clocks_per_bit.to_bytes(2, "little")

    def elaborate(self, platform):
        m = Module()
        bus_bytes = self.data_bits // 8
        lane_bits = max(1, (bus_bytes - 1).bit_length())
        m.submodules.rx = rx = UartRx(self.clocks_per_bit)
        m.submodules.tx = tx = UartTx(self.clocks_per_bit)
        m.d.comb += [rx.rx.eq(self.rx), self.tx.eq(tx.tx)]
        m.submodules.buf = buf = Memory(shape=8, depth=self.max_payload, init=[])
        bw = buf.write_port()
        br = buf.read_port(domain="comb")

        byte_in = rx.data.payload
        got = rx.data.valid
        crc = Signal(16)
        cmd = Signal(8)
        seq = Signal(8)
        addr = Signal(32)
        length = Signal(16)
        hdr = Signal(range(8))   # header byte index (cmd .. len_hi)
        idx = Signal(range(self.max_payload + 1))
        status = Signal(8)
        regval = Signal(32)
        timer = Signal(range(self.timeout_cycles + 1))
        last_valid = Signal()
        last_seq = Signal(8)
        last_cmd = Signal(8)
        last_status = Signal(8)
        word = Signal(self.data_bits)
        strb = Signal(bus_bytes)
        cur = Signal(32)          # address of the byte at idx
        aw_done = Signal()
        w_done = Signal()
        err = Signal(2)

        is_write = (cmd == Cmd.REG_WRITE) | (cmd == Cmd.MEM_WRITE)
        is_reg = (cmd == Cmd.REG_READ) | (cmd == Cmd.REG_WRITE)
        info = self.info_bytes()

        # answer sender: byte `k` of the answer (0 sync, 1 cmd, 2 seq, 3 status, 4-5 len, payload, crc hi, lo)
        alen = Signal(16)
        k = Signal(17)
        pay_byte = Signal(8)
        info_byte = Signal(8)
        with m.Switch(idx):
            for i, b in enumerate(info):
                with m.Case(i):
                    m.d.comb += info_byte.eq(b)
        m.d.comb += pay_byte.eq(Mux(cmd == Cmd.INFO, info_byte,
                                    Mux(cmd == Cmd.REG_READ, regval.word_select(idx[:2], 8), br.data)))
        m.d.comb += br.addr.eq(idx)
        send_byte = Signal(8)
        m.d.comb += tx.data.payload.eq(send_byte)

        lane = cur[:lane_bits] if bus_bytes > 1 else Const(0, 1)
        m.d.comb += self.busy.eq(1)
        crc_next = crc16_update_bits(crc, byte_in)

        # bus masters: constant fields
        mem, csr = self.mem, self.csr
        size = (bus_bytes - 1).bit_length()
        m.d.comb += [mem.awlen.eq(0), mem.awsize.eq(size), mem.awburst.eq(Burst.INCR), mem.awid.eq(0),
                     mem.arlen.eq(0), mem.arsize.eq(size), mem.arburst.eq(Burst.INCR), mem.arid.eq(0),
                     mem.wlast.eq(1), mem.awcache.eq(0b0011), mem.arcache.eq(0b0011),
                     mem.awaddr.eq(cur & ~(bus_bytes - 1)), mem.araddr.eq(cur & ~(bus_bytes - 1)),
                     mem.wdata.eq(word), mem.wstrb.eq(strb),
                     csr.awaddr.eq(addr), csr.araddr.eq(addr), csr.wdata.eq(regval), csr.wstrb.eq(0xF)]

        def answer(st, n):
            m.d.sync += [status.eq(st), alen.eq(n), k.eq(0), idx.eq(0)]
            m.next = "ANSWER"

        with m.FSM():
            with m.State("HUNT"):
                m.d.comb += self.busy.eq(0)
                with m.If(got & (byte_in == SYNC_REQUEST)):
                    m.d.sync += [crc.eq(CRC_INIT), hdr.eq(0), timer.eq(self.timeout_cycles)]
                    m.next = "HEADER"
            with m.State("HEADER"):
                with m.If(got):
                    m.d.sync += [crc.eq(crc_next), hdr.eq(hdr + 1), timer.eq(self.timeout_cycles)]
                    with m.Switch(hdr):
                        with m.Case(0):
                            m.d.sync += cmd.eq(byte_in)
                        with m.Case(1):
                            m.d.sync += seq.eq(byte_in)
                        for i in range(4):
                            with m.Case(2 + i):
                                m.d.sync += addr.word_select(i, 8).eq(byte_in)
                        with m.Case(6):
                            m.d.sync += length[:8].eq(byte_in)
                        with m.Case(7):
                            m.d.sync += [length[8:].eq(byte_in), idx.eq(0)]
                            new_len = Cat(length[:8], byte_in)
                            with m.If(new_len > self.max_payload):
                                answer(Status.BAD_LENGTH, 0)
                            with m.Elif(is_write & (new_len != 0)):
                                m.next = "PAYLOAD"
                            with m.Else():
                                m.next = "CRC"
                                m.d.sync += hdr.eq(0)
                with m.Elif(timer == 0):
                    m.next = "HUNT"
                with m.Else():
                    m.d.sync += timer.eq(timer - 1)
            with m.State("PAYLOAD"):
                with m.If(got):
                    m.d.comb += [bw.addr.eq(idx), bw.data.eq(byte_in), bw.en.eq(1)]
                    with m.If(idx < 4):
                        m.d.sync += regval.word_select(idx[:2], 8).eq(byte_in)
                    m.d.sync += [crc.eq(crc_next), idx.eq(idx + 1), timer.eq(self.timeout_cycles)]
                    with m.If(idx + 1 == length):
                        m.d.sync += hdr.eq(0)
                        m.next = "CRC"
                with m.Elif(timer == 0):
                    m.next = "HUNT"
                with m.Else():
                    m.d.sync += timer.eq(timer - 1)
            with m.State("CRC"):
                with m.If(got):
                    m.d.sync += [crc.eq(crc_next), hdr.eq(hdr + 1), timer.eq(self.timeout_cycles)]
                    with m.If(hdr == 1):
                        m.next = "CHECK"
                with m.Elif(timer == 0):
                    m.next = "HUNT"
                with m.Else():
                    m.d.sync += timer.eq(timer - 1)
            with m.State("CHECK"):
                m.d.sync += [idx.eq(0), cur.eq(addr), word.eq(0), strb.eq(0), err.eq(0), aw_done.eq(0),
                             w_done.eq(0)]
                repeat = last_valid & (last_seq == seq) & (last_cmd == cmd) & is_write
                with m.If(crc != 0):
                    answer(Status.BAD_CRC, 0)
                with m.Elif(~((cmd >= Cmd.INFO) & (cmd <= Cmd.MEM_WRITE))):
                    answer(Status.BAD_COMMAND, 0)
                with m.Else():
                    m.d.sync += [last_valid.eq(cmd != Cmd.INFO), last_seq.eq(seq), last_cmd.eq(cmd)]
                    with m.If(cmd == Cmd.INFO):
                        answer(Status.OK, len(info))
                    with m.Elif(is_reg & (length != 4)):
                        answer(Status.BAD_LENGTH, 0)
                        m.d.sync += last_status.eq(Status.BAD_LENGTH)
                    with m.Elif(~is_reg & (length == 0)):
                        answer(Status.BAD_LENGTH, 0)
                        m.d.sync += last_status.eq(Status.BAD_LENGTH)
                    with m.Elif(is_reg & ((addr[:2] != 0) | (addr[self.csr_addr_bits:] != 0))):
                        answer(Status.BAD_ADDRESS, 0)
                        m.d.sync += last_status.eq(Status.BAD_ADDRESS)
                    with m.Elif(repeat):
                        answer(last_status, 0)
                    with m.Elif(cmd == Cmd.REG_READ):
                        m.next = "REG_READ"
                    with m.Elif(cmd == Cmd.REG_WRITE):
                        m.next = "REG_WRITE"
                    with m.Elif(cmd == Cmd.MEM_READ):
                        m.next = "MEM_READ"
                    with m.Else():
                        m.next = "MEM_GATHER"
            with m.State("REG_READ"):
                m.d.comb += csr.arvalid.eq(~aw_done)
                with m.If(csr.arvalid & csr.arready):
                    m.d.sync += aw_done.eq(1)
                m.d.comb += csr.rready.eq(aw_done)
                with m.If(aw_done & csr.rvalid):
                    m.d.sync += regval.eq(csr.rdata)
                    st = Mux(csr.rresp != 0, 0x40 | csr.rresp, Status.OK)
                    answer(st, Mux(csr.rresp != 0, 0, 4))
                    m.d.sync += last_status.eq(st)
            with m.State("REG_WRITE"):
                m.d.comb += [csr.awvalid.eq(~aw_done), csr.wvalid.eq(~w_done)]
                with m.If(csr.awvalid & csr.awready):
                    m.d.sync += aw_done.eq(1)
                with m.If(csr.wvalid & csr.wready):
                    m.d.sync += w_done.eq(1)
                m.d.comb += csr.bready.eq(aw_done & w_done)
                with m.If(aw_done & w_done & csr.bvalid):
                    st = Mux(csr.bresp != 0, 0x40 | csr.bresp, Status.OK)
                    answer(st, 0)
                    m.d.sync += last_status.eq(st)
            with m.State("MEM_READ"):
                m.d.comb += mem.arvalid.eq(1)
                with m.If(mem.arready):
                    m.next = "MEM_READ_DATA"
            with m.State("MEM_READ_DATA"):
                m.d.comb += mem.rready.eq(1)
                with m.If(mem.rvalid):
                    m.d.sync += word.eq(mem.rdata)
                    with m.If(mem.rresp != 0):
                        m.d.sync += err.eq(mem.rresp)
                    m.next = "MEM_SCATTER"
            with m.State("MEM_SCATTER"):
                m.d.comb += [bw.addr.eq(idx), bw.data.eq(word.word_select(lane, 8)), bw.en.eq(1)]
                m.d.sync += [idx.eq(idx + 1), cur.eq(cur + 1)]
                with m.If(idx + 1 == length):
                    st = Mux(err != 0, 0x40 | err, Status.OK)
                    answer(st, Mux(err != 0, 0, length))
                    m.d.sync += last_status.eq(st)
                with m.Elif((lane == bus_bytes - 1) if bus_bytes > 1 else Const(1)):
                    m.next = "MEM_READ"
            with m.State("MEM_GATHER"):
                m.d.sync += [word.word_select(lane, 8).eq(br.data), strb.bit_select(lane, 1).eq(1),
                             idx.eq(idx + 1)]
                with m.If((idx + 1 == length) | ((lane == bus_bytes - 1) if bus_bytes > 1 else Const(1))):
                    m.next = "MEM_WRITE"
                with m.Else():
                    m.d.sync += cur.eq(cur + 1)
            with m.State("MEM_WRITE"):
                m.d.comb += [mem.awvalid.eq(~aw_done), mem.wvalid.eq(~w_done)]
                with m.If(mem.awvalid & mem.awready):
                    m.d.sync += aw_done.eq(1)
                with m.If(mem.wvalid & mem.wready):
                    m.d.sync += w_done.eq(1)
                m.d.comb += mem.bready.eq(aw_done & w_done)
                with m.If(aw_done & w_done & mem.bvalid):
                    m.d.sync += [aw_done.eq(0), w_done.eq(0), word.eq(0), strb.eq(0), cur.eq(cur + 1)]
                    new_err = Mux(mem.bresp != 0, mem.bresp, err)
                    m.d.sync += err.eq(new_err)
                    with m.If(idx == length):
                        st = Mux(new_err != 0, 0x40 | new_err, Status.OK)
                        answer(st, 0)
                        m.d.sync += last_status.eq(st)
                    with m.Else():
                        m.next = "MEM_GATHER"
            with m.State("ANSWER"):
                # k: 0 sync, 1 cmd, 2 seq, 3 status, 4 len lo, 5 len hi, 6.. payload, then crc hi, crc lo
                with m.If(k == 0):
                    m.d.comb += send_byte.eq(SYNC_RESPONSE)
                with m.Elif(k == 1):
                    m.d.comb += send_byte.eq(cmd)
                with m.Elif(k == 2):
                    m.d.comb += send_byte.eq(seq)
                with m.Elif(k == 3):
                    m.d.comb += send_byte.eq(status)
                with m.Elif(k == 4):
                    m.d.comb += send_byte.eq(alen[:8])
                with m.Elif(k == 5):
                    m.d.comb += send_byte.eq(alen[8:])
                with m.Elif(k < 6 + alen):
                    m.d.comb += send_byte.eq(pay_byte)
                with m.Elif(k == 6 + alen):
                    m.d.comb += send_byte.eq(crc[8:])
                with m.Else():
                    m.d.comb += send_byte.eq(crc[:8])
                m.d.comb += tx.data.valid.eq(1)
                with m.If(tx.data.ready):
                    m.d.sync += k.eq(k + 1)
                    with m.If(k == 0):
                        m.d.sync += crc.eq(CRC_INIT)
                    with m.Elif(k < 6 + alen):
                        m.d.sync += crc.eq(crc16_update_bits(crc, send_byte))
                    with m.If((k >= 6) & (k < 6 + alen)):
                        m.d.sync += idx.eq(idx + 1)
                    with m.If(k == 7 + alen):
                        m.next = "DRAIN"
            with m.State("DRAIN"):                 # let the last byte leave before hunting again
                with m.If(tx.data.ready):
                    m.next = "HUNT"
        return m


class AXI4LiteArbiter(wiring.Component):
    """Two AXI4-Lite masters (``m0`` has priority when both ask at once) onto one slave ``s``.

    Reads and writes are arbitrated separately, one transaction at a time each: a grant is
    held from the address (or write data) until its response. Latency: one cycle added to
    the address phase; responses pass through combinationally.
    """

    def __init__(self, *, addr_width: int = 12, data_width: int = 32):
        sig = AXI4LiteSignature(addr_width=addr_width, data_width=data_width)
        super().__init__({"m0": In(sig), "m1": In(sig), "s": Out(sig)})

    def elaborate(self, platform):
        m = Module()
        ms, s = (self.m0, self.m1), self.s
        rbusy, rsel, ar_done = Signal(), Signal(), Signal()
        wbusy, wsel, aw_done, w_done = Signal(), Signal(), Signal(), Signal()
        with m.If(~rbusy):
            with m.If(ms[0].arvalid | ms[1].arvalid):
                m.d.sync += [rbusy.eq(1), rsel.eq(~ms[0].arvalid), ar_done.eq(0)]
        for i, mi in enumerate(ms):
            with m.If(rbusy & (rsel == i)):
                m.d.comb += [s.araddr.eq(mi.araddr), s.arprot.eq(mi.arprot), s.arvalid.eq(mi.arvalid & ~ar_done),
                             mi.arready.eq(s.arready & ~ar_done), mi.rdata.eq(s.rdata), mi.rresp.eq(s.rresp),
                             mi.rvalid.eq(s.rvalid & ar_done), s.rready.eq(mi.rready & ar_done)]
        with m.If(s.arvalid & s.arready):
            m.d.sync += ar_done.eq(1)
        with m.If(s.rvalid & s.rready):
            m.d.sync += [rbusy.eq(0), ar_done.eq(0)]
        with m.If(~wbusy):
            req0 = ms[0].awvalid | ms[0].wvalid
            with m.If(req0 | ms[1].awvalid | ms[1].wvalid):
                m.d.sync += [wbusy.eq(1), wsel.eq(~req0), aw_done.eq(0), w_done.eq(0)]
        for i, mi in enumerate(ms):
            with m.If(wbusy & (wsel == i)):
                m.d.comb += [s.awaddr.eq(mi.awaddr), s.awprot.eq(mi.awprot), s.awvalid.eq(mi.awvalid & ~aw_done),
                             mi.awready.eq(s.awready & ~aw_done), s.wdata.eq(mi.wdata), s.wstrb.eq(mi.wstrb),
                             s.wvalid.eq(mi.wvalid & ~w_done), mi.wready.eq(s.wready & ~w_done),
                             mi.bresp.eq(s.bresp), mi.bvalid.eq(s.bvalid & aw_done & w_done),
                             s.bready.eq(mi.bready & aw_done & w_done)]
        with m.If(s.awvalid & s.awready):
            m.d.sync += aw_done.eq(1)
        with m.If(s.wvalid & s.wready):
            m.d.sync += w_done.eq(1)
        with m.If(s.bvalid & s.bready):
            m.d.sync += [wbusy.eq(0), aw_done.eq(0), w_done.eq(0)]
        return m


class AXI4Arbiter(wiring.Component):
    """Two AXI4 masters onto one slave, for in-order slaves (responses in request order).

    Reads and writes are arbitrated separately. The granted master may have many bursts
    outstanding; the grant moves only when none of its bursts is outstanding (counted from
    AR to the last R beat, from AW to B). While the other master asks, the granted one's
    new addresses are held back once it has issued one (round robin), so neither starves. The grant decision adds
    no cycle while the grant stays; a switch costs one cycle. Up to 31 outstanding bursts.

    Write data must follow its address's grant: the slave must accept W beats only for an
    accepted AW (true of the twin's memory model and of AXI interconnects that route W by
    the AW order).
    """

    def __init__(self, *, addr_width: int = 32, data_width: int = 32, id_width: int = 1):
        sig = AXI4Signature(addr_width=addr_width, data_width=data_width, id_width=id_width)
        super().__init__({"m0": In(sig), "m1": In(sig), "s": Out(sig)})

    def elaborate(self, platform):
        m = Module()
        ms, s = (self.m0, self.m1), self.s
        ar_fields = ("arid", "araddr", "arlen", "arsize", "arburst", "arlock", "arcache", "arprot")
        aw_fields = ("awid", "awaddr", "awlen", "awsize", "awburst", "awlock", "awcache", "awprot")
        rsel, wsel = Signal(), Signal()
        rcount, wcount = Signal(5), Signal(5)
        ar_hold, aw_hold = Signal(), Signal()   # the slave saw a valid address last cycle, not yet taken
        r_other = Mux(rsel, ms[0].arvalid, ms[1].arvalid)
        w_other = Mux(wsel, ms[0].awvalid | ms[0].wvalid, ms[1].awvalid | ms[1].wvalid)
        r_issued, w_issued = Signal(), Signal()  # the granted master issued an address since its grant
        ar_block = r_other & r_issued & ~ar_hold
        # ... except while its write data is already waiting (W may lead AW): its address must
        # go through, or that W could never complete and the grant could never move.
        aw_block = w_other & w_issued & ~aw_hold & ~s.wvalid
        for i, mi in enumerate(ms):
            with m.If(rsel == i):
                m.d.comb += [getattr(s, f).eq(getattr(mi, f)) for f in ar_fields]
                m.d.comb += [s.arvalid.eq(mi.arvalid & ~ar_block), mi.arready.eq(s.arready & ~ar_block),
                             mi.rid.eq(s.rid), mi.rdata.eq(s.rdata), mi.rresp.eq(s.rresp), mi.rlast.eq(s.rlast),
                             mi.rvalid.eq(s.rvalid), s.rready.eq(mi.rready)]
            with m.If(wsel == i):
                m.d.comb += [getattr(s, f).eq(getattr(mi, f)) for f in aw_fields]
                m.d.comb += [s.awvalid.eq(mi.awvalid & ~aw_block), mi.awready.eq(s.awready & ~aw_block),
                             s.wdata.eq(mi.wdata), s.wstrb.eq(mi.wstrb), s.wlast.eq(mi.wlast),
                             s.wvalid.eq(mi.wvalid), mi.wready.eq(s.wready),
                             mi.bid.eq(s.bid), mi.bresp.eq(s.bresp), mi.bvalid.eq(s.bvalid), s.bready.eq(mi.bready)]
        ar_fire = s.arvalid & s.arready
        r_end = s.rvalid & s.rready & s.rlast
        aw_fire = s.awvalid & s.awready
        b_fire = s.bvalid & s.bready
        m.d.sync += [rcount.eq(rcount + ar_fire - r_end), wcount.eq(wcount + aw_fire - b_fire),
                     ar_hold.eq(s.arvalid & ~s.arready), aw_hold.eq(s.awvalid & ~s.awready)]
        with m.If(ar_fire):
            m.d.sync += r_issued.eq(1)
        with m.If(aw_fire):
            m.d.sync += w_issued.eq(1)
        with m.If((rcount == 0) & ~s.arvalid & ~ar_hold & r_other):
            m.d.sync += [rsel.eq(~rsel), r_issued.eq(0)]
        # Never while the granted master offers write data: a valid W must stay valid until taken.
        with m.If((wcount == 0) & ~s.awvalid & ~aw_hold & ~s.wvalid & w_other):
            m.d.sync += [wsel.eq(~wsel), w_issued.eq(0)]
        return m


class UartTop(wiring.Component):
    """The core with a UART bridge: what the twin runs for the UART transport.

    Ports: the core's (``axi``, ``csr``, ``irq``; the harness's direct register access on
    ``csr`` shares the register block with the bridge through :class:`AXI4LiteArbiter`, and
    the bridge's memory master shares ``axi`` with the core's DMA through
    :class:`AXI4Arbiter`), plus ``uart_rx`` (in, idle high), ``uart_tx`` (out),
    ``uart_busy`` (the bridge is inside a frame: the twin keeps clocking while it is high) and
    ``uart_clocks_per_bit`` (a constant: the twin's serial model reads the bit time from it).
    """

    def __init__(self, config: AcceleratorConfig, *, clocks_per_bit: int = 4, max_payload: int = 256,
                 timeout_cycles: int = 1 << 20):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"UartTop needs an AcceleratorConfig, got {type(config).__name__}")
        from .core import CSR_ADDR_BITS

        self.config = config
        # validated here, built in elaborate()
        self._bridge_args = dict(data_bits=config.bus.data_bits, clocks_per_bit=_check_cpb(clocks_per_bit),
                                 max_payload=max_payload, csr_addr_bits=CSR_ADDR_BITS, timeout_cycles=timeout_cycles)
        UartBridge._check_args(**self._bridge_args)
        self.clocks_per_bit = clocks_per_bit
        self.csr_addr_bits = CSR_ADDR_BITS
        super().__init__({
            "axi": Out(AXI4Signature(addr_width=32, data_width=config.bus.data_bits)),
            "csr": In(AXI4LiteSignature(addr_width=CSR_ADDR_BITS, data_width=32)),
            "irq": Out(1),
            "uart_rx": In(1, init=1), "uart_tx": Out(1, init=1), "uart_busy": Out(1),
            "uart_clocks_per_bit": Out(16),
        })

    def elaborate(self, platform):
        from .core import Core

        m = Module()
        m.submodules.core = core = Core(self.config)
        m.submodules.bridge = bridge = UartBridge(**self._bridge_args)
        m.submodules.csr_arb = csr_arb = AXI4LiteArbiter(addr_width=self.csr_addr_bits)
        m.submodules.mem_arb = mem_arb = AXI4Arbiter(data_width=self.config.bus.data_bits)
        connect(m, wiring.flipped(self.csr), csr_arb.m0)
        connect(m, bridge.csr, csr_arb.m1)
        connect(m, csr_arb.s, core.csr)
        connect(m, core.axi, mem_arb.m0)
        connect(m, bridge.mem, mem_arb.m1)
        connect(m, mem_arb.s, wiring.flipped(self.axi))
        m.d.comb += [self.irq.eq(core.irq), bridge.rx.eq(self.uart_rx), self.uart_tx.eq(bridge.tx),
                     self.uart_busy.eq(bridge.busy), self.uart_clocks_per_bit.eq(self.clocks_per_bit)]
        return m

