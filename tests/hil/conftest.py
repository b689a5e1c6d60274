"""HIL fixtures: one device session per transport for the whole folder.

``WEFT_HIL_TARGET`` picks the target: unset or ``twin`` (default) runs the tests marked
``every_transport`` (test_hil.py, test_faults.py) over each transport in
``WEFT_HIL_TRANSPORTS`` (default ``twin,uart,xdma``), the others over the first:

* ``twin``: a Verilator twin of ``Core(tiny)`` through its socket (``TwinTransport``);
* ``uart``: a twin of ``UartTop(tiny)`` (the core plus the UART bridge) through the bridge,
  bit by bit over the twin's pseudo-terminal (``UartTransport``);
* ``xdma``: a twin of ``Core(tiny)`` through ``XdmaTransport`` on the stand-in files
  (``TwinXdmaFiles``: mmap-window, pread/pwrite and event-file semantics backed by the twin).

A transport URI (``uart:/dev/ttyUSB0``, ``xdma:///dev/xdma0``, ``twin:/tmp/.../twin.sock``)
opens that device instead with :func:`weft.sw.driver.open_transport`. The device must be
built for the ``tiny`` configuration (its CONFIG_HASH is checked on open).
"""

from __future__ import annotations

import functools
import os

import pytest

from weft.hw.config import load_config
from weft.sw.hil import TARGET_ENV, HilSession

TINY = load_config("tiny")
TRANSPORTS_ENV = "WEFT_HIL_TRANSPORTS"
#: The UART twin's bridge drops a half-received frame after this many quiet cycles.
UART_TIMEOUT_CYCLES = 1 << 16
#: Memory test patterns are cut to this many bytes over the UART twin (about 2.5 KB/s there).
SLOW_LINK_PATTERN_BYTES = 512


def hil_target() -> str:
    return os.environ.get(TARGET_ENV, "").strip() or "twin"


def target_is_launched_twin() -> bool:
    return hil_target() == "twin"


def hil_transports() -> list[str]:
    if not target_is_launched_twin():
        return [hil_target()]
    kinds = [k.strip() for k in os.environ.get(TRANSPORTS_ENV, "twin,uart,xdma").split(",") if k.strip()]
    bad = sorted(set(kinds) - {"twin", "uart", "xdma"})
    if bad:
        raise pytest.UsageError(f"{TRANSPORTS_ENV}: unknown transport(s) {bad} (use twin, uart, xdma)")
    return kinds


@functools.lru_cache(maxsize=None)
def uart_top_verilog() -> str:
    """Verilog of UartTop(tiny) (converted once per test process; the twin build is cached)."""
    from weft.hw.uart import UartTop
    from weft.sim.rtl import to_verilog

    return to_verilog(UartTop(TINY, timeout_cycles=UART_TIMEOUT_CYCLES), "weft_uart_top")


def launch_uart_twin(**kwargs):
    from weft.sim.twin import Twin

    return Twin.launch(uart_top_verilog(), TINY, name="weft_uart_top", **kwargs)


def is_slow_link(session) -> bool:
    return session.describe().startswith("uart")


def _open(kind: str) -> HilSession:
    if kind in ("twin",) or not target_is_launched_twin():
        return HilSession(TINY, target=hil_target())
    if kind == "uart":
        twin = launch_uart_twin()
        try:
            session = HilSession(TINY, target=f"uart:{twin.client.uart_info().pty}?timeout=2")
        except BaseException:
            twin.close()
            raise
        session.uart_twin = twin
        return session
    # xdma: the driver stack over XdmaTransport on stand-in files backed by a twin of the core
    from weft.sw.driver import Device
    from weft.sw.driver.xdma import TwinXdmaFiles, XdmaTransport

    session = HilSession(TINY, target="twin")
    session.device = Device.open(XdmaTransport(TwinXdmaFiles(session.twin, max_transfer=48 << 10),
                                               memory_bytes=TINY.device_memory_bytes), TINY)
    return session


def pytest_configure(config):
    config.addinivalue_line("markers", "every_transport: run this HIL test over each transport of "
                                       f"{TRANSPORTS_ENV} (the others run over the first only)")


def pytest_generate_tests(metafunc):
    # tests marked every_transport run over each transport; the rest (whole models, slow over
    # a serial line) share the first one's session
    if "hil" in metafunc.fixturenames:
        kinds = hil_transports()
        if not metafunc.definition.get_closest_marker("every_transport"):
            kinds = kinds[:1]
        metafunc.parametrize("hil", kinds, indirect=True, scope="session")


@pytest.fixture(scope="session")
def hil(request):
    session = _open(request.param)
    try:
        yield session
    finally:
        session.close()
        twin = getattr(session, "uart_twin", None)
        if twin is not None:
            twin.close()


@pytest.fixture
def session(hil):
    """The shared session, with the device reset (a clean STATUS) before each test."""
    hil.device.reset()
    return hil
