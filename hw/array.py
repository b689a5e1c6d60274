"""Weight-stationary int8 systolic array (the MATMUL datapath).

Geometry (``config.array``): ``rows`` (R) is the reduction depth K, ``cols`` (C) the
output width N. Processing element (t, j) holds weight W[t][j]. Input row element a[t]
enters array row t (skewed by t cycles inside this module) and moves right one PE per
cycle; partial sums move down one PE per cycle; column j's sum leaves the bottom row and
is de-skewed, so callers see whole, aligned rows:

    out[j] = sum over t < k of a[t] * W[t][j]      (exact; int8 x int8, int32 result)

Timing of :class:`SystolicArray` (cycle 0: the cycle ``inp.valid`` is high):

* **latency** ``R + C + 1`` cycles: the result row appears on ``out`` (``out.valid`` high)
  in cycle ``R + C + 1``; available as :attr:`SystolicArray.latency`;
* **throughput** one row per cycle, with no stalls and no backpressure: any pattern of
  ``inp.valid`` (back-to-back or with bubbles) comes out in the same pattern ``R + C + 1``
  cycles later. The array is a pure pipeline; the caller must accept every output row;
* each PE registers its product before the wide add (multiply and accumulate never share a
  cycle), and partial sums are only ``16 + bit_length(R)`` bits wide (exact for any
  int8 inputs), sign-extended to int32 at the output.

Weights are double-buffered: every PE has two weight registers (banks). Rows stream
through the *active* bank while the *shadow* bank is loaded, so the next tile loads
while the current one computes:

* ``load``: write shadow row ``row`` (0..R-1) with ``data`` (C int8) masked to
  PRELOAD semantics: element j is kept when ``row < k`` and ``j < n``, else 0. A full
  PRELOAD writes every row 0..R-1 once (rows >= k then become zero whatever ``data``
  is). Accepted when ``valid & ready``. ``ready`` is low for ``R + C`` cycles after a
  swap (rows already in the array still read the old bank) and in the cycle of a swap;
* ``swap``: a one-cycle strobe that makes the shadow bank active. The input row presented
  in the same cycle as ``swap`` (and every later one) uses the new weights; rows
  presented earlier finish with the old ones. The bank a row uses travels with the row
  through the array, so a swap never disturbs rows in flight. Swap only after the shadow
  tile is completely loaded.

After reset both banks hold zeros.
"""

from __future__ import annotations

from amaranth.hdl import Const, Module, Mux, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .config import AcceleratorConfig

__all__ = ["ProcessingElement", "SystolicArray", "array_input_signature", "array_output_signature",
           "array_load_signature", "psum_width"]

INT8 = signed(8)
INT32 = signed(32)


def psum_width(rows: int) -> int:
    """Bits of the partial sums inside an array of ``rows`` rows: exact for any int8 inputs.

    |sum of rows products| <= rows * 2**14 < 2**(15 + bit_length(rows)).
    """
    return 16 + rows.bit_length()


def _check_dim(name: str, value: object, lo: int = 1, hi: int = 256) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name}={value} is outside [{lo}, {hi}]")
    return value


class ProcessingElement(wiring.Component):
    """One weight-stationary PE with two weight banks.

    Ports: ``a_in``/``sel_in`` (input element and the weight bank it uses), ``a_out``/
    ``sel_out`` (the same, one cycle later, to the PE on the right), ``psum_in`` (from
    the PE above), ``psum_out`` (to the PE below), ``w_we`` (one write enable per bank),
    ``w_data``.

    Timing: ``a_in`` and the weight it selects are registered in cycle c, multiplied and
    the product registered in cycle c+1, added to ``psum_in`` and the sum registered in
    cycle c+2, so ``psum_out`` in cycle c+3 = ``psum_in`` (cycle c+2) + a_in (c) * W.
    ``a_out`` (c+1) = ``a_in`` (c). A weight written in cycle c is used from cycle c+1.
    One element per cycle.
    """

    def __init__(self, psum_bits: int = 32):
        self.psum_bits = _check_dim("psum_bits", psum_bits, 17, 64)
        super().__init__({
            "a_in": In(INT8),
            "sel_in": In(1),
            "a_out": Out(INT8),
            "sel_out": Out(1),
            "psum_in": In(signed(psum_bits)),
            "psum_out": Out(signed(psum_bits)),
            "w_we": In(2),
            "w_data": In(INT8),
        })

    def elaborate(self, platform):
        m = Module()
        w0 = Signal(INT8)
        w1 = Signal(INT8)
        with m.If(self.w_we[0]):
            m.d.sync += w0.eq(self.w_data)
        with m.If(self.w_we[1]):
            m.d.sync += w1.eq(self.w_data)
        # Three stages, so no cycle holds more than one of: the weight-bank select, the
        # multiply, the wide add (the select feeding the multiplier directly capped an
        # 8x8 array at 92 MHz on an ECP5).
        a_reg = Signal(INT8)
        w_reg = Signal(INT8)
        prod = Signal(signed(16))
        m.d.sync += [
            a_reg.eq(self.a_in),
            w_reg.eq(Mux(self.sel_in, w1, w0)),
            prod.eq(a_reg * w_reg),
            self.psum_out.eq(self.psum_in + prod),
            self.sel_out.eq(self.sel_in),
        ]
        m.d.comb += self.a_out.eq(a_reg)
        return m


def array_input_signature(rows: int, tag_bits: int = 0) -> wiring.Signature:
    """Input row stream (producer's view): ``valid``, ``data`` (rows x int8), ``k``
    (elements used; ``data[t]`` for t >= k is treated as 0), optional ``tag``."""
    members = {
        "valid": Out(1),
        "data": Out(data.ArrayLayout(INT8, rows)),
        "k": Out(range(rows + 1)),
    }
    if tag_bits:
        members["tag"] = Out(tag_bits)
    return wiring.Signature(members)


def array_output_signature(cols: int, tag_bits: int = 0) -> wiring.Signature:
    """Output row stream (producer's view): ``valid``, ``data`` (cols x int32), optional ``tag``."""
    members = {"valid": Out(1), "data": Out(data.ArrayLayout(INT32, cols))}
    if tag_bits:
        members["tag"] = Out(tag_bits)
    return wiring.Signature(members)


def array_load_signature(rows: int, cols: int) -> wiring.Signature:
    """Weight-row load (producer's view): ``valid``/``ready`` handshake, ``row``, ``k``, ``n``, ``data``."""
    return wiring.Signature({
        "valid": Out(1),
        "ready": In(1),
        "row": Out(range(rows)),
        "k": Out(range(rows + 1)),
        "n": Out(range(cols + 1)),
        "data": Out(data.ArrayLayout(INT8, cols)),
    })


class SystolicArray(wiring.Component):
    """Weight-stationary ``rows x cols`` int8 array with double-buffered weights.

    Build with ``SystolicArray(rows, cols)`` or :meth:`from_config`. ``tag_bits`` adds a
    ``tag`` field that travels with each row from ``inp`` to ``out`` unchanged (the core
    uses it for the accumulator address and flags).

    Ports (see the module docstring for the full protocol):

    * ``inp`` (in): ``valid``, ``data`` (R x int8), ``k``, [``tag``];
    * ``out`` (out): ``valid``, ``data`` (C x int32), [``tag``]; ``latency`` = R + C + 1 cycles
      after ``inp``, one row per cycle;
    * ``load`` (in): ``valid``, ``ready`` (out), ``row``, ``k``, ``n``, ``data`` (C x int8);
    * ``swap`` (in): make the loaded shadow weights active from this cycle's input row on;
    * ``busy`` (out): some valid row is inside the array.
    """

    def __init__(self, rows: int, cols: int, *, tag_bits: int = 0):
        self.rows = _check_dim("rows", rows, 1, 256)
        self.cols = _check_dim("cols", cols, 1, 256)
        self.tag_bits = _check_dim("tag_bits", tag_bits, 0, 64)
        self.psum_bits = psum_width(rows)
        #: Cycles from a row on ``inp`` to its result on ``out``.
        self.latency = rows + cols + 1
        #: Cycles after a swap before the shadow bank may be written again.
        self.drain = rows + cols
        super().__init__({
            "inp": In(array_input_signature(rows, tag_bits)),
            "out": Out(array_output_signature(cols, tag_bits)),
            "load": In(array_load_signature(rows, cols)),
            "swap": In(1),
            "busy": Out(1),
        })

    @classmethod
    def from_config(cls, config: AcceleratorConfig, **kwargs) -> "SystolicArray":
        if not isinstance(config, AcceleratorConfig):
            raise ValueError(f"expected an AcceleratorConfig, got {type(config).__name__}")
        return cls(config.array.rows, config.array.cols, **kwargs)

    def elaborate(self, platform):
        m = Module()
        R, C, P = self.rows, self.cols, self.psum_bits

        # ------------------------------------------------------------ weight banks
        active = Signal()  # bank used by rows presented from now on
        drain = Signal(range(self.drain + 1))
        m.d.comb += self.load.ready.eq((drain == 0) & ~self.swap)
        with m.If(self.swap):
            m.d.sync += [active.eq(~active), drain.eq(self.drain)]
        with m.Elif(drain != 0):
            m.d.sync += drain.eq(drain - 1)
        load_we = Signal()
        m.d.comb += load_we.eq(self.load.valid & self.load.ready)
        load_row_on = Signal()
        m.d.comb += load_row_on.eq(self.load.row < self.load.k)
        w_data = [Signal(INT8, name=f"w_data_{j}") for j in range(C)]
        for j in range(C):
            m.d.comb += w_data[j].eq(Mux(load_row_on & (j < self.load.n), self.load.data[j], 0))

        # ------------------------------------------------------------ input skew
        row_sel = Signal()
        m.d.comb += row_sel.eq(active ^ self.swap)
        a_edge, sel_edge = [], []  # what enters column 0 of each array row
        for t in range(R):
            a = Signal(INT8, name=f"a_in_{t}")
            m.d.comb += a.eq(Mux(self.inp.valid & (t < self.inp.k), self.inp.data[t], 0))
            s = row_sel
            for d in range(t):  # row t is delayed by t cycles
                a_next = Signal(INT8, name=f"a_skew_{t}_{d}")
                s_next = Signal(name=f"sel_skew_{t}_{d}")
                m.d.sync += [a_next.eq(a), s_next.eq(s)]
                a, s = a_next, s_next
            a_edge.append(a)
            sel_edge.append(s)

        # ------------------------------------------------------------ PE grid
        pes = [[ProcessingElement(P) for _ in range(C)] for _ in range(R)]
        for t in range(R):
            for j in range(C):
                pe = pes[t][j]
                m.submodules[f"pe_{t}_{j}"] = pe
                if j == 0:
                    m.d.comb += [pe.a_in.eq(a_edge[t]), pe.sel_in.eq(sel_edge[t])]
                else:
                    left = pes[t][j - 1]
                    m.d.comb += [pe.a_in.eq(left.a_out), pe.sel_in.eq(left.sel_out)]
                m.d.comb += pe.psum_in.eq(0 if t == 0 else pes[t - 1][j].psum_out)
                write = load_we & (self.load.row == t)
                m.d.comb += [
                    pe.w_data.eq(w_data[j]),
                    pe.w_we.eq(Mux(active, Const(0b01, 2), Const(0b10, 2)) & Mux(write, 0b11, 0b00)),
                ]

        # ------------------------------------------------------------ de-skew
        # Column j's sum leaves the bottom row in cycle R + j + 2; delay it C - 1 - j more.
        for j in range(C):
            v = pes[R - 1][j].psum_out
            for d in range(C - 1 - j):
                v_next = Signal(signed(P), name=f"deskew_{j}_{d}")
                m.d.sync += v_next.eq(v)
                v = v_next
            m.d.comb += self.out.data[j].eq(v)  # sign-extends to int32

        # ------------------------------------------------------------ valid / tag pipeline
        valid = self.inp.valid
        tag = self.inp.tag if self.tag_bits else None
        in_flight = []
        for d in range(self.latency):
            v_next = Signal(name=f"valid_{d}")
            m.d.sync += v_next.eq(valid)
            in_flight.append(v_next)
            valid = v_next
            if tag is not None:
                t_next = Signal(self.tag_bits, name=f"tag_{d}")
                m.d.sync += t_next.eq(tag)
                tag = t_next
        m.d.comb += self.out.valid.eq(valid)
        if tag is not None:
            m.d.comb += self.out.tag.eq(tag)
        busy = Const(0)
        for v in in_flight:
            busy = busy | v
        m.d.comb += self.busy.eq(busy)
        return m
