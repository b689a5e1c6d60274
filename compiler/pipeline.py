"""The compiler's stages in one place: ONNX -> IR -> calibration -> quantization -> lowering ->
bundle, and the host side of running a compiled model (prologue in, epilogue out).

:func:`compile_onnx` is what ``weft compile`` runs; :func:`host_inputs` computes a bundle's
inputs from the model's own inputs (the host ops of the graph: embedding gathers and sums,
attention-mask preparation), :func:`device_outputs` turns the bundle's int8 outputs back into
real numbers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import numpy as np

from weft.hw.bundle import Bundle
from weft.hw.config import AcceleratorConfig

from .frontend import import_onnx
from .ir import Graph
from .lower import lower
from .quantize import Calibrator, QuantizedGraph, quantize
from .reference import float_kernel, key_lengths

__all__ = ["limit_blas_threads", "CompileResult", "quantize_for_device", "compile_onnx", "compile_graph", "host_graph", "host_inputs", "device_outputs",
           "DEFAULT_METHOD", "DEFAULT_ALPHA", "DEFAULT_VECTOR_ALPHA", "DEFAULT_DIGITS", "DEFAULT_DIGIT_ALPHA",
           "DEFAULT_PROB_DIGITS", "DEFAULT_NORM_DIGITS", "DEFAULT_WIDE_LINEARS"]

#: Calibration defaults (see docs/compiler.md for the measurements behind them).
DEFAULT_METHOD = "max"
DEFAULT_ALPHA = 0.4  # per-channel smoothing of tensors a Linear reads (folded into its weights)
DEFAULT_VECTOR_ALPHA = 0.6  # per-channel scales of tensors only vector ops read (widened to int32)
DEFAULT_DIGITS = True  # two-digit (12-bit) FFN down-projection inputs (quantize.digit_values)
DEFAULT_DIGIT_ALPHA = 0.0  # their smoothing: 0, one scale per tensor (MiniLM: mean cosine 0.9952 vs 0.9943 at 0.4)
DEFAULT_PROB_DIGITS = False  # two-digit attention probabilities (a wide softmax) instead of int8 at 1/127
#: Norm outputs the Linears read as two digits, the residual Adds and the host as int32 (quantize.norm_digit_values)
DEFAULT_NORM_DIGITS = True
#: Linears read only by the int32 residual hand it their accumulators (attention output, FFN down)
DEFAULT_WIDE_LINEARS = True


def limit_blas_threads(threads: int = 1) -> bool:
    """Best effort: cap numpy's OpenBLAS thread pool (as threadpoolctl would). The compiler's
    matrices are small; on a shared, loaded machine a multi-threaded BLAS spins and runs them
    10-30x slower than one thread (measured on the 2-core development machine). Returns
    whether a BLAS library was found."""
    import ctypes

    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and "/" in line}
    except OSError:
        return False
    done = False
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads"):
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn(int(threads))
                done = True
                break
    return done


@dataclass
class CompileResult:
    graph: Graph
    qgraph: QuantizedGraph
    bundle: Bundle
    timings: dict[str, float] = field(default_factory=dict)


def quantize_for_device(graph: Graph, batches: Iterable[Mapping[str, np.ndarray]], *, method: str = DEFAULT_METHOD,
                        alpha: float = DEFAULT_ALPHA, vector_alpha: float = DEFAULT_VECTOR_ALPHA,
                        int32_outputs=(), fixed_scales=None, digits: bool = DEFAULT_DIGITS,
                        digit_alpha: float = DEFAULT_DIGIT_ALPHA,
                        prob_digits: bool = DEFAULT_PROB_DIGITS, wide_linears: bool = DEFAULT_WIDE_LINEARS,
                        norm_digits: bool = DEFAULT_NORM_DIGITS) -> QuantizedGraph:
    """Calibrate on ``batches`` (float runs) and quantize with the defaults the back end expects."""
    cal = Calibrator(graph)
    for feeds in batches:
        cal.add(feeds)
    scales = {k: c / 127.0 for k, c in cal.thresholds(method).items()}
    return quantize(graph, scales, method=method,
                    channel_scales=cal.channel_scales(alpha) if alpha > 0 else None,
                    vector_channel_scales=cal.channel_scales(vector_alpha) if alpha > 0 else None,
                    amax=cal.amax, int32_outputs=int32_outputs, fixed_scales=fixed_scales, digits=digits,
                    digit_channel_scales=cal.channel_scales(digit_alpha) if digits and digit_alpha > 0 else None,
                    prob_digits=prob_digits, wide_linears=wide_linears, norm_digits=norm_digits)


def compile_graph(graph: Graph, config: AcceleratorConfig, batches, *, model: str = "",
                  progress: Callable[[str, float], None] | None = None, **qopts) -> CompileResult:
    timings: dict[str, float] = {}

    def stage(name, fn):
        t = time.perf_counter()
        out = fn()
        timings[name] = time.perf_counter() - t
        if progress:
            progress(name, timings[name])
        return out

    qg = stage("calibrate + quantize", lambda: quantize_for_device(graph, batches, **qopts))
    bundle = stage("lower", lambda: lower(qg, config, model=model))
    return CompileResult(graph, qg, bundle, timings)


def compile_onnx(path, config: AcceleratorConfig, batches, *, model: str = "",
                 progress: Callable[[str, float], None] | None = None, **qopts) -> CompileResult:
    """``path`` (ONNX) -> :class:`CompileResult` for ``config``. ``batches``: calibration feeds
    (a list, or a callable taking the imported graph and returning them)."""
    t = time.perf_counter()
    graph = import_onnx(path)
    dt = time.perf_counter() - t
    if progress:
        progress("import ONNX", dt)
    if callable(batches):
        batches = batches(graph)
    result = compile_graph(graph, config, batches, model=model, progress=progress, **qopts)
    result.timings = {"import ONNX": dt, **result.timings}
    return result


def host_graph(graph: Graph) -> Graph:
    """The host part of ``graph``: its inputs, host nodes and the constants they read (the
    embedding tables), enough for :func:`host_inputs` without the ONNX file."""
    nodes = [n for n in graph.nodes if n.device == "host"]
    used = {i for n in nodes for i in n.inputs if i is not None}
    values = {k: v for k, v in graph.values.items() if k in used or any(k in n.outputs for n in nodes)}
    return Graph(inputs=list(graph.inputs), outputs=[], nodes=nodes, values=values,
                 consts={k: v for k, v in graph.consts.items() if k in used}, opset=graph.opset)


def host_inputs(graph: Graph, feeds: Mapping[str, np.ndarray], bundle: Bundle,
                names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Run the host nodes of ``graph`` (the full graph or :func:`host_graph`) on the model's
    ``feeds`` and return the bundle's inputs (``names``: only these; default every input):

    * tensors as real numbers (float; the bundle's input specs quantize them), in the device's
      column order (``metadata["input_column_perm"]``: a KV cache's interleaved RoPE pairs);
    * ``kv_len`` inputs: the valid key count (int32) of an attention mask (an additive bias, or
      a boolean mask that is True at masked keys);
    * ``kv_slot`` inputs: the one slot a ``CacheWrite``'s boolean write mask selects (int32);
    * ``rope_table`` inputs: the Q.14 interleaved cos/sin rows (int32), tiled over the heads.

    Only the model inputs the requested ones depend on are needed (a decode step's per-step
    inputs come from ``input_ids`` and ``position`` without the cache)."""
    from .reference import rope_device_table

    meta = bundle.metadata
    kinds = meta.get("host_inputs", {})
    kv = meta.get("kv_len_inputs", {})
    slots = meta.get("kv_slot_inputs", {})
    tables = meta.get("rope_table_inputs", {})
    perms = meta.get("input_column_perm", {})
    specs = bundle.inputs if names is None else [bundle.input(n) for n in names]
    env = {v.name: np.asarray(feeds[v.name]).astype(v.dtype, copy=False) for v in graph.inputs if v.name in feeds}
    env.update(graph.consts)
    for n in graph.nodes:
        if n.device != "host" or any(i is not None and i not in env for i in n.inputs):
            continue  # needs a model input that was not given (checked below if a bundle input needs it)
        env[n.outputs[0]] = float_kernel(n, [env[i] if i is not None else None for i in n.inputs])

    def value(name: str) -> np.ndarray:
        if name not in env:
            given = [v.name for v in graph.inputs if v.name in feeds]
            raise KeyError(f"host value {name!r} needs model inputs that were not given (given: {given}; "
                           f"model inputs: {[v.name for v in graph.inputs]})")
        return env[name]

    out = {}
    for spec in specs:
        kind = kinds.get(spec.name)
        if spec.name in kv:
            mask = np.asarray(value(kv[spec.name]))
            if mask.dtype == bool:  # True at masked keys (a decode step's `slots > position`)
                valid = ~mask.reshape(-1, mask.shape[-1])
                if not np.all(valid == valid[:1]) or not np.array_equal(
                        valid[0], np.arange(valid.shape[-1]) < valid[0].sum()):
                    raise ValueError(f"input {spec.name!r}: the mask {kv[spec.name]!r} is not a key prefix")
                out[spec.name] = np.array([valid[0].sum()], dtype=np.int32)
            else:
                out[spec.name] = key_lengths(mask, 1, np.shape(mask)[-1]).astype(np.int32)[:1]
        elif spec.name in slots:
            hits = np.flatnonzero(np.asarray(value(slots[spec.name])).ravel())
            if hits.size != 1:
                raise ValueError(f"input {spec.name!r}: the write mask {slots[spec.name]!r} selects "
                                 f"{hits.size} cache slots, not one")
            out[spec.name] = hits.astype(np.int32)
        elif spec.name in tables:
            t = tables[spec.name]
            D = int(t["head_dim"])
            rows = spec.shape[0]
            cos = np.asarray(value(t["cos"]), dtype=np.float64).reshape(-1, D)[-rows:]
            sin = np.asarray(value(t["sin"]), dtype=np.float64).reshape(-1, D)[-rows:]
            out[spec.name] = np.tile(rope_device_table(cos, sin), (1, spec.shape[1] // D)).astype(np.int32)
        elif kind in ("kv_len", "kv_slot", "rope_table"):
            raise ValueError(f"input {spec.name!r} of kind {kind} has no description in the bundle metadata")
        else:
            x = np.asarray(value(spec.name), dtype=np.float64)
            if spec.name in perms:
                x = x[..., np.asarray(perms[spec.name])]
            out[spec.name] = x.reshape(spec.shape)
    return out


def device_outputs(bundle: Bundle, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The bundle's integer outputs as real numbers (float32), in their graph shapes: int32
    outputs with one scale per column (``metadata["output_channel_scales"]``, logits) scaled per
    column; outputs whose last axis the device keeps permuted (``output_column_perm``: a cache
    output's RoPE pairs interleaved) put back in the graph's order."""
    chan = bundle.metadata.get("output_channel_scales", {})
    perm = bundle.metadata.get("output_column_perm", {})
    out = {}
    for s in bundle.outputs:
        x = s.dequantize(outputs[s.name])
        if s.name in chan:
            x = x * np.asarray(chan[s.name], dtype=np.float64)
        if s.name in perm:
            y = np.empty_like(x)
            y[..., np.asarray(perm[s.name])] = x
            x = y
        out[s.name] = x.astype(np.float32)
    return out
