"""Execution units: what each queue does with the instructions the controller issues.

Every unit takes 128-bit instruction words on ``issue`` (a stream) and pulses
``complete`` once per instruction, in issue order, when the instruction's effects are
visible to any later reader (the controller then releases its tokens).

* :class:`FetchAdapter`: instruction fetch requests to DMA row reads (one 16-byte row per
  instruction) and row beats back to 128-bit words.
* :class:`ReadArbiter`: shares the DMA's read side between fetch (first) and loads.
* :class:`LoadUnit`: LOAD. DMA row beats are packed into on-chip rows, zero-filled past
  ``cols``. Several LOADs may be in flight (commands ahead of data).
* :class:`StoreUnit`: STORE. On-chip rows are read, cut into bus beats and written.
* :class:`MatmulUnit`: PRELOAD and MATMUL. A PRELOAD fills the array's shadow weights
  while the previous MATMUL streams; the next MATMUL swaps them in on its first row, so
  consecutive MATMULs stream back to back at one row per cycle.
* :class:`VectorUnit`: REQUANT, ``lanes`` elements per cycle; VBIN, VMAP and VROW through
  :class:`weft.hw.vector.RowEngine` (one instruction at a time across both).
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from .array import array_input_signature, array_load_signature
from .config import ACC_BYTES, AcceleratorConfig
from .control import FETCH_REQUEST_LAYOUT
from .decode import instruction_layout
from .dma import beat_layout, cmd_layout, done_layout
from .isa import INSTR_BITS, INSTR_BYTES, Mem, Opcode
from .memory import read_signature, write_signature
from .requant import requant_input_signature, requant_output_signature
from .vector import RowEngine

__all__ = ["FetchAdapter", "ReadArbiter", "LoadUnit", "StoreUnit", "MatmulUnit", "VectorUnit",
           "acc_write_signature", "max_row_bytes"]


def max_row_bytes(config: AcceleratorConfig) -> int:
    """Bytes of the widest on-chip row (the DMA's row limit)."""
    return max(config.sp_row_bytes, config.acc_row_bytes, INSTR_BYTES)


def _sp_row(config):
    return data.ArrayLayout(signed(8), config.sp_row_elems)


def _acc_row(config):
    return data.ArrayLayout(signed(32), config.acc_row_elems)


def acc_write_signature(config: AcceleratorConfig) -> wiring.Signature:
    """A plain accumulator row write (requester's view), granted when the array is not writing."""
    return wiring.Signature({"valid": Out(1), "addr": Out(range(config.acc_rows)), "data": Out(_acc_row(config)),
                             "ready": In(1)})


def _cmd_sig(config):
    return stream.Signature(cmd_layout(max_row_bytes(config)))


def _beat_sig(config):
    return stream.Signature(beat_layout(config.bus.data_bits))


class FetchAdapter(wiring.Component):
    """Controller fetch requests -> DMA reads; DMA beats -> instruction words.

    A request {addr, count} becomes one DMA read of ``count`` rows of 16 bytes at stride
    16. Latency from a row's last beat to its word: 1 cycle. Throughput: one word per
    ``ceil(16 / bus_bytes)`` cycles.
    """

    def __init__(self, config: AcceleratorConfig):
        self.config = config
        super().__init__({
            "req": In(stream.Signature(FETCH_REQUEST_LAYOUT)),
            "cmd": Out(_cmd_sig(config)),
            "beats": In(_beat_sig(config)),
            "words": Out(stream.Signature(INSTR_BITS)),
        })

    def elaborate(self, platform):
        m = Module()
        bus_bits = self.config.bus.data_bits
        m.d.comb += [
            self.cmd.valid.eq(self.req.valid),
            self.req.ready.eq(self.cmd.ready),
            self.cmd.payload.addr.eq(self.req.payload.addr),
            self.cmd.payload.rows.eq(self.req.payload.count),
            self.cmd.payload.row_bytes.eq(INSTR_BYTES),
            self.cmd.payload.stride.eq(INSTR_BYTES),
        ]
        out_valid = Signal()
        m.d.comb += [self.words.valid.eq(out_valid), self.beats.ready.eq(~out_valid | self.words.ready)]
        with m.If(self.words.ready):
            m.d.sync += out_valid.eq(0)
        beat = self.beats.payload
        if bus_bits >= INSTR_BITS:
            with m.If(self.beats.valid & self.beats.ready):
                m.d.sync += [self.words.payload.eq(beat.data[:INSTR_BITS]), out_valid.eq(1)]
        else:
            per_word = INSTR_BITS // bus_bits
            index = Signal(range(per_word))
            buf = Signal(INSTR_BITS)
            with m.If(self.beats.valid & self.beats.ready):
                m.d.sync += [buf.word_select(index, bus_bits).eq(beat.data), index.eq(index + 1)]
                with m.If(beat.last):
                    m.d.sync += [index.eq(0), out_valid.eq(1)]
                    with m.Switch(index):
                        for i in range(per_word):
                            with m.Case(i):
                                m.d.sync += self.words.payload.eq(Cat(buf[:i * bus_bits], beat.data) if i else beat.data)
        return m


class ReadArbiter(wiring.Component):
    """Two requesters (0: fetch, priority; 1: load) share the DMA's read side.

    Each accepted command's owner and row count go into an order FIFO; returning beats
    go to the owner at its head until that command's last row has ended. Commands must
    move data (rows >= 1, row_bytes >= 1). Adds no latency.
    """

    def __init__(self, config: AcceleratorConfig, *, depth: int = 8):
        self.config = config
        self.depth = depth
        super().__init__({
            "cmd0": In(_cmd_sig(config)), "cmd1": In(_cmd_sig(config)),
            "data0": Out(_beat_sig(config)), "data1": Out(_beat_sig(config)),
            "dma_cmd": Out(_cmd_sig(config)), "dma_data": In(_beat_sig(config)),
        })

    def elaborate(self, platform):
        m = Module()
        m.submodules.order = order = fifo.SyncFIFOBuffered(width=17, depth=self.depth)
        pick1 = Signal()
        m.d.comb += pick1.eq(~self.cmd0.valid)
        chosen = Mux(pick1, self.cmd1.payload.as_value(), self.cmd0.payload.as_value())
        m.d.comb += [
            self.dma_cmd.valid.eq((self.cmd0.valid | self.cmd1.valid) & order.w_rdy),
            self.dma_cmd.payload.eq(chosen),
            self.cmd0.ready.eq(self.dma_cmd.ready & order.w_rdy),
            self.cmd1.ready.eq(self.dma_cmd.ready & order.w_rdy & pick1),
            order.w_en.eq(self.dma_cmd.valid & self.dma_cmd.ready),
            order.w_data.eq(Cat(Mux(pick1, self.cmd1.payload.rows, self.cmd0.payload.rows), pick1)),
        ]
        owner = order.r_data[16]
        rows = order.r_data[:16]
        seen = Signal(16)
        for i, port in enumerate((self.data0, self.data1)):
            m.d.comb += [port.payload.eq(self.dma_data.payload),
                         port.valid.eq(self.dma_data.valid & order.r_rdy & (owner == i))]
        sink_ready = Mux(owner, self.data1.ready, self.data0.ready)
        m.d.comb += self.dma_data.ready.eq(order.r_rdy & sink_ready)
        with m.If(self.dma_data.valid & self.dma_data.ready & self.dma_data.payload.last):
            with m.If(seen + 1 == rows):
                m.d.sync += seen.eq(0)
                m.d.comb += order.r_en.eq(1)
            with m.Else():
                m.d.sync += seen.eq(seen + 1)
        return m


class LoadUnit(wiring.Component):
    """LOAD: device memory -> scratchpad or accumulator rows.

    Up to ``jobs`` LOADs may have their DMA command sent before the earlier ones' data has
    arrived. A row is written one cycle after its last beat; rows of one beat stream at
    one per cycle. LOADs with ``cols = 0`` write zero rows without the DMA. ``complete``
    pulses in the cycle the instruction's last row is written.
    """

    def __init__(self, config: AcceleratorConfig, *, jobs: int = 4):
        self.config = config
        self.jobs = jobs
        super().__init__({
            "issue": In(stream.Signature(INSTR_BITS)),
            "complete": Out(1),
            "cmd": Out(_cmd_sig(config)),
            "beats": In(_beat_sig(config)),
            "sp_write": Out(write_signature(config.sp_rows, _sp_row(config))),
            "acc_write": Out(acc_write_signature(config)),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        view = data.View(instruction_layout(Opcode.LOAD), self.issue.payload)
        job_layout = data.StructLayout({"mem": 1, "local": 20, "rows": 16, "dma": 1})
        m.submodules.jobs = jobs = fifo.SyncFIFOBuffered(width=job_layout.size, depth=self.jobs)
        is_acc = view.mem == int(Mem.ACC)
        row_bytes = Mux(is_acc, view.cols * ACC_BYTES, view.cols)
        needs_dma = (view.rows != 0) & (view.cols != 0)
        m.d.comb += [
            self.cmd.valid.eq(self.issue.valid & needs_dma & jobs.w_rdy),
            self.cmd.payload.addr.eq(view.dram),
            self.cmd.payload.rows.eq(view.rows),
            self.cmd.payload.row_bytes.eq(row_bytes),
            self.cmd.payload.stride.eq(view.stride),
            # needs_dma comes from the payload, which is undefined while valid is low (the
            # controller's queue FIFO output before its first word): gate ready with valid.
            self.issue.ready.eq(self.issue.valid & jobs.w_rdy & (~needs_dma | self.cmd.ready)),
            jobs.w_en.eq(self.issue.valid & self.issue.ready),
            jobs.w_data.eq(Cat(view.mem, view.local, view.rows, needs_dma)),
        ]

        job = data.View(job_layout, jobs.r_data)
        row = Signal(16)  # rows of the head job already written
        bus_bits = cfg.bus.data_bits
        bus_bytes = cfg.bus_bytes
        beats_max = -(-max_row_bytes(cfg) // bus_bytes)
        buf = Signal(beats_max * bus_bits)
        beat_index = Signal(range(beats_max + 1))
        pending = Signal()  # a full row waits in `out_row` to be written
        out_row = Signal(beats_max * bus_bits)
        out_addr = Signal(20)
        out_acc = Signal()
        out_last = Signal()

        wrote = Signal()
        m.d.comb += [
            self.sp_write.valid.eq(pending & ~out_acc),
            self.sp_write.addr.eq(out_addr),
            self.sp_write.data.eq(out_row[:cfg.sp_row_bytes * 8]),
            self.acc_write.valid.eq(pending & out_acc),
            self.acc_write.addr.eq(out_addr),
            self.acc_write.data.eq(out_row[:cfg.acc_row_bytes * 8]),
            wrote.eq(pending & Mux(out_acc, self.acc_write.ready, self.sp_write.ready)),
        ]
        with m.If(wrote):
            m.d.sync += pending.eq(0)
            m.d.comb += self.complete.eq(out_last)

        can_fill = ~pending | wrote
        # Jobs of zero rows finish at once; `cols = 0` jobs write zero rows locally.
        with m.If(jobs.r_rdy & (job.rows == 0) & ~(wrote & out_last)):  # one completion per cycle, in order
            m.d.comb += [jobs.r_en.eq(1), self.complete.eq(1)]
        last_row = row + 1 == job.rows
        with m.If(jobs.r_rdy & (job.rows != 0) & ~job.dma & can_fill):
            m.d.sync += [pending.eq(1), out_row.eq(0), out_addr.eq(job.local + row), out_acc.eq(job.mem),
                         out_last.eq(last_row), row.eq(Mux(last_row, 0, row + 1))]
            m.d.comb += jobs.r_en.eq(last_row)

        # Beats: lanes past the beat's byte count are zero, so each row is zero-filled.
        mask = Signal(bus_bits)
        for byte in range(bus_bytes):
            m.d.comb += mask[byte * 8:byte * 8 + 8].eq(Mux(byte < self.beats.payload.bytes, 0xFF, 0))
        masked = self.beats.payload.data & mask
        m.d.comb += self.beats.ready.eq(jobs.r_rdy & job.dma & (job.rows != 0) & can_fill)
        with m.If(self.beats.valid & self.beats.ready):
            with m.If(self.beats.payload.last):
                whole = Signal(beats_max * bus_bits)
                m.d.comb += whole.eq(buf)
                with m.Switch(beat_index):
                    for i in range(beats_max):
                        with m.Case(i):
                            m.d.comb += whole.word_select(i, bus_bits).eq(masked)
                m.d.sync += [pending.eq(1), out_row.eq(whole), out_addr.eq(job.local + row), out_acc.eq(job.mem),
                             out_last.eq(last_row), row.eq(Mux(last_row, 0, row + 1)), buf.eq(0), beat_index.eq(0)]
                m.d.comb += jobs.r_en.eq(last_row)
            with m.Else():
                with m.Switch(beat_index):
                    for i in range(beats_max):
                        with m.Case(i):
                            m.d.sync += buf.word_select(i, bus_bits).eq(masked)
                m.d.sync += beat_index.eq(beat_index + 1)
        return m


class StoreUnit(wiring.Component):
    """STORE: scratchpad or accumulator rows -> device memory.

    One STORE at a time: the DMA write command goes out first, rows are read (up to
    ``row_buffer`` ahead) and cut into bus beats, and ``complete`` pulses when the DMA
    reports the last write response. Throughput: one bus beat per cycle.
    """

    def __init__(self, config: AcceleratorConfig, *, row_buffer: int = 4):
        self.config = config
        self.row_buffer = row_buffer
        super().__init__({
            "issue": In(stream.Signature(INSTR_BITS)),
            "complete": Out(1),
            "error": Out(1),
            "cmd": Out(_cmd_sig(config)),
            "beats": Out(_beat_sig(config)),
            "done": In(stream.Signature(done_layout)),
            "sp_read": Out(read_signature(config.sp_rows, _sp_row(config))),
            "acc_read": Out(read_signature(config.acc_rows, _acc_row(config))),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        view = data.View(instruction_layout(Opcode.STORE), self.issue.payload)
        bus_bits, bus_bytes = cfg.bus.data_bits, cfg.bus_bytes
        beats_max = -(-max_row_bytes(cfg) // bus_bytes)
        row_bits = beats_max * bus_bits

        busy = Signal()
        acc = Signal()
        local = Signal(20)
        rows = Signal(16)
        beats_per_row = Signal(range(beats_max + 1))
        last_bytes = Signal(range(bus_bytes + 1))
        empty = (view.rows == 0) | (view.cols == 0)
        row_bytes = Mux(view.mem == int(Mem.ACC), view.cols * ACC_BYTES, view.cols)

        m.d.comb += [
            self.cmd.valid.eq(self.issue.valid & ~busy & ~empty),
            self.cmd.payload.addr.eq(view.dram),
            self.cmd.payload.rows.eq(view.rows),
            self.cmd.payload.row_bytes.eq(row_bytes),
            self.cmd.payload.stride.eq(view.stride),
            # `empty` decodes the payload, undefined while valid is low: gate ready with valid
            self.issue.ready.eq(self.issue.valid & ~busy & (empty | self.cmd.ready)),
        ]
        with m.If(self.issue.valid & self.issue.ready):
            with m.If(empty):
                m.d.comb += self.complete.eq(1)
            with m.Else():
                shift = bus_bytes.bit_length() - 1
                remainder = row_bytes & (bus_bytes - 1)
                m.d.sync += [busy.eq(1), acc.eq(view.mem == int(Mem.ACC)), local.eq(view.local), rows.eq(view.rows),
                             beats_per_row.eq((row_bytes + bus_bytes - 1) >> shift),
                             last_bytes.eq(Mux(remainder == 0, bus_bytes, remainder))]

        # Reads, at most `row_buffer` rows ahead of the beats.
        m.submodules.rowq = rowq = fifo.SyncFIFOBuffered(width=row_bits, depth=self.row_buffer)
        requested = Signal(16)
        in_flight = Signal(range(self.row_buffer + 2))
        space = Signal()
        m.d.comb += space.eq(rowq.level + in_flight < self.row_buffer)
        want = busy & (requested != rows) & space
        for port, is_acc_port in ((self.sp_read, False), (self.acc_read, True)):
            m.d.comb += [port.valid.eq(want & (acc == is_acc_port)), port.addr.eq(local + requested)]
        accepted = want & Mux(acc, self.acc_read.ready, self.sp_read.ready)
        returned = Mux(acc, self.acc_read.rvalid, self.sp_read.rvalid)
        with m.If(accepted):
            m.d.sync += requested.eq(requested + 1)
        m.d.sync += in_flight.eq(in_flight + accepted - returned)
        m.d.comb += [rowq.w_en.eq(returned & busy),
                     rowq.w_data.eq(Mux(acc, self.acc_read.rdata.as_value(), self.sp_read.rdata.as_value()))]

        # Beats.
        beat = Signal(range(beats_max + 1))
        sent_rows = Signal(16)
        last_beat = beat + 1 == beats_per_row
        m.d.comb += [
            self.beats.valid.eq(busy & rowq.r_rdy),
            self.beats.payload.data.eq(rowq.r_data.word_select(beat, bus_bits)),
            self.beats.payload.bytes.eq(Mux(last_beat, last_bytes, bus_bytes)),
            self.beats.payload.last.eq(last_beat),
        ]
        with m.If(self.beats.valid & self.beats.ready):
            with m.If(last_beat):
                m.d.comb += rowq.r_en.eq(1)
                m.d.sync += [beat.eq(0), sent_rows.eq(sent_rows + 1)]
            with m.Else():
                m.d.sync += beat.eq(beat + 1)

        m.d.comb += self.done.ready.eq(busy & (sent_rows == rows))
        with m.If(self.done.valid & self.done.ready):
            m.d.comb += [self.complete.eq(1), self.error.eq(self.done.payload.error)]
            m.d.sync += [busy.eq(0), requested.eq(0), sent_rows.eq(0)]
        return m


class MatmulUnit(wiring.Component):
    """PRELOAD and MATMUL on the systolic array.

    * MATMUL streams ``m`` scratchpad rows into the array at one row per cycle (read port
      ``a_read``, which must have the scratchpad's top priority); results go to the
      accumulator through ``acc_update`` ``array latency`` cycles later. The first row swaps
      in weights preloaded since the last MATMUL. The next MATMUL's rows follow the
      previous one's without a gap.
    * PRELOAD reads its tile through ``w_read`` (about 3 cycles per array row, overlapped
      with streaming) into the array's shadow weights; it starts once the previous
      preload's weights have been swapped in, and the array holds it for ``rows + cols``
      cycles after a swap.
    * ``complete`` pulses in issue order: a PRELOAD when its last weight row is written, a
      MATMUL when its last row reaches the accumulator.
    """

    def __init__(self, config: AcceleratorConfig, *, order_depth: int = 8):
        self.config = config
        self.order_depth = order_depth
        self.addr_bits = max(1, (config.acc_rows - 1).bit_length())
        self.tag_bits = self.addr_bits + 2  # accumulator row, accumulate, last row
        R, C = config.array.rows, config.array.cols
        super().__init__({
            "issue": In(stream.Signature(INSTR_BITS)),
            "complete": Out(1),
            "a_read": Out(read_signature(config.sp_rows, _sp_row(config))),
            "w_read": Out(read_signature(config.sp_rows, _sp_row(config))),
            "array_in": Out(array_input_signature(R, self.tag_bits)),
            "array_load": Out(array_load_signature(R, C)),
            "array_swap": Out(1),
            "array_out": In(wiring.Signature({"valid": Out(1), "data": Out(data.ArrayLayout(signed(32), C)),
                                              "tag": Out(self.tag_bits)})),
            "acc_update": Out(wiring.Signature({
                "valid": Out(1), "addr": Out(range(config.acc_rows)), "data": Out(_acc_row(config)),
                "accumulate": Out(1)})),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        R, C = cfg.array.rows, cfg.array.cols
        word = self.issue.payload
        opcode = word[:8]
        pre = data.View(instruction_layout(Opcode.PRELOAD), word)
        mm = data.View(instruction_layout(Opcode.MATMUL), word)

        m.submodules.order = order = fifo.SyncFIFOBuffered(width=1, depth=self.order_depth)  # 1 = MATMUL
        shadow_pending = Signal()  # preloaded weights not yet swapped in
        pre_busy = Signal()
        stream_busy = Signal()
        is_mm = opcode == int(Opcode.MATMUL)
        accept_pre = ~is_mm & ~pre_busy & ~shadow_pending
        last_read = Signal()
        accept_mm = is_mm & (~stream_busy | last_read) & ~pre_busy
        m.d.comb += [
            # is_mm decodes the payload, undefined while valid is low: gate ready with valid
            self.issue.ready.eq(self.issue.valid & order.w_rdy & Mux(is_mm, accept_mm, accept_pre)),
            order.w_en.eq(self.issue.valid & self.issue.ready),
            order.w_data.eq(is_mm),
        ]
        fire = self.issue.valid & self.issue.ready

        pre_done_now = Signal()
        swapped = Signal()

        # ------------------------------------------------------------ preloader
        sp_base = Signal(20)
        k = Signal(range(R + 1))
        n = Signal(range(C + 1))
        transpose = Signal()
        t = Signal(range(max(R, C) + 1))  # weight row (or, transposed, source row j)
        hold = Signal(data.ArrayLayout(signed(8), C))
        tbuf = [Signal(data.ArrayLayout(signed(8), R), name=f"tbuf_{j}") for j in range(C)]
        with m.If(fire & ~is_mm):
            m.d.sync += [pre_busy.eq(1), sp_base.eq(pre.sp), k.eq(pre.k), n.eq(pre.n), transpose.eq(pre.transpose),
                         t.eq(0)]
        with m.FSM(name="preload"):
            with m.State("IDLE"):
                with m.If(fire & ~is_mm):
                    with m.If(pre.transpose):
                        m.next = "T_READ"
                    with m.Else():
                        m.next = "READ"
            # -- straight: read row t (t < k), then write array row t; rows >= k are zero
            with m.State("READ"):
                with m.If(t >= k):
                    m.d.sync += hold.eq(0)
                    m.next = "WRITE"
                with m.Else():
                    m.d.comb += [self.w_read.valid.eq(1), self.w_read.addr.eq(sp_base + t)]
                    with m.If(self.w_read.ready):
                        m.next = "WAIT"
            with m.State("WAIT"):
                with m.If(self.w_read.rvalid):
                    m.d.sync += hold.eq(self.w_read.rdata.as_value()[:C * 8])
                    m.next = "WRITE"
            with m.State("WRITE"):
                m.d.comb += [self.array_load.valid.eq(1), self.array_load.row.eq(t), self.array_load.k.eq(k),
                             self.array_load.n.eq(n), self.array_load.data.eq(hold)]
                with m.If(self.array_load.ready):
                    with m.If(t == R - 1):
                        m.d.comb += pre_done_now.eq(1)
                        m.d.sync += [pre_busy.eq(0), shadow_pending.eq(1), t.eq(0)]
                        m.next = "IDLE"
                    with m.Else():
                        m.d.sync += t.eq(t + 1)
                        m.next = "READ"
            # -- transposed: read rows j < n into tbuf, then write array rows from columns
            with m.State("T_READ"):
                with m.If(t >= n):
                    m.d.sync += t.eq(0)
                    m.next = "T_WRITE"
                with m.Else():
                    m.d.comb += [self.w_read.valid.eq(1), self.w_read.addr.eq(sp_base + t)]
                    with m.If(self.w_read.ready):
                        m.next = "T_WAIT"
            with m.State("T_WAIT"):
                with m.If(self.w_read.rvalid):
                    with m.Switch(t):
                        for j in range(C):
                            with m.Case(j):
                                m.d.sync += tbuf[j].eq(self.w_read.rdata.as_value()[:R * 8])
                    m.d.sync += t.eq(t + 1)
                    m.next = "T_READ"
            with m.State("T_WRITE"):
                column = Signal(data.ArrayLayout(signed(8), C))
                with m.Switch(t):
                    for row in range(R):
                        with m.Case(row):
                            m.d.comb += [column[j].eq(Mux(j < n, tbuf[j][row], 0)) for j in range(C)]
                m.d.comb += [self.array_load.valid.eq(1), self.array_load.row.eq(t), self.array_load.k.eq(k),
                             self.array_load.n.eq(n), self.array_load.data.eq(column)]
                with m.If(self.array_load.ready):
                    with m.If(t == R - 1):
                        m.d.comb += pre_done_now.eq(1)
                        m.d.sync += [pre_busy.eq(0), shadow_pending.eq(1), t.eq(0)]
                        m.next = "IDLE"
                    with m.Else():
                        m.d.sync += t.eq(t + 1)

        # ------------------------------------------------------------ streamer
        a_base = Signal(20)
        acc_base = Signal(20)
        rows_left = Signal(16)
        index = Signal(16)
        kk = Signal(range(R + 1))
        accumulate = Signal()
        first = Signal()
        m.d.comb += [self.a_read.valid.eq(stream_busy), self.a_read.addr.eq(a_base + index)]
        # The read's data arrives next cycle; its row, flags and swap ride in registers.
        rd_valid = Signal()
        rd_tag = Signal(self.tag_bits)
        rd_k = Signal(range(R + 1))
        rd_swap = Signal()
        issued = stream_busy & self.a_read.ready
        m.d.comb += last_read.eq(issued & (rows_left == 1))
        m.d.sync += rd_valid.eq(issued)
        with m.If(issued):
            last = rows_left == 1
            m.d.sync += [
                rd_tag.eq(Cat((acc_base + index)[:self.addr_bits], accumulate, last)),
                rd_k.eq(kk),
                rd_swap.eq(first & shadow_pending),
                first.eq(0),
                index.eq(index + 1),
                rows_left.eq(rows_left - 1),
            ]
            with m.If(last):
                m.d.sync += stream_busy.eq(0)
        # After the streaming block, so a MATMUL accepted in its predecessor's last read
        # cycle overrides that block's updates: consecutive MATMULs stream with no gap.
        zero_rows_done = Signal()
        with m.If(fire & is_mm):
            with m.If(mm.m == 0):
                m.d.comb += zero_rows_done.eq(1)
            with m.Else():
                m.d.sync += [stream_busy.eq(1), a_base.eq(mm.a), acc_base.eq(mm.acc), rows_left.eq(mm.m),
                             index.eq(0), kk.eq(mm.k), accumulate.eq(mm.accumulate), first.eq(1)]
        m.d.comb += [
            self.array_in.valid.eq(rd_valid),
            self.array_in.data.eq(self.a_read.rdata.as_value()[:R * 8]),
            self.array_in.k.eq(rd_k),
            self.array_in.tag.eq(rd_tag),
            self.array_swap.eq(rd_valid & rd_swap),
            swapped.eq(rd_valid & rd_swap),
        ]
        with m.If(swapped):
            m.d.sync += shadow_pending.eq(0)

        # ------------------------------------------------------------ results
        out_tag = self.array_out.tag
        m.d.comb += [
            self.acc_update.valid.eq(self.array_out.valid),
            self.acc_update.addr.eq(out_tag[:self.addr_bits]),
            self.acc_update.data.eq(self.array_out.data),
            self.acc_update.accumulate.eq(out_tag[self.addr_bits]),
        ]
        out_last = Signal()
        m.d.comb += out_last.eq(self.array_out.valid & out_tag[self.addr_bits + 1])

        # ------------------------------------------------------------ in-order completion
        mm_done = Signal(range(self.order_depth + 2))
        pre_done = Signal(range(self.order_depth + 2))
        head_mm = order.r_data[0]
        mm_avail = (mm_done != 0) | out_last | zero_rows_done
        pre_avail = (pre_done != 0) | pre_done_now
        retire = order.r_rdy & Mux(head_mm, mm_avail, pre_avail)
        m.d.comb += [order.r_en.eq(retire), self.complete.eq(retire)]
        m.d.sync += [
            mm_done.eq(mm_done + out_last + zero_rows_done - (retire & head_mm)),
            pre_done.eq(pre_done + pre_done_now - (retire & ~head_mm)),
        ]
        return m


class VectorUnit(wiring.Component):
    """REQUANT: accumulator rows -> int8 scratchpad rows through the requantizer.

    Reads the two parameter rows, then one accumulator row every ``cols / lanes`` cycles;
    each row passes the requantizer ``cols / lanes`` beats at a time and is written to the
    scratchpad (elements past ``cols`` zero) when its last beat comes out. Latency from a
    row's read to its write: ``requantizer latency + 2`` cycles. ``sp_write`` must have the
    scratchpad's top write priority (it is never held). ``complete`` pulses when the last
    row is written.
    """

    def __init__(self, config: AcceleratorConfig):
        self.config = config
        self.lanes = config.vector.lanes
        self.beats = config.array.cols // self.lanes
        self.row_bits = max(1, (config.sp_rows - 1).bit_length())
        self.tag_bits = max(1, (self.beats - 1).bit_length()) + self.row_bits + 2
        super().__init__({
            "issue": In(stream.Signature(INSTR_BITS)),
            "complete": Out(1),
            "error": Out(1),
            "acc_read": Out(read_signature(config.acc_rows, _acc_row(config))),
            "sp_read": Out(read_signature(config.sp_rows, _sp_row(config))),
            "sp_write": Out(write_signature(config.sp_rows, _sp_row(config))),
            "acc_write": Out(acc_write_signature(config)),
            "rq_in": Out(requant_input_signature(self.lanes, self.tag_bits)),
            "rq_out": In(requant_output_signature(self.lanes, self.tag_bits)),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        C, L, NB = cfg.array.cols, self.lanes, self.beats
        view = data.View(instruction_layout(Opcode.REQUANT), self.issue.payload)
        beat_bits = max(1, (NB - 1).bit_length())

        # VBIN / VMAP / VROW go to the row engine; REQUANT to the path below. One instruction
        # at a time across both, so completions stay in issue order.
        m.submodules.rows = eng = RowEngine(cfg)
        is_rq = self.issue.payload[:8] == int(Opcode.REQUANT)
        rq_valid, rq_ready, rq_complete = Signal(), Signal(), Signal()
        rq_acc_valid, rq_acc_addr = Signal(), Signal(range(cfg.acc_rows))
        rq_sp_valid, rq_sp_addr, rq_sp_data = Signal(), Signal(range(cfg.sp_rows)), Signal(_sp_row(cfg))

        busy = Signal()
        src = Signal(20)
        dst = Signal(20)
        param = Signal(20)
        rows = Signal(16)
        relu = Signal()
        bias = Signal(_acc_row(cfg))
        scale = Signal(_acc_row(cfg))
        m.d.comb += [
            rq_valid.eq(self.issue.valid & is_rq & ~eng.busy),
            rq_ready.eq(~busy & ~eng.busy),
            eng.issue.valid.eq(self.issue.valid & ~is_rq & ~busy),
            eng.issue.payload.eq(self.issue.payload),
            # gated by valid: `is_rq` decodes the payload, undefined while nothing is offered
            self.issue.ready.eq(self.issue.valid & Mux(is_rq, rq_ready, eng.issue.ready & ~busy)),
            self.complete.eq(rq_complete | eng.complete),
            self.error.eq(eng.error),
            self.acc_read.valid.eq(rq_acc_valid | eng.acc_read.valid),
            self.acc_read.addr.eq(Mux(eng.busy, eng.acc_read.addr, rq_acc_addr)),
            eng.acc_read.ready.eq(self.acc_read.ready),
            eng.acc_read.rvalid.eq(self.acc_read.rvalid),
            eng.acc_read.rdata.eq(self.acc_read.rdata),
            self.sp_read.valid.eq(eng.sp_read.valid),
            self.sp_read.addr.eq(eng.sp_read.addr),
            eng.sp_read.ready.eq(self.sp_read.ready),
            eng.sp_read.rvalid.eq(self.sp_read.rvalid),
            eng.sp_read.rdata.eq(self.sp_read.rdata),
            self.sp_write.valid.eq(rq_sp_valid | eng.sp_write.valid),
            self.sp_write.addr.eq(Mux(eng.sp_write.valid, eng.sp_write.addr, rq_sp_addr)),
            self.sp_write.data.eq(Mux(eng.sp_write.valid, eng.sp_write.data, rq_sp_data)),
            eng.sp_write.ready.eq(self.sp_write.ready),
            self.acc_write.valid.eq(eng.acc_write.valid),
            self.acc_write.addr.eq(eng.acc_write.addr),
            self.acc_write.data.eq(eng.acc_write.data),
            eng.acc_write.ready.eq(self.acc_write.ready),
        ]
        with m.If(rq_valid & rq_ready):
            with m.If(view.rows == 0):
                m.d.comb += rq_complete.eq(1)
            with m.Else():
                m.d.sync += [busy.eq(1), src.eq(view.src), dst.eq(view.dst), param.eq(view.param),
                             rows.eq(view.rows), relu.eq(view.relu)]

        requested = Signal(16)
        gap = Signal(range(NB + 1))  # cycles until the next row read may go out
        row_beat = Signal(range(NB + 1))
        have_row = Signal()
        row_reg = Signal(_acc_row(cfg))
        row_index = Signal(16)
        with m.FSM(name="vector"):
            with m.State("IDLE"):
                with m.If(rq_valid & rq_ready & (view.rows != 0)):
                    m.next = "BIAS"
            with m.State("BIAS"):
                m.d.comb += [rq_acc_valid.eq(1), rq_acc_addr.eq(param)]
                with m.If(self.acc_read.ready):
                    m.next = "SCALE"
            with m.State("SCALE"):
                m.d.comb += [rq_acc_valid.eq(1), rq_acc_addr.eq(param + 1)]
                with m.If(self.acc_read.rvalid):
                    m.d.sync += bias.eq(self.acc_read.rdata)
                with m.If(self.acc_read.ready):
                    m.next = "FIRST"
            with m.State("FIRST"):
                with m.If(self.acc_read.rvalid):
                    m.d.sync += scale.eq(self.acc_read.rdata)
                m.next = "ROWS"
            with m.State("ROWS"):
                can_read = (requested != rows) & (gap == 0)
                m.d.comb += [rq_acc_valid.eq(can_read), rq_acc_addr.eq(src + requested)]
                with m.If(can_read & self.acc_read.ready):
                    m.d.sync += [requested.eq(requested + 1), gap.eq(NB - 1)]
                with m.Elif(gap != 0):
                    m.d.sync += gap.eq(gap - 1)
                with m.If(rq_complete):
                    m.d.sync += [busy.eq(0), requested.eq(0), gap.eq(0), row_index.eq(0)]
                    m.next = "IDLE"

        # Feed beats: beat 0 straight from the read data, later beats from row_reg.
        rdata_row = self.acc_read.rdata
        in_rows = self.acc_read.rvalid & busy  # data of a row read (params are read before ROWS)
        feeding = Signal()
        beat = Signal(range(NB + 1))
        source = Signal(_acc_row(cfg))
        m.d.comb += feeding.eq(have_row | (in_rows & ~have_row))
        with m.If(have_row):
            m.d.comb += [source.eq(row_reg), beat.eq(row_beat)]
        with m.Else():
            m.d.comb += [source.eq(rdata_row), beat.eq(0)]
        row_done = beat == NB - 1
        # A row's read data only counts once the parameters are in (state ROWS, FIRST's read ignored).
        rows_phase = Signal()
        m.d.comb += rows_phase.eq(requested != 0)
        active = feeding & rows_phase
        start_row = in_rows & rows_phase & ~have_row if NB > 1 else Const(0)
        with m.If(start_row):
            m.d.sync += [row_reg.eq(rdata_row), have_row.eq(1), row_beat.eq(1)]
        with m.Elif(have_row):
            with m.If(row_done):
                m.d.sync += have_row.eq(0)
                with m.If(in_rows):  # next row arrives exactly as this one ends
                    m.d.sync += [row_reg.eq(rdata_row), have_row.eq(1), row_beat.eq(1)]
            with m.Else():
                m.d.sync += row_beat.eq(row_beat + 1)
        last_row = row_index + 1 == rows
        with m.If(active & row_done):
            m.d.sync += row_index.eq(row_index + 1)
        for lane in range(L):
            m.d.comb += [
                self.rq_in.x[lane].eq(source.as_value().word_select(beat * L + lane, 32)),
                self.rq_in.bias[lane].eq(bias.as_value().word_select(beat * L + lane, 32)),
                self.rq_in.scale[lane].eq(scale.as_value().word_select(beat * L + lane, 32)),
            ]
        m.d.comb += [
            self.rq_in.valid.eq(active),
            self.rq_in.relu.eq(relu),
            self.rq_in.tag.eq(Cat(beat[:beat_bits], (dst + row_index)[:self.row_bits], row_done, last_row & row_done)),
        ]

        # Collect requantized beats into a row; write it when its last beat arrives.
        out = Signal(C * 8)
        otag = self.rq_out.tag
        obeat = otag[:beat_bits]
        oaddr = otag[beat_bits:beat_bits + self.row_bits]
        orow_done = otag[beat_bits + self.row_bits]
        olast = otag[beat_bits + self.row_bits + 1]
        full = Signal(C * 8)
        m.d.comb += full.eq(out)
        with m.Switch(obeat if NB > 1 else 0):
            for b in range(NB):
                with m.Case(b):
                    m.d.comb += full.word_select(b, L * 8).eq(self.rq_out.y)
        with m.If(self.rq_out.valid):
            m.d.sync += out.eq(full)
        write = self.rq_out.valid & orow_done
        m.d.comb += [
            rq_sp_valid.eq(write),
            rq_sp_addr.eq(oaddr),
            rq_sp_data.eq(Cat(full, Const(0, (cfg.sp_row_elems - C) * 8)) if cfg.sp_row_elems > C else full),
        ]
        with m.If(write & olast):
            m.d.comb += rq_complete.eq(1)
        return m
