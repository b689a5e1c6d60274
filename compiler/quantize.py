"""Post-training int8 quantization of an IR graph.

Scheme (what the hardware computes, :mod:`weft.compiler.reference` ``run_int8`` emulates it):

* **Weights** (``Linear``): int8, symmetric, per output channel:
  ``s_w[n] = max_k |W[k, n]| / 127``, ``W_q = round_half_even(W / s_w)``. From a QDQ or
  weight-only int8 model the model's own int8 values and scales are used unchanged.
* **Activations**: int8, symmetric, one scale per tensor, calibrated on sample inputs
  (:func:`calibrate`): the float executor runs every calibration batch and an observer
  records, for each tensor, its running absolute maximum and a random subsample of
  ``|x|`` (up to 4096 values per batch). The clipping threshold ``c`` (scale ``c / 127``) is

  - ``"max"``: the largest ``|x|`` seen over all batches;
  - ``"percentile"``: the ``percentile`` (default 99.99) of the pooled ``|x|`` samples;
  - ``"mse"``: the ``c`` in a grid of 64 values between 0.2 max and max that minimises the
    mean squared quantization error (clip + round) over the pooled samples.

  A ``FakeQuant`` node (from a QDQ pair) fixes the scale of its output and of its input.
* **Bias**: int32 at scale ``s_in * s_w[n]``: ``b_q = round(b / (s_in s_w[n]))``.
* **Requantization** of each GEMM's int32 accumulator to its int8 output: per output channel
  ``M[n] = s_in s_w[n] / s_out`` as a fixed-point multiplier and shift
  (:func:`weft.hw.vector_numerics.fixed_point_scale`) packed into REQUANT scale words.
* **Attention**: ``q k^T`` is an int8 x int8 GEMM with int32 output (no requant; the softmax
  reads the int32 scores at scale ``s_q s_k * scale``); the probabilities are int8 at scale
  1/127 (0..127); ``P v`` is requantized to the context's scale ``s_p s_v / s_ctx``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np

from weft.hw.vector_numerics import fixed_point_scale, pack_scale_word

from .ir import Graph, Node
from .reference import run_float, softmax_placeholder

__all__ = ["QuantizeError", "CALIBRATION_METHODS", "LinearParams", "MatMulParams", "AttentionParams",
           "QuantizedGraph", "Calibrator", "calibrate", "quantize", "quantize_weight", "scale_words"]

CALIBRATION_METHODS = ("max", "percentile", "mse")
PROB_SCALE = 1.0 / 127.0


class QuantizeError(ValueError):
    pass


@dataclass
class LinearParams:
    weight: np.ndarray  # int8 [K, N]
    w_scale: np.ndarray  # float [N]
    bias: np.ndarray  # int32 [N]
    in_scale: float
    out_scale: float
    scale_words: np.ndarray  # int32 [N]
    output: str = "int8"  # "int32": raw accumulators (+ bias) handed to the vector unit
    acc_in_scale: float = 0.0  # input scale folded into the accumulator scale (1.0 if per-channel)


@dataclass
class MatMulParams:
    a_scale: float
    b_scale: float
    out_scale: float
    scale_words: np.ndarray  # int32 [1]


@dataclass
class AttentionParams:
    q_scale: float
    k_scale: float
    v_scale: float
    out_scale: float
    prob_scale: float
    scale_words: np.ndarray  # int32 [1]: P @ v -> context


@dataclass
class QuantizedGraph:
    graph: Graph
    act_scales: dict[str, float]
    linears: dict[str, LinearParams] = field(default_factory=dict)
    matmuls: dict[str, MatMulParams] = field(default_factory=dict)
    attentions: dict[str, AttentionParams] = field(default_factory=dict)
    method: str = "max"
    #: values the vector unit keeps wide (int32 accumulators / its internal precision), not int8
    wide: set[str] = field(default_factory=set)
    #: the vector unit's softmax: (int32 scores, score scale, float mask) -> QTensor (0..127 at 1/127)
    softmax_impl: Callable = softmax_placeholder


def scale_words(real_scale: np.ndarray | float) -> np.ndarray:
    """REQUANT scale words for real multipliers (per channel)."""
    mult, shift = fixed_point_scale(np.atleast_1d(np.asarray(real_scale, dtype=np.float64)))
    return pack_scale_word(mult, shift)


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8: ``w [K, N] -> (int8 [K, N], scale [N])``."""
    w = np.asarray(w, dtype=np.float64)
    amax = np.max(np.abs(w), axis=0)
    scale = np.where(amax > 0, amax / 127.0, 1.0)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


class Calibrator:
    """Collects per-tensor statistics from float runs (see the module docstring)."""

    def __init__(self, graph: Graph, samples_per_batch: int = 4096, seed: int = 0):
        self.graph = graph
        self.samples = samples_per_batch
        self.rng = np.random.default_rng(seed)
        self.amax: dict[str, float] = {}
        self.chan_amax: dict[str, np.ndarray] = {}  # per last-axis channel
        self.pool: dict[str, list[np.ndarray]] = {}
        self.batches = 0

    def _observe(self, node: Node, name: str, x: np.ndarray) -> None:
        if not np.issubdtype(x.dtype, np.floating):
            return
        if x.ndim >= 2:
            ch = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0)
            prev = self.chan_amax.get(name)
            self.chan_amax[name] = ch if prev is None or prev.shape != ch.shape else np.maximum(prev, ch)
        a = np.abs(x.reshape(-1)).astype(np.float32)
        self.amax[name] = max(self.amax.get(name, 0.0), float(a.max()) if a.size else 0.0)
        if a.size > self.samples:
            a = a[self.rng.integers(0, a.size, self.samples)]
        self.pool.setdefault(name, []).append(a)

    def add(self, feeds: Mapping[str, np.ndarray]) -> None:
        for v in self.graph.inputs:  # graph inputs that a device op reads need scales too
            if v.name in feeds:
                self._observe(None, v.name, np.asarray(feeds[v.name]))
        env = run_float(self.graph, feeds, observer=self._observe)
        self.batches += 1
        return env

    def channel_scales(self, alpha: float = 0.3) -> dict[str, np.ndarray]:
        """Per-channel (last axis) scales of every observed tensor:
        ``amax_c**alpha * amax**(1 - alpha) / 127`` (``alpha`` 1: each channel's own range;
        0: the tensor's range). In between balances activation resolution against the
        resolution the folded weight rows keep (as SmoothQuant's migration strength does)."""
        out = {}
        for k, v in self.chan_amax.items():
            v = np.maximum(v.astype(np.float64), 1e-8)
            out[k] = v ** alpha * v.max() ** (1.0 - alpha) / 127.0
        return out

    def thresholds(self, method: str = "max", percentile: float = 99.99) -> dict[str, float]:
        if method not in CALIBRATION_METHODS:
            raise QuantizeError(f"unknown calibration method {method!r} (choose from {CALIBRATION_METHODS})")
        if not self.batches:
            raise QuantizeError("no calibration batches were added")
        out = {}
        for name, amax in self.amax.items():
            if method == "max":
                c = amax
            else:
                x = np.concatenate(self.pool[name]).astype(np.float64)
                if method == "percentile":
                    c = float(np.percentile(x, percentile))
                else:
                    c = _mse_threshold(x, amax)
            out[name] = max(c, 1e-8)
        return out


def _mse_threshold(x: np.ndarray, amax: float, points: int = 64) -> float:
    if amax <= 0:
        return amax
    best, best_err = amax, np.inf
    for c in np.linspace(0.2 * amax, amax, points):
        s = c / 127.0
        err = np.mean((np.clip(np.rint(x / s), -128, 127) * s - x) ** 2)
        if err < best_err:
            best, best_err = c, err
    return float(best)


def calibrate(graph: Graph, batches: Iterable[Mapping[str, np.ndarray]], method: str = "max",
              percentile: float = 99.99) -> dict[str, float]:
    """Activation scales (per tensor) from float runs over ``batches`` (see module docstring)."""
    cal = Calibrator(graph)
    for feeds in batches:
        cal.add(feeds)
    return {k: c / 127.0 for k, c in cal.thresholds(method, percentile).items()}


def wide_values(graph: Graph) -> set[str]:
    """Tensors that never exist as int8: a Linear whose every consumer is a Gelu, or a residual
    Add that feeds only LayerNorms, hands its int32 accumulator rows (+ bias) straight to the
    vector unit (a GEMM epilogue), and such a residual sum stays in the vector unit's wide
    precision up to the LayerNorm. This keeps BERT's outlier channels (residual stream |x| >
    200 next to channels below 1) out of a per-tensor int8 tensor."""
    cons = graph.consumers()
    prod = graph.producers()
    outputs = {o.name for o in graph.outputs}
    wide: set[str] = set()
    for n in graph.nodes:
        o = n.outputs[0]
        users = cons.get(o, [])
        if n.device != "device" or o in outputs or not users:
            continue
        if n.op == "Add" and all(u.op == "LayerNorm" and u.inputs[0] == o for u in users):
            wide.add(o)
    for n in graph.nodes:
        o = n.outputs[0]
        users = cons.get(o, [])
        if n.op != "Linear" or n.device != "device" or o in outputs or not users:
            continue
        if all(u.op == "Gelu" or (u.op == "Add" and u.outputs[0] in wide) for u in users):
            wide.add(o)
    return wide


def channel_scaled_values(graph: Graph, wide: set[str]) -> set[str]:
    """LayerNorm, Gelu and Attention outputs that can carry one int8 scale per channel: the
    producer's output stage requantizes per channel (the vector unit's per-channel scale words;
    for Attention the ``P v`` GEMM's per-column REQUANT), and every consumer is a Linear (which
    folds the per-channel input scale into its weight rows before quantizing them per output
    column) or a wide residual Add (which dequantizes per channel on the vector unit)."""
    cons = graph.consumers()
    outputs = {o.name for o in graph.outputs}
    out = set()
    for n in graph.nodes:
        o = n.outputs[0]
        users = cons.get(o, [])
        if n.op not in ("LayerNorm", "Gelu", "Attention") or n.device != "device" or o in outputs or not users:
            continue
        if all((u.op == "Linear" and u.inputs[0] == o) or (u.op == "Add" and u.outputs[0] in wide) for u in users):
            out.add(o)
    return out


def quantize(graph: Graph, act_scales: Mapping[str, float], *, method: str = "max",
             keep_wide: bool = True, channel_scales: Mapping[str, np.ndarray] | None = None) -> QuantizedGraph:
    """Quantize ``graph``'s device GEMMs with the given activation scales (from :func:`calibrate`).

    ``keep_wide`` (default): see :func:`wide_values`; False makes every device tensor int8.
    ``channel_scales`` (per-channel scales, e.g. ``Calibrator.channel_scales()``): used for the
    tensors :func:`channel_scaled_values` allows; None keeps every activation per tensor."""
    scales = dict(act_scales)
    prod = graph.producers()
    cons = graph.consumers()
    # FakeQuant (QDQ) fixes the scale of its output and of the tensor it reads.
    for n in graph.nodes:
        if n.op == "FakeQuant":
            if n.attrs["zero_point"] != 0:
                raise QuantizeError(f"{n.name}: only symmetric activation quantization (zero point 0) is supported")
            scales[n.outputs[0]] = n.attrs["scale"]
            src = n.inputs[0]
            if src in prod and src not in graph.consts:
                scales[src] = n.attrs["scale"]
    qg = QuantizedGraph(graph, scales, method=method)
    qg.wide = wide_values(graph) if keep_wide else set()
    if channel_scales:
        for name in channel_scaled_values(graph, qg.wide):
            if name in channel_scales:
                scales[name] = np.asarray(channel_scales[name], dtype=np.float64)

    def need(name: str, node: Node) -> float:
        s = scales.get(name)
        if s is None:
            raise QuantizeError(f"{node.name} ({node.op}): no activation scale for {name!r}; calibrate first")
        return s if isinstance(s, np.ndarray) else float(s)

    for n in graph.nodes:
        if n.device != "device":
            continue
        if n.op == "Linear":
            w = graph.consts[n.inputs[1]]
            wide = n.outputs[0] in qg.wide
            s_in = need(n.inputs[0], n)
            if isinstance(s_in, np.ndarray):  # per-channel input: fold into the weight rows
                wq, ws = quantize_weight(w.astype(np.float64) * s_in[:, None])
                in_scale = s_in
                s_in = 1.0
            elif n.inputs[1] in graph.qdq_weights:
                wq, ws = graph.qdq_weights[n.inputs[1]]
                in_scale = s_in
            else:
                wq, ws = quantize_weight(w)
                in_scale = s_in
            s_out = 1.0 if wide else need(n.outputs[0], n)
            acc_scale = s_in * ws.astype(np.float64)
            b = graph.consts[n.inputs[2]] if len(n.inputs) > 2 and n.inputs[2] is not None else np.zeros(w.shape[1])
            bq = np.clip(np.rint(b / acc_scale), -2**31, 2**31 - 1).astype(np.int32)
            words = np.zeros(w.shape[1], np.int32) if wide else scale_words(acc_scale / s_out)
            qg.linears[n.name] = LinearParams(wq, ws, bq, in_scale, s_out, words, "int32" if wide else "int8",
                                              acc_in_scale=s_in)
        elif n.op == "MatMul":
            sa, sb, so = need(n.inputs[0], n), need(n.inputs[1], n), need(n.outputs[0], n)
            qg.matmuls[n.name] = MatMulParams(sa, sb, so, scale_words(sa * sb / so))
        elif n.op == "Attention":
            sq, sk, sv = (need(i, n) for i in n.inputs[:3])
            so = need(n.outputs[0], n)
            qg.attentions[n.name] = AttentionParams(sq, sk, sv, so, PROB_SCALE,
                                                    scale_words(PROB_SCALE * sv / np.atleast_1d(so)))
    return qg
