"""cocotb bench for weft.hw.array.SystolicArray (run by tests/hw/test_array.py).

Reference model: numpy matmul with PRELOAD/MATMUL masking (W[t][j] = 0 for t >= k_w or
j >= n_w; A[t] = 0 for t >= k), a double-buffered weight model (loads write the shadow
bank, a swap applies to the row presented in the same cycle), and the documented timing
(result row of an input presented in cycle c appears in cycle c + latency).
"""

from __future__ import annotations

import random

import cocotb
import numpy as np
from cocotb.triggers import Timer

from weft.sim.benchlib import Cycle, pack, params, unpack

P = params()
R, C = P["rows"], P["cols"]
LAT, DRAIN = P["latency"], P["drain"]
TAG_BITS = P.get("tag_bits", 0)


def rand_int8(rng: np.random.Generator, shape, extreme: float = 0.25) -> np.ndarray:
    """Random int8 with a good share of -128 and 127."""
    x = rng.integers(-128, 128, size=shape)
    pick = rng.random(shape)
    x = np.where(pick < extreme / 2, -128, x)
    x = np.where((pick >= extreme / 2) & (pick < extreme), 127, x)
    return x.astype(np.int64)


class Tile:
    """One PRELOAD (W, k_w, n_w) followed by one MATMUL (rows of A, each with its k)."""

    def __init__(self, w: np.ndarray, k_w: int, n_w: int, a: np.ndarray, k_a: list[int]):
        self.w, self.k_w, self.n_w, self.a, self.k_a = w, k_w, n_w, a, k_a

    def masked_w(self) -> np.ndarray:
        w = self.w.copy()
        w[self.k_w:, :] = 0
        w[:, self.n_w:] = 0
        return w


def expected_row(w_eff: np.ndarray, a: np.ndarray, k: int) -> list[int]:
    a = a.copy()
    a[k:] = 0
    out = a @ w_eff  # int64, exact
    assert np.all(np.abs(out) < 2**31)
    return [int(v) for v in out]


async def run_tiles(dut, tiles: list[Tile], *, gap: float = 0.0, seed: int = 0, check_contiguous: bool = False):
    """Drive the tiles (loads overlapped with the previous tile's rows) and check every output."""
    rng = random.Random(seed)
    clk = Cycle(dut)
    await clk.start(idle=[(dut.inp__valid, 0), (dut.load__valid, 0), (dut.swap, 0)])

    # model state
    banks = [np.zeros((R, C), np.int64), np.zeros((R, C), np.int64)]
    active, drain = 0, 0
    expected: list[tuple[int, list[int], int]] = []  # (cycle, row, tag)
    got: list[tuple[int, list[int], int]] = []
    load_tile, load_row = 0, 0  # next weight row to load
    run_tile, run_row = -1, 0  # tile whose rows stream now
    cycle = 0
    tag_counter = 0
    idle_cycles = 0

    while True:
        # ---- decide this cycle's inputs
        inp_valid, swap, a_vec, k_a, tag = 0, 0, [0] * R, R, 0
        rows_left = run_tile >= 0 and run_row < len(tiles[run_tile].a)
        if not rows_left and run_tile + 1 < len(tiles) and load_tile > run_tile + 1:
            # the next tile is fully loaded: swap together with its first row
            run_tile, run_row, swap = run_tile + 1, 0, 1
            rows_left = True
        want_row = rows_left and (swap or rng.random() >= gap)
        if want_row:
            t = tiles[run_tile]
            a_vec, k_a = [int(x) for x in t.a[run_row]], t.k_a[run_row]
            inp_valid = 1
            tag = tag_counter & ((1 << TAG_BITS) - 1) if TAG_BITS else 0
            tag_counter += 1
        elif swap:
            pass
        ready = int(drain == 0 and not swap)
        load_valid = 0
        if load_tile < len(tiles) and load_tile <= run_tile + 1 and ready:
            load_valid = 1
        lt = tiles[load_tile] if load_valid else None

        # ---- drive
        dut.inp__valid.value = inp_valid
        dut.inp__data.value = pack(a_vec, 8)
        dut.inp__k.value = k_a
        if TAG_BITS:
            dut.inp__tag.value = tag
        dut.swap.value = swap
        dut.load__valid.value = load_valid
        if lt is not None:
            dut.load__row.value = load_row
            dut.load__k.value = lt.k_w
            dut.load__n.value = lt.n_w
            # garbage beyond k_w / n_w must be masked by the array
            dut.load__data.value = pack([int(x) for x in lt.w[load_row]], 8)
        await Timer(1, unit="ns")
        assert int(dut.load__ready.value) == ready, f"cycle {cycle}: load.ready {dut.load__ready.value} != model {ready}"

        # ---- model the rising edge at the end of this cycle
        if swap:
            active ^= 1
        if inp_valid:
            w_eff = banks[active]
            expected.append((cycle + LAT, expected_row(w_eff, np.array(a_vec, np.int64), k_a), tag))
            run_row += 1
        if load_valid:
            row = np.array(lt.w[load_row], np.int64)
            if load_row >= lt.k_w:
                row[:] = 0
            row[lt.n_w:] = 0
            banks[active ^ 1][load_row] = row  # shadow bank (after this cycle's swap: never both)
            load_row += 1
            if load_row == R:
                load_tile, load_row = load_tile + 1, 0
        drain = DRAIN if swap else max(drain - 1, 0)

        await clk.next()
        cycle += 1
        # ---- sample outputs (state after the edge = cycle `cycle`)
        if int(dut.out__valid.value):
            data = unpack(int(dut.out__data.value), 32, C)
            got.append((cycle, data, int(dut.out__tag.value) if TAG_BITS else 0))
        done = run_tile == len(tiles) - 1 and run_row >= len(tiles[-1].a)
        if done:
            idle_cycles += 1
            if idle_cycles > LAT + 2:
                break
        assert cycle < 100000, "bench did not finish"

    assert len(got) == len(expected), f"{len(got)} output rows, expected {len(expected)}"
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g[0] == e[0], f"row {i}: appeared in cycle {g[0]}, expected cycle {e[0]} (latency {LAT})"
        assert g[1] == e[1], f"row {i}: got {g[1]}, expected {e[1]}"
        assert g[2] == e[2], f"row {i}: tag {g[2]}, expected {e[2]}"
    if check_contiguous:
        cycles = [g[0] for g in got]
        assert cycles == list(range(cycles[0], cycles[0] + len(cycles))), "stream was not 1 row/cycle"
    assert int(dut.busy.value) == 0
    return got


def make_tile(rng: np.random.Generator, m: int, *, k_w: int = R, n_w: int = C, k_a=None) -> Tile:
    w = rand_int8(rng, (R, C))
    a = rand_int8(rng, (m, R))
    if k_a is None:
        k_a = [k_w] * m
    elif isinstance(k_a, int):
        k_a = [k_a] * m
    return Tile(w, k_w, n_w, a, list(k_a))


@cocotb.test()
async def latency_single_row(dut):
    """One row through a full tile: the result appears exactly `latency` cycles later."""
    rng = np.random.default_rng(P["seed"])
    got = await run_tiles(dut, [make_tile(rng, 1)])
    assert len(got) == 1


@cocotb.test()
async def full_tiles_extremes(dut):
    """Full tiles, many extreme values, including all -128 (the largest products)."""
    rng = np.random.default_rng(P["seed"] + 1)
    t_max = Tile(np.full((R, C), -128), R, C, np.full((3, R), -128), [R] * 3)
    t_min = Tile(np.full((R, C), 127), R, C, np.full((3, R), -128), [R] * 3)
    await run_tiles(dut, [t_max, t_min, make_tile(rng, 2 * R)])  # short tiles: loads stall


@cocotb.test()
async def partial_tiles(dut):
    """PRELOAD with k < rows, n < cols; MATMUL rows with their own k (garbage beyond k)."""
    rng = np.random.default_rng(P["seed"] + 2)
    tiles = []
    for _ in range(4):
        k_w = int(rng.integers(1, R + 1))
        n_w = int(rng.integers(1, C + 1))
        m = int(rng.integers(1, R + C))
        k_a = [int(rng.integers(0, R + 1)) for _ in range(m)]
        tiles.append(make_tile(rng, m, k_w=k_w, n_w=n_w, k_a=k_a))
    await run_tiles(dut, tiles)


@cocotb.test()
async def back_to_back_swaps(dut):
    """Long tiles back to back: next weights load during compute, the stream never stops."""
    rng = np.random.default_rng(P["seed"] + 3)
    m = DRAIN + R + 2  # long enough to hide the shadow load
    tiles = [make_tile(rng, m) for _ in range(4)]
    await run_tiles(dut, tiles, check_contiguous=True)


@cocotb.test()
async def short_tiles_and_bubbles(dut):
    """Tiles shorter than the load time (loads stall on ready) and random bubbles."""
    rng = np.random.default_rng(P["seed"] + 4)
    tiles = [make_tile(rng, int(rng.integers(1, 4))) for _ in range(5)]
    await run_tiles(dut, tiles, gap=0.3, seed=P["seed"])
