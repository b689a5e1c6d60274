"""The compiler's graph IR: accelerator-level operations on statically shaped tensors.

:func:`weft.compiler.frontend.import_onnx` produces a :class:`Graph`; the quantizer
(:mod:`weft.compiler.quantize`), the reference executor (:mod:`weft.compiler.reference`) and
the performance model (:mod:`weft.compiler.perf`) read it; the back end (tiling, lowering to
instructions, bundle) will.

A graph is a list of :class:`Node` in topological order over named values. Every value has a
static shape and a numpy dtype (:class:`Value`); constants (weights, biases, tables) live in
``Graph.consts`` and are referred to by name like any other value.

Each node is placed on ``"device"`` (the accelerator: array or vector unit) or ``"host"``:
a node whose non-constant inputs all come from graph inputs or other host nodes is a host
node (the attention-mask preparation, the embedding lookups and their sum). The host runs
that prologue and hands the accelerator its first activation; embedding tables never go to
device memory.

The op set (:data:`OPS`) is described there op by op.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["OPS", "GEMM_OPS", "LAYOUT_OPS", "Value", "Node", "Graph", "IRError"]

#: op -> (inputs, attributes, meaning). Inputs in brackets are optional.
OPS: dict[str, str] = {
    "Linear": "x[..., K], W[K, N] (const), [b[N] (const)] -> x @ W + b. The array's GEMM with a "
              "stationary weight; bias added in the accumulator, requantized per output channel.",
    "MatMul": "a[..., M, K], b[..., K, N] (both activations, numpy broadcasting) -> a @ b.",
    "Attention": "q, k, v [B, S, H*Dh], [mask bias broadcastable to B, H, S, S_kv]; attrs num_heads, "
                 "scale -> softmax(q_h k_h^T * scale + mask) v_h per head, heads merged back to "
                 "[B, S, H*Dh]. Head split/merge is implicit (strided access), not a layout op.",
    "Softmax": "x, [mask bias]; attr axis -> softmax(x + mask, axis).",
    "LayerNorm": "x, gamma (const), [beta (const)]; attrs axis, epsilon -> normalise over axes >= axis.",
    "Gelu": "x; attr approximate ('none': erf, 'tanh') -> GELU(x).",
    "Add": "a, b (numpy broadcasting) -> a + b (residual adds, mask arithmetic).",
    "Sub": "a, b -> a - b.",
    "Mul": "a, b -> a * b.",
    "Div": "a, b -> a / b.",
    "Cast": "x; attr to (numpy dtype name) -> x converted.",
    "Reshape": "x; attr shape (static, fully resolved) -> x reshaped (row-major; no data movement).",
    "Transpose": "x; attr perm -> x transposed (a layout op: data movement or strided access).",
    "Expand": "x; attr shape (static) -> x broadcast to shape.",
    "Gather": "table, indices; attr axis -> np.take (embedding lookup; a host op).",
    "RMSNorm": "x, weight (const); attr epsilon -> x / sqrt(mean(x^2, last axis) + epsilon) * weight.",
    "Rope": "x [..., S, D], cos [S, D], sin [S, D] (rotate-half layout, HF/Llama) -> x * cos + "
            "concat(-x[..., D/2:], x[..., :D/2]) * sin. cos/sin are constants (prefill) or host values "
            "(decode: the rows of the current positions).",
    "GQAttention": "q [B, H, S, D], k, v [B, KV, Skv, D], [mask (bool, True = masked, broadcastable to "
                   "[B, KV, H/KV, S, Skv])]; attrs scale, causal, causal_offset -> per query head h "
                   "softmax(q_h k_g^T * scale) v_g with g = h // (H/KV) (grouped-query attention), "
                   "keys j > i + causal_offset masked when causal -> [B, H, S, D].",
    "SwiGLU": "gate, up (same shape) -> silu(gate) * up = gate * sigmoid(gate) * up.",
    "Pad": "x; attr pads (per axis (before, after), zeros) -> x zero-padded (the prefill's KV cache "
           "outputs, padded to the cache length).",
    "Compare": "a, b; attr fn ('equal', 'less_equal', 'less', 'greater', 'greater_equal') -> bool (host: "
               "mask preparation from a position input).",
    "Not": "x (bool) -> not x (host).",
    "Where": "cond, a, b -> a where cond else b (host; on the device only as a KV-cache write, CacheWrite).",
    "CacheWrite": "past [B, KV, S, D], new [B, KV, 1, D], write (bool [1, 1, S, 1], True at the new token's "
                  "slot) -> past with that slot replaced (a decode step appending to the KV cache).",
    "FakeQuant": "x; attrs scale, zero_point, qmin, qmax -> dequant(quant(x)) (from a QDQ pair; "
                 "its scale becomes the activation scale of the tensor).",
}

#: Ops that run on the systolic array.
GEMM_OPS = frozenset({"Linear", "MatMul", "Attention", "GQAttention"})
#: Ops that only move or reinterpret data.
LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Expand", "Pad"})


class IRError(ValueError):
    """An IR graph that breaks a structural rule."""


@dataclass
class Value:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    def __str__(self) -> str:
        return f"{self.name}: {np.dtype(self.dtype).name}{list(self.shape)}"


@dataclass
class Node:
    op: str
    name: str
    inputs: list[str | None]
    outputs: list[str]
    attrs: dict[str, Any] = field(default_factory=dict)
    device: str = "device"  # "device" or "host"
    origin: tuple[str, ...] = ()  # names of the ONNX nodes it came from

    def __str__(self) -> str:
        attrs = ", ".join(f"{k}={v}" for k, v in self.attrs.items())
        ins = ", ".join(i or "-" for i in self.inputs)
        return f"{self.name} [{self.device}] {', '.join(self.outputs)} = {self.op}({ins}{'; ' + attrs if attrs else ''})"


@dataclass
class Graph:
    inputs: list[Value]
    outputs: list[Value]
    nodes: list[Node]
    values: dict[str, Value]
    consts: dict[str, np.ndarray]
    #: fusion name -> count (onnxscript's and the frontend's own), for reports and tests
    fusions: dict[str, int] = field(default_factory=dict)
    #: quantization parameters found in the model (QDQ / weight-only int8): filled by the frontend
    qdq_weights: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # const name -> (int8 [K,N], scale[N])
    opset: int = 0

    # ------------------------------------------------------------------ queries
    def producers(self) -> dict[str, Node]:
        return {o: n for n in self.nodes for o in n.outputs}

    def consumers(self) -> dict[str, list[Node]]:
        out: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                if i is not None:
                    out.setdefault(i, []).append(n)
        return out

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return dict(sorted(counts.items()))

    def is_const(self, name: str | None) -> bool:
        return name is not None and name in self.consts

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.consts:
            return tuple(self.consts[name].shape)
        return self.values[name].shape

    def validate(self) -> None:
        known = {v.name for v in self.inputs} | set(self.consts)
        for n in self.nodes:
            if n.op not in OPS:
                raise IRError(f"node {n.name}: unknown IR op {n.op}")
            for i in n.inputs:
                if i is not None and i not in known:
                    raise IRError(f"node {n.name} ({n.op}) reads {i!r} before it is produced")
            known.update(n.outputs)
        for o in self.outputs:
            if o.name not in known:
                raise IRError(f"graph output {o.name!r} is never produced")

    def summary(self) -> str:
        lines = [f"inputs: {', '.join(str(v) for v in self.inputs)}",
                 f"outputs: {', '.join(str(v) for v in self.outputs)}",
                 f"ops: {self.op_counts()}",
                 f"fusions: {self.fusions}"]
        lines += [str(n) for n in self.nodes]
        return "\n".join(lines)
