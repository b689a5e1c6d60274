"""Row engine of the vector unit: VBIN, VMAP and VROW, bit-exact with :mod:`weft.hw.vector_numerics`.

The engine executes one instruction at a time. A **sequencer** issues at most one row read
per cycle (accumulator or scratchpad), in order; every read returns its row one cycle later,
so data comes back in issue order. Reads have roles:

* ``PARAM``: the parameter row (words 0..2 latched at the start of the instruction);
* ``HOLD1`` / ``HOLD2``: an operand latched for the next primary read (VBIN's ``b`` row;
  a norm's gain and bias rows);
* ``PRIMARY``: the row that enters the compute pipeline (VBIN ``a``, VMAP ``src``, each
  slice of a VROW row) together with the held operands.

**Compute pipeline** (one on-chip row of ``cols`` elements per cycle, every function in
parallel, selected by the instruction): A (unpack) -> B (first products) -> C (rounding,
piecewise-quadratic ROM lookups, exponent) -> D (final products, rounding, saturation);
results go to an output FIFO that writes the scratchpad (``sp_write``) or the accumulator
(``acc_write``). A primary is issued only while the FIFO has a free slot reserved for it,
so backpressure on the write side never loses data.

**Row operations** walk a logical row's slices (slice-major: slice ``c`` of row ``r`` at
``base + c * rows + r``) in passes: pass 1 reduces (max, min, sum, max |x|, masked max
for softmax); max/sum write their result; softmax's pass 2 sums the exponentials, then
one sequential (restoring, 1 bit per cycle) division gives the reciprocal (40 cycles; 43
for a ``wide`` softmax, whose 11-bit Q = 2047 needs 3 more quotient bits, so its rows take
3 cycles more each) and pass 3 writes the probabilities (int8/uint8 to the scratchpad; a
wide softmax writes int32 to the accumulator); layernorm/rmsnorm's pass 2 sums e^2, then
one digit-by-digit integer square root (32 cycles) and one division (57 cycles), and pass
3 reads gain (and bias) rows and writes the output (int8 to the scratchpad; a wide norm
int32 to the accumulator). The pipeline drains between passes of a row; pass 3 of
row r overlaps pass 1 of row r+1.

Illegal vector instructions (reserved ``func``, ``len = 0``, ``mul``/``rope`` with both
operands in the accumulator, a configuration whose scratchpad and accumulator rows
differ in width, or one built with ``vector.row_engine: false``, which elaborates no
datapath at all) complete at once with an ``error`` pulse and no effect.
"""

from __future__ import annotations

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, fifo, stream, wiring
from amaranth.lib.wiring import In, Out

from . import vector_numerics as vn
from .config import AcceleratorConfig
from .decode import instruction_layout
from .isa import INSTR_BITS, VBIN_FUNCS, VMAP_FUNCS, VROW_FUNCS, Opcode
from .memory import read_signature, write_signature

__all__ = ["RowEngine", "row_engine_supported"]

# func encodings (from the ISA tables, not retyped)
F_ADD, F_MUL, F_ROPE = (VBIN_FUNCS.index(n) for n in ("add", "mul", "rope"))
F_SCALE, F_GELU, F_SILU = (VMAP_FUNCS.index(n) for n in ("scale", "gelu", "silu"))
F_MAX, F_SUM, F_SOFTMAX, F_LAYERNORM, F_RMSNORM = (VROW_FUNCS.index(n) for n in
                                                   ("max", "sum", "softmax", "layernorm", "rmsnorm"))

K_VBIN, K_VMAP, K_VROW = 0, 1, 2
ROLE_PRIMARY, ROLE_HOLD1, ROLE_HOLD2, ROLE_PARAM = 0, 1, 2, 3
FIFO_DEPTH = 8
MB, SB = 16, 6  # scale word: multiplier bits, shift bits


def row_engine_supported(config: AcceleratorConfig) -> bool:
    """Geometry the engine handles: equal sp/acc row widths, a power of two, at least 4."""
    e = config.acc_row_elems
    return config.sp_row_elems == e and e >= 4 and e & (e - 1) == 0


# ---------------------------------------------------------------------- arithmetic helpers
class _Arith:
    def __init__(self, m: Module):
        self.m = m
        self.n = 0

    def sig(self, shape, name, value=None):
        self.n += 1
        s = Signal(shape, name=f"{name}_{self.n}")
        if value is not None:
            self.m.d.comb += s.eq(value)
        return s

    def rshr(self, v, s, width, name="rshr"):
        """floor((v + 2^(s-1)) / 2^s), s unsigned (0: v)."""
        sm1 = self.sig(unsigned(len(s)), f"{name}_sm1", s - 1)
        q2 = self.sig(signed(width), f"{name}_q2", v >> sm1)
        return self.sig(signed(width), name, Mux(s == 0, v, (q2 + 1) >> 1))

    def rhe(self, v, s, width, name="rhe"):
        """round half to even of v / 2^min(s, 62), exact, as ``signed(width)``: for s >= 1 the
        quotient is at most 2^(width-2) in magnitude, so rounding up cannot overflow."""
        sc = self.sig(unsigned(7), f"{name}_sc", Mux(s > 62, 62, s))
        sm1 = self.sig(unsigned(7), f"{name}_sm1", sc - 1)
        vv = self.sig(signed(width), f"{name}_v", v)
        q2 = self.sig(signed(width), f"{name}_q2", vv >> sm1)
        mask = Cat(*(sm1 > i for i in range(width)))
        sticky = self.sig(1, f"{name}_sticky", (vv.as_unsigned() & mask) != 0)
        up = q2[0] & (sticky | q2[1])
        half = self.sig(signed(width - 1), f"{name}_half", q2 >> 1)  # so the sum is width bits
        return self.sig(signed(width), name, Mux(sc == 0, vv, half + up))

    def add64(self, a, b, name="add64", subtract=False):
        """(a + b) or (a - b) modulo 2^64 as ``signed(64)``, from 32-bit halves: every
        intermediate stays within 64 bits (Amaranth's own sum is 65 bits wide, which Verilator
        evaluates as multi-word arithmetic)."""
        au, bu = a.as_unsigned(), b.as_unsigned()
        if subtract:
            bu = self.sig(unsigned(64), f"{name}_nb", ~bu)
        lo = self.sig(unsigned(33), f"{name}_lo", au[:32] + bu[:32] + int(subtract))
        hi = self.sig(unsigned(32), f"{name}_hi", au[32:64] + bu[32:64] + lo[32])
        return self.sig(signed(64), name, Cat(lo[:32], hi))

    def mul64(self, p, k, name="mul64"):
        """p * k modulo 2^64 as ``signed(64)`` (p 64 bits, k unsigned of at most 32), from 32-bit
        halves of p, so no product is wider than 64 bits. Two's complement makes p * k and its
        unsigned reading agree modulo 2^64: this is the wrap of int64 arithmetic."""
        pu = p.as_unsigned()
        lo = self.sig(unsigned(64), f"{name}_lo", pu[:32] * k)
        hi = self.sig(unsigned(32), f"{name}_hi", (pu[32:64] * k)[:32] + lo[32:64])
        return self.sig(signed(64), name, Cat(lo[:32], hi))

    def sat(self, v, lo, hi, width, name="sat"):
        return self.sig(signed(width), name, Mux(v > hi, hi, Mux(v < lo, lo, v)))

    def pq(self, table: vn.PQTable, z, name="pq"):
        """vn.pq_eval: c0 + rshr(r * (c1 + rshr(r * c2, 14)), 14); table.end past the last segment."""
        F = vn.PQ_FRAC_BITS
        n = table.segments
        seg = self.sig(unsigned(max(1, len(z) - F)), f"{name}_seg", z >> F)
        r = self.sig(unsigned(F), f"{name}_r", z[:F])
        idx = self.sig(range(n), f"{name}_idx", Mux(seg >= n, n - 1, seg))
        cols = [Array([Const(int(table.coeffs[k, i]), signed(18)) for k in range(n)]) for i in range(3)]
        c0 = self.sig(signed(18), f"{name}_c0", cols[0][idx])
        c1 = self.sig(signed(18), f"{name}_c1", cols[1][idx])
        c2 = self.sig(signed(18), f"{name}_c2", cols[2][idx])
        f = Const(F, 5)
        inner = self.rshr(r * c2, f, 34, f"{name}_in")
        t = self.sig(signed(20), f"{name}_t", c1 + inner)
        outer = self.rshr(r * t, f, 36, f"{name}_out")
        return self.sig(signed(20), name, Mux(seg >= n, table.end, c0 + outer))

    def tree(self, values, op, width, name):
        level = list(values)
        while len(level) > 1:
            nxt = []
            for i in range(0, len(level) - 1, 2):
                nxt.append(self.sig(signed(width), name, op(level[i], level[i + 1])))
            if len(level) % 2:
                nxt.append(level[-1])
            level = nxt
        return level[0]


def _max(a, b):
    return Mux(a > b, a, b)


def _min(a, b):
    return Mux(a < b, a, b)


def bitlen(ar: _Arith, v, name):
    """Bits needed for non-negative v (0 for 0): a priority encoder."""
    out = Const(0, 7)
    for i in range(len(v)):
        out = Mux(v[i], i + 1, out)
    return ar.sig(unsigned(7), name, out)


class RowEngine(wiring.Component):
    """VBIN / VMAP / VROW executor. Ports: ``issue`` (stream of instruction words), ``complete``,
    ``error`` (pulses with ``complete`` for an illegal instruction), ``acc_read``, ``sp_read``,
    ``sp_write``, ``acc_write`` (valid/ready)."""

    def __init__(self, config: AcceleratorConfig):
        self.config = config
        self.E = config.acc_row_elems
        acc_row = data.ArrayLayout(signed(32), config.acc_row_elems)
        sp_row = data.ArrayLayout(signed(8), config.sp_row_elems)
        super().__init__({
            "issue": In(stream.Signature(INSTR_BITS)),
            "busy": Out(1),
            "complete": Out(1),
            "error": Out(1),
            "acc_read": Out(read_signature(config.acc_rows, acc_row)),
            "sp_read": Out(read_signature(config.sp_rows, sp_row)),
            "sp_write": Out(write_signature(config.sp_rows, sp_row)),
            "acc_write": Out(wiring.Signature({"valid": Out(1), "addr": Out(range(config.acc_rows)),
                                               "data": Out(acc_row), "ready": In(1)})),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        E = self.E
        ar = _Arith(m)
        if not cfg.vector.row_engine:
            # Left out by the configuration (no datapath at all): every VBIN / VMAP / VROW
            # is taken and refused at once, like any other illegal vector instruction.
            m.d.comb += [self.issue.ready.eq(1), self.complete.eq(self.issue.valid),
                         self.error.eq(self.issue.valid)]
            return m
        supported = row_engine_supported(cfg)
        log2e = E.bit_length() - 1

        # ------------------------------------------------------------ instruction registers
        payload = self.issue.payload
        opcode = payload[:8]
        vb = data.View(instruction_layout(Opcode.VBIN), payload)
        vm = data.View(instruction_layout(Opcode.VMAP), payload)
        vr = data.View(instruction_layout(Opcode.VROW), payload)

        kind = Signal(2)
        func = Signal(3)
        a_acc = Signal()   # primary operand / src in the accumulator
        b_acc = Signal()   # VBIN b in the accumulator
        dst_acc = Signal()
        a_base = Signal(20)
        b_base = Signal(20)
        d_base = Signal(20)
        p_base = Signal(20)
        M = Signal(16)
        L = Signal(17)
        C = Signal(17)  # slices per logical row
        causal = Signal()
        usgn = Signal()
        wide = Signal()  # softmax only: Q = 2047, int32 results to the accumulator
        w0 = Signal(32)
        w1 = Signal(32)
        w2 = Signal(32)

        is_vbin = opcode == int(Opcode.VBIN)
        is_vmap = opcode == int(Opcode.VMAP)
        is_vrow = opcode == int(Opcode.VROW)
        illegal = Signal()
        m.d.comb += illegal.eq(
            (not supported)
            | (is_vbin & ((vb.func >= len(VBIN_FUNCS))
                          | (((vb.func == F_MUL) | (vb.func == F_ROPE)) & vb.a_mem & vb.b_mem)))
            | (is_vmap & (vm.func >= len(VMAP_FUNCS)))
            | (is_vrow & ((vr.func >= len(VROW_FUNCS)) | (vr.len == 0)))
            | ~(is_vbin | is_vmap | is_vrow))
        rows_in = Mux(is_vbin, vb.rows, Mux(is_vmap, vm.rows, vr.rows))

        # ------------------------------------------------------------ sequencer state
        i_row = Signal(16)      # elementwise row / logical row r
        c = Signal(17)          # slice index
        j0 = Signal(17)         # first element of slice c
        saddr = Signal(20)      # src + c*M + r
        daddr = Signal(20)      # dst + c*M + r
        gaddr = Signal(20)      # param + 1 + c
        baddr = Signal(20)      # param + 1 + C + c
        sub = Signal(2)
        pas = Signal(2)         # current pass (0: elementwise)

        # read issue (one per cycle)
        rd_valid = Signal()
        rd_acc = Signal()
        rd_addr = Signal(20)
        rd_role = Signal(2)
        t_pass = Signal(2)
        t_first = Signal()
        t_out = Signal()
        t_last = Signal()
        t_j0 = Signal(17)
        t_r = Signal(16)
        t_addr = Signal(20)
        port_ready = Mux(rd_acc, self.acc_read.ready, self.sp_read.ready)
        accepted = Signal()
        m.d.comb += [
            self.acc_read.valid.eq(rd_valid & rd_acc), self.acc_read.addr.eq(rd_addr),
            self.sp_read.valid.eq(rd_valid & ~rd_acc), self.sp_read.addr.eq(rd_addr),
            accepted.eq(rd_valid & port_ready),
        ]

        inflight = Signal(range(16))
        outstanding = Signal(range(FIFO_DEPTH + 2))
        credit = outstanding < FIFO_DEPTH
        push_ms = Signal()  # direct FIFO push of a max/sum result
        pop = Signal()
        prim_issue = accepted & (rd_role == ROLE_PRIMARY)
        exit_d = Signal()
        m.d.sync += inflight.eq(inflight + prim_issue - exit_d)
        m.d.sync += outstanding.eq(outstanding + ((prim_issue & t_out) | push_ms) - pop)

        # reductions (pass 1 live, snapshots for passes 2/3)
        r_max = Signal(signed(32))
        r_min = Signal(signed(32))
        r_sum = Signal(signed(50))
        r_mabs = Signal(33)
        r_smax = Signal(signed(42))
        r_any = Signal()
        s_m = Signal(signed(42))
        s_s1 = Signal(signed(50))
        s_any = Signal()
        k_reg = Signal(signed(8))
        S_sum = Signal(40)
        V_sum = Signal(52)
        recip = Signal(64)
        vzero = Signal()

        # divider and square root
        div_sr = Signal(64)
        div_den = Signal(33)
        div_rem = Signal(34)
        div_q = Signal(64)
        div_cnt = Signal(7)
        sq_op = Signal(66)
        sq_res = Signal(66)
        sq_one = Signal(66)
        sq_cnt = Signal(6)

        busy = Signal()
        m.d.comb += self.busy.eq(busy)
        m.d.comb += self.issue.ready.eq(~busy)
        fire = self.issue.valid & self.issue.ready

        # Softmax output levels Q (probability 1.0); 11 bits hold the wide mode's 2047.
        q_val = ar.sig(unsigned(11), "q_val", Mux(wide, vn.SOFTMAX_WIDE_LEVELS, Mux(usgn, 255, 127)))

        def start_pass(p, r_next_addr_src, r_next_addr_dst):
            return [pas.eq(p), c.eq(0), j0.eq(0), sub.eq(0),
                    saddr.eq(r_next_addr_src), daddr.eq(r_next_addr_dst),
                    gaddr.eq(p_base + 1), baddr.eq(p_base + 1 + C)]

        def next_slice():
            return [c.eq(c + 1), j0.eq(j0 + E), saddr.eq(saddr + M), daddr.eq(daddr + M),
                    gaddr.eq(gaddr + 1), baddr.eq(baddr + 1), sub.eq(0)]

        last_slice = c + 1 == C
        is_norm = (func == F_LAYERNORM) | (func == F_RMSNORM)

        with m.FSM(name="rowseq"):
            with m.State("IDLE"):
                with m.If(fire):
                    with m.If(illegal):
                        m.d.comb += [self.complete.eq(1), self.error.eq(1)]
                    with m.Elif(rows_in == 0):
                        m.d.comb += self.complete.eq(1)
                    with m.Else():
                        Lx = vr.len
                        m.d.sync += [
                            busy.eq(1),
                            kind.eq(Mux(is_vbin, K_VBIN, Mux(is_vmap, K_VMAP, K_VROW))),
                            func.eq(Mux(is_vbin, vb.func, Mux(is_vmap, vm.func, vr.func))),
                            a_acc.eq(Mux(is_vbin, vb.a_mem, Mux(is_vmap, vm.src_mem, vr.src_mem))),
                            b_acc.eq(vb.b_mem),
                            dst_acc.eq(Mux(is_vbin, vb.dst_mem, Mux(is_vmap, vm.dst_mem,
                                                                     (vr.func == F_MAX) | (vr.func == F_SUM)
                                                                     | (((vr.func == F_SOFTMAX) | (vr.func == F_LAYERNORM)
                                                                         | (vr.func == F_RMSNORM)) & vr.wide)))),
                            a_base.eq(Mux(is_vbin, vb.a, Mux(is_vmap, vm.src, vr.src))),
                            b_base.eq(vb.b),
                            d_base.eq(Mux(is_vbin, vb.dst, Mux(is_vmap, vm.dst, vr.dst))),
                            p_base.eq(Mux(is_vbin, vb.param, Mux(is_vmap, vm.param, vr.param))),
                            M.eq(rows_in),
                            L.eq(Lx),
                            C.eq((Lx + (E - 1)) >> log2e),
                            causal.eq(vr.causal),
                            usgn.eq(vr.unsigned),
                            wide.eq(is_vrow & (vr.func == F_SOFTMAX) & vr.wide),
                            i_row.eq(0),
                            sub.eq(0),
                        ]
                        m.next = "PARAM"
            with m.State("PARAM"):
                m.d.comb += [rd_valid.eq(1), rd_acc.eq(1), rd_addr.eq(p_base), rd_role.eq(ROLE_PARAM)]
                with m.If(accepted):
                    m.next = "PARAM_WAIT"
            with m.State("PARAM_WAIT"):  # the parameter row lands this cycle
                with m.If(kind == K_VROW):
                    m.d.sync += start_pass(1, a_base, d_base)
                    m.next = "PASS"
                with m.Else():
                    m.next = "EW"
            # -------------------------------------------------- elementwise
            with m.State("EW"):
                with m.If((kind == K_VBIN) & (sub == 0)):
                    m.d.comb += [rd_valid.eq(1), rd_acc.eq(b_acc), rd_addr.eq(b_base + i_row), rd_role.eq(ROLE_HOLD1)]
                    with m.If(accepted):
                        m.d.sync += sub.eq(1)
                with m.Else():
                    m.d.comb += [rd_valid.eq(credit), rd_acc.eq(a_acc), rd_addr.eq(a_base + i_row),
                                 rd_role.eq(ROLE_PRIMARY), t_pass.eq(0), t_out.eq(1),
                                 t_last.eq(i_row + 1 == M), t_addr.eq(d_base + i_row)]
                    with m.If(accepted):
                        m.d.sync += [i_row.eq(i_row + 1), sub.eq(0)]
                        with m.If(i_row + 1 == M):
                            m.next = "WAIT_END"
            # -------------------------------------------------- row passes
            with m.State("PASS"):
                need_g = (pas == 3) & is_norm & (sub == 0)
                need_b = (pas == 3) & (func == F_LAYERNORM) & (sub == 1)
                with m.If(need_g):
                    m.d.comb += [rd_valid.eq(1), rd_acc.eq(1), rd_addr.eq(gaddr), rd_role.eq(ROLE_HOLD1)]
                    with m.If(accepted):
                        m.d.sync += sub.eq(Mux(func == F_LAYERNORM, 1, 2))
                with m.Elif(need_b):
                    m.d.comb += [rd_valid.eq(1), rd_acc.eq(1), rd_addr.eq(baddr), rd_role.eq(ROLE_HOLD2)]
                    with m.If(accepted):
                        m.d.sync += sub.eq(2)
                with m.Else():
                    out = pas == 3
                    m.d.comb += [rd_valid.eq(~out | credit), rd_acc.eq(a_acc), rd_addr.eq(saddr),
                                 rd_role.eq(ROLE_PRIMARY), t_pass.eq(pas), t_first.eq(c == 0), t_out.eq(out),
                                 t_last.eq(out & last_slice & (i_row + 1 == M)), t_j0.eq(j0), t_r.eq(i_row),
                                 t_addr.eq(daddr)]
                    with m.If(accepted):
                        m.d.sync += next_slice()
                        with m.If(last_slice):
                            with m.If(pas == 3):
                                # next logical row (pass 3 overlaps the next row's pass 1)
                                m.d.sync += i_row.eq(i_row + 1)
                                with m.If(i_row + 1 == M):
                                    m.next = "WAIT_END"
                                with m.Else():
                                    m.d.sync += start_pass(1, a_base + i_row + 1, d_base + i_row + 1)
                            with m.Else():
                                m.next = "DRAIN"
            with m.State("DRAIN"):
                with m.If(inflight == 0):
                    with m.If(pas == 1):
                        m.next = "KSTATE"
                    with m.Elif(func == F_SOFTMAX):
                        # R = floor(Q * 2^32 / S): the numerator's bits from 63 down, Q at the top
                        # (8 bits: 40 steps; wide, 11 bits: 43 steps).
                        m.d.sync += [div_sr.eq(Mux(wide, q_val << 53, q_val << 56)),
                                     div_den.eq(Mux(S_sum == 0, 1, S_sum)),
                                     div_rem.eq(0), div_q.eq(0), div_cnt.eq(Mux(wide, 43, 40))]
                        m.next = "DIV"
                    with m.Else():
                        m.d.sync += [sq_op.eq(V_sum << 16), sq_res.eq(0), sq_one.eq(1 << 62), sq_cnt.eq(32),
                                     vzero.eq(V_sum == 0)]
                        m.next = "SQRT"
            with m.State("KSTATE"):
                spread = ar.sig(unsigned(34), "spread", r_max - r_min)
                bl_L = bitlen(ar, L, "bl_L")
                bl_s = bitlen(ar, spread, "bl_spread")
                bl_a = bitlen(ar, r_mabs, "bl_abs")
                bits = Mux(func == F_LAYERNORM, bl_L + bl_s, bl_a)
                m.d.sync += [s_m.eq(r_smax), s_s1.eq(r_sum), s_any.eq(r_any), k_reg.eq(bits - 15)]
                with m.If((func == F_MAX) | (func == F_SUM)):
                    m.next = "MSOUT"
                with m.Else():
                    m.d.sync += start_pass(2, a_base + i_row, d_base + i_row)
                    m.next = "PASS"
            with m.State("MSOUT"):
                with m.If(credit):
                    m.d.comb += push_ms.eq(1)
                    m.d.sync += i_row.eq(i_row + 1)
                    with m.If(i_row + 1 == M):
                        m.next = "WAIT_END"
                    with m.Else():
                        m.d.sync += start_pass(1, a_base + i_row + 1, d_base + i_row + 1)
                        m.next = "PASS"
            with m.State("SQRT"):
                trial = ar.sig(unsigned(67), "sq_trial", sq_res + sq_one)
                with m.If(sq_op >= trial):
                    m.d.sync += [sq_op.eq(sq_op - trial), sq_res.eq((sq_res >> 1) + sq_one)]
                with m.Else():
                    m.d.sync += sq_res.eq(sq_res >> 1)
                m.d.sync += [sq_one.eq(sq_one >> 2), sq_cnt.eq(sq_cnt - 1)]
                with m.If(sq_cnt == 1):
                    m.next = "SQRT_DONE"
            with m.State("SQRT_DONE"):
                m.d.sync += [div_sr.eq(1 << 63), div_den.eq(Mux(sq_res == 0, 1, sq_res)),
                             div_rem.eq(0), div_q.eq(0), div_cnt.eq(57)]
                m.next = "DIV"
            with m.State("DIV"):
                trial = ar.sig(unsigned(35), "div_trial", Cat(div_sr[63], div_rem))
                with m.If(trial >= div_den):
                    m.d.sync += [div_rem.eq(trial - div_den), div_q.eq(Cat(1, div_q))]
                with m.Else():
                    m.d.sync += [div_rem.eq(trial), div_q.eq(Cat(0, div_q))]
                m.d.sync += [div_sr.eq(div_sr << 1), div_cnt.eq(div_cnt - 1)]
                with m.If(div_cnt == 1):
                    m.next = "DIV_DONE"
            with m.State("DIV_DONE"):
                m.d.sync += [recip.eq(div_q)] + start_pass(3, a_base + i_row, d_base + i_row)
                m.next = "PASS"
            with m.State("WAIT_END"):
                with m.If(self.complete):
                    m.d.sync += busy.eq(0)
                    m.next = "IDLE"

        # ------------------------------------------------------------ read return (stage "R")
        rv = Signal()
        rv_role = Signal(2)
        rv_acc = Signal()
        rv_pass, rv_first, rv_out, rv_last = Signal(2), Signal(), Signal(), Signal()
        rv_j0, rv_r, rv_addr = Signal(17), Signal(16), Signal(20)
        m.d.sync += rv.eq(accepted)
        with m.If(accepted):
            m.d.sync += [rv_role.eq(rd_role), rv_acc.eq(rd_acc), rv_pass.eq(t_pass), rv_first.eq(t_first),
                         rv_out.eq(t_out), rv_last.eq(t_last), rv_j0.eq(t_j0), rv_r.eq(t_r), rv_addr.eq(t_addr)]
        row = [ar.sig(signed(32), "row", Mux(rv_acc, self.acc_read.rdata[l], self.sp_read.rdata[l]))
               for l in range(E)]
        hold1 = [Signal(signed(32), name=f"hold1_{l}") for l in range(E)]
        hold2 = [Signal(signed(32), name=f"hold2_{l}") for l in range(E)]
        with m.If(rv & (rv_role == ROLE_HOLD1)):
            m.d.sync += [hold1[l].eq(row[l]) for l in range(E)]
        with m.If(rv & (rv_role == ROLE_HOLD2)):
            m.d.sync += [hold2[l].eq(row[l]) for l in range(E)]
        with m.If(rv & (rv_role == ROLE_PARAM)):
            m.d.sync += [w0.eq(self.acc_read.rdata[0]), w1.eq(self.acc_read.rdata[1]), w2.eq(self.acc_read.rdata[2])]

        class Stage:
            def __init__(self, name):
                self.valid = Signal(name=f"{name}_valid")
                self.pas = Signal(2, name=f"{name}_pass")
                self.first = Signal(name=f"{name}_first")
                self.out = Signal(name=f"{name}_out")
                self.last = Signal(name=f"{name}_last")
                self.addr = Signal(20, name=f"{name}_addr")
                self.x = [Signal(signed(32), name=f"{name}_x{l}") for l in range(E)]
                self.h1 = [Signal(signed(32), name=f"{name}_h1_{l}") for l in range(E)]
                self.h2 = [Signal(signed(32), name=f"{name}_h2_{l}") for l in range(E)]
                self.lv = Signal(E, name=f"{name}_lv")   # element j < len
                self.sv = Signal(E, name=f"{name}_sv")   # softmax-valid key

            def follow(self, prev):
                stmts = [self.valid.eq(prev.valid), self.pas.eq(prev.pas), self.first.eq(prev.first),
                         self.out.eq(prev.out), self.last.eq(prev.last), self.addr.eq(prev.addr),
                         self.lv.eq(prev.lv), self.sv.eq(prev.sv)]
                for l in range(E):
                    stmts += [self.x[l].eq(prev.x[l]), self.h1[l].eq(prev.h1[l]), self.h2[l].eq(prev.h2[l])]
                return stmts

        # ------------------------------------------------------------ stage A: unpack, masks
        A = Stage("A")
        m.d.sync += [A.valid.eq(rv & (rv_role == ROLE_PRIMARY)), A.pas.eq(rv_pass), A.first.eq(rv_first),
                     A.out.eq(rv_out), A.last.eq(rv_last), A.addr.eq(rv_addr)]
        kv_len = w1.as_signed()
        offset = w2.as_signed()
        lim = ar.sig(signed(36), "causal_lim", rv_r + offset)
        for l in range(E):
            j = ar.sig(unsigned(18), "j", rv_j0 + l)
            lv = j < L
            sv = lv & (j.as_signed() < kv_len) & (~causal | (j.as_signed() <= lim))
            m.d.sync += [A.x[l].eq(row[l]), A.h1[l].eq(hold1[l]), A.h2[l].eq(hold2[l]),
                         A.lv[l].eq(lv), A.sv[l].eq(sv)]

        # pass 1 reductions from A
        INT32_MIN, INT32_MAX = -(1 << 31), (1 << 31) - 1
        BIG = -(1 << 40)
        bmax = ar.tree([Mux(A.lv[l], A.x[l], INT32_MIN) for l in range(E)], _max, 32, "bmax")
        bmin = ar.tree([Mux(A.lv[l], A.x[l], INT32_MAX) for l in range(E)], _min, 32, "bmin")
        bsum = ar.tree([Mux(A.lv[l], A.x[l], 0) for l in range(E)], lambda a, b: a + b, 40, "bsum")
        babs = ar.tree([Mux(A.lv[l], Mux(A.x[l] < 0, -A.x[l], A.x[l]), 0) for l in range(E)], _max, 34, "babs")
        bsmax = ar.tree([Mux(A.sv[l], A.x[l], BIG) for l in range(E)], _max, 42, "bsmax")
        bany = A.sv.any()
        with m.If(A.valid & (A.pas == 1)):
            with m.If(A.first):
                m.d.sync += [r_max.eq(bmax), r_min.eq(bmin), r_sum.eq(bsum), r_mabs.eq(babs), r_smax.eq(bsmax),
                             r_any.eq(bany)]
            with m.Else():
                m.d.sync += [r_max.eq(_max(r_max, bmax)), r_min.eq(_min(r_min, bmin)), r_sum.eq(r_sum + bsum),
                             r_mabs.eq(_max(r_mabs, babs)), r_smax.eq(_max(r_smax, bsmax)), r_any.eq(r_any | bany)]

        # scale words
        def mult(w):
            return w[:MB]

        def shift(w):
            return w[MB:MB + SB]

        # ------------------------------------------------------------ stage B: first products
        B = Stage("B")
        m.d.sync += B.follow(A)
        pa = [Signal(signed(64), name=f"B_pa{l}") for l in range(E)]
        pb = [Signal(signed(64), name=f"B_pb{l}") for l in range(E)]
        m_sm = mult(w0)
        for l in range(E):
            x, h = A.x[l], A.h1[l]
            absx = ar.sig(unsigned(33), "absx", Mux(x < 0, -x, x))
            if l % 2 == 0:
                x0, x1, cc, ss = A.x[l], A.x[l + 1], A.h1[l], A.h1[l + 1]
                rope = ar.add64(ar.sig(signed(64), "rp0", x0 * cc), ar.sig(signed(64), "rp1", x1 * ss), "rope",
                                subtract=True)
            else:
                x0, x1, cc, ss = A.x[l - 1], A.x[l], A.h1[l - 1], A.h1[l]
                rope = ar.add64(ar.sig(signed(64), "rp0", x0 * ss), ar.sig(signed(64), "rp1", x1 * cc), "rope")
            d_sm = ar.sig(signed(42), "d_sm", Mux(A.sv[l], s_m - x, 0))
            d_ln = ar.sig(signed(52), "d_ln", L * x - s_s1)
            val = Signal(signed(64), name=f"B_in{l}")
            with m.Switch(Cat(func, kind)):
                with m.Case(F_SCALE | K_VMAP << 3):
                    m.d.comb += val.eq(x * mult(w0))
                with m.Case(F_GELU | K_VMAP << 3, F_SILU | K_VMAP << 3):
                    m.d.comb += val.eq(absx * mult(w0))
                with m.Case(F_ADD | K_VBIN << 3):
                    m.d.comb += val.eq(x * mult(w0))
                with m.Case(F_MUL | K_VBIN << 3):
                    m.d.comb += val.eq(x * h)
                with m.Case(F_ROPE | K_VBIN << 3):
                    m.d.comb += val.eq(rope)
                with m.Case(F_SOFTMAX | K_VROW << 3):
                    m.d.comb += val.eq(d_sm * m_sm)
                with m.Case(F_LAYERNORM | K_VROW << 3):
                    m.d.comb += val.eq(d_ln)
                with m.Default():
                    m.d.comb += val.eq(x)
            m.d.sync += [pa[l].eq(val), pb[l].eq(h * mult(w1))]

        # ------------------------------------------------------------ stage C
        C_ = Stage("C")
        m.d.sync += C_.follow(B)
        pc = [Signal(signed(32), name=f"C_pc{l}") for l in range(E)]
        sa, sb = shift(w0), shift(w1)
        s_add = ar.sig(unsigned(SB), "s_add", Mux(sa > sb, sa, sb))
        al_a = ar.sig(unsigned(4), "al_a", s_add - sa)
        al_b = ar.sig(unsigned(4), "al_b", s_add - sb)
        k = k_reg
        kpos = ar.sig(unsigned(7), "kpos", Mux(k > 0, k, 0))
        kneg = ar.sig(unsigned(5), "kneg", Mux(k < 0, -k, 0))
        dst_hi = Mux(dst_acc, INT32_MAX, 127)
        dst_lo = Mux(dst_acc, INT32_MIN, -128)
        for l in range(E):
            a_ = B.x[l]
            # Widths here and in stage B are the values' bounds (or the bit-exact model's int64
            # wrap), so that Verilator evaluates no expression wider than 64 bits (rshr's internal
            # sum is one bit wider than its width, hence its widths of at most 63):
            # scale x * M < 2^47; gelu |x| * M < 2^47; add x * Ma, h * Mb < 2^47, aligned by at most
            # 15 bits (vn.ADD_ALIGN_MAX), so the sum < 2^63; softmax d * M < 2^57; norm d < 2^52.
            # mul and rope: x * h and the rope sums in int64 (exact but for the rope corner where
            # all four operands are -2^31), times M modulo 2^64, as vn.vec_mul / vn.vec_rope
            # compute them in numpy's int64.
            y_scale = ar.rhe(pa[l], shift(w0), 48, "y_scale")
            # gelu / silu
            z = ar.rshr(pa[l], shift(w0), 50, "gz")
            zu = ar.sig(unsigned(49), "gzu", z)
            g_gelu = ar.pq(vn.GELU_TABLE, zu, "pq_gelu")
            g_silu = ar.pq(vn.SILU_TABLE, zu, "pq_silu")
            g = Mux(func == F_GELU, g_gelu, g_silu)
            gm = ar.sig(signed(20), "gm", Mux(a_ < 0, (1 << vn.PQ_OUT_BITS) - g, g))
            # add
            tot = ar.sig(signed(64), "add_tot", (pa[l][:48].as_signed() << al_a) + (pb[l][:48].as_signed() << al_b))
            y_add = ar.rhe(tot, s_add, 64, "y_add")
            y_mul = ar.rhe(ar.mul64(pa[l], mult(w0), "pm"), shift(w0), 64, "y_mul")
            # softmax exponent
            u0 = ar.rshr(pa[l], shift(w0), 59, "su")
            umax = (1 << (vn.EXP_FRAC_BITS + 5)) - 1
            u = ar.sig(unsigned(22), "u", Mux(u0 > umax, umax, u0))
            ev = ar.pq(vn.EXP2_TABLE, u[:vn.EXP_FRAC_BITS], "pq_exp")
            e_sm = ar.rshr(ev, u[vn.EXP_FRAC_BITS:], 20, "e_sm")
            # norm deviation: stage D reads its low 20 bits only
            e_n = ar.sig(signed(20), "e_n", Mux(k > 0, ar.rshr(pa[l], kpos, 53, "e_r"), pa[l][:20] << kneg))
            # every result fits 32 bits: saturated int32, the gate, the exponent, 20 bits of e
            res = Signal(signed(32), name=f"C_in{l}")
            with m.Switch(Cat(func, kind)):
                with m.Case(F_SCALE | K_VMAP << 3, F_MUL | K_VBIN << 3, F_ROPE | K_VBIN << 3):
                    sel = Mux(kind == K_VMAP, y_scale, y_mul)
                    m.d.comb += res.eq(ar.sat(sel, dst_lo, dst_hi, 64, "sat_sm"))
                with m.Case(F_GELU | K_VMAP << 3, F_SILU | K_VMAP << 3):
                    m.d.comb += res.eq(gm)
                with m.Case(F_ADD | K_VBIN << 3):
                    m.d.comb += res.eq(ar.sat(y_add, dst_lo, dst_hi, 64, "sat_add"))
                with m.Case(F_SOFTMAX | K_VROW << 3):
                    m.d.comb += res.eq(Mux(B.sv[l], e_sm, 0))
                with m.Default():
                    m.d.comb += res.eq(e_n)
            m.d.sync += pc[l].eq(res)

        # ------------------------------------------------------------ stage D
        D = Stage("D")
        m.d.sync += [D.valid.eq(C_.valid), D.pas.eq(C_.pas), D.out.eq(C_.out), D.last.eq(C_.last),
                     D.addr.eq(C_.addr)]
        yd = [Signal(signed(32), name=f"D_y{l}") for l in range(E)]
        so15 = ar.sig(unsigned(7), "so15", shift(w1) + vn.PQ_OUT_BITS)
        sh = ar.sig(unsigned(6), "norm_sh", w0[:6])
        bsh = ar.sig(unsigned(5), "norm_bsh", sh - 16)
        e_terms = []
        e2_terms = []
        # Operand widths below are the values' proven bounds, not the expressions' natural widths:
        # products of at most 64 bits run as native integers in Verilator, wider ones as multi-word
        # arithmetic, several times slower (these four took most of the twin's time).
        for l in range(E):
            x = C_.x[l]
            # gelu/silu: the gate gm in [0, 2^15] (the PQ tables' outputs span [2^14, 2^15]), so
            # gm * mult < 2^31 and x * (gm * mult) fits 63 bits
            gmm = ar.sig(signed(32), "gelu_gm", pc[l][:16] * mult(w1))
            y_g = ar.rhe(x * gmm, so15, 63, "y_gelu")
            # softmax: e in [0, 2^15]; a row with a valid key sums to at least 2^15 (its maximum's
            # e), so the reciprocal Q * 2^32 / sum < 2^28 (rows without one are masked to 0)
            p_sm = ar.rhe(pc[l][:16] * recip[:28], Const(32, 6), 45, "p_sm")
            p_c = Mux(p_sm > q_val, q_val, p_sm)
            e = ar.sig(signed(20), "e_norm", pc[l])
            # norms: max |e| >= 2^12, so V >= 2^24, sqrt >= 2^20 and the reciprocal 2^56 / sqrt
            # <= 2^36 (a row with V = 0 gives z = 0 whatever the product); |e| <= sqrt(V) makes
            # |z| <= 2^20, and |ntot| < 2^51 + 2^55 (gains and biases int32, the bias shift <= 24)
            zz = ar.rshr(e * recip[:37], Const(vn._NORM_RECIP_BITS - 8 - vn.NORM_Z_BITS, 6), 58, "z_norm")
            z = ar.sig(signed(22), "z", Mux(vzero, 0, zz))
            ntot = ar.sig(signed(64), "ntot", z * C_.h1[l] + Mux(func == F_LAYERNORM, C_.h2[l] << bsh, 0))
            y_n = ar.rhe(ntot, sh, 63, "y_norm")
            res = Signal(signed(32), name=f"D_in{l}")
            with m.Switch(Cat(func, kind)):
                with m.Case(F_GELU | K_VMAP << 3, F_SILU | K_VMAP << 3):
                    m.d.comb += res.eq(ar.sat(y_g, dst_lo, dst_hi, 64, "sat_g"))
                with m.Case(F_SOFTMAX | K_VROW << 3):
                    m.d.comb += res.eq(Mux(s_any & C_.sv[l], p_c, 0))
                with m.Case(F_LAYERNORM | K_VROW << 3, F_RMSNORM | K_VROW << 3):
                    m.d.comb += res.eq(Mux(C_.lv[l], ar.sat(y_n, dst_lo, dst_hi, 64, "sat_n"), 0))
                with m.Default():
                    m.d.comb += res.eq(pc[l])
            m.d.sync += yd[l].eq(res)
            e_terms.append(ar.sig(signed(20), "e_t", Mux(C_.sv[l], pc[l][:20], 0)))
            e2_terms.append(ar.sig(unsigned(36), "e2_t", Mux(C_.lv[l], e * e, 0)))
        s_beat = ar.tree(e_terms, lambda a, b: a + b, 40, "s_beat")
        v_beat = ar.tree(e2_terms, lambda a, b: a + b, 52, "v_beat")
        with m.If(C_.valid & (C_.pas == 2)):
            with m.If(C_.first):
                m.d.sync += [S_sum.eq(s_beat), V_sum.eq(v_beat)]
            with m.Else():
                m.d.sync += [S_sum.eq(S_sum + s_beat), V_sum.eq(V_sum + v_beat)]
        m.d.comb += exit_d.eq(D.valid)

        # ------------------------------------------------------------ output FIFO
        entry = data.StructLayout({"acc": 1, "last": 1, "addr": 20, "data": 32 * E})
        m.submodules.outq = outq = fifo.SyncFIFOBuffered(width=entry.size, depth=FIFO_DEPTH)
        w = data.View(entry, outq.w_data)
        ms_val = ar.sig(signed(32), "ms_val", Mux(func == F_MAX, r_max,
                                                  Mux(r_sum > INT32_MAX, INT32_MAX, Mux(r_sum < INT32_MIN, INT32_MIN, r_sum))))
        with m.If(D.valid & D.out):
            m.d.comb += [outq.w_en.eq(1), w.acc.eq(dst_acc), w.last.eq(D.last), w.addr.eq(D.addr),
                         w.data.eq(Cat(*yd))]
        with m.Elif(push_ms):
            m.d.comb += [outq.w_en.eq(1), w.acc.eq(1), w.last.eq(i_row + 1 == M), w.addr.eq(d_base + i_row),
                         w.data.eq(Cat(ms_val, Const(0, 32 * (E - 1))))]
        head = data.View(entry, outq.r_data)
        hd = [head.data[32 * l:32 * l + 8] for l in range(E)]
        m.d.comb += [
            self.sp_write.valid.eq(outq.r_rdy & ~head.acc),
            self.sp_write.addr.eq(head.addr),
            self.sp_write.data.eq(Cat(*hd)),
            self.acc_write.valid.eq(outq.r_rdy & head.acc),
            self.acc_write.addr.eq(head.addr),
            self.acc_write.data.eq(head.data),
            pop.eq(outq.r_rdy & Mux(head.acc, self.acc_write.ready, self.sp_write.ready)),
            outq.r_en.eq(pop),
        ]
        with m.If(pop & head.last):
            m.d.comb += self.complete.eq(1)
        return m
