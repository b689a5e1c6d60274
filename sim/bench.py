"""Benchmarks of the simulators, printed as tables that say what they ran on."""

from __future__ import annotations

import math
import os
import platform
import time

import numpy as np

from weft.compiler.gemm import build_gemm_bundle
from weft.hw.config import AcceleratorConfig
from weft.sim.golden import run_bundle

__all__ = ["describe_host", "bench_golden", "bench_numerics", "format_table"]


def describe_host() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, numpy {np.__version__}"


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def bench_golden(config: AcceleratorConfig, shapes: list[tuple[int, int, int]], seed: int = 0) -> list[dict]:
    """Time the bit-exact model on int32 GEMM bundles; check each result against numpy."""
    rng = np.random.default_rng(seed)
    results = []
    for M, N, K in shapes:
        a = rng.integers(-128, 128, (M, K), dtype=np.int8)
        b = rng.integers(-128, 128, (K, N), dtype=np.int8)
        start = time.perf_counter()
        bundle = build_gemm_bundle(config, b, M)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        outputs, stats = run_bundle(bundle, {"a": a}, config)
        run_s = time.perf_counter() - start
        exact = bool(np.array_equal(outputs["c"], a.astype(np.int64) @ b.astype(np.int64)))
        count = sum(stats.instructions.values())
        results.append({"shape": f"{M}x{N}x{K}", "instructions": count, "build_s": build_s, "run_s": run_s,
                        "instr_per_s": count / run_s, "gmac_per_s": stats.macs / run_s / 1e9, "exact": exact})
    return results


# ---------------------------------------------------------------------- vector-unit numerics
def _errors(got: np.ndarray, ref: np.ndarray) -> dict:
    err = np.asarray(got, np.float64) - np.asarray(ref, np.float64)
    norm = float(np.linalg.norm(ref))
    return {"max_abs": float(np.abs(err).max()), "mean_abs": float(np.abs(err).mean()),
            "rel_l2": float(np.linalg.norm(err) / norm) if norm else 0.0}


def _minilm_activations(max_rows: int = 4096) -> dict[str, np.ndarray] | str:
    """Scores, GELU inputs, LayerNorm inputs (and its gamma/beta) of all-MiniLM-L6-v2 on a
    few sentences; a string saying why when the model is not available."""
    try:
        import torch

        from weft.sw.models.minilm import MiniLM
        m = MiniLM.from_pretrained()
    except Exception as exc:  # noqa: BLE001 - an optional data source; say why and go on
        return f"{type(exc).__name__}: {exc}"
    captured: dict[str, list] = {"q": [], "k": [], "gelu": [], "ln": []}
    hooks = []
    ln_module = None
    for name, module in m.model.named_modules():
        if name.endswith("self.query"):
            hooks.append(module.register_forward_hook(lambda mod, i, o: captured["q"].append(o.detach())))
        elif name.endswith("self.key"):
            hooks.append(module.register_forward_hook(lambda mod, i, o: captured["k"].append(o.detach())))
        elif name.endswith("intermediate.dense"):
            hooks.append(module.register_forward_hook(lambda mod, i, o: captured["gelu"].append(o.detach())))
        elif name.endswith("output.LayerNorm") and "attention" not in name:
            ln_module = ln_module or module  # first FFN-output LayerNorm: its gamma/beta
            hooks.append(module.register_forward_pre_hook(
                lambda mod, i: captured["ln"].append(i[0].detach()) if mod is ln_module else None))
    sentences = ["The weather is lovely today.", "It's so sunny outside!", "He drove to the stadium.",
                 "A quantized transformer runs on a small FPGA board with a systolic array.",
                 "Integer-only softmax, GELU and LayerNorm keep the accelerator exact.",
                 "Where is the nearest train station?", "The cat sat on the mat.",
                 "Sentence embeddings map text to vectors that capture meaning."]
    try:
        with torch.no_grad():
            m.encode(sentences)
    finally:
        for h in hooks:
            h.remove()
    heads, dh = m.config.num_attention_heads, m.config.head_dim
    scores = []
    for q, k in zip(captured["q"], captured["k"]):
        b, s, _ = q.shape
        qh = q.view(b, s, heads, dh).transpose(1, 2)
        kh = k.view(b, s, heads, dh).transpose(1, 2)
        scores.append((qh @ kh.transpose(-1, -2) / math.sqrt(dh)).reshape(-1, s))
    return {"scores": torch.cat(scores).numpy()[:max_rows].astype(np.float64),
            "gelu": torch.cat([g.reshape(-1) for g in captured["gelu"]]).numpy().astype(np.float64),
            "ln": torch.cat([x.reshape(-1, x.shape[-1]) for x in captured["ln"]]).numpy().astype(np.float64),
            "ln_gamma": ln_module.weight.detach().numpy().astype(np.float64),
            "ln_beta": ln_module.bias.detach().numpy().astype(np.float64)}


def bench_numerics(cols: int = 16, seed: int = 0, real: bool = True) -> tuple[list[dict], str]:
    """Accuracy of each vector-unit operation against float32 PyTorch on the same (already
    quantized) input; returns (rows, note on the data). Errors are in real units; ``lsb`` is
    max_abs / output scale."""
    import torch

    from weft.hw import vector_numerics as vn

    rng = np.random.default_rng(seed)
    t32 = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    rows: list[dict] = []

    def add(op, data, got, ref, out_scale, target=""):
        e = _errors(got, ref)
        lsb = float(np.max(np.abs(np.asarray(got) - ref) / out_scale))  # per-channel scales too
        ok = {"max_abs <= 0.01": e["max_abs"] <= 0.01, "max <= 2 LSB": lsb <= 2,
              "rel_l2 <= 1%": e["rel_l2"] <= 0.01}.get(target)
        rows.append({"op": op, "data": data, **e, "lsb": lsb, "target": target, "ok": ok})

    def softmax_case(name, scores, scale, kv_frac):
        M, L = scores.shape
        x = vn.saturate(np.rint(scores / scale), vn.INT32)
        kv = np.full(M, L) if kv_frac is None else rng.integers(max(1, int(L * kv_frac)), L + 1, M)
        for unsigned in (False, True):
            got = np.zeros((M, L))
            for k in np.unique(kv):  # one instruction per key length, as the compiler issues them
                sel = kv == k
                w = vn.softmax_params(scale, kv_len=int(k), cols=cols).ravel()[0]
                mask = vn.softmax_mask(int(sel.sum()), L, int(k), False, 0)
                got[sel] = vn.softmax_rows(x[sel], w, mask, unsigned=unsigned) * vn.softmax_output_scale(unsigned)
            valid = np.arange(L)[None, :] < kv[:, None]
            ref = torch.softmax(t32(x * scale).masked_fill(~torch.tensor(valid), -math.inf), -1).numpy()
            add(f"softmax ({'uint8' if unsigned else 'int8'} out)", name, got, ref,
                vn.softmax_output_scale(unsigned), "max_abs <= 0.01")

    def gated_case(func, name, xr, wide):
        params_fn, op_fn = (vn.gelu_params, vn.vec_gelu) if func == "gelu" else (vn.silu_params, vn.vec_silu)
        torch_fn = torch.nn.functional.gelu if func == "gelu" else torch.nn.functional.silu
        in_scale = float(np.abs(xr).max()) / ((1 << 20) if wide else 127)
        x = vn.saturate(np.rint(xr / in_scale), vn.INT32 if wide else vn.INT8)
        ref = torch_fn(t32(x * in_scale)).numpy().astype(np.float64)
        out_scale = float(np.abs(ref).max()) / 127
        w = params_fn(in_scale, out_scale, cols=cols).ravel()
        add(f"{func} ({'int32' if wide else 'int8'} in)", name, op_fn(x, w[0], w[1]) * out_scale, ref, out_scale,
            "max <= 2 LSB")

    def norm_case(kind, name, xr, gamma, beta):
        in_scale = float(np.abs(xr).max()) / (1 << 20)
        x = vn.saturate(np.rint(xr / in_scale), vn.INT32)
        L = x.shape[-1]
        xt = t32(x * in_scale)
        if kind == "layernorm":
            ref = torch.nn.functional.layer_norm(xt, (L,), t32(gamma), t32(beta), eps=1e-12).numpy()
        else:
            ref = (xt * torch.rsqrt((xt * xt).mean(-1, keepdim=True) + 1e-6) * t32(gamma)).numpy()
        ref = ref.astype(np.float64)
        n = -(-L // cols)
        # int8 output, one scale per tensor: the int8 rounding of the outlier-stretched range
        # dominates (no target). One scale per channel (what the compiler gives a norm's
        # output: the gains carry it) and a fine int32 output measure the algorithm.
        for label, out_scale, bounds, target in (
                ("int8 out, per tensor", float(np.abs(ref).max()) / 127, vn.INT8, ""),
                ("int8 out, per channel", np.maximum(np.abs(ref).max(axis=0), 1e-6) / 127, vn.INT8, "rel_l2 <= 1%"),
                ("algorithm, 2^-12 out", 2.0 ** -12, vn.INT32, "rel_l2 <= 1%")):
            if kind == "layernorm":
                P = vn.layernorm_params(in_scale, gamma, beta, out_scale, cols=cols)
                y = vn.layernorm_rows(x, int(P[0, 0]), P[1:1 + n].ravel()[:L], P[1 + n:].ravel()[:L], bounds)
            else:
                P = vn.rmsnorm_params(in_scale, gamma, out_scale, cols=cols)
                y = vn.rmsnorm_rows(x, int(P[0, 0]), P[1:1 + n].ravel()[:L], bounds)
            add(f"{kind} ({label})", name, y * out_scale, ref, out_scale, target)

    # Synthetic activations at realistic scales: Gaussian plus a heavy-tailed (Student t, 3
    # degrees of freedom) component; residual streams with a few outlier channels.
    M, L = 256, 128
    scores = rng.normal(0, 2.5, (M, L)) + 0.5 * rng.standard_t(3, (M, L))
    softmax_case("synthetic N(0,2.5)+t3, L=128, int32 scale 2^-12", scores, 2.0 ** -12, None)
    softmax_case("synthetic, key padding (kv_len >= L/4)", scores, 2.0 ** -12, 0.25)
    xr = np.concatenate([rng.normal(-0.5, 1.5, 60000), rng.standard_t(3, 20000) * 2])
    for wide in (True, False):
        gated_case("gelu", "synthetic N(-0.5,1.5)+t3", xr, wide)
        gated_case("silu", "synthetic N(-0.5,1.5)+t3", xr, wide)
    D = 384
    resid = rng.normal(0.05, 0.8, (256, D))
    resid[:, rng.choice(D, 4, replace=False)] *= 12  # outlier channels
    gamma, beta = rng.normal(1.0, 0.15, D), rng.normal(0, 0.1, D)
    norm_case("layernorm", "synthetic residual, 4 outlier channels, D=384", resid, gamma, beta)
    norm_case("rmsnorm", "synthetic residual, 4 outlier channels, D=384", resid, gamma, None)
    # Element-wise operations.
    a_scale, b_scale = 0.04, 3e-5
    a = rng.integers(-128, 128, 50000)
    b = vn.saturate(np.rint(rng.normal(0, 1.5, 50000) / b_scale), vn.INT32)
    ref = a * a_scale + b * b_scale
    out_scale = float(np.abs(ref).max()) / 127
    w = vn.add_params(a_scale, b_scale, out_scale, cols=cols).ravel()
    add("add (int8 + int32 -> int8)", "synthetic residual", vn.vec_add(a, b, w[0], w[1], vn.INT8) * out_scale,
        ref, out_scale)
    g = rng.integers(-128, 128, 50000)
    ref = (g * 0.03) * (b * b_scale)
    out_scale = float(np.abs(ref).max()) / 127
    w = vn.mul_params(0.03, b_scale, out_scale, cols=cols).ravel()
    add("mul (int8 x int32 -> int8)", "synthetic SwiGLU gate x up", vn.vec_mul(g, b, w[0], vn.INT8) * out_scale,
        ref, out_scale)
    pos, dh, x_scale = np.arange(0, 512), 64, 3 / 127
    xq = vn.saturate(np.rint(rng.normal(0, 1, (len(pos), dh)) / x_scale), vn.INT8)
    ang = pos[:, None] * 10000.0 ** (-np.arange(0, dh, 2) / dh)[None, :]
    x0, x1 = xq[:, 0::2] * x_scale, xq[:, 1::2] * x_scale
    ref = np.empty((len(pos), dh))
    ref[:, 0::2] = x0 * np.cos(ang) - x1 * np.sin(ang)
    ref[:, 1::2] = x0 * np.sin(ang) + x1 * np.cos(ang)
    ref = t32(ref).numpy().astype(np.float64)
    w = vn.rope_params(x_scale, x_scale, cols=cols).ravel()[0]
    add("rope (int8, Q14 table)", "synthetic N(0,1), positions 0..511, d=64",
        vn.vec_rope(xq, vn.rope_table(pos, dh), w, vn.INT8) * x_scale, np.clip(ref, -128 * x_scale, 127 * x_scale),
        x_scale)

    note = "synthetic data only"
    if real:
        acts = _minilm_activations()
        if isinstance(acts, str):
            note = f"synthetic data only (MiniLM activations unavailable: {acts})"
        else:
            note = "synthetic data and all-MiniLM-L6-v2 activations on 8 sentences"
            sc = acts["scores"]
            softmax_case("MiniLM attention scores", sc, float(np.abs(sc).max()) / (1 << 20), None)
            gated_case("gelu", "MiniLM FFN pre-activations", acts["gelu"], True)
            gated_case("gelu", "MiniLM FFN pre-activations", acts["gelu"], False)
            norm_case("layernorm", "MiniLM layer-0 FFN LayerNorm input", acts["ln"], acts["ln_gamma"], acts["ln_beta"])
    return rows, note

