"""The device driver: one API over every transport.

:class:`Device` speaks in register names (``weft.hw.registers.REGISTERS``), device
addresses, bundles and tensors; a :class:`~weft.sw.driver.transport.Transport` carries the
words and bytes. Nothing here knows which transport it has.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ...hw.bundle import Bundle, BundleError, TensorSpec
from ...hw.config import AcceleratorConfig
from ...hw.registers import COUNTERS, ID_VALUE, REGISTERS, ErrorCause, Register, register
from .transport import Transport

__all__ = [
    "DriverError",
    "IdentityError",
    "ConfigHashMismatch",
    "DeviceError",
    "DeviceTimeoutError",
    "Status",
    "Device",
]


class DriverError(RuntimeError):
    """Base of the driver's own errors (transport errors are :class:`TransportError`)."""


class IdentityError(DriverError):
    """The ``ID`` register does not read "WEFT": not a weft device, or the link is wrong."""


class ConfigHashMismatch(DriverError):
    """The device was built for another configuration than the one the host expects."""


class DeviceError(DriverError):
    """The device stopped on an error; ``status`` holds the decoded ``STATUS``."""

    def __init__(self, message: str, status: "Status"):
        self.status = status
        super().__init__(message)


class DeviceTimeoutError(DriverError, TimeoutError):
    """The device did not finish in time; ``status`` holds the last ``STATUS`` read."""

    def __init__(self, message: str, status: "Status | None"):
        self.status = status
        super().__init__(message)


@dataclass(frozen=True)
class Status:
    """``STATUS`` decoded."""

    raw: int
    busy: bool
    done: bool
    error: bool
    error_cause: ErrorCause | int

    @classmethod
    def decode(cls, raw: int) -> "Status":
        fields = {f.name: (raw & f.mask) >> f.lsb for f in register("STATUS").fields}
        cause = fields["error_cause"]
        try:
            cause = ErrorCause(cause)
        except ValueError:
            pass
        return cls(raw, bool(fields["busy"]), bool(fields["done"]), bool(fields["error"]), cause)

    def __str__(self) -> str:
        flags = [n for n in ("busy", "done", "error") if getattr(self, n)] or ["idle"]
        text = f"STATUS=0x{self.raw:08X} ({', '.join(flags)}"
        if self.error:
            name = self.error_cause.name if isinstance(self.error_cause, ErrorCause) else f"unknown {self.error_cause}"
            text += f", error_cause={name}"
        return text + ")"


_BY_NAME = {r.name: r for r in REGISTERS}
_BY_OFFSET = {r.offset: r for r in REGISTERS}


def _reg(key: str | int | Register) -> Register:
    if isinstance(key, Register):
        return key
    if isinstance(key, str):
        try:
            return _BY_NAME[key.upper()]
        except KeyError:
            raise KeyError(f"no register named {key!r} (registers: {', '.join(_BY_NAME)})") from None
    if isinstance(key, int) and not isinstance(key, bool):
        try:
            return _BY_OFFSET[key]
        except KeyError:
            raise KeyError(f"no register at offset 0x{key:X}") from None
    raise TypeError(f"a register is a name or an offset, not {type(key).__name__}")


def _bits(reg: Register, **fields: int) -> int:
    value = 0
    by_name = {f.name: f for f in reg.fields}
    for name, v in fields.items():
        f = by_name[name]
        value |= (int(v) << f.lsb) & f.mask
    return value


class Device:
    """A weft accelerator behind a transport.

    ``Device.open(transport, config)`` checks the identity and the configuration hash;
    the constructor does not touch the device. Use as a context manager to close the
    transport at the end.
    """

    def __init__(self, transport: Transport, config: AcceleratorConfig):
        self.transport = transport
        self.config = config
        self._bundle: Bundle | None = None

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def open(cls, transport: Transport, config: AcceleratorConfig) -> "Device":
        """Connect: check ``ID`` ("WEFT") and that ``CONFIG_HASH`` matches ``config``."""
        dev = cls(transport, config)
        dev.check_identity()
        return dev

    def check_identity(self) -> None:
        ident = self.read_reg("ID")
        if ident != ID_VALUE:
            raise IdentityError(f"{self.transport.describe()}: ID register reads 0x{ident:08X} "
                                f"({ident.to_bytes(4, 'little')!r}), expected 0x{ID_VALUE:08X} (b'WEFT'): "
                                "not a weft device, or the link is wrong")
        got = self.read_reg("CONFIG_HASH")
        want = self.config.hash32
        if got != want:
            raise ConfigHashMismatch(
                f"{self.transport.describe()}: device CONFIG_HASH is 0x{got:08X}, but configuration "
                f"{self.config.name!r} expects 0x{want:08X}: the hardware was built for another configuration; "
                f"open it with the configuration it was generated from or rebuild the hardware")
        mem = self.transport.memory_bytes
        if mem is not None and mem < self.config.device_memory_bytes:
            raise ConfigHashMismatch(f"{self.transport.describe()}: device memory is {mem} bytes, configuration "
                                     f"{self.config.name!r} needs {self.config.device_memory_bytes}")

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> "Device":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ registers
    def read_reg(self, reg: str | int | Register) -> int:
        """Read a register by name (``"STATUS"``) or byte offset."""
        return self.transport.read32(_reg(reg).offset)

    def write_reg(self, reg: str | int | Register, value: int) -> None:
        """Write a register by name or byte offset (read-only registers are refused)."""
        r = _reg(reg)
        if r.access.value == "RO":
            raise ValueError(f"register {r.name} is read-only")
        if not 0 <= int(value) < 1 << 32:
            raise ValueError(f"register value {value} does not fit 32 bits")
        self.transport.write32(r.offset, int(value))

    def read_field(self, reg: str | int | Register, field: str) -> int:
        r = _reg(reg)
        for f in r.fields:
            if f.name == field:
                return (self.read_reg(r) & f.mask) >> f.lsb
        raise KeyError(f"register {r.name} has no field {field!r} (fields: {', '.join(f.name for f in r.fields)})")

    def status(self) -> Status:
        return Status.decode(self.read_reg("STATUS"))

    def counters(self) -> dict[str, int]:
        """The 64-bit performance counters by name (``cycles``, ``bytes_read``, ...)."""
        out = {}
        for member, base, _ in COUNTERS:
            lo = self.read_reg(f"{base}_LO")  # latches the high half
            hi = self.read_reg(f"{base}_HI")
            out[member] = hi << 32 | lo
        return out

    # ------------------------------------------------------------------ memory
    def _check_range(self, address: int, size: int) -> None:
        top = self.config.device_memory_bytes
        if address < 0 or size < 0 or address + size > top:
            raise ValueError(f"device memory access [0x{address:X}, +{size}) lies outside the "
                             f"{top} bytes of configuration {self.config.name!r}")

    def read_mem(self, address: int, size: int) -> bytes:
        self._check_range(address, size)
        return self.transport.read_mem(address, size) if size else b""

    def write_mem(self, address: int, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        if isinstance(data, np.ndarray):
            data = np.ascontiguousarray(data).view(np.uint8).tobytes()
        data = bytes(data)
        self._check_range(address, len(data))
        if data:
            self.transport.write_mem(address, data)

    # ------------------------------------------------------------------ bundles and tensors
    def load_bundle(self, bundle: Bundle) -> None:
        """Write a bundle's segments and program and set ``PROGRAM_ADDR``/``PROGRAM_COUNT``.

        A bundle for another configuration, or one that does not fit device memory, is
        refused before anything is written.
        """
        bundle.check_config(self.config)
        top = bundle.memory_top()
        if top > self.config.device_memory_bytes:
            raise BundleError(f"bundle needs {top} bytes of device memory; configuration {self.config.name!r} "
                              f"has {self.config.device_memory_bytes}")
        for segment in bundle.segments:
            self.write_mem(segment.address, segment.data)
        self.write_mem(bundle.program_address, bundle.program_bytes)
        self.write_reg("PROGRAM_ADDR", bundle.program_address)
        self.write_reg("PROGRAM_COUNT", len(bundle.program))
        self._bundle = bundle

    def write_tensor(self, spec: TensorSpec, value: np.ndarray) -> None:
        """Store one tensor (already quantized to ``spec.dtype``) where ``spec`` says."""
        value = spec.stored(value)
        span = spec.span
        if span == 0:
            return
        local = dataclasses.replace(spec, address=0)
        dense = np.prod(spec.shape, dtype=np.int64) * spec.itemsize == span
        image = (np.zeros(span, np.uint8) if dense
                 else np.frombuffer(self.read_mem(spec.address, span), np.uint8).copy())  # keep the gaps
        local.write_to(image, value)
        self.write_mem(spec.address, image.tobytes())

    def read_tensor(self, spec: TensorSpec) -> np.ndarray:
        span = spec.span
        local = dataclasses.replace(spec, address=0)
        image = np.frombuffer(self.read_mem(spec.address, span), np.uint8) if span else np.zeros(0, np.uint8)
        return local.read_from(image)

    def write_inputs(self, inputs: Mapping[str, np.ndarray], bundle: Bundle | None = None) -> None:
        """Write every input of ``bundle`` (default: the last one loaded); float inputs are quantized."""
        bundle = self._need_bundle(bundle)
        missing = [t.name for t in bundle.inputs if t.name not in inputs]
        extra = sorted(set(inputs) - {t.name for t in bundle.inputs})
        if missing or extra:
            raise BundleError(f"inputs do not match the bundle: missing {missing or 'none'}, unknown {extra or 'none'} "
                              f"(bundle inputs: {', '.join(t.name for t in bundle.inputs)})")
        for spec in bundle.inputs:
            self.write_tensor(spec, inputs[spec.name])

    def read_outputs(self, bundle: Bundle | None = None) -> dict[str, np.ndarray]:
        bundle = self._need_bundle(bundle)
        return {spec.name: self.read_tensor(spec) for spec in bundle.outputs}

    def _need_bundle(self, bundle: Bundle | None) -> Bundle:
        if bundle is None:
            bundle = self._bundle
        if bundle is None:
            raise BundleError("no bundle given and none loaded (call load_bundle first)")
        bundle.check_config(self.config)
        return bundle

    # ------------------------------------------------------------------ running
    def start(self, *, irq: bool = True) -> None:
        """Clear old interrupts, enable done/error interrupts (``irq``) and pulse ``CONTROL.start``."""
        irq_bits = _bits(register("IRQ_STATUS"), done=1, error=1)
        self.write_reg("IRQ_STATUS", irq_bits)  # W1C
        self.write_reg("IRQ_ENABLE", irq_bits if irq else 0)
        self.write_reg("CONTROL", _bits(register("CONTROL"), start=1))

    def wait(self, timeout_s: float = 10.0, *, poll_s: float = 0.001) -> Status:
        """Wait until the program finishes; return its :class:`Status`.

        Uses the transport's interrupt wait when it has one, else polls ``STATUS``.
        Raises :class:`DeviceTimeoutError` (the device is still busy after ``timeout_s``)
        or :class:`DeviceError` (it stopped on an error; the cause is decoded).
        """
        deadline = time.monotonic() + timeout_s
        irq_enabled = self.read_reg("IRQ_ENABLE") != 0
        seen = self.transport.wait_irq(timeout_s) if irq_enabled else None
        status = self.status()
        if seen is None:
            while status.busy and time.monotonic() < deadline:
                self.transport.idle(poll_s)
                status = self.status()
        if status.busy or not (status.done or status.error):
            raise DeviceTimeoutError(f"{self.transport.describe()}: the device did not finish within "
                                     f"{timeout_s:g} s ({status})", status)
        if irq_enabled:
            self.write_reg("IRQ_STATUS", self.read_reg("IRQ_STATUS"))  # acknowledge
        if status.error:
            cause = status.error_cause
            what = {
                ErrorCause.BUS_READ: "a DMA or instruction-fetch read got a bus error (address outside device memory?)",
                ErrorCause.BUS_WRITE: "a DMA write got a bus error (address outside device memory?)",
                ErrorCause.ILLEGAL_INSTRUCTION: "an unknown opcode or an operand out of range",
                ErrorCause.WATCHDOG: "the program ran longer than WATCHDOG cycles",
            }.get(cause, "an unknown cause")
            name = cause.name if isinstance(cause, ErrorCause) else str(cause)
            raise DeviceError(f"{self.transport.describe()}: the device stopped on an error: {name}: {what} ({status})",
                              status)
        return status

    def run(self, inputs: Mapping[str, np.ndarray] | None = None, *, bundle: Bundle | None = None,
            timeout_s: float = 60.0) -> dict[str, np.ndarray]:
        """Load (when ``bundle`` is given), write inputs, start, wait, read outputs."""
        if bundle is not None:
            self.load_bundle(bundle)
        if inputs is not None:
            self.write_inputs(inputs)
        self.start()
        self.wait(timeout_s)
        return self.read_outputs()

    def reset(self) -> None:
        """Reset the device: the reset line when the transport has one, else ``CONTROL.soft_reset``."""
        if not self.transport.hard_reset():
            self.write_reg("CONTROL", _bits(register("CONTROL"), soft_reset=1))



