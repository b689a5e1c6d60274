"""GEMM kernel generator: C = A @ B (+ bias, requantized) as a tiled, pipelined program.

Dataflow (weight-stationary): the array holds a ``k x n`` tile of B; rows of A stream
through it, one output row of ``cols`` int32 per row of A. The kernel walks

    for each block of ``mb`` rows of A (i):        A block stays in the scratchpad
        for each ``cols``-wide column tile of B (j):  accumulator tile (i, j)
            for each ``rows``-deep slice of K (t):    one *step*: preload B(t, j), matmul

and overlaps the four queues through dependency tokens:

* load -> matmul, one token per step (the step's A slice, when j == 0, and B tile are in);
  matmul -> load, one token per step (its B slot, and the A block once no longer read, are free);
  B tiles rotate through ``b_slots`` scratchpad slots, A blocks through two;
* matmul -> vector (int8 output) or matmul -> store (int32 output), one token per
  accumulator tile, and the reverse token when the tile's accumulator slot is free;
* load -> vector per tile (bias and scale words are in their parameter slot) and back;
* vector -> store per tile (int8 rows are in an output slot) and back.

Shapes need not be multiples of the array: partial tiles rely on the ISA's zero fill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from weft.hw.bundle import Bundle, Segment, TensorSpec
from weft.hw.config import AcceleratorConfig
from weft.hw.isa import INSTR_BYTES, Instruction, Mem, Opcode, Queue
from weft.hw.vector_numerics import pack_scale_word

from .memory import DeviceMemoryPlan

__all__ = ["GemmPlan", "GemmError", "plan_gemm", "gemm_program", "build_gemm_bundle", "wide_gemm_params",
           "GemvPlan", "plan_gemv", "gemv_program", "gemv_params", "build_gemv_bundle", "digit_gemm_params",
           "gemv_digit_consts"]

L, MM, V, S = Queue.LOAD, Queue.MATMUL, Queue.VECTOR, Queue.STORE
#: Word rows at the start of a ``wide`` GEMM's parameters (:func:`wide_gemm_params`).
WIDE_WORD_ROWS = 3


class GemmError(ValueError):
    """A GEMM that cannot be mapped onto the configuration, with what does not fit."""


@dataclass(frozen=True)
class GemmPlan:
    """Tiling and on-chip memory plan of one GEMM. Row addresses are scratchpad/accumulator rows."""

    M: int
    N: int
    K: int
    output: str  # "int8" (requantized), "int32" (raw accumulators) or "wide" (see gemm_program)
    mb: int  # rows of A per block
    k_tiles: int
    n_tiles: int
    m_blocks: int
    b_slots: int
    acc_slots: int
    out_slots: int
    param_slots: int
    sp_a: tuple[int, ...]  # first row of each A block slot (mb * k_tiles rows each; 1 or 2 slots)
    sp_b: tuple[int, ...]  # first row of each B tile slot (array.rows rows each)
    sp_out: tuple[int, ...]  # first row of each int8 output slot (mb rows each)
    acc_tile: tuple[int, ...]  # first row of each accumulator slot (mb rows each)
    acc_param: tuple[int, ...]  # first row of each parameter slot (2 rows each, 3 for a two-digit A;
    #                              "wide": 3 word rows, then mb rows of the bias)
    sp_rows_used: int
    acc_rows_used: int
    a_digits: bool = False  # A is two int8 digit planes: every block streams 2 x its rows
    sp_fac: tuple[int, ...] = ()  # "wide": first row of each slot's column factors (mb rows each)

    @property
    def steps(self) -> int:
        return self.m_blocks * self.n_tiles * self.k_tiles

    def block_rows(self, i: int) -> int:
        return min(self.mb, self.M - i * self.mb)


def plan_gemm(config: AcceleratorConfig, M: int, N: int, K: int, *, output: str = "int8",
              sp_base: int = 0, acc_base: int = 0, b_slots: int = 2, max_block_rows: int | None = None,
              a_digits: bool = False) -> GemmPlan:
    """Choose block sizes and on-chip addresses for an ``M x K @ K x N`` GEMM.

    ``mb`` is the largest block that fits (double-buffered, or in one slot when that means
    fewer blocks), then evened out so the blocks have equal sizes. ``a_digits``: A is a two-digit tensor (``16 * hi + lo``, two int8
    planes); a block holds both digits' rows (2 ``mb`` scratchpad rows per K slice, 2 ``mb``
    accumulator rows per tile) and its parameter slots a third row (the ``vbin add`` words).
    Raises :class:`GemmError` naming the memory that is too small.
    """
    if output not in ("int8", "int32", "wide"):
        raise GemmError(f"output must be 'int8', 'int32' or 'wide', got {output!r}")
    for name, value in (("M", M), ("N", N), ("K", K)):
        if value < 1:
            raise GemmError(f"{name}={value}: dimensions must be at least 1")
    R, C = config.array.rows, config.array.cols
    if N > C and config.sp_row_elems < C:  # pragma: no cover - sp rows are max(R, C) wide
        raise GemmError("scratchpad rows narrower than the array")
    k_tiles, n_tiles = math.ceil(K / R), math.ceil(N / C)
    if b_slots < 1:
        raise GemmError(f"b_slots={b_slots}: at least one B slot is needed")
    # The load of A block i + 2 (into the slot block i used) is ordered only after the
    # matmul b_slots steps earlier; block i's last read of the slot is (n_tiles + 1) *
    # k_tiles steps before it, so more B slots than that would let the load overwrite
    # rows still being read (a race).
    b_slots = min(b_slots, (n_tiles + 1) * k_tiles)
    # Every slot-free token stream keeps up to max(b_slots, 2) tokens in one counter
    # (and leaves that many at the end); a smaller token_max stalls the producer for good.
    if config.queues.token_max < max(b_slots, 2):
        raise GemmError(f"queues.token_max={config.queues.token_max} is too small: the GEMM kernel keeps "
                        f"up to {max(b_slots, 2)} tokens in flight between two queues")
    int8_out = output == "int8"
    wide = output == "wide"
    if a_digits and output == "int32":
        raise GemmError("a two-digit A needs int8 or wide output (the digits are combined by the vector unit)")
    acc_slots = out_slots = 2
    param_slots = 2 if int8_out or wide else 0
    param_rows = WIDE_WORD_ROWS if wide else 3 if a_digits else 2
    d = 2 if a_digits else 1  # rows streamed per row of A
    sp_free = config.sp_rows - sp_base
    acc_free = config.acc_rows - acc_base - param_rows * param_slots
    # Scratchpad: a_slots A blocks (d * mb * k_tiles rows each) + b_slots B tiles + 2 output blocks.
    # Two A slots load the next block while this one streams; one slot halves the blocks when
    # K is long (every block streams all of B again, one PRELOAD per tile). One slot is
    # race-free when b_slots <= k_tiles: block i + 1 loads slice t of A at its step t, after
    # the MATMUL b_slots steps earlier, which is no earlier than block i's last read of slice t.
    # wide: each parameter slot also holds mb rows of bias (accumulator) and of factors (scratchpad)
    mb_acc = acc_free // (acc_slots * d + (param_slots if wide else 0))
    sp_per_row = (out_slots if int8_out else 0) + (param_slots if wide else 0)

    def block_rows(a_slots: int) -> int:
        mb_sp_ = (sp_free - b_slots * R) // (a_slots * d * k_tiles + sp_per_row)
        return min(mb_sp_, mb_acc, (1 << 16) - 1, max_block_rows or M)

    a_slots = 2
    if b_slots <= k_tiles and block_rows(1) >= 1 and (
            block_rows(2) < 1 or math.ceil(M / block_rows(1)) < math.ceil(M / block_rows(2))):
        a_slots = 1
    mb_max = block_rows(a_slots)
    if mb_max < 1:
        mb_sp = (sp_free - b_slots * R) // (a_slots * d * k_tiles + sp_per_row)
        need_sp = b_slots * R + d * k_tiles + sp_per_row
        need_acc = acc_slots * d + (param_rows + (1 if wide else 0)) * param_slots
        short = [f"scratchpad needs {need_sp} rows, {sp_free} free (short by {need_sp - sp_free})"
                 for _ in [0] if mb_sp < 1]
        short += [f"accumulator needs {need_acc} rows, {config.acc_rows - acc_base} free "
                  f"(short by {need_acc - (config.acc_rows - acc_base)})" for _ in [0] if mb_acc < 1]
        raise GemmError(f"GEMM {M}x{N}x{K} does not fit even one row block (K={K} is {k_tiles} slices of {R}): "
                        + "; ".join(short))
    m_blocks = math.ceil(M / mb_max)
    mb = math.ceil(M / m_blocks)
    sp_a = tuple(sp_base + s * d * mb * k_tiles for s in range(a_slots))
    sp_b = tuple(sp_base + a_slots * d * mb * k_tiles + s * R for s in range(b_slots))
    out_base = sp_base + a_slots * d * mb * k_tiles + b_slots * R
    sp_out = tuple(out_base + s * mb for s in range(out_slots)) if int8_out else ()
    sp_fac = tuple(out_base + s * mb for s in range(param_slots)) if wide else ()
    acc_tile = tuple(acc_base + s * d * mb for s in range(acc_slots))
    param_base = acc_base + acc_slots * d * mb
    slot_rows = param_rows + (mb if wide else 0)
    acc_param = tuple(param_base + slot_rows * s for s in range(param_slots))
    return GemmPlan(M, N, K, output, mb, k_tiles, n_tiles, m_blocks, b_slots, acc_slots,
                    out_slots if int8_out else 0, param_slots, sp_a, sp_b, sp_out, acc_tile, acc_param,
                    sp_rows_used=out_base + sp_per_row * mb - sp_base,
                    acc_rows_used=param_base + slot_rows * param_slots - acc_base, a_digits=a_digits,
                    sp_fac=sp_fac)


def gemm_program(config: AcceleratorConfig, plan: GemmPlan, *, a_addr: int, b_addr: int, out_addr: int,
                 params_addr: int | None = None, a_stride: int | None = None, b_stride: int | None = None,
                 out_stride: int | None = None, relu: bool = False, halt: bool = True,
                 a_plane: int | None = None, wide_bias: bool = True) -> list[Instruction]:
    """Emit the instruction stream for ``plan``.

    Device-memory operands (byte addresses, row-major with the given row strides in bytes):
    A int8 ``M x K``, B int8 ``K x N``, output ``M x N`` (int8 or int32). For int8 output,
    ``params_addr`` points at an int32 ``2 x N`` array: row 0 the per-column bias (added to
    the int32 accumulator), row 1 the REQUANT scale words (see :func:`weft.sim.golden.pack_scale_word`).

    Two-digit A (``plan.a_digits``): the ``hi`` plane at ``a_addr``, the ``lo`` plane ``a_plane``
    bytes after it; both stream through each weight tile (``2 m`` rows per MATMUL), a
    ``vbin add`` forms ``16 acc_hi + acc_lo`` before REQUANT, and the parameters are ``3 x N``
    (:func:`digit_gemm_params`, padded to whole tiles).

    ``wide`` output (a Linear handing the int32 residual its accumulators): per accumulator
    tile the vector unit forms ``16 acc_hi + acc_lo`` (two-digit A), adds the bias and multiplies
    by the columns' int8 factors (``vbin add``, ``vbin add``, ``vbin mul``: bias and factor rows
    loaded down the tile with stride-0 loads), and the int32 tile is stored;
    ``params_addr`` points at :func:`wide_gemm_params`. ``wide_bias=False`` (a bias of zeros)
    leaves out the bias rows' loads and their ``vbin add``.
    """
    R, C = config.array.rows, config.array.cols
    N, K = plan.N, plan.K
    int8_out = plan.output == "int8"
    wide = plan.output == "wide"
    out_elem = 1 if int8_out else 4
    a_stride = K if a_stride is None else a_stride
    b_stride = N if b_stride is None else b_stride
    out_stride = N * out_elem if out_stride is None else out_stride
    if (int8_out or wide) and params_addr is None:
        raise GemmError(f"{plan.output} output needs params_addr (bias and scale words)")
    digits = plan.a_digits
    if digits and a_plane is None:
        raise GemmError("a two-digit A needs a_plane (the offset of its lo plane)")
    d = 2 if digits else 1
    prm_rows = 3 if digits else 2

    prog: list[Instruction] = []
    consumer = V if int8_out else S  # who empties accumulator tiles (wide: the store, after the vector unit)
    done = V if int8_out or wide else S  # who takes a finished accumulator tile
    bias_at = WIDE_WORD_ROWS * C * 4  # wide parameters: word rows, bias row, factor row
    fac_at = bias_at + plan.n_tiles * C * 4
    step = 0
    tile = 0
    for i in range(plan.m_blocks):
        m = plan.block_rows(i)
        a_slot = plan.sp_a[i % len(plan.sp_a)]
        for j in range(plan.n_tiles):
            n = min(C, N - j * C)
            acc = plan.acc_tile[tile % plan.acc_slots]
            for t in range(plan.k_tiles):
                k = min(R, K - t * R)
                # ---- load queue: the step's inputs
                loads: list[Instruction] = []
                if wide and t == 0:  # word rows, then bias and factors down the tile (stride 0)
                    p = plan.acc_param[tile % plan.param_slots]
                    f = plan.sp_fac[tile % plan.param_slots]
                    loads.append(Instruction.make(Opcode.LOAD, mem=Mem.ACC, local=p, dram=params_addr,
                                                  rows=WIDE_WORD_ROWS, cols=C, stride=C * 4,
                                                  wait=[V] if tile >= plan.param_slots else []))
                    if wide_bias:
                        loads.append(Instruction.make(Opcode.LOAD, mem=Mem.ACC, local=p + WIDE_WORD_ROWS,
                                                      dram=params_addr + bias_at + j * C * 4, rows=m, cols=n, stride=0))
                    loads.append(Instruction.make(Opcode.LOAD, mem=Mem.SP, local=f, dram=params_addr + fac_at + j * C,
                                                  rows=m, cols=n, stride=0, signal=[V]))
                if int8_out and t == 0:
                    p = plan.acc_param[tile % plan.param_slots]
                    # digits: whole padded rows, so a partial tile still gets both vbin add words
                    loads.append(Instruction.make(
                        Opcode.LOAD, mem=Mem.ACC, local=p, dram=params_addr + j * C * 4, rows=prm_rows,
                        cols=C if digits else n, stride=(plan.n_tiles * C if digits else N) * 4,
                        wait=[V] if tile >= plan.param_slots else [], signal=[V]))
                if j == 0:
                    for dig in range(d):  # hi rows, then lo rows right after them
                        loads.append(Instruction.make(
                            Opcode.LOAD, mem=Mem.SP, local=a_slot + t * d * plan.mb + dig * m,
                            dram=a_addr + dig * (a_plane or 0) + i * plan.mb * a_stride + t * R, rows=m, cols=k,
                            stride=a_stride))
                b_slot = plan.sp_b[step % plan.b_slots]
                loads.append(Instruction.make(
                    Opcode.LOAD, mem=Mem.SP, local=b_slot, dram=b_addr + t * R * b_stride + j * C,
                    rows=k, cols=n, stride=b_stride))
                if step >= plan.b_slots:  # the slots were last read by step - b_slots
                    loads[0] = loads[0].with_tokens(wait=loads[0].wait | {MM})
                loads[-1] = loads[-1].with_tokens(signal=loads[-1].signal | {MM})
                prog += loads
                # ---- matmul queue
                wait = {L}
                if t == 0 and tile >= plan.acc_slots:
                    wait.add(consumer)  # the accumulator slot has been emptied
                prog.append(Instruction.make(Opcode.PRELOAD, sp=b_slot, k=k, n=n, transpose=0, wait=wait))
                signal = {L}
                if t == plan.k_tiles - 1:
                    signal.add(done)
                prog.append(Instruction.make(Opcode.MATMUL, a=a_slot + t * d * plan.mb, acc=acc, m=d * m, k=k,
                                             accumulate=int(t > 0), signal=signal))
                step += 1
            # ---- drain the accumulator tile
            out_row = out_addr + i * plan.mb * out_stride + j * C * out_elem
            if int8_out:
                out = plan.sp_out[tile % plan.out_slots]
                wait = {MM, L} | ({S} if tile >= plan.out_slots else set())
                prm = plan.acc_param[tile % plan.param_slots]
                if digits:  # acc_hi (first m rows) = 16 acc_hi + acc_lo, in place
                    prog.append(Instruction.make(Opcode.VBIN, func="add", a_mem=Mem.ACC, a=acc, b_mem=Mem.ACC,
                                                 b=acc + m, dst_mem=Mem.ACC, dst=acc, param=prm + 2, rows=m,
                                                 wait=wait))
                    wait = set()
                prog.append(Instruction.make(Opcode.REQUANT, src=acc, dst=out, rows=m, param=prm, relu=int(relu),
                                             wait=wait, signal={MM, S, L}))
                prog.append(Instruction.make(Opcode.STORE, mem=Mem.SP, local=out, dram=out_row, rows=m, cols=n,
                                             stride=out_stride, wait={V}, signal={V}))
            elif wide:
                prm = plan.acc_param[tile % plan.param_slots]
                fac = plan.sp_fac[tile % plan.param_slots]
                wait = {MM, L}
                if digits:  # acc_hi (first m rows) = 16 acc_hi + acc_lo, in place
                    prog.append(Instruction.make(Opcode.VBIN, func="add", a_mem=Mem.ACC, a=acc, b_mem=Mem.ACC,
                                                 b=acc + m, dst_mem=Mem.ACC, dst=acc, param=prm, rows=m, wait=wait))
                    wait = set()
                if wide_bias:
                    prog.append(Instruction.make(Opcode.VBIN, func="add", a_mem=Mem.ACC, a=acc, b_mem=Mem.ACC,
                                                 b=prm + WIDE_WORD_ROWS, dst_mem=Mem.ACC, dst=acc, param=prm + 1,
                                                 rows=m, wait=wait))
                    wait = set()
                prog.append(Instruction.make(Opcode.VBIN, func="mul", a_mem=Mem.ACC, a=acc, b_mem=Mem.SP, b=fac,
                                             dst_mem=Mem.ACC, dst=acc, param=prm + 2, rows=m, wait=wait,
                                             signal={S, L}))
                prog.append(Instruction.make(Opcode.STORE, mem=Mem.ACC, local=acc, dram=out_row, rows=m, cols=n,
                                             stride=out_stride, wait={V}, signal={MM}))
            else:
                prog.append(Instruction.make(Opcode.STORE, mem=Mem.ACC, local=acc, dram=out_row, rows=m, cols=n,
                                             stride=out_stride, wait={MM}, signal={MM}))
            tile += 1
    if halt:
        prog.append(Instruction.make(Opcode.HALT))
    return prog


def digit_gemm_params(config: AcceleratorConfig, bias, scale_words) -> np.ndarray:
    """``3 x ceil(N / cols) * cols`` int32 parameters of a GEMM with a two-digit A: bias, REQUANT
    scale words, and the ``vbin add`` words (16, 1) at the start of every ``cols``-wide tile of
    the third row (zero-padded to whole tiles)."""
    from .reference import DIGIT_BASE  # the digit convention lives with the integer semantics

    bias = np.asarray(bias, np.int64).ravel()
    N = bias.size
    C = config.array.cols
    out = np.zeros((3, math.ceil(N / C) * C), dtype=np.int32)
    out[0, :N] = bias
    out[1, :N] = np.broadcast_to(np.asarray(scale_words, np.int64).ravel(), (N,))
    out[2, 0::C] = int(pack_scale_word(DIGIT_BASE, 0))
    if C > 1:
        out[2, 1::C] = int(pack_scale_word(1, 0))
    return out


def wide_gemm_params(config: AcceleratorConfig, bias, factors, word: int) -> np.ndarray:
    """The parameters of a ``wide`` GEMM (bytes, int32-aligned): three rows of ``cols`` int32
    words (``vbin add`` (16, 1) for the digits, (1, 1) for the bias; the ``vbin mul`` word),
    the bias (int32, zero-padded to whole tiles) and the columns' int8 factors (padded)."""
    from .reference import DIGIT_BASE

    bias = np.asarray(bias, np.int64).ravel()
    N = bias.size
    C = config.array.cols
    Np = math.ceil(N / C) * C
    words = np.zeros((WIDE_WORD_ROWS, C), np.int32)
    words[0, 0], words[1, 0], words[2, 0] = int(pack_scale_word(DIGIT_BASE, 0)), 1, word
    if C > 1:
        words[0, 1] = words[1, 1] = 1
    b = np.zeros(Np, np.int32)
    b[:N] = bias
    f = np.zeros(Np, np.int8)
    f[:N] = np.asarray(factors, np.int8).ravel()
    return np.concatenate([words.view(np.uint8).ravel(), b.view(np.uint8), f.view(np.uint8)])


# ---------------------------------------------------------------------- GEMV (decode)
@dataclass(frozen=True)
class GemvPlan:
    """Tiling of ``y = x @ W`` for a single row ``x`` (1 x K) with the weights streamed.

    The weight-stationary GEMM above would preload a weight tile to do one row of MACs, and a
    PRELOAD reads its rows far slower than the bus delivers them. Here the roles swap: the
    ``x`` slice ``x[t*R:(t+1)*R]`` is the stationary tile (one column, preloaded transposed from
    one scratchpad row), and the rows of ``W^T`` (``N x K``, stored transposed in device memory)
    stream through the array as the input operand, one row of ``R`` int8 per cycle. Output
    channel ``n`` accumulates in column 0 of accumulator row ``n`` of a block, over the ``K``
    slices. Each block's column goes to device memory (``N`` int32, one row per channel);
    for int8 output it comes back row-major, ``cols`` channels per accumulator row, for REQUANT's
    per-column bias and scale words (one REQUANT per row of ``cols`` channels).
    """

    N: int
    K: int
    output: str
    cols: int  # channels per accumulator row in the requant passes (array.cols)
    nb: int  # output channels per block (accumulator rows of one column slot)
    n_blocks: int
    k_tiles: int
    w_slots: int
    sp_w: tuple[int, ...]  # first row of each W^T slot (nb rows each); the x slices are rows 0..k_tiles-1
    acc_col: tuple[int, ...]  # first row of each column slot (nb rows each)
    g: int  # rows of ``cols`` channels requantized per pass (int8 output); data at accumulator
    #         row 0, parameter rows after it, int8 rows at scratchpad row 0 (after a fence)
    x_digits: bool = False  # x is a two-digit tensor: slice t's lo and hi in scratchpad rows 2t, 2t + 1
    sp_table: int = 0  # x_digits: nb scratchpad rows of the (1, -16) vbin rope table
    acc_word: int = 0  # x_digits: the accumulator row holding its scale word

    @property
    def steps(self) -> int:
        return self.n_blocks * self.k_tiles

    def block_rows(self, b: int) -> int:
        return min(self.nb, self.N - b * self.nb)


def plan_gemv(config: AcceleratorConfig, N: int, K: int, *, output: str = "int8", w_slots: int = 4,
              max_block_rows: int | None = None, x_digits: bool = False) -> GemvPlan:
    """Blocks and on-chip addresses of a weight-streaming GEMV (see :class:`GemvPlan`).

    A block is as many channels as half the accumulator holds (two column slots, so one
    block's column is stored while the next accumulates), limited by the scratchpad's room for
    ``w_slots`` streamed slices. Raises :class:`GemmError` naming the memory that is too small.
    """
    if output not in ("int8", "int32"):
        raise GemmError(f"output must be 'int8' or 'int32', got {output!r}")
    for name, value in (("N", N), ("K", K), ("w_slots", w_slots)):
        if value < 1:
            raise GemmError(f"{name}={value}: must be at least 1")
    R, C = config.array.rows, config.array.cols
    if config.sp_row_elems < R:  # pragma: no cover - sp rows are max(R, C) wide
        raise GemmError("scratchpad rows narrower than the array")
    if config.queues.token_max < max(w_slots, 2):
        raise GemmError(f"queues.token_max={config.queues.token_max} is too small: the GEMV kernel keeps "
                        f"up to {max(w_slots, 2)} tokens in flight between two queues")
    k_tiles = math.ceil(K / R)
    d = 2 if x_digits else 1  # x rows per slice; digits also keep a table row per channel and a word row
    nb = min((config.acc_rows - (d - 1)) // 2, (config.sp_rows - d * k_tiles) // (w_slots + d - 1), (1 << 16) - 1,
             max_block_rows or N, N)
    g = min(config.acc_rows // 3, config.sp_rows, math.ceil(N / C))
    if nb < 1 or g < 1:
        raise GemmError(f"GEMV {N}x{K} does not fit: x needs {k_tiles} scratchpad rows and each of {w_slots} "
                        f"weight slots at least one ({config.sp_rows} rows); the accumulator needs 3 rows "
                        f"({config.acc_rows})")
    n_blocks = math.ceil(N / nb)
    nb = math.ceil(N / n_blocks)
    x_rows = d * k_tiles
    return GemvPlan(N, K, output, C, nb, n_blocks, k_tiles, w_slots,
                    sp_w=tuple(x_rows + s * nb for s in range(w_slots)), acc_col=(0, nb), g=g, x_digits=x_digits,
                    sp_table=x_rows + w_slots * nb, acc_word=2 * nb)


def gemv_params(config: AcceleratorConfig, bias, scale_words) -> np.ndarray:
    """The GEMV kernel's parameter words: per row of ``cols`` channels, the bias row then the
    scale-word row (``[ceil(N / cols), 2, cols]`` int32, zero-padded), so one LOAD brings a
    requant pass's parameters."""
    C = config.array.cols
    bias = np.asarray(bias, np.int64).ravel()
    words = np.broadcast_to(np.asarray(scale_words, np.int64).ravel(), bias.shape)
    slices = math.ceil(bias.size / C)
    out = np.zeros((2, slices * C), dtype=np.int32)
    out[0, :bias.size], out[1, :bias.size] = bias, words
    return np.ascontiguousarray(out.reshape(2, slices, C).transpose(1, 0, 2))


def gemv_digit_consts() -> np.ndarray:
    """The 32 bytes a two-digit GEMV reads (``digit_consts``): the ``vbin rope`` table row
    (1, -16) as int8 at byte 0 and its scale word (multiplier 1, shift 0) as int32 at byte 16."""
    from .reference import DIGIT_BASE

    out = np.zeros(32, dtype=np.uint8)
    out[0:2] = np.array([1, -DIGIT_BASE], dtype=np.int8).view(np.uint8)
    out[16:20] = np.array([pack_scale_word(1, 0)], dtype="<i4").view(np.uint8)
    return out


def gemv_program(config: AcceleratorConfig, plan: GemvPlan, *, x_addr: int, wt_addr: int, out_addr: int,
                 col_addr: int | None = None, params_addr: int | None = None, relu: bool = False,
                 halt: bool = True, x_plane: int | None = None, digit_consts: int | None = None) -> list[Instruction]:
    """Emit the instruction stream for ``plan``.

    Device-memory operands: ``x`` int8 ``1 x K``; ``W^T`` int8 ``N x K`` row-major (row stride
    ``K``); the output ``1 x N`` (int8, or int32 accumulators). For int8 output, ``col_addr`` is
    a scratch of ``4 * cols * ceil(N / cols)`` bytes for the int32 column and ``params_addr`` the
    :func:`gemv_params` words. For int32 output the column is the output (``col_addr`` unused).

    Time: ``ceil(K / R) * N`` cycles of streaming, one weight row per cycle, the bus's rate when
    a row of ``R`` int8 is one beat; the loads of a slot overlap the MATMUL of the slot before.
    Then ``N`` one-beat stores of the column and, for int8, ``ceil(N / cols)`` REQUANTs.

    Two-digit x (``plan.x_digits``: hi at ``x_addr``, lo ``x_plane`` bytes after it): the two
    digits are two stationary columns (lo, hi), so the weights still stream once; per block a
    ``vbin rope`` with the table (c, s') = (1, -16) turns each accumulator row's (lo, hi) sums
    into ``lo + 16 hi`` in column 0 (``digit_consts``: :func:`gemv_digit_consts` in device memory).
    """
    R, C = config.array.rows, config.array.cols
    N, K = plan.N, plan.K
    int8_out = plan.output == "int8"
    if int8_out and (params_addr is None or col_addr is None):
        raise GemmError("int8 GEMV output needs params_addr and col_addr")
    column = col_addr if int8_out else out_addr
    digits = plan.x_digits
    if digits and (x_plane is None or digit_consts is None):
        raise GemmError("a two-digit x needs x_plane and digit_consts")
    prog: list[Instruction] = []
    if digits:
        # slice t: lo in scratchpad row 2t, hi in 2t + 1 (the transposed PRELOAD reads them as
        # stationary columns 0 and 1); then the rope table down nb rows and its word
        for t in range(plan.k_tiles):
            k = min(R, K - t * R)
            for row, plane in ((2 * t, x_plane), (2 * t + 1, 0)):
                prog.append(Instruction.make(Opcode.LOAD, mem=Mem.SP, local=row, dram=x_addr + plane + t * R,
                                             rows=1, cols=k, stride=k))
        prog.append(Instruction.make(Opcode.LOAD, mem=Mem.SP, local=plan.sp_table, dram=digit_consts, rows=plan.nb,
                                     cols=2, stride=0))
        prog.append(Instruction.make(Opcode.LOAD, mem=Mem.ACC, local=plan.acc_word, dram=digit_consts + 16, rows=1,
                                     cols=1, stride=0, signal=[V]))
    else:
        # ---- x: slice t in scratchpad row t (the last one zero-padded by the load)
        full, rest = divmod(K, R)
        if full:
            prog.append(Instruction.make(Opcode.LOAD, mem=Mem.SP, local=0, dram=x_addr, rows=full, cols=R, stride=R))
        if rest:
            prog.append(Instruction.make(Opcode.LOAD, mem=Mem.SP, local=full, dram=x_addr + full * R, rows=1,
                                         cols=rest, stride=rest))
    step = 0
    for b in range(plan.n_blocks):
        n0, m = b * plan.nb, plan.block_rows(b)
        acc = plan.acc_col[b % 2]
        for t in range(plan.k_tiles):
            k = min(R, K - t * R)
            slot = plan.sp_w[step % plan.w_slots]
            prog.append(Instruction.make(
                Opcode.LOAD, mem=Mem.SP, local=slot, dram=wt_addr + n0 * K + t * R, rows=m, cols=k, stride=K,
                wait=[MM] if step >= plan.w_slots else [], signal=[MM]))
            wait = {L} | ({S} if t == 0 and b >= 2 else set())  # the column slot has been stored
            prog.append(Instruction.make(Opcode.PRELOAD, sp=2 * t if digits else t, k=k, n=2 if digits else 1,
                                         transpose=1, wait=wait))
            last = t == plan.k_tiles - 1
            prog.append(Instruction.make(Opcode.MATMUL, a=slot, acc=acc, m=m, k=k, accumulate=int(t > 0),
                                         signal={L} | ({V if digits else S} if last else set())))
            step += 1
        if digits:  # column 0 = lo sums + 16 * hi sums (column 1)
            prog.append(Instruction.make(Opcode.VBIN, func="rope", a_mem=Mem.ACC, a=acc, b_mem=Mem.SP,
                                         b=plan.sp_table, dst_mem=Mem.ACC, dst=acc, param=plan.acc_word, rows=m,
                                         wait={MM} | ({L} if b == 0 else set()), signal={S}))
        prog.append(Instruction.make(Opcode.STORE, mem=Mem.ACC, local=acc, dram=column + n0 * 4, rows=m, cols=1,
                                     stride=4, wait=[V if digits else MM],
                                     signal=[MM] if b + 2 < plan.n_blocks else []))
    if int8_out:
        # Every column row must be in device memory before it is read back row-major.
        prog.append(Instruction.make(Opcode.FENCE))
        slices = math.ceil(N / C)
        passes = range(0, slices, plan.g)
        for p, j0 in enumerate(passes):
            g = min(plan.g, slices - j0)
            q, par = 0, g
            prog.append(Instruction.make(Opcode.LOAD, mem=Mem.ACC, local=q, dram=col_addr + j0 * C * 4, rows=g,
                                         cols=C, stride=C * 4, wait=[V] if p else []))
            prog.append(Instruction.make(Opcode.LOAD, mem=Mem.ACC, local=par, dram=params_addr + j0 * 2 * C * 4,
                                         rows=2 * g, cols=C, stride=C * 4, signal=[V]))
            for j in range(g):
                wait = ({L} if j == 0 else set()) | ({S} if j == 0 and p else set())
                signal = {L, S} if j == g - 1 else set()
                if p + 1 == len(passes) and j == g - 1:
                    signal = {S}
                prog.append(Instruction.make(Opcode.REQUANT, src=q + j, dst=j, rows=1,
                                             param=par + 2 * j, relu=int(relu), wait=wait, signal=signal))
            n_last = min(C, N - (j0 + g - 1) * C)  # channels in the pass's last row
            last_pass = p + 1 == len(passes)
            if g > 1 or n_last == C:
                full_rows = g if n_last == C else g - 1
                prog.append(Instruction.make(Opcode.STORE, mem=Mem.SP, local=0, dram=out_addr + j0 * C,
                                             rows=full_rows, cols=C, stride=C, wait=[V],
                                             signal=[] if last_pass or n_last != C else [V]))
            if n_last != C:
                prog.append(Instruction.make(Opcode.STORE, mem=Mem.SP, local=g - 1,
                                             dram=out_addr + (j0 + g - 1) * C, rows=1, cols=n_last, stride=n_last,
                                             wait=[] if g > 1 else [V], signal=[] if last_pass else [V]))
    if halt:
        prog.append(Instruction.make(Opcode.HALT))
    return prog


def build_gemm_bundle(config: AcceleratorConfig, weights: np.ndarray, M: int, *, bias: np.ndarray | None = None,
                      scale_words: np.ndarray | None = None, relu: bool = False, output: str | None = None,
                      metadata: dict | None = None) -> Bundle:
    """A self-contained bundle computing ``c = a @ weights`` for an int8 input ``a`` (M x K).

    ``weights`` is int8 K x N and becomes a constant segment. With ``scale_words`` (int32,
    one per output column; see :func:`weft.sim.golden.pack_scale_word`) and optional
    int32 ``bias`` the output is int8 ``requant(a @ weights + bias)``; without, int32.
    """
    weights = np.asarray(weights)
    if weights.ndim != 2 or weights.dtype != np.int8:
        raise GemmError(f"weights must be a 2-D int8 array, got {weights.ndim}-D {weights.dtype}")
    K, N = weights.shape
    output = output or ("int8" if scale_words is not None else "int32")
    if output == "int8" and scale_words is None:
        raise GemmError("int8 output needs scale_words")
    if output == "int32" and (bias is not None or scale_words is not None):
        raise GemmError("bias and scale_words apply only to int8 output")
    plan = plan_gemm(config, M, N, K, output=output)
    mem = DeviceMemoryPlan(config)
    program_size = _program_size_bound(plan)
    program_addr = mem.allocate("program", program_size, "program")
    b_addr = mem.allocate("weights", weights.nbytes, "constant")
    segments = [Segment("weights", b_addr, weights.tobytes())]
    params_addr = None
    if output == "int8":
        params = np.zeros((2, N), dtype="<i4")
        params[0] = 0 if bias is None else np.asarray(bias, dtype=np.int64)
        params[1] = np.asarray(scale_words, dtype=np.int64)
        params_addr = mem.allocate("params", params.nbytes, "constant")
        segments.append(Segment("params", params_addr, params.tobytes()))
    a_spec = TensorSpec.dense("a", (M, K), "int8", mem.allocate("a", M * K, "input"))
    c_spec = TensorSpec.dense("c", (M, N), output, mem.allocate("c", M * N * (1 if output == "int8" else 4), "output"))
    program = gemm_program(config, plan, a_addr=a_spec.address, b_addr=b_addr, out_addr=c_spec.address,
                           params_addr=params_addr, relu=relu)
    assert len(program) * INSTR_BYTES <= program_size
    meta = {"kernel": "gemm", "M": M, "N": N, "K": K, "output": output, "block_rows": plan.mb, **(metadata or {})}
    return Bundle.for_config(config, program=program, program_address=program_addr, segments=segments,
                             inputs=[a_spec], outputs=[c_spec], regions=mem.regions, metadata=meta)


def build_gemv_bundle(config: AcceleratorConfig, weights: np.ndarray, *, bias: np.ndarray | None = None,
                      scale_words: np.ndarray | None = None, relu: bool = False, metadata: dict | None = None) -> Bundle:
    """:func:`build_gemm_bundle` for one row: ``c = a @ weights`` (a: 1 x K) by the weight-streaming
    GEMV, the weights stored transposed. int8 output with ``scale_words``, else int32."""
    weights = np.asarray(weights)
    if weights.ndim != 2 or weights.dtype != np.int8:
        raise GemmError(f"weights must be a 2-D int8 array, got {weights.ndim}-D {weights.dtype}")
    K, N = weights.shape
    output = "int8" if scale_words is not None else "int32"
    if output == "int32" and bias is not None:
        raise GemmError("bias applies only to int8 output")
    plan = plan_gemv(config, N, K, output=output)
    mem = DeviceMemoryPlan(config)
    segments = [Segment("weights_t", mem.allocate("weights_t", weights.nbytes, "constant"),
                        np.ascontiguousarray(weights.T).tobytes())]
    params_addr = col_addr = None
    if output == "int8":
        params = gemv_params(config, np.zeros(N, np.int64) if bias is None else bias, scale_words).astype("<i4")
        params_addr = mem.allocate("params", params.nbytes, "constant")
        segments.append(Segment("params", params_addr, params.tobytes()))
        col_addr = mem.allocate("column", params.shape[0] * config.array.cols * 4, "scratch")
    a_spec = TensorSpec.dense("a", (1, K), "int8", mem.allocate("a", K, "input"))
    c_spec = TensorSpec.dense("c", (1, N), output, mem.allocate("c", N * (1 if output == "int8" else 4), "output"))
    program = gemv_program(config, plan, x_addr=a_spec.address, wt_addr=segments[0].address, out_addr=c_spec.address,
                           col_addr=col_addr, params_addr=params_addr, relu=relu)
    program_addr = mem.allocate("program", len(program) * INSTR_BYTES, "program")
    meta = {"kernel": "gemv", "M": 1, "N": N, "K": K, "output": output, "block_rows": plan.nb, **(metadata or {})}
    return Bundle.for_config(config, program=program, program_address=program_addr, segments=segments,
                             inputs=[a_spec], outputs=[c_spec], regions=mem.regions, metadata=meta)


def _program_size_bound(plan: GemmPlan) -> int:
    per_step = 5  # param load, A load, B load, preload, matmul
    per_tile = 2  # requant, store
    count = plan.steps * per_step + plan.m_blocks * plan.n_tiles * per_tile + 1
    return count * INSTR_BYTES
