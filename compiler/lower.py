"""Back end: a quantized IR graph -> one instruction stream -> a program bundle.

:func:`lower` walks the device nodes of a :class:`~weft.compiler.quantize.QuantizedGraph` in
order and emits one *kernel* per node (per head and stage for Attention):

* ``Linear``: :func:`weft.compiler.gemm.plan_gemm` + :func:`~weft.compiler.gemm.gemm_program`
  (bias and per-channel REQUANT in the kernel's epilogue);
* ``Attention``, per head: ``q_h k_h^T`` (the GEMM kernel with its B tiles loaded as rows of
  K and preloaded with ``transpose=1``; int32 scores), ``vrow softmax`` over query-row chunks
  with the key-padding length from the per-sequence ``valid_len`` input, ``P v_h`` (the GEMM
  kernel, per-column REQUANT). Head split and merge are DMA addressing: head ``h`` reads
  columns ``h*dh ..`` of q, k and v with the row stride of the whole tensor and writes its
  context columns the same way;
* ``LayerNorm`` / ``Gelu`` / ``Add``: chunks of rows loaded slice-major into the
  accumulator / scratchpad, the vector instruction(s), stores. A per-channel int8 input is
  first widened to int32 (``vbin mul`` by per-channel factors, the factor row repeated down
  the chunk with a stride-0 load); a per-channel GELU output goes through int32 and one
  REQUANT per column slice.
* decoder ops (SmolLM2): ``RMSNorm``, ``SwiGLU``, ``Rope`` (``vbin rope``; a constant table,
  or a decode step's table row from the ``rope_table`` input), ``GQAttention`` (keys and values
  from head-major views or from the KV-cache buffers), ``Pad`` (a prefill's cache outputs) and
  ``CacheWrite`` (a decode step's append: the cache is a bundle input and output at one address,
  updated in place; the append STOREs' addresses are patched by the host per step,
  ``metadata["patch_sites"]``).

Every kernel reads its inputs from and writes its outputs to device memory, uses the
on-chip memories from row 0, and ends with the token drain (``token`` instructions taking
whatever tokens its pipeline left in the counters, so the next kernel starts from zero)
and a ``fence``. The bit-exact model's race and deadlock checks verify the result.

Device memory (:class:`~weft.compiler.memory.DeviceMemoryPlan`): constant segments
(weights, bias/scale words, vector parameter rows), the bundle's inputs and outputs, the
activation buffers (a buffer is reused once every reader of its tensor has run), the
softmax parameter records and the program.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from weft.hw.bundle import Bundle, Segment, TensorSpec
from weft.hw.config import AcceleratorConfig
from weft.hw.isa import INSTR_BYTES, Instruction, Mem, Opcode, Queue, format_instruction
from weft.hw.vector_numerics import param_rows

from .gemm import (GemmError, digit_gemm_params, gemm_program, gemv_digit_consts, gemv_params, gemv_program,
                   plan_gemm, plan_gemv, wide_gemm_params)
from .ir import Node
from .memory import ALIGN, DeviceMemoryPlan, OutOfDeviceMemory
from .quantize import QuantizedGraph, VecIn
from .reference import DIGIT_BASE, DIGIT_FINE_WORD, DIGIT_HI_WORD

__all__ = ["LoweringError", "Kernel", "lower", "listing", "kv_len_input_name", "kv_slot_input_name",
           "rope_table_input_name"]

L, MM, V, S = Queue.LOAD, Queue.MATMUL, Queue.VECTOR, Queue.STORE
UNIT_WORD = 1  # scale word: multiplier 1, shift 0


class LoweringError(ValueError):
    """A graph that cannot be mapped onto the configuration: names the node and what does not fit."""


@dataclass
class Kernel:
    """One kernel of the program: instructions ``first .. first + count - 1``."""

    name: str
    node: str
    op: str
    layer: str
    first: int
    count: int
    detail: str = ""

    def to_json(self) -> dict:
        return {"name": self.name, "node": self.node, "op": self.op, "layer": self.layer, "first": self.first,
                "count": self.count, "detail": self.detail}


@dataclass
class _Buf:
    name: str
    address: int
    size: int


@dataclass
class _Tensor:
    """A device tensor in device memory: [rows, cols] row-major, int8 or int32."""

    address: int
    rows: int
    cols: int
    esize: int
    pitch: int = 0  #: bytes between rows when the rows are wider than ``cols`` (0: dense)
    plane: int = 0  #: a two-digit tensor: bytes from its hi plane (at ``address``) to its lo plane

    @property
    def stride(self) -> int:
        return self.pitch or self.cols * self.esize


def kv_len_input_name(value: str, count: int) -> str:
    return "valid_len" if count == 1 else f"valid_len_{value}"


def kv_slot_input_name(value: str, count: int) -> str:
    """The bundle input holding a decode step's cache slot, for the host value ``value`` (the
    write mask of a ``CacheWrite``)."""
    return "kv_slot" if count == 1 else f"kv_slot_{value}"


def rope_table_input_name(cos: str, count: int) -> str:
    """The bundle input holding a step's RoPE table row, for the host value ``cos`` (with its sin)."""
    return "rope_table" if count == 1 else f"rope_table_{cos}"


def _ld(mem, local, dram, rows, cols, stride, wait=(), signal=()):
    return Instruction.make(Opcode.LOAD, mem=mem, local=local, dram=dram, rows=rows, cols=cols, stride=stride,
                            wait=wait, signal=signal)


def _st(mem, local, dram, rows, cols, stride, wait=(), signal=()):
    return Instruction.make(Opcode.STORE, mem=mem, local=local, dram=dram, rows=rows, cols=cols, stride=stride,
                            wait=wait, signal=signal)


def _tokens_first_last(instrs: list[Instruction], wait: set, signal: set) -> list[Instruction]:
    """Put ``wait`` on the first and ``signal`` on the last instruction of a group."""
    if not instrs:
        return instrs
    out = list(instrs)
    out[0] = out[0].with_tokens(wait=out[0].wait | frozenset(wait))
    out[-1] = out[-1].with_tokens(signal=out[-1].signal | frozenset(signal))
    return out


def _pipelined(n: int, buffers: int, loads: Callable, vector: Callable, stores: Callable) -> list[Instruction]:
    """Chunks ``0 .. n-1`` of a vector kernel as LOADs, vector work and STOREs (``loads(c)``,
    ``vector(c)``, ``stores(c)``: chunk c's instructions, in on-chip buffer ``c % buffers``),
    ordered by tokens: a chunk's loads wait for the vector queue to be done with the chunk before
    in the same buffer, its vector work for the loads and for the stores of that chunk, its
    stores for the vector work. With two buffers the next chunk's loads are issued ahead of this
    chunk's vector work, so they run beside it."""
    def ld(c):
        return _tokens_first_last(loads(c), {V} if c >= buffers else set(), {V})

    out = ld(0) if buffers == 2 and n else []
    for c in range(n):
        if buffers == 1:
            out += ld(c)
        elif c + 1 < n:
            out += ld(c + 1)
        out += _tokens_first_last(vector(c), {L} | ({S} if c >= buffers else set()), {L, S})
        out += _tokens_first_last(stores(c), {V}, {V})
    return out


def _digit_split(x: int, hi: tuple, neg: tuple, prod: int, lo: tuple, hi_param: int, unit_param: int,
                 rows: int) -> list[Instruction]:
    """The vector unit's digit split of int32 accumulator rows at ``x`` (``reference.digit_split``):
    ``hi = vmap scale(x, 1/16)``, ``-16 hi`` by ``vbin mul`` with the rows of -16 at ``neg`` into
    accumulator rows ``prod``, ``lo = vbin add(x, -16 hi)``. ``hi``, ``neg``, ``lo``: (memory, row);
    ``hi_param``: the row of DIGIT_HI_WORD, ``unit_param``: the row of two unit words."""
    return [Instruction.make(Opcode.VMAP, func="scale", src_mem=Mem.ACC, src=x, dst_mem=hi[0], dst=hi[1],
                             param=hi_param, rows=rows),
            Instruction.make(Opcode.VBIN, func="mul", a_mem=hi[0], a=hi[1], b_mem=neg[0], b=neg[1], dst_mem=Mem.ACC,
                             dst=prod, param=unit_param, rows=rows),
            Instruction.make(Opcode.VBIN, func="add", a_mem=Mem.ACC, a=x, b_mem=Mem.ACC, b=prod, dst_mem=lo[0],
                             dst=lo[1], param=unit_param, rows=rows)]


def _relocated(ins: Instruction, dram: int) -> Instruction:
    """``ins`` (a validated DMA instruction) with another device-memory address; skips the
    full field validation (only ``dram`` changes, and it is range-checked here)."""
    if not 0 <= dram < 1 << 32:
        raise LoweringError(f"device-memory address 0x{dram:x} does not fit the 32-bit dram field")
    new = object.__new__(Instruction)
    new.__dict__.update(ins.__dict__)
    new.__dict__["args"] = {**ins.args, "dram": dram}
    return new


def drain_tokens(program: list[Instruction]) -> list[Instruction]:
    """``token`` instructions that take every token ``program`` leaves in a counter."""
    net: dict[tuple[Queue, Queue], int] = {}
    for ins in program:
        q = ins.queue
        for p in ins.wait:
            net[(p, q)] = net.get((p, q), 0) - 1
        for r in ins.signal:
            net[(q, r)] = net.get((q, r), 0) + 1
    out = []
    for (p, q), n in sorted(net.items()):
        if n < 0:  # pragma: no cover - a kernel never takes more than it gives
            raise LoweringError(f"kernel takes {-n} more {p.name.lower()}->{q.name.lower()} tokens than it gives")
        out += [Instruction.make(Opcode.TOKEN, queue=q, wait=[p])] * n
    return out


class _Lowerer:
    def __init__(self, qg: QuantizedGraph, config: AcceleratorConfig, *, model: str = "", reuse: bool = True):
        self.qg, self.g, self.cfg = qg, qg.graph, config
        self.R, self.C = config.array.rows, config.array.cols
        self.E_sp, self.E_acc = config.sp_row_elems, config.acc_row_elems
        self.mem = DeviceMemoryPlan(config)
        self.segments: list[Segment] = []
        self.program: list[Instruction] = []
        self.kernels: list[Kernel] = []
        self.tensors: dict[str, _Tensor] = {}
        self.twins: dict[str, _Tensor] = {}
        self.inputs: list[TensorSpec] = []
        self.outputs: list[TensorSpec] = []
        self.free: list[_Buf] = []
        self.buf_of: dict[str, _Buf] = {}
        self.reuse = reuse
        self.model = model
        self.layer = "embeddings"
        self.nbuf = 0
        self.gemm_templates: dict[tuple, list[tuple[Instruction, str | None]]] = {}
        self.gemm_drains: dict[tuple, list[Instruction]] = {}
        self.shared_consts: dict[tuple, int] = {}

    # ------------------------------------------------------------------ device memory
    def const(self, name: str, data: np.ndarray) -> int:
        raw = np.ascontiguousarray(data)
        if raw.dtype == np.int32:
            raw = raw.astype("<i4")
        try:
            addr = self.mem.allocate(name, raw.nbytes, "constant")
        except OutOfDeviceMemory as exc:
            raise LoweringError(f"constants do not fit: {exc}") from None
        self.segments.append(Segment(name, addr, raw.tobytes()))
        return addr

    def scratch(self, value: str, size: int) -> _Buf:
        size = -(-size // ALIGN) * ALIGN
        if self.reuse:
            fits = [b for b in self.free if b.size >= size]
            if fits:
                buf = min(fits, key=lambda b: b.size)
                self.free.remove(buf)
                return buf
        try:
            addr = self.mem.allocate(f"act{self.nbuf}", size, "scratch")
        except OutOfDeviceMemory as exc:
            raise LoweringError(f"activation {value!r} does not fit: {exc}") from None
        self.nbuf += 1
        return _Buf(f"act{self.nbuf - 1}", addr, size)

    def new_tensor(self, value: str, rows: int, cols: int, esize: int, *, twin: bool = False) -> _Tensor:
        buf = self.scratch(value, rows * cols * esize)
        t = _Tensor(buf.address, rows, cols, esize)
        (self.twins if twin else self.tensors)[value] = t
        self.buf_of[value + ("#twin" if twin else "")] = buf
        return t

    def release(self, value: str) -> None:
        for key in (value, value + "#twin"):
            buf = self.buf_of.pop(key, None)
            if buf is not None:
                self.free.append(buf)

    # ------------------------------------------------------------------ program
    def emit_kernel(self, name: str, node: Node, body: list[Instruction], detail: str = "",
                    drain: list[Instruction] | None = None) -> None:
        body = body + (drain_tokens(body) if drain is None else drain) + [Instruction.make(Opcode.FENCE)]
        self.kernels.append(Kernel(name, node.name if node is not None else "", node.op if node is not None else "",
                                   self.layer, len(self.program), len(body), detail))
        self.program += body

    def fail(self, node: Node, msg: str):
        raise LoweringError(f"node {node.name} ({node.op}): {msg}")

    @staticmethod
    def _rows(shape) -> tuple[int, int]:
        return int(math.prod(shape[:-1])), int(shape[-1])

    # ------------------------------------------------------------------ GEMM
    def gemm(self, node: Node, *, M, N, K, a_addr, a_stride, b_addr, b_stride, out_addr, out_stride,
             params_addr=None, output="int8", b_transposed=False, a_plane=0, wide_bias=True) -> list[Instruction]:
        """The GEMM kernel for these operands: a template (generated once per shape and
        strides, with every operand at address 0) relocated to the operands' addresses.
        ``a_plane``: A is a two-digit tensor with its lo plane that many bytes after hi."""
        key = (M, N, K, output, a_stride, b_stride, out_stride, b_transposed, a_plane, wide_bias)
        tpl = self.gemm_templates.get(key)
        if tpl is None:
            tpl = self._gemm_template(node, M, N, K, a_stride, b_stride, out_stride, output, b_transposed, a_plane,
                                      wide_bias)
            self.gemm_templates[key] = tpl
            self.gemm_drains[key] = drain_tokens([ins for ins, _ in tpl])
        self.last_drain = self.gemm_drains[key]
        bases = {"a": a_addr, "b": b_addr, "out": out_addr, "params": params_addr or 0}
        out = []
        for ins, operand in tpl:
            if operand is not None:
                ins = _relocated(ins, ins.args["dram"] + bases[operand])
            out.append(ins)
        return out

    def _gemm_template(self, node, M, N, K, a_stride, b_stride, out_stride, output, b_transposed, a_plane=0,
                       wide_bias=True):
        try:
            plan = plan_gemm(self.cfg, M, N, K, output=output, a_digits=bool(a_plane))
        except GemmError as exc:
            self.fail(node, str(exc))
        if b_transposed and min(N, self.C) > self.R:
            self.fail(node, f"a transposed weight tile of {min(N, self.C)} rows does not fit a "
                            f"{self.R}-row B slot (non-square array)")
        # B given as its transpose (rows of K): emit with B stride N, then rewrite each B tile
        # load to read the tile's rows of B^T and preload it transposed.
        prog = gemm_program(self.cfg, plan, a_addr=0, b_addr=0, out_addr=0, params_addr=0, a_stride=a_stride,
                            b_stride=N if b_transposed else b_stride, out_stride=out_stride, halt=False,
                            a_plane=a_plane or None, wide_bias=wide_bias)
        slots, fac_slots = set(plan.sp_b), set(plan.sp_fac)
        R, C = self.R, self.C
        tpl = []
        for ins in prog:
            operand = None
            if ins.opcode == Opcode.STORE:
                operand = "out"
            elif ins.opcode == Opcode.LOAD:
                if ins.mem == Mem.ACC or ins.local in fac_slots:
                    operand = "params"
                elif ins.local in slots:
                    operand = "b"
                    if b_transposed:
                        off = ins.dram
                        t, j = off // (R * N), (off % (R * N)) // C
                        k, n = ins.rows, ins.cols
                        ins = Instruction(Opcode.LOAD, {**ins.args, "dram": j * C * b_stride + t * R, "rows": n,
                                                        "cols": k, "stride": b_stride}, ins.wait, ins.signal)
                else:
                    operand = "a"
            elif ins.opcode == Opcode.PRELOAD and b_transposed:
                ins = Instruction(Opcode.PRELOAD, {**ins.args, "transpose": 1}, ins.wait, ins.signal)
            tpl.append((ins, operand))
        return tpl

    def lower_linear(self, node: Node) -> None:
        """The GEMM kernel; a single row (a decode step) takes the weight-streaming GEMV
        (``gemm.gemv_program``: weights stored transposed, about the bus rate instead of one
        weight-tile PRELOAD per row of MACs)."""
        p = self.qg.linears[node.name]
        x = self.tensor_in(node, node.inputs[0])
        K, N = p.weight.shape
        M = x.rows
        cols = self.column_perm.get(node.name, np.arange(N))  # RoPE: interleaved pairs per head
        if p.output == "wide":
            self.lower_wide_linear(node, p, x, cols)
            return
        wide = p.output == "int32"
        if wide and (node.outputs[0] not in self.graph_outputs or np.any(p.bias)):
            self.fail(node, "an int32 Linear output is only lowered as a graph output without bias (logits)")
        if p.in_digits != bool(x.plane):
            self.fail(node, f"input {node.inputs[0]!r} is {'' if x.plane else 'not '}a two-digit tensor, "
                            "unlike what the quantizer planned")
        if M == 1:
            self.lower_gemv(node, p, x, cols, wide)
            return
        w_addr = self.const(f"{node.name}.weight", np.ascontiguousarray(p.weight.astype(np.int8)[:, cols]))
        if p.in_digits:
            params = digit_gemm_params(self.cfg, np.broadcast_to(p.bias, (N,))[cols],
                                       np.broadcast_to(p.scale_words, (N,))[cols])
        else:
            params = np.zeros((2, N), dtype=np.int32)
            params[0] = np.broadcast_to(p.bias, (N,))[cols]
            params[1] = np.broadcast_to(p.scale_words, (N,))[cols]
        p_addr = self.const(f"{node.name}.params", params)
        out = self.out_tensor(node.outputs[0], M, N, 4 if wide else 1)  # a graph output: straight into its region
        body = self.gemm(node, M=M, N=N, K=K, a_addr=x.address, a_stride=x.stride, b_addr=w_addr, b_stride=N,
                         out_addr=out.address, out_stride=out.stride, params_addr=p_addr,
                         output="int32" if wide else "int8", a_plane=x.plane)
        self.emit_kernel(node.name, node, body, f"GEMM {M}x{N}x{K}" + (", two-digit input" if x.plane else ""),
                         self.last_drain)

    def lower_wide_linear(self, node: Node, p, x: _Tensor, cols: np.ndarray) -> None:
        """A Linear that hands the int32 residual its accumulators (``quantize(wide_linears=True)``):
        the GEMM with ``wide`` output (``gemm.gemm_program``: per accumulator tile the digits
        combined, the bias added and the columns' int8 factors multiplied in, rounded by the
        word's shift, on the vector unit beside the next tiles' matmuls), straight into the
        output's int32 tensor (one scale for every column). One row (a decode step): the GEMV
        with int32 output, then a vector kernel ``vbin add`` of the bias and ``vbin mul`` by the
        factors."""
        K, N = p.weight.shape
        M = x.rows
        if not np.array_equal(cols, np.arange(N)):
            self.fail(node, "a permuted int32 Linear output is not supported")
        if p.in_digits != bool(x.plane):
            self.fail(node, f"input {node.inputs[0]!r} is {'' if x.plane else 'not '}a two-digit tensor, "
                            "unlike what the quantizer planned")
        out = self.new_tensor(node.outputs[0], M, N, 4)
        if M > 1:
            w_addr = self.const(f"{node.name}.weight", np.ascontiguousarray(p.weight.astype(np.int8)))
            p_addr = self.const(f"{node.name}.params", wide_gemm_params(self.cfg, p.bias, p.wide_factors, p.wide_word))
            body = self.gemm(node, M=M, N=N, K=K, a_addr=x.address, a_stride=x.stride, b_addr=w_addr, b_stride=N,
                             out_addr=out.address, out_stride=N * 4, params_addr=p_addr, output="wide",
                             a_plane=x.plane, wide_bias=bool(np.any(p.bias)))
            self.emit_kernel(node.name, node, body, f"GEMM {M}x{N}x{K}" + (", two-digit input" if x.plane else "")
                             + ", int32 for the residual (bias, column factors)", self.last_drain)
            return
        buf = self.scratch(f"{node.name}.acc", N * 4)
        acc = _Tensor(buf.address, 1, N, 4)
        self.lower_gemv(node, p, x, cols, True, out=acc)
        C = self.E_acc
        biased = bool(np.any(p.bias))
        factors = _Tensor(self.const(f"{node.name}.factors", np.asarray(p.wide_factors, np.int8)[None]), 1, N, 1)
        ins = [(acc, VecIn("int32", 1.0), f"{node.name}.acc")]
        if biased:
            ins.append((_Tensor(self.const(f"{node.name}.bias", np.asarray(p.bias, np.int32)[None]), 1, N, 4),
                        VecIn("int32", 1.0), "bias"))

        def build(m, srcs, outs_, tmp, prm, ns, s0):
            (_, dst), = outs_
            (fm, fa) = srcs[-1]
            am, aa = srcs[0]
            ins_ = []
            if biased:  # acc + bias (unit words)
                ins_.append(Instruction.make(Opcode.VBIN, func="add", a_mem=am, a=aa, b_mem=srcs[1][0], b=srcs[1][1],
                                             dst_mem=Mem.ACC, dst=dst, param=prm[1], rows=ns * m))
                am, aa = Mem.ACC, dst
            return ins_ + [Instruction.make(Opcode.VBIN, func="mul", a_mem=am, a=aa, b_mem=fm, b=fa, dst_mem=Mem.ACC,
                                            dst=dst, param=prm[0], rows=ns * m)]

        self.vector_kernel(node, M, ins + [(factors, VecIn("int8", 1.0), "factors")], build, [(out, "acc")],
                           [param_rows([p.wide_word], C), param_rows([UNIT_WORD, UNIT_WORD], C)], 0,
                           f"{M}x{N} accumulators{' + bias' if biased else ''} x column factors (int32 for the "
                           "residual)", columns=True)
        self.free.append(buf)

    def lower_gemv(self, node: Node, p, x: _Tensor, cols: np.ndarray, wide: bool, out: _Tensor | None = None) -> None:
        """The weight-streaming GEMV for a one-row Linear; ``wide``: int32 accumulators out, into
        ``out`` when given (default: the node's output tensor)."""
        K, N = p.weight.shape
        try:
            plan = plan_gemv(self.cfg, N, K, output="int32" if wide else "int8", x_digits=bool(x.plane))
        except GemmError as exc:
            self.fail(node, str(exc))
        wt_addr = self.const(f"{node.name}.weight_t", np.ascontiguousarray(p.weight.astype(np.int8)[:, cols].T))
        out = out or self.out_tensor(node.outputs[0], 1, N, 4 if wide else 1)
        params_addr = col = None
        if not wide:
            words = gemv_params(self.cfg, np.broadcast_to(p.bias, (N,))[cols], np.broadcast_to(p.scale_words, (N,))[cols])
            params_addr = self.const(f"{node.name}.params", words)
            col = self.scratch(node.name + ".column", words.shape[0] * self.C * 4)
        consts = None
        if x.plane:
            if "gemv_digit_consts" not in self.shared_consts:
                self.shared_consts["gemv_digit_consts"] = self.const("gemv.digit_consts", gemv_digit_consts())
            consts = self.shared_consts["gemv_digit_consts"]
        body = gemv_program(self.cfg, plan, x_addr=x.address, wt_addr=wt_addr, out_addr=out.address,
                            col_addr=col.address if col else None, params_addr=params_addr, halt=False,
                            x_plane=x.plane or None, digit_consts=consts)
        if col is not None:
            self.free.append(col)
        self.emit_kernel(node.name, node, body, f"GEMV {N}x{K}" + (", two-digit input" if x.plane else ""))

    # ------------------------------------------------------------------ attention
    def lower_attention(self, node: Node) -> None:
        p = self.qg.attentions[node.name]
        q, k, v = (self.tensor_in(node, i) for i in node.inputs[:3])
        shape = self.g.shape(node.inputs[0])
        if len(shape) != 3 or shape[0] != 1:
            self.fail(node, f"only batch 1 is supported on the device (q is {list(shape)})")
        H = node.attrs["num_heads"]
        Sq, D = q.rows, q.cols
        Skv = k.rows
        dh, dv = D // H, v.cols // H
        if self.C < 3:
            self.fail(node, "softmax parameters need accumulator rows of at least 3 words")
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        rec = self.softmax_records[node.name]
        ctx = self.new_tensor(node.outputs[0], Sq, v.cols, 1)
        digits = p.prob_digits
        pv_params, per_head = self.pv_params(node, p.scale_words, H, dv, digits)
        scores = self.scratch(node.name + ".scores", Sq * Skv * 4)
        probs = self.scratch(node.name + ".probs", Sq * Skv * (2 if digits else 1))
        for h in range(H):
            self.attention_head(node, h, Sq=Sq, Skv=Skv, dk=dh, dv=dv, q_h=(q.address + h * dh, q.stride),
                                k_g=(k.address + h * dh, k.stride), v_g=(v.address + h * dv, v.stride),
                                ctx_h=(ctx.address + h * dv, ctx.stride), scores=scores, probs=probs, rec=rec,
                                pv_params=pv_params + h * per_head, qk_note=f"head {h}",
                                softmax_note=f", keys < {mask}" if mask else "", digits=digits)
        self.free += [scores, probs]

    def attention_head(self, node: Node, h: int, *, Sq: int, Skv: int, dk: int, dv: int, q_h, k_g, v_g, ctx_h,
                       scores, probs, rec: int, pv_params: int, qk_note: str, softmax_note: str = "",
                       causal: bool = False, digits: bool = False) -> None:
        """One head's three kernels: ``q_h k_g^T`` (int32 scores), the softmax into int8
        probabilities (``digits``: a wide softmax split into two int8 planes, ``probs`` holding
        both), ``P v_g`` requantized into the head's context columns. ``q_h``, ``k_g``,
        ``v_g``, ``ctx_h``: (device address of the head's first element, row stride in bytes) of
        query head h, of the key / value head g it reads (h itself without grouping) and of its
        context columns."""
        body = self.gemm(node, M=Sq, N=Skv, K=dk, a_addr=q_h[0], a_stride=q_h[1],
                         b_addr=k_g[0], b_stride=k_g[1], out_addr=scores.address,
                         out_stride=Skv * 4, output="int32", b_transposed=True)
        self.emit_kernel(f"{node.name}.h{h}.qk", node, body, f"{qk_note}: q k^T {Sq}x{Skv}x{dk} (int32)",
                         self.last_drain)
        self.emit_kernel(f"{node.name}.h{h}.softmax", node,
                         self.softmax_kernel(node, Sq, Skv, scores.address, probs.address, rec, causal=causal,
                                             digits=digits),
                         f"head {h}: softmax {Sq}x{Skv}{softmax_note}" + (", two-digit output" if digits else ""))
        body = self.gemm(node, M=Sq, N=dv, K=Skv, a_addr=probs.address, a_stride=Skv,
                         b_addr=v_g[0], b_stride=v_g[1], out_addr=ctx_h[0],
                         out_stride=ctx_h[1], params_addr=pv_params, a_plane=Sq * Skv if digits else 0)
        self.emit_kernel(f"{node.name}.h{h}.pv", node, body,
                         f"head {h}: P v {Sq}x{dv}x{Skv}" + (", two-digit P" if digits else ""), self.last_drain)

    def pv_params(self, node: Node, words: np.ndarray, heads: int, dv: int, digits: bool) -> tuple[int, int]:
        """REQUANT words of each head's ``P v`` (``words``: one per context column, heads * dv),
        laid out per head as the GEMM reads them (with the digit-combining row for two-digit P).
        Returns (address of head 0's block, bytes per head)."""
        words = np.broadcast_to(np.asarray(words, dtype=np.int64), (heads * dv,)).reshape(heads, dv)
        if digits:
            blocks = [digit_gemm_params(self.cfg, np.zeros(dv, np.int64), words[h]) for h in range(heads)]
        else:
            blocks = [np.stack([np.zeros(dv, np.int64), words[h]]).astype(np.int32) for h in range(heads)]
        return self.const(f"{node.name}.pv_params", np.stack(blocks)), blocks[0].size * 4

    # ------------------------------------------------------------------ head views (layout ops)
    def lower_layout(self, node: Node) -> None:
        """Reshape / Transpose of a ``[S, H*D]`` device tensor into the ``[1, S, H, D]`` head split
        and the ``[1, H, S, D]`` head-major view (and back): no data movement, the consumers
        (GQAttention) address head h at column ``h*D`` with the tensor's row stride."""
        x = self.tensor_in(node, node.inputs[0])
        if node.outputs[0] in self.graph_outputs:
            self.fail(node, "a graph output made by a layout op is not supported on the device")
        src_view = self.views.get(node.inputs[0], ("plain", 1, x.cols))
        out_shape = tuple(self.g.shape(node.outputs[0]))
        kind, H, D = src_view
        new = None
        if node.op == "Reshape":
            if kind == "plain" and len(out_shape) == 4 and out_shape[0] == 1 and out_shape[1] == x.rows \
                    and out_shape[2] * out_shape[3] == x.cols:
                new = ("split", out_shape[2], out_shape[3])
            elif kind == "split" and math.prod(out_shape[:-1]) == x.rows and out_shape[-1] == x.cols:
                new = ("plain", 1, x.cols)
            elif kind == "plain" and math.prod(out_shape[:-1]) == x.rows and out_shape[-1] == x.cols:
                new = ("plain", 1, x.cols)
        elif node.op == "Transpose" and list(node.attrs["perm"]) == [0, 2, 1, 3] and kind in ("split", "heads"):
            new = ("heads" if kind == "split" else "split", H, D)
        if new is None:
            self.fail(node, f"layout op {node.op} {node.attrs} from {kind} view of [{x.rows}, {x.cols}] to "
                            f"{list(out_shape)} has no device form (only the attention head split/merge)")
        self.tensors[node.outputs[0]] = x
        self.views[node.outputs[0]] = new
        self.alias_of[node.outputs[0]] = self.alias_of.get(node.inputs[0], node.inputs[0])

    def lower_pad(self, node: Node) -> None:
        """The prefill's cache output: a head-major view ``[S, KV*D]`` copied into the graph
        output ``[1, KV, T, D]`` (head by head), rows S..T zero. Columns stay in the device's
        order (interleaved RoPE pairs for keys): ``output_column_perm`` tells the host."""
        o = node.outputs[0]
        x = self.tensor_in(node, node.inputs[0])
        pads = [tuple(p) for p in node.attrs["pads"]]
        shape = self.g.shape(node.inputs[0])
        if o not in self.graph_outputs or self.views.get(node.inputs[0], ("plain",))[0] != "heads" or len(shape) != 4 \
                or pads[0] != (0, 0) or pads[1] != (0, 0) or pads[3] != (0, 0) or pads[2][0] != 0:
            self.fail(node, "only padding the sequence axis of a head-major view into a graph output is lowered")
        _, KV, S_, D = shape
        T = S_ + pads[2][1]
        out = self.tensors[o]
        perm = self.head_column_perm(node.inputs[0], D)
        if perm is not None:
            self.output_column_perm[o] = perm
        E = self.E_sp
        nsl = -(-D // E)
        m = self.chunk(node, S_, sp_per_row=nsl, what=f"cache copy of {S_} rows")
        body, c = [], 0

        def copy(src_addr, src_stride, dst_addr, mc):
            lds = [_ld(Mem.SP, k * mc, src_addr + k * E, mc, min(E, D - k * E), src_stride) for k in range(nsl)]
            sts = [_st(Mem.SP, k * mc, dst_addr + k * E, mc, min(E, D - k * E), D) for k in range(nsl)]
            return _tokens_first_last(lds, {S} if c else set(), {S}) + _tokens_first_last(sts, {L}, {L})

        for g in range(KV):
            for r0 in range(0, S_, m):
                mc = min(m, S_ - r0)
                body += copy(x.address + r0 * x.stride + g * D, x.stride, out.address + (g * T + r0) * D, mc)
                c += 1
        if T > S_:
            zero = self.const(f"{node.name}.zero", np.zeros(max(D, ALIGN), np.int8))
            zm = self.chunk(node, T - S_, sp_per_row=nsl, what="cache padding")
            for g in range(KV):
                for r0 in range(S_, T, zm):
                    mc = min(zm, T - r0)
                    body += copy(zero, 0, out.address + (g * T + r0) * D, mc)
                    c += 1
        self.emit_kernel(node.name, node, body, f"cache output {KV}x{T}x{D} from {S_} rows")

    def head_column_perm(self, value: str, D: int) -> list[int] | None:
        """The device's column order within a head of ``value`` when it differs from the graph's:
        a Rope output (or a view of one) whose Linear was written with the interleave permutation
        folded into its columns (``column_perm``); None when the columns are in graph order."""
        prod = self.g.producers()
        src = prod.get(self.alias_of.get(value, value))
        while src is not None and src.op in ("Reshape", "Transpose"):
            src = prod.get(src.inputs[0])
        if src is None or src.op != "Rope":
            return None
        lin = prod.get(self.alias_of.get(src.inputs[0], src.inputs[0]))
        while lin is not None and lin.op in ("Reshape", "Transpose"):
            lin = prod.get(lin.inputs[0])
        if lin is None or lin.name not in self.column_perm:
            return None
        return [int(c) for c in self.column_perm[lin.name][:D]]

    def lower_cache_write(self, node: Node) -> None:
        """``CacheWrite(past, new, write)``: the cache is one device buffer, the bundle input
        ``past`` and the graph output at the same address (set up in :meth:`run`), so only the
        new ``[KV, D]`` row moves: one LOAD per column slice into the scratchpad (the KV heads of
        the one-token head-major view, D bytes apart), one strided STORE per slice into row
        ``slot`` of every head (``dram = cache + slot*D``, row stride ``T*D``). The slot is only
        known per step and a STORE's ``dram`` is an immediate: the program is written for slot
        0 and each append STORE is listed in ``patch_sites`` for the host to rewrite."""
        past, new, write = node.inputs
        if node.outputs[0] not in self.in_place:
            self.fail(node, f"the cache {node.outputs[0]!r} must be a graph output (the in-place buffer of the "
                            f"input {past!r})")
        cache = self.tensors[node.outputs[0]]
        _, KV, T, D = self.g.shape(past)
        x = self.tensor_in(node, new)
        new_shape = tuple(self.g.shape(new))
        if self.views.get(new, ("plain",))[0] != "heads" or new_shape != (1, KV, 1, D) or x.rows != 1:
            self.fail(node, f"the new row {new!r} must be a one-token head-major view [1, {KV}, 1, {D}] "
                            f"(got {list(new_shape)})")
        slot_input = self.kv_slot_inputs.get(write)
        if slot_input is None:
            self.fail(node, f"the write mask {write!r} must be a host input (the step's slot)")
        perm = self.head_column_perm(new, D)
        if perm is not None:  # keys: RoPE pairs interleaved, in the cache as in the prefill's cache outputs
            self.output_column_perm[node.outputs[0]] = perm
            self.input_column_perm[past] = perm
        E = self.E_sp
        nsl = -(-D // E)
        if KV * nsl > self.cfg.sp_rows:
            self.fail(node, f"the new row needs {KV * nsl} scratchpad rows, configuration {self.cfg.name!r} has "
                            f"{self.cfg.sp_rows}")
        loads = [_ld(Mem.SP, s * KV, x.address + s * E, KV, min(E, D - s * E), D) for s in range(nsl)]
        stores = [_st(Mem.SP, s * KV, cache.address + s * E, KV, min(E, D - s * E), T * D) for s in range(nsl)]
        body = _tokens_first_last(loads, set(), {S}) + _tokens_first_last(stores, {L}, set())
        first_store = len(self.program) + len(loads)
        for s_ in range(nsl):
            self.patch_sites.append({"index": first_store + s_, "input": slot_input, "base": cache.address + s_ * E,
                                     "step": D, "slots": T, "node": node.name})
        self.emit_kernel(node.name, node, body, f"cache append {KV}x{D} into row slot of {KV}x{T}x{D} "
                                                f"(STOREs patched per step)")

    def lower_rope(self, node: Node) -> None:
        """``vbin rope`` on the head-major view of a ``[S, H*D]`` tensor whose producing Linear
        wrote each head's columns in interleaved order (``column_perm``): pairs (2i, 2i+1) of the
        device are HF's (i, i + D/2); the table (Q.14 cos/sin per position, tiled over the heads)
        is a constant (prefill) or, when cos/sin are host values (a decode step's row of the
        tables), the bundle input the host writes each step (``rope_table_inputs``), tiled over
        the widest Rope that reads it; a Rope with fewer heads reads its first columns."""
        from .reference import rope_device_table

        p = self.qg.ropes[node.name]
        x = self.tensor_in(node, node.inputs[0])
        if self.views.get(node.inputs[0], ("plain",))[0] != "heads":
            self.fail(node, f"input {node.inputs[0]!r} is not a head-major view of a [S, H*D] tensor")
        _, H, S, D = self.g.shape(node.inputs[0])
        cos, sin = (self.g.consts.get(i) for i in node.inputs[1:3])
        if cos is not None and sin is not None:
            table = rope_device_table(np.asarray(cos).reshape(-1, D)[-S:], np.asarray(sin).reshape(-1, D)[-S:])
            tab = np.tile(table, (1, H)).astype(np.int32)  # [S, H*D]
            t = _Tensor(self.const(f"{node.name}.table", tab), S, H * D, 4)
        else:
            src = self.rope_inputs.get(tuple(node.inputs[1:3]))
            if src is None:
                self.fail(node, "cos and sin must both be constants or both host inputs")
            if src.rows != S:
                self.fail(node, f"the table input has {src.rows} rows for {S} positions")
            t = _Tensor(src.address, S, H * D, 4, pitch=src.stride)
        out = self.new_tensor(node.outputs[0], S, H * D, 1)
        self.views[node.outputs[0]] = ("heads", H, D)
        nsl = -(-(H * D) // self.E_acc)

        def build(m, srcs, outs_, tmp, prm, ns, s0):
            (xm, xa), (tm, ta) = srcs
            (_, dst), = outs_
            return [Instruction.make(Opcode.VBIN, func="rope", a_mem=xm, a=xa, b_mem=tm, b=ta, dst_mem=Mem.SP,
                                     dst=dst, param=prm[0], rows=ns * m)]

        self.vector_kernel(node, S, [(x, VecIn("int8", p.in_scale), node.inputs[0]),
                                     (t, VecIn("int32", 1.0), node.name + ".table")], build, [(out, "sp")],
                           [param_rows([p.word], self.E_acc)], 0, f"rope {S}x{H * D}", columns=True)

    def lower_gqa(self, node: Node) -> None:
        """Grouped-query attention over head-major views: per query head h of KV group
        g = h // G: ``q_h k_g^T`` (int32), ``vrow softmax`` (causal offset / kv_len from the
        record), ``P v_g`` requantized into the context's column block h*D."""
        p = self.qg.gqas[node.name]
        q, k, v = (self.tensor_in(node, i) for i in node.inputs[:3])
        kinds = [self.views.get(name, ("plain",))[0] for name in node.inputs[:3]]
        if kinds[0] != "heads" or any(kd not in ("heads", "cache") for kd in kinds[1:]):
            self.fail(node, f"inputs {node.inputs[:3]} must be head-major views of [S, H*D] tensors "
                            "(keys and values may also be KV-cache buffers)")
        B, H, Sq, D = self.g.shape(node.inputs[0])
        KV, Skv = self.g.shape(node.inputs[1])[1:3]

        def kv_head(t: _Tensor, kind: str, g: int) -> tuple[int, int]:
            if kind == "cache":  # [KV, T, D]: head g is T consecutive rows of D bytes
                return t.address + g * Skv * t.stride, t.stride
            return t.address + g * D, t.stride  # [S, KV*D]: head g is columns g*D ..

        if B != 1:
            self.fail(node, "only batch 1 is supported on the device")
        G = H // KV
        rec = self.softmax_records[node.name]
        ctx = self.new_tensor(node.outputs[0], Sq, H * D, 1)
        self.views[node.outputs[0]] = ("heads", H, D)
        digits = p.prob_digits
        pv_params, _ = self.pv_params(node, np.broadcast_to(np.asarray(p.scale_words, np.int64), (D,)), 1, D, digits)
        scores = self.scratch(node.name + ".scores", Sq * Skv * 4)
        probs = self.scratch(node.name + ".probs", Sq * Skv * (2 if digits else 1))
        causal = bool(node.attrs.get("causal"))
        mask = node.inputs[3] if len(node.inputs) > 3 else None
        note = " causal" if causal else ""
        note += f", keys < {mask}" if mask is not None else ""
        if Sq == 1 and not causal:
            # One query row (a decode step): the G query heads of a KV group are G consecutive
            # D-column blocks of that row, so they stack as a [G, D] matrix of row stride D and
            # share each key / value tile the array preloads (G rows per PRELOAD instead of 1).
            self.free += [scores, probs]
            scores = self.scratch(node.name + ".scores", G * Skv * 4)
            probs = self.scratch(node.name + ".probs", G * Skv * (2 if digits else 1))
            for g in range(KV):
                self.attention_head(node, g * G, Sq=G, Skv=Skv, dk=D, dv=D, q_h=(q.address + g * G * D, D),
                                    k_g=kv_head(k, kinds[1], g), v_g=kv_head(v, kinds[2], g),
                                    ctx_h=(ctx.address + g * G * D, D), scores=scores, probs=probs, rec=rec,
                                    pv_params=pv_params, qk_note=f"heads {g * G}..{g * G + G - 1} (kv {g})",
                                    softmax_note=note, digits=digits)
        else:
            for h in range(H):
                g = h // G
                self.attention_head(node, h, Sq=Sq, Skv=Skv, dk=D, dv=D, q_h=(q.address + h * D, q.stride),
                                    k_g=kv_head(k, kinds[1], g), v_g=kv_head(v, kinds[2], g),
                                    ctx_h=(ctx.address + h * D, ctx.stride), scores=scores, probs=probs, rec=rec,
                                    pv_params=pv_params, qk_note=f"head {h} (kv {g})", softmax_note=note,
                                    causal=causal, digits=digits)
        self.free += [scores, probs]

    def softmax_kernel(self, node, Sq, Skv, scores_addr, probs_addr, rec_addr, causal: bool = False,
                       digits: bool = False) -> list[Instruction]:
        """``vrow softmax`` over query-row chunks: int32 scores in, int8 probabilities out. With
        ``digits`` the softmax is wide (int32 at 1/2047 in the accumulator) and the chunk is split
        as ``digit_kernel`` does (``hi = vmap scale(p, 1/16)``, ``-16 hi`` by ``vbin mul`` with
        rows of -16 held in the scratchpad for the whole kernel, ``lo = vbin add(p, -16 hi)``);
        hi and lo go to two planes ``Sq * Skv`` bytes apart."""
        n_acc = -(-Skv // self.E_acc)
        n_sp = -(-Skv // self.E_sp)
        what = f"softmax over {Skv} keys"
        fixed = 2 if digits else 0  # the split's parameter rows
        acc_row, sp_row = (2 * n_acc, 2 * n_sp) if digits else (n_acc, n_sp)  # per buffer: + probabilities; + lo
        neg_row = n_sp if digits else 0  # the rows of -16, shared by the buffers

        def plan(buffers: int) -> tuple[int, int]:
            """Rows per chunk and records (one per chunk for a causal softmax, whose offset counts
            from each chunk's first row)."""
            per_acc, per_sp = buffers * acc_row, buffers * sp_row + neg_row
            m = self.chunk(node, Sq, acc_fixed=1 + fixed, acc_per_row=per_acc, sp_per_row=per_sp, what=what)
            if causal:
                for _ in range(4):
                    nrec = -(-Sq // m)
                    m2 = self.chunk(node, Sq, acc_fixed=nrec + fixed, acc_per_row=per_acc, sp_per_row=per_sp,
                                    what=what)
                    if -(-Sq // m2) <= nrec:
                        m = m2
                        break
                    m = m2
                return m, -(-Sq // m)
            return m, 1

        m, nrec = plan(1)
        buffers = 1
        if -(-Sq // m) > 1:  # several chunks: two buffers let loads and stores overlap the rows
            try:
                m, nrec = plan(2)
                buffers = 2
            except LoweringError:  # two buffers of even one row do not fit: keep one
                pass
        src = nrec
        if nrec == 1:
            body = [_ld(Mem.ACC, 0, rec_addr, 1, 3, 0)]
        else:
            if node.inputs[3:4] and node.inputs[3] is not None:
                self.fail(node, "a causal softmax over several query chunks needs a constant key length")
            word, kv, off = self.record_words[node.name]
            recs = np.zeros((nrec, self.E_acc), dtype=np.int32)
            for c in range(nrec):
                recs[c, :3] = [word, kv, off + c * m]
            body = [_ld(Mem.ACC, 0, self.const(f"{node.name}.softmax_records", recs), nrec, 3, self.E_acc * 4)]
        neg = sp0 = 0
        if digits:  # the split's words (after the records) and m * n_sp rows of -16, loaded once
            key = ("softmax_digits", self.E_acc)
            if key not in self.shared_consts:
                self.shared_consts[key] = self.const("softmax.digit_words", np.vstack(
                    [param_rows([DIGIT_HI_WORD], self.E_acc), param_rows([UNIT_WORD, UNIT_WORD], self.E_acc)]))
            body.append(_ld(Mem.ACC, nrec, self.shared_consts[key], 2, self.E_acc, self.E_acc * 4))
            key = ("softmax_neg", m * n_sp, self.E_sp)
            if key not in self.shared_consts:
                self.shared_consts[key] = self.const(f"softmax.neg{DIGIT_BASE}.{m * n_sp}",
                                                     np.full((m * n_sp, self.E_sp), -DIGIT_BASE, dtype=np.int8))
            body.append(_ld(Mem.SP, 0, self.shared_consts[key], m * n_sp, self.E_sp, self.E_sp))
            src, sp0 = nrec + 2, m * n_sp
        plane = Sq * Skv
        # per buffer: accumulator rows of the scores (and the wide probabilities), scratchpad rows of
        # the int8 probabilities (hi and lo planes)
        acc_at = [src + b * acc_row * m for b in range(buffers)]
        sp_at = [sp0 + b * sp_row * m for b in range(buffers)]
        chunks = [(r0, min(m, Sq - r0)) for r0 in range(0, Sq, m)]

        def loads_of(c):
            r0, mc = chunks[c]
            return [_ld(Mem.ACC, acc_at[c % buffers] + s * mc, scores_addr + (r0 * Skv + s * self.E_acc) * 4, mc,
                        min(self.E_acc, Skv - s * self.E_acc), Skv * 4) for s in range(n_acc)]

        def planes(c):  # (scratchpad row, byte offset of its plane) of chunk c's int8 probabilities
            s_0 = sp_at[c % buffers]
            return ((s_0, 0), (s_0 + n_sp * chunks[c][1], plane)) if digits else ((s_0, 0),)

        def vector_of(c):
            mc = chunks[c][1]
            prm = c if nrec > 1 else 0
            a0, out = acc_at[c % buffers], planes(c)
            if not digits:
                return [Instruction.make(Opcode.VROW, func="softmax", src_mem=Mem.ACC, src=a0, dst=out[0][0],
                                         param=prm, rows=mc, len=Skv, causal=int(causal), unsigned=0)]
            p_at = a0 + n_acc * mc
            return [Instruction.make(Opcode.VROW, func="softmax", src_mem=Mem.ACC, src=a0, dst=p_at, param=prm,
                                     rows=mc, len=Skv, causal=int(causal), unsigned=0, wide=1),
                    *_digit_split(p_at, (Mem.SP, out[0][0]), (Mem.SP, neg), a0, (Mem.SP, out[1][0]), nrec, nrec + 1,
                                  n_acc * mc)]

        def stores_of(c):
            r0, mc = chunks[c]
            return [_st(Mem.SP, at + s * mc, probs_addr + off + r0 * Skv + s * self.E_sp, mc,
                        min(self.E_sp, Skv - s * self.E_sp), Skv) for at, off in planes(c) for s in range(n_sp)]

        return body + _pipelined(len(chunks), buffers, loads_of, vector_of, stores_of)

    # ------------------------------------------------------------------ vector kernels
    def chunk(self, node, M, *, acc_fixed=0, acc_per_row=0, sp_fixed=0, sp_per_row=0, what="") -> int:
        cfg = self.cfg
        lim = [M, (1 << 16) - 1]
        if acc_per_row:
            lim.append((cfg.acc_rows - acc_fixed) // acc_per_row)
        if sp_per_row:
            lim.append((cfg.sp_rows - sp_fixed) // sp_per_row)
        m = min(lim)
        if m < 1 or acc_fixed > cfg.acc_rows or sp_fixed > cfg.sp_rows:
            need_acc, need_sp = acc_fixed + acc_per_row, sp_fixed + sp_per_row
            short = []
            if need_acc > cfg.acc_rows:
                short.append(f"accumulator needs {need_acc} rows for one token, has {cfg.acc_rows} "
                             f"(short by {need_acc - cfg.acc_rows})")
            if need_sp > cfg.sp_rows:
                short.append(f"scratchpad needs {need_sp} rows for one token, has {cfg.sp_rows} "
                             f"(short by {need_sp - cfg.sp_rows})")
            self.fail(node, f"{what} does not fit configuration {cfg.name!r}: " + "; ".join(short))
        n = -(-M // m)
        return -(-M // n)  # even chunks

    @staticmethod
    def _slice_moves(make, mem, local, t: _Tensor, r0, mc, E, s0, ns) -> list[Instruction]:
        """One LOAD or STORE (``make``) per column slice of ``mc`` rows; for one row (a decode
        step's tensors) the row's whole slices are contiguous in device memory, so one
        instruction moves them all (a slice per on-chip row), and one more the partial last."""
        n = -(-t.cols // E)
        last = n if ns is None else min(n, s0 + ns)
        base = t.address + r0 * t.stride
        if mc == 1:
            full = min(last, t.cols // E) - s0
            out = [make(mem, local, base + s0 * E * t.esize, full, E, E * t.esize)] if full > 0 else []
            return out + [make(mem, local + s - s0, base + s * E * t.esize, 1, t.cols - s * E, E * t.esize)
                          for s in range(s0 + max(full, 0), last)]
        return [make(mem, local + (s - s0) * mc, base + s * E * t.esize, mc, min(E, t.cols - s * E), t.stride)
                for s in range(s0, last)]

    def load_slices(self, mem, local, t: _Tensor, r0, mc, E, s0=0, ns=None) -> list[Instruction]:
        """LOADs of rows ``[r0, r0 + mc)`` and column slices ``[s0, s0 + ns)`` (of ``E`` elements;
        default all) of ``t``, slice-major from on-chip row ``local``."""
        return self._slice_moves(_ld, mem, local, t, r0, mc, E, s0, ns)

    def store_slices(self, mem, local, t: _Tensor, r0, mc, E, s0=0, ns=None) -> list[Instruction]:
        """STOREs of the same rows and slices (the inverse of :meth:`load_slices`)."""
        return self._slice_moves(_st, mem, local, t, r0, mc, E, s0, ns)

    def vec_source(self, node, name: str, src: VecIn) -> _Tensor:
        if src.twin:
            if name not in self.twins:
                self.fail(node, f"no twin copy of {name!r}")
            return self.twins[name]
        return self.tensor_in(node, name)

    def vector_kernel(self, node: Node, M: int, inputs: list[tuple[_Tensor, VecIn, str]],
                      build: Callable, outputs: list[tuple[_Tensor, str]], param_rows_list: list[np.ndarray],
                      extra_acc_per_row: int, detail: str, *, columns: bool = False) -> None:
        """Generic chunked vector kernel.

        ``inputs``: (tensor in device memory, how it is read, name) -> each lands as a
        slice-major on-chip tensor: int8 direct in the scratchpad (E = sp row for ``vrow``
        readers: ``direct_E``), int32 in the accumulator, or widened (int8 in the scratchpad
        then ``vbin mul`` by the factor rows into the accumulator).
        ``build(m, srcs, outs, tmp, params, ns, s0) -> [vector instructions]``: the chunk is
        ``m`` rows of the ``ns`` column slices from slice ``s0``; ``srcs`` (mem, row) per input,
        ``outs`` (mem, row) per output, ``tmp`` first accumulator row of the
        ``extra_acc_per_row * m`` scratch rows (``extra_acc_per_row`` counts every slice of a
        row), ``params`` first accumulator row of each parameter block. ``outputs``: (tensor,
        "sp" | "acc"): what gets stored.

        ``columns``: the operation is elementwise (no value depends on another slice), so a
        chunk may be a group of column slices over many rows: each LOAD and STORE then moves
        many rows (their fixed costs are paid less often, and there are fewer of them), and
        the chunks alternate between two on-chip buffers so that the loads of the next chunk
        and the stores of the last one run while the vector unit works (without it, loads,
        vector work and stores follow each other chunk by chunk).
        """
        C, Esp = self.E_acc, self.E_sp
        consts = [self.const(f"{node.name}.param{i}", rows) for i, rows in enumerate(param_rows_list)]
        fac_consts = []
        widen = any(src.kind == "widen" for _, src, _ in inputs)
        n_acc_fixed = sum(r.shape[0] for r in param_rows_list) + int(widen)
        D = max([t.cols for t, _, _ in inputs] + [t.cols for t, _ in outputs])
        nsl = -(-D // C)
        # per row and slice of a chunk: accumulator and scratchpad rows of one buffer
        acc_u, sp_u = 0, 0
        for t, src, _ in inputs:
            if src.kind == "int32":
                acc_u += 1
            elif src.kind == "widen":
                acc_u += 1  # factors, multiplied in place into the widened values
                sp_u += 1
                fac_consts.append(self.const(f"{node.name}.factors{len(fac_consts)}", src.factors.astype(np.int32)))
            else:
                sp_u += 1
        for t, where in outputs:
            if where == "sp":
                sp_u += 1
            else:
                acc_u += 1
        tmp_u = -(-extra_acc_per_row // nsl)
        same_slices = Esp == C and all(t.cols == D for t, _, _ in inputs) and all(t.cols == D for t, _ in outputs)
        if columns and same_slices:
            m, ns = self.column_chunk(M, nsl, acc_fixed=n_acc_fixed, acc_u=2 * acc_u + tmp_u, sp_u=2 * sp_u)
            if m < 1:
                self.fail(node, f"{detail} does not fit configuration {self.cfg.name!r}: one row of one column "
                                f"slice needs {2 * acc_u + tmp_u} accumulator rows and {2 * sp_u} scratchpad rows "
                                f"besides {n_acc_fixed} parameter rows")
            buffers = 2 if (m, ns) != (M, nsl) else 1
        else:
            acc_per_row, sp_per_row = extra_acc_per_row, 0
            for t, src, _ in inputs:
                k = -(-t.cols // C)
                acc_per_row += k if src.kind in ("int32", "widen") else 0
                sp_per_row += k if src.kind != "int32" else 0
            for t, where in outputs:
                if where == "sp":
                    sp_per_row += -(-t.cols // Esp)
                else:
                    acc_per_row += -(-t.cols // C)
            m = self.chunk(node, M, acc_fixed=n_acc_fixed, acc_per_row=acc_per_row, sp_per_row=sp_per_row,
                           what=detail)
            ns, buffers = nsl, 1
        # on-chip layout: parameters, then per buffer the inputs and outputs, then the scratch rows
        params_at, row = [], 0
        for rows in param_rows_list:
            params_at.append(row)
            row += rows.shape[0]
        unit_row = row
        acc_next, sp_next = row + int(widen), 0
        lay_in, lay_out = [[] for _ in range(buffers)], [[] for _ in range(buffers)]
        for b in range(buffers):
            for t, src, _ in inputs:
                k = -(-t.cols // C) if ns == nsl else ns
                if src.kind == "int32":
                    lay_in[b].append(("acc", acc_next, None, None))
                    acc_next += k * m
                elif src.kind == "widen":
                    lay_in[b].append(("widen", acc_next, sp_next, acc_next))  # values (= factors), int8, factors
                    acc_next += k * m
                    sp_next += k * m
                else:
                    lay_in[b].append(("sp", sp_next, None, None))
                    sp_next += k * m
            for t, where in outputs:
                if where == "sp":
                    lay_out[b].append(("sp", sp_next))
                    sp_next += (-(-t.cols // Esp) if ns == nsl else ns) * m
                else:
                    lay_out[b].append(("acc", acc_next))
                    acc_next += (-(-t.cols // C) if ns == nsl else ns) * m
        tmp = acc_next
        unit = self.const(f"{node.name}.unit", param_rows([UNIT_WORD], C)) if widen else None
        body = [_ld(Mem.ACC, params_at[i], consts[i], rows.shape[0], C, C * 4)
                for i, rows in enumerate(param_rows_list)]
        if unit is not None:
            body.append(_ld(Mem.ACC, unit_row, unit, 1, C, C * 4))
        chunks = [(r0, min(m, M - r0), s0, min(ns, nsl - s0)) for s0 in range(0, nsl, ns) for r0 in range(0, M, m)]

        def loads_of(c):
            r0, mc, s0, k = chunks[c]
            loads = []
            fi = 0
            for (t, src, _), lay in zip(inputs, lay_in[c % buffers]):
                if lay[0] == "acc":
                    loads += self.load_slices(Mem.ACC, lay[1], t, r0, mc, C, s0, k)
                elif lay[0] == "widen":
                    loads += self.load_slices(Mem.SP, lay[2], t, r0, mc, C, s0, k)
                    # the factor row of each slice, repeated down the chunk (a one-row chunk: as one row)
                    if mc == 1:
                        loads += self.load_slices(Mem.ACC, lay[3], _Tensor(fac_consts[fi], 1, t.cols, 4), 0, 1, C,
                                                  s0, k)
                    else:
                        loads += [_ld(Mem.ACC, lay[3] + (s - s0) * mc, fac_consts[fi] + s * C * 4, mc,
                                      min(C, t.cols - s * C), 0) for s in range(s0, min(-(-t.cols // C), s0 + k))]
                    fi += 1
                else:
                    loads += self.load_slices(Mem.SP, lay[1], t, r0, mc, C, s0, k)
            return loads

        def vector_of(c):
            r0, mc, s0, k = chunks[c]
            vec = []
            srcs = []
            for (t, src, _), lay in zip(inputs, lay_in[c % buffers]):
                if lay[0] == "widen":
                    vec.append(Instruction.make(Opcode.VBIN, func="mul", a_mem=Mem.SP, a=lay[2], b_mem=Mem.ACC,
                                                b=lay[3], dst_mem=Mem.ACC, dst=lay[1], param=unit_row,
                                                rows=min(-(-t.cols // C) - s0, k) * mc))
                    srcs.append((Mem.ACC, lay[1]))
                elif lay[0] == "acc":
                    srcs.append((Mem.ACC, lay[1]))
                else:
                    srcs.append((Mem.SP, lay[1]))
            outs = [(Mem.SP if w == "sp" else Mem.ACC, a) for w, a in lay_out[c % buffers]]
            return vec + build(mc, srcs, outs, tmp, params_at, k, s0)

        def stores_of(c):
            r0, mc, s0, k = chunks[c]
            stores = []
            for (t, where), (w, a) in zip(outputs, lay_out[c % buffers]):
                stores += self.store_slices(Mem.SP if w == "sp" else Mem.ACC, a, t, r0, mc,
                                            Esp if w == "sp" else C, s0, k)
            return stores

        body += _pipelined(len(chunks), buffers, loads_of, vector_of, stores_of)
        shape = f"{len(chunks)} chunks of {m} rows" + (f" x {ns} column slices" if ns != nsl else "") + (
            ", double-buffered" if buffers == 2 else "")
        self.emit_kernel(node.name, node, body, f"{detail}, {shape}")

    def column_chunk(self, M: int, nsl: int, *, acc_fixed: int, acc_u: int, sp_u: int) -> tuple[int, int]:
        """Rows and column slices of an elementwise kernel's chunk: as many rows as fit (all of
        them when one slice of every row fits), then as many slices as fit; (0, 1) when not even
        one row of one slice fits. ``acc_u`` / ``sp_u``: on-chip rows per row and slice."""
        cfg = self.cfg
        acc_free, sp_free = cfg.acc_rows - acc_fixed, cfg.sp_rows
        if acc_free < 0:
            return 0, 1
        rows = min(M, (1 << 16) - 1, acc_free // acc_u if acc_u else M, sp_free // sp_u if sp_u else M)
        if rows < 1:
            return 0, 1
        if rows < M:
            n = -(-M // rows)
            return -(-M // n), 1  # even row chunks of one slice
        ns = min(nsl, acc_free // (acc_u * M) if acc_u else nsl, sp_free // (sp_u * M) if sp_u else nsl)
        ns = min(ns, ((1 << 16) - 1) // M)
        n = -(-nsl // ns)
        return M, -(-nsl // n)  # even slice groups

    def norm_params(self, p) -> np.ndarray:
        C = self.E_acc
        L_ = p.gain.size
        n = -(-L_ // C)
        out = np.zeros((1 + 2 * n, C), dtype=np.int32)
        out[0, 0] = p.shift
        g = np.zeros(n * C, np.int32)
        g[:L_] = p.gain
        b = np.zeros(n * C, np.int32)
        b[:L_] = p.bias
        out[1:1 + n] = g.reshape(n, C)
        out[1 + n:] = b.reshape(n, C)
        return out

    def lower_layernorm(self, node: Node) -> None:
        """``vrow layernorm``: int8 out (and an int8 twin with other scales), or with ``wide``
        (int32 into accumulator rows) a graph output stored as int32, or two digits for the
        Linears (the digit split) and an int32 copy for the residual Adds."""
        p = self.qg.norms[node.name]
        x = self.vec_source(node, node.inputs[0], p.src)
        M, D = x.rows, x.cols
        o = node.outputs[0]

        def vrow(src, dst, param, m, wide):
            return Instruction.make(Opcode.VROW, func="layernorm", src_mem=src[0], src=src[1], dst=dst, param=param,
                                    rows=m, len=D, wide=int(wide))

        if p.digits:
            twin = p.twin
            if twin is not None and not twin.wide:
                self.fail(node, "a two-digit LayerNorm output's second copy must be int32")
            rows = self.norm_params(p)
            extra = [(self.new_tensor(o, M, D, 4, twin=True), "acc")] if twin is not None else []
            params = np.vstack([rows] + ([self.norm_params(twin)] if twin is not None else []))

            def produce(m, srcs, x12, prm, ns, outs=()):
                ins = [vrow(srcs[0], x12, prm, m, True)]
                if outs:
                    ins.append(vrow(srcs[0], outs[0][1], prm + rows.shape[0], m, True))
                return ins

            self.digit_kernel(node, M, D, [(x, p.src, node.inputs[0])], params, produce,
                              f"layernorm {M}x{D} from {p.src.kind}" + (" (+ int32 copy)" if twin else ""),
                              columns=False, extra_outputs=extra)
            return
        # int8 (and an int8 twin), or wide: int32 into accumulator rows, stored as int32
        outs = [(self.out_tensor(o, M, D, 4 if p.wide else 1), "acc" if p.wide else "sp")]
        params = [self.norm_params(p)]
        if p.twin is not None:
            outs.append((self.new_tensor(o, M, D, 1, twin=True), "sp"))
            params.append(self.norm_params(p.twin))

        def build(m, srcs, outs_, tmp, prm, ns, s0):
            return [vrow(srcs[0], dst, prm[i], m, p.wide) for i, (_, dst) in enumerate(outs_)]

        self.vector_kernel(node, M, [(x, p.src, node.inputs[0])], build, outs, params, 0,
                           f"layernorm {M}x{D} from {p.src.kind}" + (" (+ twin)" if p.twin is not None else "")
                           + (" -> int32" if p.wide else ""))

    def lower_rmsnorm(self, node: Node) -> None:
        """``vrow rmsnorm`` (parameter rows: shift, then the gains; no bias rows)."""
        p = self.qg.norms[node.name]
        x = self.vec_source(node, node.inputs[0], p.src)
        M, D = x.rows, x.cols
        rows = self.norm_params(p)[:1 + -(-D // self.E_acc)]
        if p.digits:  # int32 (wide) into accumulator rows, then the digit split; a row op: row chunks
            self.digit_kernel(node, M, D, [(x, p.src, node.inputs[0])], rows,
                              lambda m, srcs, tmp, prm, ns: [Instruction.make(
                                  Opcode.VROW, func="rmsnorm", src_mem=srcs[0][0], src=srcs[0][1], dst=tmp,
                                  param=prm, rows=m, len=D, wide=1)], f"rmsnorm {M}x{D} from {p.src.kind}",
                              columns=False)
            return
        out = self.out_tensor(node.outputs[0], M, D, 1)

        def build(m, srcs, outs_, tmp, prm, ns, s0):
            (mem, a), = srcs
            (_, dst), = outs_
            return [Instruction.make(Opcode.VROW, func="rmsnorm", src_mem=mem, src=a, dst=dst, param=prm[0],
                                     rows=m, len=D)]

        self.vector_kernel(node, M, [(x, p.src, node.inputs[0])], build, [(out, "sp")], [rows], 0,
                           f"rmsnorm {M}x{D} from {p.src.kind}")

    def lower_swiglu(self, node: Node) -> None:
        """``vmap silu`` (gate, int8 -> int32 in accumulator rows), ``vbin mul`` by ``up`` (int8)
        -> int8, or -> int32 then REQUANT per column (per-channel output)."""
        p = self.qg.swiglus[node.name]
        gate = self.vec_source(node, node.inputs[0], p.gate)
        up = self.tensor_in(node, node.inputs[1])
        M, D = gate.rows, gate.cols
        C = self.E_acc
        nsl = -(-D // C)
        if p.digits:
            def produce(m, srcs, tmp, prm, ns):
                (gm, ga), (um, ua) = srcs
                return [Instruction.make(Opcode.VMAP, func="silu", src_mem=gm, src=ga, dst_mem=Mem.ACC, dst=tmp,
                                         param=prm, rows=ns * m),
                        Instruction.make(Opcode.VBIN, func="mul", a_mem=Mem.ACC, a=tmp, b_mem=um, b=ua,
                                         dst_mem=Mem.ACC, dst=tmp, param=prm + 1, rows=ns * m)]

            self.digit_kernel(node, M, D, [(gate, p.gate, node.inputs[0]), (up, VecIn("int8", p.up_scale), node.inputs[1])],
                              np.vstack([param_rows([p.silu_in, p.silu_out], C), param_rows([p.mul_word], C)]),
                              produce, f"swiglu {M}x{D}", factors=p.digit_factors)
            return
        out = self.out_tensor(node.outputs[0], M, D, 1)
        per_channel = p.requant_words is not None
        params = [param_rows([p.silu_in, p.silu_out], C), param_rows([p.mul_word], C)]
        if per_channel:
            rq = np.zeros((2 * nsl, C), dtype=np.int32)
            words = np.zeros(nsl * C, np.int64)
            words[:D] = np.broadcast_to(p.requant_words, (D,))
            rq[1::2] = words.reshape(nsl, C)
            params.append(rq)

        def build(m, srcs, outs_, tmp, prm, ns, s0):
            (gm, ga), (um, ua) = srcs
            (_, dst), = outs_
            ins = [Instruction.make(Opcode.VMAP, func="silu", src_mem=gm, src=ga, dst_mem=Mem.ACC, dst=tmp,
                                    param=prm[0], rows=ns * m)]
            if not per_channel:
                return ins + [Instruction.make(Opcode.VBIN, func="mul", a_mem=Mem.ACC, a=tmp, b_mem=um, b=ua,
                                               dst_mem=Mem.SP, dst=dst, param=prm[1], rows=ns * m)]
            ins.append(Instruction.make(Opcode.VBIN, func="mul", a_mem=Mem.ACC, a=tmp, b_mem=um, b=ua,
                                        dst_mem=Mem.ACC, dst=tmp, param=prm[1], rows=ns * m))
            ins += [Instruction.make(Opcode.REQUANT, src=tmp + s * m, dst=dst + s * m, rows=m,
                                     param=prm[2] + 2 * (s0 + s)) for s in range(ns)]
            return ins

        self.vector_kernel(node, M, [(gate, p.gate, node.inputs[0]), (up, VecIn("int8", p.up_scale), node.inputs[1])],
                           build, [(out, "sp")], params, nsl,
                           f"swiglu {M}x{D}" + (", per-channel requant" if per_channel else ""), columns=True)

    def lower_gelu(self, node: Node) -> None:
        p = self.qg.gelus[node.name]
        x = self.vec_source(node, node.inputs[0], p.src)
        M, D = x.rows, x.cols
        C = self.E_acc
        nsl = -(-D // C)
        o = node.outputs[0]
        if p.digits:
            self.digit_kernel(node, M, D, [(x, p.src, node.inputs[0])], param_rows([p.word_in, p.word_out], C),
                              lambda m, srcs, tmp, prm, ns: [Instruction.make(
                                  Opcode.VMAP, func="gelu", src_mem=srcs[0][0], src=srcs[0][1], dst_mem=Mem.ACC,
                                  dst=tmp, param=prm, rows=ns * m)], f"gelu {M}x{D} from {p.src.kind}",
                              in_place=p.src.kind in ("int32", "widen"), factors=p.digit_factors)
            return
        out = self.out_tensor(o, M, D, 1)
        per_channel = p.requant_words is not None
        params = [param_rows([p.word_in, p.word_out], C)]
        if per_channel:
            rq = np.zeros((2 * nsl, C), dtype=np.int32)  # per slice: bias row (0), scale-word row
            words = np.zeros(nsl * C, np.int64)
            words[:D] = np.broadcast_to(p.requant_words, (D,))
            rq[1::2] = words.reshape(nsl, C)
            params.append(rq)

        def build(m, srcs, outs_, tmp, prm, ns, s0):
            (mem, a), = srcs
            (_, dst), = outs_
            if not per_channel:
                return [Instruction.make(Opcode.VMAP, func="gelu", src_mem=mem, src=a, dst_mem=Mem.SP, dst=dst,
                                         param=prm[0], rows=ns * m)]
            mid = a if mem == Mem.ACC else tmp  # int32 input: GELU in place
            ins = [Instruction.make(Opcode.VMAP, func="gelu", src_mem=mem, src=a, dst_mem=Mem.ACC, dst=mid,
                                    param=prm[0], rows=ns * m)]
            ins += [Instruction.make(Opcode.REQUANT, src=mid + s * m, dst=dst + s * m, rows=m,
                                     param=prm[1] + 2 * (s0 + s)) for s in range(ns)]
            return ins

        self.vector_kernel(node, M, [(x, p.src, node.inputs[0])], build, [(out, "sp")], params,
                           nsl if per_channel and p.src.kind == "int8" else 0,
                           f"gelu {M}x{D} from {p.src.kind}" + (", per-channel requant" if per_channel else ""),
                           columns=True)

    def digit_kernel(self, node: Node, M: int, D: int, inputs: list, params: np.ndarray, produce: Callable,
                     detail: str, in_place: bool = False, factors: np.ndarray | None = None,
                     columns: bool = True, extra_outputs: list = ()) -> None:
        """A vector kernel whose int32 result (``produce(m, srcs, x, param_row, ns)`` writes it to the
        accumulator rows at ``x``, at the output's scale) leaves as a two-digit tensor
        (``quantize.digit_values``): ``hi = vmap scale(x, 1/16)``, ``-16 hi`` by ``vbin mul`` with
        rows of -16, ``lo = vbin add(x, -16 hi)``; hi and lo stored as two int8 planes.
        ``factors`` (per-channel digit scales): first ``x = vbin mul(x, factor rows)`` rounded by
        ``2^DIGIT_FINE_SHIFT`` (``reference.digit_channels``). ``in_place``: the first input is in
        accumulator rows and ``x`` may overwrite it (fewer accumulator rows per token, longer
        chunks). ``columns``: the result is elementwise (False for a row operation such as a norm:
        then a chunk is whole rows). ``extra_outputs``: more (tensor, "sp" | "acc") outputs of the
        chunk, stored as well; ``produce`` then gets their (memory, row) as ``outs``."""
        C = self.E_acc
        nsl = -(-D // C)
        buf = self.new_tensor(node.outputs[0], 2 * M, D, 1)
        hi = _Tensor(buf.address, M, D, 1)
        lo = _Tensor(buf.address + M * D, M, D, 1)
        self.tensors[node.outputs[0]] = _Tensor(buf.address, M, D, 1, plane=M * D)
        key = ("digit_neg", M, D)
        if key not in self.shared_consts:  # the -16 rows, one per row of the output
            self.shared_consts[key] = self.const(f"digits.neg{DIGIT_BASE}.{M}x{D}",
                                                 np.full((M, D), -DIGIT_BASE, dtype=np.int8))
        neg = _Tensor(self.shared_consts[key], M, D, 1)
        words = [params, param_rows([DIGIT_HI_WORD], C), param_rows([UNIT_WORD, UNIT_WORD], C),
                 param_rows([DIGIT_FINE_WORD], C)]
        extra = [(neg, VecIn("int8", 1.0), f"-{DIGIT_BASE}")]
        if factors is not None:  # the channels' factors, one row per row of the output
            extra.append((_Tensor(self.const(f"{node.name}.digit_factors",
                                             np.tile(np.asarray(factors, np.int8), (M, 1))), M, D, 1),
                          VecIn("int8", 1.0), "digit factors"))

        def build(m, srcs, outs_, tmp, prm, ns, s0):
            (hm, ha), (lm, la) = outs_[:2]
            neg_mem, neg_at = srcs[len(inputs)]
            rows = ns * m
            if in_place and srcs[0][0] != Mem.ACC:
                self.fail(node, "in-place digit split needs its input in accumulator rows")
            x12, prod = (srcs[0][1], tmp) if in_place else (tmp, tmp + rows)
            if extra_outputs:
                ins = produce(m, srcs[:len(inputs)], x12, prm[0], ns, outs=outs_[2:])
            else:
                ins = produce(m, srcs[:len(inputs)], x12, prm[0], ns)
            if factors is not None:
                fm, fa = srcs[len(inputs) + 1]
                ins.append(Instruction.make(Opcode.VBIN, func="mul", a_mem=Mem.ACC, a=x12, b_mem=fm, b=fa,
                                            dst_mem=Mem.ACC, dst=x12, param=prm[3], rows=rows))
            return ins + _digit_split(x12, (hm, ha), (neg_mem, neg_at), prod, (lm, la), prm[1], prm[2], rows)

        self.vector_kernel(node, M, inputs + extra, build, [(hi, "sp"), (lo, "sp")] + list(extra_outputs), words,
                           nsl if in_place else 2 * nsl,
                           detail + ", two-digit output" + (" per channel" if factors is not None else ""),
                           columns=columns)

    def lower_add(self, node: Node) -> None:
        p = self.qg.adds[node.name]
        a = self.vec_source(node, node.inputs[0], p.a)
        b = self.vec_source(node, node.inputs[1], p.b)
        M, D = a.rows, a.cols
        C = self.E_acc
        nsl = -(-D // C)
        wide = p.output == "int32"
        out = self.out_tensor(node.outputs[0], M, D, 4 if wide else 1)

        def build(m, srcs, outs_, tmp, prm, ns, s0):
            (am, aa), (bm, ba) = srcs
            (om, oa), = outs_
            return [Instruction.make(Opcode.VBIN, func="add", a_mem=am, a=aa, b_mem=bm, b=ba, dst_mem=om, dst=oa,
                                     param=prm[0], rows=ns * m)]

        self.vector_kernel(node, M, [(a, p.a, node.inputs[0]), (b, p.b, node.inputs[1])], build,
                           [(out, "acc" if wide else "sp")], [param_rows([p.word_a, p.word_b], C)], 0,
                           f"add {M}x{D} ({p.a.kind} + {p.b.kind} -> {p.output})", columns=True)

    # ------------------------------------------------------------------ tensors
    def tensor_in(self, node: Node, name: str) -> _Tensor:
        t = self.tensors.get(name)
        if t is None:
            self.fail(node, f"input {name!r} is not on the device")
        return t

    def input_spec(self, name: str) -> TensorSpec:
        return next(spec for spec in self.inputs if spec.name == name)

    def out_tensor(self, name: str, rows: int, cols: int, esize: int) -> _Tensor:
        if name in self.graph_outputs:
            return self.tensors[name]
        return self.new_tensor(name, rows, cols, esize)

    # ------------------------------------------------------------------ driver
    def run(self) -> Bundle:
        g, qg, cfg = self.g, self.qg, self.cfg
        device_nodes = [n for n in g.nodes if n.device == "device"]
        self.views: dict[str, tuple] = {}
        self.record_words: dict[str, tuple[int, int, int]] = {}
        self.alias_of: dict[str, str] = {}
        handlers = {"Linear": self.lower_linear, "Attention": self.lower_attention,
                    "GQAttention": self.lower_gqa, "Reshape": self.lower_layout, "Transpose": self.lower_layout,
                    "Rope": self.lower_rope, "Pad": self.lower_pad, "CacheWrite": self.lower_cache_write,
                    "LayerNorm": self.lower_layernorm, "Gelu": self.lower_gelu, "Add": self.lower_add,
                    "RMSNorm": self.lower_rmsnorm, "SwiGLU": self.lower_swiglu}
        if self.E_sp != self.E_acc:
            raise LoweringError(f"configuration {cfg.name!r}: the vector kernels need scratchpad rows as wide as "
                                f"accumulator rows ({self.E_sp} vs {self.E_acc}; a non-square array)")
        for n in device_nodes:
            if n.op not in handlers:
                raise LoweringError(f"node {n.name} (op {n.op}): no device lowering for {n.op} "
                                    f"(lowered ops: {', '.join(handlers)})")
            if n.op != "Linear" and not cfg.vector.row_engine:
                raise LoweringError(f"node {n.name} (op {n.op}): needs the vector row engine, which "
                                    f"configuration {cfg.name!r} leaves out (vector.row_engine: false); "
                                    "only Linear lowers without it")
            if n.op == "Add" and n.name not in qg.adds:
                raise LoweringError(f"node {n.name} (op Add): not quantized for the device")
        # ---- inputs (what the host computes) and outputs
        def values_of(kind: str) -> list[str]:
            return [k for k, (kd, _) in qg.device_inputs.items() if kd == kind]

        kv_values, slot_values = values_of("kv_len"), values_of("kv_slot")
        caches = {n.inputs[0]: n for n in device_nodes if n.op == "CacheWrite"}
        self.kv_inputs = {}
        self.kv_slot_inputs: dict[str, str] = {}  # host value (the write mask) -> bundle input (the slot)
        self.rope_inputs: dict[tuple[str, str], _Tensor] = {}
        self.input_column_perm: dict[str, list[int]] = {}
        self.patch_sites: list[dict] = []
        host_kinds: dict[str, str] = {}
        for name, (kind, scale) in qg.device_inputs.items():
            if kind == "kv_len":
                spec_name = kv_len_input_name(name, len(kv_values))
                addr = self.mem.allocate(spec_name, 4, "input")
                self.inputs.append(TensorSpec.dense(spec_name, (1,), "int32", addr))
                self.kv_inputs[name] = addr
            elif kind == "kv_slot":  # read by the host only: it patches the append STOREs (patch_sites)
                spec_name = kv_slot_input_name(name, len(slot_values))
                addr = self.mem.allocate(spec_name, 4, "input")
                self.inputs.append(TensorSpec.dense(spec_name, (1,), "int32", addr))
                self.kv_slot_inputs[name] = spec_name
            elif kind == "rope_table":  # one table input per (cos, sin) pair, below
                continue
            else:
                spec_name = name
                M, D = self._rows(g.shape(name))
                es = 4 if kind == "int32" else 1
                # a KV cache is updated in place: the graph output aliases this input (below)
                addr = self.mem.allocate(name, M * D * es, "inout" if name in caches else "input")
                self.inputs.append(TensorSpec.dense(name, (M, D), kind, addr, scale=float(scale)))
                self.tensors[name] = _Tensor(addr, M, D, es)
            host_kinds[spec_name] = kind
        rope_tables: dict[tuple[str, str], tuple[int, int, int]] = {}  # (cos, sin) -> rows, head dim, most heads
        for n in device_nodes:
            if n.op != "Rope" or all(i in g.consts for i in n.inputs[1:3]):
                continue
            if any(qg.device_inputs.get(i, ("",))[0] != "rope_table" for i in n.inputs[1:3]):
                raise LoweringError(f"node {n.name} (Rope): cos and sin must both be constants or both host inputs")
            _, H, S_, D = g.shape(n.inputs[0])
            rows, d, heads = rope_tables.get(tuple(n.inputs[1:3]), (S_, D, H))
            if (rows, d) != (S_, D):
                raise LoweringError(f"node {n.name} (Rope): shares its cos/sin with a Rope of another shape")
            rope_tables[tuple(n.inputs[1:3])] = (S_, D, max(H, heads))
        rope_table_inputs = {}
        for (cos, sin), (S_, D, H) in rope_tables.items():
            spec_name = rope_table_input_name(cos, len(rope_tables))
            addr = self.mem.allocate(spec_name, S_ * H * D * 4, "input")
            self.inputs.append(TensorSpec.dense(spec_name, (S_, H * D), "int32", addr))
            self.rope_inputs[(cos, sin)] = _Tensor(addr, S_, H * D, 4)
            rope_table_inputs[spec_name] = {"cos": cos, "sin": sin, "head_dim": D}
            host_kinds[spec_name] = "rope_table"
        self.graph_outputs = set()
        self.output_channel_scales: dict[str, list[float]] = {}
        self.output_column_perm: dict[str, list[int]] = {}
        self.in_place: dict[str, str] = {}  # graph output -> the bundle input at its address
        for o in g.outputs:
            prod = g.producers().get(o.name)
            if prod is None or prod.device != "device":
                raise LoweringError(f"graph output {o.name!r} is not computed on the device")
            M, D = self._rows(o.shape)
            if prod.op == "CacheWrite":  # the cache buffer: the past input's memory, updated in place
                past = prod.inputs[0]
                if past not in self.tensors or qg.device_inputs[past][0] != "int8":
                    raise LoweringError(f"node {prod.name} (CacheWrite): the past cache {past!r} must be an int8 "
                                        "bundle input (a graph input)")
                readers = [u.name for u in g.consumers().get(past, []) if u is not prod]
                if readers:
                    raise LoweringError(f"node {prod.name} (CacheWrite): the past cache {past!r} is also read by "
                                        f"{', '.join(readers)}; updated in place, it must be read by the write only")
                src = self.input_spec(past)
                if not math.isclose(float(src.scale), float(qg.act_scales[o.name]), rel_tol=1e-12):
                    raise LoweringError(f"node {prod.name} (CacheWrite): the cache {o.name!r} and the past {past!r} "
                                        f"have different scales ({qg.act_scales[o.name]} vs {src.scale})")
                self.outputs.append(TensorSpec.dense(o.name, tuple(o.shape), "int8", src.address, scale=src.scale))
                self.tensors[o.name] = self.tensors[past]
                self.views[o.name] = ("cache", int(o.shape[1]), int(o.shape[-1]))
                self.graph_outputs.add(o.name)
                self.in_place[o.name] = past
                continue
            lp = qg.linears.get(prod.name) if prod.op == "Linear" else None
            if lp is not None and lp.output == "int32":  # logits: int32 accumulators, a scale per column
                addr = self.mem.allocate(o.name, M * D * 4, "output")
                self.outputs.append(TensorSpec.dense(o.name, tuple(o.shape), "int32", addr, scale=1.0))
                self.tensors[o.name] = _Tensor(addr, M, D, 4)
                self.graph_outputs.add(o.name)
                self.output_channel_scales[o.name] = (lp.acc_in_scale * lp.w_scale.astype(np.float64)).tolist()
                continue
            np_ = qg.norms.get(prod.name) if prod.op == "LayerNorm" else None
            if np_ is not None and np_.wide:  # a LayerNorm's int32 output (vrow wide), one scale
                addr = self.mem.allocate(o.name, M * D * 4, "output")
                self.outputs.append(TensorSpec.dense(o.name, tuple(o.shape), "int32", addr,
                                                     scale=float(np_.out_scale)))
                self.tensors[o.name] = _Tensor(addr, M, D, 4)
                self.graph_outputs.add(o.name)
                continue
            s = qg.act_scales.get(o.name)
            if isinstance(s, np.ndarray) or s is None:
                raise LoweringError(f"graph output {o.name!r} needs one int8 scale")
            addr = self.mem.allocate(o.name, M * D, "output")
            self.outputs.append(TensorSpec.dense(o.name, tuple(o.shape), "int8", addr, scale=float(s)))
            self.tensors[o.name] = _Tensor(addr, M, D, 1)
            self.graph_outputs.add(o.name)
        # ---- softmax parameter records: [scale word, kv_len (copied in by the prologue), 0]
        attns = [n for n in device_nodes if n.op in ("Attention", "GQAttention")]
        self.softmax_records = {}
        if attns:
            rec = np.zeros((len(attns), ALIGN // 4), dtype=np.int32)
            for i, n in enumerate(attns):
                if n.op == "GQAttention":
                    rec[i, 0] = qg.gqas[n.name].softmax_word
                    rec[i, 2] = int(n.attrs.get("causal_offset", 0))
                    self.record_words[n.name] = (int(rec[i, 0]), int(g.shape(n.inputs[1])[2]), int(rec[i, 2]))
                else:
                    rec[i, 0] = qg.attentions[n.name].softmax_word
                mask = n.inputs[3] if len(n.inputs) > 3 else None
                if mask is None:
                    rec[i, 1] = g.shape(n.inputs[1])[2 if n.op == "GQAttention" else 1]
            base = self.const("softmax_records", rec)
            for i, n in enumerate(attns):
                self.softmax_records[n.name] = base + i * ALIGN
            # prologue: copy each sequence length into the records that use it
            body = []
            for value, addr in self.kv_inputs.items():
                users = [i for i, n in enumerate(attns) if len(n.inputs) > 3 and n.inputs[3] == value]
                if not users:
                    continue
                if users != list(range(users[0], users[-1] + 1)):
                    for i in users:
                        body += [_ld(Mem.ACC, 0, addr, 1, 1, 0, signal=[S]),
                                 _st(Mem.ACC, 0, base + i * ALIGN + 4, 1, 1, 0, wait=[L], signal=[L]),
                                 Instruction.make(Opcode.TOKEN, queue=L, wait=[S])]
                    continue
                body.append(_ld(Mem.ACC, 0, addr, len(users), 1, 0, signal=[S]))
                body.append(_st(Mem.ACC, 0, base + users[0] * ALIGN + 4, len(users), 1, ALIGN, wait=[L]))
            if body:
                self.emit_kernel("prologue.valid_len", None, body, "copy valid_len into the softmax records")
        # ---- layers: an Attention's layer starts at the first producer of its q/k/v
        prod = g.producers()
        starts = {}
        layout = ("Reshape", "Transpose")

        def root(x):  # through the head split/merge views to the tensor that owns the buffer
            while x in prod and prod[x].op in layout and prod[x].device == "device":
                x = prod[x].inputs[0]
            return x

        self.column_perm = {}
        for n in device_nodes:  # a Rope's Linear writes each head's columns as interleaved pairs
            if n.op != "Rope":
                continue
            lin = prod.get(root(n.inputs[0]))
            if lin is None or lin.op != "Linear" or any(
                    u.op not in layout + ("Rope",) for u in g.consumers().get(root(n.inputs[0]), [])):
                raise LoweringError(f"node {n.name} (Rope): its input must come from a Linear read only through "
                                    "the head split (the interleave permutation is folded into its columns)")
            _, H, _, D = g.shape(n.inputs[0])
            from .reference import rope_interleave
            self.column_perm[lin.name] = (np.arange(H)[:, None] * D + rope_interleave(D)[None, :]).ravel()
        def source(x):  # through views, RoPE and the cache append to the projection that made x
            while True:
                x = root(x)
                p = prod.get(x)
                if p is None or p.device != "device" or p.op not in ("Rope", "CacheWrite"):
                    return x
                x = p.inputs[0] if p.op == "Rope" else p.inputs[1]

        for i, n in enumerate(attns):
            first = min(device_nodes.index(prod[source(x)]) for x in n.inputs[:3]
                        if source(x) in prod and prod[source(x)] in device_nodes)
            starts[device_nodes[first].name] = f"layer{i}"
        # ---- lifetimes (a view keeps its root's buffer alive)
        last_use = {}
        for idx, n in enumerate(device_nodes):
            for i in n.inputs:
                if i is not None:
                    last_use[root(i)] = idx
        for o in self.graph_outputs:
            last_use[root(o)] = len(device_nodes)
        for idx, n in enumerate(device_nodes):
            if n.name in starts:
                self.layer = starts[n.name]
            handlers[n.op](n)
            for i in set(root(x) for x in n.inputs if x is not None):
                if last_use.get(i) == idx and i not in self.graph_outputs and i not in qg.device_inputs:
                    self.release(i)
        self.program.append(Instruction.make(Opcode.HALT))
        try:
            prog_addr = self.mem.allocate("program", len(self.program) * INSTR_BYTES, "program")
        except OutOfDeviceMemory as exc:
            raise LoweringError(f"program does not fit: {exc}") from None
        layers: dict[str, list[int]] = {}
        for k in self.kernels:
            r = layers.setdefault(k.layer, [k.first, k.first + k.count])
            r[0], r[1] = min(r[0], k.first), max(r[1], k.first + k.count)
        meta = {
            "model": self.model,
            "kernels": [k.to_json() for k in self.kernels],
            "layers": {k: {"first": a, "count": b - a} for k, (a, b) in layers.items()},
            "instructions": len(self.program),
            "host_inputs": {s.name: host_kinds[s.name] for s in self.inputs},
            "kv_len_inputs": {kv_len_input_name(v, len(kv_values)): v for v in kv_values},
        }
        if self.kv_slot_inputs:
            meta["kv_slot_inputs"] = {spec: value for value, spec in self.kv_slot_inputs.items()}
        if rope_table_inputs:
            meta["rope_table_inputs"] = rope_table_inputs
        if self.in_place:
            meta["in_place"] = self.in_place
        if self.patch_sites:
            meta["patch_sites"] = self.patch_sites
        if self.input_column_perm:
            meta["input_column_perm"] = self.input_column_perm
        if self.output_channel_scales:
            meta["output_channel_scales"] = self.output_channel_scales
        if self.output_column_perm:
            meta["output_column_perm"] = self.output_column_perm
        return Bundle.for_config(cfg, program=self.program, program_address=prog_addr, segments=self.segments,
                                 inputs=self.inputs, outputs=self.outputs, regions=self.mem.regions, metadata=meta)


def lower(qg: QuantizedGraph, config: AcceleratorConfig, *, model: str = "", metadata: dict | None = None,
          reuse_buffers: bool = True) -> Bundle:
    """Lower a quantized graph to a bundle for ``config`` (see the module docstring).

    Raises :class:`LoweringError` naming the node for an op with no device lowering or an
    operand that does not fit the on-chip memories, and for device memory that is too small.
    """
    bundle = _Lowerer(qg, config, model=model, reuse=reuse_buffers).run()
    bundle.metadata.update(metadata or {})
    return bundle


def listing(bundle: Bundle) -> str:
    """A readable program listing: kernels grouped by layer, each instruction with its index."""
    lines = [f"# {bundle.metadata.get('model', '')} for {bundle.config_name} "
             f"({len(bundle.program)} instructions)"]
    for k in bundle.metadata.get("kernels", []):
        lines.append("")
        lines.append(f"# [{k['layer']}] {k['name']} ({k['op'] or 'prologue'}): {k['detail']}; "
                     f"instructions {k['first']}..{k['first'] + k['count'] - 1}")
        for i in range(k["first"], k["first"] + k["count"]):
            lines.append(f"{i:7d}  {format_instruction(bundle.program[i])}")
    lines.append(f"{len(bundle.program) - 1:7d}  {format_instruction(bundle.program[-1])}")
    return "\n".join(lines) + "\n"
