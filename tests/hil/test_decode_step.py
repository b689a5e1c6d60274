"""A SmolLM2 decode step on the HIL target: a tiny random SmolLM2's decode-step bundle (KV cache
in place, append stores patched per step) kept loaded through the driver API, two steps, every
logit and the whole cache equal to ``run_int8``'s integers (the independent reference)."""

from __future__ import annotations

import numpy as np
import pytest

from weft.compiler.lower import lower
from weft.compiler.pipeline import device_outputs, host_inputs
from weft.compiler.reference import run_int8
from weft.sw.decode_session import DecodeSession
from weft.sw.generate import DecoderProgram
from weft.sw.models import smollm2 as S

from .conftest import TINY

pytestmark = [pytest.mark.rtl, pytest.mark.verilator_only]

PROMPT, CONTEXT = 4, 8


def test_smollm2_decode_step(session):
    """A SmolLM2 decode step."""
    model = S.SmolLM2.random(seed=1)
    prog = DecoderProgram.build(model, S.tiny_tokenizer(), prompt_len=PROMPT, max_context=CONTEXT,
                                calibration=[list(range(3, 3 + CONTEXT)), list(range(40, 40 + CONTEXT))])
    bundle = lower(prog.decode_qg, TINY, model="smollm2-tiny-decode")
    graph = prog.decode_qg.graph
    ins, outs = S.decode_io_names(model.cfg)
    ids = [11, 42, 7, 99, 23, 5]
    _, cache = prog.prefill(ids[:PROMPT])  # run_int8's cache after the prompt
    dec = DecodeSession.on_device(bundle, graph, session.device, timeout_s=300, watchdog_cycles=50_000_000)
    start = host_inputs(graph, dict(zip(ins[2:], cache)), bundle, names=dec.cache_inputs)
    dec.load_cache({name: bundle.input(name).stored(value) for name, value in start.items()})
    chan = np.asarray(bundle.metadata["output_channel_scales"]["logits"])
    for pos in range(PROMPT, PROMPT + 2):
        feeds = {"input_ids": np.array([[ids[pos]]]), "position": np.array([pos])}
        got = dec.step(feeds)
        assert dec.target.last_stats["instructions"] == len(bundle.program)
        ref = run_int8(prog.decode_qg, {**feeds, **dict(zip(ins[2:], cache))})
        want = np.rint(ref["logits"].astype(np.float64) / chan).astype(np.int64)
        np.testing.assert_array_equal(got["logits"].astype(np.int64).reshape(want.shape), want, err_msg=f"pos {pos}")
        cache = [ref[name] for name in outs[1:]]
    real = device_outputs(bundle, {**dec.read_cache(), "logits": got["logits"]})
    for name, want_cache in zip(outs[1:], cache):
        s = float(prog.decode_qg.act_scales[name])
        np.testing.assert_array_equal(np.rint(real[name] / s), np.rint(want_cache / s), err_msg=name)
