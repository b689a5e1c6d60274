"""Transports: how the driver reaches a device's registers and memory.

A transport moves 32-bit register words and device-memory bytes; it knows nothing about
what the registers mean (that is :class:`weft.sw.driver.Device`'s job, from
``weft.hw.registers``). To add one (UART bridge, PCIe), subclass :class:`Transport`,
implement the five abstract methods, and optionally :meth:`~Transport.wait_irq`,
:meth:`~Transport.hard_reset` and :meth:`~Transport.idle`; register a URI scheme with
:func:`register_transport` so :func:`open_transport` (and the CLI) can build it from a string.
"""

from __future__ import annotations

import abc
import time
from typing import Callable

__all__ = [
    "TransportError",
    "Transport",
    "register_transport",
    "open_transport",
    "transport_schemes",
]


class TransportError(RuntimeError):
    """The transport could not carry out an access (link down, device gone, bus error)."""


class Transport(abc.ABC):
    """The byte-and-word link to one device. Subclasses implement the abstract methods.

    Register offsets are byte offsets in the device's AXI4-Lite window; values are 32-bit.
    Memory addresses are device byte addresses. Every method either completes or raises
    :class:`TransportError` (or a subclass) within a bounded time; none hangs.
    """

    #: Human-readable kind, e.g. "twin", "uart", "pcie".
    kind: str = "abstract"

    @abc.abstractmethod
    def read32(self, offset: int) -> int:
        """Read the register at byte ``offset``. Raise :class:`TransportError` on a bus error."""

    @abc.abstractmethod
    def write32(self, offset: int, value: int) -> None:
        """Write the register at byte ``offset``. Raise :class:`TransportError` on a bus error."""

    @abc.abstractmethod
    def read_mem(self, address: int, size: int) -> bytes:
        """Read ``size`` bytes of device memory from ``address``."""

    @abc.abstractmethod
    def write_mem(self, address: int, data: bytes) -> None:
        """Write ``data`` to device memory at ``address``."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the link (idempotent)."""

    # ------------------------------------------------------------------ optional hooks
    @property
    def memory_bytes(self) -> int | None:
        """Device-memory size when the transport knows it (None otherwise)."""
        return None

    def wait_irq(self, timeout_s: float) -> bool | None:
        """Block until the device's interrupt line is high or ``timeout_s`` passes.

        Returns True (irq seen), False (timed out), or None when the transport cannot see
        the interrupt line, in which case the driver polls ``STATUS`` (calling :meth:`idle`
        between polls).
        """
        return None

    def idle(self, seconds: float) -> None:
        """Let device time pass between status polls (real hardware: sleep; a simulation: clock it)."""
        time.sleep(seconds)

    def hard_reset(self) -> bool:
        """Reset the whole device (reset line) if the transport can; return whether it did.

        The driver falls back to ``CONTROL.soft_reset`` when this returns False.
        """
        return False

    def describe(self) -> str:
        return self.kind

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_SCHEMES: dict[str, Callable[[str], Transport]] = {}


def register_transport(scheme: str, factory: Callable[[str], Transport]) -> None:
    """Make ``open_transport("scheme:rest")`` call ``factory("rest")``.

    Registered by their modules: ``twin:<socket>``, ``uart:///dev/ttyUSB0?baud=3000000``
    (:mod:`weft.sw.driver.uart`) and ``xdma:///dev/xdma0`` (:mod:`weft.sw.driver.xdma`).
    """
    _SCHEMES[scheme] = factory


def transport_schemes() -> list[str]:
    return sorted(_SCHEMES)


def open_transport(uri: str) -> Transport:
    """Build a transport from ``scheme:rest`` (e.g. ``twin:/tmp/weft-twin-x/twin.sock``)."""
    scheme, sep, rest = uri.partition(":")
    if not sep or scheme not in _SCHEMES:
        known = ", ".join(f"{s}:..." for s in transport_schemes()) or "none"
        raise ValueError(f"unknown transport {uri!r} (known: {known})")
    return _SCHEMES[scheme](rest)
