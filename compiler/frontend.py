"""ONNX front end: ONNX model -> canonical, fused ONNX -> the compiler's IR (:mod:`weft.compiler.ir`).

Steps of :func:`import_onnx`:

1. **Load and check the opset.** Default-domain opsets 13..21 are read (17..21 are what the
   project's exporters produce and what is tested on whole models). Below the canonical
   opset 18 the model is converted with ``onnx.version_converter``; 18..21 are kept as they
   are (the ops the IR takes have the same meaning there).
2. **Fix input shapes.** Every graph input must end up fully static: symbolic or unknown
   dimensions are taken from ``input_shapes``; one that is not given is an error naming the
   input and the dimension.
3. **QDQ.** ``DequantizeLinear`` on an int8 initializer (weight-only int8 or QDQ weights) is
   replaced by the float weight and the int8 values and scales are kept
   (``Graph.qdq_weights``); ``QuantizeLinear -> DequantizeLinear`` pairs on activations become
   ``FakeQuant`` IR nodes whose scale the quantizer adopts.
4. **Canonicalise and fuse with onnxscript / onnx-ir** (nothing hand-rolled here):
   ``RemoveInitializersFromInputsPass``, onnx shape inference, onnxscript's optimizer
   (constant folding, CSE, dead code, identity/no-op/transpose-transpose/reshape-reshape
   rules), the LayerNorm-decomposition fusion (``rules.fusion._layer_norm``), then onnxscript's
   transformer fusions (``ort_fusions._core.fuse_xformers``): erf-GELU, SkipLayerNorm,
   SDPA (scale, mask, softmax, weighted sum) and MultiHeadAttention (head split/merge
   reshapes/transposes absorbed), bias-GELU.
5. **Convert to the IR** (this module's own code): each ONNX / com.microsoft op maps onto IR
   ops (table :data:`SUPPORTED_OPS`); anything else is refused with :class:`UnsupportedOpError`
   naming the node, the op and the reason and listing what is supported. Then the frontend's
   own passes: constant bias adds (including the biases SkipLayerNormalization, BiasGelu and
   MultiHeadAttention carry) folded into the producing Linear, identity layout ops dropped,
   dead nodes removed, host/device placement.

Output shapes in the IR are computed by running each node's float kernel on zero inputs of
the known shapes, so the IR never depends on ONNX's shape inference having filled something in.
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx

from .ir import Graph, Node, Value
from .reference import float_kernel

__all__ = ["FrontendError", "UnsupportedOpError", "DynamicShapeError", "SUPPORTED_OPS",
           "CANONICAL_OPSET", "MIN_OPSET", "MAX_OPSET", "import_onnx", "canonicalize"]

CANONICAL_OPSET = 18
MIN_OPSET = 13
MAX_OPSET = 21
MS = "com.microsoft"


class FrontendError(ValueError):
    """The model cannot be imported: malformed, wrong opset, unsupported construct."""


class DynamicShapeError(FrontendError):
    """A graph input dimension is not static and was not given."""


#: (domain, op_type) -> what it becomes in the IR
SUPPORTED_OPS: dict[tuple[str, str], str] = {
    ("", "MatMul"): "Linear (constant 2-D weight) or MatMul",
    ("", "Gemm"): "Linear (constant B) or Transpose/MatMul/Mul/Add",
    ("", "Add"): "Add (or a Linear's bias)",
    ("", "Sub"): "Sub",
    ("", "Mul"): "Mul",
    ("", "Div"): "Div",
    ("", "Softmax"): "Softmax",
    ("", "LayerNormalization"): "LayerNorm",
    ("", "Gelu"): "Gelu",
    ("", "Transpose"): "Transpose",
    ("", "Reshape"): "Reshape (constant shape)",
    ("", "Flatten"): "Reshape",
    ("", "Squeeze"): "Reshape",
    ("", "Unsqueeze"): "Reshape",
    ("", "Expand"): "Expand (constant shape)",
    ("", "Cast"): "Cast",
    ("", "Gather"): "Gather",
    ("", "Identity"): "(removed)",
    ("", "Constant"): "(constant)",
    (MS, "Gelu"): "Gelu",
    (MS, "FastGelu"): "Gelu(approximate='tanh')",
    (MS, "BiasGelu"): "Linear bias + Gelu",
    (MS, "SkipLayerNormalization"): "Add + LayerNorm",
    (MS, "MultiHeadAttention"): "Attention",
    ("ai.weft", "FakeQuant"): "FakeQuant (from QuantizeLinear -> DequantizeLinear)",
    ("", "SimplifiedLayerNormalization"): "RMSNorm",
    (MS, "SimplifiedLayerNormalization"): "RMSNorm",
    (MS, "SkipSimplifiedLayerNormalization"): "Add + RMSNorm",
    ("", "Pad"): "Pad (constant zero padding)",
    ("", "Not"): "Not (host) or folded",
    ("", "Equal"): "Compare (host) or folded",
    ("", "LessOrEqual"): "Compare (host) or folded",
    ("", "Less"): "Compare (host) or folded",
    ("", "Greater"): "Compare (host) or folded",
    ("", "GreaterOrEqual"): "Compare (host) or folded",
    ("", "Where"): "CacheWrite (a KV-cache slot write) or Where (host)",
    ("", "Slice"): "(constant folded: slices of constant tables, e.g. RoPE cos/sin rows)",
    ("ai.weft", "Rope"): "Rope (fused rotate-half RoPE)",
    ("ai.weft", "SwiGLU"): "SwiGLU (fused silu(gate) * up)",
    ("ai.weft", "GQAttention"): "GQAttention (fused grouped-query attention core)",
}


def _supported_list() -> str:
    return ", ".join(f"{d + '::' if d else ''}{o}" for d, o in SUPPORTED_OPS)


class UnsupportedOpError(FrontendError):
    def __init__(self, node_name: str, op: str, reason: str):
        self.node_name, self.op, self.reason = node_name, op, reason
        super().__init__(f"node {node_name!r} (op {op}): {reason}. Supported ops: {_supported_list()}")


# ====================================================================== ONNX-level steps
def _load(model: str | os.PathLike | bytes | onnx.ModelProto) -> onnx.ModelProto:
    try:
        if isinstance(model, onnx.ModelProto):
            proto = onnx.ModelProto()
            proto.CopyFrom(model)
        elif isinstance(model, (bytes, bytearray)):
            proto = onnx.load_from_string(bytes(model))
        else:
            path = Path(model)
            if not path.is_file():
                raise FrontendError(f"ONNX file {path} does not exist")
            proto = onnx.load(str(path))
    except FrontendError:
        raise
    except Exception as exc:
        raise FrontendError(f"cannot read ONNX model: {exc}") from exc
    if not proto.HasField("graph"):
        raise FrontendError("ONNX model has no graph")
    return proto


def _opset(proto: onnx.ModelProto) -> int:
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise FrontendError("ONNX model imports no default-domain opset")


def _convert_opset(proto: onnx.ModelProto) -> onnx.ModelProto:
    version = _opset(proto)
    if not MIN_OPSET <= version <= MAX_OPSET:
        raise FrontendError(f"ONNX opset {version} is not supported (supported: {MIN_OPSET}..{MAX_OPSET})")
    if version < CANONICAL_OPSET:
        try:
            proto = onnx.version_converter.convert_version(proto, CANONICAL_OPSET)
        except Exception as exc:
            raise FrontendError(f"converting opset {version} to {CANONICAL_OPSET} failed: {exc}") from exc
    return proto


def _fix_input_shapes(proto: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]] | None) -> None:
    inits = {i.name for i in proto.graph.initializer}
    given = dict(input_shapes or {})
    names = [i.name for i in proto.graph.input if i.name not in inits]
    for key in given:
        if key not in names:
            raise FrontendError(f"input_shapes names {key!r}, which is not a graph input (inputs: {names})")
    for inp in proto.graph.input:
        if inp.name in inits:
            continue
        t = inp.type.tensor_type
        if not inp.type.HasField("tensor_type") or not t.HasField("shape"):
            if inp.name not in given:
                raise DynamicShapeError(f"input {inp.name!r} has no shape; pass input_shapes={{{inp.name!r}: [...]}}")
            t.shape.SetInParent()
        dims = list(t.shape.dim)
        want = given.get(inp.name)
        if want is not None:
            want = [int(d) for d in want]
            if len(want) != len(dims) and dims:
                raise FrontendError(f"input {inp.name!r}: input_shapes gives {len(want)} dims, the model has {len(dims)}")
            if not dims:
                for _ in want:
                    t.shape.dim.add()
                dims = list(t.shape.dim)
            for i, (d, w) in enumerate(zip(dims, want)):
                if d.HasField("dim_value") and d.dim_value != w:
                    raise FrontendError(f"input {inp.name!r} dim {i} is {d.dim_value} in the model, input_shapes gives {w}")
                if w < 1:
                    raise FrontendError(f"input {inp.name!r} dim {i}: size {w} must be at least 1")
                d.Clear()
                d.dim_value = w
        for i, d in enumerate(t.shape.dim):
            if not d.HasField("dim_value") or d.dim_value < 1:
                label = f"'{d.dim_param}'" if d.HasField("dim_param") else "unknown"
                raise DynamicShapeError(
                    f"input {inp.name!r} dim {i} is dynamic ({label}); the accelerator needs static shapes: "
                    f"pass input_shapes={{{inp.name!r}: [...]}}")


def _weight_key(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a, dtype=np.float32)
    return hashlib.sha256(str(a.shape).encode() + a.tobytes()).hexdigest()


def _qdq_prepass(proto: onnx.ModelProto) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, int]], int]:
    """Replace DequantizeLinear on int8 initializers by float initializers (recording the int8
    values and scales by content) and QuantizeLinear -> DequantizeLinear pairs on activations
    by ``ai.weft.FakeQuant`` nodes. Returns ({content key: (int8, scale, axis)}, pairs)."""
    from onnx import numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    consts = {}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)

    def const(name):
        if name in inits:
            return numpy_helper.to_array(inits[name])
        return consts.get(name)

    def attr(n, key, default):
        for a in n.attribute:
            if a.name == key:
                return onnx.helper.get_attribute_value(a)
        return default

    weights: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
    producers = {o: n for n in g.node for o in n.output}
    new_nodes = []
    pairs = 0
    removed_q = set()
    consumers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx"):
            x = const(n.input[0])
            scale = const(n.input[1]) if len(n.input) > 1 else None
            zp = const(n.input[2]) if len(n.input) > 2 and n.input[2] else None
            if x is not None and scale is not None:  # weight: DQ(initializer)
                axis = attr(n, "axis", 1)
                if zp is not None and np.any(zp != 0):
                    raise UnsupportedOpError(n.name, "DequantizeLinear", "weights must be symmetric (zero point 0)")
                if x.dtype != np.int8:
                    raise UnsupportedOpError(n.name, "DequantizeLinear", f"weights must be int8, got {x.dtype}")
                if scale.ndim == 0 or scale.size == 1:
                    w = x.astype(np.float32) * np.float32(scale.reshape(()))
                else:
                    shape = [1] * x.ndim
                    shape[axis % x.ndim] = -1
                    w = x.astype(np.float32) * scale.astype(np.float32).reshape(shape)
                weights[_weight_key(w)] = (x, np.asarray(scale, np.float32), axis % x.ndim if x.ndim else 0)
                t = numpy_helper.from_array(w.astype(np.float32), n.output[0])
                g.initializer.append(t)
                continue
            q = producers.get(n.input[0])
            if q is not None and q.op_type == "QuantizeLinear" and scale is not None:
                qzp = const(q.input[2]) if len(q.input) > 2 and q.input[2] else np.zeros((), np.int8)
                if scale.size != 1:
                    raise UnsupportedOpError(n.name, "DequantizeLinear", "activation scales must be per-tensor")
                zp = qzp if zp is None else zp
                info = np.iinfo(np.asarray(qzp).dtype)
                fq = onnx.helper.make_node(
                    "FakeQuant", [q.input[0]], [n.output[0]], name=n.name or f"fakequant_{pairs}", domain="ai.weft",
                    scale=float(scale.reshape(())), zero_point=int(np.asarray(zp).reshape(())),
                    qmin=int(info.min), qmax=int(info.max))
                new_nodes.append(fq)
                if consumers.get(q.output[0], 0) == 1:
                    removed_q.add(id(q))
                pairs += 1
                continue
            raise UnsupportedOpError(n.name, "DequantizeLinear",
                                     "only DequantizeLinear on a constant int8 weight or right after a QuantizeLinear is supported")
        new_nodes.append(n)
    if weights or pairs:
        keep = [n for n in new_nodes if id(n) not in removed_q]
        del g.node[:]
        g.node.extend(keep)
        if pairs and not any(i.domain == "ai.weft" for i in proto.opset_import):
            proto.opset_import.append(onnx.helper.make_opsetid("ai.weft", 1))
    return weights, pairs


def canonicalize(proto: onnx.ModelProto, *, fuse: bool = True):
    """Run onnx-ir / onnxscript passes and fusions on ``proto``; returns (ir.Model, fusion counts)."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common_passes
    from onnxscript import optimizer
    from onnxscript.rewriter.ort_fusions._core import fuse_xformers
    from onnxscript.rewriter.rules.fusion._layer_norm import fuse_layer_normalization

    try:
        proto = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as exc:
        raise FrontendError(f"ONNX shape inference failed: {exc}") from exc
    model = ir.from_proto(proto)
    common_passes.RemoveInitializersFromInputsPass()(model)
    counts: dict[str, int] = {}
    try:
        optimizer.optimize(model)
        if fuse:
            counts["layer_norm"] = fuse_layer_normalization(model)
            model, more = fuse_xformers(model)
            counts.update(more)
            from .fusions import apply_decoder_fusions
            counts.update(apply_decoder_fusions(model))
        common_passes.CommonSubexpressionEliminationPass()(model)
        common_passes.RemoveUnusedNodesPass()(model)
    except FrontendError:
        raise
    except Exception as exc:
        raise FrontendError(f"onnxscript optimisation failed: {type(exc).__name__}: {exc}") from exc
    return model, {k: v for k, v in counts.items() if v}


# ====================================================================== IR conversion
class _Builder:
    def __init__(self, model):
        import onnx_ir as ir

        self.ir = ir
        self.model = model
        self.nodes: list[Node] = []
        self.consts: dict[str, np.ndarray] = {}
        self.values: dict[str, Value] = {}
        self.alias: dict[str, str] = {}
        self.counter = 0
        self.own_fusions: dict[str, int] = {}

    # ---- values
    def fresh(self, base: str) -> str:
        self.counter += 1
        return f"{base}__{self.counter}"

    def name(self, v) -> str | None:
        if v is None:
            return None
        if v.const_value is not None and v.name not in self.values:
            name = v.name or self.fresh("const")
            if name not in self.consts:
                self.consts[name] = np.asarray(v.const_value.numpy())
            return name
        return self.alias.get(v.name, v.name)

    def const_of(self, v) -> np.ndarray | None:
        if v is None:
            return None
        if v.const_value is not None:
            return np.asarray(v.const_value.numpy())
        name = self.alias.get(v.name, v.name)
        return self.consts.get(name)

    def add_const(self, base: str, array: np.ndarray) -> str:
        name = self.fresh(base)
        self.consts[name] = np.asarray(array)
        return name

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.consts:
            return tuple(self.consts[name].shape)
        return self.values[name].shape

    # ---- nodes
    def emit(self, op: str, inputs: list[str | None], output: str | None, origin: str, **attrs) -> str:
        out = output or self.fresh(f"{origin}_{op.lower()}")
        self.used_names = getattr(self, "used_names", set())
        nname = origin if origin and origin not in self.used_names else self.fresh(f"{origin or op}/{op}")
        self.used_names.add(nname)
        node = Node(op, nname, list(inputs), [out], attrs, origin=(origin,))
        args = []
        for i in inputs:
            if i is None:
                args.append(None)
            elif i in self.consts:
                args.append(self.consts[i])
            else:
                v = self.values[i]
                args.append(np.zeros(v.shape, v.dtype))
        try:
            result = float_kernel(node, args)
        except Exception as exc:
            raise UnsupportedOpError(origin, op, f"cannot evaluate with input shapes "
                                     f"{[None if a is None else list(a.shape) for a in args]}: {exc}") from exc
        self.values[out] = Value(out, tuple(result.shape), result.dtype)
        self.nodes.append(node)
        return out

    def bind(self, onnx_value, ir_name: str) -> None:
        """Make the ONNX value ``onnx_value`` refer to IR value ``ir_name``."""
        if onnx_value.name != ir_name:
            self.alias[onnx_value.name] = ir_name


def _attrs(node) -> dict:
    return {k: a.value for k, a in node.attributes.items()}


def _np_dtype(onnx_type: int) -> np.dtype:
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(onnx_type)))


def _convert_node(b: _Builder, n) -> None:
    op, domain = n.op_type, n.domain or ""
    if domain == "ai.onnx":
        domain = ""
    name = n.name or b.fresh(op)
    a = _attrs(n)
    ins = list(n.inputs)
    outs = [o for o in n.outputs]

    def need_const(idx: int, what: str) -> np.ndarray:
        c = b.const_of(ins[idx]) if idx < len(ins) else None
        if c is None:
            raise UnsupportedOpError(name, op, f"{what} (input {idx}) must be a constant")
        return c

    def out_name(i=0):
        return outs[i].name

    def unused(idx_from: int) -> None:
        for o in outs[idx_from:]:
            if o is not None and o.uses():
                raise UnsupportedOpError(name, op, f"output {o.name!r} is used, but only the first output is supported")

    key = (domain, op)
    if key not in SUPPORTED_OPS:
        raise UnsupportedOpError(name, f"{domain + '::' if domain else ''}{op}", "no conversion to the accelerator IR")
    if key == ("", "Constant"):
        from onnx_ir import convenience  # noqa: F401
        val = a.get("value")
        if val is None:
            raise UnsupportedOpError(name, op, "only Constant with a 'value' tensor is supported")
        b.consts[out_name()] = np.asarray(val.numpy())
        return
    if key == ("", "Identity"):
        b.bind(outs[0], b.name(ins[0]))
        return
    if op == "MatMul":
        x, w = b.name(ins[0]), b.name(ins[1])
        wc = b.const_of(ins[1])
        tp = ins[1].producer() if wc is None and ins[1] is not None else None
        if tp is not None and tp.op_type == "Transpose" and tp.domain in ("", "ai.onnx"):
            src = b.const_of(tp.inputs[0])  # a tied weight (lm_head = embedding^T) the optimizer left unfolded
            perm = _attrs(tp).get("perm")
            if src is not None and src.ndim == 2 and (perm is None or list(perm) == [1, 0]):
                wc = np.ascontiguousarray(src.T)
                w = b.add_const(f"{name}_wT", wc)
        if wc is not None and wc.ndim == 2 and x not in b.consts and np.issubdtype(wc.dtype, np.floating):
            b.emit("Linear", [x, w], out_name(), name)
        else:
            b.emit("MatMul", [x, w], out_name(), name)
        return
    if op == "Gemm":
        alpha, beta = float(a.get("alpha", 1.0)), float(a.get("beta", 1.0))
        ta, tb = int(a.get("transA", 0)), int(a.get("transB", 0))
        x = b.name(ins[0])
        if ta:
            x = b.emit("Transpose", [x], None, name, perm=[1, 0])
        bc = b.const_of(ins[1])
        cc = b.const_of(ins[2]) if len(ins) > 2 and ins[2] is not None else None
        if bc is not None and np.issubdtype(bc.dtype, np.floating) and (len(ins) < 3 or ins[2] is None or cc is not None):
            w = (bc.T if tb else bc).astype(bc.dtype) * np.asarray(alpha, bc.dtype)
            bias = None
            if cc is not None:
                N = w.shape[1]
                cb = np.broadcast_to(cc, (b.shape(x)[0], N)) if cc.ndim else np.broadcast_to(cc, (N,))
                if cc.ndim <= 1 or cc.shape[0] == 1:
                    bias = b.add_const(f"{name}_bias", (np.asarray(cb).reshape(-1, N)[0] * beta).astype(w.dtype))
                else:
                    bias = None
                    full = b.add_const(f"{name}_c", (cc * beta).astype(w.dtype))
                    y = b.emit("Linear", [x, b.add_const(f"{name}_w", w)], None, name)
                    b.emit("Add", [y, full], out_name(), name)
                    return
            b.emit("Linear", [x, b.add_const(f"{name}_w", w)] + ([bias] if bias else []), out_name(), name)
            return
        w = b.name(ins[1])
        if tb:
            w = b.emit("Transpose", [w], None, name, perm=[1, 0])
        y = b.emit("MatMul", [x, w], None if (alpha != 1.0 or (len(ins) > 2 and ins[2] is not None)) else out_name(), name)
        last = y
        if alpha != 1.0:
            last = b.emit("Mul", [last, b.add_const(f"{name}_alpha", np.asarray(alpha, b.values[y].dtype))],
                          None if len(ins) > 2 and ins[2] is not None else out_name(), name)
        if len(ins) > 2 and ins[2] is not None:
            c = b.name(ins[2])
            if beta != 1.0:
                c = b.emit("Mul", [c, b.add_const(f"{name}_beta", np.asarray(beta, b.values[y].dtype))], None, name)
            b.emit("Add", [last, c], out_name(), name)
        return
    if op in ("Add", "Sub", "Mul", "Div"):
        b.emit(op, [b.name(ins[0]), b.name(ins[1])], out_name(), name)
        return
    if op == "Softmax":
        b.emit("Softmax", [b.name(ins[0])], out_name(), name, axis=int(a.get("axis", -1)))
        return
    if key == ("", "LayerNormalization"):
        unused(1)
        if int(a.get("stash_type", 1)) != 1:
            raise UnsupportedOpError(name, op, "stash_type must be 1 (float32 statistics)")
        need_const(1, "scale (gamma)")
        if len(ins) > 2 and ins[2] is not None:
            need_const(2, "bias (beta)")
        b.emit("LayerNorm", [b.name(ins[0]), b.name(ins[1]), b.name(ins[2]) if len(ins) > 2 else None], out_name(),
               name, axis=int(a.get("axis", -1)), epsilon=float(a.get("epsilon", 1e-5)))
        return
    if op == "Gelu" and domain == "":
        approx = a.get("approximate", "none")
        if approx not in ("none", "tanh"):
            raise UnsupportedOpError(name, op, f"approximate={approx!r} (supported: 'none', 'tanh')")
        b.emit("Gelu", [b.name(ins[0])], out_name(), name, approximate=approx)
        return
    if key in ((MS, "Gelu"), (MS, "FastGelu"), (MS, "BiasGelu")):
        x = b.name(ins[0])
        if len(ins) > 1 and ins[1] is not None:
            x = b.emit("Add", [x, b.name(ins[1])], None, name)
        b.emit("Gelu", [x], out_name(), name, approximate="tanh" if op == "FastGelu" else "none")
        return
    if key == (MS, "SkipLayerNormalization"):
        x, skip = b.name(ins[0]), b.name(ins[1])
        if len(ins) > 4 and ins[4] is not None:  # bias on the input (the dense layer's bias)
            x = b.emit("Add", [x, b.name(ins[4])], None, name)
        summed = b.emit("Add", [x, skip], None, name)
        for o in outs[1:3]:
            if o is not None and o.uses():
                raise UnsupportedOpError(name, op, f"mean / inverse std output {o.name!r} is used")
        if len(outs) > 3 and outs[3] is not None:
            b.bind(outs[3], summed)
        beta = b.name(ins[3]) if len(ins) > 3 and ins[3] is not None else None
        b.emit("LayerNorm", [summed, b.name(ins[2]), beta], out_name(), name,
               axis=-1, epsilon=float(a.get("epsilon", 1e-12)))
        return
    if key == (MS, "MultiHeadAttention"):
        if len(ins) < 3 or ins[1] is None or ins[2] is None:
            raise UnsupportedOpError(name, op, "packed QKV (no separate key/value inputs) is not supported")
        if len(ins) > 4 and ins[4] is not None:
            raise UnsupportedOpError(name, op, "key_padding_mask input is not supported (use an additive attention bias)")
        if len(ins) > 6 and any(i is not None for i in ins[6:]):
            raise UnsupportedOpError(name, op, "past key/value (KV cache) inputs are not supported")
        if int(a.get("unidirectional", 0)):
            raise UnsupportedOpError(name, op, "unidirectional (causal) attention is not supported yet")
        unused(1)
        heads = int(a["num_heads"])
        q, k, v = (b.name(i) for i in ins[:3])
        for t in (q, k, v):
            if len(b.shape(t)) != 3:
                raise UnsupportedOpError(name, op, f"query/key/value must be [batch, seq, hidden], got {list(b.shape(t))}")
        if len(ins) > 3 and ins[3] is not None:  # packed q/k/v bias
            bias = need_const(3, "bias")
            D = b.shape(q)[2]
            Dv = b.shape(v)[2]
            q = b.emit("Add", [q, b.add_const(f"{name}_qbias", bias[:D])], None, name)
            k = b.emit("Add", [k, b.add_const(f"{name}_kbias", bias[D:2 * D])], None, name)
            v = b.emit("Add", [v, b.add_const(f"{name}_vbias", bias[2 * D:2 * D + Dv])], None, name)
        dh = b.shape(q)[2] // heads
        scale = float(a.get("scale", 0.0)) or 1.0 / math.sqrt(dh)
        mask = b.name(ins[5]) if len(ins) > 5 and ins[5] is not None else None
        b.emit("Attention", [q, k, v, mask], out_name(), name, num_heads=heads, scale=scale)
        return
    if key in (("", "SimplifiedLayerNormalization"), (MS, "SimplifiedLayerNormalization")):
        unused(1)
        need_const(1, "scale (weight)")
        if int(a.get("axis", -1)) not in (-1, len(b.shape(b.name(ins[0]))) - 1):
            raise UnsupportedOpError(name, op, "only normalisation over the last axis is supported")
        b.emit("RMSNorm", [b.name(ins[0]), b.name(ins[1])], out_name(), name, epsilon=float(a.get("epsilon", 1e-5)))
        return
    if key == (MS, "SkipSimplifiedLayerNormalization"):
        x, skip = b.name(ins[0]), b.name(ins[1])
        need_const(2, "gamma")
        if len(ins) > 3 and ins[3] is not None:
            x = b.emit("Add", [x, b.name(ins[3])], None, name)
        for o in outs[1:3]:
            if o is not None and o.uses():
                raise UnsupportedOpError(name, op, f"mean / inverse std output {o.name!r} is used")
        summed = b.emit("Add", [x, skip], outs[3].name if len(outs) > 3 and outs[3] is not None else None, name)
        b.emit("RMSNorm", [summed, b.name(ins[2])], out_name(), name, epsilon=float(a.get("epsilon", 1e-5)))
        return
    compare = {"Equal": "equal", "LessOrEqual": "less_equal", "Less": "less", "Greater": "greater",
               "GreaterOrEqual": "greater_equal"}
    if domain == "" and (op in compare or op == "Not"):
        consts = [b.const_of(i) for i in ins]
        if all(c is not None for c in consts):  # mask preparation on constants: fold
            b.consts[out_name()] = np.logical_not(consts[0]) if op == "Not" else \
                getattr(np, compare[op].replace("less_equal", "less_equal"))(consts[0], consts[1])
            return
        if op == "Not":
            b.emit("Not", [b.name(ins[0])], out_name(), name)
        else:
            b.emit("Compare", [b.name(ins[0]), b.name(ins[1])], out_name(), name, fn=compare[op])
        return
    if key == ("", "Where"):
        c, x, y = (b.name(i) for i in ins[:3])
        cs, xs, ys = b.shape(c), b.shape(x), b.shape(y)
        if b.const_of(ins[0]) is not None and b.const_of(ins[1]) is not None and b.const_of(ins[2]) is not None:
            b.consts[out_name()] = np.where(b.const_of(ins[0]), b.const_of(ins[1]), b.const_of(ins[2]))
            return
        if len(ys) == 4 and len(xs) == 4 and xs[2] == 1 and xs[:2] == ys[:2] and xs[3] == ys[3] \
                and tuple(cs) == (1, 1, ys[2], 1):
            b.emit("CacheWrite", [y, x, c], out_name(), name)
            return
        b.emit("Where", [c, x, y], out_name(), name)
        return
    if key == ("", "Slice"):
        data = b.const_of(ins[0])
        if data is None:
            raise UnsupportedOpError(name, op, "only slices of constants are supported (folded at import)")
        starts, ends = need_const(1, "starts"), need_const(2, "ends")
        axes = need_const(3, "axes") if len(ins) > 3 and ins[3] is not None else np.arange(len(starts))
        steps = need_const(4, "steps") if len(ins) > 4 and ins[4] is not None else np.ones(len(starts), np.int64)
        sl = [slice(None)] * data.ndim
        for st, en, ax, sp in zip(starts.ravel(), ends.ravel(), axes.ravel(), steps.ravel()):
            sl[int(ax) % data.ndim] = slice(int(st), int(en), int(sp))
        b.consts[out_name()] = np.ascontiguousarray(data[tuple(sl)])
        return
    if key == ("", "Pad"):
        x = b.name(ins[0])
        mode = a.get("mode", "constant")
        if isinstance(mode, bytes):
            mode = mode.decode()
        if mode != "constant":
            raise UnsupportedOpError(name, op, f"mode {mode!r} (only constant zero padding is supported)")
        pads = need_const(1, "pads").astype(np.int64).ravel()
        if len(ins) > 2 and ins[2] is not None and np.any(need_const(2, "constant_value") != 0):
            raise UnsupportedOpError(name, op, "only zero padding is supported")
        rank = len(b.shape(x))
        if len(ins) > 3 and ins[3] is not None:
            axes = [int(ax) % rank for ax in need_const(3, "axes").ravel()]
        else:
            axes = list(range(rank))
        full = [[0, 0] for _ in range(rank)]
        for i, ax in enumerate(axes):
            full[ax] = [int(pads[i]), int(pads[i + len(axes)])]
        if any(p < 0 for pp in full for p in pp):
            raise UnsupportedOpError(name, op, "negative pads (cropping) are not supported")
        b.emit("Pad", [x], out_name(), name, pads=full)
        return
    if key == ("ai.weft", "Rope"):
        x = b.name(ins[0])
        D = b.shape(x)[-1]
        for i in (1, 2):
            t = b.name(ins[i])
            if b.shape(t)[-1] != D:
                raise UnsupportedOpError(name, op, f"cos/sin last axis {b.shape(t)[-1]} != head dim {D}")
        cos = b.const_of(ins[1])
        if cos is not None:
            h = D // 2
            c2 = np.asarray(cos).reshape(-1, D)
            if not np.allclose(c2[:, :h], c2[:, h:], atol=1e-6):
                raise UnsupportedOpError(name, op, "cos table is not in rotate-half layout (halves differ)")
        b.emit("Rope", [x, b.name(ins[1]), b.name(ins[2])], out_name(), name)
        return
    if key == ("ai.weft", "SwiGLU"):
        b.emit("SwiGLU", [b.name(ins[0]), b.name(ins[1])], out_name(), name)
        return
    if key == ("ai.weft", "GQAttention"):
        q, k, v = (b.name(i) for i in ins[:3])
        B, H, S, D = b.shape(q)
        KV, Skv = b.shape(k)[1], b.shape(k)[2]
        attrs = dict(scale=float(a["scale"]), causal=False, causal_offset=0)
        mask = None
        if len(ins) > 3 and ins[3] is not None:
            cond = b.const_of(ins[3])
            if cond is None:  # dynamic (host-computed) mask: must be a key prefix (kv_len on the device)
                mask = b.name(ins[3])
            else:
                masked = np.broadcast_to(np.asarray(cond).astype(bool).reshape((1,) * (5 - np.ndim(cond)) + np.shape(cond)),
                                         (B, KV, H // KV, S, Skv))
                if not np.all(masked == masked[:1, :1, :1]):
                    raise UnsupportedOpError(name, op, "constant attention mask differs between heads or batch items")
                valid = ~masked[0, 0, 0]
                j, i = np.arange(Skv)[None, :], np.arange(S)[:, None]
                offsets = [int(o) for o in range(-S, Skv + 1) if np.array_equal(valid, j <= i + o)]
                if valid.all():
                    pass
                elif offsets:
                    attrs.update(causal=True, causal_offset=offsets[-1] if valid.all() else offsets[0])
                else:
                    raise UnsupportedOpError(name, op, "constant attention mask is neither causal nor all-valid")
        b.emit("GQAttention", [q, k, v, mask], out_name(), name, **attrs)
        return
    if op == "Transpose":
        x = b.name(ins[0])
        perm = a.get("perm") or list(range(len(b.shape(x))))[::-1]
        b.emit("Transpose", [x], out_name(), name, perm=[int(p) for p in perm])
        return
    if op in ("Reshape", "Flatten", "Squeeze", "Unsqueeze"):
        x = b.name(ins[0])
        shp = outs[0].shape
        if op == "Reshape":
            target = need_const(1, "shape").astype(np.int64).tolist()
            if int(a.get("allowzero", 0)) and 0 in target:
                raise UnsupportedOpError(name, op, "allowzero=1 with a zero in the shape is not supported")
            src = b.shape(x)
            target = [src[i] if t == 0 else t for i, t in enumerate(target)]
            if -1 in target:
                known = int(np.prod([t for t in target if t != -1]))
                target[target.index(-1)] = int(np.prod(src)) // max(known, 1)
        elif shp is not None and shp.is_static():
            target = [int(d) for d in shp]
        else:
            src = b.shape(x)
            if op == "Flatten":
                ax = int(a.get("axis", 1)) % (len(src) + 1)
                target = [int(np.prod(src[:ax])), int(np.prod(src[ax:]))]
            else:
                axes = a.get("axes")
                if axes is None and len(ins) > 1 and ins[1] is not None:
                    axes = need_const(1, "axes").tolist()
                if op == "Squeeze":
                    axes = [ax % len(src) for ax in axes] if axes is not None else [i for i, s in enumerate(src) if s == 1]
                    target = [s for i, s in enumerate(src) if i not in axes]
                else:
                    if axes is None:
                        raise UnsupportedOpError(name, op, "axes must be a constant")
                    rank = len(src) + len(axes)
                    axes = sorted(ax % rank for ax in axes)
                    it = iter(src)
                    target = [1 if i in axes else next(it) for i in range(rank)]
        b.emit("Reshape", [x], out_name(), name, shape=[int(t) for t in target])
        return
    if op == "Expand":
        x = b.name(ins[0])
        shape = need_const(1, "shape").astype(np.int64).tolist()
        full = list(np.broadcast_shapes(tuple(b.shape(x)), tuple(shape)))
        b.emit("Expand", [x], out_name(), name, shape=full)
        return
    if op == "Cast":
        b.emit("Cast", [b.name(ins[0])], out_name(), name, to=_np_dtype(a["to"]).name)
        return
    if op == "Gather":
        b.emit("Gather", [b.name(ins[0]), b.name(ins[1])], out_name(), name, axis=int(a.get("axis", 0)))
        return
    if key == ("ai.weft", "FakeQuant"):
        b.emit("FakeQuant", [b.name(ins[0])], out_name(), name, scale=float(a["scale"]),
               zero_point=int(a["zero_point"]), qmin=int(a["qmin"]), qmax=int(a["qmax"]))
        return
    raise UnsupportedOpError(name, op, "no conversion to the accelerator IR")  # pragma: no cover


# ====================================================================== IR passes (own code)
def _fold_biases(g: Graph) -> int:
    """Add(Linear(x, W), b) with a constant b of shape [N] (or broadcast-equivalent) and a
    Linear output used only there -> Linear(x, W, b)."""
    folded = 0
    changed = True
    outputs = {o.name for o in g.outputs}
    while changed:
        changed = False
        prod = g.producers()
        cons = g.consumers()
        for n in list(g.nodes):
            if n.op != "Add":
                continue
            for side in (0, 1):
                lin_name, bias_name = n.inputs[side], n.inputs[1 - side]
                lin = prod.get(lin_name)
                if lin is None or lin.op != "Linear" or not g.is_const(bias_name):
                    continue
                if len(cons.get(lin_name, [])) != 1 or lin_name in outputs:
                    continue
                N = g.consts[lin.inputs[1]].shape[1]
                bias = g.consts[bias_name]
                if bias.size != N or (bias.ndim and bias.shape[-1] != N):
                    continue
                if np.broadcast_shapes(g.values[lin_name].shape, bias.shape) != g.values[lin_name].shape:
                    continue
                bias = bias.reshape(N).astype(g.consts[lin.inputs[1]].dtype)
                if len(lin.inputs) > 2 and lin.inputs[2] is not None:
                    bias = bias + g.consts[lin.inputs[2]]
                bname = f"{lin.name}.bias"
                g.consts[bname] = bias
                lin.inputs = [lin.inputs[0], lin.inputs[1], bname]
                lin.outputs = list(n.outputs)
                lin.origin = lin.origin + n.origin
                g.values[n.outputs[0]] = Value(n.outputs[0], g.values[lin_name].shape, g.values[lin_name].dtype)
                g.nodes.remove(n)
                folded += 1
                changed = True
                break
            if changed:
                break
    return folded


def _drop_identity_layout(g: Graph) -> int:
    outputs = {o.name for o in g.outputs}
    dropped = 0
    for n in list(g.nodes):
        ident = (n.op == "Reshape" and tuple(n.attrs["shape"]) == g.shape(n.inputs[0])) or \
                (n.op == "Transpose" and list(n.attrs["perm"]) == list(range(len(n.attrs["perm"])))) or \
                (n.op == "Expand" and tuple(n.attrs["shape"]) == g.shape(n.inputs[0]))
        if ident and n.outputs[0] not in outputs:
            src, dst = n.inputs[0], n.outputs[0]
            for m in g.nodes:
                m.inputs = [src if i == dst else i for i in m.inputs]
            g.nodes.remove(n)
            dropped += 1
    return dropped


def _dce(g: Graph) -> None:
    live = {o.name for o in g.outputs}
    keep = []
    for n in reversed(g.nodes):
        if any(o in live for o in n.outputs):
            keep.append(n)
            live.update(i for i in n.inputs if i is not None)
    g.nodes = keep[::-1]
    g.consts = {k: v for k, v in g.consts.items() if k in live}
    g.values = {k: v for k, v in g.values.items() if k in live or k in {i.name for i in g.inputs}}


def _place(g: Graph) -> None:
    host_values = {v.name for v in g.inputs}
    host_ops = {"Cast", "Sub", "Mul", "Add", "Div", "Reshape", "Expand", "Gather", "Transpose", "Compare", "Not", "Where"}
    for n in g.nodes:
        dyn = [i for i in n.inputs if i is not None and i not in g.consts]
        if n.op in host_ops and all(i in host_values for i in dyn):  # no dynamic input: constant-like
            n.device = "host"
            host_values.update(n.outputs)
        else:
            n.device = "device"
    # a graph output computed wholly on the host is still the host's business; nothing else to do


def import_onnx(model: str | os.PathLike | bytes | onnx.ModelProto, *,
                input_shapes: Mapping[str, Sequence[int]] | None = None, fuse: bool = True) -> Graph:
    """Import an ONNX model into the IR (see the module docstring for the steps).

    ``input_shapes`` fixes dynamic input dimensions (``{"input_ids": [1, 128]}``).
    ``fuse=False`` skips onnxscript's fusions (for debugging; unfused graphs usually contain
    ops the IR refuses, such as Erf). Raises :class:`FrontendError` (or its subclasses
    :class:`UnsupportedOpError`, :class:`DynamicShapeError`).
    """
    proto = _load(model)
    proto = _convert_opset(proto)
    opset = _opset(proto)
    _fix_input_shapes(proto, input_shapes)
    qdq_weights, qdq_pairs = _qdq_prepass(proto)
    irm, counts = canonicalize(proto, fuse=fuse)
    b = _Builder(irm)
    g_ir = irm.graph
    inputs = []
    for v in g_ir.inputs:
        if v.shape is None or not v.shape.is_static():
            raise DynamicShapeError(f"input {v.name!r} has a dynamic shape after import: {v.shape}")
        val = Value(v.name, tuple(int(d) for d in v.shape), np.dtype(v.dtype.numpy()))
        b.values[v.name] = val
        inputs.append(val)
    for name, init in g_ir.initializers.items():
        if init.const_value is not None:
            b.consts[name] = np.asarray(init.const_value.numpy())
    for n in g_ir:
        _convert_node(b, n)
    outputs = []
    for v in g_ir.outputs:
        nm = b.alias.get(v.name, v.name)
        if nm in b.consts:
            raise FrontendError(f"graph output {v.name!r} is a constant; nothing to compile")
        if nm not in b.values:
            raise FrontendError(f"graph output {v.name!r} is not produced by any supported node")
        if nm != v.name:  # output renamed by aliasing: keep the ONNX name
            b.emit("Reshape", [nm], v.name, "output", shape=list(b.values[nm].shape))
        outputs.append(b.values[v.name])
    g = Graph(inputs=inputs, outputs=outputs, nodes=b.nodes, values=b.values, consts=b.consts, opset=opset)
    own = {"bias_into_linear": _fold_biases(g), "identity_layout_removed": _drop_identity_layout(g)}
    if qdq_pairs:
        own["qdq_fake_quant"] = qdq_pairs
    _dce(g)
    _place(g)
    g.fusions = {**{f"onnxscript.{k}": v for k, v in counts.items()}, **{f"weft.{k}": v for k, v in own.items() if v}}
    if qdq_weights:
        for n in g.nodes:
            if n.op == "Linear":
                w = g.consts[n.inputs[1]]
                hit = qdq_weights.get(_weight_key(w))
                if hit is None and (hit_t := qdq_weights.get(_weight_key(w.T))) is not None:
                    hit = (hit_t[0].T, hit_t[1], 1 - hit_t[2] if hit_t[0].ndim == 2 else hit_t[2])
                if hit is not None:
                    q, scale, axis = hit
                    if q.ndim == 2 and scale.size > 1 and axis != 1:
                        raise UnsupportedOpError(n.name, "DequantizeLinear", "per-channel weight scales must be per output column (axis 1)")
                    g.qdq_weights[n.inputs[1]] = (q, np.broadcast_to(scale.reshape(-1), (q.shape[1],)).astype(np.float32).copy())
    g.validate()
    return g
