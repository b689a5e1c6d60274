"""REQUANT datapath: int32 accumulator values to int8, ``lanes`` elements per cycle.

Per lane, exactly as hw/isa.py's REQUANT (and :func:`weft.sim.golden.requantize`):

    M = w[15:0] (unsigned), s = w[21:16]
    y = round_half_to_even((x + b) * M / 2**s)     computed exactly (x + b is 33 bits)
    y = clamp(y, -128, 127); if relu: y = max(y, 0)

Scale-word bits [31:22] are reserved (the ISA requires them to be zero); this datapath
ignores them.

Pipeline (:class:`Requantizer`), one beat of ``lanes`` elements per cycle, no stalls:

1. ``x + b`` (33-bit sum);
2. two partial products, ``sum[16:0] * M`` and ``sum[32:17] * M`` (each fits an
   18x18 hard multiplier; the 32x16 product needs two per lane);
3. combine the partial products (50-bit signed product);
4. arithmetic shift by ``s - 1`` plus a sticky bit of the bits below;
5. round half to even, saturate, ReLU; registered output.

**Latency** 5 cycles (:attr:`Requantizer.latency`): a beat presented with ``inp.valid``
in cycle c appears on ``out`` with ``out.valid`` in cycle c + 5. **Throughput** 1 beat
per cycle. An optional ``tag`` travels with each beat.
"""

from __future__ import annotations

from amaranth.hdl import Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .config import AcceleratorConfig
from .isa import REQUANT_MULT_BITS, REQUANT_SHIFT_BITS

__all__ = ["Requantizer", "requant_input_signature", "requant_output_signature"]

SUM_BITS = 33
PROD_BITS = SUM_BITS + REQUANT_MULT_BITS + 1  # 50: signed 33 x unsigned 16, exact


def requant_input_signature(lanes: int, tag_bits: int = 0) -> wiring.Signature:
    """Producer's view: ``valid``, ``x``/``bias`` (lanes x int32), ``scale`` (lanes x 32-bit
    scale words), ``relu``, optional ``tag``."""
    members = {
        "valid": Out(1),
        "x": Out(data.ArrayLayout(signed(32), lanes)),
        "bias": Out(data.ArrayLayout(signed(32), lanes)),
        "scale": Out(data.ArrayLayout(unsigned(32), lanes)),
        "relu": Out(1),
    }
    if tag_bits:
        members["tag"] = Out(tag_bits)
    return wiring.Signature(members)


def requant_output_signature(lanes: int, tag_bits: int = 0) -> wiring.Signature:
    """Producer's view: ``valid``, ``y`` (lanes x int8), optional ``tag``."""
    members = {"valid": Out(1), "y": Out(data.ArrayLayout(signed(8), lanes))}
    if tag_bits:
        members["tag"] = Out(tag_bits)
    return wiring.Signature(members)


class Requantizer(wiring.Component):
    """``lanes``-wide pipelined requantizer. Ports ``inp`` (in) and ``out`` (out); latency 5."""

    latency = 5

    def __init__(self, lanes: int, *, tag_bits: int = 0):
        for name, value, lo, hi in (("lanes", lanes, 1, 256), ("tag_bits", tag_bits, 0, 64)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
            if not lo <= value <= hi:
                raise ValueError(f"{name}={value} is outside [{lo}, {hi}]")
        self.lanes, self.tag_bits = lanes, tag_bits
        super().__init__({
            "inp": In(requant_input_signature(lanes, tag_bits)),
            "out": Out(requant_output_signature(lanes, tag_bits)),
        })

    @classmethod
    def from_config(cls, config: AcceleratorConfig, **kwargs) -> "Requantizer":
        if not isinstance(config, AcceleratorConfig):
            raise ValueError(f"expected an AcceleratorConfig, got {type(config).__name__}")
        return cls(config.vector.lanes, **kwargs)

    def elaborate(self, platform):
        m = Module()
        inp = self.inp
        MB, SB = REQUANT_MULT_BITS, REQUANT_SHIFT_BITS
        LO = 17  # low partial-product operand bits (unsigned)

        # per-beat control pipeline: valid, relu, tag
        valid, relu = inp.valid, inp.relu
        tag = inp.tag if self.tag_bits else None
        ctl = []
        for d in range(self.latency):
            v_n, r_n = Signal(name=f"valid_{d}"), Signal(name=f"relu_{d}")
            m.d.sync += [v_n.eq(valid), r_n.eq(relu)]
            valid, relu = v_n, r_n
            ctl.append(r_n)
            if tag is not None:
                t_n = Signal(self.tag_bits, name=f"tag_{d}")
                m.d.sync += t_n.eq(tag)
                tag = t_n
        m.d.comb += self.out.valid.eq(valid)
        if tag is not None:
            m.d.comb += self.out.tag.eq(tag)
        relu4 = ctl[3]  # relu as seen by stage 5 (registered 4 times)

        for i in range(self.lanes):
            # stage 1: exact 33-bit sum; split the scale word
            s1_sum = Signal(signed(SUM_BITS), name=f"sum_{i}")
            s1_m = Signal(MB, name=f"mult1_{i}")
            s1_s = Signal(SB, name=f"shift1_{i}")
            m.d.sync += [
                s1_sum.eq(inp.x[i] + inp.bias[i]),
                s1_m.eq(inp.scale[i][:MB]),
                s1_s.eq(inp.scale[i][MB:MB + SB]),
            ]
            # stage 2: partial products
            p_lo = Signal(LO + MB, name=f"p_lo_{i}")
            p_hi = Signal(signed(SUM_BITS - LO + MB + 1), name=f"p_hi_{i}")
            s2_s = Signal(SB, name=f"shift2_{i}")
            m.d.sync += [
                p_lo.eq(s1_sum[:LO] * s1_m),
                p_hi.eq(s1_sum[LO:].as_signed() * s1_m),
                s2_s.eq(s1_s),
            ]
            # stage 3: exact product
            prod = Signal(signed(PROD_BITS), name=f"prod_{i}")
            s3_s = Signal(SB, name=f"shift3_{i}")
            m.d.sync += [prod.eq((p_hi << LO) + p_lo), s3_s.eq(s2_s)]
            # stage 4: q2 = prod >> (s - 1) (arithmetic), sticky = bits below s - 1
            sm1 = Signal(SB, name=f"sm1_{i}")
            m.d.comb += sm1.eq(s3_s - 1)
            q2 = Signal(signed(PROD_BITS), name=f"q2_{i}")
            sticky = Signal(name=f"sticky_{i}")
            mask = Signal(PROD_BITS, name=f"mask_{i}")
            m.d.comb += [
                q2.eq(prod >> sm1),
                mask.eq((Const(1, PROD_BITS + 1) << sm1) - 1),
                sticky.eq((prod.as_unsigned() & mask) != 0),
            ]
            q = Signal(signed(PROD_BITS), name=f"q_{i}")
            up = Signal(name=f"round_up_{i}")
            s0 = s3_s == 0
            m.d.sync += [
                q.eq(Mux(s0, prod, q2 >> 1)),
                up.eq(~s0 & q2[0] & (sticky | q2[1])),
            ]
            # stage 5: round, saturate, relu
            r = Signal(signed(PROD_BITS + 1), name=f"rounded_{i}")
            m.d.comb += r.eq(q + up)
            sat = Signal(signed(8), name=f"sat_{i}")
            m.d.comb += sat.eq(Mux(r > 127, 127, Mux(r < -128, -128, r)))
            m.d.sync += self.out.y[i].eq(Mux(relu4 & sat[7], 0, sat))
        return m
