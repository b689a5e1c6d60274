"""weft's own onnxscript rewrite rules for decoder LMs (Llama family: SmolLM2).

onnxscript's transformer fusions (run first, :func:`weft.compiler.frontend.canonicalize`) already
turn the RMSNorm decomposition into ``SimplifiedLayerNormalization`` and the residual add before
it into ``com.microsoft::SkipSimplifiedLayerNormalization``. Its rotary-embedding and
grouped-query-attention fusions need ORT's packed cos/sin caches and past/present layouts, which
a fixed-shape export does not have, so these rules match what ``torch.onnx.export`` writes for
HF-style modules and replace it by ``ai.weft`` ops the front end converts to IR ops:

* **Rope** (rotate-half RoPE): ``x * cos + concat(-x[..., D/2:], x[..., :D/2]) * sin`` ->
  ``ai.weft::Rope(x, cos, sin)``.
* **SwiGLU**: ``(g * sigmoid(g)) * up`` -> ``ai.weft::SwiGLU(g, up)``.
* **GQAttention** (grouped-query attention core, q [B, H, S, D], k and v [B, KV, Skv, D]):
  ``reshape(q, [B, KV, G*S, D]) @ k^T * scale``, optionally ``where(cond, -inf, .)`` in the
  ``[B, KV, G, S, Skv]`` view (``cond`` True = masked), softmax, ``@ v``, reshape to
  ``[B, H, S, D]`` -> ``ai.weft::GQAttention(q, k, v[, cond])`` with attribute ``scale``.

Each rule checks what it relies on (slice bounds, last-axis concat, shapes, a scalar scale, a
very negative fill value); a near-miss is left alone and the converter then names the node that
has no IR conversion.
"""

from __future__ import annotations

import numpy as np

__all__ = ["decoder_rules", "apply_decoder_fusions", "WEFT_DOMAIN"]

WEFT_DOMAIN = "ai.weft"


def _const(v) -> np.ndarray | None:
    if v is None or v.const_value is None:
        return None
    return np.asarray(v.const_value.numpy())


def _static_shape(v) -> tuple[int, ...] | None:
    if v is None or v.shape is None or not v.shape.is_static():
        return None
    return tuple(int(d) for d in v.shape)


# ---------------------------------------------------------------------------- RoPE
def _rope_target(op, x, cos, sin, hs, he, ha, hst, ls, le, la, lst):
    hi = op.Slice(x, hs, he, ha, hst)
    lo = op.Slice(x, ls, le, la, lst)
    rot = op.Concat(op.Neg(hi), lo, _outputs=["rot"])
    return op.Add(op.Mul(x, cos), op.Mul(rot, sin))


def _rope_check(context, x, cos, sin, hs, he, ha, hst, ls, le, la, lst, rot, **_):
    shape = _static_shape(x)
    if shape is None or shape[-1] % 2:
        return False
    d = shape[-1]
    vals = [_const(v) for v in (hs, he, ha, hst, ls, le, la, lst)]
    if any(v is None or v.size != 1 for v in vals):
        return False
    hs_, he_, ha_, hst_, ls_, le_, la_, lst_ = (int(v.reshape(())) for v in vals)
    last = {-1, len(shape) - 1}
    if ha_ not in last or la_ not in last or hst_ != 1 or lst_ != 1:
        return False
    if hs_ != d // 2 or he_ < d or ls_ != 0 or le_ != d // 2:
        return False
    axis = rot.producer().attributes.get_int("axis", 0)
    if axis not in last:
        return False
    for t in (cos, sin):
        ts = _static_shape(t)
        if ts is None or ts[-1] != d:
            return False
    return True


def _rope_replace(op, x, cos, sin, **_):
    return op.Rope(x, cos, sin, _domain=WEFT_DOMAIN)


# ---------------------------------------------------------------------------- SwiGLU
def _swiglu_target(op, g, up):
    return op.Mul(op.Mul(g, op.Sigmoid(g)), up)


def _swiglu_check(context, g, up, **_):
    return _static_shape(g) is not None and _static_shape(g) == _static_shape(up)


def _swiglu_replace(op, g, up, **_):
    return op.SwiGLU(g, up, _domain=WEFT_DOMAIN)


# ---------------------------------------------------------------------------- GQA attention
def _gqa_masked_target(op, q, k, v, shape_q, scale, shape5, cond, fill, shape4, shape_out):
    s = op.MatMul(op.Reshape(q, shape_q), op.Transpose(k, _outputs=["kt"]))
    s = op.Reshape(op.Mul(s, scale), shape5)
    s = op.Reshape(op.Where(cond, fill, s), shape4)
    p = op.Softmax(s, _outputs=["probs"])
    return op.Reshape(op.MatMul(p, v), shape_out)


def _gqa_plain_target(op, q, k, v, shape_q, scale, shape_out):
    s = op.Mul(op.MatMul(op.Reshape(q, shape_q), op.Transpose(k, _outputs=["kt"])), scale)
    p = op.Softmax(s, _outputs=["probs"])
    return op.Reshape(op.MatMul(p, v), shape_out)


def _k_perm(kt) -> list[int]:
    return list(kt.producer().attributes.get_ints("perm", []))


def _gqa_check(context, q, k, v, scale, kt, probs, fill=None, cond=None, **_):
    qs, ks, vs = _static_shape(q), _static_shape(k), _static_shape(v)
    if qs is None or ks is None or vs is None or len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        return False
    perm = _k_perm(kt)
    if perm == [0, 2, 3, 1]:  # k still [B, Skv, KV, D]: the exporter merged the head transpose into k^T
        ks = (ks[0], ks[2], ks[1], ks[3])
    elif perm != [0, 1, 3, 2]:
        return False
    b, h, s, d = qs
    _, kv, skv, dk = ks
    if dk != d or vs[:3] != ks[:3] or kv < 1 or h % kv:
        return False
    if probs.producer().attributes.get_int("axis", -1) not in (-1, 3):
        return False
    sc = _const(scale)
    if sc is None or sc.size != 1:
        return False
    if fill is not None:
        f = _const(fill)
        if f is None or f.size != 1 or not float(f.reshape(())) < -1e4:
            return False
        cs = _static_shape(cond)
        if cs is None:
            return False
        try:
            np.broadcast_shapes(cs, (b, kv, h // kv, s, skv))
        except ValueError:
            return False
    return True


def _k_heads(op, k, kt):
    return op.Transpose(k, perm=[0, 2, 1, 3]) if _k_perm(kt) == [0, 2, 3, 1] else k


def _gqa_masked_replace(op, q, k, v, scale, cond, kt, **_):
    return op.GQAttention(q, _k_heads(op, k, kt), v, cond, _domain=WEFT_DOMAIN, scale=float(_const(scale).reshape(())))


def _gqa_plain_replace(op, q, k, v, scale, kt, **_):
    return op.GQAttention(q, _k_heads(op, k, kt), v, _domain=WEFT_DOMAIN, scale=float(_const(scale).reshape(())))


def decoder_rules():
    from onnxscript.rewriter import pattern

    return pattern.RewriteRuleSet([
        pattern.RewriteRule(_rope_target, _rope_replace, _rope_check, name="weft.rope"),
        pattern.RewriteRule(_swiglu_target, _swiglu_replace, _swiglu_check, name="weft.swiglu"),
        pattern.RewriteRule(_gqa_masked_target, _gqa_masked_replace, _gqa_check, name="weft.gqa_attention"),
        pattern.RewriteRule(_gqa_plain_target, _gqa_plain_replace, _gqa_check, name="weft.gqa_attention_nomask"),
    ], commute=True)


def apply_decoder_fusions(model) -> dict[str, int]:
    """Apply the rules to an onnx-ir model in place; returns counts per fused op."""
    count = decoder_rules().apply_to_model(model)
    if not count:
        return {}
    ops: dict[str, int] = {}
    for n in model.graph:
        if n.domain == WEFT_DOMAIN:
            ops[n.op_type] = ops.get(n.op_type, 0) + 1
    if ops and not any(d == WEFT_DOMAIN for d in model.opset_imports):
        model.opset_imports[WEFT_DOMAIN] = 1
    return {f"weft_{k.lower()}": v for k, v in ops.items()}
