"""Fault tests through the HIL executor: each bounded by the driver's own timeouts.

A program that never halts is stopped by WATCHDOG; a bundle for another configuration is
refused before it runs; a twin killed mid-run is a clear error within seconds.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from weft.hw.bundle import Bundle, ConfigMismatchError
from weft.hw.config import load_config
from weft.hw.isa import Instruction, Opcode
from weft.hw.registers import ErrorCause
from weft.sw.driver import ConfigHashMismatch, Device, DeviceError, DeviceTimeoutError, TransportError
from weft.sw.hil import HilSession, compare_with_golden

from .conftest import TINY, target_is_launched_twin
from .test_hil import _gemm

pytestmark = [pytest.mark.rtl, pytest.mark.verilator_only, pytest.mark.every_transport]


def _hang(config=TINY) -> Bundle:
    """A TOKEN on the matmul queue waits for a load token nobody sends: never reaches HALT."""
    program = [Instruction.make(Opcode.TOKEN, queue=1, wait=["load"]), Instruction.make(Opcode.HALT)]
    return Bundle.for_config(config, program=program, program_address=0x1000)


def test_watchdog_stops_a_program_that_never_halts(session):
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match="WATCHDOG") as info:
        session.run(_hang(), {}, watchdog_cycles=5000, timeout_s=10)
    assert time.monotonic() - t0 < 5
    assert info.value.status.error and info.value.status.error_cause is ErrorCause.WATCHDOG
    assert not session.device.status().busy
    # the watchdog reset the datapath: the next program runs normally, without a reset from the host
    bundle, inputs = _gemm(np.random.default_rng(1), 6, 6, 6, int8=True)
    report = compare_with_golden(bundle, inputs, TINY, session=session, timeout_s=30)
    assert report.identical, report.difference


def test_program_that_never_halts_without_watchdog_times_out(session):
    t0 = time.monotonic()
    with pytest.raises(DeviceTimeoutError, match="did not finish") as info:
        session.run(_hang(), {}, watchdog_cycles=None, timeout_s=0.5)
    assert time.monotonic() - t0 < 5
    assert info.value.status.busy
    session.device.reset()
    assert not session.device.status().busy


def test_bundle_for_another_configuration_is_refused_before_it_runs(session):
    other = load_config("default")
    dev = session.device
    dev.write_reg("PROGRAM_ADDR", 0x40)
    dev.write_reg("PROGRAM_COUNT", 0)
    dev.write_mem(0x1000, b"\xC3" * 64)  # where the refused bundle's program would go
    before = dev.counters()
    with pytest.raises(ConfigMismatchError, match="'default'"):
        session.run(_hang(other), {}, watchdog_cycles=1000, timeout_s=5)
    assert dev.read_reg("PROGRAM_ADDR") == 0x40 and dev.read_reg("PROGRAM_COUNT") == 0  # nothing loaded
    assert dev.counters()["instructions"] == before["instructions"]  # nothing ran
    assert dev.read_mem(0x1000, 64) == b"\xC3" * 64  # nothing written
    # a host configured for another hardware build is refused when it opens the device
    with pytest.raises(ConfigHashMismatch, match=f"0x{TINY.hash32:08X}"):
        Device(dev.transport, other).check_identity()


@pytest.mark.skipif(not target_is_launched_twin(), reason="kills the twin process; not for a board")
def test_killed_twin_mid_run_is_a_clear_error():
    with HilSession(TINY, target="twin") as s:
        timer = threading.Timer(0.5, lambda: os.kill(s.twin.process.pid, signal.SIGKILL))
        timer.start()
        t0 = time.monotonic()
        try:
            with pytest.raises(TransportError, match="SIGKILL"):
                s.run(_hang(), {}, watchdog_cycles=None, timeout_s=30)
        finally:
            timer.cancel()
        assert time.monotonic() - t0 < 5
        with pytest.raises(TransportError):
            s.device.read_reg("ID")
