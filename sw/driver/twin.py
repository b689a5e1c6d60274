"""Transport to a system twin (``weft.sim.twin``) over its Unix domain socket."""

from __future__ import annotations

import os
import time

from ...hw.axi import Resp
from ...sim.twin import RunReason, Twin, TwinClient, TwinError
from .transport import Transport, TransportError, register_transport

__all__ = ["TwinTransport", "TwinTransportError"]


class TwinTransportError(TransportError):
    """A twin call failed (twin gone, no answer in time, refused request)."""


class TwinTransport(Transport):
    """Talks to a running twin.

    ``target`` is a :class:`~weft.sim.twin.Twin` (its connection is used), a
    :class:`~weft.sim.twin.TwinClient`, or a socket path (a new connection is opened).
    ``timeout`` bounds every socket call; ``max_cycles`` bounds one :meth:`wait_irq`
    (the simulated-cycle budget; the wall-clock ``timeout_s`` of the wait applies as well).
    """

    kind = "twin"

    def __init__(self, target: Twin | TwinClient | str | os.PathLike, *, timeout: float = 30.0,
                 max_cycles: int = 1 << 40, idle_cycles: int = 10_000):
        if isinstance(target, Twin):
            self.client = target.client
            self._owned = False
        elif isinstance(target, TwinClient):
            self.client = target
            self._owned = False
        else:
            try:
                self.client = TwinClient(target, timeout=timeout)
            except TwinError as exc:
                raise TwinTransportError(str(exc)) from None
            self._owned = True
        self.max_cycles = max_cycles
        self.idle_cycles = idle_cycles

    def _do(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except TwinError as exc:
            raise TwinTransportError(str(exc)) from exc

    @property
    def memory_bytes(self) -> int:
        return self.client.info.mem_bytes

    def read32(self, offset: int) -> int:
        value, resp = self._do(self.client.reg_read, offset)
        if resp != Resp.OKAY:
            raise TwinTransportError(f"register read at offset 0x{offset:03X} got {Resp(resp).name}")
        return value

    def write32(self, offset: int, value: int) -> None:
        resp = self._do(self.client.reg_write, offset, value)
        if resp != Resp.OKAY:
            raise TwinTransportError(f"register write at offset 0x{offset:03X} got {Resp(resp).name}")

    def read_mem(self, address: int, size: int) -> bytes:
        return self._do(self.client.mem_read, address, size)

    def write_mem(self, address: int, data: bytes) -> None:
        self._do(self.client.mem_write, address, data)

    def wait_irq(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        budget = self.max_cycles
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or budget <= 0:
                return False
            # at most a few seconds per call so a huge budget never outlives the socket timeout
            r = self._do(self.client.run, budget, until_irq=True, wall_s=min(left, 5.0))
            if r.reason == RunReason.IRQ:
                return True
            budget -= r.cycles_run

    def idle(self, seconds: float) -> None:
        self._do(self.client.run, self.idle_cycles, wall_s=max(seconds, 0.001))

    def hard_reset(self) -> bool:
        self._do(self.client.reset, 4)
        return True

    def describe(self) -> str:
        return f"twin:{self.client.path}"

    def close(self) -> None:
        if self._owned:
            self.client.close()


register_transport("twin", lambda rest: TwinTransport(rest))
