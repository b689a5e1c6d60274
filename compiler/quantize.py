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

import math
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np

from weft.hw.vector_numerics import (add_params, fixed_point_scale, gelu_params, layernorm_params, mul_params,
                                     pack_scale_word, rmsnorm_params, rope_params, silu_params, softmax_output_scale,
                                     softmax_params)

from .ir import Graph, Node
from .reference import DIGIT_FINE_SHIFT, DIGIT_MAX, run_float

__all__ = ["QuantizeError", "CALIBRATION_METHODS", "LinearParams", "MatMulParams", "AttentionParams",
           "VecIn", "NormParams", "GeluParams", "AddParams", "QuantizedGraph", "Calibrator", "calibrate", "quantize", "quantize_weight", "scale_words"]

CALIBRATION_METHODS = ("max", "percentile", "mse")
PROB_SCALE = softmax_output_scale(False)
#: Two-digit probabilities (``quantize(prob_digits=True)``): a wide softmax's step.
PROB_DIGIT_SCALE = softmax_output_scale(False, wide=True)
#: A wide residual sum's int32 scale is the finer operand's scale / 2**WIDE_ADD_SHIFT.
WIDE_ADD_SHIFT = 4
#: A host-computed LayerNorm input (the embedding sum) goes to the device as int32 with its
#: calibrated |x| maximum at 2**HOST_WIDE_BITS.
HOST_WIDE_BITS = 20
#: A per-channel int8 tensor widened for a vector op gets the int32 scale
#: min(channel scales) / 2**WIDEN_BITS (per-channel factors >= 2**WIDEN_BITS).
WIDEN_BITS = 10
#: A residual stream kept wide across layers (an Add read by another Add, a decoder's residual
#: chain) is int32 at its calibrated |x| maximum / 2**RESIDUAL_WIDE_BITS, a fixed scale per tensor
#: (BERT's min(operand scales) / 16 would shrink by 16 per layer).
RESIDUAL_WIDE_BITS = 20
#: A norm output handed on as int32 (``quantize(norm_digits=True)``: a LayerNorm's copy for the
#: residual Adds, a LayerNorm graph output no device op reads) is at max(|x| maximum, |beta| maximum) / 2**NORM_WIDE_BITS
#: (the norm's beta words, beta / scale * 2**16, stay within int32).
NORM_WIDE_BITS = 14
#: SiLU inside SwiGLU writes int32 at the gate's scale / 2**SILU_MID_BITS (|silu(g)| <= |g|).
SILU_MID_BITS = 8
#: Fixed-point fraction bits of the RoPE cos/sin table (vector_numerics.rope_table's default).
ROPE_FRAC_BITS = 14
#: Producers that can hand a Linear two-digit input: their int32 result goes through the digit
#: split (``vmap scale``, ``vbin mul``, ``vbin add``) instead of an int8 requantization.
DIGIT_PRODUCERS = ("Gelu", "SwiGLU")


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
    output: str = "int8"  # "int32": raw accumulators (+ bias) to the host; "wide": see below
    acc_in_scale: float = 0.0  # input scale folded into the accumulator scale (1.0 if per-channel)
    in_digits: bool = False  # the input is a two-digit tensor (DIGIT_BASE * hi + lo)
    #: "wide" (``quantize(wide_linears=True)``): the weight scales are ``T * g_n`` with int8
    #: ``g_n``, so ``vbin mul`` of the accumulators by the rows of ``g`` with ``wide_word`` puts
    #: every column on the one int32 scale ``out_scale`` for the residual add.
    wide_factors: np.ndarray | None = None
    wide_word: int = 0


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
    scale_words: np.ndarray  # int32 [1] or [H*Dh]: P @ v -> context
    score_scale: float = 0.0  # real value of one unit of the int32 scores q k^T (attention scale included)
    softmax_word: int = 0  # vrow softmax scale word (softmax_params)
    prob_digits: bool = False  # wide softmax (1/2047) split into two int8 digits for P v


@dataclass
class VecIn:
    """How a vector op reads a tensor: ``int8`` (per-tensor scale), ``int32`` (wide, one
    scale) or ``widen``: a per-channel int8 tensor multiplied by per-channel int32
    ``factors`` (``vbin mul`` with the factor row repeated down the rows) into int32 at the one
    fine ``scale``. ``twin``: read the producer's per-tensor-twin copy."""

    kind: str
    scale: float
    factors: np.ndarray | None = None  # int32 [C] for "widen"
    twin: bool = False


@dataclass
class NormParams:
    """``vrow layernorm``: int8 output at ``out_scale`` (per tensor or per channel) with the
    integer shift / gains / biases of :func:`layernorm_params`."""

    src: VecIn
    out_scale: float | np.ndarray
    shift: int
    gain: np.ndarray  # int32 [L]
    bias: np.ndarray  # int32 [L]
    twin: "NormParams | None" = None  # second output with other (per-channel) scales, for vector consumers
    digits: bool = False  # int32 (``vrow`` wide) at ``out_scale``, then the digit split
    wide: bool = False  # int32 (``vrow`` wide) at ``out_scale``, stored as int32 (the twin, a graph output)


@dataclass
class GeluParams:
    """``vmap gelu``. Per-tensor output: int8 directly. Per-channel output: int32 at
    ``mid_scale`` into the accumulator, then REQUANT with ``requant_words`` per channel."""

    src: VecIn
    out_scale: float | np.ndarray
    word_in: int
    word_out: int
    mid_scale: float | None = None
    requant_words: np.ndarray | None = None
    digits: bool = False  # int32 straight at ``out_scale``, then the digit split
    digit_factors: np.ndarray | None = None  # per channel: int32 at a fine scale times these, then the split


@dataclass
class AddParams:
    """``vbin add`` of two operands (each int8, or widened to int32) into int8 (scratchpad)
    or int32 (``output == "int32"``: a wide residual sum in accumulator rows)."""

    a: VecIn
    b: VecIn
    out_scale: float
    word_a: int
    word_b: int
    output: str


@dataclass
class RopeParams:
    """``vbin rope``: int8 in at ``in_scale``, int8 out at ``out_scale``; the cos/sin table (Q.14)
    is built from the node's cos/sin inputs (rotate-half pairs (i, i + D/2) become the vector
    unit's interleaved pairs by a fixed permutation of the head dimension)."""

    in_scale: float
    out_scale: float
    word: int


@dataclass
class GQAParams:
    """Grouped-query attention: int8 q, k, v per tensor; int32 scores at ``score_scale``;
    ``vrow softmax`` (causal and/or kv_len masks) -> int8 probabilities at 1/127, or with
    ``prob_digits`` int32 at 1/2047 split into two int8 digits; ``P v`` requantized with
    ``scale_words`` to ``out_scale``."""

    q_scale: float
    k_scale: float
    v_scale: float
    out_scale: float
    score_scale: float
    softmax_word: int
    scale_words: np.ndarray
    prob_digits: bool = False


@dataclass
class SwiGLUParams:
    """``vmap silu`` (gate int8, or per channel widened to int32 -> int32 at ``mid_scale``),
    then ``vbin mul`` with ``up`` (int8) -> int8 at ``out_scale`` (per tensor), or -> int32 at
    ``mul_scale`` and REQUANT per column (a per-channel output or ``up``; channel c of the
    product is at ``mul_scale * up_scale[c] / max(up_scale)``), or the digit split."""

    gate: VecIn
    up_scale: float | np.ndarray
    out_scale: float | np.ndarray
    mid_scale: float
    silu_in: int
    silu_out: int
    mul_word: int
    mul_scale: float | None = None
    requant_words: np.ndarray | None = None
    digits: bool = False  # ``vbin mul`` into int32 at ``out_scale``, then the digit split
    digit_factors: np.ndarray | None = None  # per channel: as GeluParams.digit_factors


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
    norms: dict[str, NormParams] = field(default_factory=dict)
    gelus: dict[str, GeluParams] = field(default_factory=dict)
    adds: dict[str, AddParams] = field(default_factory=dict)
    #: LayerNorm outputs with a second int8 copy for their vector-op consumers: name -> its scales
    twins: dict[str, np.ndarray] = field(default_factory=dict)
    #: LayerNorm outputs whose vector-op consumers read an int32 copy (``norm_digits``): name -> its scale
    wide_twins: dict[str, float] = field(default_factory=dict)
    #: host-computed values a device op reads: name -> ("int8" | "int32", scale) or ("kv_len", None)
    device_inputs: dict[str, tuple[str, float | None]] = field(default_factory=dict)
    ropes: dict[str, RopeParams] = field(default_factory=dict)
    gqas: dict[str, GQAParams] = field(default_factory=dict)
    swiglus: dict[str, SwiGLUParams] = field(default_factory=dict)
    #: two-digit tensors (``DIGIT_BASE * hi + lo``): producer output -> scale (per tensor or per channel)
    digits: dict[str, float | np.ndarray] = field(default_factory=dict)
    #: Linear outputs handed to the int32 residual (``wide_linears``): name -> their int32 scale
    wide_linears: dict[str, float] = field(default_factory=dict)


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


def quantize_weight_factored(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Per-output-channel int8 with scales ``T * g_n``, ``g_n`` integers in 1..127 and ``T`` the
    largest ideal scale / 127: each column's scale is coarser than its own max would give by
    less than ``T`` (a fraction under ``1 / (g_n - 1)``; a column more than 127x below the
    largest gets ``T``), and accumulators times ``g_n`` share one scale. Returns (int8 [K, N],
    scales [N], g [N] int8, T)."""
    w = np.asarray(w, dtype=np.float64)
    amax = np.max(np.abs(w), axis=0)
    ideal = np.where(amax > 0, amax / 127.0, 0.0)
    t = float(ideal.max()) / 127.0 if ideal.max() > 0 else 1.0 / 127.0
    g = np.clip(np.ceil(ideal / t * (1 - 1e-12)), 1, 127).astype(np.int64)
    scale = t * g
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale, g.astype(np.int8), t


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
    """Tensors that never exist as int8: a device ``Add`` whose every consumer is a LayerNorm
    (BERT's residual sum) is produced by ``vbin add`` into int32 accumulator rows at a fine
    scale and read by the LayerNorm's ``vrow`` from there. This keeps the residual stream's
    outlier channels (|x| > 200 next to channels below 1) out of an int8 tensor.

    (A ``Linear`` is never wide: its int32 accumulators carry one scale per output channel
    (per-channel weights), and no vector operation takes per-channel input scales, so each
    GEMM requantizes to int8 with REQUANT's per-channel scale words; a vector op that reads a
    per-channel int8 tensor first widens it to one int32 scale, :class:`VecIn`.)"""
    cons = graph.consumers()
    outputs = {o.name for o in graph.outputs}
    wide: set[str] = set()
    for n in graph.nodes:
        o = n.outputs[0]
        users = cons.get(o, [])
        if n.device != "device" or o in outputs or not users:
            continue
        if n.op == "Add" and all(u.op in NORM_OPS and u.inputs[0] == o or u.op == "Add" for u in users):
            wide.add(o)
    return wide


NORM_OPS = ("LayerNorm", "RMSNorm")


def residual_chain(graph: Graph, wide: set[str]) -> set[str]:
    """Wide Adds that another Add reads (a decoder's residual stream): they get a fixed int32
    scale (:data:`RESIDUAL_WIDE_BITS`) instead of BERT's min(operand scales) / 16."""
    cons = graph.consumers()
    chain = {o for o in wide if any(u.op == "Add" for u in cons.get(o, []))}
    for n in graph.nodes:  # the last sum of a chain (read only by the final norm) too
        if n.op == "Add" and n.outputs[0] in wide and any(i in chain for i in n.inputs[:2]):
            chain.add(n.outputs[0])
    return chain


#: Producers whose output stage can scale each channel on its own: REQUANT's per-column
#: scale words (Linear, Attention's ``P v``, GELU through an int32 intermediate) or
#: LayerNorm's per-channel gain and bias words.
CHANNEL_PRODUCERS = ("Linear", "LayerNorm", "Gelu", "Attention", "RMSNorm", "SwiGLU")
#: Consumers that accept a per-channel int8 input: a Linear folds the scales into its weight
#: rows; the vector ops widen it to int32 first (``vbin mul`` by per-channel factors). SwiGLU
#: widens its gate and multiplies its up input as it is (a product with one scale per channel,
#: which the per-column REQUANT or the digit factors after it absorb).
CHANNEL_CONSUMERS = ("Linear", "Add", "Gelu", "LayerNorm", "RMSNorm", "SwiGLU")
#: Consumers whose per-channel inputs take the smoothed ``channel_scales`` (alpha) rather than
#: ``vector_channel_scales``: SwiGLU's gate and up are Linear outputs with a few large channels,
#: and scales at each channel's own calibrated max clip channels the small calibration set
#: rarely excites (SmolLM2: teacher-forced agreement 85% with those against 96% at alpha 0.5,
#: a PyTorch study with only the gate and up quantized).
SMOOTHED_CONSUMERS = ("Linear", "SwiGLU")


def channel_scaled_values(graph: Graph, wide: set[str]) -> set[str]:
    """Device tensors that carry one int8 scale per channel (last axis): produced by one of
    :data:`CHANNEL_PRODUCERS` and read only by :data:`CHANNEL_CONSUMERS` (an Attention needs
    per-tensor q, k and v; graph outputs stay per tensor)."""
    cons = graph.consumers()
    outputs = {o.name for o in graph.outputs}
    out = set()
    for n in graph.nodes:
        o = n.outputs[0]
        users = cons.get(o, [])
        if n.op not in CHANNEL_PRODUCERS or n.device != "device" or o in outputs or not users or o in wide:
            continue
        if all(u.op in CHANNEL_CONSUMERS and u.inputs[0] == o or (u.op in ("Add", "SwiGLU") and o in u.inputs[:2])
               for u in users):
            out.add(o)
    return out


def _read_only_by_linears(graph: Graph, ops: Iterable[str]) -> set[str]:
    """Outputs of device nodes of ``ops`` (not graph outputs) whose every reader is a Linear's input."""
    cons = graph.consumers()
    outputs = {o.name for o in graph.outputs}
    return {n.outputs[0] for n in graph.nodes
            if n.op in ops and n.device == "device" and n.outputs[0] not in outputs
            and cons.get(n.outputs[0]) and all(u.op == "Linear" and u.inputs[0] == n.outputs[0]
                                               for u in cons[n.outputs[0]])}


def digit_values(graph: Graph) -> set[str]:
    """Outputs of :data:`DIGIT_PRODUCERS` read only by Linears (the FFN's down projection input:
    GELU or SwiGLU): held as two int8 digits, 16x the resolution of int8, at the cost of a
    second pass of their rows through the consumer's weights (a one-row GEMV streams its
    weights once for both digits)."""
    return _read_only_by_linears(graph, DIGIT_PRODUCERS)


def norm_digit_values(graph: Graph) -> set[str]:
    """Norm outputs that become two-digit tensors with ``quantize(norm_digits=True)``: RMSNorm
    outputs read only by Linears (a pre-norm decoder's q/k/v and gate/up inputs), and LayerNorm
    outputs read by Linears and residual Adds (a post-norm encoder's: the Linears read the two
    digits, the Adds an int32 copy, :data:`NORM_WIDE_BITS`)."""
    cons = graph.consumers()
    outputs = {o.name for o in graph.outputs}
    post_norm = set()
    for n in graph.nodes:
        o = n.outputs[0]
        users = cons.get(o, [])
        if n.op == "LayerNorm" and n.device == "device" and o not in outputs and \
                any(u.op == "Linear" for u in users) and \
                all(u.op == "Linear" and u.inputs[0] == o or u.op == "Add" for u in users):
            post_norm.add(o)
    return _read_only_by_linears(graph, ("RMSNorm",)) | post_norm


def _digit_scales(target: np.ndarray, ratio: np.ndarray | None = None) -> tuple[float, np.ndarray, np.ndarray]:
    """Per-channel two-digit scales the vector unit can produce: the producer's int32 holds
    channel c at ``fine * r_c`` (``ratio``, default 1: one fine scale; less where an input of
    the producer has per-channel scales); times an int8 factor ``f_c = min(127, floor(K r_c /
    t_c))`` with ``K = max_c t_c / r_c``, rounded by ``2^DIGIT_FINE_SHIFT`` (``vbin mul``), that
    gives the channel at ``K r_c / f_c``: never finer than ``target`` (so values stay in range),
    at most ``1 / f_c`` coarser. Returns (fine = K / 2^DIGIT_FINE_SHIFT, int8 factors, the
    channels' scales)."""
    target = np.maximum(np.asarray(target, dtype=np.float64), 1e-12)
    r = np.ones_like(target) if ratio is None else np.broadcast_to(np.asarray(ratio, dtype=np.float64), target.shape)
    k = float((target / r).max())
    factors = np.clip(np.floor(k * r / target * (1 + 1e-12)), 1, 127).astype(np.int64)
    return k / (1 << DIGIT_FINE_SHIFT), factors.astype(np.int8), k * r / factors


def _product_ratio(node: Node, scales: Mapping) -> np.ndarray | None:
    """For a SwiGLU whose up input has per-channel scales: ``s_up[c] / max(s_up)``, the
    relative scale of channel c in the ``vbin mul`` product (None otherwise)."""
    if node.op != "SwiGLU" or not isinstance(scales.get(node.inputs[1]), np.ndarray):
        return None
    su = np.asarray(scales[node.inputs[1]], dtype=np.float64)
    return su / su.max()


def _widen(scale: np.ndarray, twin: bool = False) -> "VecIn":
    """Factors that turn a per-channel int8 tensor into int32 at one fine scale."""
    scale = np.asarray(scale, dtype=np.float64)
    fine = max(float(scale.min()) / (1 << WIDEN_BITS), float(scale.max()) * 128 / 2**30)
    factors = np.rint(scale / fine).astype(np.int64)
    return VecIn("widen", fine, factors.astype(np.int32), twin)


def quantize(graph: Graph, act_scales: Mapping[str, float], *, method: str = "max",
             keep_wide: bool = True, channel_scales: Mapping[str, np.ndarray] | None = None,
             vector_channel_scales: Mapping[str, np.ndarray] | None = None,
             amax: Mapping[str, float] | None = None, int32_outputs: Iterable[str] = (),
             fixed_scales: Mapping[str, float] | None = None, digits: bool = False,
             digit_channel_scales: Mapping[str, np.ndarray] | None = None,
             prob_digits: bool = False, wide_linears: bool = False, norm_digits: bool = False) -> QuantizedGraph:
    """Quantize ``graph``'s device ops with the given activation scales (from :func:`calibrate`).

    ``keep_wide`` (default): see :func:`wide_values`; False makes every device tensor int8.
    ``channel_scales`` (per-channel scales, e.g. ``Calibrator.channel_scales(alpha)``): used for
    the tensors :func:`channel_scaled_values` allows (a Linear consumer folds them into its
    weights); None keeps every activation per tensor. ``vector_channel_scales`` (default:
    ``channel_scales``; e.g. ``Calibrator.channel_scales(1.0)``): the scales of tensors only
    vector ops read, and of a LayerNorm output's twin (a second int8 copy with these scales)
    when both Linears and vector ops read it. ``amax`` (largest |x| per tensor; default
    ``127 * act_scales``): sets the int32 scales of host tensors handed to a device LayerNorm
    and of GELU's int32 intermediate. ``digits``: the tensors of :func:`digit_values` become
    two-digit tensors at ``amax / DIGIT_MAX`` (per tensor), or per channel when
    ``digit_channel_scales`` (int8-style scales, e.g. ``Calibrator.channel_scales(alpha)``) has
    them: the same smoothing at 12 bits, folded into the Linear's weight rows
    (:func:`_digit_scales`). ``prob_digits``: attention probabilities from a wide softmax
    (int32 at 1/2047) held as two int8 digits through ``P v`` instead of int8 at 1/127.
    ``wide_linears``: a Linear read only by int32 residual adds (a decoder's o and down
    projections, an encoder's attention output and FFN down projections) hands them its
    accumulators on one int32 scale (:func:`quantize_weight_factored`; the bias added to the
    accumulators, then ``vbin mul`` by the factors) instead of an int8 tensor. ``norm_digits``: a
    norm output read by Linears (:func:`norm_digit_values`) becomes a two-digit tensor: the norm
    writes int32 at 127/2047 of its int8 scale (per channel, in its gains), split into digits; a
    LayerNorm's residual Adds read a second copy written as int32, and a LayerNorm graph output
    that no device op reads is int32 (:data:`NORM_WIDE_BITS`)."""
    scales = dict(act_scales)
    amax = dict(amax or {})
    int32_outputs = set(int32_outputs)
    outputs = {o.name for o in graph.outputs}
    for name in int32_outputs:
        if name not in outputs:
            raise QuantizeError(f"int32_outputs names {name!r}, which is not a graph output")
    prod = graph.producers()
    cons = graph.consumers()
    # FakeQuant (QDQ) fixes the scale of its output and of the tensor it reads.
    for n in graph.nodes:
        if n.op == "FakeQuant":
            if n.attrs["zero_point"] != 0:
                raise QuantizeError(f"{n.name}: only symmetric activation quantization (zero point 0) is supported")
            scales[n.outputs[0]] = n.attrs["scale"]
            src = n.inputs[0]
            if src not in graph.consts:
                scales[src] = n.attrs["scale"]
    for name, sc in (fixed_scales or {}).items():
        scales[name] = float(sc)
    _tie_cache_scales(graph, scales, prod)
    qg = QuantizedGraph(graph, scales, method=method)
    qg.wide = wide_values(graph) if keep_wide else set()
    chain = residual_chain(graph, qg.wide)
    vec_scales = vector_channel_scales if vector_channel_scales is not None else channel_scales
    if channel_scales:
        for name in channel_scaled_values(graph, qg.wide):
            users = cons.get(name, [])
            linear_users = any(u.op in SMOOTHED_CONSUMERS for u in users)
            vector_users = any(u.op != "Linear" for u in users)
            src = channel_scales if linear_users else vec_scales
            if name not in src:
                continue
            scales[name] = np.asarray(src[name], dtype=np.float64)
            if linear_users and vector_users and prod[name].op == "LayerNorm" and vec_scales is not channel_scales \
                    and name in vec_scales:
                qg.twins[name] = np.asarray(vec_scales[name], dtype=np.float64)

    digit_fine: dict[str, tuple[float, np.ndarray]] = {}
    if digits:
        for name in digit_values(graph):
            if digit_channel_scales and name in digit_channel_scales:
                fine, factors, per_channel = _digit_scales(np.asarray(digit_channel_scales[name]) * 127.0 / DIGIT_MAX,
                                                           _product_ratio(prod[name], scales))
                digit_fine[name] = (fine, factors)
                qg.digits[name] = scales[name] = per_channel
                continue
            top = float(amax[name]) if name in amax else float(np.max(scales[name])) * 127.0
            ratio = _product_ratio(prod[name], scales)
            if ratio is not None:  # one target, but the product's channels arrive at different scales
                fine, factors, per_channel = _digit_scales(np.full(ratio.shape, max(top, 1e-8) / DIGIT_MAX), ratio)
                digit_fine[name] = (fine, factors)
                qg.digits[name] = scales[name] = per_channel
                continue
            qg.digits[name] = scales[name] = max(top, 1e-8) / DIGIT_MAX

    for n in graph.nodes:  # layout ops move int8 values: their outputs keep the input's scale
        if n.device == "device" and n.op in ("Reshape", "Transpose", "Expand", "Pad") and \
                isinstance(scales.get(n.inputs[0]), float):
            scales[n.outputs[0]] = scales[n.inputs[0]]

    def need(name: str, node: Node):
        s = scales.get(name)
        if s is None:
            raise QuantizeError(f"{node.name} ({node.op}): no activation scale for {name!r}; calibrate first")
        return s if isinstance(s, np.ndarray) else float(s)

    if norm_digits:
        for name in norm_digit_values(graph):
            if any(u.outputs[0] in int32_outputs for u in cons[name]):  # a digit GEMM ends in REQUANT
                continue
            # the norm's per-channel gains give any per-channel scale: 16x the int8 one
            qg.digits[name] = scales[name] = need(name, prod[name]) * 127.0 / DIGIT_MAX
            qg.twins.pop(name, None)  # the Adds read an int32 copy instead (LayerNorm, below)

    def peak(name: str, node: Node) -> float:
        if name in amax:
            return float(max(amax[name], 1e-8))
        s = need(name, node)
        return float(np.max(s)) * 127.0

    host = {v.name for v in graph.inputs} | {o for n in graph.nodes if n.device == "host" for o in n.outputs}
    for n in graph.nodes:
        if n.device != "device":
            continue
        for i, name in enumerate(n.inputs):
            if name is None or name in graph.consts or name not in host or name in qg.device_inputs:
                continue
            if (n.op == "Attention" or n.op == "GQAttention") and i == 3:
                qg.device_inputs[name] = ("kv_len", None)
            elif n.op == "CacheWrite" and i == 2:
                qg.device_inputs[name] = ("kv_slot", None)
            elif n.op == "Rope" and i in (1, 2):
                qg.device_inputs[name] = ("rope_table", None)
            elif n.op in NORM_OPS and i == 0:
                qg.device_inputs[name] = ("int32", peak(name, n) / (1 << HOST_WIDE_BITS))
            else:
                s = need(name, n)
                qg.device_inputs[name] = ("int8", float(np.max(s)))

    def vec_in(name: str, node: Node) -> VecIn:
        """How a vector op reads ``name``."""
        if name in qg.wide_linears:
            return VecIn("int32", qg.wide_linears[name])
        if name in qg.device_inputs:
            kind, s = qg.device_inputs[name]
            return VecIn(kind, s)
        if name in qg.wide:
            return VecIn("int32", qg.adds[prod[name].name].out_scale)
        if name in int32_outputs and prod[name].op == "Linear":
            raise QuantizeError(f"{node.name} ({node.op}): {name!r} is an int32 graph output; vector ops cannot read it")
        if name in qg.wide_twins:
            return VecIn("int32", qg.wide_twins[name], twin=True)
        if name in qg.twins:
            return _widen(qg.twins[name], twin=True)
        s = need(name, node)
        if isinstance(s, np.ndarray):
            return _widen(s)
        return VecIn("int8", s)

    def tensor_scale(name: str, node: Node) -> float:
        s = need(name, node)
        if isinstance(s, np.ndarray):
            raise QuantizeError(f"{node.name} ({node.op}): {name!r} must have one scale per tensor")
        return s

    for n in graph.nodes:
        if n.device != "device":
            continue
        if n.op == "Linear":
            w = graph.consts[n.inputs[1]]
            x = n.inputs[0]
            if x in qg.wide:
                raise QuantizeError(f"{n.name} (Linear): an int32 (wide) input is not supported")
            s_in = qg.device_inputs[x][1] if x in qg.device_inputs else need(x, n)
            b = graph.consts[n.inputs[2]] if len(n.inputs) > 2 and n.inputs[2] is not None else np.zeros(w.shape[1])
            o = n.outputs[0]
            wide_out = wide_linears and o not in int32_outputs and o not in outputs \
                and n.inputs[1] not in graph.qdq_weights and bool(cons.get(o)) \
                and all(u.op == "Add" and u.outputs[0] in qg.wide for u in cons[o])
            in_sc = s_in
            per_channel_in = isinstance(s_in, np.ndarray)
            if per_channel_in:  # fold the input's scales into the weight rows
                w, s_in = w.astype(np.float64) * s_in[:, None], 1.0
            if wide_out:
                wq, ws, g, t = quantize_weight_factored(w)
                unit = s_in * t  # accumulator x g_n: one scale for every column
                shift = max(0, math.ceil(math.log2(max(peak(o, n), 1e-30) / unit)) - 29)
                fine = unit * 2.0 ** shift
                qg.wide_linears[o] = scales[o] = fine
                qg.linears[n.name] = LinearParams(wq, ws, _bias_words(b, s_in * ws), in_sc, fine,
                                                  np.zeros(w.shape[1], np.int32), "wide", acc_in_scale=s_in,
                                                  in_digits=x in qg.digits, wide_factors=g,
                                                  wide_word=int(pack_scale_word(1, shift)))
                continue
            if n.inputs[1] in graph.qdq_weights and not per_channel_in:
                wq, ws = graph.qdq_weights[n.inputs[1]]
            else:
                wq, ws = quantize_weight(w)
            s_out = need(n.outputs[0], n) if n.outputs[0] not in int32_outputs else 1.0
            acc_scale = s_in * ws.astype(np.float64)
            bq = _bias_words(b, acc_scale)
            if n.outputs[0] in int32_outputs:  # e.g. logits: the host reads the int32 accumulators
                qg.linears[n.name] = LinearParams(wq, ws, bq, in_sc, 0.0, np.zeros(w.shape[1], np.int32), "int32",
                                                  acc_in_scale=s_in)
                continue
            qg.linears[n.name] = LinearParams(wq, ws, bq, in_sc, s_out, scale_words(acc_scale / s_out), "int8",
                                              acc_in_scale=s_in, in_digits=x in qg.digits)
        elif n.op == "MatMul":
            sa, sb, so = need(n.inputs[0], n), need(n.inputs[1], n), need(n.outputs[0], n)
            qg.matmuls[n.name] = MatMulParams(sa, sb, so, scale_words(sa * sb / so))
        elif n.op == "Attention":
            sq, sk, sv = (tensor_scale(i, n) for i in n.inputs[:3])
            so = need(n.outputs[0], n)
            prob = PROB_DIGIT_SCALE if prob_digits else PROB_SCALE
            score_scale = sq * sk * float(n.attrs["scale"])
            word = int(softmax_params(score_scale, kv_len=0, cols=3)[0, 0])
            qg.attentions[n.name] = AttentionParams(sq, sk, sv, so, prob,
                                                    scale_words(prob * sv / np.atleast_1d(so)),
                                                    score_scale=score_scale, softmax_word=word,
                                                    prob_digits=prob_digits)
        elif n.op == "LayerNorm":
            x = n.inputs[0]
            gamma = graph.consts[n.inputs[1]]
            beta = graph.consts[n.inputs[2]] if len(n.inputs) > 2 and n.inputs[2] is not None else None
            if gamma.ndim != 1 or graph.shape(x)[-1] != gamma.size or \
                    n.attrs.get("axis", -1) not in (-1, len(graph.shape(x)) - 1):
                raise QuantizeError(f"{n.name} (LayerNorm): only normalisation over the last axis is supported")
            src = vec_in(x, n)
            o = n.outputs[0]
            if norm_digits and o in outputs and not cons.get(o):  # only the host reads it: int32, not int8
                qg.norms[n.name] = _norm(src, gamma, beta, _norm_wide_scale(peak(o, n), beta), wide=True)
                scales[o] = qg.norms[n.name].out_scale
                continue
            qg.norms[n.name] = _norm(src, gamma, beta, need(o, n))
            qg.norms[n.name].digits = o in qg.digits
            if o in qg.digits and any(u.op != "Linear" for u in cons[o]):
                qg.wide_twins[o] = _norm_wide_scale(peak(o, n), beta)
                qg.norms[n.name].twin = _norm(src, gamma, beta, qg.wide_twins[o], wide=True)
            elif o in qg.twins:
                qg.norms[n.name].twin = _norm(src, gamma, beta, qg.twins[o])
        elif n.op == "RMSNorm":
            x = n.inputs[0]
            w = graph.consts[n.inputs[1]]
            if w.ndim != 1 or graph.shape(x)[-1] != w.size:
                raise QuantizeError(f"{n.name} (RMSNorm): weight of shape {list(w.shape)} does not match the last axis")
            src = vec_in(x, n)
            rows = rmsnorm_params(src.scale, w, need(n.outputs[0], n), cols=1)
            qg.norms[n.name] = NormParams(src=src, out_scale=need(n.outputs[0], n), shift=int(rows[0, 0]),
                                          gain=rows[1:1 + w.size, 0].astype(np.int32), bias=np.zeros(w.size, np.int32),
                                          digits=n.outputs[0] in qg.digits)
        elif n.op == "Rope":
            si, so = tensor_scale(n.inputs[0], n), tensor_scale(n.outputs[0], n)
            word = int(rope_params(si, so, frac_bits=ROPE_FRAC_BITS, cols=1)[0, 0])
            qg.ropes[n.name] = RopeParams(si, so, word)
        elif n.op == "GQAttention":
            sq, sk, sv = (tensor_scale(i, n) for i in n.inputs[:3])
            so = tensor_scale(n.outputs[0], n)
            score_scale = sq * sk * float(n.attrs["scale"])
            word = int(softmax_params(score_scale, kv_len=0, cols=3)[0, 0])
            prob = PROB_DIGIT_SCALE if prob_digits else PROB_SCALE
            qg.gqas[n.name] = GQAParams(sq, sk, sv, so, score_scale, word, scale_words(prob * sv / so), prob_digits)
        elif n.op == "SwiGLU":
            gate = vec_in(n.inputs[0], n)  # int8 per tensor, or per channel widened to int32
            if gate.kind not in ("int8", "widen"):
                raise QuantizeError(f"{n.name} (SwiGLU): the gate must be an int8 value (per tensor or per channel)")
            su = need(n.inputs[1], n)  # per channel: read as int8, the product has one scale per channel
            su_ref = float(np.max(su))
            ratio = _product_ratio(n, scales)
            so = need(n.outputs[0], n)
            # |silu(g)| <= |g|: int32 at mid holds the gate's peak with room for the product by int8 up
            mid = max(gate.scale / (1 << SILU_MID_BITS), peak(n.inputs[0], n) / 2**30)
            w_in, w_out = (int(w) for w in silu_params(gate.scale, mid, cols=2)[0])
            if n.outputs[0] in qg.digits:  # int32 product at the digit scale (or a fine one), then the split
                fine, factors = digit_fine.get(n.outputs[0], (so, None))
                qg.swiglus[n.name] = SwiGLUParams(gate, su, so, mid, w_in, w_out,
                                                  int(mul_params(mid, su_ref, fine, cols=1)[0, 0]), digits=True,
                                                  digit_factors=factors)
            elif isinstance(so, np.ndarray) or ratio is not None:
                # int32 product (channel c at ms * ratio_c), then REQUANT per column
                ms = peak(n.outputs[0], n) / (1 << HOST_WIDE_BITS)
                per_col = ms if ratio is None else ms * ratio
                qg.swiglus[n.name] = SwiGLUParams(gate, su, so, mid, w_in, w_out,
                                                  int(mul_params(mid, su_ref, ms, cols=1)[0, 0]), ms,
                                                  scale_words(per_col / so))
            else:
                qg.swiglus[n.name] = SwiGLUParams(gate, su, so, mid, w_in, w_out, int(mul_params(mid, su, so, cols=1)[0, 0]))
        elif n.op == "Gelu":
            src = vec_in(n.inputs[0], n)
            so = need(n.outputs[0], n)
            if n.outputs[0] in qg.digits:  # int32 at the digit scale (or a fine one), then the split
                fine, factors = digit_fine.get(n.outputs[0], (so, None))
                words = gelu_params(src.scale, fine, cols=2)[0]
                qg.gelus[n.name] = GeluParams(src, so, int(words[0]), int(words[1]), digits=True,
                                              digit_factors=factors)
            elif isinstance(so, np.ndarray):  # per channel: int32 intermediate, then REQUANT per column
                mid = peak(n.outputs[0], n) / (1 << HOST_WIDE_BITS)
                words = gelu_params(src.scale, mid, cols=2)[0]
                qg.gelus[n.name] = GeluParams(src, so, int(words[0]), int(words[1]), mid_scale=mid,
                                              requant_words=scale_words(mid / so))
            else:
                words = gelu_params(src.scale, so, cols=2)[0]
                qg.gelus[n.name] = GeluParams(src, so, int(words[0]), int(words[1]))
        elif n.op == "Add":
            a, b = n.inputs[:2]
            for v in (a, b):
                if v in qg.wide and n.outputs[0] not in qg.wide:
                    raise QuantizeError(f"{n.name} (Add): an int32 (wide) operand {v!r} is only supported "
                                        "when the sum stays wide")
                if graph.shape(v) != graph.shape(n.outputs[0]):
                    raise QuantizeError(f"{n.name} (Add): broadcasting {v!r} {list(graph.shape(v))} to "
                                        f"{list(graph.shape(n.outputs[0]))} is not supported on the device")
            ia, ib = vec_in(a, n), vec_in(b, n)
            if n.outputs[0] in chain:
                so, out = peak(n.outputs[0], n) / (1 << RESIDUAL_WIDE_BITS), "int32"
            elif n.outputs[0] in qg.wide and (a in qg.wide_linears or b in qg.wide_linears):
                # an operand at an accumulator's fine scale: min / 16 would overflow; the sum's range sets it
                so, out = peak(n.outputs[0], n) / (1 << RESIDUAL_WIDE_BITS), "int32"
            elif n.outputs[0] in qg.wide:
                so, out = min(ia.scale, ib.scale) / (1 << WIDE_ADD_SHIFT), "int32"
            else:
                so, out = tensor_scale(n.outputs[0], n), "int8"
            words = add_params(ia.scale, ib.scale, so, cols=2)[0]
            qg.adds[n.name] = AddParams(ia, ib, so, int(words[0]), int(words[1]), out)
    return qg


def _tie_cache_scales(graph: Graph, scales: dict, prod: dict) -> None:
    """A KV cache holds one int8 scale per tensor: for each ``CacheWrite`` the cache (output),
    the past cache (input) and the new row with every layout op up to its producer (a Rope or a
    Linear) share the output's scale (``fixed_scales`` may set it, e.g. to the prefill's)."""
    for n in graph.nodes:
        if n.op != "CacheWrite":
            continue
        s = scales.get(n.outputs[0])
        if s is None:
            raise QuantizeError(f"{n.name} (CacheWrite): no scale for the cache {n.outputs[0]!r}; calibrate first")
        s = float(np.max(s))
        scales[n.outputs[0]] = scales[n.inputs[0]] = s
        name = n.inputs[1]
        while True:
            scales[name] = s
            p = prod.get(name)
            if p is None or p.op not in ("Reshape", "Transpose", "Expand"):
                break
            name = p.inputs[0]


def _norm(src: "VecIn", gamma, beta, out_scale, wide: bool = False) -> "NormParams":
    rows = layernorm_params(src.scale, gamma, beta if beta is not None else np.zeros_like(gamma), out_scale, cols=1)
    L = np.asarray(gamma).size
    return NormParams(src=src, out_scale=out_scale, shift=int(rows[0, 0]),
                      gain=rows[1:1 + L, 0].astype(np.int32), bias=rows[1 + L:1 + 2 * L, 0].astype(np.int32),
                      wide=wide)


def _bias_words(bias, acc_scale) -> np.ndarray:
    """A Linear's bias as int32 at its accumulators' scale (added to them before REQUANT or the
    residual hand-off's factors)."""
    return np.clip(np.rint(bias / acc_scale), -2**31, 2**31 - 1).astype(np.int32)


def _norm_wide_scale(peak: float, beta) -> float:
    """The int32 scale of a norm output handed on wide (:data:`NORM_WIDE_BITS`)."""
    top = max(peak, float(np.max(np.abs(beta))) if beta is not None else 0.0, 1e-8)
    return top / (1 << NORM_WIDE_BITS)
