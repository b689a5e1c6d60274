"""Transport over PCIe through the Xilinx XDMA driver's character devices.

The XDMA driver (Xilinx ``dma_ip_drivers``, ``xdma.ko``) makes one set of files per card:

=======================  ==================================================================
``<prefix>_user``        the AXI4-Lite "user" BAR: ``mmap`` it; 32-bit loads and stores are
                         register reads and writes (weft's ``csr`` window, 4 KiB)
``<prefix>_h2c_<n>``     host-to-card DMA channel n: ``pwrite(fd, data, address)`` writes
                         ``data`` to device memory at ``address`` (the file offset)
``<prefix>_c2h_<n>``     card-to-host DMA channel n: ``pread(fd, size, address)`` reads
``<prefix>_events_<n>``  user interrupt n: ``read`` blocks until it fires (``poll`` works),
                         answering a 4-byte event count
=======================  ==================================================================

:class:`XdmaTransport` does exactly those operations, through an opener (:class:`XdmaFiles`)
so that tests can stand in for the files: regular files cannot react to a register write.
:class:`OsXdmaFiles` opens the real files; :class:`TwinXdmaFiles` is a stand-in whose objects
have the same semantics (aligned 32-bit window accesses, ``pread``/``pwrite`` at a device
address, short transfers allowed, ``EIO`` outside memory, a blocking event wait) but are
backed by a running twin. What the stand-in proves: the transport's offsets, chunking, short
transfer handling, error mapping and interrupt wait, and the whole driver stack above it
against the real core. What it cannot prove: the kernel driver, the PCIe link, the BAR
mapping of a real card (tests run :class:`OsXdmaFiles` on regular files for the ``mmap`` and
``pread``/``pwrite`` plumbing only).
"""

from __future__ import annotations

import abc
import contextlib
import errno
import mmap
import os
import select
import time
from urllib.parse import parse_qs

from .transport import Transport, TransportError, register_transport

__all__ = ["XdmaTransport", "XdmaTransportError", "XdmaFiles", "OsXdmaFiles", "TwinXdmaFiles",
           "RegisterWindow", "DmaChannel", "EventChannel", "parse_uri"]

#: Largest single pread/pwrite the transport issues (the XDMA driver splits larger ones itself,
#: but smaller calls keep each one's time bounded).
MAX_TRANSFER = 8 << 20


class XdmaTransportError(TransportError):
    """A file operation on the XDMA devices failed (named file, operation and errno)."""


class RegisterWindow(abc.ABC):
    """The mapped register BAR: aligned 32-bit accesses at byte offsets."""

    size: int

    @abc.abstractmethod
    def read32(self, offset: int) -> int: ...

    @abc.abstractmethod
    def write32(self, offset: int, value: int) -> None: ...

    def close(self) -> None:
        pass


class DmaChannel(abc.ABC):
    """One DMA file: ``pread`` (c2h) or ``pwrite`` (h2c) at a device address; may transfer
    fewer bytes than asked (the caller loops) and raises ``OSError`` like ``os.pread``."""

    name: str

    def pread(self, size: int, offset: int) -> bytes:
        raise OSError(errno.EBADF, "not open for reading")

    def pwrite(self, data: bytes, offset: int) -> int:
        raise OSError(errno.EBADF, "not open for writing")

    def close(self) -> None:
        pass


class EventChannel(abc.ABC):
    """A user-interrupt file: :meth:`wait` returns True when the interrupt fired within
    ``timeout_s`` (consuming the event), else False."""

    @abc.abstractmethod
    def wait(self, timeout_s: float) -> bool: ...

    def close(self) -> None:
        pass


class XdmaFiles(abc.ABC):
    """Opens the files of one card (see the module docstring)."""

    description: str = "xdma"

    @abc.abstractmethod
    def user(self) -> RegisterWindow: ...

    @abc.abstractmethod
    def h2c(self) -> DmaChannel: ...

    @abc.abstractmethod
    def c2h(self) -> DmaChannel: ...

    def events(self) -> EventChannel | None:
        """The interrupt file, or None when there is none (the driver then polls STATUS)."""
        return None

    def idle(self, seconds: float) -> None:
        """Time passing between status polls (a card: sleep)."""
        time.sleep(seconds)


# ---------------------------------------------------------------------- the real files
class _MmapWindow(RegisterWindow):
    def __init__(self, path: str, size: int):
        self.path = path
        self.size = size
        self.fd = os.open(path, os.O_RDWR | os.O_SYNC)
        try:
            self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        # a memoryview cast to 32-bit words: each index is one aligned 4-byte load or store
        self.words = memoryview(self.mm).cast("I")

    def read32(self, offset: int) -> int:
        return self.words[offset >> 2]

    def write32(self, offset: int, value: int) -> None:
        self.words[offset >> 2] = value

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.words.release()
            self.mm.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


class _FdChannel(DmaChannel):
    def __init__(self, path: str, flags: int):
        self.name = path
        self.fd = os.open(path, flags)

    def pread(self, size: int, offset: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def pwrite(self, data: bytes, offset: int) -> int:
        return os.pwrite(self.fd, data, offset)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class _FdEvents(EventChannel):
    def __init__(self, path: str):
        self.name = path
        self.fd = os.open(path, os.O_RDONLY)

    def wait(self, timeout_s: float) -> bool:
        r, _, _ = select.select([self.fd], [], [], max(0.0, timeout_s))
        if not r:
            return False
        os.read(self.fd, 4)  # the event count
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


class OsXdmaFiles(XdmaFiles):
    """The driver's files: ``<prefix>_user`` (mmapped, ``user_bytes``), ``<prefix>_h2c_<channel>``,
    ``<prefix>_c2h_<channel>``, and ``<prefix>_events_<irq>`` when it exists."""

    def __init__(self, prefix: str = "/dev/xdma0", *, channel: int = 0, irq: int = 0, user_bytes: int = 4096):
        if user_bytes <= 0 or user_bytes % mmap.PAGESIZE:
            raise ValueError(f"user_bytes={user_bytes} must be a positive multiple of the page size {mmap.PAGESIZE}")
        self.prefix, self.channel, self.irq, self.user_bytes = prefix, channel, irq, user_bytes
        self.description = f"xdma:{prefix}"

    def _path(self, suffix: str) -> str:
        return f"{self.prefix}_{suffix}"

    def user(self) -> RegisterWindow:
        return _MmapWindow(self._path("user"), self.user_bytes)

    def h2c(self) -> DmaChannel:
        return _FdChannel(self._path(f"h2c_{self.channel}"), os.O_WRONLY)

    def c2h(self) -> DmaChannel:
        return _FdChannel(self._path(f"c2h_{self.channel}"), os.O_RDONLY)

    def events(self) -> EventChannel | None:
        path = self._path(f"events_{self.irq}")
        return _FdEvents(path) if os.path.exists(path) else None


# ---------------------------------------------------------------------- stand-in on a twin
class TwinXdmaFiles(XdmaFiles):
    """Stand-in files backed by a twin (:class:`weft.sim.twin.Twin` or its ``TwinClient``).

    The register window forwards 32-bit accesses to the twin's AXI4-Lite master (unaligned
    or out-of-window offsets raise ``OSError(EINVAL)``/``IndexError`` as a bad mapping
    access would fault); ``pread``/``pwrite`` move at most ``max_transfer`` bytes per call
    (to exercise the caller's loop) and raise ``OSError(EIO)`` outside device memory, as
    the XDMA driver does when the card answers SLVERR; the event wait clocks the twin until
    ``irq``. ``idle`` clocks the twin too (on a card, time passes by itself).
    """

    def __init__(self, twin, *, max_transfer: int = 1 << 20, user_bytes: int = 4096):
        self.client = getattr(twin, "client", twin)
        self.max_transfer = max_transfer
        self.user_bytes = user_bytes
        self.description = f"xdma stand-in on twin {self.client.path}"
        self.mem_bytes = self.client.info.mem_bytes

    def _call(self, fn, *args, **kwargs):
        """A twin call; a twin that is gone or refuses is EIO, as a card that stopped answering."""
        from ...sim.twin import TwinError

        try:
            return fn(*args, **kwargs)
        except TwinError as exc:
            raise OSError(errno.EIO, f"the stand-in's twin failed: {exc}") from None

    def user(self) -> RegisterWindow:
        files = self

        class Window(RegisterWindow):
            size = files.user_bytes

            def _check(self, offset):
                if offset % 4:
                    raise OSError(errno.EINVAL, f"unaligned 32-bit access at offset {offset:#x}")
                if not 0 <= offset < self.size:
                    raise IndexError(f"offset {offset:#x} outside the {self.size}-byte window")

            def read32(self, offset):
                self._check(offset)
                value, resp = files._call(files.client.reg_read, offset)
                return 0xFFFFFFFF if resp else value  # a failed PCIe read returns all ones

            def write32(self, offset, value):
                self._check(offset)
                files._call(files.client.reg_write, offset, value)

        return Window()

    def _range(self, size: int, offset: int) -> None:
        if offset < 0 or offset + size > self.mem_bytes:
            raise OSError(errno.EIO, f"DMA [{offset:#x}, +{size}) outside device memory of {self.mem_bytes} bytes")

    def h2c(self) -> DmaChannel:
        files = self

        class H2C(DmaChannel):
            name = "h2c_0 (stand-in)"

            def pwrite(self, data, offset):
                n = min(len(data), files.max_transfer)
                files._range(n, offset)
                files._call(files.client.mem_write, offset, bytes(data[:n]))
                return n

        return H2C()

    def c2h(self) -> DmaChannel:
        files = self

        class C2H(DmaChannel):
            name = "c2h_0 (stand-in)"

            def pread(self, size, offset):
                n = min(size, files.max_transfer)
                files._range(n, offset)
                return files._call(files.client.mem_read, offset, n)

        return C2H()

    def events(self) -> EventChannel:
        from ...sim.twin import RunReason

        client, files = self.client, self

        class Events(EventChannel):
            def wait(self, timeout_s):
                deadline = time.monotonic() + timeout_s
                while True:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    r = files._call(client.run, 1 << 40, until_irq=True, wall_s=min(left, 5.0))
                    if r.reason == RunReason.IRQ:
                        return True

        return Events()

    def idle(self, seconds: float) -> None:
        try:
            self._call(self.client.run, 10_000, wall_s=max(seconds, 0.001))
        except OSError as exc:
            raise XdmaTransportError(str(exc.strerror)) from None


# ---------------------------------------------------------------------- transport
class XdmaTransport(Transport):
    """Registers through the mapped user BAR, memory through the h2c/c2h DMA files.

    ``target``: a device prefix (``/dev/xdma0``; :class:`OsXdmaFiles`) or an
    :class:`XdmaFiles`. ``memory_bytes``: the card's device-memory size when known (checked
    before any transfer). Every OS error becomes an :class:`XdmaTransportError` naming the
    file, the operation, the address and the errno.
    """

    kind = "xdma"

    def __init__(self, target: str | XdmaFiles = "/dev/xdma0", *, memory_bytes: int | None = None, **kwargs):
        self.files = OsXdmaFiles(target, **kwargs) if isinstance(target, str) else target
        self._memory_bytes = memory_bytes
        self._open = []
        try:
            self.window = self._track(self.files.user())
            self.h2c_file = self._track(self.files.h2c())
            self.c2h_file = self._track(self.files.c2h())
            self.event_file = self.files.events()
            if self.event_file is not None:
                self._track(self.event_file)
        except OSError as exc:
            self.close()
            raise XdmaTransportError(f"cannot open the XDMA files of {self.files.description}: "
                                     f"{exc.filename or ''} {exc.strerror}".strip()) from None

    def _track(self, obj):
        self._open.append(obj)
        return obj

    @property
    def memory_bytes(self) -> int | None:
        return self._memory_bytes

    def _check_offset(self, offset: int) -> None:
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0 or offset % 4 \
                or offset + 4 > self.window.size:
            raise ValueError(f"register offset {offset!r} must be a multiple of 4 inside the "
                             f"{self.window.size}-byte user BAR")

    def read32(self, offset: int) -> int:
        self._check_offset(offset)
        try:
            return self.window.read32(offset)
        except OSError as exc:
            raise XdmaTransportError(f"register read at 0x{offset:03X} on {self.files.description}: "
                                     f"{exc.strerror}") from None

    def write32(self, offset: int, value: int) -> None:
        self._check_offset(offset)
        try:
            self.window.write32(offset, value & 0xFFFFFFFF)
        except OSError as exc:
            raise XdmaTransportError(f"register write at 0x{offset:03X} on {self.files.description}: "
                                     f"{exc.strerror}") from None

    def _check_range(self, address: int, size: int) -> None:
        if address < 0 or size < 0 or (self._memory_bytes is not None and address + size > self._memory_bytes):
            raise ValueError(f"memory range [0x{address:X}, +{size}) is outside the card's memory"
                             f"{'' if self._memory_bytes is None else f' of {self._memory_bytes} bytes'}")

    def read_mem(self, address: int, size: int) -> bytes:
        self._check_range(address, size)
        out = bytearray()
        while len(out) < size:
            at = address + len(out)
            want = min(size - len(out), MAX_TRANSFER)
            try:
                chunk = self.c2h_file.pread(want, at)
            except OSError as exc:
                raise XdmaTransportError(f"pread of {want} bytes at 0x{at:X} on {self.c2h_file.name}: "
                                         f"{exc.strerror} (errno {exc.errno})") from None
            if not chunk:
                raise XdmaTransportError(f"pread at 0x{at:X} on {self.c2h_file.name} returned no data "
                                         f"({len(out)} of {size} bytes read)")
            out += chunk
        return bytes(out)

    def write_mem(self, address: int, data: bytes) -> None:
        view = memoryview(data).cast("B")
        self._check_range(address, len(view))
        done = 0
        while done < len(view):
            at = address + done
            want = min(len(view) - done, MAX_TRANSFER)
            try:
                n = self.h2c_file.pwrite(bytes(view[done:done + want]), at)
            except OSError as exc:
                raise XdmaTransportError(f"pwrite of {want} bytes at 0x{at:X} on {self.h2c_file.name}: "
                                         f"{exc.strerror} (errno {exc.errno})") from None
            if n <= 0:
                raise XdmaTransportError(f"pwrite at 0x{at:X} on {self.h2c_file.name} wrote nothing "
                                         f"({done} of {len(view)} bytes written)")
            done += n

    def wait_irq(self, timeout_s: float) -> bool | None:
        if self.event_file is None:
            return None
        try:
            return self.event_file.wait(timeout_s)
        except OSError as exc:
            raise XdmaTransportError(f"waiting for the interrupt on {self.files.description}: "
                                     f"{exc.strerror}") from None

    def idle(self, seconds: float) -> None:
        self.files.idle(seconds)

    def describe(self) -> str:
        return self.files.description

    def close(self) -> None:
        for obj in reversed(self._open):
            with contextlib.suppress(Exception):
                obj.close()
        self._open = []


def parse_uri(rest: str) -> tuple[str, dict]:
    """``/dev/xdma0?channel=0&irq=0&user_bytes=4096&memory_bytes=N`` (or ``///dev/xdma0``)."""
    path, _, query = rest.partition("?")
    if path.startswith("//"):
        path = path[2:]
    if not path:
        raise ValueError(f"xdma URI {rest!r} names no device prefix (xdma:///dev/xdma0)")
    known = ("channel", "irq", "user_bytes", "memory_bytes")
    kwargs = {}
    for key, values in parse_qs(query, keep_blank_values=True).items():
        if key not in known:
            raise ValueError(f"xdma URI option {key!r} is unknown (known: {', '.join(known)})")
        try:
            kwargs[key] = int(values[-1], 0)
        except ValueError:
            raise ValueError(f"xdma URI option {key}={values[-1]!r} is not an integer") from None
    return path, kwargs


def _open(rest: str) -> XdmaTransport:
    path, kwargs = parse_uri(rest)
    memory_bytes = kwargs.pop("memory_bytes", None)
    return XdmaTransport(path, memory_bytes=memory_bytes, **kwargs)


register_transport("xdma", _open)
