"""cocotb bench for weft.hw.memory Scratchpad and Accumulator (run by tests/hw/test_memory.py).

Reference: a Python dict per memory, the documented priority arbitration (port 0 wins a
bank), read latency 1, transparent reads, and for the accumulator the MATMUL rule
(acc = acc + P modulo 2^32, or overwrite), with updates written two cycles after they
are presented and visible to reads from the next cycle on.
"""

from __future__ import annotations

import random

import cocotb
from cocotb.triggers import Timer

from weft.sim.benchlib import Cycle, pack, params, unpack

P = params()
KIND, DEPTH, ELEMS, BANKS = P["kind"], P["depth"], P["elems"], P["banks"]
RP, WP = P["read_ports"], P.get("write_ports", 0)
WIDTH = 8 if KIND == "scratchpad" else 32
LO, HI = -(1 << (WIDTH - 1)), (1 << (WIDTH - 1)) - 1


#: Model contents; lives as long as the simulation (reset does not clear RAM).
MEM: dict[int, list[int]] = {}


def wrap32(v: int) -> int:
    return (v + (1 << 31)) % (1 << 32) - (1 << 31)


def rand_row(rng: random.Random) -> list[int]:
    return [rng.choice([LO, HI, rng.randint(LO, HI)]) for _ in range(ELEMS)]


def handle(dut, port: str, field: str):
    return getattr(dut, f"{port}__{field}")


async def run(dut, cycles: int, seed: int, hot_rows: int, p_req: float):
    rng = random.Random(seed)
    clk = Cycle(dut)
    idle = [(handle(dut, f"read{i}", "valid"), 0) for i in range(RP)]
    idle += [(handle(dut, f"write{i}", "valid"), 0) for i in range(WP)]
    if KIND == "accumulator":
        idle.append((dut.update__valid, 0))
    await clk.start(idle=idle)
    mem = MEM  # memories keep their contents across reset, so across cocotb tests too
    hot = [rng.randrange(DEPTH) for _ in range(hot_rows)]  # few rows: many conflicts and RAW chains
    pending_update = None  # accumulator: (addr, data, accumulate) presented last cycle
    checked = 0

    def pick_addr():
        return rng.choice(hot) if rng.random() < 0.7 else rng.randrange(DEPTH)

    for cycle in range(cycles):
        # ---- requests
        reads = [(i, pick_addr()) for i in range(RP) if rng.random() < p_req]
        writes = [(i, pick_addr(), rand_row(rng)) for i in range(WP) if rng.random() < p_req]
        for i in range(RP):
            h = handle(dut, f"read{i}", "valid")
            h.value = 0
        for i, addr in reads:
            handle(dut, f"read{i}", "valid").value = 1
            handle(dut, f"read{i}", "addr").value = addr
        for i in range(WP):
            handle(dut, f"write{i}", "valid").value = 0
        for i, addr, row in writes:
            handle(dut, f"write{i}", "valid").value = 1
            handle(dut, f"write{i}", "addr").value = addr
            handle(dut, f"write{i}", "data").value = pack(row, WIDTH)
        update = None
        if KIND == "accumulator":
            if rng.random() < 0.8:
                update = (pick_addr(), rand_row(rng), int(rng.random() < 0.75))
            dut.update__valid.value = int(update is not None)
            if update:
                dut.update__addr.value = update[0]
                dut.update__data.value = pack(update[1], 32)
                dut.update__accumulate.value = update[2]
        await Timer(1, unit="ns")

        # ---- arbitration model: lower port index wins a bank
        def grants(reqs):
            taken, out = set(), []
            for req in reqs:
                bank = req[1] % BANKS
                if bank not in taken:
                    taken.add(bank)
                    out.append(req)
            return out
        read_grants, write_grants = grants(reads), grants(writes)
        for i in range(RP):
            want = any(r[0] == i for r in read_grants) or not any(r[0] == i for r in reads)
            if any(r[0] == i for r in reads):
                got = int(handle(dut, f"read{i}", "ready").value)
                assert got == int(want), f"cycle {cycle}: read{i}.ready={got}, model {int(want)}"
        for i in range(WP):
            if any(w[0] == i for w in writes):
                want = any(w[0] == i for w in write_grants)
                got = int(handle(dut, f"write{i}", "ready").value)
                assert got == int(want), f"cycle {cycle}: write{i}.ready={got}, model {int(want)}"

        # ---- end of cycle: writes land (scratchpad: now; accumulator: last cycle's update)
        for _, addr, row in write_grants:
            mem[addr] = row
        if pending_update is not None:
            addr, data, acc = pending_update
            old = mem.get(addr, [0] * ELEMS)
            mem[addr] = [wrap32(o + d) for o, d in zip(old, data)] if acc else list(data)
        pending_update = update
        expect = [(i, addr, list(mem.get(addr, [0] * ELEMS))) for i, addr in read_grants]

        await clk.next()
        # ---- read responses (latency 1)
        for i in range(RP):
            rvalid = int(handle(dut, f"read{i}", "rvalid").value)
            mine = [e for e in expect if e[0] == i]
            assert rvalid == len(mine), f"cycle {cycle + 1}: read{i}.rvalid={rvalid}, expected {len(mine)}"
            if mine:
                data = unpack(int(handle(dut, f"read{i}", "rdata").value), WIDTH, ELEMS)
                assert data == mine[0][2], f"cycle {cycle + 1}: read{i} row {mine[0][1]}: got {data}, expected {mine[0][2]}"
                checked += 1
    # drain: the last update is still in the RMW pipeline
    for i in range(RP):
        handle(dut, f"read{i}", "valid").value = 0
    for i in range(WP):
        handle(dut, f"write{i}", "valid").value = 0
    if KIND == "accumulator":
        dut.update__valid.value = 0
        if pending_update is not None:
            addr, data, acc = pending_update
            old = mem.get(addr, [0] * ELEMS)
            mem[addr] = [wrap32(o + d) for o, d in zip(old, data)] if acc else list(data)
    await clk.next()
    await clk.next()
    assert checked > cycles // 4, f"only {checked} reads checked"


@cocotb.test()
async def random_traffic_conflicts(dut):
    """Few hot rows: bank conflicts, same-row write/read in one cycle, RMW chains on one row."""
    await run(dut, 400, P["seed"], hot_rows=3, p_req=0.7)


@cocotb.test()
async def random_traffic_spread(dut):
    """Addresses all over the memory."""
    await run(dut, 300, P["seed"] + 1, hot_rows=max(2, BANKS * 2), p_req=0.5)
