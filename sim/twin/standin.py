"""A stand-in accelerator top with the core's ports, built from the register block and the DMA.

Until ``weft.hw.core`` exists, the twin and the driver are tested against this component.
It has exactly the core's ports (``axi`` AXI4 master, ``csr`` AXI4-Lite slave, ``irq``),
the real register block (:class:`weft.hw.registers.Registers`) on ``csr`` and the real DMA
(:class:`weft.hw.dma.DMA`) on ``axi``, so the twin's memory model, register access and
interrupt path run against real RTL.

Its "program" is one DMA copy (the registers keep their names, the meaning is the stand-in's):

* ``PROGRAM_ADDR``: source byte address;
* ``WATCHDOG``: destination byte address;
* ``PROGRAM_COUNT``: bits 15..0 rows, bits 24..16 bytes per row (1..256); rows are contiguous
  (stride = bytes per row), so the copy moves ``rows * row_bytes`` bytes;
* ``CONTROL.start`` starts the copy; ``STATUS.busy`` is high until the last write response;
  then ``STATUS.done`` (and ``IRQ_STATUS.done``) or, when a read or write got SLVERR/DECERR,
  ``STATUS.error`` with ``error_cause`` BUS_READ or BUS_WRITE (and ``IRQ_STATUS.error``).
* Counters: ``CYCLES`` (since reset), ``BYTES_READ``, ``BYTES_WRITTEN`` (from the DMA),
  ``INSTRUCTIONS`` (copies started); the others read 0. ``CONTROL.soft_reset`` is ignored.
"""

from __future__ import annotations

from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from ...hw.axi import AXI4LiteSignature, AXI4Signature
from ...hw.config import AcceleratorConfig
from ...hw.dma import DMA
from ...hw.registers import ErrorCause, Registers

__all__ = ["StandInTop", "MAX_ROW_BYTES", "copy_count"]

MAX_ROW_BYTES = 256


def copy_count(rows: int, row_bytes: int) -> int:
    """``PROGRAM_COUNT`` value for a copy of ``rows`` rows of ``row_bytes`` bytes."""
    if not 0 <= rows < 1 << 16 or not 0 <= row_bytes <= MAX_ROW_BYTES:
        raise ValueError(f"rows={rows} (0..65535), row_bytes={row_bytes} (0..{MAX_ROW_BYTES})")
    return rows | row_bytes << 16


class StandInTop(wiring.Component):
    """Registers + DMA copy engine with the core's ports (see the module docstring)."""

    def __init__(self, config: AcceleratorConfig):
        self.config = config
        super().__init__({
            "axi": Out(AXI4Signature(addr_width=32, data_width=config.bus.data_bits)),
            "csr": In(AXI4LiteSignature(addr_width=12, data_width=32)),
            "irq": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.regs = regs = Registers(self.config)
        m.submodules.dma = dma = DMA(data_bits=self.config.bus.data_bits, addr_bits=32, max_row_bytes=MAX_ROW_BYTES)
        wiring.connect(m, wiring.flipped(self.csr), regs.csr)
        wiring.connect(m, wiring.flipped(self.axi), dma.axi)
        wiring.connect(m, dma.rd_data, dma.wr_data)
        m.d.comb += self.irq.eq(regs.irq)

        ctl = regs.control
        busy = Signal()
        done = Signal()
        error = Signal()
        cause = Signal(8)
        rd_pend = Signal()
        wr_pend = Signal()
        rd_err_before = Signal()
        src = Signal(32)
        dst = Signal(32)
        rows = Signal(16)
        row_bytes = Signal(9)
        cycles = Signal(64)
        copies = Signal(64)
        m.d.sync += cycles.eq(cycles + 1)

        with m.If(ctl.start & ~busy):
            m.d.sync += [
                busy.eq(1), rd_pend.eq(1), wr_pend.eq(1), done.eq(0), error.eq(0), cause.eq(0),
                src.eq(ctl.program_addr), dst.eq(ctl.watchdog),
                rows.eq(ctl.program_count[:16]), row_bytes.eq(ctl.program_count[16:25]),
                rd_err_before.eq(dma.rd_error), copies.eq(copies + 1),
            ]
        for cmd, pend, addr in ((dma.rd_cmd, rd_pend, src), (dma.wr_cmd, wr_pend, dst)):
            m.d.comb += [
                cmd.valid.eq(pend),
                cmd.payload.addr.eq(addr),
                cmd.payload.rows.eq(rows),
                cmd.payload.row_bytes.eq(row_bytes),
                cmd.payload.stride.eq(row_bytes),
            ]
            with m.If(cmd.valid & cmd.ready):
                m.d.sync += pend.eq(0)
        m.d.comb += dma.wr_done.ready.eq(busy & ~wr_pend & ~rd_pend)
        with m.If(dma.wr_done.valid & dma.wr_done.ready):
            m.d.sync += busy.eq(0)
            read_failed = dma.rd_error & ~rd_err_before
            with m.If(read_failed | dma.wr_done.payload.error):
                m.d.sync += [error.eq(1), cause.eq(ErrorCause.BUS_READ)]
                with m.If(~read_failed):
                    m.d.sync += cause.eq(ErrorCause.BUS_WRITE)
                m.d.comb += regs.irq_set.error.eq(1)
            with m.Else():
                m.d.sync += done.eq(1)
                m.d.comb += regs.irq_set.done.eq(1)

        m.d.comb += [
            regs.status.busy.eq(busy),
            regs.status.done.eq(done),
            regs.status.error.eq(error),
            regs.status.error_cause.eq(cause),
            regs.counters.cycles.eq(cycles),
            regs.counters.bytes_read.eq(dma.bytes_read),
            regs.counters.bytes_written.eq(dma.bytes_written),
            regs.counters.instructions.eq(copies),
        ]
        return m
