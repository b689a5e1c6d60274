"""The UART link under faults, against the bridge running in a twin of UartTop(tiny).

A wrapper around the pty drops, truncates and corrupts request frames and drops or corrupts
answers: the transport retries and the results stay exact (checked against the twin's
memory through its socket, and a GEMM against the bit-exact model). A retried write is not
executed twice (the bridge replays its status; checked frame by frame). A dead line or a
killed twin raises a TransportError within a bounded time. See docs/hil.md.
"""

from __future__ import annotations

import os
import random
import signal
import time

import numpy as np
import pytest

from weft.hw.uart import SYNC_REQUEST, SYNC_RESPONSE, Cmd, Status
from weft.sw.driver import Device, TransportError, open_transport
from weft.sw.driver.uart import SerialLink, UartTransport, UartTransportError, encode_request, parse_uri
from weft.sw.hil import HilSession, compare_with_golden

from .conftest import TINY, launch_uart_twin
from .test_hil import _gemm

pytestmark = [pytest.mark.rtl, pytest.mark.verilator_only]


class FaultyLink:
    """A Link that damages traffic: each request frame (a write starting with the sync byte)
    is, by chance, dropped, cut short or has one byte flipped; each answer is, by chance,
    swallowed or has one byte flipped. ``log`` records what was done."""

    def __init__(self, link, *, seed=1, drop=0.0, truncate=0.0, corrupt=0.0, drop_answer=0.0,
                 corrupt_answer=0.0):
        self.link = link
        self.path = f"faulty({link.path})"
        self.rng = random.Random(seed)
        self.p = dict(drop=drop, truncate=truncate, corrupt=corrupt, drop_answer=drop_answer,
                      corrupt_answer=corrupt_answer)
        self.answer_fault = None
        self.log: list[str] = []

    def _roll(self, name):
        return self.rng.random() < self.p[name]

    def write(self, data: bytes) -> None:
        if not data or data[0] != SYNC_REQUEST:  # the transport's line flush: pass it through
            self.answer_fault = None
            return self.link.write(data)
        self.answer_fault = ("drop" if self._roll("drop_answer") else
                             "corrupt" if self._roll("corrupt_answer") else None)
        if self._roll("drop"):
            self.log.append("drop")
            return None
        if self._roll("truncate"):
            self.log.append("truncate")
            return self.link.write(data[:len(data) // 2])
        if self._roll("corrupt"):
            self.log.append("corrupt")
            i = self.rng.randrange(len(data))
            data = data[:i] + bytes([data[i] ^ (1 << self.rng.randrange(8))]) + data[i + 1:]
        return self.link.write(data)

    def read(self, max_bytes: int, timeout_s: float) -> bytes:
        data = self.link.read(max_bytes, timeout_s)
        if data and self.answer_fault == "drop":
            self.log.append("drop answer")
            return b""
        if data and self.answer_fault == "corrupt":
            self.log.append("corrupt answer")
            self.answer_fault = None
            i = self.rng.randrange(len(data))
            data = data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1:]
        return data

    def close(self) -> None:
        self.link.close()


@pytest.fixture(scope="module")
def uart_twin():
    with launch_uart_twin() as twin:
        yield twin


def _answer(link, timeout=5.0) -> tuple[int, int, int, bytes]:
    """Read one answer frame: (cmd, seq, status, payload)."""
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        buf += link.read(4096, 0.05)
        if len(buf) >= 6 and len(buf) >= 8 + (buf[4] | buf[5] << 8):
            assert buf[0] == SYNC_RESPONSE
            n = buf[4] | buf[5] << 8
            return buf[1], buf[2], buf[3], bytes(buf[6:6 + n])
    raise AssertionError(f"no answer in {timeout} s (got {bytes(buf)!r})")


def test_frames_crc_nak_and_write_replay(uart_twin):
    """Frame by frame: a bad CRC is answered BAD_CRC without effect; a write repeated with the
    same sequence number is answered but not executed again; INFO forgets the last number."""
    link = SerialLink(uart_twin.client.uart_info().pty, 3_000_000)
    try:
        link.write(encode_request(Cmd.INFO, 1, 0, 0))
        cmd, seq, status, info = _answer(link)
        assert (cmd, seq, status, info[0]) == (Cmd.INFO, 1, Status.OK, 1)
        a, b = bytes(range(1, 40)), bytes(range(100, 139))
        frame = encode_request(Cmd.MEM_WRITE, 7, 0x803, len(a), a)
        bad = bytearray(frame)
        bad[20] ^= 0x04
        link.write(bytes(bad))
        assert _answer(link)[2] == Status.BAD_CRC
        assert uart_twin.client.mem_read(0x803, len(a)) == bytes(len(a))  # nothing written
        link.write(frame)
        assert _answer(link)[:3] == (Cmd.MEM_WRITE, 7, Status.OK)
        assert uart_twin.client.mem_read(0x803, len(a)) == a
        uart_twin.client.mem_write(0x803, b)
        link.write(frame)  # the host's retry after a lost answer: replayed, not executed
        assert _answer(link)[:3] == (Cmd.MEM_WRITE, 7, Status.OK)
        assert uart_twin.client.mem_read(0x803, len(a)) == b
        link.write(encode_request(Cmd.INFO, 8, 0, 0))
        _answer(link)
        link.write(frame)  # after INFO the same number is a new request
        assert _answer(link)[2] == Status.OK
        assert uart_twin.client.mem_read(0x803, len(a)) == a
        # refused requests: unknown command, bad register length / address
        link.write(encode_request(9, 9, 0, 0))
        assert _answer(link)[2] == Status.BAD_COMMAND
        link.write(encode_request(Cmd.REG_READ, 10, 0, 8))
        assert _answer(link)[2] == Status.BAD_LENGTH
        link.write(encode_request(Cmd.REG_READ, 11, 0x1002, 4))
        assert _answer(link)[2] == Status.BAD_ADDRESS
        # an access outside memory is the slave's SLVERR, passed on
        link.write(encode_request(Cmd.MEM_READ, 12, TINY.device_memory_bytes - 2, 8))
        assert _answer(link)[2] == Status.SLVERR
    finally:
        link.close()


def test_dropped_and_corrupted_frames_are_retried(uart_twin):
    link = FaultyLink(SerialLink(uart_twin.client.uart_info().pty, 3_000_000), seed=5, drop=0.05, truncate=0.04,
                      corrupt=0.08, drop_answer=0.05, corrupt_answer=0.08)
    t = UartTransport(link, timeout=1.0, retries=8)
    dev = Device.open(t, TINY)
    t0 = time.monotonic()
    for i in range(12):
        v = (0x9E3779B9 * (i + 1)) & 0xFFFFFFFF
        dev.write_reg("SCRATCH", v)
        assert dev.read_reg("SCRATCH") == v
    data = np.random.default_rng(3).integers(0, 256, 700, dtype=np.uint8).tobytes()
    dev.write_mem(0x2001, data)
    assert uart_twin.client.mem_read(0x2001, len(data)) == data  # checked through the socket, not the UART
    assert dev.read_mem(0x2001, len(data)) == data
    # a GEMM through the damaged link, against the bit-exact model
    session = HilSession.__new__(HilSession)
    session.config, session.target, session.design, session.launch_kwargs = TINY, "uart", None, {}
    session.twin, session.device, session.launch_s = None, dev, 0.0
    bundle, inputs = _gemm(np.random.default_rng(9), 7, 5, 9, int8=False)
    report = compare_with_golden(bundle, inputs, TINY, session=session, watchdog_cycles=10_000_000, timeout_s=120)
    assert report.identical, report.difference
    kinds = set(link.log)
    assert {"drop", "corrupt", "truncate", "drop answer", "corrupt answer"} <= kinds, link.log
    assert t.stats.retries >= len(link.log) // 2 and t.stats.naks > 0 and t.stats.timeouts > 0, t.stats
    print(f"\n{len(link.log)} faults injected, {t.stats} in {time.monotonic() - t0:.1f} s")


def test_bridge_memory_traffic_while_the_core_runs_a_gemm(uart_twin):
    """The bridge's memory master and the core's DMA share the memory port (AXI4Arbiter):
    UART memory writes and reads land while a GEMM runs, and both results are exact."""
    from weft.compiler.perf import program_cost
    from weft.sim.golden import run_bundle

    t = UartTransport(uart_twin.client.uart_info().pty, timeout=2.0)
    dev = Device.open(t, TINY)
    bundle, inputs = _gemm(np.random.default_rng(21), 128, 128, 128, int8=False)
    # The twin clocks the design while the line is active and for 2**16 cycles after (its
    # --uart-linger default), then waits for the next frame. A GEMM well past that is still
    # running when the host's next frame arrives however slow the host is.
    assert program_cost(TINY, bundle.program)[-1] > 2 * 2**16
    dev.load_bundle(bundle)
    dev.write_inputs(inputs, bundle)
    dev.write_reg("WATCHDOG", 0)
    region = 0xF0_0000
    data = np.random.default_rng(22).integers(0, 256, 3 * t.max_payload, dtype=np.uint8).tobytes()
    c0 = uart_twin.client.cycles()
    dev.start()
    t.write_mem(region, data[:t.max_payload])  # executed by the bridge while the core works
    assert dev.status().busy, "the GEMM finished before the bridge's first memory write"
    t.write_mem(region + t.max_payload, data[t.max_payload:])
    got = t.read_mem(region, len(data))
    dev.wait(timeout_s=120)
    assert got == data and uart_twin.client.mem_read(region, len(data)) == data
    want, _ = run_bundle(bundle, inputs, TINY)
    out = dev.read_outputs(bundle)
    for name in want:
        assert np.array_equal(out[name], want[name]), name
    print(f"\nGEMM and UART traffic together: {uart_twin.client.cycles() - c0:,} cycles")
    t.close()


def test_a_link_that_corrupts_everything_is_reported(uart_twin):
    t = UartTransport(uart_twin.client.uart_info().pty, timeout=1.0, retries=3)
    t.link = FaultyLink(t.link, corrupt=1.0)
    t0 = time.monotonic()
    with pytest.raises(UartTransportError, match=r"REG_READ at 0x0 .*failed after 4 attempts.*BAD_CRC"):
        t.read32(0)
    assert time.monotonic() - t0 < 20
    t.link = t.link.link  # the line itself is fine: the next request goes through
    assert t.read32(0) == 0x54464557
    t.close()


def test_dead_line_raises_within_bounded_time():
    master, slave = os.openpty()  # a port with nothing behind it
    try:
        t0 = time.monotonic()
        with pytest.raises(UartTransportError, match=r"INFO .*failed after 3 attempts.*no answer"):
            UartTransport(os.ttyname(slave), timeout=0.2, retries=2)
        assert time.monotonic() - t0 < 5
    finally:
        os.close(master)
        os.close(slave)


def test_killed_uart_twin_is_a_clear_error():
    twin = launch_uart_twin()
    try:
        t = UartTransport(twin.client.uart_info().pty, timeout=0.5, retries=2)
        assert Device.open(t, TINY).read_reg("ID") == 0x54464557
        os.kill(twin.process.pid, signal.SIGKILL)
        twin.process.wait(timeout=5)
        t0 = time.monotonic()
        with pytest.raises(TransportError):
            t.read32(0)
        assert time.monotonic() - t0 < 10
        t.close()
    finally:
        twin.close()


def test_uart_uri_and_bad_input():
    assert parse_uri("///dev/ttyUSB0?baud=115200&retries=2&timeout=0.25") == \
        ("/dev/ttyUSB0", {"baud": 115200, "retries": 2, "timeout": 0.25})
    with pytest.raises(ValueError, match="option 'speed' is unknown"):
        parse_uri("/dev/ttyUSB0?speed=9600")
    with pytest.raises(ValueError, match="names no port"):
        parse_uri("?baud=9600")
    with pytest.raises(UartTransportError, match="cannot open serial port /nonexistent/tty"):
        open_transport("uart:///nonexistent/tty?baud=115200")
    with pytest.raises(ValueError, match="baud 1234567 is not a rate"):
        SerialLink("/dev/null", 1234567)
    with pytest.raises(UartTransportError, match="not a terminal"):
        SerialLink("/dev/null", 115200)
    with pytest.raises(ValueError, match="retries"):
        UartTransport("/dev/null", retries=-1)
