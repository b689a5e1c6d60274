"""Control and status registers: the map defined once as data, and the AXI4-Lite slave built from it.

:data:`REGISTERS` is the register map (name, offset, access, reset, bit fields,
description). :class:`Registers` generates the AXI4-Lite slave from it, the driver reads
offsets and fields from it, and ``docs/registers.md`` is :func:`render_markdown`'s output
(``make docs`` rewrites it; a test checks that it is current).

Conventions
-----------
* 32-bit registers at word-aligned byte offsets; the slave decodes ``addr_width`` (default
  12: a 4 KiB window) address bits and ignores bits 1..0.
* Access types: ``RO`` read-only (writes are ignored and answered OKAY); ``RW`` read/write,
  byte enables (``WSTRB``) honoured; ``W1C`` a written 1 clears that bit, hardware sets it;
  ``W1S`` a written 1 raises that bit's one-cycle pulse to the core; it reads as 0
  (self-clearing).
* An access to an offset that no register occupies gets SLVERR (reads return 0).
* 64-bit performance counters are ``<NAME>_LO``/``<NAME>_HI`` pairs. Reading ``_LO``
  returns bits 31..0 and, in the same cycle, latches bits 63..32 into that counter's
  shadow; reading ``_HI`` returns the shadow. Read LO then HI for a consistent 64-bit value
  (each counter has its own shadow, so interleaved reads of different counters are safe).
  ``_HI`` read without a preceding ``_LO`` read returns the value latched last time.
* ``irq`` = OR over the bits of ``IRQ_STATUS & IRQ_ENABLE`` (combinational from the
  registers, level-sensitive: it stays high until software clears the status bit).

Timing: a write takes effect at the clock edge of its AW/W handshake (both channels are
accepted together, in the same cycle); BVALID follows one cycle later. A read is answered
one cycle after its AR handshake. Throughput: one read and one write per cycle when the
master keeps RREADY/BREADY high.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

from amaranth.hdl import Cat, Const, Module, Signal, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .axi import AXI4LiteSignature, Resp
from .config import AcceleratorConfig

__all__ = [
    "Access",
    "BitField",
    "Register",
    "REGISTERS",
    "COUNTERS",
    "ErrorCause",
    "ID_VALUE",
    "VERSION_MAJOR",
    "VERSION_MINOR",
    "register",
    "reset_value",
    "config_info",
    "Registers",
    "render_markdown",
]

#: ``ID`` register: the ASCII bytes "WEFT" at increasing addresses (read as a little-endian word).
ID_VALUE = int.from_bytes(b"WEFT", "little")
assert ID_VALUE == 0x54464557
#: Hardware version in ``VERSION`` (major in bits 31..16, minor in 15..0). Bump the minor
#: for compatible additions, the major when a register or instruction changes meaning.
VERSION_MAJOR = 0
VERSION_MINOR = 1


class Access(enum.Enum):
    RO = "RO"
    RW = "RW"
    W1C = "W1C"
    W1S = "W1S"


class ErrorCause(enum.IntEnum):
    """Values of ``STATUS.error_cause`` (reported by the core; 0 while ``error`` is low)."""

    NONE = 0
    BUS_READ = 1
    BUS_WRITE = 2
    ILLEGAL_INSTRUCTION = 3
    WATCHDOG = 4
    NO_HALT = 5


#: What each error cause means (the register documentation is generated from this).
ERROR_CAUSE_DOCS = {
    ErrorCause.NONE: "no error",
    ErrorCause.BUS_READ: "a DMA or instruction-fetch read got SLVERR/DECERR",
    ErrorCause.BUS_WRITE: "a DMA write got SLVERR/DECERR",
    ErrorCause.ILLEGAL_INSTRUCTION: "an instruction word that does not decode (unknown opcode, reserved bits set, "
                                    "a queue waiting for or signalling itself)",
    ErrorCause.WATCHDOG: "the program ran longer than `WATCHDOG` cycles and was stopped",
    ErrorCause.NO_HALT: "the program's `PROGRAM_COUNT` instructions ended without `halt`",
}


@dataclass(frozen=True)
class BitField:
    name: str
    lsb: int
    width: int
    description: str

    @property
    def msb(self) -> int:
        return self.lsb + self.width - 1

    @property
    def mask(self) -> int:
        return ((1 << self.width) - 1) << self.lsb


@dataclass(frozen=True)
class Register:
    """One 32-bit register.

    ``source`` says where an RO register's value comes from: ``const`` (its ``reset``),
    ``config`` (computed from the configuration by :func:`reset_value`), ``status`` (the
    ``status`` input port, field by field) or ``counter`` (the ``counters`` input,
    ``counter`` names the member; ``half`` is ``lo`` or ``hi``). Writable registers
    (RW/W1C/W1S) have ``source`` ``""``.
    """

    name: str
    offset: int
    access: Access
    description: str
    reset: int = 0
    fields: tuple[BitField, ...] = ()
    source: str = ""
    counter: str = ""
    half: str = ""


#: Performance counters: (member of the ``counters`` input, register base name, description).
COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("cycles", "CYCLES", "clock cycles a program was running (since the last reset)"),
    ("array_busy", "ARRAY_BUSY", "cycles the systolic array accepted a row"),
    ("stall_load", "STALL_LOAD", "array idle: the matmul queue waited for a load token (operands not in yet)"),
    ("stall_store", "STALL_STORE", "array idle: the matmul queue waited for a vector or store token "
     "(accumulator slot not drained)"),
    ("stall_token", "STALL_TOKEN", "array idle: the matmul queue waited for room in a token counter"),
    ("stall_fetch", "STALL_FETCH", "array idle: the matmul queue was empty and dispatch waited for instruction fetch"),
    ("bytes_read", "BYTES_READ", "bytes read from device memory by the DMA"),
    ("bytes_written", "BYTES_WRITTEN", "bytes written to device memory by the DMA"),
    ("instructions", "INSTRUCTIONS", "instructions dispatched"),
)
COUNTER_BASE = 0x40

_IRQ_FIELDS = (
    BitField("done", 0, 1, "the program reached HALT"),
    BitField("error", 1, 1, "the core stopped on an error (see `STATUS.error_cause`)"),
)


def _counter_registers() -> tuple[Register, ...]:
    out = []
    for i, (member, base, doc) in enumerate(COUNTERS):
        off = COUNTER_BASE + 8 * i
        out.append(Register(f"{base}_LO", off, Access.RO, f"{doc}, bits 31..0; reading it latches bits 63..32",
                            source="counter", counter=member, half="lo"))
        out.append(Register(f"{base}_HI", off + 4, Access.RO, f"{doc}, bits 63..32 as latched by the last `{base}_LO` read",
                            source="counter", counter=member, half="hi"))
    return tuple(out)


#: The register map.
REGISTERS: tuple[Register, ...] = (
    Register("ID", 0x00, Access.RO, 'constant "WEFT" (bytes W, E, F, T at increasing addresses)',
             reset=ID_VALUE, source="const"),
    Register("VERSION", 0x04, Access.RO, "hardware version", reset=VERSION_MAJOR << 16 | VERSION_MINOR,
             source="const", fields=(BitField("minor", 0, 16, "compatible revision"),
                                     BitField("major", 16, 16, "incompatible revision"))),
    Register("CONFIG_HASH", 0x08, Access.RO, "first 32 bits of the configuration's SHA-256 (`config.hash32`)",
             source="config"),
    Register("CONFIG_INFO", 0x0C, Access.RO, "configuration summary", source="config",
             fields=(BitField("rows", 0, 8, "array rows (reduction depth K)"),
                     BitField("cols", 8, 8, "array columns (output width N)"),
                     BitField("lanes", 16, 8, "vector lanes"),
                     BitField("bus_bytes", 24, 8, "AXI data width in bytes"))),
    Register("CONTROL", 0x10, Access.W1S, "commands to the core (self-clearing pulses, read as 0)",
             fields=(BitField("start", 0, 1, "start the program at `PROGRAM_ADDR`"),
                     BitField("soft_reset", 1, 1, "reset the core's datapath (not this register block)"))),
    Register("STATUS", 0x14, Access.RO, "core state", source="status",
             fields=(BitField("busy", 0, 1, "a program is running"),
                     BitField("done", 1, 1, "the last program reached HALT (cleared by `start`)"),
                     BitField("error", 2, 1, "the last program stopped on an error (cleared by `start`)"),
                     BitField("error_cause", 8, 8, "why (`ErrorCause`: 1 bus read, 2 bus write, "
                              "3 illegal instruction, 4 watchdog)"))),
    Register("PROGRAM_ADDR", 0x18, Access.RW, "device-memory byte address of the first instruction"),
    Register("PROGRAM_COUNT", 0x1C, Access.RW, "number of instructions in the program"),
    Register("IRQ_ENABLE", 0x20, Access.RW, "interrupt enables", fields=_IRQ_FIELDS),
    Register("IRQ_STATUS", 0x24, Access.W1C, "interrupt causes; `irq` = OR of `IRQ_STATUS & IRQ_ENABLE`",
             fields=_IRQ_FIELDS),
    Register("SCRATCH", 0x28, Access.RW, "free for software (bring-up tests)"),
    Register("WATCHDOG", 0x2C, Access.RW, "cycle limit for one program; 0 disables the watchdog"),
    *_counter_registers(),
)


def register(name: str) -> Register:
    """The register called ``name`` (KeyError if none)."""
    for reg in REGISTERS:
        if reg.name == name:
            return reg
    raise KeyError(name)


def config_info(config: AcceleratorConfig) -> int:
    """``CONFIG_INFO`` for ``config``."""
    return (config.array.rows | config.array.cols << 8 | config.vector.lanes << 16
            | config.bus_bytes << 24)


_CONFIG_VALUES: dict[str, Callable[[AcceleratorConfig], int]] = {
    "CONFIG_HASH": lambda c: c.hash32,
    "CONFIG_INFO": config_info,
}


def reset_value(reg: Register, config: AcceleratorConfig | None = None) -> int:
    """A register's value after reset (configuration registers need ``config``)."""
    if reg.source == "config":
        if config is None:
            raise ValueError(f"{reg.name}'s value depends on the configuration; pass config")
        return _CONFIG_VALUES[reg.name](config)
    return reg.reset


def _check_map() -> None:
    seen: dict[int, str] = {}
    for reg in REGISTERS:
        assert reg.offset % 4 == 0, reg.name
        assert reg.offset not in seen, f"{reg.name} overlaps {seen.get(reg.offset)}"
        seen[reg.offset] = reg.name
        used = 0
        for f in reg.fields:
            assert f.msb < 32 and not used & f.mask, f"{reg.name}.{f.name}"
            used |= f.mask
        assert (reg.source == "") == (reg.access is not Access.RO), reg.name
        assert reg.source != "config" or reg.name in _CONFIG_VALUES, reg.name


_check_map()


def _layout(fields) -> data.StructLayout:
    return data.StructLayout({f.name: unsigned(f.width) for f in fields})


def status_layout() -> data.StructLayout:
    return _layout(register("STATUS").fields)


def irq_layout() -> data.StructLayout:
    return _layout(register("IRQ_STATUS").fields)


def counters_layout() -> data.StructLayout:
    return data.StructLayout({member: unsigned(64) for member, _, _ in COUNTERS})


def control_layout() -> data.StructLayout:
    members = {f.name: unsigned(f.width) for f in register("CONTROL").fields}
    members.update({"program_addr": unsigned(32), "program_count": unsigned(32), "watchdog": unsigned(32)})
    return data.StructLayout(members)


class Registers(wiring.Component):
    """AXI4-Lite register block generated from :data:`REGISTERS`.

    Ports
    -----
    csr : ``In(AXI4LiteSignature(addr_width, 32))``, slave (Verilog ``csr__awaddr`` ...).
    control : ``Out(control_layout())``: ``start``, ``soft_reset`` (one-cycle pulses from
        CONTROL writes), ``program_addr``, ``program_count``, ``watchdog`` (RW registers).
    status : ``In(status_layout())``: ``busy``, ``done``, ``error``, ``error_cause``.
    irq_set : ``In(irq_layout())``: one-cycle strobes ``done``, ``error`` that set the
        IRQ_STATUS bits (a set wins over a W1C clear in the same cycle).
    counters : ``In(counters_layout())``: 64-bit running counter values from the core.
    irq : ``Out(1)``.

    Latency: a read returns the value in the cycle of its AR handshake (RVALID the next
    cycle); a write is visible on ``control`` one cycle after its AW/W handshake.
    """

    def __init__(self, config: AcceleratorConfig, *, addr_width: int = 12):
        if not isinstance(config, AcceleratorConfig):
            self._MustUse__used = True  # a rejected component is not an unused one (no warning)
            raise ValueError(f"Registers needs an AcceleratorConfig, got {type(config).__name__}")
        if isinstance(addr_width, bool) or not isinstance(addr_width, int) or not 8 <= addr_width <= 32:
            self._MustUse__used = True
            raise ValueError(f"addr_width={addr_width!r} must be an int in 8..32 (the map needs 8 bits)")
        self.config = config
        self.addr_width = addr_width
        super().__init__({
            "csr": In(AXI4LiteSignature(addr_width=addr_width, data_width=32)),
            "control": Out(control_layout()),
            "status": In(status_layout()),
            "irq_set": In(irq_layout()),
            "counters": In(counters_layout()),
            "irq": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        csr = self.csr
        storage: dict[str, Signal] = {}
        for reg in REGISTERS:
            if reg.access in (Access.RW, Access.W1C):
                storage[reg.name] = Signal(32, name=f"reg_{reg.name.lower()}", init=reg.reset)
        shadows = {member: Signal(32, name=f"shadow_{member}") for member, _, _ in COUNTERS}
        m.d.comb += [
            self.control.program_addr.eq(storage["PROGRAM_ADDR"]),
            self.control.program_count.eq(storage["PROGRAM_COUNT"]),
            self.control.watchdog.eq(storage["WATCHDOG"]),
        ]

        # ---- writes: AW and W together
        bvalid = Signal()
        bresp = Signal(2)
        w_fire = Signal()
        m.d.comb += [
            w_fire.eq(csr.awvalid & csr.wvalid & (~bvalid | csr.bready)),
            csr.awready.eq(w_fire),
            csr.wready.eq(w_fire),
            csr.bvalid.eq(bvalid),
            csr.bresp.eq(bresp),
        ]
        with m.If(csr.bready):
            m.d.sync += bvalid.eq(0)
        bytemask = Cat(*(b.replicate(8) for b in csr.wstrb))
        w_word = csr.awaddr[2:]
        w_hit = Signal()
        irq_status = storage["IRQ_STATUS"]
        w1c_clear = Signal(32)
        with m.If(w_fire):
            m.d.sync += bvalid.eq(1)
            with m.Switch(w_word):
                for reg in REGISTERS:
                    with m.Case(reg.offset >> 2):
                        m.d.comb += w_hit.eq(1)
                        if reg.access is Access.RW:
                            s = storage[reg.name]
                            m.d.sync += s.eq((s & ~bytemask) | (csr.wdata & bytemask))
                        elif reg.access is Access.W1C:
                            m.d.comb += w1c_clear.eq(csr.wdata & bytemask)
                        elif reg.access is Access.W1S:
                            for f in reg.fields:  # CONTROL is the only W1S register
                                m.d.comb += getattr(self.control, f.name).eq(
                                    (csr.wdata & bytemask)[f.lsb:f.lsb + f.width])
            m.d.sync += bresp.eq(Resp.OKAY)
            with m.If(~w_hit):
                m.d.sync += bresp.eq(Resp.SLVERR)
        # IRQ_STATUS: hardware sets win over software clears
        set_bits = Signal(32)
        for f in register("IRQ_STATUS").fields:
            m.d.comb += set_bits[f.lsb:f.lsb + f.width].eq(getattr(self.irq_set, f.name))
        m.d.sync += irq_status.eq((irq_status & ~w1c_clear) | set_bits)
        m.d.comb += self.irq.eq((irq_status & storage["IRQ_ENABLE"]).any())

        # ---- reads
        rvalid = Signal()
        rdata = Signal(32)
        rresp = Signal(2)
        r_fire = Signal()
        m.d.comb += [
            r_fire.eq(csr.arvalid & csr.arready),
            csr.arready.eq(~rvalid | csr.rready),
            csr.rvalid.eq(rvalid),
            csr.rdata.eq(rdata),
            csr.rresp.eq(rresp),
        ]
        with m.If(csr.rready):
            m.d.sync += rvalid.eq(0)
        with m.If(r_fire):
            m.d.sync += [rvalid.eq(1), rdata.eq(0), rresp.eq(Resp.SLVERR)]
            with m.Switch(csr.araddr[2:]):
                for reg in REGISTERS:
                    with m.Case(reg.offset >> 2):
                        m.d.sync += [rdata.eq(self._read_value(reg, storage, shadows)), rresp.eq(Resp.OKAY)]
                        if reg.half == "lo":
                            m.d.sync += shadows[reg.counter].eq(getattr(self.counters, reg.counter)[32:])
        return m

    def _read_value(self, reg: Register, storage, shadows):
        if reg.name in storage:
            return storage[reg.name]
        if reg.source in ("const", "config"):
            return Const(reset_value(reg, self.config), 32)
        if reg.source == "status":
            value = Const(0, 32)
            for f in reg.fields:
                value = value | (getattr(self.status, f.name).as_unsigned() << f.lsb)
            return value
        if reg.source == "counter":
            return getattr(self.counters, reg.counter)[:32] if reg.half == "lo" else shadows[reg.counter]
        return Const(0, 32)  # W1S: reads as 0


# ---------------------------------------------------------------------- documentation
def _hex(v: int) -> str:
    return f"0x{v:08X}"


def render_markdown() -> str:
    """The register map as Markdown (``docs/registers.md``)."""
    out = [
        "# Control and status registers",
        "",
        "<!-- Generated from weft/hw/registers.py by `make docs`; do not edit. -->",
        "",
        "The accelerator's AXI4-Lite slave: 32-bit registers at word-aligned byte offsets in a",
        "4 KiB window. Accesses to offsets no register occupies get SLVERR (reads return 0);",
        "writes to RO registers are ignored.",
        "",
        "Access types: **RO** read-only; **RW** read/write (byte enables honoured); **W1C** write 1",
        "to clear a bit, hardware sets it; **W1S** write 1 to raise that bit's one-cycle pulse to",
        "the core (self-clearing, reads as 0).",
        "",
        "64-bit counters are `_LO`/`_HI` pairs: reading `_LO` returns bits 31..0 and latches",
        "bits 63..32 into the counter's own shadow, which `_HI` returns. Read `_LO` first, then",
        "`_HI`, for a consistent value.",
        "",
        f"`ID` reads {_hex(ID_VALUE)}: the bytes `W E F T` at increasing addresses. `VERSION` is "
        f"{VERSION_MAJOR}.{VERSION_MINOR}.",
        "The interrupt line is `irq = |(IRQ_STATUS & IRQ_ENABLE)`, level-sensitive.",
        "",
        "| Offset | Name | Access | Reset | Description |",
        "|---|---|---|---|---|",
    ]
    for reg in REGISTERS:
        reset = "config" if reg.source == "config" else ("input" if reg.source in ("status", "counter")
                                                          else _hex(reg.reset))
        out.append(f"| 0x{reg.offset:02X} | `{reg.name}` | {reg.access.value} | {reset} | {reg.description} |")
    out += ["", "## Bit fields", ""]
    for reg in REGISTERS:
        if not reg.fields:
            continue
        out += [f"### {reg.name} (0x{reg.offset:02X})", "", "| Bits | Field | Description |", "|---|---|---|"]
        for f in reg.fields:
            bits = f"{f.msb}:{f.lsb}" if f.width > 1 else f"{f.lsb}"
            out.append(f"| {bits} | `{f.name}` | {f.description} |")
        out.append("")
    out += ["## Error causes (`STATUS.error_cause`)", "", "| Value | Name | Meaning |", "|---|---|---|"]
    for cause in ErrorCause:
        doc = ERROR_CAUSE_DOCS[cause]
        out.append(f"| {int(cause)} | `{cause.name}` | {doc} |")
    out.append("")
    return "\n".join(out)
