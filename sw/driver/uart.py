"""Transport over a serial line to :class:`weft.hw.uart.UartBridge` (a board's UART, or the
pseudo-terminal of a UART twin).

Frames (protocol in :mod:`weft.hw.uart` and docs/hil.md) carry a CRC-16/CCITT and an 8-bit
sequence number. Every request waits at most ``timeout`` seconds (plus the line time of its
bytes at ``baud``) for its answer; a missing, corrupted or refused (bad CRC) answer is
retried up to ``retries`` times, after flushing the line (a run of zero bytes that ends any
half-received frame in the bridge, then discarding what comes back). Writes are retried with
the same sequence number, so a write whose answer was lost is not executed twice (the bridge
replays its status). When the retries are spent, :class:`UartTransportError` names the
command, the address, each attempt's failure and the port. Nothing waits unbounded.

::

    t = UartTransport("/dev/ttyUSB0", baud=3_000_000)
    dev = Device.open(t, config)
    # or: open_transport("uart:///dev/ttyUSB0?baud=3000000&timeout=0.5&retries=8")
"""

from __future__ import annotations

import binascii
import contextlib
import errno
import os
import select
import struct
import termios
import time
import tty
from typing import Protocol
from urllib.parse import parse_qs

from ...hw.uart import PROTOCOL_VERSION, SYNC_REQUEST, SYNC_RESPONSE, Cmd, Status
from .transport import Transport, TransportError, register_transport

__all__ = ["UartTransport", "UartTransportError", "Link", "SerialLink", "encode_request", "parse_uri",
           "LinkStats"]

_HDR = struct.Struct("<BBIH")  # cmd, seq, addr, len (after the sync byte)
_CRC_INIT = 0xFFFF
#: Statuses that say the request did not arrive intact (retry).
_RETRY = {Status.BAD_CRC, Status.BAD_COMMAND, Status.BAD_LENGTH}


class UartTransportError(TransportError):
    """The UART link failed: no (valid) answer after the retries, a bus error, or the port."""


def _crc(data: bytes) -> int:
    return binascii.crc_hqx(data, _CRC_INIT)


def encode_request(cmd: int, seq: int, addr: int, length: int, payload: bytes = b"") -> bytes:
    """One request frame (sync, header, payload, CRC-16 most significant byte first)."""
    body = _HDR.pack(cmd, seq & 0xFF, addr & 0xFFFFFFFF, length) + payload
    return bytes([SYNC_REQUEST]) + body + _crc(body).to_bytes(2, "big")


class Link(Protocol):
    """What the transport needs from a serial port (tests wrap it to drop or corrupt bytes)."""

    def write(self, data: bytes) -> None: ...

    def read(self, max_bytes: int, timeout_s: float) -> bytes:
        """Up to ``max_bytes`` bytes; waits at most ``timeout_s`` for the first (b"" if none)."""

    def close(self) -> None: ...


class SerialLink:
    """A serial port or pty, raw 8N1, through ``os``/``termios`` (no extra package).

    ``baud`` must be one of the rates termios knows (``termios.B<rate>``); a pty ignores it.
    """

    def __init__(self, path: str, baud: int):
        rate = getattr(termios, f"B{baud}", None) if isinstance(baud, int) and not isinstance(baud, bool) else None
        if rate is None:
            known = sorted(int(n[1:]) for n in dir(termios) if n[:1] == "B" and n[1:].isdigit())
            raise ValueError(f"baud {baud!r} is not a rate this system's termios supports "
                             f"(known: {', '.join(map(str, known[-12:]))}, ...)")
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as exc:
            raise UartTransportError(f"cannot open serial port {path}: {exc.strerror}") from None
        try:
            if not os.isatty(self.fd):
                raise UartTransportError(f"{path} is not a terminal device (a serial port or pty)")
            tty.setraw(self.fd)
            attrs = termios.tcgetattr(self.fd)
            attrs[4] = attrs[5] = rate  # ispeed, ospeed
            attrs[2] = (attrs[2] & ~(termios.PARENB | termios.CSTOPB | termios.CSIZE | termios.CRTSCTS)) \
                | termios.CS8 | termios.CLOCAL | termios.CREAD
            termios.tcsetattr(self.fd, termios.TCSANOW, attrs)
            termios.tcflush(self.fd, termios.TCIOFLUSH)
        except BaseException:
            os.close(self.fd)
            raise

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + 10.0
        while view:
            try:
                n = os.write(self.fd, view)
                view = view[n:]
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise UartTransportError(f"{self.path}: the port accepted no data for 10 s") from None
                select.select([], [self.fd], [], 0.05)
            except OSError as exc:
                raise UartTransportError(f"{self.path}: write failed: {exc.strerror}") from None

    def read(self, max_bytes: int, timeout_s: float) -> bytes:
        r, _, _ = select.select([self.fd], [], [], max(0.0, timeout_s))
        if not r:
            return b""
        try:
            return os.read(self.fd, max_bytes)
        except BlockingIOError:
            return b""
        except OSError as exc:
            if exc.errno == errno.EIO:  # the other end of a pty is gone
                raise UartTransportError(f"{self.path}: the line is gone (EIO)") from None
            raise UartTransportError(f"{self.path}: read failed: {exc.strerror}") from None

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


class LinkStats:
    """Counters of one transport: frames, retries, and why."""

    def __init__(self):
        self.requests = 0
        self.retries = 0
        self.timeouts = 0
        self.naks = 0
        self.bad_answers = 0
        self.bytes_out = 0
        self.bytes_in = 0

    def __repr__(self):
        return ("LinkStats(" + ", ".join(f"{k}={v}" for k, v in vars(self).items()) + ")")


class UartTransport(Transport):
    """Registers and memory through the UART bridge.

    ``port``: a device path (``/dev/ttyUSB0``, a UART twin's pty) or a :class:`Link`.
    ``timeout``: seconds to wait for an answer beyond its line time; ``retries``: extra
    attempts per request; ``baud`` sets the port's rate and the line-time estimate.
    Opening sends ``INFO`` (checks the protocol version, learns the bridge's frame size).
    """

    kind = "uart"

    def __init__(self, port: str | Link, baud: int = 3_000_000, *, timeout: float = 0.5, retries: int = 5):
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        if not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.baud = baud
        self.timeout = float(timeout)
        self.retries = retries
        self.stats = LinkStats()
        if isinstance(port, str):
            self.path = port
            self.link: Link = SerialLink(port, baud)
        else:
            self.path = getattr(port, "path", repr(port))
            self.link = port
        self._seq = int.from_bytes(os.urandom(1), "little")
        self._rx = bytearray()
        self.max_payload = 4  # until INFO says more
        self._info_known = False
        try:
            info = self._transact(Cmd.INFO, 0, 0)
            if len(info) < 6:
                raise UartTransportError(f"UART bridge on {self.path} answered INFO with {len(info)} bytes, not 6")
            version, bus_bytes, max_payload, cpb = struct.unpack_from("<BBHH", info)
            if version != PROTOCOL_VERSION:
                raise UartTransportError(f"UART bridge on {self.path} speaks protocol {version}; this weft speaks "
                                         f"{PROTOCOL_VERSION}")
        except BaseException:
            self.link.close()
            raise
        self.bus_bytes = bus_bytes
        self.max_payload = max_payload
        self._info_known = True
        self.clocks_per_bit = cpb

    # ------------------------------------------------------------------ framing
    def _line_time(self, nbytes: int) -> float:
        return nbytes * 10.0 / self.baud

    def _flush_line(self) -> None:
        """End any half-received frame in the bridge and discard what is in flight."""
        n = (self.max_payload if self._info_known else 4096) + 16  # longer than any frame's unread rest
        self.link.write(bytes(n))
        self.stats.bytes_out += n
        quiet = max(0.02, self._line_time(64))
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if not self.link.read(1 << 16, quiet):
                break
        self._rx.clear()

    def _answer(self, cmd: int, seq: int, deadline: float) -> tuple[int, bytes] | str:
        """Read until the answer to (cmd, seq) arrives; a string says why not."""
        why = "no answer"
        buf = self._rx
        while True:
            # parse what we have
            while buf:
                start = buf.find(SYNC_RESPONSE)
                if start < 0:
                    buf.clear()
                    break
                del buf[:start]
                if len(buf) < 6:
                    break
                length = buf[4] | buf[5] << 8
                if length > max(self.max_payload, 6):
                    del buf[:1]
                    continue
                if len(buf) < 8 + length:
                    break
                frame = bytes(buf[:8 + length])
                if _crc(frame[1:6 + length]) != int.from_bytes(frame[6 + length:], "big"):
                    self.stats.bad_answers += 1
                    why = "an answer with a bad CRC"
                    del buf[:1]
                    continue
                del buf[:8 + length]
                if frame[1] != cmd or frame[2] != seq:
                    continue  # a stale answer (to an earlier attempt)
                return frame[3], frame[6:6 + length]
            left = deadline - time.monotonic()
            if left <= 0:
                return why
            data = self.link.read(1 << 16, left)
            self.stats.bytes_in += len(data)
            buf += data

    def _transact(self, cmd: int, addr: int, length: int, payload: bytes = b"") -> bytes:
        is_write = cmd in (Cmd.REG_WRITE, Cmd.MEM_WRITE)
        self.stats.requests += 1
        failures: list[str] = []
        self._seq = (self._seq + 1) & 0xFF
        answer_bytes = 8 + (length if not is_write else 0)
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats.retries += 1
                self._flush_line()
                if not is_write:  # reads are idempotent: a fresh number leaves no doubt which answer is whose
                    self._seq = (self._seq + 1) & 0xFF
            seq = self._seq
            frame = encode_request(cmd, seq, addr, length, payload)
            self._rx.clear()
            self.link.write(frame)
            self.stats.bytes_out += len(frame)
            deadline = time.monotonic() + self.timeout + 2 * self._line_time(len(frame) + answer_bytes)
            got = self._answer(cmd, seq, deadline)
            if isinstance(got, str):
                self.stats.timeouts += 1
                failures.append(got)
                continue
            status, body = got
            if status in _RETRY:
                self.stats.naks += 1
                failures.append(f"refused: {Status(status).name}")
                continue
            if status == Status.OK:
                return body
            name = Status(status).name if status in Status._value2member_map_ else f"status 0x{status:02X}"
            raise UartTransportError(f"{Cmd(cmd).name} at 0x{addr:X} ({length} bytes): the bridge answered {name}"
                                     f" ({self.path})")
        raise UartTransportError(
            f"{Cmd(cmd).name} at 0x{addr:X} ({length} bytes) failed after {self.retries + 1} attempts on "
            f"{self.path} at {self.baud} baud: " + "; ".join(f"#{i + 1} {f}" for i, f in enumerate(failures)))

    # ------------------------------------------------------------------ Transport
    @staticmethod
    def _check_offset(offset: int) -> None:
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0 or offset % 4:
            raise ValueError(f"register offset {offset!r} must be a non-negative multiple of 4")

    def read32(self, offset: int) -> int:
        self._check_offset(offset)
        body = self._transact(Cmd.REG_READ, offset, 4)
        if len(body) != 4:
            raise UartTransportError(f"REG_READ at 0x{offset:X} answered {len(body)} bytes, not 4 ({self.path})")
        return int.from_bytes(body, "little")

    def write32(self, offset: int, value: int) -> None:
        self._check_offset(offset)
        self._transact(Cmd.REG_WRITE, offset, 4, (value & 0xFFFFFFFF).to_bytes(4, "little"))

    def _check_range(self, address: int, size: int) -> None:
        if isinstance(address, bool) or not isinstance(address, int) or address < 0 or size < 0 \
                or address + size > 1 << 32:
            raise ValueError(f"memory range [0x{address:X}, +{size}) is outside the bridge's 32-bit address space")

    def read_mem(self, address: int, size: int) -> bytes:
        self._check_range(address, size)
        out = bytearray()
        step = self.max_payload
        for lo in range(address, address + size, step):
            n = min(step, address + size - lo)
            body = self._transact(Cmd.MEM_READ, lo, n)
            if len(body) != n:
                raise UartTransportError(f"MEM_READ at 0x{lo:X} answered {len(body)} bytes, not {n} ({self.path})")
            out += body
        return bytes(out)

    def write_mem(self, address: int, data: bytes) -> None:
        data = bytes(memoryview(data).cast("B"))
        self._check_range(address, len(data))
        step = self.max_payload
        for off in range(0, len(data), step):
            chunk = data[off:off + step]
            self._transact(Cmd.MEM_WRITE, address + off, len(chunk), chunk)

    def describe(self) -> str:
        return f"uart:{self.path}?baud={self.baud}"

    def close(self) -> None:
        self.link.close()


def parse_uri(rest: str) -> tuple[str, dict]:
    """``/dev/ttyUSB0?baud=3000000&timeout=0.5&retries=5`` (or ``///dev/...``) -> (path, kwargs)."""
    path, _, query = rest.partition("?")
    if path.startswith("//"):
        path = path[2:]
    if not path:
        raise ValueError(f"uart URI {rest!r} names no port (uart:///dev/ttyUSB0?baud=3000000)")
    kwargs: dict = {}
    conv = {"baud": int, "timeout": float, "retries": int}
    for key, values in parse_qs(query, keep_blank_values=True).items():
        if key not in conv:
            raise ValueError(f"uart URI option {key!r} is unknown (known: {', '.join(conv)})")
        try:
            kwargs[key] = conv[key](values[-1])
        except ValueError:
            raise ValueError(f"uart URI option {key}={values[-1]!r} is not a valid {conv[key].__name__}") from None
    return path, kwargs


def _open(rest: str) -> UartTransport:
    path, kwargs = parse_uri(rest)
    return UartTransport(path, **kwargs)


register_transport("uart", _open)
