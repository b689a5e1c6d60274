"""Bit-exact model of the weft instruction set (numpy).

:class:`GoldenMachine` executes a program instruction by instruction over a
device-memory image, with the dispatcher, the four queue FIFOs and the token counters
modelled as :mod:`weft.hw.isa` describes them. Its integer semantics are the
specification the RTL must match (docs/numerics.md).

Beyond computing results it refuses programs whose result would depend on timing:

* a **deadlock** (no queue and not the dispatcher can make progress before HALT) is
  reported with what each queue is waiting for;
* a **race** (two accesses from different queues to the same on-chip row or device
  memory byte, one a write, not ordered by tokens or a fence) is reported with both
  instructions; happens-before is tracked with vector clocks carried by tokens, so the
  verdict does not depend on the interleaving the model happens to pick;
* a read of an on-chip row never written is reported.

The model is not a timing model: cycles come from the compiler's performance model and
from the RTL's counters.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from weft.hw.bundle import Bundle, BundleError
from weft.hw.config import AcceleratorConfig
from weft.hw import vector_numerics as vn
from weft.hw.isa import (
    INSTR_BYTES,
    VBIN_FUNCS,
    VMAP_FUNCS,
    VROW_FUNCS,
    Instruction,
    IsaError,
    Mem,
    Opcode,
    Queue,
    decode_program,
    format_instruction,
)

__all__ = [
    "GoldenError",
    "ProgramError",
    "DeadlockError",
    "RaceError",
    "UninitializedReadError",
    "RunStats",
    "GoldenMachine",
    "requantize",
    "pack_scale_word",
    "run_bundle",
]

NUM_QUEUES = len(Queue)


class GoldenError(RuntimeError):
    """The program cannot be executed as written."""


class ProgramError(GoldenError):
    """An instruction with operands outside what the configuration allows."""


class DeadlockError(GoldenError):
    pass


class RaceError(GoldenError):
    pass


class UninitializedReadError(GoldenError):
    pass


# ---------------------------------------------------------------------- numerics
# The integer primitives live in weft.hw.vector_numerics (shared with the compiler and the
# RTL tests); these names are part of this model's public API.
pack_scale_word = vn.pack_scale_word
requantize = vn.requantize


def _wrap_int32(value: np.ndarray) -> np.ndarray:
    return np.asarray(value, dtype=np.int64).astype(np.int32)  # two's complement wrap


# ---------------------------------------------------------------------- bookkeeping
@dataclass
class RunStats:
    """What a run did (counts, not time)."""

    instructions: dict[str, int] = field(default_factory=dict)
    per_queue: dict[str, int] = field(default_factory=dict)
    macs: int = 0
    bytes_loaded: int = 0
    bytes_stored: int = 0
    max_tokens: int = 0
    leftover_tokens: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        ops = ", ".join(f"{k} {v}" for k, v in sorted(self.instructions.items()))
        return (f"{sum(self.instructions.values())} instructions ({ops}); {self.macs} MACs; "
                f"{self.bytes_loaded} bytes loaded, {self.bytes_stored} stored")


class _RowTracker:
    """Per-row write/read history of one on-chip memory, for init and race checks."""

    def __init__(self, name: str, rows: int):
        self.name = name
        self.rows = rows
        self.writer_queue = np.full(rows, -1, dtype=np.int8)
        self.writer_seq = np.zeros(rows, dtype=np.int64)
        self.writer_index = np.zeros(rows, dtype=np.int64)  # program index, for messages
        self.reader_seq = np.zeros((rows, NUM_QUEUES), dtype=np.int64)
        self.reader_index = np.zeros((rows, NUM_QUEUES), dtype=np.int64)


@dataclass
class _StoreRecord:
    queue: int
    seq: int
    index: int
    lo: int
    hi: int
    starts: np.ndarray  # byte ranges [start, start + width)
    width: int


# ---------------------------------------------------------------------- the machine
class GoldenMachine:
    """Bit-exact executor for one accelerator configuration.

    ``memory_bytes`` limits the device-memory image (default: the configuration's);
    the image is allocated lazily by the OS, so a large one costs only what is touched.
    """

    def __init__(self, config: AcceleratorConfig, memory_bytes: int | None = None):
        self.config = config
        size = config.device_memory_bytes if memory_bytes is None else memory_bytes
        self.memory = np.zeros(size, dtype=np.uint8)
        self.sp = np.zeros((config.sp_rows, config.sp_row_elems), dtype=np.int8)
        self.acc = np.zeros((config.acc_rows, config.acc_row_elems), dtype=np.int32)
        self.weights = np.zeros((config.array.rows, config.array.cols), dtype=np.int32)
        self.weights_loaded = False
        self._trackers = {Mem.SP: _RowTracker("scratchpad", config.sp_rows),
                          Mem.ACC: _RowTracker("accumulator", config.acc_rows)}

    @classmethod
    def for_bundle(cls, bundle: Bundle, config: AcceleratorConfig) -> "GoldenMachine":
        """A machine for ``config`` with the device memory ``bundle`` needs (refuses a bundle
        for another configuration or one larger than the configuration's memory)."""
        bundle.check_config(config)
        return cls(config, memory_bytes=_memory_size(bundle, config))

    def load_bundle(self, bundle: Bundle) -> list[Instruction]:
        """Write ``bundle``'s constant segments and program into device memory and return the
        program as the fetch unit decodes it from there."""
        bundle.check_config(self.config)
        for segment in bundle.segments:
            self.write(segment.address, segment.data)
        self.write(bundle.program_address, bundle.program_bytes)
        return self.fetch_program(bundle.program_address, len(bundle.program))

    # ------------------------------------------------------------------ host access
    def write(self, address: int, data: bytes | np.ndarray) -> None:
        raw = np.frombuffer(bytes(data), dtype=np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8).ravel()
        if address < 0 or address + raw.size > self.memory.size:
            raise ProgramError(f"host write of {raw.size} bytes at 0x{address:x} is outside device memory")
        self.memory[address:address + raw.size] = raw

    def read(self, address: int, size: int) -> bytes:
        if address < 0 or address + size > self.memory.size:
            raise ProgramError(f"host read of {size} bytes at 0x{address:x} is outside device memory")
        return self.memory[address:address + size].tobytes()

    def fetch_program(self, address: int, count: int) -> list[Instruction]:
        """Decode ``count`` instructions from device memory, as the hardware's fetch unit does."""
        try:
            return decode_program(self.read(address, count * INSTR_BYTES))
        except IsaError as exc:
            raise ProgramError(f"program at 0x{address:x}: {exc}") from None

    # ------------------------------------------------------------------ execution
    def run(self, program: list[Instruction], *, max_instructions: int | None = None) -> RunStats:
        """Execute ``program`` (which must end in HALT) to completion and return statistics."""
        cfg = self.config
        stats = RunStats()
        depth, token_max = cfg.queues.depth, cfg.queues.token_max
        fifos: list[deque[int]] = [deque() for _ in range(NUM_QUEUES)]
        tokens = np.zeros((NUM_QUEUES, NUM_QUEUES), dtype=np.int64)
        # Vector clock of each queue, and of each token in flight per (producer, consumer).
        clocks = np.zeros((NUM_QUEUES, NUM_QUEUES), dtype=np.int64)
        token_clocks = [[deque() for _ in range(NUM_QUEUES)] for _ in range(NUM_QUEUES)]
        seq = [0] * NUM_QUEUES
        # An earlier run on this machine (a bundle kept loaded, e.g. a decode step per token) has
        # halted, so all of its accesses are ordered before this run's: forget their sequence
        # numbers (the clocks restart at zero) but keep which rows hold data.
        for tracker in self._trackers.values():
            tracker.writer_seq[:] = 0
            tracker.reader_seq[:] = 0
        self._stores: list[_StoreRecord] = []
        self._loads: list[_StoreRecord] = []
        pc, halted, executed = 0, False, 0
        limit = max_instructions if max_instructions is not None else 50 * len(program) + 1000

        while not halted:
            progress = False
            # Dispatcher: move instructions into queue FIFOs in program order.
            while pc < len(program):
                instr = program[pc]
                if instr.opcode in (Opcode.FENCE, Opcode.HALT):
                    if any(fifos):
                        break
                    # Everything before is complete: every queue now knows every other's progress.
                    clocks[:] = clocks.max(axis=0)
                    stats.instructions[instr.spec.mnemonic] = stats.instructions.get(instr.spec.mnemonic, 0) + 1
                    pc += 1
                    progress = True
                    if instr.opcode == Opcode.HALT:
                        halted = True
                        break
                    continue
                q = int(instr.queue)
                if len(fifos[q]) >= depth:
                    break
                fifos[q].append(pc)
                pc += 1
                progress = True
            if halted:
                break
            # Each queue executes its head instruction if its tokens allow.
            for q in range(NUM_QUEUES):
                if not fifos[q]:
                    continue
                index = fifos[q][0]
                instr = program[index]
                waits = [int(p) for p in instr.wait]
                signals = [int(r) for r in instr.signal]
                if any(tokens[p, q] == 0 for p in waits) or any(tokens[q, r] >= token_max for r in signals):
                    continue
                fifos[q].popleft()
                for p in waits:
                    tokens[p, q] -= 1
                    np.maximum(clocks[q], token_clocks[p][q].popleft(), out=clocks[q])
                seq[q] += 1
                clocks[q, q] = seq[q]
                self._execute(instr, index, q, clocks[q], stats)
                for r in signals:
                    tokens[q, r] += 1
                    token_clocks[q][r].append(clocks[q].copy())
                    stats.max_tokens = max(stats.max_tokens, int(tokens[q, r]))
                stats.instructions[instr.spec.mnemonic] = stats.instructions.get(instr.spec.mnemonic, 0) + 1
                qname = Queue(q).name.lower()
                stats.per_queue[qname] = stats.per_queue.get(qname, 0) + 1
                executed += 1
                progress = True
            if executed > limit:
                raise GoldenError(f"more than {limit} instructions executed; the program does not terminate")
            if not progress:
                if pc >= len(program):
                    raise ProgramError("program ends without HALT")
                raise DeadlockError(self._deadlock_report(program, pc, fifos, tokens, depth, token_max))
        stats.leftover_tokens = {f"{Queue(p).name.lower()}->{Queue(r).name.lower()}": int(tokens[p, r])
                                 for p in range(NUM_QUEUES) for r in range(NUM_QUEUES) if tokens[p, r]}
        return stats

    def _deadlock_report(self, program, pc, fifos, tokens, depth, token_max) -> str:
        lines = ["deadlock: no queue can make progress"]
        for q in range(NUM_QUEUES):
            name = Queue(q).name.lower()
            if not fifos[q]:
                lines.append(f"  {name}: empty")
                continue
            index = fifos[q][0]
            instr = program[index]
            why = [f"token from {Queue(p).name.lower()}" for p in instr.wait if tokens[int(p), q] == 0]
            why += [f"room to signal {Queue(r).name.lower()} (counter full at {token_max})"
                    for r in instr.signal if tokens[q, int(r)] >= token_max]
            lines.append(f"  {name}: instruction {index} `{format_instruction(instr)}` waits for {', '.join(why)}")
        if pc < len(program):
            instr = program[pc]
            if instr.queue is not None and len(fifos[int(instr.queue)]) >= depth:
                lines.append(f"  dispatcher: instruction {pc} `{format_instruction(instr)}` waits for room in the "
                             f"full {instr.queue.name.lower()} queue (depth {depth})")
            else:
                lines.append(f"  dispatcher: instruction {pc} `{format_instruction(instr)}` waits for the queues to drain")
        return "\n".join(lines)

    # ------------------------------------------------------------------ accesses
    def _check_rows(self, mem: Mem, first: int, count: int, index: int, instr: Instruction) -> slice:
        tracker = self._trackers[mem]
        if first + count > tracker.rows:
            raise ProgramError(f"instruction {index} `{format_instruction(instr)}`: rows {first}..{first + count - 1} "
                               f"exceed the {tracker.name}'s {tracker.rows} rows")
        return slice(first, first + count)

    def _read_rows(self, mem: Mem, rows: slice, q: int, clock: np.ndarray, index: int, instr: Instruction) -> None:
        t = self._trackers[mem]
        wq = t.writer_queue[rows]
        if np.any(wq < 0):
            row = rows.start + int(np.argmax(wq < 0))
            raise UninitializedReadError(f"instruction {index} `{format_instruction(instr)}` reads {t.name} row {row}, "
                                         "which nothing has written")
        other = wq != q
        if np.any(other):
            unordered = other & (t.writer_seq[rows] > clock[wq.astype(np.int64)])
            if np.any(unordered):
                k = int(np.argmax(unordered))
                raise RaceError(f"race on {t.name} row {rows.start + k}: instruction {index} `{format_instruction(instr)}` "
                                f"({Queue(q).name.lower()}) reads it while instruction {t.writer_index[rows][k]} "
                                f"({Queue(int(wq[k])).name.lower()}) writes it, with no token ordering them")
        t.reader_seq[rows, q] = clock[q]
        t.reader_index[rows, q] = index

    def _write_rows(self, mem: Mem, rows: slice, q: int, clock: np.ndarray, index: int, instr: Instruction) -> None:
        t = self._trackers[mem]
        wq = t.writer_queue[rows]
        unordered = (wq >= 0) & (wq != q) & (t.writer_seq[rows] > clock[np.maximum(wq, 0).astype(np.int64)])
        if np.any(unordered):
            k = int(np.argmax(unordered))
            raise RaceError(f"race on {t.name} row {rows.start + k}: instruction {index} `{format_instruction(instr)}` "
                            f"({Queue(q).name.lower()}) and instruction {t.writer_index[rows][k]} "
                            f"({Queue(int(wq[k])).name.lower()}) both write it, with no token ordering them")
        for p in range(NUM_QUEUES):
            if p == q:
                continue
            unordered = t.reader_seq[rows, p] > clock[p]
            if np.any(unordered):
                k = int(np.argmax(unordered))
                raise RaceError(f"race on {t.name} row {rows.start + k}: instruction {index} `{format_instruction(instr)}` "
                                f"({Queue(q).name.lower()}) overwrites it while instruction {t.reader_index[rows, p][k]} "
                                f"({Queue(p).name.lower()}) may still read it, with no token ordering them")
        t.writer_queue[rows] = q
        t.writer_seq[rows] = clock[q]
        t.writer_index[rows] = index

    def _dram_access(self, q: int, clock: np.ndarray, index: int, instr: Instruction, base: int, rows: int,
                     width: int, stride: int, is_write: bool) -> np.ndarray:
        """Byte offsets of a strided access; checks bounds and races against the other direction."""
        starts = base + np.arange(rows, dtype=np.int64) * stride
        if rows == 0 or width == 0:
            return starts
        lo, hi = int(starts.min()), int(starts.max()) + width
        if lo < 0 or hi > self.memory.size:
            raise ProgramError(f"instruction {index} `{format_instruction(instr)}`: device-memory bytes "
                               f"0x{lo:x}..0x{hi - 1:x} are outside the {self.memory.size}-byte memory")
        record = _StoreRecord(q, int(clock[q]), index, lo, hi, starts, width)
        # Only the load and store queues touch device memory, so races are load vs store.
        others = self._loads if is_write else self._stores
        live = []
        for other in others:
            if other.seq <= clock[other.queue]:
                continue  # ordered before this access; it can never race with later ones either
            live.append(other)
            if other.hi <= lo or hi <= other.lo:
                continue
            if _ranges_overlap(starts, width, other.starts, other.width):
                kind = "writes" if is_write else "reads"
                raise RaceError(f"race in device memory 0x{max(lo, other.lo):x}..: instruction {index} "
                                f"`{format_instruction(instr)}` {kind} bytes that instruction {other.index} "
                                f"({Queue(other.queue).name.lower()}) also accesses, with no token ordering them")
        others[:] = live
        (self._stores if is_write else self._loads).append(record)
        return starts

    # ------------------------------------------------------------------ operations
    def _execute(self, instr: Instruction, index: int, q: int, clock: np.ndarray, stats: RunStats) -> None:
        cfg = self.config
        op, a = instr.opcode, instr.args
        where = _Where(index, instr)  # formatted only when an error message needs it
        if op == Opcode.TOKEN:
            return
        if op in (Opcode.LOAD, Opcode.STORE):
            mem = Mem(a["mem"])
            row_elems = cfg.sp_row_elems if mem == Mem.SP else cfg.acc_row_elems
            esize = 1 if mem == Mem.SP else 4
            if a["cols"] > row_elems:
                raise ProgramError(f"{where}: cols={a['cols']} exceeds the {row_elems}-element {mem.name.lower()} row")
            rows = self._check_rows(mem, a["local"], a["rows"], index, instr)
            width = a["cols"] * esize
            starts = self._dram_access(q, clock, index, instr, a["dram"], a["rows"], width, a["stride"],
                                       is_write=(op == Opcode.STORE))
            offsets = starts[:, None] + np.arange(width, dtype=np.int64)
            target = self.sp if mem == Mem.SP else self.acc
            if op == Opcode.LOAD:
                self._write_rows(mem, rows, q, clock, index, instr)
                raw = self.memory[offsets].reshape(a["rows"], width)
                values = raw.view(np.int8) if mem == Mem.SP else raw.copy().view("<i4")
                target[rows] = 0
                target[rows, :a["cols"]] = values
                stats.bytes_loaded += a["rows"] * width
            else:
                self._read_rows(mem, rows, q, clock, index, instr)
                values = np.ascontiguousarray(target[rows, :a["cols"]]).astype(target.dtype.newbyteorder("<"))
                self.memory[offsets] = values.view(np.uint8).reshape(a["rows"], width)
                stats.bytes_stored += a["rows"] * width
            return
        if op == Opcode.PRELOAD:
            k, n = a["k"], a["n"]
            if not 1 <= k <= cfg.array.rows or not 1 <= n <= cfg.array.cols:
                raise ProgramError(f"{where}: k must be in 1..{cfg.array.rows} and n in 1..{cfg.array.cols}")
            transpose = bool(a["transpose"])
            rows = self._check_rows(Mem.SP, a["sp"], n if transpose else k, index, instr)
            self._read_rows(Mem.SP, rows, q, clock, index, instr)
            self.weights[:] = 0
            self.weights[:k, :n] = self.sp[rows, :k].T if transpose else self.sp[rows, :n]
            self.weights_loaded = True
            self._preload_n = n
            return
        if op == Opcode.MATMUL:
            m, k = a["m"], a["k"]
            if not 1 <= k <= cfg.array.rows:
                raise ProgramError(f"{where}: k must be in 1..{cfg.array.rows}")
            if not self.weights_loaded:
                raise UninitializedReadError(f"{where}: no weights were preloaded")
            src = self._check_rows(Mem.SP, a["a"], m, index, instr)
            dst = self._check_rows(Mem.ACC, a["acc"], m, index, instr)
            if m == 0:
                return
            self._read_rows(Mem.SP, src, q, clock, index, instr)
            product = self.sp[src, :k].astype(np.int64) @ self.weights[:k].astype(np.int64)
            if a["accumulate"]:
                self._read_rows(Mem.ACC, dst, q, clock, index, instr)
                product += self.acc[dst]
            self._write_rows(Mem.ACC, dst, q, clock, index, instr)
            self.acc[dst] = _wrap_int32(product)
            stats.macs += m * k * self._preload_n
            return
        if op == Opcode.REQUANT:
            src = self._check_rows(Mem.ACC, a["src"], a["rows"], index, instr)
            dst = self._check_rows(Mem.SP, a["dst"], a["rows"], index, instr)
            params = self._check_rows(Mem.ACC, a["param"], 2, index, instr)
            if a["rows"] == 0:
                return
            self._read_rows(Mem.ACC, params, q, clock, index, instr)
            self._read_rows(Mem.ACC, src, q, clock, index, instr)
            try:
                y = requantize(self.acc[src], self.acc[params.start], self.acc[params.start + 1], bool(a["relu"]))
            except vn.VectorParamError as exc:
                raise ProgramError(f"{where}: {exc} (accumulator row {params.start + 1})") from None
            self._write_rows(Mem.SP, dst, q, clock, index, instr)
            self.sp[dst] = 0
            self.sp[dst, :cfg.array.cols] = y
            return
        if op in (Opcode.VBIN, Opcode.VMAP, Opcode.VROW):
            if not cfg.vector.row_engine:
                raise ProgramError(f"{where}: configuration {cfg.name!r} has no vector row engine "
                                   f"(vector.row_engine: false), so {op.name} cannot run")
            try:
                self._vector(instr, index, q, clock, where)
            except vn.VectorParamError as exc:
                raise ProgramError(f"{where}: {exc}") from None
            return
        raise ProgramError(f"{where}: opcode has no semantics in the model")  # pragma: no cover

    # ------------------------------------------------------------------ vector unit
    def _mem(self, mem: Mem) -> np.ndarray:
        return self.sp if mem == Mem.SP else self.acc

    def _width(self, mem: Mem) -> int:
        return self.config.sp_row_elems if mem == Mem.SP else self.config.acc_row_elems

    @staticmethod
    def _bounds(mem: Mem) -> tuple[int, int]:
        return vn.INT8 if mem == Mem.SP else vn.INT32

    def _param_words(self, first: int, count: int, q: int, clock, index: int, instr: Instruction) -> np.ndarray:
        """``count`` parameter words from accumulator rows starting at ``first`` (row-major)."""
        cols = self.config.acc_row_elems
        rows = self._check_rows(Mem.ACC, first, -(-count // cols), index, instr)
        self._read_rows(Mem.ACC, rows, q, clock, index, instr)
        return self.acc[rows].astype(np.int64).ravel()[:count]

    @staticmethod
    def _no_partial_overlap(where, dst_mem: Mem, dst: slice, operands) -> None:
        for name, mem, rows in operands:
            if mem == dst_mem and rows.start != dst.start and rows.start < dst.stop and dst.start < rows.stop:
                raise ProgramError(f"{where}: dst rows {dst.start}..{dst.stop - 1} partly overlap {name} rows "
                                   f"{rows.start}..{rows.stop - 1} (they must be the same rows or disjoint)")

    def _vector(self, instr: Instruction, index: int, q: int, clock: np.ndarray, where) -> None:
        a = instr.args
        op = instr.opcode
        funcs = {Opcode.VBIN: VBIN_FUNCS, Opcode.VMAP: VMAP_FUNCS, Opcode.VROW: VROW_FUNCS}[op]
        if a["func"] >= len(funcs):
            raise ProgramError(f"{where}: func={a['func']} is reserved (defined: {', '.join(funcs)})")
        func = funcs[a["func"]]
        if op == Opcode.VROW:
            self._vector_row(func, instr, index, q, clock, where)
            return
        count = a["rows"]
        dst_mem = Mem(a["dst_mem"])
        if op == Opcode.VBIN:
            srcs = [("a", Mem(a["a_mem"]), a["a"]), ("b", Mem(a["b_mem"]), a["b"])]
            nwords = 2 if func == "add" else 1
        else:
            srcs = [("src", Mem(a["src_mem"]), a["src"])]
            nwords = 2 if func in ("gelu", "silu") else 1
        ranges = [(name, mem, self._check_rows(mem, first, count, index, instr)) for name, mem, first in srcs]
        dst = self._check_rows(dst_mem, a["dst"], count, index, instr)
        self._check_rows(Mem.ACC, a["param"], -(-nwords // self.config.acc_row_elems), index, instr)
        self._no_partial_overlap(where, dst_mem, dst, ranges)
        if func in ("mul", "rope") and all(mem == Mem.ACC for _, mem, _ in ranges):
            raise ProgramError(f"{where}: {func} takes at most one operand from the accumulator")
        n = min([self._width(mem) for _, mem, _ in ranges] + [self._width(dst_mem)])
        if func == "rope" and n % 2:
            raise ProgramError(f"{where}: rope needs an even row width, got {n}")
        if count == 0:
            return
        words = self._param_words(a["param"], nwords, q, clock, index, instr)
        values = []
        for _, mem, rows in ranges:
            self._read_rows(mem, rows, q, clock, index, instr)
            values.append(self._mem(mem)[rows, :n].astype(np.int64))
        out = self._bounds(dst_mem)
        if func == "add":
            y = vn.vec_add(values[0], values[1], words[0], words[1], out)
        elif func == "mul":
            y = vn.vec_mul(values[0], values[1], words[0], out)
        elif func == "rope":
            y = vn.vec_rope(values[0], values[1], words[0], out)
        elif func == "scale":
            y = vn.vec_scale(values[0], words[0], out)
        elif func == "gelu":
            y = vn.vec_gelu(values[0], words[0], words[1], out)
        else:
            y = vn.vec_silu(values[0], words[0], words[1], out)
        self._write_rows(dst_mem, dst, q, clock, index, instr)
        target = self._mem(dst_mem)
        target[dst] = 0
        target[dst, :n] = y

    def _vector_row(self, func: str, instr: Instruction, index: int, q: int, clock: np.ndarray, where) -> None:
        a = instr.args
        cfg = self.config
        M, L = a["rows"], a["len"]
        if L == 0:
            raise ProgramError(f"{where}: len must be at least 1")
        src_mem = Mem(a["src_mem"])
        e_src = self._width(src_mem)
        src = self._check_rows(src_mem, a["src"], -(-L // e_src) * M, index, instr)
        # A wide softmax (int32 probabilities 0..2047) or norm (int32) writes to the accumulator,
        # slice-major like the scratchpad output; `wide` takes precedence over `unsigned`, and
        # max/sum ignore it.
        wide = func in ("softmax", "layernorm", "rmsnorm") and bool(a["wide"])
        reduce = func in ("max", "sum")
        dst_mem = Mem.ACC if reduce or wide else Mem.SP
        e_dst = 1 if reduce else self._width(dst_mem)
        dst_slices = 1 if reduce else -(-L // e_dst)
        dst = self._check_rows(dst_mem, a["dst"], dst_slices * M, index, instr)
        cols = cfg.acc_row_elems
        n_ch = -(-L // cols)
        header = {"max": 0, "sum": 0, "softmax": 3, "layernorm": 1, "rmsnorm": 1}[func]
        header_rows = -(-header // cols)
        param_rows = header_rows + {"layernorm": 2 * n_ch, "rmsnorm": n_ch}.get(func, 0)
        if param_rows:
            self._check_rows(Mem.ACC, a["param"], param_rows, index, instr)
        self._no_partial_overlap(where, dst_mem, dst, [("src", src_mem, src)])
        if M == 0:
            return
        words = self._param_words(a["param"], param_rows * cols, q, clock, index, instr) if param_rows else None
        self._read_rows(src_mem, src, q, clock, index, instr)
        j = np.arange(L)
        r = np.arange(M)[:, None]
        x = self._mem(src_mem)[src.start + (j // e_src)[None, :] * M + r, (j % e_src)[None, :]].astype(np.int64)
        if func == "max":
            y = vn.row_max(x)
        elif func == "sum":
            y = vn.row_sum(x)
        elif func == "softmax":
            kv_len, offset = (int(np.int64(w).astype(np.int32)) for w in words[1:3])
            valid = vn.softmax_mask(M, L, kv_len, bool(a["causal"]), offset)
            y = vn.softmax_rows(x, words[0], valid, unsigned=bool(a["unsigned"]), wide=wide)
        else:
            shift = int(np.int64(words[0]).astype(np.int32))
            if shift < vn.NORM_SHIFT_MIN or shift > vn.NORM_SHIFT_MAX:
                raise ProgramError(f"{where}: norm shift {shift} (accumulator row {a['param']}) is outside "
                                   f"{vn.NORM_SHIFT_MIN}..{vn.NORM_SHIFT_MAX}")
            base = header_rows * cols
            gain = words[base:base + L]
            if func == "layernorm":
                bias = words[base + n_ch * cols:base + n_ch * cols + L]
                y = vn.layernorm_rows(x, shift, gain, bias, vn.INT32 if wide else vn.INT8)
            else:
                y = vn.rmsnorm_rows(x, shift, gain, vn.INT32 if wide else vn.INT8)
        self._write_rows(dst_mem, dst, q, clock, index, instr)
        target = self._mem(dst_mem)
        target[dst] = 0
        if reduce:
            target[dst, 0] = y
        else:
            if func == "softmax" and a["unsigned"] and not wide:
                y = y.astype(np.uint8).view(np.int8)  # the scratchpad holds the uint8 bit pattern
            target[dst.start + (j // e_dst)[None, :] * M + r, (j % e_dst)[None, :]] = y


class _Where:
    def __init__(self, index: int, instr: Instruction):
        self.index, self.instr = index, instr

    def __str__(self) -> str:
        return f"instruction {self.index} `{format_instruction(self.instr)}`"

    __format__ = lambda self, spec: str(self)  # noqa: E731


def _ranges_overlap(starts_a: np.ndarray, width_a: int, starts_b: np.ndarray, width_b: int) -> bool:
    """Whether any [s, s + width_a) of ``starts_a`` meets any [t, t + width_b) of ``starts_b``."""
    b_sorted = np.sort(starts_b)
    # For each a-range, the first b-range starting at or after its end bounds the candidates;
    # the one just before that is the only b-range that can still overlap it.
    pos = np.searchsorted(b_sorted, starts_a + width_a, side="left") - 1
    valid = pos >= 0
    return bool(np.any(valid & (b_sorted[np.maximum(pos, 0)] + width_b > starts_a)))


# ---------------------------------------------------------------------- bundles
def run_bundle(bundle: Bundle, inputs: Mapping[str, np.ndarray], config: AcceleratorConfig,
               *, machine: GoldenMachine | None = None) -> tuple[dict[str, np.ndarray], RunStats]:
    """Load a bundle and its inputs into a fresh machine, run it, and read the outputs.

    Integer inputs must already have the tensor's dtype; float inputs are quantized
    with the tensor's scale. Returns (outputs as stored integers, statistics). An output
    that shares its address with an input (``metadata["in_place"]``, a KV cache) reads back
    the input's memory as the program left it.
    """
    bundle.check_config(config)
    machine = machine or GoldenMachine.for_bundle(bundle, config)
    missing = [t.name for t in bundle.inputs if t.name not in inputs]
    if missing:
        raise BundleError(f"missing inputs: {', '.join(missing)} (bundle inputs: "
                          f"{', '.join(t.name for t in bundle.inputs)})")
    extra = sorted(set(inputs) - {t.name for t in bundle.inputs})
    if extra:
        raise BundleError(f"unknown inputs: {', '.join(extra)} (bundle inputs: "
                          f"{', '.join(t.name for t in bundle.inputs)})")
    program = machine.load_bundle(bundle)
    for spec in bundle.inputs:
        spec.write_to(machine.memory, spec.stored(inputs[spec.name]))
    stats = machine.run(program)
    outputs = {spec.name: spec.read_from(machine.memory) for spec in bundle.outputs}
    return outputs, stats


def _memory_size(bundle: Bundle, config: AcceleratorConfig) -> int:
    top = bundle.memory_top()
    if top > config.device_memory_bytes:
        raise BundleError(f"bundle needs {top} bytes of device memory; configuration {config.name!r} has "
                          f"{config.device_memory_bytes}")
    # Only what the bundle uses, rounded up: keeps the model's image small for small programs.
    return min(config.device_memory_bytes, (top + 0xFFFF) & ~0xFFFF)
