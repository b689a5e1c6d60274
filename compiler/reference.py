"""Reference executor of the IR (:mod:`weft.compiler.ir`), in two modes.

* :func:`run_float`: every op in float (float32 storage, float64 inside reductions), the
  meaning of the graph; matches onnxruntime on the original ONNX model within 1e-4.
* :func:`run_int8`: what the accelerator will compute for a
  :class:`~weft.compiler.quantize.QuantizedGraph`. The array's work is emulated exactly:
  int8 x int8 -> int32 GEMMs, bias added in int32 and requantized with the hardware's
  REQUANT (:func:`weft.hw.vector_numerics.requantize`: fixed-point multiplier and shift, round half
  to even, saturate), so a compiled program must reproduce these integers bit for bit.

  The vector-unit ops use the vector unit's integer algorithms
  (:mod:`weft.hw.vector_numerics`, the same functions the bit-exact model runs): the
  softmax inside Attention (``vrow softmax`` with a key-padding length mask), LayerNorm
  (``vrow layernorm``), Gelu (``vmap gelu``) and the residual Add (``vbin add``, into int32
  accumulator rows when a LayerNorm reads the sum). A compiled bundle reproduces every
  integer of this executor (``tests/compiler/test_lower.py``). Ops with no device lowering
  (a standalone Softmax, elementwise Mul/Sub/Div on the device) keep a float stand-in
  (:func:`_placeholder`); the back end refuses them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from weft.hw.vector_numerics import (INT8, INT32, layernorm_rows, pack_scale_word, requantize, rmsnorm_rows,
                                     softmax_mask, softmax_rows, vec_add, vec_gelu, vec_mul, vec_rope, vec_scale,
                                     vec_silu)

from .ir import Graph, Node

__all__ = ["ExecutionError", "FLOAT_OPS", "INT8_OPS", "QTensor", "AccTensor", "run_float", "run_int8",
           "register_int8_op", "quantize_tensor", "float_kernel", "key_lengths", "softmax_placeholder",
           "DIGIT_BASE", "DIGIT_MAX", "DIGIT_FINE_SHIFT", "digit_split", "digit_gemm", "digit_channels"]

#: Two-digit ("12-bit") activations: a tensor x held as two int8 digits, x = DIGIT_BASE * hi + lo,
#: whose values span [-DIGIT_MAX, DIGIT_MAX] at its scale (16x finer steps than int8). The GEMM
#: runs hi and lo through the same weights and adds ``DIGIT_BASE * acc_hi + acc_lo`` (``vbin add``).
DIGIT_BASE = 16
DIGIT_MAX = 2047
#: Per-channel digit scales: the producer's int32 at ``s_max / 2^DIGIT_FINE_SHIFT`` is multiplied
#: by int8 factors and rounded by this shift (``vbin mul``), giving channel c at ``s_max / f_c``.
DIGIT_FINE_SHIFT = 10


class ExecutionError(RuntimeError):
    """The executor cannot run a graph (missing input, wrong shape, unknown op)."""


# ====================================================================== float kernels
def _gelu(x: np.ndarray, approximate: str = "none") -> np.ndarray:
    x64 = x.astype(np.float64)
    if approximate == "tanh":
        y = 0.5 * x64 * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x64 + 0.044715 * x64 ** 3)))
    else:
        y = 0.5 * x64 * (1.0 + _erf(x64 / math.sqrt(2.0)))
    return y.astype(x.dtype)


def _erf(x: np.ndarray) -> np.ndarray:
    try:
        from scipy.special import erf  # type: ignore
        return erf(x)
    except ImportError:
        import torch
        return torch.erf(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))).numpy()


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    x64 = x.astype(np.float64)
    m = np.max(x64, axis=axis, keepdims=True)
    e = np.exp(x64 - m)
    return (e / np.sum(e, axis=axis, keepdims=True)).astype(x.dtype)


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray | None, axis: int, eps: float) -> np.ndarray:
    axis = axis % x.ndim
    axes = tuple(range(axis, x.ndim))
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=axes, keepdims=True)
    var = ((x64 - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x64 - mean) / np.sqrt(var + eps) * gamma
    if beta is not None:
        y = y + beta
    return y.astype(x.dtype)


def _attention(q, k, v, mask, num_heads: int, scale: float) -> np.ndarray:
    B, S, D = q.shape
    Skv = k.shape[1]
    dh = D // num_heads
    dv = v.shape[2] // num_heads
    # contiguous 3-D per-head operands: numpy's stacked matmul is far slower on 4-D stacks
    qh = np.ascontiguousarray(q.reshape(B, S, num_heads, dh).transpose(0, 2, 1, 3), dtype=np.float64)
    kt = np.ascontiguousarray(k.reshape(B, Skv, num_heads, dh).transpose(0, 2, 3, 1), dtype=np.float64)
    vh = np.ascontiguousarray(v.reshape(B, Skv, num_heads, dv).transpose(0, 2, 1, 3), dtype=np.float64)
    scores = (qh.reshape(B * num_heads, S, dh) @ kt.reshape(B * num_heads, dh, Skv)).reshape(B, num_heads, S, Skv)
    scores = scores * scale
    if mask is not None:
        scores = scores + mask.astype(np.float64)
    probs = _softmax(scores, -1).reshape(B * num_heads, S, Skv)
    ctx = (probs @ vh.reshape(B * num_heads, Skv, dv)).reshape(B, num_heads, S, dv)
    return ctx.transpose(0, 2, 1, 3).reshape(B, S, -1).astype(q.dtype)


def _rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    y = x64 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps) * w
    return y.astype(x.dtype)


def _rotate_half(x: np.ndarray) -> np.ndarray:
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def _rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    return (x64 * cos + _rotate_half(x64) * sin).astype(x.dtype)


def gqa_valid(node, S: int, Skv: int, mask=None, batch: int = 1, kv: int = 1, groups: int = 1) -> np.ndarray:
    """Boolean [B, KV, G, S, Skv] (broadcastable): which keys each query row may attend to."""
    valid = np.ones((1, 1, 1, S, Skv), dtype=bool)
    if node.attrs.get("causal"):
        j = np.arange(Skv)[None, :]
        i = np.arange(S)[:, None]
        valid = valid & (j <= i + int(node.attrs.get("causal_offset", 0)))[None, None, None]
    if mask is not None:
        m = np.asarray(mask).astype(bool)
        valid = valid & ~m.reshape((1,) * (5 - m.ndim) + m.shape)
    return valid


def _gqa(node, q, k, v, mask=None) -> np.ndarray:
    B, H, S, D = q.shape
    KV, Skv = k.shape[1], k.shape[2]
    G = H // KV
    qg = q.astype(np.float64).reshape(B, KV, G * S, D)
    scores = (qg @ np.swapaxes(k.astype(np.float64), -1, -2)).reshape(B, KV, G, S, Skv) * node.attrs["scale"]
    valid = gqa_valid(node, S, Skv, mask)
    scores = np.where(valid, scores, -np.inf)
    m = np.max(scores, axis=-1, keepdims=True)
    e = np.where(valid, np.exp(scores - np.where(np.isfinite(m), m, 0)), 0.0)
    tot = e.sum(axis=-1, keepdims=True)
    p = np.where(tot > 0, e / np.where(tot > 0, tot, 1), 0.0)
    out = p.reshape(B, KV, G * S, Skv) @ v.astype(np.float64)
    return out.reshape(B, H, S, D).astype(q.dtype)


def _swiglu(g: np.ndarray, up: np.ndarray) -> np.ndarray:
    g64 = g.astype(np.float64)
    return (g64 / (1.0 + np.exp(-g64)) * up).astype(g.dtype)


def _fake_quant(x, scale, zero_point, qmin, qmax):
    q = np.clip(np.rint(x.astype(np.float64) / scale) + zero_point, qmin, qmax)
    return ((q - zero_point) * scale).astype(x.dtype)


def _linear(x, w, b=None):
    K = w.shape[0]
    y = (x.reshape(-1, K).astype(np.float64) @ w.astype(np.float64)).reshape(*x.shape[:-1], w.shape[-1])
    if b is not None:
        y = y + b
    return y.astype(np.result_type(x.dtype, w.dtype))


def _matmul(a, b):
    if np.issubdtype(a.dtype, np.floating):
        return np.matmul(a.astype(np.float64), b.astype(np.float64)).astype(np.result_type(a.dtype, b.dtype))
    return np.matmul(a, b)


def _binary(fn):
    def run(node, a, b):
        out = fn(a, b)
        return np.asarray(out).astype(np.result_type(a.dtype, b.dtype), copy=False)
    return run


def _div(a, b):
    if np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer):
        return np.trunc(a / b).astype(np.result_type(a.dtype, b.dtype))  # ONNX: truncate toward zero
    return a / b


_COMPARE = {"equal": np.equal, "less_equal": np.less_equal, "less": np.less, "greater": np.greater,
            "greater_equal": np.greater_equal}

FloatKernel = Callable[..., np.ndarray]

FLOAT_OPS: dict[str, FloatKernel] = {
    "Linear": lambda n, x, w, b=None: _linear(x, w, b),
    "MatMul": lambda n, a, b: _matmul(a, b),
    "Attention": lambda n, q, k, v, mask=None: _attention(q, k, v, mask, n.attrs["num_heads"], n.attrs["scale"]),
    "Softmax": lambda n, x, mask=None: _softmax(x if mask is None else (x + mask).astype(x.dtype), n.attrs["axis"]),
    "LayerNorm": lambda n, x, g, b=None: _layer_norm(x, g, b, n.attrs["axis"], n.attrs["epsilon"]),
    "Gelu": lambda n, x: _gelu(x, n.attrs.get("approximate", "none")),
    "Add": _binary(np.add),
    "Sub": _binary(np.subtract),
    "Mul": _binary(np.multiply),
    "Div": _binary(_div),
    "Cast": lambda n, x: x.astype(np.dtype(n.attrs["to"])),
    "Reshape": lambda n, x: x.reshape(n.attrs["shape"]),
    "Transpose": lambda n, x: np.ascontiguousarray(np.transpose(x, n.attrs["perm"])),
    "Expand": lambda n, x: np.ascontiguousarray(np.broadcast_to(x, n.attrs["shape"])),
    "Gather": lambda n, t, i: np.take(t, i.astype(np.int64), axis=n.attrs.get("axis", 0)),
    "RMSNorm": lambda n, x, w: _rms_norm(x, w, n.attrs.get("epsilon", 1e-6)),
    "Rope": lambda n, x, c, s: _rope(x, c, s),
    "GQAttention": lambda n, q, k, v, mask=None: _gqa(n, q, k, v, mask),
    "SwiGLU": lambda n, g, u: _swiglu(g, u),
    "Pad": lambda n, x: np.pad(x, [tuple(p) for p in n.attrs["pads"]]),
    "Compare": lambda n, a, b: _COMPARE[n.attrs["fn"]](a, b),
    "Not": lambda n, x: np.logical_not(x),
    "Where": lambda n, c, a, b: np.where(c, a, b).astype(np.result_type(a.dtype, b.dtype)),
    "CacheWrite": lambda n, past, new, w: np.where(np.asarray(w, bool), new, past).astype(past.dtype),
    "FakeQuant": lambda n, x: _fake_quant(x, n.attrs["scale"], n.attrs["zero_point"], n.attrs["qmin"], n.attrs["qmax"]),
}


def float_kernel(node: Node, args: list[np.ndarray | None]) -> np.ndarray:
    """Run one node's float kernel (trailing absent optional inputs dropped)."""
    fn = FLOAT_OPS.get(node.op)
    if fn is None:
        raise ExecutionError(f"node {node.name}: no float kernel for op {node.op}")
    while args and args[-1] is None:
        args = args[:-1]
    return fn(node, *args)


def _feeds(graph: Graph, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    env: dict[str, np.ndarray] = {}
    for v in graph.inputs:
        if v.name not in feeds:
            raise ExecutionError(f"missing graph input {v.name!r} (inputs: {[i.name for i in graph.inputs]})")
        a = np.asarray(feeds[v.name])
        if tuple(a.shape) != tuple(v.shape):
            raise ExecutionError(f"input {v.name!r} has shape {list(a.shape)}, the graph was compiled for {list(v.shape)}")
        env[v.name] = a.astype(v.dtype, copy=False)
    return env


def run_float(graph: Graph, feeds: Mapping[str, np.ndarray], *,
              observer: Callable[[Node, str, np.ndarray], None] | None = None,
              keep: bool = False) -> dict[str, np.ndarray]:
    """Run ``graph`` in float. Returns the graph outputs by name (every value if ``keep``).

    ``observer(node, value_name, array)`` is called for each value a node produces (the
    quantizer's calibration hooks in here).
    """
    env = _feeds(graph, feeds)
    env.update(graph.consts)
    for node in graph.nodes:
        out = float_kernel(node, [env[i] if i is not None else None for i in node.inputs])
        name = node.outputs[0]
        env[name] = out
        if observer is not None:
            observer(node, name, out)
    if keep:
        return env
    return {o.name: env[o.name] for o in graph.outputs}


# ====================================================================== int8 emulation
@dataclass
class QTensor:
    """An int8 tensor with its per-tensor scale: real value = q * scale."""

    q: np.ndarray
    scale: float | np.ndarray  # per tensor, or per channel (last axis)
    twin: "QTensor | None" = None  # per-tensor copy of a per-channel tensor (LayerNorm output read by an Add)
    digits: "tuple[np.ndarray, np.ndarray] | None" = None  # a two-digit tensor's int8 (hi, lo); q = 16 hi + lo

    def dequant(self) -> np.ndarray:
        return (self.q.astype(np.float64) * self.scale).astype(np.float32)


@dataclass
class AccTensor:
    """int32 accumulator rows with a per-output-channel scale (last axis): real = acc * scale."""

    acc: np.ndarray
    scale: np.ndarray

    def dequant(self) -> np.ndarray:
        return (self.acc.astype(np.float64) * self.scale).astype(np.float32)


def quantize_tensor(x: np.ndarray, scale: float) -> QTensor:
    """Symmetric int8 quantization, round half to even, saturating to [-128, 127]."""
    q = np.clip(np.rint(np.asarray(x, dtype=np.float64) / scale), -128, 127).astype(np.int8)
    return QTensor(q, scale if isinstance(scale, np.ndarray) else float(scale))


def _int_gemm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """int8 x int8 -> int32 accumulate, as the array does (checked to fit int32)."""
    assert a.dtype == np.int8 and b.dtype == np.int8
    # float64 BLAS is exact here: every partial sum is an integer below 2^53 (K * 2^14 < 2^53)
    # and is far faster than numpy's integer matmul.
    if a.shape[-1] >= 1 << 38:  # pragma: no cover
        raise ExecutionError("reduction too long for exact float64 accumulation")
    acc = np.matmul(a.astype(np.float64), b.astype(np.float64))
    if acc.size and (acc.max() > 2**31 - 1 or acc.min() < -2**31):  # pragma: no cover - K < 2^17
        raise ExecutionError("int32 accumulator overflow")
    return acc.astype(np.int64).astype(np.int32)


def _as_q(x, scale: float) -> QTensor:
    return x if isinstance(x, QTensor) else quantize_tensor(x, scale)


def _as_float(x) -> np.ndarray | None:
    if x is None:
        return None
    return x.dequant() if isinstance(x, (QTensor, AccTensor)) else x


Int8Kernel = Callable[..., object]
#: op -> fn(ctx, node, *inputs) -> QTensor or float array. ``ctx`` is the quantized graph.
INT8_OPS: dict[str, Int8Kernel] = {}


def register_int8_op(op: str):
    """Decorator: make ``fn(qgraph, node, *inputs)`` the int8 implementation of ``op``."""
    def deco(fn):
        INT8_OPS[op] = fn
        return fn
    return deco


def digit_split(x: np.ndarray, scale: float) -> QTensor:
    """Int32 values at ``scale`` as a two-digit tensor, the way the vector unit splits them:
    ``hi = vmap scale(x, 1/16)`` (round half to even, int8), ``-16 hi`` by ``vbin mul`` with a
    row of -16, ``lo = vbin add(x, -16 hi)`` (int8). ``16 hi + lo == x`` for |x| <= 2047 + 8;
    beyond, both digits saturate."""
    x = np.asarray(x, dtype=np.int64)
    hi = vec_scale(x, DIGIT_HI_WORD, INT8)
    lo = vec_add(x, vec_mul(hi, np.int64(-DIGIT_BASE), _UNIT_WORD, INT32), _UNIT_WORD, _UNIT_WORD, INT8)
    scale = scale if isinstance(scale, np.ndarray) else float(scale)
    return QTensor((DIGIT_BASE * hi + lo).astype(np.int32), scale, digits=(hi.astype(np.int8), lo.astype(np.int8)))


def digit_channels(x: np.ndarray, factors: np.ndarray | None) -> np.ndarray:
    """Per-channel digit scales: ``vbin mul`` of the int32 values (at the fine scale) by the int8
    factor of each channel (last axis), rounded by ``2^DIGIT_FINE_SHIFT``; identity without factors."""
    if factors is None:
        return x
    return vec_mul(x, np.asarray(factors, np.int64), DIGIT_FINE_WORD, INT32)


def digit_gemm(digits: tuple[np.ndarray, np.ndarray], w: np.ndarray) -> np.ndarray:
    """The GEMM of a two-digit input: both digits through the same weights, then
    ``vbin add`` ``16 acc_hi + acc_lo`` (int32, saturating)."""
    hi, lo = digits
    return vec_add(_int_gemm(hi, w), _int_gemm(lo, w), DIGIT_BASE_WORD, _UNIT_WORD, INT32).astype(np.int32)


@register_int8_op("Linear")
def _int8_linear(qg, node: Node, x, w=None, b=None):
    p = qg.linears[node.name]
    if p.in_digits:
        if not (isinstance(x, QTensor) and x.digits is not None):
            x = digit_split(np.rint(np.asarray(_as_float(x), np.float64) / p.in_scale), p.in_scale)
        if not np.allclose(x.scale, p.in_scale, rtol=1e-12, atol=0):
            raise ExecutionError(f"{node.name}: input scale differs from the planned one")
        acc = digit_gemm(x.digits, p.weight)
    else:
        xq = _as_q(x, p.in_scale)
        if not np.allclose(xq.scale, p.in_scale, rtol=1e-12, atol=0):
            raise ExecutionError(f"{node.name}: input scale differs from the planned one")
        acc = _int_gemm(xq.q, p.weight)  # [..., K] @ [K, N] -> int32
    if p.output == "int32":  # epilogue on the vector unit: accumulator + bias, no requant
        total = acc.astype(np.int64) + p.bias
        return AccTensor(total.astype(np.int32), p.acc_in_scale * p.w_scale.astype(np.float64))
    if p.output == "wide":  # ``vbin mul`` by the columns' factors: one int32 scale for the residual
        if np.any(p.bias):  # ``vbin add`` of the bias rows, then the factors
            acc = vec_add(acc, np.asarray(p.bias, np.int64), _UNIT_WORD, _UNIT_WORD, INT32)
        return AccTensor(vec_mul(acc, p.wide_factors.astype(np.int64), p.wide_word, INT32).astype(np.int32),
                         np.float64(p.out_scale))
    return QTensor(requantize(acc, p.bias, p.scale_words), p.out_scale)


@register_int8_op("MatMul")
def _int8_matmul(qg, node: Node, a, b):
    p = qg.matmuls[node.name]
    aq, bq = _as_q(a, p.a_scale), _as_q(b, p.b_scale)
    acc = _int_gemm(aq.q, bq.q)
    return QTensor(requantize(acc, np.zeros(p.scale_words.shape, np.int64), p.scale_words), p.out_scale)


def softmax_placeholder(scores_int32: np.ndarray, score_scale: float, mask: np.ndarray | None) -> QTensor:
    """Float softmax quantized to int8 at 1/127 (kept for comparisons; :func:`run_int8` uses
    the vector unit's integer softmax)."""
    s = scores_int32.astype(np.float64) * score_scale
    if mask is not None:
        s = s + mask
    p = _softmax(s, -1)
    return QTensor(np.clip(np.rint(p * 127.0), 0, 127).astype(np.int8), 1.0 / 127.0)


def key_lengths(mask: np.ndarray | None, batch: int, kv: int) -> np.ndarray:
    """Valid key count per batch item from an additive attention-mask bias broadcastable to
    ``[B, H, S, S_kv]``: keys with a bias above -1 are valid. The device's softmax masks by
    length (``j < kv_len``), so the valid keys must be a prefix, the same for every query row."""
    if mask is None:
        return np.full(batch, kv, dtype=np.int64)
    m = np.asarray(mask, dtype=np.float64)
    m = m.reshape((1,) * (4 - m.ndim) + m.shape)
    valid = np.broadcast_to(m > -1.0, (max(batch, m.shape[0]),) + m.shape[1:3] + (kv,))
    if valid.shape[1] != 1 or valid.shape[2] != 1:
        if not np.all(valid == valid[:, :1, :1, :]):
            raise ExecutionError("attention mask differs between heads or query rows; only a key-padding mask "
                                 "(the same valid keys for every query) is supported on the device")
    valid = np.broadcast_to(valid[:, 0, 0, :], (batch, kv))
    lengths = valid.sum(axis=-1)
    prefix = np.arange(kv)[None, :] < lengths[:, None]
    if not np.array_equal(valid, prefix):
        raise ExecutionError("attention mask is not a key-padding prefix (valid tokens first, padding last)")
    return lengths.astype(np.int64)


def _prob_gemm(probs: np.ndarray, v: np.ndarray, digits: bool) -> np.ndarray:
    """``P v``: int8 probabilities through the array, or a wide softmax's (0..2047) split into two
    int8 digits and combined as ``16 acc_hi + acc_lo`` (:func:`digit_gemm`)."""
    if digits:
        return digit_gemm(digit_split(probs, 1.0).digits, v)
    return _int_gemm(probs.astype(np.int8), v)


@register_int8_op("Attention")
def _int8_attention(qg, node: Node, q, k, v, mask=None):
    """Per head: scores = q_h k_h^T (int8 GEMM, int32 out), the vector unit's integer softmax
    (``vrow softmax``, key-padding mask by length, int8 probabilities at 1/127 or two-digit at
    1/2047), ctx = P v_h (int8 GEMM, requantized per output channel)."""
    p = qg.attentions[node.name]
    qq, kq, vq = _as_q(q, p.q_scale), _as_q(k, p.k_scale), _as_q(v, p.v_scale)
    H = node.attrs["num_heads"]
    B, S, D = qq.q.shape
    Skv = kq.q.shape[1]
    qh = qq.q.reshape(B, S, H, D // H).transpose(0, 2, 1, 3)
    kh = kq.q.reshape(B, Skv, H, D // H).transpose(0, 2, 1, 3)
    vh = vq.q.reshape(B, Skv, H, vq.q.shape[2] // H).transpose(0, 2, 1, 3)
    scores = _int_gemm(qh, kh.transpose(0, 1, 3, 2))
    lengths = key_lengths(None if mask is None else _as_float(mask), B, Skv)
    probs = np.empty(scores.shape, dtype=np.int64)
    for b in range(B):
        valid = softmax_mask(S, Skv, int(lengths[b]), False, 0)
        probs[b] = softmax_rows(scores[b], p.softmax_word, valid[None], wide=p.prob_digits)
    acc = _prob_gemm(probs, vh, p.prob_digits)
    words = p.scale_words
    if words.size > 1:  # per output channel c = h * dh + j
        words = words.reshape(H, 1, -1)
    out = requantize(acc, np.zeros(1, np.int64), words)
    return QTensor(out.transpose(0, 2, 1, 3).reshape(B, S, -1), p.out_scale)


def vector_input(x, src) -> np.ndarray:
    """The integers a vector op reads for an input described by ``src``
    (:class:`~weft.compiler.quantize.VecIn`): int8 rows, int32 accumulator rows, a per-channel
    int8 tensor widened by ``vbin mul`` with its per-channel factors, or a host float tensor
    converted as the bundle's input tensor converts it (round half to even, saturate)."""
    if isinstance(x, QTensor):
        q = x.twin.q if src.twin else x.q
        if src.kind == "widen":
            return vec_mul(q, src.factors.astype(np.int64), _UNIT_WORD, INT32)
        return q.astype(np.int64)
    if isinstance(x, AccTensor):
        return x.acc.astype(np.int64)
    lo, hi = (-2**31, 2**31 - 1) if src.kind == "int32" else (-128, 127)
    return np.clip(np.rint(np.asarray(x, dtype=np.float64) / src.scale), lo, hi).astype(np.int64)


_UNIT_WORD = 1  # scale word with multiplier 1, shift 0: y = a * b exactly
DIGIT_BASE_WORD = int(pack_scale_word(DIGIT_BASE, 0))  # y = 16 a
DIGIT_HI_WORD = int(pack_scale_word(1, 4))  # y = rhe(a / 16)
DIGIT_FINE_WORD = int(pack_scale_word(1, DIGIT_FINE_SHIFT))  # y = rhe(a * f / 2^DIGIT_FINE_SHIFT)


def _layernorm_int(p, x: np.ndarray) -> QTensor:
    """One output of ``vrow layernorm``: int8, or int32 (``vrow`` wide: ``p.wide`` keeps it,
    ``p.digits`` splits it into two digits)."""
    L = x.shape[-1]
    y = layernorm_rows(x.reshape(-1, L), p.shift, p.gain, p.bias, INT32 if p.wide or p.digits else INT8)
    y = y.reshape(x.shape)
    if p.digits:
        return digit_split(y, p.out_scale)
    return QTensor(y.astype(np.int32 if p.wide else np.int8), p.out_scale)


@register_int8_op("LayerNorm")
def _int8_layernorm(qg, node: Node, x, gamma=None, beta=None):
    """``vrow layernorm`` over the last axis -> int8 (per-tensor or per-channel scale), two
    digits, or int32; a second copy (int8 with other scales, or int32) when vector ops read it
    too."""
    p = qg.norms[node.name]
    xi = vector_input(x, p.src)
    out = _layernorm_int(p, xi)
    if p.twin is not None:
        out.twin = _layernorm_int(p.twin, xi)
    return out


@register_int8_op("Gelu")
def _int8_gelu(qg, node: Node, x):
    """``vmap gelu`` (coefficient-ROM Phi) -> int8, or -> int32 then REQUANT per channel."""
    p = qg.gelus[node.name]
    xi = vector_input(x, p.src)
    if p.digits:
        return digit_split(digit_channels(vec_gelu(xi, p.word_in, p.word_out, INT32), p.digit_factors), p.out_scale)
    if p.requant_words is None:
        return QTensor(vec_gelu(xi, p.word_in, p.word_out, INT8).astype(np.int8), p.out_scale)
    mid = vec_gelu(xi, p.word_in, p.word_out, INT32)
    return QTensor(requantize(mid, np.zeros(1, np.int64), p.requant_words), p.out_scale)


@register_int8_op("Add")
def _int8_add(qg, node: Node, a, b):
    """``vbin add`` of two operands (int8 or widened int32) -> int32 accumulator rows (a wide
    residual sum) or int8."""
    p = qg.adds.get(node.name)
    if p is None:
        return _placeholder("Add")(qg, node, a, b)
    ai, bi = vector_input(a, p.a), vector_input(b, p.b)
    if p.output == "int32":
        return AccTensor(vec_add(ai, bi, p.word_a, p.word_b, INT32).astype(np.int32), np.float64(p.out_scale))
    return QTensor(vec_add(ai, bi, p.word_a, p.word_b, INT8).astype(np.int8), p.out_scale)


@register_int8_op("RMSNorm")
def _int8_rmsnorm(qg, node: Node, x, w=None):
    """``vrow rmsnorm`` over the last axis -> int8 (per-tensor or per-channel gains), or int32
    (``vrow`` wide) split into two digits."""
    p = qg.norms[node.name]
    xi = vector_input(x, p.src)
    L = xi.shape[-1]
    if p.digits:
        return digit_split(rmsnorm_rows(xi.reshape(-1, L), p.shift, p.gain, INT32).reshape(xi.shape), p.out_scale)
    return QTensor(rmsnorm_rows(xi.reshape(-1, L), p.shift, p.gain).reshape(xi.shape).astype(np.int8), p.out_scale)


def rope_interleave(d: int) -> np.ndarray:
    """Permutation of a head's last axis from rotate-half pairs (i, i + d/2) to the vector unit's
    interleaved pairs (2i, 2i + 1): ``x[..., perm]`` is interleaved."""
    h = d // 2
    perm = np.empty(d, dtype=np.int64)
    perm[0::2] = np.arange(h)
    perm[1::2] = np.arange(h) + h
    return perm


def rope_device_table(cos: np.ndarray, sin: np.ndarray, frac_bits: int = 14) -> np.ndarray:
    """The ``vbin rope`` table (int32, interleaved cos/sin in Q.frac_bits) from rotate-half cos/sin
    rows ``[..., D]`` (the halves of each row are equal)."""
    cos = np.asarray(cos, dtype=np.float64)
    sin = np.asarray(sin, dtype=np.float64)
    h = cos.shape[-1] // 2
    t = np.empty(cos.shape, dtype=np.int64)
    t[..., 0::2] = np.rint(cos[..., :h] * (1 << frac_bits))
    t[..., 1::2] = np.rint(sin[..., :h] * (1 << frac_bits))
    return t


@register_int8_op("Rope")
def _int8_rope(qg, node: Node, x, cos, sin):
    """``vbin rope`` on the head dimension permuted to interleaved pairs (on the device the
    permutation is folded into the q/k projection's weight columns; it moves integers, so the
    values here are the device's), table Q.14 from the cos/sin rows."""
    p = qg.ropes[node.name]
    xq = _as_q(x, p.in_scale)
    D = xq.q.shape[-1]
    perm = rope_interleave(D)
    table = rope_device_table(_as_float(cos), _as_float(sin))
    y = vec_rope(xq.q[..., perm].astype(np.int64), np.broadcast_to(table, xq.q.shape), p.word, INT8)
    out = np.empty_like(y)
    out[..., perm] = y
    return QTensor(out.astype(np.int8), p.out_scale)


@register_int8_op("GQAttention")
def _int8_gqa(qg, node: Node, q, k, v, mask=None):
    """Per KV head g, its G query heads stacked as G*S rows: scores = q k_g^T (int8 GEMM, int32),
    ``vrow softmax`` (causal offset and/or kv_len prefix), int8 probabilities at 1/127 or
    two-digit at 1/2047, ctx = P v_g requantized."""
    p = qg.gqas[node.name]
    qq, kq, vq = _as_q(q, p.q_scale), _as_q(k, p.k_scale), _as_q(v, p.v_scale)
    B, H, S, D = qq.q.shape
    KV, Skv = kq.q.shape[1], kq.q.shape[2]
    G = H // KV
    scores = _int_gemm(qq.q.reshape(B, KV, G * S, D), np.swapaxes(kq.q, -1, -2))
    valid = gqa_valid(node, S, Skv, None if mask is None else _as_float(mask))
    if mask is not None:
        m = np.broadcast_to(valid, (B, KV, G, S, Skv))
        lengths = m.sum(axis=-1)
        causal = node.attrs.get("causal")
        if not causal and not np.all(m == (np.arange(Skv) < lengths[..., None])):
            raise ExecutionError(f"{node.name}: attention mask is not a key prefix (kv_len) per row")
    valid = np.broadcast_to(valid, (B, KV, G, S, Skv)).reshape(B, KV, G * S, Skv)
    probs = softmax_rows(scores, p.softmax_word, valid, wide=p.prob_digits)
    acc = _prob_gemm(probs, vq.q, p.prob_digits)
    out = requantize(acc, np.zeros(1, np.int64), p.scale_words)
    return QTensor(out.reshape(B, H, S, D), p.out_scale)


@register_int8_op("SwiGLU")
def _int8_swiglu(qg, node: Node, gate, up):
    """``vmap silu`` (gate -> int32), ``vbin mul`` by up (int8) -> int8, or -> int32 then REQUANT
    per column."""
    p = qg.swiglus[node.name]
    g = vector_input(gate, p.gate)
    uq = _as_q(up, p.up_scale).q.astype(np.int64)
    mid = vec_silu(g, p.silu_in, p.silu_out, INT32)
    if p.digits:
        return digit_split(digit_channels(vec_mul(mid, uq, p.mul_word, INT32), p.digit_factors), p.out_scale)
    if p.requant_words is None:
        return QTensor(vec_mul(mid, uq, p.mul_word, INT8).astype(np.int8), p.out_scale)
    prod = vec_mul(mid, uq, p.mul_word, INT32)
    return QTensor(requantize(prod, np.zeros(1, np.int64), p.requant_words), p.out_scale)


def _placeholder(op: str):
    """Float stand-in for a device op with no integer lowering (e.g. a standalone Softmax or an
    elementwise Mul): dequantize, float kernel, quantize to the output scale. The back end
    refuses such ops; the emulation keeps them runnable for studies."""
    def run(qg, node: Node, *args):
        out = float_kernel(node, [_as_float(a) for a in args])
        scale = qg.act_scales.get(node.outputs[0])
        if node.outputs[0] in qg.wide:  # stays in the vector unit's wide precision
            return out
        if scale is None or not np.issubdtype(out.dtype, np.floating):
            return out
        return quantize_tensor(out, scale)
    run.__name__ = f"placeholder_{op}"
    return run


for _op in ("Softmax", "Sub", "Mul", "Div", "FakeQuant"):
    INT8_OPS[_op] = _placeholder(_op)


def _layout(qg, node: Node, x):
    if isinstance(x, QTensor):
        return QTensor(float_kernel(node, [x.q]), x.scale)
    return float_kernel(node, [x])


for _op in ("Reshape", "Transpose", "Expand", "Pad"):
    INT8_OPS[_op] = _layout


def _host(qg, node: Node, *args):
    return float_kernel(node, [_as_float(a) for a in args])


for _op in ("Cast", "Gather", "Compare", "Not", "Where"):
    INT8_OPS[_op] = _host


@register_int8_op("CacheWrite")
def _int8_cache_write(qg, node: Node, past, new, write):
    """Store this step's int8 K/V row into the cache slot (same scale: the quantizer ties the
    cache's, the new row's and the past input's scales)."""
    s = qg.act_scales[node.outputs[0]]
    pq, nq = _as_q(past, s), _as_q(new, s)
    if not (np.isclose(pq.scale, s) and np.isclose(nq.scale, s)):
        raise ExecutionError(f"{node.name}: cache and new row scales differ ({pq.scale}, {nq.scale}, {s})")
    w = np.asarray(_as_float(write), dtype=bool)
    return QTensor(np.where(w, nq.q, pq.q).astype(np.int8), s)


def run_int8(qgraph, feeds: Mapping[str, np.ndarray], *, keep: bool = False) -> dict[str, np.ndarray]:
    """Run a :class:`~weft.compiler.quantize.QuantizedGraph` in int8 emulation. Host nodes run
    in float; device nodes use :data:`INT8_OPS`. Graph outputs come back dequantized (float32)."""
    graph: Graph = qgraph.graph
    env: dict[str, object] = dict(_feeds(graph, feeds))
    env.update(graph.consts)
    for node in graph.nodes:
        args = [env[i] if i is not None else None for i in node.inputs]
        if node.device == "host":
            out = _host(qgraph, node, *args)
        else:
            fn = INT8_OPS.get(node.op)
            if fn is None:
                raise ExecutionError(f"node {node.name}: no int8 implementation for op {node.op}")
            out = fn(qgraph, node, *args)
        env[node.outputs[0]] = out
    if keep:
        return {k: _as_float(v) for k, v in env.items()}
    return {o.name: _as_float(env[o.name]) for o in graph.outputs}
