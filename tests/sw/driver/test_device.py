"""Device driver over the twin transport (stand-in top) and over an in-memory fake transport."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from weft.hw.bundle import Bundle, BundleError, ConfigMismatchError, Segment, TensorSpec
from weft.hw.config import load_config
from weft.hw.isa import assemble
from weft.hw.registers import COUNTERS, ID_VALUE, ErrorCause
from weft.sw.driver import (ConfigHashMismatch, Device, DeviceError, DeviceTimeoutError, IdentityError, Status,
                            Transport, TransportError, TwinTransport, open_transport, transport_schemes)
from weft.sw.driver.device import _reg

from tests.sim.twin_fixtures import copy_count, standin

TINY = load_config("tiny")


# ---------------------------------------------------------------------- a fake transport (no simulator)
class FakeTransport(Transport):
    """Registers in a dict and memory in a bytearray; records every access."""

    kind = "fake"

    def __init__(self, config, *, ident=ID_VALUE, config_hash=None):
        self.regs = {0x00: ident, 0x08: config.hash32 if config_hash is None else config_hash}
        self.mem = bytearray(config.device_memory_bytes)
        self.log: list[tuple] = []

    def read32(self, offset):
        self.log.append(("r", offset))
        return self.regs.get(offset, 0)

    def write32(self, offset, value):
        self.log.append(("w", offset, value))
        self.regs[offset] = value

    def read_mem(self, address, size):
        self.log.append(("rm", address, size))
        return bytes(self.mem[address:address + size])

    def write_mem(self, address, data):
        self.log.append(("wm", address, len(data)))
        self.mem[address:address + len(data)] = data

    def close(self):
        pass


def test_register_lookup_by_name_and_offset():
    assert _reg("scratch").offset == 0x28 and _reg(0x28).name == "SCRATCH"
    with pytest.raises(KeyError, match="no register named 'NOPE'"):
        _reg("NOPE")
    with pytest.raises(KeyError, match="0x3F0"):
        _reg(0x3F0)


def test_status_decoding():
    s = Status.decode(0x104)
    assert s.error and not s.busy and s.error_cause is ErrorCause.BUS_READ
    assert "BUS_READ" in str(s)


def test_open_checks_identity_and_hash_on_a_fake():
    Device.open(FakeTransport(TINY), TINY)
    with pytest.raises(IdentityError, match="0x12345678"):
        Device.open(FakeTransport(TINY, ident=0x12345678), TINY)
    with pytest.raises(ConfigHashMismatch) as info:
        Device.open(FakeTransport(TINY, config_hash=0xDEADBEEF), TINY)
    assert "0xDEADBEEF" in str(info.value) and f"0x{TINY.hash32:08X}" in str(info.value)


def test_read_only_registers_are_refused():
    dev = Device(FakeTransport(TINY), TINY)
    with pytest.raises(ValueError, match="read-only"):
        dev.write_reg("ID", 1)
    with pytest.raises(ValueError, match="32 bits"):
        dev.write_reg("SCRATCH", 1 << 32)


def test_bundle_for_another_configuration_touches_nothing():
    other = load_config("ulx3s")
    transport = FakeTransport(TINY)
    dev = Device(transport, TINY)
    bundle = Bundle.for_config(other, program=assemble("halt"), program_address=0x1000)
    with pytest.raises(ConfigMismatchError, match="ulx3s"):
        dev.load_bundle(bundle)
    assert transport.log == []
    too_big = Bundle.for_config(TINY, program=assemble("halt"), program_address=0,
                                segments=[Segment("w", TINY.device_memory_bytes - 2, b"abcd")])
    with pytest.raises(BundleError, match="device memory"):
        dev.load_bundle(too_big)
    assert transport.log == []


def test_load_bundle_and_tensors_on_a_fake():
    transport = FakeTransport(TINY)
    dev = Device(transport, TINY)
    x = TensorSpec.dense("x", (3, 5), "int8", 0x2000)
    y = TensorSpec("y", (2, 3), "int32", 0x3001, (40, 8))  # strided, unaligned, with gaps
    program = assemble("halt")
    bundle = Bundle.for_config(TINY, program=program, program_address=0x100,
                               segments=[Segment("w", 0x800, b"weights!")], inputs=[x, y], outputs=[x, y])
    dev.load_bundle(bundle)
    assert transport.mem[0x800:0x808] == b"weights!"
    assert dev.read_reg("PROGRAM_ADDR") == 0x100 and dev.read_reg("PROGRAM_COUNT") == 1
    assert dev.read_mem(0x100, len(bundle.program_bytes)) == bundle.program_bytes
    rng = np.random.default_rng(1)
    xv = rng.integers(-128, 128, (3, 5)).astype(np.int8)
    yv = rng.integers(-2**31, 2**31, (2, 3)).astype(np.int32)
    transport.mem[0x3001:0x3001 + 100] = b"\xee" * 100
    dev.write_inputs({"x": xv, "y": yv})
    out = dev.read_outputs()
    np.testing.assert_array_equal(out["x"], xv)
    np.testing.assert_array_equal(out["y"], yv)
    assert transport.mem[0x3001 + 4] == 0xEE  # the gaps between strided elements are kept
    with pytest.raises(BundleError, match="missing"):
        dev.write_inputs({"x": xv})


def test_polling_wait_on_a_transport_without_irq():
    class Finishing(FakeTransport):
        polls = 0

        def read32(self, offset):
            if offset == 0x14:  # STATUS: busy twice, then done
                self.polls += 1
                return 0b001 if self.polls < 3 else 0b010
            return super().read32(offset)

    dev = Device(Finishing(TINY), TINY)
    dev.start()
    assert dev.wait(1.0).done


def test_unknown_transport_scheme():
    assert {"twin", "uart", "xdma"} <= set(transport_schemes())
    with pytest.raises(ValueError, match="unknown transport"):
        open_transport("pigeon:/dev/null")


def test_uart_transport_refuses_a_file_that_is_not_a_terminal():
    with pytest.raises(TransportError, match="/dev/null is not a terminal device"):
        open_transport("uart:/dev/null")


# ---------------------------------------------------------------------- against the twin
def pytest_rtl(test):
    """RTL tests driven through the Verilator twin (a C++ model: Verilator only)."""
    return pytest.mark.verilator_only(pytest.mark.rtl(test))


@pytest.fixture
def dev(twin):
    twin.client.reset(4)
    return Device.open(TwinTransport(twin), TINY)


def _copy(dev: Device, src: int, dst: int, rows: int, row_bytes: int) -> None:
    # the stand-in's "program": PROGRAM_ADDR source, WATCHDOG destination, PROGRAM_COUNT rows | row_bytes << 16
    dev.write_reg("PROGRAM_ADDR", src)
    dev.write_reg("WATCHDOG", dst)
    dev.write_reg("PROGRAM_COUNT", copy_count(rows, row_bytes))
    dev.start()


@pytest_rtl
def test_identity_registers_through_the_driver(dev):
    assert dev.read_reg("ID") == ID_VALUE
    assert dev.read_reg("CONFIG_HASH") == TINY.hash32 == dev.read_reg(0x08)
    assert dev.read_field("VERSION", "major") == 0
    assert dev.read_field("CONFIG_INFO", "rows") == TINY.array.rows
    for v in (0, 0xFFFFFFFF, 0x5A5AA5A5):
        dev.write_reg("SCRATCH", v)
        assert dev.read_reg("SCRATCH") == v


@pytest_rtl
def test_config_hash_mismatch_names_both(twin):
    other = load_config("ulx3s")
    with pytest.raises(ConfigHashMismatch) as info:
        Device.open(TwinTransport(twin), other)
    text = str(info.value)
    assert f"0x{TINY.hash32:08X}" in text and f"0x{other.hash32:08X}" in text and "ulx3s" in text


@pytest_rtl
def test_memory_patterns_through_the_driver(dev):
    rng = np.random.default_rng(3)
    size = TINY.device_memory_bytes
    for n in (1, 3, 17, 1000, 65_536 + 5, 1 << 20):
        addr = int(rng.integers(0, size - n))
        data = rng.integers(0, 256, n, dtype=np.uint8)
        dev.write_mem(addr, data)
        assert np.array_equal(np.frombuffer(dev.read_mem(addr, n), np.uint8), data)
    with pytest.raises(ValueError, match="outside"):
        dev.read_mem(size - 1, 2)


@pytest_rtl
def test_dma_copy_and_counters(dev):
    rng = np.random.default_rng(5)
    model = rng.integers(0, 256, 1 << 16, dtype=np.uint8)
    dev.write_mem(0, model)
    before = dev.counters()
    assert set(before) == {m for m, _, _ in COUNTERS}
    _copy(dev, 0x123, 0x8001, 50, 200)
    status = dev.wait(timeout_s=10)
    assert status.done and not status.error
    model[0x8001:0x8001 + 10_000] = model[0x123:0x123 + 10_000].copy()
    assert dev.read_mem(0, 1 << 16) == model.tobytes()
    after = dev.counters()
    assert after["bytes_read"] - before["bytes_read"] == 10_000
    assert after["bytes_written"] - before["bytes_written"] == 10_000
    assert after["instructions"] == before["instructions"] + 1
    assert after["cycles"] > before["cycles"] + 10_000 // TINY.bus_bytes
    assert dev.read_field("IRQ_STATUS", "done") == 0  # wait acknowledged the interrupt


@pytest_rtl
def test_polling_wait_on_the_twin(dev):
    dev.write_mem(0, bytes(range(256)))
    dev.write_reg("PROGRAM_ADDR", 0)
    dev.write_reg("WATCHDOG", 0x1000)
    dev.write_reg("PROGRAM_COUNT", copy_count(1, 256))
    dev.start(irq=False)
    assert dev.wait(timeout_s=5).done
    assert dev.read_mem(0x1000, 256) == bytes(range(256))


@pytest_rtl
def test_bus_error_is_decoded(dev):
    _copy(dev, TINY.device_memory_bytes - 100, 0x1000, 1, 200)
    with pytest.raises(DeviceError, match="BUS_READ") as info:
        dev.wait(timeout_s=5)
    assert info.value.status.error_cause is ErrorCause.BUS_READ
    dev.reset()
    assert dev.status().raw == 0


@pytest_rtl
def test_wait_timeout(dev):
    _copy(dev, 0, 0x80_0000, 60_000, 256)  # ~15 MB: millions of cycles
    t0 = time.monotonic()
    with pytest.raises(DeviceTimeoutError, match="busy") as info:
        dev.wait(timeout_s=0.2)
    assert time.monotonic() - t0 < 2
    assert info.value.status.busy
    dev.reset()
    assert not dev.status().busy


@pytest_rtl
def test_bundle_load_on_the_twin(dev):
    bundle = Bundle.for_config(TINY, program=assemble("halt\nhalt"), program_address=0x4000,
                               segments=[Segment("w", 0x5003, b"\x01\x02\x03")],
                               inputs=[TensorSpec.dense("x", (4, 4), "int8", 0x6000)],
                               outputs=[TensorSpec.dense("x", (4, 4), "int8", 0x6000)])
    dev.load_bundle(bundle)
    assert dev.read_reg("PROGRAM_ADDR") == 0x4000 and dev.read_reg("PROGRAM_COUNT") == 2
    assert dev.read_mem(0x5003, 3) == b"\x01\x02\x03"
    assert dev.read_mem(0x4000, len(bundle.program_bytes)) == bundle.program_bytes
    x = np.arange(-8, 8, dtype=np.int8).reshape(4, 4)
    dev.write_inputs({"x": x})
    np.testing.assert_array_equal(dev.read_outputs()["x"], x)


@pytest_rtl
def test_open_transport_by_uri(twin):
    twin.client.close()
    try:
        with open_transport(f"twin:{twin.socket_path}") as t:
            assert Device.open(t, TINY).read_reg("ID") == ID_VALUE
    finally:
        twin.connect()


@pytest_rtl
def test_killed_twin_mid_wait_is_a_transport_error():
    with standin("tiny") as twin:
        dev = Device.open(TwinTransport(twin), TINY)
        _copy(dev, 0, 0x80_0000, 60_000, 256)
        threading.Timer(0.3, lambda: os.kill(twin.process.pid, signal.SIGKILL)).start()
        t0 = time.monotonic()
        with pytest.raises(TransportError, match="SIGKILL"):
            dev.wait(timeout_s=30)
        assert time.monotonic() - t0 < 5
        with pytest.raises(TransportError):
            dev.read_reg("ID")
