"""RTL tests of the controller (bench: tests/hw/benches/control_bench.py).

Programs are random mixes of instructions on the four queues with tokens; the bit-exact
model runs each one first (with every instruction turned into a TOKEN of its queue, same
tokens) and only programs it completes are sent to the RTL, so the expected behaviour is
the model's, not the controller's own.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from weft.hw.config import AcceleratorConfig, QueueConfig, load_config
from weft.hw.control import ERROR_ILLEGAL, ERROR_NO_HALT, Controller
from weft.hw.isa import Instruction, Mem, Opcode, Queue
from weft.sim.golden import DeadlockError, GoldenMachine
from weft.sim.rtl import run_bench

BENCH = "tests/hw/benches/control_bench.py"


def _unit_instruction(rng: random.Random, q: int, wait, signal) -> Instruction:
    if q == Queue.LOAD or q == Queue.STORE:
        op = Opcode.LOAD if q == Queue.LOAD else Opcode.STORE
        return Instruction.make(op, mem=rng.choice([Mem.SP, Mem.ACC]), local=rng.randrange(1 << 20),
                                dram=rng.randrange(1 << 32), rows=rng.randrange(1 << 16), cols=rng.randrange(1 << 12),
                                stride=rng.randrange(1 << 24), wait=wait, signal=signal)
    if q == Queue.MATMUL:
        return Instruction.make(Opcode.MATMUL, a=rng.randrange(1 << 20), acc=rng.randrange(1 << 20),
                                m=rng.randrange(1 << 16), k=rng.randrange(256), accumulate=rng.randrange(2),
                                wait=wait, signal=signal)
    return Instruction.make(Opcode.REQUANT, src=rng.randrange(1 << 20), dst=rng.randrange(1 << 20),
                            rows=rng.randrange(1 << 16), param=rng.randrange(1 << 20), relu=rng.randrange(2),
                            wait=wait, signal=signal)


def random_program(rng: random.Random, length: int, *, token_instructions: bool, fences: bool):
    program, meta = [], []
    balance = [[0] * 4 for _ in range(4)]  # signals given minus waits taken, per (p, q)
    for _ in range(length):
        if fences and rng.random() < 0.04:
            program.append(Instruction.make(Opcode.FENCE))
            meta.append({"queue": None, "wait": [], "signal": [], "kind": "fence"})
            continue
        q = rng.randrange(4)
        wait = [p for p in range(4) if p != q and balance[p][q] > 0 and rng.random() < 0.6]
        signal = [r for r in range(4) if r != q and rng.random() < 0.35]
        for p in wait:
            balance[p][q] -= 1
        for r in signal:
            balance[q][r] += 1
        if token_instructions and rng.random() < 0.3:
            instr, kind = Instruction.make(Opcode.TOKEN, queue=q, wait=wait, signal=signal), "token"
        else:
            instr, kind = _unit_instruction(rng, q, wait, signal), "unit"
        program.append(instr)
        meta.append({"queue": q, "wait": wait, "signal": signal, "kind": kind})
    program.append(Instruction.make(Opcode.HALT))
    meta.append({"queue": None, "wait": [], "signal": [], "kind": "halt"})
    return program, meta


def golden_completes(config: AcceleratorConfig, program: list[Instruction]) -> bool:
    as_tokens = [i if i.queue is None else Instruction(Opcode.TOKEN, {"queue": int(i.queue)}, i.wait, i.signal)
                 for i in program]
    try:
        GoldenMachine(config, memory_bytes=4096).run(as_tokens)
    except DeadlockError:
        return False
    return True


def _case(name, program, meta, *, cause=0, check_tokens=True, count=None):
    words = [f"{int.from_bytes(i.encode(), 'little'):032x}" for i in program]
    case = {"name": name, "words": words, "meta": meta, "cause": cause, "check_tokens": check_tokens}
    if count is not None:
        case["count"] = count
    return case


def _cases(config: AcceleratorConfig, seed: int) -> list[dict]:
    rng = random.Random(seed)
    cases = []
    while len(cases) < 6:
        token_instr = len(cases) >= 4
        program, meta = random_program(rng, rng.randrange(20, 90), token_instructions=token_instr, fences=True)
        if golden_completes(config, program):
            cases.append(_case(f"random{len(cases)}", program, meta, check_tokens=not token_instr))
    # An illegal word (opcode 0) after some work: drains, then reports cause 1.
    program, meta = random_program(rng, 10, token_instructions=False, fences=False)
    words = [f"{int.from_bytes(i.encode(), 'little'):032x}" for i in program[:-1]]
    cases.append({"name": "illegal", "words": words[:5] + ["0" * 32] + words[5:], "cause": ERROR_ILLEGAL,
                  "check_tokens": False, "meta": meta[:5] + [{"queue": None, "wait": [], "signal": [], "kind": "bad"}]
                  + meta[5:-1], "max_cycles": 2000})
    # No HALT within program_count words: cause 2.
    program = [Instruction.make(Opcode.TOKEN, queue=Queue.LOAD)] * 3
    meta = [{"queue": 0, "wait": [], "signal": [], "kind": "token"}] * 3
    cases.append(_case("no_halt", program, meta, cause=ERROR_NO_HALT, check_tokens=False))
    # A plain program right after the failures: the controller recovers.
    program, meta = random_program(rng, 30, token_instructions=False, fences=False)
    while not golden_completes(config, program):
        program, meta = random_program(rng, 30, token_instructions=False, fences=False)
    cases.append(_case("after_errors", program, meta))
    return cases




@pytest.mark.rtl
@pytest.mark.parametrize("token_max", [15, 2])
def test_controller_schedules_like_the_isa(token_max):
    base = load_config("tiny")
    config = dataclasses.replace(base, queues=QueueConfig(depth=base.queues.depth, token_max=token_max))
    controller = Controller(config, fetch_depth=8, fetch_chunk=4, max_inflight=4)
    run_bench(controller, BENCH, name="control_top",
              params={"seed": 11 + token_max, "token_max": token_max, "programs": _cases(config, 3 + token_max)})


@pytest.mark.parametrize("kwargs, match", [
    ({"fetch_depth": 1}, "fetch_depth=1"),
    ({"fetch_chunk": 0}, "fetch_chunk=0"),
    ({"fetch_depth": 4, "fetch_chunk": 5}, "fetch_chunk=5"),
    ({"max_inflight": 0}, "max_inflight=0"),
])
def test_controller_rejects_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Controller(load_config("tiny"), **kwargs)
