"""A virtual-clock asyncio event loop: when nothing is ready to run, time jumps to the next
timer instead of waiting for it. Code that only awaits ``asyncio.sleep`` and other tasks (the
engine with simulated devices) runs a minutes-long load test in seconds, deterministically.
Threads and sockets do not belong under it."""

from __future__ import annotations

import asyncio
import selectors

__all__ = ["VirtualClockLoop", "run_virtual"]


class _VirtualSelector(selectors.DefaultSelector):
    def __init__(self, loop: "VirtualClockLoop") -> None:
        super().__init__()
        self._vloop = loop

    def select(self, timeout=None):
        if timeout is not None and timeout > 0:
            self._vloop._now += timeout
        return super().select(0)


class VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self._now = 0.0
        super().__init__(_VirtualSelector(self))

    def time(self) -> float:
        return self._now


def run_virtual(coro):
    """Run ``coro`` to completion on a fresh :class:`VirtualClockLoop`."""
    loop = VirtualClockLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()
