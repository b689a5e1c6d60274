"""cocotb bench for weft.hw.requant.Requantizer (run by tests/hw/test_requant.py).

Two references: a pure-Python one written from hw/isa.py's REQUANT text with exact
fractions, and weft.sim.golden.requantize (the bit-exact model); both must agree with
the RTL on every beat.
"""

from __future__ import annotations

import random
from fractions import Fraction

import cocotb
import numpy as np

from weft.sim.benchlib import Cycle, pack, params, unpack
from weft.sim.golden import requantize

P = params()
LANES, LAT = P["lanes"], P["latency"]
I32 = (-(1 << 31), (1 << 31) - 1)


def ref_isa(x: int, b: int, w: int, relu: bool) -> int:
    """REQUANT per hw/isa.py: y = round_half_to_even((x + b) * M / 2^s), saturate, relu."""
    mult, shift = w & 0xFFFF, (w >> 16) & 0x3F
    v = Fraction((x + b) * mult, 1 << shift)
    y = round(v)  # Python's round() of a Fraction is round-half-to-even, exact
    y = max(-128, min(127, y))
    return max(y, 0) if relu else y


def random_lane(rng: random.Random) -> tuple[int, int, int]:
    kind = rng.random()
    mult = rng.choice([0, 1, 0xFFFF, 0x8000, rng.randrange(1 << 16)])
    shift = rng.choice([0, 1, 63, 62, 31, 16, rng.randrange(64)])
    if kind < 0.2:  # exact ties: (x + b) * M = (2q + 1) * 2^(s - 1)
        shift = rng.randrange(1, 24)
        mult = 1 << rng.randrange(0, min(shift, 16))
        q = rng.randrange(-300, 300)
        total = ((2 * q + 1) << (shift - 1)) // mult
        b = rng.randrange(-1000, 1000)
        return total - b, b, mult | shift << 16
    if kind < 0.35:  # 33-bit sums at the int32 edges
        return rng.choice(I32), rng.choice(I32), mult | shift << 16
    if kind < 0.6:  # near the saturation edges
        shift = rng.randrange(0, 12)
        mult = rng.choice([1, 3, 255])
        target = rng.choice([127, 128, -128, -129, 126, -127]) * (1 << shift) + rng.randrange(-3, 4)
        return target // max(mult, 1), 0, mult | shift << 16
    return rng.randrange(*I32), rng.randrange(-(1 << 20), 1 << 20), mult | shift << 16


async def run_beats(dut, beats, gap: float, seed: int):
    rng = random.Random(seed)
    clk = Cycle(dut)
    await clk.start(idle=[(dut.inp__valid, 0)])
    expected, got = [], []
    i, cycle = 0, 0
    while i < len(beats) or (expected and cycle < expected[-1][0] + 2):
        send = i < len(beats) and rng.random() >= gap
        dut.inp__valid.value = int(send)
        if send:
            xs, bs, ws, relu = beats[i]
            dut.inp__x.value = pack(xs, 32)
            dut.inp__bias.value = pack(bs, 32)
            dut.inp__scale.value = pack(ws, 32)
            dut.inp__relu.value = int(relu)
            want = [ref_isa(x, b, w, relu) for x, b, w in zip(xs, bs, ws)]
            gold = requantize(np.array(xs), np.array(bs), np.array(ws), relu).tolist()
            assert want == gold, f"references disagree on beat {i}: isa text {want}, golden {gold}"
            expected.append((cycle + LAT, want, (xs, bs, ws, relu)))
            i += 1
        await clk.next()
        cycle += 1
        if int(dut.out__valid.value):
            got.append((cycle, unpack(int(dut.out__y.value), 8, LANES)))
        assert cycle < 100000
    assert len(got) == len(expected), f"{len(got)} beats out, expected {len(expected)}"
    for n, (g, e) in enumerate(zip(got, expected)):
        assert g[0] == e[0], f"beat {n}: out in cycle {g[0]}, expected {e[0]} (latency {LAT})"
        assert g[1] == e[1], f"beat {n}: got {g[1]}, expected {e[1]} for x, b, w, relu = {e[2]}"


def make_beats(rng: random.Random, count: int, relu=None):
    beats = []
    for _ in range(count):
        lanes = [random_lane(rng) for _ in range(LANES)]
        r = rng.random() < 0.5 if relu is None else relu
        beats.append(([l[0] for l in lanes], [l[1] for l in lanes], [l[2] for l in lanes], r))
    return beats


@cocotb.test()
async def back_to_back(dut):
    """Random beats every cycle: ties, saturation, shift 0 and 63, 33-bit sums, ReLU."""
    rng = random.Random(P["seed"])
    await run_beats(dut, make_beats(rng, 150), gap=0.0, seed=P["seed"])


@cocotb.test()
async def bubbles(dut):
    """Beats with random gaps keep their order and latency."""
    rng = random.Random(P["seed"] + 1)
    await run_beats(dut, make_beats(rng, 60), gap=0.4, seed=P["seed"] + 1)


@cocotb.test()
async def corner_table(dut):
    """Hand-picked corners, each checked on every lane."""
    corners = [
        (5, 0, 1 | 1 << 16, False),    # 2.5 -> 2 (tie to even)
        (7, 0, 1 | 1 << 16, False),    # 3.5 -> 4
        (-5, 0, 1 | 1 << 16, False),   # -2.5 -> -2
        (-7, 0, 1 | 1 << 16, False),   # -3.5 -> -4
        (-1, 0, 1 | 1 << 16, False),   # -0.5 -> 0
        (I32[1], I32[1], 0xFFFF, False),          # (2^32 - 2) * 65535: saturates to 127
        (I32[0], I32[0], 0xFFFF | 63 << 16, False),  # -2^48 / 2^63 -> 0
        (I32[0], I32[0], 0xFFFF | 49 << 16, False),  # -2^32 * 65535 / 2^49 = -0.49998 -> 0
        (I32[0], I32[0], 0x8000 | 48 << 16, False),  # -2^47 / 2^48 = -0.5 -> 0 (even)
        (I32[0], -1, 0x8000 | 48 << 16, False),      # just below -0.5 -> -1
        (-300, 0, 1, True),            # relu of a saturated negative
        (300, 0, 1, True),
        (0, 0, 0, False),
    ]
    beats = [([c[0]] * LANES, [c[1]] * LANES, [c[2]] * LANES, c[3]) for c in corners]
    await run_beats(dut, beats, gap=0.0, seed=0)
