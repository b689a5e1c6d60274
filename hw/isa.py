"""The weft instruction set, defined once.

Everything that touches instructions reads this module: the RTL decoder, the assembler
and disassembler, the compiler and the bit-exact model (:mod:`weft.sim.golden`).
``docs/isa.md`` is generated from it by :func:`render_markdown`.

Execution model
---------------
A program is a stream of fixed-width (:data:`INSTR_BYTES` bytes, little-endian)
instructions in device memory. The dispatcher reads them in order and appends each to
the FIFO of the queue that executes it (:class:`Queue`); ``FENCE`` and ``HALT`` are
handled by the dispatcher itself. Each queue executes its instructions in order.
Queues run concurrently and are ordered against each other only by dependency tokens:
every (producer, consumer) pair of distinct queues has a token counter. An instruction
whose ``wait`` set names queue P first takes one token from counter P->Q (stalling
while it is zero); once it and every earlier instruction of its queue have completed,
it adds one token to Q->R for every R in its ``signal`` set (stalling while that
counter holds ``queues.token_max`` tokens). Every counter is zero when a program
starts; tokens left when it halts are discarded. A program is race-free when every pair of
accesses from different queues to the same on-chip row, one of them a write, is
ordered by tokens or a fence; the bit-exact model rejects programs that are not.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

__all__ = [
    "INSTR_BYTES",
    "INSTR_BITS",
    "HEADER_BITS",
    "Queue",
    "Mem",
    "Field",
    "OpSpec",
    "Opcode",
    "OPS",
    "Instruction",
    "IsaError",
    "encode_program",
    "decode_program",
    "assemble",
    "disassemble",
    "format_instruction",
    "parse_instruction",
    "render_markdown",
    "REQUANT_MULT_BITS",
    "REQUANT_SHIFT_BITS",
    "VBIN_FUNCS",
    "VMAP_FUNCS",
    "VROW_FUNCS",
]

INSTR_BITS = 128
INSTR_BYTES = INSTR_BITS // 8
OPCODE_BITS = 8
MASK_BITS = 4  # one bit per queue in wait/signal sets
HEADER_BITS = OPCODE_BITS + 2 * MASK_BITS

#: Requantization parameter word (one int32 per output channel): multiplier in bits
#: [15:0], shift in bits [21:16], bits [31:22] reserved (zero).
REQUANT_MULT_BITS = 16
REQUANT_SHIFT_BITS = 6


class IsaError(ValueError):
    """An instruction or program that cannot be encoded, decoded or parsed."""


class Queue(enum.IntEnum):
    """Execution queues. The value is the queue's bit in wait/signal masks."""

    LOAD = 0  #: DMA from device memory into the scratchpad or accumulator
    MATMUL = 1  #: weight preload and systolic-array matmuls
    VECTOR = 2  #: element-wise and row operations on accumulator/scratchpad rows
    STORE = 3  #: DMA from the scratchpad or accumulator to device memory


class Mem(enum.IntEnum):
    """On-chip memory selected by a DMA instruction."""

    SP = 0  #: scratchpad: int8 rows of ``config.sp_row_elems`` elements
    ACC = 1  #: accumulator: int32 rows of ``config.acc_row_elems`` elements


class Kind(enum.Enum):
    """How a field's value is written in assembly text."""

    UINT = "uint"  # decimal
    ADDR = "addr"  # hexadecimal
    BOOL = "bool"  # 0 or 1
    MEM = "mem"  # sp | acc
    QUEUE = "queue"  # load | matmul | vector | store
    FUNC = "func"  # a name from the field's choices (or its number)


@dataclass(frozen=True)
class Field:
    name: str
    bits: int
    kind: Kind
    doc: str
    choices: tuple[str, ...] = ()  # Kind.FUNC: name of each value; values past the list are reserved

    @property
    def max(self) -> int:
        return (1 << self.bits) - 1


@dataclass(frozen=True)
class OpSpec:
    """One instruction: opcode, the queue that runs it, operand fields and semantics."""

    opcode: int
    mnemonic: str
    queue: Queue | None  # None: handled by the dispatcher, or named by a field
    fields: tuple[Field, ...]
    summary: str
    semantics: str
    takes_tokens: bool = True

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(name)

    def layout(self) -> list[tuple[Field, int]]:
        """(field, lowest bit) pairs, packed upwards from :data:`HEADER_BITS`."""
        out, pos = [], HEADER_BITS
        for f in self.fields:
            out.append((f, pos))
            pos += f.bits
        return out


# ---------------------------------------------------------------------- fields
def _dma_fields() -> tuple[Field, ...]:
    return (
        Field("mem", 1, Kind.MEM, "on-chip memory: `sp` (int8 rows) or `acc` (int32 rows)"),
        Field("local", 20, Kind.ADDR, "first on-chip row"),
        Field("dram", 32, Kind.ADDR, "device-memory byte address of the first element"),
        Field("rows", 16, Kind.UINT, "number of rows moved (0 moves nothing)"),
        Field("cols", 12, Kind.UINT, "elements per row (at most the on-chip row width)"),
        Field("stride", 24, Kind.ADDR, "device-memory bytes between consecutive rows (0 repeats one row)"),
    )


class Opcode(enum.IntEnum):
    HALT = 0x01
    FENCE = 0x02
    TOKEN = 0x03
    LOAD = 0x10
    STORE = 0x11
    PRELOAD = 0x20
    MATMUL = 0x21
    REQUANT = 0x30
    VBIN = 0x31
    VMAP = 0x32
    VROW = 0x33


#: ``func`` values of the vector operations (index = encoding). Values past each list are
#: reserved: the bit-exact model refuses them and the hardware treats them as illegal.
VBIN_FUNCS = ("add", "mul", "rope")
VMAP_FUNCS = ("scale", "gelu", "silu")
VROW_FUNCS = ("max", "sum", "softmax", "layernorm", "rmsnorm")


def _mem_field(name: str, doc: str) -> Field:
    return Field(name, 1, Kind.MEM, doc)


_SPECS = (
    OpSpec(
        Opcode.HALT, "halt", None, (),
        "End of program.",
        "The dispatcher stops fetching, waits until every queue has drained, then "
        "raises `done` (and the interrupt, when enabled).",
        takes_tokens=False,
    ),
    OpSpec(
        Opcode.FENCE, "fence", None, (),
        "Barrier across all queues.",
        "The dispatcher waits until every queue has drained before dispatching the next "
        "instruction. Orders everything before it against everything after it.",
        takes_tokens=False,
    ),
    OpSpec(
        Opcode.TOKEN, "token", None,
        (Field("queue", 2, Kind.QUEUE, "queue that executes this instruction"),),
        "Move tokens without doing work.",
        "Runs in `queue`: takes the `wait` tokens and gives the `signal` tokens like any "
        "other instruction of that queue, and does nothing else.",
    ),
    OpSpec(
        Opcode.LOAD, "load", Queue.LOAD, _dma_fields(),
        "2-D strided copy from device memory into on-chip rows.",
        "For r < rows: row `local + r` of `mem` receives `cols` elements read from "
        "`dram + r * stride` (int8 for `sp`, little-endian int32 for `acc`); the row's "
        "remaining elements are set to zero, so partial tiles are zero-padded.",
    ),
    OpSpec(
        Opcode.STORE, "store", Queue.STORE, _dma_fields(),
        "2-D strided copy from on-chip rows to device memory.",
        "For r < rows: the first `cols` elements of row `local + r` of `mem` are written "
        "to `dram + r * stride` (int8 for `sp`, little-endian int32 for `acc`). Other "
        "device-memory bytes are untouched.",
    ),
    OpSpec(
        Opcode.PRELOAD, "preload", Queue.MATMUL,
        (
            Field("sp", 20, Kind.ADDR, "first scratchpad row of the weight tile"),
            Field("k", 8, Kind.UINT, "weight-tile rows (reduction depth), 1..array.rows"),
            Field("n", 8, Kind.UINT, "weight-tile columns, 1..array.cols"),
            Field("transpose", 1, Kind.BOOL, "1: the tile is stored transposed (one scratchpad row per column)"),
        ),
        "Load a weight tile into the array.",
        "W[t][j] = sp[sp + t][j] (transpose = 0; reads k rows) or W[t][j] = sp[sp + j][t] "
        "(transpose = 1; reads n rows) for t < k and j < n; every other W entry becomes 0. "
        "W stays until the next preload. The transposed form multiplies by a matrix stored "
        "row-major, as attention's Q K^T needs for K.",
    ),
    OpSpec(
        Opcode.MATMUL, "matmul", Queue.MATMUL,
        (
            Field("a", 20, Kind.ADDR, "first scratchpad row of the input tile"),
            Field("acc", 20, Kind.ADDR, "first accumulator row written"),
            Field("m", 16, Kind.UINT, "input rows streamed through the array"),
            Field("k", 8, Kind.UINT, "input elements per row used, 1..array.rows"),
            Field("accumulate", 1, Kind.BOOL, "1: add to the accumulator rows; 0: overwrite them"),
        ),
        "Stream input rows through the preloaded weights.",
        "For i < m and every column j of the array: P = sum over t < k of "
        "sp[a + i][t] * W[t][j] (int8 x int8 products summed exactly); acc[acc + i][j] "
        "becomes P (accumulate = 0) or acc[acc + i][j] + P modulo 2^32 (accumulate = 1).",
    ),
    OpSpec(
        Opcode.REQUANT, "requant", Queue.VECTOR,
        (
            Field("src", 20, Kind.ADDR, "first accumulator row read"),
            Field("dst", 20, Kind.ADDR, "first scratchpad row written"),
            Field("rows", 16, Kind.UINT, "rows converted"),
            Field("param", 20, Kind.ADDR, "accumulator row of per-channel biases; the next row holds the scale words"),
            Field("relu", 1, Kind.BOOL, "1: clamp negative results to 0"),
        ),
        "Bias, scale and round int32 accumulator rows to int8 scratchpad rows.",
        "For r < rows and each column j: b = acc[param][j], w = acc[param + 1][j], "
        "M = w[15:0], s = w[21:16]; y = round_half_to_even((acc[src + r][j] + b) * M / 2^s) "
        "computed exactly, saturated to [-128, 127], then max(y, 0) if relu. "
        "sp[dst + r][j] = y for j < array.cols; the row's other elements become 0. "
        "Scale-word bits [31:22] must be 0. See docs/numerics.md.",
    ),
    OpSpec(
        Opcode.VBIN, "vbin", Queue.VECTOR,
        (
            Field("func", 2, Kind.FUNC, "`add`, `mul` or `rope` (3 is reserved)", VBIN_FUNCS),
            _mem_field("a_mem", "memory of operand a"),
            Field("a", 20, Kind.ADDR, "first row of operand a"),
            _mem_field("b_mem", "memory of operand b (rope: the cos/sin table)"),
            Field("b", 20, Kind.ADDR, "first row of operand b"),
            _mem_field("dst_mem", "memory of the result: `sp` saturates to int8, `acc` to int32"),
            Field("dst", 20, Kind.ADDR, "first row written"),
            Field("param", 20, Kind.ADDR, "accumulator row holding the parameter words"),
            Field("rows", 16, Kind.UINT, "rows processed (0 does nothing)"),
        ),
        "Element-wise binary operation with requantization: residual add, gating multiply, rotary embedding.",
        "For r < rows and each element j < n of row r (n: the narrowest row width among a, b and dst; "
        "`sp` rows are int8, `acc` rows int32): with parameter words P (P[i] = acc[param + i // array.cols]"
        "[i % array.cols]) packed as REQUANT scale words (M = bits 15..0, s = bits 21..16), "
        "`add`: y = rhe(a*Ma*2^(s-sa) + b*Mb*2^(s-sb), s) with (Ma, sa) from P[0], (Mb, sb) from P[1], "
        "s = max(sa, sb), |sa - sb| <= 15; "
        "`mul`: y = rhe(a*b*M, s) from P[0], at most one operand in `acc`; "
        "`rope`: pairs (2i, 2i+1), with c = b[2i], s' = b[2i+1]: y[2i] = rhe((a[2i]*c - a[2i+1]*s')*M, s), "
        "y[2i+1] = rhe((a[2i]*s' + a[2i+1]*c)*M, s), at most one operand in `acc`. "
        "rhe = exact round half to even of x / 2^s. y saturates to the type of dst; `sp` rows' elements "
        "from n on become 0. dst must equal or not overlap each operand in the same memory. "
        "See docs/numerics.md.",
    ),
    OpSpec(
        Opcode.VMAP, "vmap", Queue.VECTOR,
        (
            Field("func", 2, Kind.FUNC, "`scale`, `gelu` or `silu` (3 is reserved)", VMAP_FUNCS),
            _mem_field("src_mem", "memory of the input"),
            Field("src", 20, Kind.ADDR, "first row read"),
            _mem_field("dst_mem", "memory of the result: `sp` saturates to int8, `acc` to int32"),
            Field("dst", 20, Kind.ADDR, "first row written"),
            Field("param", 20, Kind.ADDR, "accumulator row holding the parameter words"),
            Field("rows", 16, Kind.UINT, "rows processed (0 does nothing)"),
        ),
        "Element-wise unary operation: type conversion/rescale, GELU, SiLU.",
        "For r < rows and each element j < n of row r (n: the narrower of the src and dst row widths), "
        "with parameter words P as for `vbin`: "
        "`scale`: y = rhe(x*M, s) from P[0] (int8 <-> int32 conversion, rescaling); "
        "`gelu`/`silu`: z = rshr(|x|*Mz, sz) from P[0], g = the coefficient-ROM quadratic at z "
        "(Phi for gelu, sigmoid for silu; 1 - g for x < 0), y = rhe(x*g*Mo, so + 15) from P[1]. "
        "y saturates to the type of dst; `sp` rows' elements from n on become 0. dst must equal or "
        "not overlap src when both are in the same memory. Exact integer algorithm in docs/numerics.md.",
    ),
    OpSpec(
        Opcode.VROW, "vrow", Queue.VECTOR,
        (
            Field("func", 3, Kind.FUNC, "`max`, `sum`, `softmax`, `layernorm` or `rmsnorm` (5..7 reserved)",
                  VROW_FUNCS),
            _mem_field("src_mem", "memory of the input tensor"),
            Field("src", 20, Kind.ADDR, "first row of the input tensor (slice-major)"),
            Field("dst", 20, Kind.ADDR, "first row of the result: accumulator for max/sum and a wide softmax "
                                        "or norm, scratchpad otherwise"),
            Field("param", 20, Kind.ADDR, "accumulator row of the parameters (unused by max/sum)"),
            Field("rows", 16, Kind.UINT, "logical rows M (0 does nothing)"),
            Field("len", 16, Kind.UINT, "logical row length L, 1..65535"),
            Field("causal", 1, Kind.BOOL, "softmax: also mask keys j > r + offset"),
            Field("unsigned", 1, Kind.BOOL, "softmax: uint8 output (scale 1/255) instead of int8 (scale 1/127)"),
            Field("wide", 1, Kind.BOOL, "softmax: int32 probabilities at scale 1/2047 (values 0..2047) written to "
                                        "accumulator rows at dst (slice-major with the accumulator's row width) "
                                        "instead of int8/uint8 to the scratchpad; takes precedence over `unsigned`. "
                                        "layernorm/rmsnorm: int32 output (saturated to int32, not int8) to "
                                        "accumulator rows at dst. Ignored by max and sum"),
        ),
        "Row-wise operation over a logical [rows, len] tensor: reductions, softmax, LayerNorm, RMSNorm.",
        "Tensors are slice-major: with E the row width of the memory (array.cols for `acc`, sp_row_elems "
        "for `sp`), element (r, j) of a tensor at base is element j % E of row base + (j // E) * rows + r. "
        "The input spans ceil(len/E) * rows rows from src. "
        "`max`/`sum`: acc[dst + r][0] = max / int32-saturated sum of row r, the row's other elements 0. "
        "`softmax` (int32 input in `acc`): P = [scale word, kv_len, offset]; key j of row r is valid "
        "when j < kv_len and (causal = 0 or j <= r + offset), signed compares; output probabilities "
        "(Q = 127 or 255 for 1.0) to the scratchpad tensor at dst, or with `wide` (Q = 2047) as int32 to the "
        "accumulator tensor at dst, 0 for masked keys and for rows with no valid key. "
        "`layernorm`/`rmsnorm`: parameter rows: row param holds the shift sh (16..40); "
        "the next ceil(len/array.cols) rows the gains G; for layernorm the next as many the biases B; "
        "int8 output to the scratchpad tensor at dst (with `wide`, int32 to the accumulator tensor at dst). "
        "Elements from len on of the last output slice "
        "become 0. dst must equal or not overlap src when both are in the same memory. Exact integer "
        "algorithms in docs/numerics.md.",
    ),
)

OPS: dict[Opcode, OpSpec] = {Opcode(s.opcode): s for s in _SPECS}
_BY_MNEMONIC: dict[str, OpSpec] = {s.mnemonic: s for s in _SPECS}

for _spec in _SPECS:  # the layout must fit the word; checked at import so nobody ships a bad table
    _end = HEADER_BITS + sum(f.bits for f in _spec.fields)
    assert _end <= INSTR_BITS, f"{_spec.mnemonic} needs {_end} bits"


# ---------------------------------------------------------------------- instructions
def _queue_set(value: Iterable[Queue | str | int]) -> frozenset[Queue]:
    out = set()
    for q in value:
        if isinstance(q, str):
            try:
                q = Queue[q.upper()]
            except KeyError:
                raise IsaError(f"unknown queue {q!r} (queues: {', '.join(x.name.lower() for x in Queue)})") from None
        out.add(Queue(q))
    return frozenset(out)


@dataclass(frozen=True)
class Instruction:
    """One decoded instruction. ``args`` holds every operand field of the opcode, as ints."""

    opcode: Opcode
    args: Mapping[str, int] = field(default_factory=dict)
    wait: frozenset[Queue] = frozenset()
    signal: frozenset[Queue] = frozenset()

    def __post_init__(self):
        spec = OPS.get(self.opcode)
        if spec is None:
            raise IsaError(f"unknown opcode {self.opcode!r}")
        object.__setattr__(self, "opcode", Opcode(self.opcode))
        object.__setattr__(self, "wait", _queue_set(self.wait))
        object.__setattr__(self, "signal", _queue_set(self.signal))
        args = dict(self.args)
        names = [f.name for f in spec.fields]
        for name in args:
            if name not in names:
                raise IsaError(f"{spec.mnemonic}: unknown field {name!r} (fields: {', '.join(names) or 'none'})")
        for f in spec.fields:
            if f.name not in args:
                if f.kind is Kind.BOOL:  # flags default to 0, so adding one breaks no program
                    args[f.name] = 0
                    continue
                raise IsaError(f"{spec.mnemonic}: field {f.name!r} is missing")
            value = args[f.name]
            if f.kind is Kind.FUNC and isinstance(value, str):
                if value.lower() not in f.choices:
                    raise IsaError(f"{spec.mnemonic}: {f.name}={value!r} is not one of {', '.join(f.choices)}")
                value = f.choices.index(value.lower())
            value = int(value)
            if not 0 <= value <= f.max:
                raise IsaError(f"{spec.mnemonic}: field {f.name}={value} does not fit {f.bits} bits")
            args[f.name] = value
        object.__setattr__(self, "args", args)
        if not spec.takes_tokens and (self.wait or self.signal):
            raise IsaError(f"{spec.mnemonic} takes no tokens")
        q = self.queue
        if q is not None and (q in self.wait or q in self.signal):
            raise IsaError(f"{spec.mnemonic}: a queue cannot wait for or signal itself ({q.name.lower()})")

    @classmethod
    def make(cls, opcode: Opcode, *, wait=(), signal=(), **args) -> "Instruction":
        return cls(opcode, args, frozenset(_queue_set(wait)), frozenset(_queue_set(signal)))

    @property
    def spec(self) -> OpSpec:
        return OPS[self.opcode]

    @property
    def queue(self) -> Queue | None:
        """The queue that executes this instruction (None for HALT and FENCE)."""
        if self.opcode == Opcode.TOKEN:
            return Queue(self.args["queue"])
        return self.spec.queue

    def __getattr__(self, name: str) -> int:
        args = self.__dict__.get("args")
        if args is not None and name in args:
            return args[name]
        raise AttributeError(name)

    def with_tokens(self, wait=None, signal=None) -> "Instruction":
        return Instruction(self.opcode, self.args,
                           self.wait if wait is None else _queue_set(wait),
                           self.signal if signal is None else _queue_set(signal))

    # -------------------------------------------------------------- binary
    def encode(self) -> bytes:
        word = int(self.opcode)
        word |= _mask(self.wait) << OPCODE_BITS
        word |= _mask(self.signal) << (OPCODE_BITS + MASK_BITS)
        for f, lo in self.spec.layout():
            word |= self.args[f.name] << lo
        return word.to_bytes(INSTR_BYTES, "little")

    @classmethod
    def decode(cls, data: bytes, *, index: int | None = None) -> "Instruction":
        where = f"instruction {index}: " if index is not None else ""
        if len(data) != INSTR_BYTES:
            raise IsaError(f"{where}expected {INSTR_BYTES} bytes, got {len(data)}")
        word = int.from_bytes(data, "little")
        opcode = word & 0xFF
        if opcode not in OPS:
            raise IsaError(f"{where}illegal opcode 0x{opcode:02x}")
        spec = OPS[Opcode(opcode)]
        wait = _unmask((word >> OPCODE_BITS) & 0xF)
        signal = _unmask((word >> (OPCODE_BITS + MASK_BITS)) & 0xF)
        args, end = {}, HEADER_BITS
        for f, lo in spec.layout():
            args[f.name] = (word >> lo) & f.max
            end = lo + f.bits
        if word >> end:
            raise IsaError(f"{where}{spec.mnemonic}: reserved bits {end}..{INSTR_BITS - 1} are not zero")
        try:
            return cls(Opcode(opcode), args, wait, signal)
        except IsaError as exc:
            raise IsaError(f"{where}{exc}") from None

    def __str__(self) -> str:
        return format_instruction(self)


def _mask(queues: frozenset[Queue]) -> int:
    return sum(1 << int(q) for q in queues)


def _unmask(mask: int) -> frozenset[Queue]:
    return frozenset(q for q in Queue if mask >> int(q) & 1)


def encode_program(program: Iterable[Instruction]) -> bytes:
    return b"".join(instr.encode() for instr in program)


def decode_program(data: bytes) -> list[Instruction]:
    if len(data) % INSTR_BYTES:
        raise IsaError(f"program of {len(data)} bytes is not a whole number of {INSTR_BYTES}-byte instructions")
    return [Instruction.decode(data[i:i + INSTR_BYTES], index=i // INSTR_BYTES)
            for i in range(0, len(data), INSTR_BYTES)]


# ---------------------------------------------------------------------- text
def _format_value(f: Field, value: int) -> str:
    if f.kind is Kind.FUNC and value < len(f.choices):
        return f.choices[value]
    if f.kind is Kind.ADDR:
        return f"0x{value:x}"
    if f.kind is Kind.MEM:
        return Mem(value).name.lower()
    if f.kind is Kind.QUEUE:
        return Queue(value).name.lower()
    return str(value)


def _parse_value(f: Field, text: str, where: str) -> int:
    try:
        if f.kind is Kind.MEM:
            return int(Mem[text.upper()])
        if f.kind is Kind.QUEUE:
            return int(Queue[text.upper()])
        if f.kind is Kind.FUNC and text.lower() in f.choices:
            return f.choices.index(text.lower())
        return int(text, 0)
    except (KeyError, ValueError):
        raise IsaError(f"{where}bad value {text!r} for field {f.name} ({f.kind.value})") from None


def format_instruction(instr: Instruction) -> str:
    """Canonical assembly text: mnemonic, every field in definition order, then tokens."""
    parts = [instr.spec.mnemonic]
    parts += [f"{f.name}={_format_value(f, instr.args[f.name])}" for f in instr.spec.fields]
    for key, queues in (("wait", instr.wait), ("signal", instr.signal)):
        if queues:
            parts.append(f"{key}=" + ",".join(q.name.lower() for q in sorted(queues)))
    return " ".join(parts)


_COMMENT = re.compile(r"[#;].*$")


def parse_instruction(line: str, *, lineno: int | None = None) -> Instruction | None:
    """Parse one line of assembly; returns None for blank or comment-only lines."""
    where = f"line {lineno}: " if lineno is not None else ""
    text = _COMMENT.sub("", line).strip()
    if not text:
        return None
    mnemonic, *items = text.split()
    spec = _BY_MNEMONIC.get(mnemonic.lower())
    if spec is None:
        raise IsaError(f"{where}unknown mnemonic {mnemonic!r} (known: {', '.join(_BY_MNEMONIC)})")
    args: dict[str, int] = {}
    wait: frozenset[Queue] = frozenset()
    signal: frozenset[Queue] = frozenset()
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise IsaError(f"{where}expected name=value, got {item!r}")
        key = key.lower()
        if key in ("wait", "signal"):
            try:
                queues = _queue_set(value.split(","))
            except IsaError as exc:
                raise IsaError(f"{where}{exc}") from None
            if key == "wait":
                wait = queues
            else:
                signal = queues
            continue
        try:
            f = spec.field(key)
        except KeyError:
            names = ", ".join(x.name for x in spec.fields) or "none"
            raise IsaError(f"{where}{spec.mnemonic}: unknown field {key!r} (fields: {names})") from None
        if key in args:
            raise IsaError(f"{where}{spec.mnemonic}: field {key!r} given twice")
        args[key] = _parse_value(f, value, where)
    try:
        return Instruction(Opcode(spec.opcode), args, wait, signal)
    except IsaError as exc:
        raise IsaError(f"{where}{exc}") from None


def assemble(text: str) -> list[Instruction]:
    program = []
    for lineno, line in enumerate(text.splitlines(), 1):
        instr = parse_instruction(line, lineno=lineno)
        if instr is not None:
            program.append(instr)
    return program


def disassemble(program: Iterable[Instruction]) -> str:
    return "".join(format_instruction(i) + "\n" for i in program)


# ---------------------------------------------------------------------- docs
def render_markdown() -> str:
    """The ISA reference (docs/isa.md), generated from the tables above."""
    out = [
        "# weft instruction set",
        "",
        "<!-- Generated from weft/hw/isa.py by `make docs` (weft docs isa). Do not edit by hand. -->",
        "",
        f"Instructions are {INSTR_BITS} bits ({INSTR_BYTES} bytes, little-endian). Every "
        "instruction starts with the same header; operand fields follow from bit "
        f"{HEADER_BITS} upwards in the order listed. Bits above the last field are reserved "
        "and must be zero (a decoder rejects the instruction otherwise). Opcode 0x00 is "
        "illegal, so zeroed memory never decodes as a program.",
        "",
        "| bits | field | meaning |",
        "| --- | --- | --- |",
        f"| 0..{OPCODE_BITS - 1} | opcode | see the table below |",
        f"| {OPCODE_BITS}..{OPCODE_BITS + MASK_BITS - 1} | wait | one bit per queue: take one token from that queue before executing |",
        f"| {OPCODE_BITS + MASK_BITS}..{HEADER_BITS - 1} | signal | one bit per queue: give one token to that queue after completing |",
        "",
        "## Execution model",
        "",
    ]
    doc = __doc__.split("Execution model\n---------------\n", 1)[1].strip()
    out += [" ".join(doc.split()), ""]
    out += ["### Queues", "", "| bit | queue | runs |", "| --- | --- | --- |"]
    for q in Queue:
        runs = ", ".join(s.mnemonic for s in _SPECS if s.queue is q) or "-"
        out.append(f"| {int(q)} | {q.name.lower()} | {runs} |")
    out += ["", "### On-chip memories", "",
            "| value | name | row |", "| --- | --- | --- |",
            "| 0 | sp | `sp_row_elems = max(array.rows, array.cols)` int8 elements |",
            "| 1 | acc | `array.cols` int32 elements |",
            "", "Addresses of on-chip memories count rows; device-memory addresses count bytes.", ""]
    out += ["## Opcodes", "", "| opcode | mnemonic | queue | summary |", "| --- | --- | --- | --- |"]
    for s in _SPECS:
        queue = s.queue.name.lower() if s.queue is not None else ("(field)" if s.fields and s.fields[0].kind is Kind.QUEUE else "dispatcher")
        out.append(f"| 0x{s.opcode:02x} | `{s.mnemonic}` | {queue} | {s.summary} |")
    out.append("")
    for s in _SPECS:
        out += [f"## `{s.mnemonic}` (0x{s.opcode:02x})", "", s.summary, ""]
        if s.fields:
            out += ["| bits | field | assembly | meaning |", "| --- | --- | --- | --- |"]
            for f, lo in s.layout():
                out.append(f"| {lo}..{lo + f.bits - 1} | `{f.name}` | {f.kind.value} | {f.doc} |")
            out.append("")
        out += [f"Semantics: {s.semantics}", ""]
        if not s.takes_tokens:
            out += ["Takes no tokens (`wait` and `signal` must be empty).", ""]
    out += [
        "## Assembly syntax",
        "",
        "One instruction per line: the mnemonic, then `field=value` for every field (flags, "
        "the one-bit fields, may be left out and then are 0), then "
        "optional `wait=` and `signal=` with comma-separated queue names. `#` or `;` starts "
        "a comment. Numbers take any Python integer prefix (`0x`, `0b`, decimal). The "
        "disassembler prints fields in the order above, addresses in hex, so "
        "`weft asm` and `weft disasm` round-trip exactly.",
        "",
        "```",
        "load mem=sp local=0x0 dram=0x1000 rows=16 cols=16 stride=0x200 signal=matmul",
        "preload sp=0x10 k=16 n=16 transpose=0 wait=load",
        "matmul a=0x0 acc=0x0 m=16 k=16 accumulate=0 signal=vector",
        "halt",
        "```",
        "",
    ]
    return "\n".join(out)
