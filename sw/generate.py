"""Text generation with a decoder LM (SmolLM2) compiled by weft: chat template, prefill, KV-cached
decode steps until a stop token or the limit, greedy or seeded temperature / top-p sampling,
streamed output.

Backends (``device``):

* ``"float"``: the PyTorch reference model (``weft.sw.models.smollm2``).
* ``"int8"``: the compiled graphs executed by ``weft.compiler.reference.run_int8``, the integer
  semantics a bundle must reproduce bit for bit: a **prefill** graph for a fixed bucket of
  ``prompt_len`` tokens (right-padded; causal, so padding never reaches earlier positions) and a
  **decode-step** graph with the KV cache as explicit int8 inputs/outputs of ``max_context`` slots.
  One decode graph serves every step: the host passes the step's position, from which the device
  inputs are derived (the cache slot to write, ``kv_len = position + 1`` for the softmax masks,
  the RoPE table row). Prompts longer than the bucket continue through decode steps. Both graphs
  give int32 logits (the lm_head's accumulators, a scale per column).
* ``"golden"``: both graphs lowered to bundles (:meth:`DecoderProgram.bundles`, for
  ``config``, default ``"default"``) on the bit-exact model, bit-exact with ``"int8"``: the
  prefill bundle through ``run_bundle``; the decode-step bundle loaded once into a
  :class:`weft.sw.decode_session.DecodeSession`, which keeps the KV cache in device memory (each
  cache an input and an output at one address, updated in place), writes the step's small
  inputs (embedding, ``kv_len``, RoPE row), patches the cache-append stores for the slot and
  reads the int32 logits (:class:`BundleBackend`).

The prefill and decode graphs share the cache's int8 scales (the decode graph is quantized with
the prefill's ``present_key.i`` / ``present_value.i`` scales fixed), so the prefill's cache
integers are the decode step's input integers unchanged; on the device the prefill bundle's
cache outputs (key columns in the interleaved RoPE order of both bundles) are copied unchanged
into the decode bundle's cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import numpy as np

__all__ = ["GenerateError", "DecoderProgram", "BundleBackend", "generate", "DEVICES", "DECODER_ALPHA",
           "DECODER_VECTOR_ALPHA", "DECODER_DIGIT_ALPHA", "DECODER_PROB_DIGITS",
           "DECODER_WIDE_LINEARS", "DECODER_NORM_DIGITS"]

DEVICES = ("float", "int8", "golden")
#: Calibration defaults for decoders (docs/compiler.md, "Accuracy": measured better than the
#: encoder's 0.3 / 0.6 on SmolLM2-135M).
DECODER_ALPHA = 0.5
DECODER_VECTOR_ALPHA = 1.0
#: Two-digit (12-bit) down-projection input with this per-channel smoothing; None: int8.
#: SmolLM2-135M: top-1 agreement 77.5% -> 82.8%, perplexity ratio 1.341x -> 1.168x (docs/compiler.md).
DECODER_DIGIT_ALPHA: float | None = 0.3
#: Attention probabilities from a wide softmax (1/2047) as two int8 digits through ``P v``.
DECODER_PROB_DIGITS = True
#: The o and down projections hand the int32 residual their accumulators (``quantize(wide_linears=True)``).
DECODER_WIDE_LINEARS = True
#: The RMSNorm outputs that feed q/k/v and gate/up as two digits (``quantize(norm_digits=True)``):
#: SmolLM2-135M teacher-forced agreement 89.0% -> 90.8%; the decode step 1.6% slower
#: (docs/compiler.md).
DECODER_NORM_DIGITS = True


class GenerateError(RuntimeError):
    """A generation request that cannot be served (bad arguments, missing device support)."""


def _prompt_ids(tok, prompt) -> list[int]:
    if isinstance(prompt, str):
        return tok.encode(prompt)
    if len(prompt) and isinstance(prompt[0], Mapping):
        return tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    return [int(i) for i in prompt]


@dataclass
class DecoderProgram:
    """A decoder LM compiled to a prefill graph and a decode-step graph (int8: :meth:`prefill` and
    :meth:`step` run them with ``run_int8``; :meth:`bundles` lowers both for an accelerator)."""

    model: object
    prefill_qg: object
    decode_qg: object
    prompt_len: int
    max_context: int
    pad_id: int
    timings: dict = field(default_factory=dict)
    _bundles: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, model, tok=None, *, prompt_len: int = 64, max_context: int = 256, calibration=None,
              decode_steps: int = 8, alpha: float | None = None, vector_alpha: float | None = None,
              exporter: str | None = None, digit_alpha: float | None = DECODER_DIGIT_ALPHA,
              prob_digits: bool = DECODER_PROB_DIGITS,
              wide_linears: bool = DECODER_WIDE_LINEARS,
              norm_digits: bool = DECODER_NORM_DIGITS) -> "DecoderProgram":
        """Export, import, calibrate (float runs of ``calibration``: texts, chat message lists or
        id lists; default :data:`weft.sw.accuracy.DECODER_CALIBRATION`) and quantize both graphs.
        ``digit_alpha``: None keeps the down projection's input int8; a number gives it two digits
        with that per-channel smoothing (0: one scale per tensor). ``prob_digits``: two-digit
        attention probabilities (a wide softmax) rather than int8. ``wide_linears``: the o and down
        projections hand the residual int32 rather than int8. ``norm_digits``: the RMSNorm outputs
        read by q/k/v and gate/up as two digits rather than int8."""
        import time

        import torch

        from weft.compiler.frontend import import_onnx
        from weft.compiler.pipeline import limit_blas_threads
        from weft.compiler.quantize import Calibrator, quantize
        from weft.sw.models import smollm2 as S

        limit_blas_threads()
        alpha = DECODER_ALPHA if alpha is None else alpha
        vector_alpha = DECODER_VECTOR_ALPHA if vector_alpha is None else vector_alpha
        if not 0 < prompt_len <= max_context <= model.cfg.max_position_embeddings:
            raise GenerateError(f"need 0 < prompt_len ({prompt_len}) <= max_context ({max_context}) <= "
                                f"{model.cfg.max_position_embeddings}")
        t = time.perf_counter()
        timings = {}
        pg = import_onnx(S.export_prefill_onnx(model, prompt_len, max_context, exporter=exporter))
        dg = import_onnx(S.export_decode_onnx(model, max_context, exporter=exporter))
        timings["export + import"] = time.perf_counter() - t
        if calibration is None:
            from weft.sw.accuracy import DECODER_CALIBRATION
            calibration = DECODER_CALIBRATION
        if tok is None and any(isinstance(c, str) or (len(c) and isinstance(c[0], Mapping)) for c in calibration):
            raise GenerateError("text calibration needs a tokenizer (or pass id lists)")
        pad = min(tok.stop_ids) if tok is not None else model.cfg.pad_token_id
        seqs = [_prompt_ids(tok, c)[:prompt_len + decode_steps] for c in calibration]
        t = time.perf_counter()
        pcal = Calibrator(pg)
        for ids in seqs:
            feed = np.full((1, prompt_len), pad, dtype=np.int64)
            n = min(len(ids), prompt_len)
            feed[0, :n] = ids[:n]
            pcal.add({"input_ids": feed})

        def qopts(cal):
            return dict(method="max", channel_scales=cal.channel_scales(alpha) if alpha > 0 else None,
                        vector_channel_scales=cal.channel_scales(vector_alpha) if alpha > 0 else None,
                        amax=cal.amax, int32_outputs=["logits"], digits=digit_alpha is not None,
                        digit_channel_scales=cal.channel_scales(digit_alpha) if digit_alpha else None,
                        prob_digits=prob_digits, wide_linears=wide_linears, norm_digits=norm_digits)

        pqg = quantize(pg, {k: c / 127.0 for k, c in pcal.thresholds("max").items()}, **qopts(pcal))
        # decode: float steps of the decode graph, the past from the float model's own cache
        dcal = Calibrator(dg)
        names = S.decode_io_names(model.cfg)[0]
        for ids in seqs:
            n0 = max(1, min(len(ids) - decode_steps, prompt_len))
            with torch.inference_mode():
                _, cache = model.prefill(ids[:n0])
                for pos in range(n0, min(len(ids), max_context)):
                    feeds = {"input_ids": np.array([[ids[pos]]], dtype=np.int64),
                             "position": np.array([pos], dtype=np.int64)}
                    for i, (k, v) in enumerate(cache.layers):
                        for name, x in ((names[2 + 2 * i], k), (names[3 + 2 * i], v)):
                            full = np.zeros((1, x.shape[1], max_context, x.shape[3]), dtype=np.float32)
                            full[:, :, :x.shape[2]] = x.numpy()
                            feeds[name] = full
                    dcal.add(feeds)
                    _, cache = model.decode_step(ids[pos], cache)
        fixed = {}
        for i in range(model.cfg.num_layers):
            for kind in ("key", "value"):
                s = float(pqg.act_scales[f"present_{kind}.{i}"])
                fixed[f"present_{kind}.{i}"] = fixed[f"past_{kind}.{i}"] = s
        dqg = quantize(dg, {k: c / 127.0 for k, c in dcal.thresholds("max").items()}, fixed_scales=fixed,
                       **qopts(dcal))
        timings["calibrate + quantize"] = time.perf_counter() - t
        return cls(model, pqg, dqg, prompt_len, max_context, pad, timings)

    # ------------------------------------------------------------------ steps
    def prefill(self, ids: Sequence[int]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run up to ``prompt_len`` tokens; returns the logits at the last one and the cache
        (float arrays holding the int8 values times their scales, as the bundle outputs them)."""
        from weft.compiler.reference import run_int8
        from weft.sw.models import smollm2 as S

        n = len(ids)
        if not 0 < n <= self.prompt_len:
            raise GenerateError(f"prefill takes 1..{self.prompt_len} tokens, got {n}")
        feed = np.full((1, self.prompt_len), self.pad_id, dtype=np.int64)
        feed[0, :n] = ids
        out = run_int8(self.prefill_qg, {"input_ids": feed})
        names = S.prefill_io_names(self.model.cfg)[1][1:]
        return out["logits"][0, n - 1], [out[k] for k in names]

    def step(self, token: int, position: int, cache: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One decode step: ``token`` at ``position`` (= tokens already cached)."""
        from weft.compiler.reference import run_int8
        from weft.sw.models import smollm2 as S

        if not 0 <= position < self.max_context:
            raise GenerateError(f"position {position} is outside the cache of {self.max_context} slots")
        ins, outs = S.decode_io_names(self.model.cfg)
        feeds = {"input_ids": np.array([[int(token)]], dtype=np.int64), "position": np.array([position], dtype=np.int64)}
        feeds.update(zip(ins[2:], cache))
        out = run_int8(self.decode_qg, feeds)
        return out["logits"][0, -1], [out[k] for k in outs[1:]]

    # ------------------------------------------------------------------ bundles
    def bundles(self, config) -> tuple[object, object]:
        """The prefill and decode-step bundles for ``config`` (an ``AcceleratorConfig`` or its
        name), lowered once per configuration (``timings``: "lower prefill", "lower decode")."""
        import time

        from weft.compiler.lower import LoweringError, lower

        cfg = _accelerator_config(config)
        if cfg.name not in self._bundles:
            out = []
            for what, qg in (("prefill", self.prefill_qg), ("decode", self.decode_qg)):
                t = time.perf_counter()
                try:
                    out.append(lower(qg, cfg, model=f"smollm2-{what}"))
                except LoweringError as exc:
                    raise GenerateError(f"the {what} graph does not lower for configuration {cfg.name!r}: {exc}") \
                        from None
                self.timings[f"lower {what}"] = time.perf_counter() - t
            self._bundles[cfg.name] = tuple(out)
        return self._bundles[cfg.name]


def _accelerator_config(config):
    from weft.hw.config import AcceleratorConfig, ConfigError, load_config

    if isinstance(config, AcceleratorConfig):
        return config
    try:
        return load_config(config)
    except (ConfigError, OSError) as exc:
        raise GenerateError(f"accelerator configuration {config!r}: {exc}") from None


class _Int8Backend:
    """The graphs through ``run_int8``; the cache is host arrays (dequantized int8)."""

    def __init__(self, prog: DecoderProgram):
        self.prog = prog
        self.cache: list[np.ndarray] = []

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        logits, self.cache = self.prog.prefill(ids)
        return logits

    def step(self, token: int, position: int) -> np.ndarray:
        logits, self.cache = self.prog.step(token, position, self.cache)
        return logits


class BundleBackend:
    """A :class:`DecoderProgram`'s bundles on the bit-exact model: the prefill bundle through
    ``run_bundle``, its cache outputs copied (stored integers, unchanged) into a
    :class:`~weft.sw.decode_session.DecodeSession` of the decode-step bundle, then one session
    step per token. Logits are real numbers (the int32 accumulators times their column scales),
    as ``run_int8``'s."""

    def __init__(self, prog: DecoderProgram, config="default"):
        from weft.sw.decode_session import DecodeSession
        from weft.sw.models import smollm2 as S

        self.prog = prog
        self.config = _accelerator_config(config)
        self.prefill_bundle, self.decode_bundle = prog.bundles(self.config)
        self.session = DecodeSession.on_golden(self.decode_bundle, prog.decode_qg.graph, self.config)
        # prefill cache output -> decode cache input: the same scale and column order, or the copy is wrong
        pre, dec = self.prefill_bundle.metadata, self.decode_bundle.metadata
        self.cache_names = list(zip(S.prefill_io_names(prog.model.cfg)[1][1:], S.decode_io_names(prog.model.cfg)[0][2:]))
        for out, inp in self.cache_names:
            a, b = self.prefill_bundle.output(out), self.decode_bundle.input(inp)
            if a.scale != b.scale or pre.get("output_column_perm", {}).get(out) != dec.get("input_column_perm", {}).get(inp):
                raise GenerateError(f"the prefill's {out!r} and the decode step's {inp!r} differ in scale or column "
                                    "order: the prefill's cache cannot be copied into the decode step")

    @staticmethod
    def _real_logits(bundle, raw: np.ndarray) -> np.ndarray:
        chan = np.asarray(bundle.metadata["output_channel_scales"]["logits"], dtype=np.float64)
        return (raw.astype(np.float64) * chan).astype(np.float32)

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        from weft.compiler.pipeline import host_inputs
        from weft.sim.golden import run_bundle

        prog, n = self.prog, len(ids)
        if not 0 < n <= prog.prompt_len:
            raise GenerateError(f"prefill takes 1..{prog.prompt_len} tokens, got {n}")
        feed = np.full((1, prog.prompt_len), prog.pad_id, dtype=np.int64)
        feed[0, :n] = ids
        outputs, _ = run_bundle(self.prefill_bundle, host_inputs(prog.prefill_qg.graph, {"input_ids": feed},
                                                                 self.prefill_bundle), self.config)
        self.session.load_cache({inp: outputs[out] for out, inp in self.cache_names})
        return self._real_logits(self.prefill_bundle, outputs["logits"])[0, n - 1]

    def step(self, token: int, position: int) -> np.ndarray:
        if not 0 <= position < self.prog.max_context:
            raise GenerateError(f"position {position} is outside the cache of {self.prog.max_context} slots")
        out = self.session.step({"input_ids": np.array([[int(token)]], dtype=np.int64),
                                 "position": np.array([position], dtype=np.int64)})
        return self._real_logits(self.decode_bundle, out["logits"])[0, -1]


def generate(model, tok, prompt, max_new_tokens: int = 64, *, device: str = "int8",
             program: DecoderProgram | None = None, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, stop_ids: Sequence[int] | None = None, config="default",
             **build) -> Iterator:
    """Stream :class:`weft.sw.models.smollm2.GeneratedToken` s for ``prompt`` (text, chat messages
    or token ids) on ``device`` (see the module docstring). ``program``: a prebuilt
    :class:`DecoderProgram` (otherwise built with ``build`` options). ``config``: the accelerator
    configuration (or its name) the bundles are compiled for (``device="golden"``). Greedy at
    temperature 0; otherwise seeded temperature / top-p sampling (the same sampler as the float
    model's)."""
    import torch

    from weft.sw.models import smollm2 as S

    if device not in DEVICES:
        raise GenerateError(f"unknown device {device!r} (choose from {', '.join(DEVICES)})")
    if device == "float":
        yield from S.generate(model, tok, prompt, max_new_tokens, temperature=temperature, top_p=top_p,
                              seed=seed, stop_ids=stop_ids)
        return
    if max_new_tokens < 0:
        raise GenerateError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:
        raise GenerateError(f"top_p must be in (0, 1], got {top_p}")
    if temperature < 0.0:
        raise GenerateError(f"temperature must be >= 0, got {temperature}")
    ids = _prompt_ids(tok, prompt)
    if not ids:
        raise GenerateError("empty prompt")
    if device == "golden":
        config = _accelerator_config(config)  # a bad name fails here, before the compilation
    prog = program or DecoderProgram.build(model, tok, **build)
    if len(ids) >= prog.max_context:
        raise GenerateError(f"prompt of {len(ids)} tokens does not fit the {prog.max_context}-slot KV cache")
    stop = frozenset(int(i) for i in stop_ids) if stop_ids is not None else tok.stop_ids
    gen = torch.Generator()
    gen.manual_seed(int(seed) if seed is not None else int(torch.seed() % (2**63)))
    backend = BundleBackend(prog, config) if device == "golden" else _Int8Backend(prog)
    n0 = min(len(ids), prog.prompt_len)
    logits = backend.prefill(ids[:n0])
    for pos in range(n0, len(ids)):  # a prompt longer than the prefill bucket: decode steps
        logits = backend.step(ids[pos], pos)
    pos = len(ids)
    out: list[int] = []
    shown = ""
    for _ in range(max_new_tokens):
        t = S._sample(torch.from_numpy(np.asarray(logits, dtype=np.float32)), temperature, top_p, gen)
        if t in stop:
            return
        out.append(t)
        full = tok.decode(out, skip_special_tokens=True)
        text = ""
        if not full.endswith("\ufffd"):
            text, shown = full[len(shown):], full
        yield S.GeneratedToken(t, text)
        if len(out) == max_new_tokens or pos >= prog.max_context:
            return
        logits = backend.step(t, pos)
        pos += 1
