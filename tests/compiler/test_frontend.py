"""ONNX front end: fusions on both MiniLM exports, float executor vs onnxruntime, errors, QDQ,
ONNX's own node tests."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from weft.compiler.frontend import DynamicShapeError, FrontendError, UnsupportedOpError, import_onnx
from weft.compiler.reference import run_float
from weft.sw.models.export import run_onnx
from weft.sw.models.minilm import MiniLM, tiny_config


@pytest.fixture(scope="module")
def tiny():
    return MiniLM.random(tiny_config())


def _feeds(shape, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 100, shape).astype(np.int64)
    mask = np.ones(shape, np.int64)
    mask[:, shape[1] * 2 // 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_minilm_fusions_and_float_match(tiny, exporter):
    path = tiny.export_onnx(seq_len=32, exporter=exporter)
    g = import_onnx(path)
    L = tiny.config.num_hidden_layers
    counts = g.op_counts()
    assert counts["Attention"] == L
    assert counts["Gelu"] == L
    assert counts["LayerNorm"] == 2 * L + 1
    assert counts["Linear"] == 6 * L
    assert "MatMul" not in counts and "Softmax" not in counts and "Transpose" not in counts
    assert g.fusions["weft.bias_into_linear"] == 6 * L  # every Linear got its bias
    assert g.fusions["onnxscript.mha2"] == L and g.fusions["onnxscript.skip_layer_normalization"] == 2 * L + 1
    assert all(n.device == "host" for n in g.nodes if n.op in ("Gather", "Cast", "Expand"))
    feeds = _feeds((1, 32))
    ours = run_float(g, feeds)["last_hidden_state"]
    ref = run_onnx(path, feeds)[0]
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def _model(nodes, inputs, outputs, inits=(), opset=18):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    return m


def test_unsupported_op_names_node_and_lists_supported():
    m = _model([helper.make_node("Sin", ["x"], ["y"], name="my_sin")],
               [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    with pytest.raises(UnsupportedOpError) as exc:
        import_onnx(m)
    msg = str(exc.value)
    assert "my_sin" in msg and "Sin" in msg and "Supported ops:" in msg and "LayerNormalization" in msg


def test_unsupported_attribute():
    m = _model([helper.make_node("Gelu", ["x"], ["y"], name="g1", approximate="sigmoid")],
               [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], opset=20)
    with pytest.raises(FrontendError, match="g1"):
        import_onnx(m)


def test_dynamic_shape_error_and_fix():
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32), "w")
    m = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
               [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])], [w])
    with pytest.raises(DynamicShapeError, match=r"input 'x' dim 0 is dynamic \('batch'\)"):
        import_onnx(m)
    g = import_onnx(m, input_shapes={"x": [3, 4]})
    assert g.inputs[0].shape == (3, 4) and g.op_counts() == {"Linear": 1}


def test_malformed_file(tmp_path):
    p = tmp_path / "bad.onnx"
    p.write_bytes(b"not an onnx file")
    with pytest.raises(FrontendError, match="cannot read ONNX model"):
        import_onnx(p)


def test_qdq_import_weight_and_activation():
    rng = np.random.default_rng(1)
    wq = rng.integers(-127, 128, (8, 6)).astype(np.int8)
    ws = (rng.random(6) * 0.02 + 0.01).astype(np.float32)
    inits = [numpy_helper.from_array(wq, "wq"), numpy_helper.from_array(ws, "ws"),
             numpy_helper.from_array(np.array(0.05, np.float32), "xs"), numpy_helper.from_array(np.array(0, np.int8), "xz"),
             numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq"),
             helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], name="wdq", axis=1),
             helper.make_node("MatMul", ["xd", "w"], ["mm"], name="mm"),
             helper.make_node("Add", ["mm", "b"], ["y"], name="add")]
    m = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 6])], inits)
    g = import_onnx(m)
    assert g.op_counts() == {"FakeQuant": 1, "Linear": 1}
    (wname, (q, s)), = g.qdq_weights.items()
    np.testing.assert_array_equal(q, wq)
    np.testing.assert_allclose(s, ws)
    x = rng.standard_normal((4, 8)).astype(np.float32)
    import onnxruntime as ort
    ref = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(run_float(g, {"x": x})["y"], ref, atol=1e-4)
    # the quantizer adopts the model's own scales and int8 weights
    from weft.compiler.quantize import quantize
    from weft.compiler.reference import run_int8
    qg = quantize(g, {"y": float(np.abs(ref).max() / 127)})
    (lp,) = qg.linears.values()
    np.testing.assert_array_equal(lp.weight, wq)
    assert lp.in_scale == pytest.approx(0.05)
    out = run_int8(qg, {"x": x})["y"]
    assert np.abs(out - ref).max() < 3 * float(np.abs(ref).max() / 127)


NODE_TEST_OPS = ("matmul", "gemm", "add", "mul", "softmax", "layer_normalization", "gelu", "transpose", "reshape")


def _node_cases():
    from onnx.backend.test.loader import load_model_tests

    out = []
    for case in load_model_tests(kind="node"):
        name = case.name[len("test_"):]
        if any(name == op or name.startswith(op + "_") for op in NODE_TEST_OPS) and not name.endswith("_expanded") \
                and "_expanded_" not in name:
            out.append(case)
    return out


def test_onnx_node_tests():
    """Each case compiles and matches, or is refused with a clear error; none fails."""
    passed, refused, failed = [], [], []
    for case in _node_cases():
        model = case.model
        data = case.data_sets[0] if case.data_sets else None
        if data is None:
            continue
        inputs, expected = data
        names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        try:
            g = import_onnx(model)
        except FrontendError as exc:
            assert str(exc)
            refused.append((case.name, str(exc)[:100]))
            continue
        try:
            out = run_float(g, dict(zip(names, inputs)))
            for o, e in zip(g.outputs, expected):
                np.testing.assert_allclose(out[o.name], e, rtol=1e-3, atol=1e-5)
                assert out[o.name].dtype == e.dtype, (out[o.name].dtype, e.dtype)
            passed.append(case.name)
        except Exception as exc:  # pragma: no cover - reported below
            failed.append((case.name, repr(exc)[:300]))
    print(f"\nONNX node tests: {len(passed)} passed, {len(refused)} refused, {len(failed)} failed")
    for name, why in refused:
        print("  refused", name, why)
    assert not failed, failed
    assert len(passed) >= 40


#: int8 tolerance for a node test compiled to a bundle: max |y - expected| within 3% of
#: max |expected|, i.e. about 4 steps of an output scale calibrated to the tensor's maximum
#: (input rounding, up to 2 LSB of op error and the output rounding).
INT8_NODE_TOLERANCE = 0.03


def test_onnx_node_tests_int8():
    """Each case compiles to an int8 bundle for `tiny` (calibrated on the case's own input)
    and matches the expected output on the bit-exact model within INT8_NODE_TOLERANCE, or
    is refused (importer or compiler) with an error naming the node, op or value."""
    from weft.compiler.lower import LoweringError
    from weft.compiler.pipeline import compile_graph, device_outputs, host_inputs
    from weft.compiler.quantize import QuantizeError
    from weft.hw.config import load_config
    from weft.sim.golden import run_bundle

    config = load_config("tiny")
    passed, refused, failed = [], [], []
    for case in _node_cases():
        if not case.data_sets:
            continue
        inputs, expected = case.data_sets[0]
        model = case.model
        names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
        feeds = dict(zip(names, inputs))
        try:
            g = import_onnx(model)
            result = compile_graph(g, config, [feeds])
        except (FrontendError, LoweringError, QuantizeError) as exc:
            assert str(exc)
            refused.append((case.name, str(exc)[:110]))
            continue
        try:
            outs, _ = run_bundle(result.bundle, host_inputs(g, feeds, result.bundle), config)
            got = device_outputs(result.bundle, outs)
            for o, e in zip(g.outputs, expected):
                err = np.abs(got[o.name].reshape(e.shape).astype(np.float64) - e).max()
                assert err <= INT8_NODE_TOLERANCE * np.abs(e).max(), (o.name, err, np.abs(e).max())
            passed.append(case.name)
        except Exception as exc:  # pragma: no cover - reported below
            failed.append((case.name, repr(exc)[:300]))
    print(f"\nONNX node tests as int8 bundles on tiny: {len(passed)} passed, {len(refused)} refused, "
          f"{len(failed)} failed")
    for name, why in refused:
        print("  refused", name, why)
    assert not failed, failed
    assert passed
