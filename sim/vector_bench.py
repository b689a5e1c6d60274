"""Vector-unit throughput on the RTL core: cycles per row of VMAP / VBIN / VROW.

Every measurement is a whole program, LOAD (inputs, parameter rows) -> the vector op
once or twice -> STORE, run on the bit-exact model (:mod:`weft.sim.golden`) for the
expected bytes and then on the RTL core through :func:`weft.sim.core_runner.run_cases`,
which raises if the core leaves different bytes. The CYCLES counter of the program
with the op twice minus the one with it once is one op's time; divided by the number
of rows it processed, cycles per row.

:class:`Prog`, :func:`raw_case` and :func:`slice_major` are the program builders the
RTL tests of the vector unit (tests/hw/test_vector_unit.py) share with this bench.
"""

from __future__ import annotations

import numpy as np

from weft.hw import vector_numerics as vn
from weft.hw.config import AcceleratorConfig
from weft.hw.isa import Instruction, Mem, Opcode, encode_program
from weft.sim.core_runner import run_cases
from weft.sim.golden import GoldenMachine

__all__ = ["DATA", "MEMORY", "THROUGHPUT_FUNCS", "THROUGHPUT_LENGTHS", "Prog", "bench_vector", "fits",
           "measure_throughput", "raw_case", "slice_major", "throughput_cases"]

#: Device memory of every case, and where its data starts (the program sits at 0).
MEMORY = 1 << 16
DATA = 0x1000

#: Row lengths (elements) and ops the throughput is measured for.
THROUGHPUT_LENGTHS = (64, 128, 384, 576, 1536)
THROUGHPUT_FUNCS = ("gelu", "add", "softmax", "layernorm")


class Prog:
    """A program image: data loaded to on-chip rows, one or more ops, stores of results."""

    def __init__(self, config: AcceleratorConfig):
        self.config = config
        self.E = config.acc_row_elems
        self.next = DATA
        self.loads: list[Instruction] = []
        self.image: dict[int, bytes] = {}
        self.outs: list[tuple[int, int]] = []

    def _place(self, raw: bytes) -> int:
        addr = self.next
        self.image[addr] = raw
        self.next = (addr + len(raw) + 63) & ~63
        return addr

    def load(self, mem: Mem, local: int, rows: np.ndarray) -> None:
        rows = np.asarray(rows)
        dtype = "<i4" if mem == Mem.ACC else np.int8
        arr = rows.astype(dtype)
        addr = self._place(arr.tobytes())
        esize = 4 if mem == Mem.ACC else 1
        self.loads.append(Instruction.make(Opcode.LOAD, mem=int(mem), local=local, dram=addr, rows=arr.shape[0],
                                           cols=arr.shape[1], stride=arr.shape[1] * esize))

    def store(self, mem: Mem, local: int, rows: int) -> Instruction:
        esize = 4 if mem == Mem.ACC else 1
        size = rows * self.E * esize
        addr = self.next
        self.next = (addr + size + 63) & ~63
        self.outs.append((addr, size))
        return Instruction.make(Opcode.STORE, mem=int(mem), local=local, dram=addr, rows=rows, cols=self.E,
                                stride=self.E * esize)

    def case(self, name: str, ops: list[Instruction], stores: list[Instruction], **extra) -> dict:
        loads = list(self.loads)
        loads[-1] = loads[-1].with_tokens(signal=["vector"])
        ops = list(ops)
        ops[0] = ops[0].with_tokens(wait=["load"])
        ops[-1] = ops[-1].with_tokens(signal=["store"])
        stores = list(stores)
        stores[0] = stores[0].with_tokens(wait=["vector"])
        program = loads + ops + stores + [Instruction.make(Opcode.HALT)]
        return raw_case(name, self.config, program, self.image, self.outs, **extra)


def raw_case(name, config, program, image: dict[int, bytes], outs, **extra) -> dict:
    """A case for :func:`run_cases`: ``program`` at 0, ``image`` around it, expected bytes of ``outs``."""
    machine = GoldenMachine(config, memory_bytes=MEMORY)
    code = encode_program(program)
    machine.write(0, code)
    for addr, raw in image.items():
        machine.write(addr, raw)
    before = machine.memory.tobytes()
    machine.run(machine.fetch_program(0, len(program)))
    expect = [(a, machine.read(a, n).hex()) for a, n in outs]
    return {"name": name, "image": [(0, before.hex())], "program_addr": 0, "program_count": len(program),
            "expect": expect, **extra}


def slice_major(x: np.ndarray, E: int, garbage: np.ndarray | None = None) -> np.ndarray:
    """[M, L] -> on-chip rows [C*M, E]; element (r, j) at row (j // E) * M + r, column j % E."""
    M, L = x.shape
    C = -(-L // E)
    padded = np.zeros((M, C * E), dtype=np.int64) if garbage is None else garbage[:M, :C * E].astype(np.int64).copy()
    padded[:, :L] = x
    return padded.reshape(M, C, E).transpose(1, 0, 2).reshape(C * M, E)


def _throughput_prog(config, rng, func: str, L: int, M: int) -> tuple[Prog, Instruction, tuple[Mem, int, int]]:
    """The data loads of one throughput program, its op and its store (mem, local row, rows)."""
    E = config.acc_row_elems
    C = -(-L // E)
    p = Prog(config)
    if func in ("gelu", "add"):
        if func == "gelu":
            p.load(Mem.ACC, 0, rng.integers(-5000, 5000, (C * M, E)))
            p.load(Mem.ACC, C * M + 1, vn.gelu_params(0.001, 0.05, cols=E))
            op = Instruction.make(Opcode.VMAP, func="gelu", src_mem=1, src=0, dst_mem=0, dst=0, param=C * M + 1,
                                  rows=C * M)
        else:
            p.load(Mem.SP, 0, rng.integers(-128, 128, (C * M, E)))
            p.load(Mem.SP, C * M, rng.integers(-128, 128, (C * M, E)))
            p.load(Mem.ACC, 0, vn.add_params(0.1, 0.07, 0.12, cols=E))
            op = Instruction.make(Opcode.VBIN, func="add", a_mem=0, a=0, b_mem=0, b=C * M, dst_mem=0,
                                  dst=2 * C * M, param=0, rows=C * M)
        store = (Mem.SP, 0 if func == "gelu" else 2 * C * M, C * M)
    else:
        x = rng.integers(-3000, 3000, (M, L))
        p.load(Mem.ACC, 0, slice_major(x, E))
        if func == "softmax":
            params = vn.softmax_params(0.01, kv_len=L, cols=E)
        else:
            params = vn.layernorm_params(1.0, rng.uniform(-2, 2, L), rng.uniform(-1, 1, L), 0.05, cols=E)
        p.load(Mem.ACC, C * M, params)
        op = Instruction.make(Opcode.VROW, func=func, src_mem=1, src=0, dst=0, param=C * M, rows=M, len=L)
        store = (Mem.SP, 0, C * M)
    return p, op, store


def throughput_cases(config, rng, func: str, L: int, M: int = 4) -> list[dict]:
    """The op once and twice on the same data: the difference in CYCLES is one op's time."""
    out = []
    for times in (1, 2):
        p, op, store = _throughput_prog(config, rng, func, L, M)
        out.append(p.case(f"tp_{func}_{L}_x{times}", [op] * times, [p.store(*store)]))
    return out


def fits(config: AcceleratorConfig, func: str, L: int, M: int = 4) -> bool:
    """Whether the throughput programs of ``func`` on ``M`` rows of ``L`` fit the on-chip memories."""
    p, _, (mem, local, rows) = _throughput_prog(config, np.random.default_rng(0), func, L, M)
    size = {int(Mem.SP): config.sp_rows, int(Mem.ACC): config.acc_rows}
    spans = [(i.args["mem"], i.args["local"], i.args["rows"]) for i in p.loads] + [(int(mem), local, rows)]
    return all(start + n <= size[int(m)] for m, start, n in spans)


def bench_vector(config: AcceleratorConfig, lengths=THROUGHPUT_LENGTHS, funcs=THROUGHPUT_FUNCS, M: int = 4,
                 seed: int = 31, skip_unfit: bool = False) -> dict:
    """Cycles per row of each op at each row length, all in one simulator session.

    Returns ``{"per_row": {(func, L): cycles}, "wall_s", "build_s", "run_s", "built", "cases"}``;
    raises (from :func:`run_cases`) if any output differs from the bit-exact model's. With
    ``skip_unfit``, a (func, L) whose programs do not fit the on-chip memories (see :func:`fits`)
    is not run and maps to None.
    """
    rng = np.random.default_rng(seed)
    runs = [(f, L) for f in funcs for L in lengths if not skip_unfit or fits(config, f, L, M)]
    if not runs:
        raise ValueError(f"no throughput program fits configuration {config.name!r}'s on-chip memories")
    cases = [c for f, L in runs for c in throughput_cases(config, rng, f, L, M)]
    result = run_cases(config, cases)
    report = {r["name"]: r["counters"]["cycles"] for r in result["cases"]}
    per_row = {(f, L): (report[f"tp_{f}_{L}_x2"] - report[f"tp_{f}_{L}_x1"]) / M if (f, L) in runs else None
               for f in funcs for L in lengths}
    return {"per_row": per_row, "wall_s": result["wall_s"], "build_s": result["build_s"], "run_s": result["run_s"],
            "built": result["built"], "cases": len(cases)}


def measure_throughput(config, lengths=THROUGHPUT_LENGTHS, funcs=THROUGHPUT_FUNCS, M=4):
    """``{(func, L): cycles per row}`` (see :func:`bench_vector`)."""
    return bench_vector(config, lengths, funcs, M)["per_row"]
