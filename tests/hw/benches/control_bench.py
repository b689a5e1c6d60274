"""cocotb bench of weft.hw.control.Controller against the ISA's scheduling rules.

The pytest side (tests/hw/test_control.py) sends programs the bit-exact model has run
to completion, with the number of tokens each instruction waits for and signals. This
bench serves instruction fetches from a program memory with random gaps, plays the four
units with random ready and random, in-order completion latencies, and checks:

* each queue issues its instructions in program order (no overtaking);
* the n-th wait on (producer, consumer) issues only after the n-th signal on that pair
  was released by a completion (tokens are never spent before they exist);
* tokens outstanding on a pair never exceed token_max;
* FENCE: everything before it completed before anything after it issues;
* HALT: `done` once, after every instruction completed, with the expected error cause.
"""

from __future__ import annotations

import random

import cocotb

from weft.sim.benchlib import Cycle, params

QUEUES = ["load", "matmul", "vector", "store"]


@cocotb.test()
async def run_programs(dut):
    p = params()
    rng = random.Random(p["seed"])
    clock = Cycle(dut)
    idle = [(dut.start, 0), (dut.fetch_req__ready, 0), (dut.fetch_data__valid, 0)]
    idle += [(getattr(dut, f"issue_{q}__ready"), 0) for q in QUEUES]
    idle += [(getattr(dut, f"complete_{q}"), 0) for q in QUEUES]
    await clock.start(idle=idle)
    for case in p["programs"]:
        await run_one(dut, clock, rng, case, p["token_max"])


async def run_one(dut, clock, rng, case, token_max):
    words = [int(w, 16) for w in case["words"]]
    meta = case["meta"]  # per instruction: {"queue": int|None, "wait": [..], "signal": [..], "kind": str}
    base = 0x1000
    dut.program_addr.value = base
    dut.program_count.value = case.get("count", len(words))
    # No handshakes in the cycles this function does not observe.
    dut.fetch_req__ready.value = 0
    for port in QUEUES:
        getattr(dut, f"issue_{port}__ready").value = 0
    dut.start.value = 1
    await clock.next()
    dut.start.value = 0

    pending_fetch: list[int] = []  # instruction indices requested, not yet delivered
    unit_fifo = {q: [] for q in range(4)}  # (index, earliest completion edge), in issue order
    issued_order = {q: [] for q in range(4)}
    issue_edge: dict[int, int] = {}
    complete_edge: dict[int, int] = {}
    expected_queue_order = {q: [i for i, m in enumerate(meta) if m["queue"] == q] for q in range(4)}
    done_cycles = []
    for _ in range(case.get("max_cycles", 20000)):
        # Falling edge n: outputs show the state after rising edge n. Inputs driven now are
        # sampled at rising edge n + 1, which is where a handshake seen now takes effect.
        n = await clock.next()
        if int(dut.done.value):
            done_cycles.append(n)
            assert int(dut.error_cause.value) == case["cause"], \
                f"{case['name']}: error_cause {int(dut.error_cause.value)}, expected {case['cause']}"
            assert int(dut.error.value) == int(case["cause"] != 0)
        edge = n + 1
        ready = int(rng.random() < 0.7)
        dut.fetch_req__ready.value = ready
        if ready and int(dut.fetch_req__valid.value):
            payload = int(dut.fetch_req__payload.value)
            addr, count = payload & 0xFFFFFFFF, payload >> 32
            first = (addr - base) // 16
            pending_fetch += list(range(first, first + count))
        if pending_fetch and rng.random() < 0.8:
            index = pending_fetch.pop(0)  # fetch_data.ready is always high
            dut.fetch_data__valid.value = 1
            dut.fetch_data__payload.value = words[index] if index < len(words) else 0
        else:
            dut.fetch_data__valid.value = 0
        for q in range(4):
            port = QUEUES[q]
            fifo = unit_fifo[q]
            finishing = bool(fifo) and fifo[0][1] <= n
            getattr(dut, f"complete_{port}").value = int(finishing)
            if finishing:
                complete_edge[fifo.pop(0)[0]] = edge
            ready = int(rng.random() < 0.75)
            getattr(dut, f"issue_{port}__ready").value = ready
            if ready and int(getattr(dut, f"issue_{port}__valid").value):
                word = int(getattr(dut, f"issue_{port}__payload").value)
                expect = expected_queue_order[q][len(issued_order[q])]
                while meta[expect]["kind"] == "token":  # consumed inside the controller
                    issued_order[q].append(None)
                    expect = expected_queue_order[q][len(issued_order[q])]
                assert word == words[expect], (f"{case['name']}: {port}: issued {word:032x}, expected instruction {expect} "
                                               f"{words[expect]:032x} (overtaking or corruption)")
                issued_order[q].append(expect)
                issue_edge[expect] = edge
                fifo.append((expect, edge + rng.choice([0, 0, 1, 4, 11])))
        if done_cycles:
            break
    else:
        raise AssertionError(f"program {case['name']} did not finish (issued "
                             f"{ {QUEUES[q]: len(v) for q, v in issued_order.items()} })")
    for q in range(4):
        getattr(dut, f"complete_{QUEUES[q]}").value = 0
    dut.fetch_data__valid.value = 0
    await clock.next()  # `done` shows in the last busy cycle; start is accepted once idle
    assert not int(dut.busy.value)
    assert len(done_cycles) == 1
    if case["cause"] != 0:
        return
    # Every unit instruction issued exactly once, in program order, and completed.
    for q in range(4):
        unit_instrs = [i for i in expected_queue_order[q] if meta[i]["kind"] != "token"]
        got = [i for i in issued_order[q] if i is not None]
        assert got == unit_instrs, f"{QUEUES[q]}: issued {got}, expected {unit_instrs}"
        assert all(i in complete_edge for i in unit_instrs)
    if not case["check_tokens"]:
        return
    # Token causality: a completion at edge c releases its tokens for issues from edge c + 1.
    released = [[0] * 4 for _ in range(4)]
    spent = [[0] * 4 for _ in range(4)]
    events = sorted([(issue_edge[i], 0, i) for i in issue_edge] + [(complete_edge[i], 1, i) for i in complete_edge])
    for edge, kind, i in events:
        m = meta[i]
        if kind == 1:
            for r in m["signal"]:
                released[m["queue"]][r] += 1
                outstanding = released[m["queue"]][r] - spent[m["queue"]][r]
                assert outstanding <= token_max, f"{outstanding} tokens on {QUEUES[m['queue']]}->{QUEUES[r]}"
        else:
            for p_ in m["wait"]:
                spent[p_][m["queue"]] += 1
                assert spent[p_][m["queue"]] <= released[p_][m["queue"]], (
                    f"instruction {i} issued at edge {edge} before its token from {QUEUES[p_]} was released")
    # Fences: nothing after one issues before everything before it has completed.
    for f_index, m in enumerate(meta):
        if m["kind"] != "fence":
            continue
        before = [complete_edge[i] for i in range(f_index) if i in complete_edge]
        after = [issue_edge[i] for i in range(f_index + 1, len(meta)) if i in issue_edge]
        if before and after:
            assert max(before) < min(after), f"fence {f_index} crossed"
    assert max(complete_edge.values(), default=0) <= done_cycles[0]
