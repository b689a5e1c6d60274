"""DMA engine: 2-D strided copies between device memory (AXI4 master) and row streams.

One :class:`DMA` has an independent read side and write side sharing one AXI4 master
port (``data_bits`` = ``config.bus.data_bits``; B = ``data_bits // 8`` bytes per beat).

Commands (both sides, :data:`cmd_layout`)::

    addr       32 bits  device-memory byte address of row 0 (any alignment)
    rows       16 bits  number of rows (0: nothing is moved)
    row_bytes   9 bits  bytes per row, 1..max_row_bytes (0: nothing is moved)
    stride     24 bits  bytes between the starts of consecutive rows (0 repeats a row;
                        on reads it may be smaller than row_bytes: rows overlap)

Row r covers device bytes ``[addr + r*stride, addr + r*stride + row_bytes)`` (addresses wrap
modulo 2**32).

Row beats (``rd_data`` out, ``wr_data`` in, :func:`beat_layout`)::

    data   B bytes   the row's bytes k*B .. k*B+B-1 in lanes 0..B-1 (lane 0 = low byte)
    bytes  0..B      valid bytes in this beat (from lane 0); B except in a row's last beat
    last   1         last beat of the row

A row of ``n`` bytes is ``ceil(n / B)`` beats, realigned to lane 0 whatever the device
address's alignment (a byte shifter on each side).

Read side
---------
``rd_cmd`` -> row walker (one row descriptor per cycle) -> AR issue -> R FIFO ->
realigner -> ``rd_data``. Each row is one INCR burst, or two when it crosses a 4 KiB
boundary; bursts are beat-aligned (``araddr`` is a multiple of B, ``arsize`` = log2 B) and
never longer than ``ceil((max_row_bytes + B - 1) / B)`` <= 256 beats. An AR is issued only
when the R FIFO (``read_fifo_depth`` beats) has room reserved for every beat of it, and at
most ``max_outstanding`` ARs are in flight, so ``rready`` is always high and backpressure
on ``rd_data`` never stalls the bus. Rows come out in order. A read with an error response
(SLVERR/DECERR) still delivers its (undefined) data and sets the sticky ``rd_error``.
A new read command is accepted as soon as the walker has issued the previous command's
last row descriptor, so consecutive commands overlap.

Write side
----------
``wr_cmd`` -> row walker -> two queues: AW queue -> AW issue (one or two INCR bursts per
row, same rules), and W queue -> W beats built from ``wr_data`` (shifted to the device
alignment, WSTRB masking the bytes before the row's start and after its end); B responses
are counted. ``wr_data`` must carry
exactly ``ceil(row_bytes / B)`` beats per row; the DMA counts beats from the command and
does not look at ``bytes`` or ``last``. ``wvalid`` follows ``wr_data.valid`` combinationally
(and ``wr_data.ready`` follows ``wready``), so ``wr_data`` must keep the stream rule that
``valid`` stays high, with a stable payload, until ``ready``. The W side never waits for an AW handshake (AXI
allows a slave to wait for WVALID before AWREADY), so write data may lead its address by up
to the W descriptor FIFO's depth (``2 * max_outstanding`` rows); the AW queue holds 4
rows, so the row walker keeps feeding W while the slave holds AWREADY low. At most ``max_outstanding`` AW bursts wait
for their B. One write command runs at a time: when all its B responses are in,
``wr_done`` carries one token whose ``error`` bit is set when any B of the command was
SLVERR/DECERR (the sticky ``wr_error`` is set as well); the next command is accepted after
``wr_done`` is taken. ``rows == 0`` or ``row_bytes == 0`` gives a ``wr_done`` token
without bus traffic.

Latency and throughput
----------------------
* Read: ``rd_cmd`` accepted in cycle 0, row descriptor in cycle 1, first AR valid in
  cycle 2 (when credits allow); the first ``rd_data`` beat comes 2 cycles after the R beat
  that completes it reaches the DMA (FIFO write + buffered read), i.e. about
  ``memory latency + 4`` cycles after the command.
* Read steady state: one R beat per cycle enters the FIFO and one beat per cycle leaves
  the realigner, so the bus runs at one beat per cycle when the memory keeps up and the
  credits (``read_fifo_depth``) cover the memory's latency. The realigner needs one cycle
  per bus beat, plus one extra cycle for a row whose device start is unaligned and whose
  bytes fit in as many bus beats as output beats (``ceil((o + n) / B) == ceil(n / B)``
  with ``o = addr % B != 0``).
* Write: AW valid 2 cycles after ``wr_cmd`` is accepted, the row's first W beat 2 cycles
  later (W descriptor FIFO); W then moves one beat per cycle (``ceil((o + n) / B)``
  beats per row) while ``wr_data`` and ``wready`` allow. ``wr_done`` is valid one cycle
  after the last B response.
* Row walker: one row descriptor per cycle, so rows of one beat issue one AR/AW per cycle.

Performance counters: ``bytes_read`` (row bytes delivered on ``rd_data``) and
``bytes_written`` (row bytes written, counted when a row's last W beat is accepted) are
64-bit running totals, cleared only by reset.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, unsigned
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from .axi import AXI_BOUNDARY, AXI_MAX_BURST, AXI4Signature, Burst
from .config import AcceleratorConfig

__all__ = ["DMA", "cmd_layout", "beat_layout", "done_layout", "max_burst_beats", "default_read_fifo_depth"]

ADDR_BITS = 32
ROWS_BITS = 16
STRIDE_BITS = 24
PAGE_BITS = 12  # log2(AXI_BOUNDARY)
assert 1 << PAGE_BITS == AXI_BOUNDARY


def cmd_layout(max_row_bytes: int = 256) -> data.StructLayout:
    """Command payload: ``addr`` (32), ``rows`` (16), ``row_bytes`` (bits for max_row_bytes), ``stride`` (24)."""
    return data.StructLayout({
        "addr": unsigned(ADDR_BITS),
        "rows": unsigned(ROWS_BITS),
        "row_bytes": unsigned(max_row_bytes.bit_length()),
        "stride": unsigned(STRIDE_BITS),
    })


def beat_layout(data_bits: int) -> data.StructLayout:
    """Row beat payload: ``data`` (data_bits), ``bytes`` (0..B), ``last`` (1)."""
    return data.StructLayout({
        "data": unsigned(data_bits),
        "bytes": unsigned((data_bits // 8).bit_length()),
        "last": unsigned(1),
    })


#: Write completion payload.
done_layout = data.StructLayout({"error": unsigned(1)})


def max_burst_beats(data_bits: int, max_row_bytes: int) -> int:
    """Most beats one row (hence one burst) can take: an unaligned start adds one beat."""
    b = data_bits // 8
    return -(-(max_row_bytes + b - 1) // b)


def default_read_fifo_depth(data_bits: int, max_row_bytes: int) -> int:
    """R FIFO depth used when none is given: 64 beats, or one maximal burst rounded up to a power of two."""
    return max(64, _next_pow2(max_burst_beats(data_bits, max_row_bytes)))


def _check_int(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value} is outside {lo}..{hi}")
    return value


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


class _RowWalker(wiring.Component):
    """Turns a command into one registered row descriptor per cycle (burst split precomputed)."""

    def __init__(self, data_bits: int, max_row_bytes: int):
        self.b = data_bits // 8
        self.lgb = self.b.bit_length() - 1
        beat_bits = PAGE_BITS - self.lgb + 1  # beats in one page, plus one
        self.desc_layout = data.StructLayout({
            "addr0": unsigned(ADDR_BITS),  # first burst, beat-aligned
            "addr1": unsigned(ADDR_BITS),  # second burst (page-aligned), when cross
            "len0": unsigned(beat_bits),   # beats of the first burst
            "len1": unsigned(beat_bits),   # beats of the second burst
            "cross": unsigned(1),
            "nbeats": unsigned(beat_bits),  # bus beats of the row (len0 + len1 when cross)
            "nrow": unsigned(beat_bits),    # row-stream beats: ceil(n / B)
            "offset": unsigned(self.lgb),
            "n": unsigned(max_row_bytes.bit_length()),
            "strb_first": unsigned(self.b),
            "strb_last": unsigned(self.b),
        })
        super().__init__({
            "cmd": In(stream.Signature(cmd_layout(max_row_bytes))),
            "desc": Out(stream.Signature(self.desc_layout)),
            "active": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        b, lgb = self.b, self.lgb
        addr = Signal(ADDR_BITS)
        rows_left = Signal(ROWS_BITS)
        n = Signal.like(self.cmd.payload.row_bytes)
        stride = Signal(STRIDE_BITS)
        active = self.active

        m.d.comb += self.cmd.ready.eq(~active)
        with m.If(self.cmd.valid & self.cmd.ready):
            p = self.cmd.payload
            m.d.sync += [
                active.eq((p.rows != 0) & (p.row_bytes != 0)),
                addr.eq(p.addr), rows_left.eq(p.rows), n.eq(p.row_bytes), stride.eq(p.stride),
            ]

        end = Signal(ADDR_BITS)
        m.d.comb += end.eq(addr + n - 1)
        s_beat = addr[lgb:PAGE_BITS]
        e_beat = end[lgb:PAGE_BITS]
        cross = addr[PAGE_BITS:] != end[PAGE_BITS:]
        page_beats = 1 << (PAGE_BITS - lgb)
        len0 = Mux(cross, page_beats - s_beat, e_beat - s_beat + 1)
        len1 = e_beat + 1
        all_ones = (1 << b) - 1
        o = addr[:lgb]
        d = Signal(self.desc_layout)
        m.d.comb += [
            d.addr0.eq(Cat(Const(0, lgb), addr[lgb:])),
            d.addr1.eq(Cat(Const(0, PAGE_BITS), end[PAGE_BITS:])),
            d.len0.eq(len0),
            d.len1.eq(len1),
            d.cross.eq(cross),
            d.nbeats.eq(Mux(cross, len0 + len1, len0)),
            d.nrow.eq((n + (b - 1)) >> lgb),
            d.offset.eq(o),
            d.n.eq(n),
            d.strb_first.eq(all_ones & ~((Const(1, b + 1) << o) - 1)),
            d.strb_last.eq(((Const(1, b + 1) << (end[:lgb] + 1)) - 1)[:b]),
        ]

        with m.If(~self.desc.valid | self.desc.ready):
            m.d.sync += self.desc.valid.eq(active)
            with m.If(active):
                m.d.sync += [
                    self.desc.payload.eq(d),
                    addr.eq(addr + stride),
                    rows_left.eq(rows_left - 1),
                ]
                with m.If(rows_left == 1):
                    m.d.sync += active.eq(0)
        return m


class DMA(wiring.Component):
    """AXI4 DMA engine (see the module docstring for the protocol, latency and throughput).

    Parameters
    ----------
    data_bits : AXI data width (power of two, 32..1024).
    addr_bits : AXI address width (32 or 64); command addresses are 32 bits, zero-extended.
    max_row_bytes : largest ``row_bytes`` (1..1024); sets the field width and burst length.
    max_outstanding : AR bursts in flight, and AW bursts waiting for B (1..64).
    read_fifo_depth : R FIFO depth in beats; default ``max(64, next_pow2(max burst))``.
        Must hold at least one maximal burst.

    Ports
    -----
    axi : ``Out(AXI4Signature)``, master.
    rd_cmd, wr_cmd : ``In(stream.Signature(cmd_layout))``.
    rd_data : ``Out(stream.Signature(beat_layout))``; wr_data : ``In(...)`` of the same.
    wr_done : ``Out(stream.Signature(done_layout))``.
    rd_error, wr_error : sticky error flags (until reset).
    rd_busy, wr_busy : a command is in progress on that side.
    bytes_read, bytes_written : 64-bit running totals.
    """

    def __init__(self, *, data_bits: int = 32, addr_bits: int = 32, max_row_bytes: int = 256,
                 max_outstanding: int = 8, read_fifo_depth: int | None = None):
        try:
            read_fifo_depth, burst = self._check_args(data_bits, addr_bits, max_row_bytes, max_outstanding,
                                                      read_fifo_depth)
        except ValueError:
            self._MustUse__used = True  # a rejected component is not an unused one (no warning)
            raise
        self.data_bits = data_bits
        self.addr_bits = addr_bits
        self.max_row_bytes = max_row_bytes
        self.max_outstanding = max_outstanding
        self.read_fifo_depth = read_fifo_depth
        self.bus_bytes = data_bits // 8
        self.max_burst = burst
        beats = beat_layout(data_bits)
        cmds = cmd_layout(max_row_bytes)
        super().__init__({
            "axi": Out(AXI4Signature(addr_width=addr_bits, data_width=data_bits)),
            "rd_cmd": In(stream.Signature(cmds)),
            "rd_data": Out(stream.Signature(beats)),
            "wr_cmd": In(stream.Signature(cmds)),
            "wr_data": In(stream.Signature(beats)),
            "wr_done": Out(stream.Signature(done_layout)),
            "rd_error": Out(1),
            "wr_error": Out(1),
            "rd_busy": Out(1),
            "wr_busy": Out(1),
            "bytes_read": Out(64),
            "bytes_written": Out(64),
        })

    @staticmethod
    def _check_args(data_bits, addr_bits, max_row_bytes, max_outstanding, read_fifo_depth) -> tuple[int, int]:
        _check_int("data_bits", data_bits, 32, 1024)
        if data_bits & (data_bits - 1):
            raise ValueError(f"data_bits={data_bits} is not a power of two")
        if addr_bits not in (32, 64):
            raise ValueError(f"addr_bits={addr_bits} is not 32 or 64")
        _check_int("max_row_bytes", max_row_bytes, 1, 1024)
        _check_int("max_outstanding", max_outstanding, 1, 64)
        burst = max_burst_beats(data_bits, max_row_bytes)
        if burst > AXI_MAX_BURST:
            raise ValueError(f"max_row_bytes={max_row_bytes} needs bursts of {burst} beats on a "
                             f"{data_bits}-bit bus; AXI4 allows at most {AXI_MAX_BURST}")
        if read_fifo_depth is None:
            read_fifo_depth = default_read_fifo_depth(data_bits, max_row_bytes)
        _check_int("read_fifo_depth", read_fifo_depth, 2, 4096)
        if read_fifo_depth < burst:
            raise ValueError(f"read_fifo_depth={read_fifo_depth} cannot hold one burst of {burst} beats "
                             f"(max_row_bytes={max_row_bytes}, data_bits={data_bits})")
        return read_fifo_depth, burst

    @classmethod
    def from_config(cls, config: AcceleratorConfig, **kwargs) -> "DMA":
        if not isinstance(config, AcceleratorConfig):
            raise ValueError(f"from_config needs an AcceleratorConfig, got {type(config).__name__}")
        return cls(data_bits=config.bus.data_bits, addr_bits=config.bus.addr_bits, **kwargs)

    # ------------------------------------------------------------------ read side
    def _read_side(self, m: Module) -> None:
        b, lgb = self.bus_bytes, self.bus_bytes.bit_length() - 1
        axi = self.axi
        m.submodules.rd_walker = walker = _RowWalker(self.data_bits, self.max_row_bytes)
        wiring.connect(m, wiring.flipped(self.rd_cmd), walker.cmd)
        desc = walker.desc

        info_layout = data.StructLayout({
            "offset": unsigned(lgb),
            "n": walker.desc_layout["n"].shape,
            "nin": walker.desc_layout["nbeats"].shape,
        })
        m.submodules.rd_info = info = fifo.SyncFIFOBuffered(width=info_layout.size,
                                                            depth=max(4, 2 * self.max_outstanding))
        m.submodules.rd_fifo = rfifo = fifo.SyncFIFOBuffered(width=self.data_bits + 2, depth=self.read_fifo_depth)

        # ---- AR issue: credits reserve FIFO space for every beat requested
        depth = self.read_fifo_depth
        reserved = Signal(range(depth + 1))
        outstanding = Signal(range(self.max_outstanding + 1))
        phase = Signal()  # 1: the row's second (post-4 KiB) burst
        p = desc.payload
        blen = Signal.like(p.len0)
        m.d.comb += blen.eq(Mux(phase, p.len1, p.len0))
        m.d.comb += [
            axi.arvalid.eq(desc.valid & (reserved + blen <= depth) & (outstanding < self.max_outstanding)
                           & (phase | info.w_rdy)),
            axi.araddr.eq(Mux(phase, p.addr1, p.addr0)),
            axi.arlen.eq(blen - 1),
            axi.arsize.eq(lgb),
            axi.arburst.eq(Burst.INCR),
            axi.arid.eq(0),
            axi.arcache.eq(0b0011),  # normal, non-cacheable, bufferable
            axi.arprot.eq(0),
            axi.arlock.eq(0),
        ]
        ar_fire = axi.arvalid & axi.arready
        info_in = Signal(info_layout)
        m.d.comb += [
            info_in.offset.eq(p.offset), info_in.n.eq(p.n), info_in.nin.eq(p.nbeats),
            info.w_data.eq(info_in),
            info.w_en.eq(ar_fire & ~phase),
        ]
        with m.If(ar_fire):
            with m.If(p.cross & ~phase):
                m.d.sync += phase.eq(1)
            with m.Else():
                m.d.sync += phase.eq(0)
                m.d.comb += desc.ready.eq(1)

        # ---- R into the FIFO (never full: credits)
        r_fire = axi.rvalid & axi.rready
        m.d.comb += [
            axi.rready.eq(rfifo.w_rdy),
            rfifo.w_data.eq(Cat(axi.rdata, axi.rresp)),
            rfifo.w_en.eq(axi.rvalid),
        ]
        with m.If(r_fire & axi.rresp[1]):
            m.d.sync += self.rd_error.eq(1)
        last_in = r_fire & axi.rlast
        m.d.sync += outstanding.eq(outstanding + ar_fire - last_in)
        pop = rfifo.r_en & rfifo.r_rdy
        m.d.sync += reserved.eq(reserved + Mux(ar_fire, blen, 0) - pop)

        # ---- realigner: row bytes to lane 0
        d = Signal(info_layout)
        m.d.comb += d.eq(info.r_data)
        dv = info.r_rdy
        cur = rfifo.r_data[:self.data_bits]
        cv = rfifo.r_rdy
        hold = Signal(self.data_bits)
        primed = Signal()
        in_idx = Signal.like(d.nin)
        out_idx = Signal.like(d.nin)
        remaining = Signal(range(self.max_row_bytes + 1))
        m.d.comb += remaining.eq(d.n - (out_idx << lgb))
        is_last = remaining <= b
        need_prime = (d.offset != 0) & ~primed
        need_pop = in_idx < d.nin
        out = self.rd_data
        window = Cat(hold, cur) >> (d.offset * 8)
        m.d.comb += [
            out.payload.data.eq(Mux(d.offset == 0, cur, window[:self.data_bits])),
            out.payload.bytes.eq(Mux(is_last, remaining, b)),
            out.payload.last.eq(is_last),
        ]
        with m.If(dv):
            with m.If(need_prime):
                m.d.comb += rfifo.r_en.eq(1)
                with m.If(cv):
                    m.d.sync += [hold.eq(cur), primed.eq(1), in_idx.eq(1)]
            with m.Else():
                m.d.comb += out.valid.eq(~need_pop | cv)
                with m.If(out.valid & out.ready):
                    m.d.comb += rfifo.r_en.eq(need_pop)
                    with m.If(need_pop):
                        m.d.sync += [hold.eq(cur), in_idx.eq(in_idx + 1)]
                    m.d.sync += out_idx.eq(out_idx + 1)
                    with m.If(is_last):
                        m.d.comb += info.r_en.eq(1)
                        m.d.sync += [out_idx.eq(0), in_idx.eq(0), primed.eq(0)]
        with m.If(out.valid & out.ready):
            m.d.sync += self.bytes_read.eq(self.bytes_read + out.payload.bytes)
        m.d.comb += self.rd_busy.eq(walker.active | desc.valid | (info.level != 0) | (outstanding != 0)
                                    | (rfifo.level != 0))

    # ------------------------------------------------------------------ write side
    def _write_side(self, m: Module) -> None:
        b, lgb = self.bus_bytes, self.bus_bytes.bit_length() - 1
        axi = self.axi
        m.submodules.wr_walker = walker = _RowWalker(self.data_bits, self.max_row_bytes)
        desc = walker.desc
        p = desc.payload

        # one command at a time: accept, run, report on wr_done
        busy = self.wr_busy
        cmd_err = Signal()
        m.d.comb += [
            walker.cmd.payload.eq(self.wr_cmd.payload),
            walker.cmd.valid.eq(self.wr_cmd.valid & ~busy),
            self.wr_cmd.ready.eq(walker.cmd.ready & ~busy),
        ]

        winfo_layout = data.StructLayout({
            "offset": unsigned(lgb),
            "n": p.n.shape(),
            "nbeats": p.nbeats.shape(),
            "nrow": p.nrow.shape(),
            "len0": p.len0.shape(),
            "strb_first": unsigned(b),
            "strb_last": unsigned(b),
        })
        m.submodules.wr_info = winfo = fifo.SyncFIFOBuffered(width=winfo_layout.size,
                                                             depth=max(4, 2 * self.max_outstanding))

        # ---- fork each row descriptor into the AW queue and the W queue: the W side never
        # waits for an AW handshake (AXI: a slave may wait for WVALID before AWREADY)
        aw_layout = data.StructLayout({
            "addr0": unsigned(ADDR_BITS), "addr1": unsigned(ADDR_BITS),
            "len0": p.len0.shape(), "len1": p.len1.shape(), "cross": unsigned(1),
        })
        m.submodules.wr_awq = awq = fifo.SyncFIFOBuffered(width=aw_layout.size, depth=4)
        ai = Signal(aw_layout)
        wi = Signal(winfo_layout)
        fork = desc.valid & awq.w_rdy & winfo.w_rdy
        m.d.comb += [
            ai.addr0.eq(p.addr0), ai.addr1.eq(p.addr1), ai.len0.eq(p.len0), ai.len1.eq(p.len1),
            ai.cross.eq(p.cross),
            wi.offset.eq(p.offset), wi.n.eq(p.n), wi.nbeats.eq(p.nbeats), wi.nrow.eq(p.nrow),
            wi.len0.eq(p.len0), wi.strb_first.eq(p.strb_first), wi.strb_last.eq(p.strb_last),
            awq.w_data.eq(ai), awq.w_en.eq(fork),
            winfo.w_data.eq(wi), winfo.w_en.eq(fork),
            desc.ready.eq(awq.w_rdy & winfo.w_rdy),
        ]

        # ---- AW issue
        b_pending = Signal(range(self.max_outstanding + 1))
        phase = Signal()  # 1: the row's second (post-4 KiB) burst
        a = Signal(aw_layout)
        m.d.comb += a.eq(awq.r_data)
        blen = Signal.like(a.len0)
        m.d.comb += blen.eq(Mux(phase, a.len1, a.len0))
        m.d.comb += [
            axi.awvalid.eq(awq.r_rdy & (b_pending < self.max_outstanding)),
            axi.awaddr.eq(Mux(phase, a.addr1, a.addr0)),
            axi.awlen.eq(blen - 1),
            axi.awsize.eq(lgb),
            axi.awburst.eq(Burst.INCR),
            axi.awid.eq(0),
            axi.awcache.eq(0b0011),
            axi.awprot.eq(0),
            axi.awlock.eq(0),
        ]
        aw_fire = axi.awvalid & axi.awready
        with m.If(aw_fire):
            m.d.sync += phase.eq(a.cross & ~phase)
            m.d.comb += awq.r_en.eq(~(a.cross & ~phase))

        # ---- W beats: shift lane-0 row beats to the device alignment
        d = Signal(winfo_layout)
        m.d.comb += d.eq(winfo.r_data)
        dv = winfo.r_rdy
        j = Signal.like(d.nbeats)
        hold = Signal(self.data_bits)
        cur = self.wr_data.payload.data
        need_pop = j < d.nrow
        all_ones = (1 << b) - 1
        shift = Signal(range(b + 1))
        m.d.comb += shift.eq(b - d.offset)
        window = Cat(hold, cur) >> (shift * 8)
        first = j == 0
        final = j == d.nbeats - 1
        m.d.comb += [
            axi.wvalid.eq(dv & (~need_pop | self.wr_data.valid)),
            axi.wdata.eq(window[:self.data_bits]),
            axi.wstrb.eq(Mux(first, d.strb_first, all_ones) & Mux(final, d.strb_last, all_ones)),
            axi.wlast.eq((j == d.len0 - 1) | final),
            self.wr_data.ready.eq(dv & need_pop & axi.wready),
        ]
        with m.If(axi.wvalid & axi.wready):
            m.d.sync += j.eq(j + 1)
            with m.If(need_pop):
                m.d.sync += hold.eq(cur)
            with m.If(final):
                m.d.comb += winfo.r_en.eq(1)
                m.d.sync += [j.eq(0), hold.eq(0),
                             self.bytes_written.eq(self.bytes_written + d.n)]

        # ---- B responses and completion
        m.d.comb += axi.bready.eq(1)
        b_fire = axi.bvalid & axi.bready
        m.d.sync += b_pending.eq(b_pending + aw_fire - b_fire)
        with m.If(b_fire & axi.bresp[1]):
            m.d.sync += [cmd_err.eq(1), self.wr_error.eq(1)]
        idle = ~walker.active & ~desc.valid & (awq.level == 0) & (winfo.level == 0) & (b_pending == 0)
        m.d.comb += [
            self.wr_done.valid.eq(busy & idle),
            self.wr_done.payload.error.eq(cmd_err),
        ]
        with m.If(self.wr_cmd.valid & self.wr_cmd.ready):
            m.d.sync += [busy.eq(1), cmd_err.eq(0)]
        with m.If(self.wr_done.valid & self.wr_done.ready):
            m.d.sync += busy.eq(0)

    def elaborate(self, platform):
        m = Module()
        self._read_side(m)
        self._write_side(m)
        return m
