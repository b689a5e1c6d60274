"""The accelerator core: everything between an AXI4 memory port and an AXI4-Lite register port.

::

              csr (AXI4-Lite)                                   axi (AXI4 master)
                    |                                                  ^
               [Registers] --start/addr/count--> [Controller] -- fetch requests
                    ^  counters, status            |  issue / complete per queue
                    |          +----------+--------+---------+----------+
                    |          v          v                  v          v
                    |     [LoadUnit] [MatmulUnit]        [VectorUnit] [StoreUnit]
                    |       |   |      |  |  |             |   |        |   |
                    |   DMA rd  |   sp rd | [SystolicArray] acc rd  sp wr   DMA wr
                    |           v         v        |       [Requantizer]
                    |     [Scratchpad]  [Accumulator] <- update (array rows, or LOAD rows)
                    +---- [DMA] <--> axi; its read side shared by fetch and LOAD (ReadArbiter)

Memory ports, by priority (port 0 first): scratchpad reads: MATMUL rows, PRELOAD rows,
STORE, VECTOR; scratchpad writes: VECTOR, LOAD; accumulator reads: VECTOR, STORE; the
accumulator's update port takes array results first, then VECTOR rows, then LOAD rows.

Performance counters (``weft.hw.registers.COUNTERS``): ``cycles`` while busy;
``array_busy`` cycles a row entered the array; while the array takes no row, the cycle
is charged to ``stall_load`` (the matmul queue waits for a load token), ``stall_store``
(it waits for the vector or store queue to free an accumulator slot), ``stall_token``
(it waits for room in a token counter) or ``stall_fetch`` (it is empty and the
dispatcher waits for instructions); ``bytes_read``/``bytes_written`` from the DMA;
``instructions`` dispatched. A non-zero ``WATCHDOG`` stops a program that runs longer
than that many cycles (error cause WATCHDOG) by resetting the datapath.
"""

from __future__ import annotations

from amaranth.hdl import Module, ResetInserter, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out, connect

from .array import SystolicArray
from .axi import AXI4LiteSignature, AXI4Signature
from .config import AcceleratorConfig
from .control import ERROR_ILLEGAL, ERROR_NO_HALT, Controller
from .dma import DMA
from .isa import Queue
from .memory import Accumulator, Scratchpad
from .registers import ErrorCause, Registers
from .requant import Requantizer
from .units import FetchAdapter, LoadUnit, MatmulUnit, ReadArbiter, StoreUnit, VectorUnit, max_row_bytes

__all__ = ["Core"]

CSR_ADDR_BITS = 12


class Core(wiring.Component):
    """The weft accelerator core for one configuration.

    Ports: ``axi`` (AXI4 master, ``bus.data_bits`` wide, 32-bit addresses), ``csr``
    (AXI4-Lite slave, 12-bit addresses, the register map of :mod:`weft.hw.registers`),
    ``irq``. Clock and synchronous reset are the ``sync`` domain's.
    """

    def __init__(self, config: AcceleratorConfig):
        if not isinstance(config, AcceleratorConfig):
            raise TypeError(f"Core needs an AcceleratorConfig, got {type(config).__name__}")
        self.config = config
        super().__init__({
            "axi": Out(AXI4Signature(addr_width=32, data_width=config.bus.data_bits)),
            "csr": In(AXI4LiteSignature(addr_width=CSR_ADDR_BITS, data_width=32)),
            "irq": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config

        m.submodules.regs = regs = Registers(cfg, addr_width=CSR_ADDR_BITS)
        connect(m, wiring.flipped(self.csr), regs.csr)
        m.d.comb += self.irq.eq(regs.irq)

        # Everything but the register block restarts on a soft reset or a watchdog stop.
        datapath_reset = Signal()
        parts = {
            "ctrl": Controller(cfg),
            "dma": DMA(data_bits=cfg.bus.data_bits, addr_bits=32, max_row_bytes=max_row_bytes(cfg)),
            "arbiter": ReadArbiter(cfg),
            "fetch": FetchAdapter(cfg),
            "load": LoadUnit(cfg),
            "store": StoreUnit(cfg),
            "matmul": MatmulUnit(cfg),
            "vector": VectorUnit(cfg),
            "sp": Scratchpad.from_config(cfg, read_ports=4, write_ports=2),
            "acc": Accumulator.from_config(cfg, read_ports=2),
            "array": None,
            "requant": None,
        }
        parts["array"] = SystolicArray.from_config(cfg, tag_bits=parts["matmul"].tag_bits)
        parts["requant"] = Requantizer(cfg.vector.lanes, tag_bits=parts["vector"].tag_bits)
        for name, part in parts.items():
            m.submodules[name] = ResetInserter(datapath_reset)(part)
        ctrl, dma, arb, fetch = parts["ctrl"], parts["dma"], parts["arbiter"], parts["fetch"]
        load, store, mm, vec = parts["load"], parts["store"], parts["matmul"], parts["vector"]
        sp, acc, array, rq = parts["sp"], parts["acc"], parts["array"], parts["requant"]

        # ------------------------------------------------------------ memory bus
        connect(m, dma.axi, wiring.flipped(self.axi))
        connect(m, ctrl.fetch_req, fetch.req)
        connect(m, fetch.words, ctrl.fetch_data)
        connect(m, fetch.cmd, arb.cmd0)
        connect(m, arb.data0, fetch.beats)
        connect(m, load.cmd, arb.cmd1)
        connect(m, arb.data1, load.beats)
        connect(m, arb.dma_cmd, dma.rd_cmd)
        connect(m, dma.rd_data, arb.dma_data)
        connect(m, store.cmd, dma.wr_cmd)
        connect(m, store.beats, dma.wr_data)
        connect(m, dma.wr_done, store.done)

        # ------------------------------------------------------------ queues to units
        for queue, unit in ((Queue.LOAD, load), (Queue.MATMUL, mm), (Queue.VECTOR, vec), (Queue.STORE, store)):
            connect(m, ctrl.issue(queue), unit.issue)
            m.d.comb += ctrl.complete(queue).eq(unit.complete)

        # ------------------------------------------------------------ memories
        connect(m, mm.a_read, sp.read0)
        connect(m, mm.w_read, sp.read1)
        connect(m, store.sp_read, sp.read2)
        connect(m, vec.sp_read, sp.read3)  # vector operands in the scratchpad: lowest priority
        connect(m, vec.sp_write, sp.write0)
        connect(m, load.sp_write, sp.write1)
        connect(m, vec.acc_read, acc.read0)
        connect(m, store.acc_read, acc.read1)
        # The array cannot stall, so its rows own the update port; LOAD rows use the gaps.
        # Vector results bound for the accumulator (vbin/vmap dst=acc, vrow max/sum,
        # a wide vrow softmax) come next.
        with m.If(mm.acc_update.valid):
            m.d.comb += [acc.update.valid.eq(1), acc.update.addr.eq(mm.acc_update.addr),
                         acc.update.data.eq(mm.acc_update.data), acc.update.accumulate.eq(mm.acc_update.accumulate)]
        with m.Elif(vec.acc_write.valid):
            m.d.comb += [acc.update.valid.eq(1), acc.update.addr.eq(vec.acc_write.addr),
                         acc.update.data.eq(vec.acc_write.data), acc.update.accumulate.eq(0)]
        with m.Else():
            m.d.comb += [acc.update.valid.eq(load.acc_write.valid), acc.update.addr.eq(load.acc_write.addr),
                         acc.update.data.eq(load.acc_write.data), acc.update.accumulate.eq(0)]
        m.d.comb += [vec.acc_write.ready.eq(~mm.acc_update.valid),
                     load.acc_write.ready.eq(~mm.acc_update.valid & ~vec.acc_write.valid)]

        # ------------------------------------------------------------ array and requantizer
        connect(m, mm.array_in, array.inp)
        connect(m, mm.array_load, array.load)
        m.d.comb += array.swap.eq(mm.array_swap)
        m.d.comb += [mm.array_out.valid.eq(array.out.valid), mm.array_out.data.eq(array.out.data),
                     mm.array_out.tag.eq(array.out.tag)]
        connect(m, vec.rq_in, rq.inp)
        connect(m, rq.out, vec.rq_out)

        # ------------------------------------------------------------ control and status
        control = regs.control
        m.d.comb += [ctrl.start.eq(control.start), ctrl.program_addr.eq(control.program_addr),
                     ctrl.program_count.eq(control.program_count)]
        busy = ctrl.busy
        run_cycles = Signal(32)
        watchdog_fire = Signal()
        with m.If(control.start & ~busy):
            m.d.sync += run_cycles.eq(0)
        with m.Elif(busy):
            m.d.sync += run_cycles.eq(run_cycles + 1)
        m.d.comb += [
            watchdog_fire.eq(busy & (control.watchdog != 0) & (run_cycles >= control.watchdog)),
            datapath_reset.eq(control.soft_reset | watchdog_fire),
        ]
        done, error = Signal(), Signal()
        cause = Signal(8)
        bus_error = Signal(8)  # first bus error of this run, reported when it ends
        with m.If(control.start & ~busy):
            m.d.sync += [done.eq(0), error.eq(0), cause.eq(0), bus_error.eq(0)]
        with m.If(busy & (bus_error == 0)):
            with m.If(dma.rd_error):
                m.d.sync += bus_error.eq(ErrorCause.BUS_READ)
            with m.Elif(store.error):
                m.d.sync += bus_error.eq(ErrorCause.BUS_WRITE)
            with m.Elif(vec.error):  # a vector instruction the unit refuses (reserved func, bad operands)
                m.d.sync += bus_error.eq(ErrorCause.ILLEGAL_INSTRUCTION)
        finish_cause = Signal(8)
        with m.If(ctrl.error_cause == ERROR_ILLEGAL):
            m.d.comb += finish_cause.eq(ErrorCause.ILLEGAL_INSTRUCTION)
        with m.Elif(ctrl.error_cause == ERROR_NO_HALT):
            m.d.comb += finish_cause.eq(ErrorCause.NO_HALT)
        with m.Else():
            m.d.comb += finish_cause.eq(bus_error)
        with m.If(ctrl.done):
            m.d.sync += [done.eq(finish_cause == 0), error.eq(finish_cause != 0), cause.eq(finish_cause)]
            m.d.comb += [regs.irq_set.done.eq(finish_cause == 0), regs.irq_set.error.eq(finish_cause != 0)]
        with m.If(watchdog_fire):
            m.d.sync += [error.eq(1), cause.eq(ErrorCause.WATCHDOG)]
            m.d.comb += regs.irq_set.error.eq(1)
        m.d.comb += [regs.status.busy.eq(busy), regs.status.done.eq(done), regs.status.error.eq(error),
                     regs.status.error_cause.eq(cause)]

        # ------------------------------------------------------------ counters
        counters = regs.counters
        row_in = array.inp.valid
        mq = int(Queue.MATMUL)
        waiting = ctrl.waiting_for[mq]
        head = ctrl.head_valid[mq]
        idle = busy & ~row_in
        stall_load = idle & head & waiting[int(Queue.LOAD)]
        stall_store = idle & head & ~waiting[int(Queue.LOAD)] & (waiting[int(Queue.VECTOR)] | waiting[int(Queue.STORE)])
        stall_token = idle & head & ctrl.signal_blocked[mq] & (waiting == 0)
        stall_fetch = idle & ~head & ctrl.fetch_starved
        for name, inc in (("cycles", busy), ("array_busy", row_in), ("stall_load", stall_load),
                          ("stall_store", stall_store), ("stall_token", stall_token), ("stall_fetch", stall_fetch),
                          ("instructions", ctrl.dispatched)):
            count = Signal(64, name=f"count_{name}")
            m.d.sync += count.eq(count + inc)
            m.d.comb += getattr(counters, name).eq(count)
        m.d.comb += [counters.bytes_read.eq(dma.bytes_read), counters.bytes_written.eq(dma.bytes_written)]
        return m
