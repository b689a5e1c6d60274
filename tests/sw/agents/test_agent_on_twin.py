"""The must-show on the RTL (issue #8): through the HTTP API, an agent retrieves with MiniLM
embeddings computed on the FPGA device *twin* (``fpga:sim@tiny``: MiniLM compiled to an int8
bundle for the ``tiny`` configuration, every sentence run on the Verilator twin of the core
through the driver API) and answers with SmolLM2 on the CPU device.

References: the same bundle on the bit-exact model (the twin is bit-exact, so the retrieved
scores are equal, not close) and the plain SmolLM2 reference generator (the answer).

The MiniLM is a random one smaller than ``tiny_config`` (1 layer, hidden 32) at sequence length
8: on the 4x4 ``tiny`` core the ``tiny_config`` model is ~32k instructions a sentence, about
5 s on the bit-exact model and 2 s on the twin; this one is ~2k. The twin of ``Core(tiny)`` is
built once (about a minute) and cached under ``.cache/twin`` (shared with tests/hil)."""

import asyncio
import json

import httpx
import numpy as np
import pytest

from weft.hw.config import load_config
from weft.sw.agents import AgentRunner, default_tools
import weft.sw.devices.fpga as fpga_mod
from weft.sw.devices import DeviceError, DeviceFailure, GoldenExecutor, Health, ModelSet, make_devices
from weft.sw.models import smollm2 as s
from weft.sw.models.minilm import MiniLM, tiny_config
from weft.sw.server import ServerThread, create_app

pytestmark = [pytest.mark.rtl, pytest.mark.verilator_only]

DOCS = ["the cat sat on the mat", "paris is the capital of france", "bananas are yellow fruit",
        "a train leaves the station at noon", "weft schedules agents on fpga boards"]
SEQ_LEN = 8


def _small_minilm_models() -> ModelSet:
    """MiniLM only: 1 layer, hidden 32, 2 heads, intermediate 64 (random weights, tiny tokenizer)."""
    return ModelSet(minilm=MiniLM.random(tiny_config(num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                                                     intermediate_size=64)), tiny=True)


def _events(url: str, run_id: str) -> list[dict]:
    out = []
    with httpx.stream("GET", f"{url}/v1/agents/runs/{run_id}/events", timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                if line == "data: [DONE]":
                    break
                out.append(json.loads(line[6:]))
    return out


def _golden_hits(encoder, config, query: str, k: int) -> list[dict]:
    """What RetrievalMemory returns, with every embedding computed by ``encoder``'s bundle on the
    bit-exact model: unit rows (float32), cosine = matrix @ query, stable descending order."""
    vecs, _ = encoder.embed(GoldenExecutor(config), DOCS + [query])
    vecs = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    docs, q = vecs[: len(DOCS)], vecs[len(DOCS)]
    scores = docs @ q
    order = np.argsort(-scores, kind="stable")[:k]
    return [{"index": int(i), "text": DOCS[i], "score": float(scores[i])} for i in order]


def test_agent_retrieves_on_the_fpga_twin_and_answers_on_the_cpu():
    tiny = load_config("tiny")
    lm = ModelSet.load(["smollm2"], tiny=True)
    enc_models = _small_minilm_models()
    built = {}

    def devices():
        # FPGA: MiniLM only, on the twin; CPU: SmolLM2 only, so each step's device is fixed
        (built["fpga"],) = make_devices("fpga:sim@tiny", enc_models, seq_len=SEQ_LEN)
        (built["cpu"],) = make_devices("cpu", lm, profile=False)
        return [built["fpga"], built["cpu"]]

    question = "paris is the capital of france"  # a stored document: its own nearest neighbour
    agent = {"name": "rag", "documents": DOCS, "steps": [
        {"id": "hits", "op": "retrieve", "query": "{{ input.question }}", "k": 2},
        {"id": "answer", "op": "generate", "max_tokens": 8,
         "messages": [{"role": "user", "content": "Context:\n{{ hits }}\nQuestion: {{ input.question }}"}]}]}
    app = create_app(devices, agents=AgentRunner(default_tools()))
    with ServerThread(app, startup_timeout_s=600) as url:
        fpga = built["fpga"]
        twin = fpga.executor.session.twin
        assert twin.alive and fpga.values == "bundle:driver" and fpga.mode == "board"
        health = httpx.get(url + "/health", timeout=30).json()
        assert "bundle:driver" in json.dumps(health) and "fpga:sim" in json.dumps(health)
        r = httpx.post(url + "/v1/agents/runs", json={"agent": agent, "input": {"question": question}}, timeout=30)
        assert r.status_code == 200, r.text
        events = _events(url, r.json()["id"])
        status = httpx.get(f"{url}/v1/agents/runs/{r.json()['id']}", timeout=30).json()
    # the server stopped: the engine closed the device, which shut the twin down
    assert not twin.alive and not twin.workdir.exists()
    assert fpga.executor.closed

    assert status["status"] == "completed", status["error"]
    hits, answer = status["steps"]
    assert hits["devices"] == ["fpga:sim"] and answer["devices"] == ["cpu"]
    memory = next(e for e in events if e["type"] == "memory.indexed")
    assert memory["devices"] == ["fpga:sim"]
    # every embedding (5 documents, 1 query) was a run of the bundle on the twin
    assert fpga.executor.runs == len(DOCS) + 1
    # the twin is bit-exact: the scores equal the same bundle's on the bit-exact model, exactly
    want = _golden_hits(fpga.encoder, tiny, question, 2)
    assert hits["output"] == want
    assert want[0]["text"] == question and want[0]["score"] == pytest.approx(1.0, abs=1e-6)
    # the answer: SmolLM2's reference generator on the same conversation
    context = "\n".join(h["text"] for h in hits["output"])
    ids = lm.smollm2_tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Context:\n{context}\nQuestion: {question}"}],
        add_generation_prompt=True, tokenize=True)
    ref = "".join(t.text for t in s.generate(lm.smollm2, lm.smollm2_tokenizer, ids, 8))
    assert status["output_text"] == ref == answer["text"]
    assert "".join(e["delta"] for e in events if e["type"] == "step.delta") == ref


def test_fpga_sim_spec_checks_launch_nothing_and_errors_close_what_was_built(monkeypatch):
    enc_models = _small_minilm_models()
    # without MiniLM (`weft serve` checks its --devices this way) no twin is launched
    (dev,) = make_devices("fpga:sim@tiny", ModelSet(), profile=False)
    assert dev.name == "fpga:sim" and not hasattr(dev.executor, "session")
    with pytest.raises(DeviceError, match="no built-in configuration 'nope'"):
        make_devices("fpga:sim@nope", enc_models)
    # a later error (duplicate name) stops the twin launched for an earlier item
    launched = []
    real = fpga_mod.DriverExecutor.launch_twin.__func__

    def spy(cls, config, **kw):
        ex = real(cls, config, **kw)
        launched.append(ex)
        return ex

    monkeypatch.setattr(fpga_mod.DriverExecutor, "launch_twin", classmethod(spy))
    with pytest.raises(DeviceError, match="duplicate device names"):
        make_devices("fpga:sim@tiny,fpga:sim@tiny", enc_models, seq_len=SEQ_LEN)
    assert len(launched) == 2 and all(ex.closed and not ex.session.twin.alive for ex in launched)


def test_a_twin_that_exits_fails_the_device():
    enc_models = _small_minilm_models()
    (dev,) = make_devices("fpga:sim@tiny", enc_models, seq_len=SEQ_LEN)
    try:
        v = asyncio.run(dev.embed("minilm", ["hello world"]))
        assert v.shape == (1, 32) and dev.executor.runs == 1
        twin = dev.executor.session.twin
        twin.process.kill()
        twin.process.wait(timeout=10)
        assert dev.health() is Health.FAILED and "twin of Core(tiny)" in dev.describe()["failure"]
        with pytest.raises(DeviceFailure):
            asyncio.run(dev.embed("minilm", ["hello world"]))
    finally:
        dev.close()
    assert dev.executor.closed and not twin.workdir.exists()
