"""Agent programs (weft.sw.agents) and the agent-run HTTP API, on tiny random models.

The must-show runs through the HTTP API: an agent retrieves with MiniLM embeddings computed on the
FPGA device (MiniLM compiled to an int8 bundle and run on the bit-exact model, ``fpga:golden``)
and answers with SmolLM2 on the CPU device. References are the float MiniLM (cosine scores), the
plain SmolLM2 reference generator (answers) and numpy (top-k). The same agent with every embedding
run on the RTL (``fpga:sim``, the Verilator twin of the core) is in test_agent_on_twin.py."""

import asyncio
import json
import time

import httpx
import numpy as np
import pytest

from weft.hw.config import load_config
from weft.sw.agents import AgentRunner, AgentSpec, RetrievalMemory, ToolRegistry, calculate, default_tools
from weft.sw.agents.tools import ToolError
from weft.sw.devices import EncoderBundle, FpgaDevice, ModelSet, TorchDevice
from weft.sw.models import smollm2 as s
from weft.sw.server import ServerThread, create_app

DOCS = ["the cat sat on the mat", "paris is the capital of france", "bananas are yellow fruit",
        "a train leaves the station at noon", "weft schedules agents on fpga boards"]
ECHO = {"type": "function", "function": {"name": "lookup", "description": "look a city up",
                                        "parameters": {"type": "object", "properties": {
                                            "city": {"type": "string"}, "days": {"type": "integer"}},
                                            "required": ["city", "days"]}},
        "implementation": "slow_echo"}


@pytest.fixture(scope="module")
def models():
    return ModelSet.load(tiny=True)


@pytest.fixture(scope="module")
def encoder(models):
    # the tiny MiniLM compiled for the default configuration (about a second)
    return EncoderBundle.compile(models.minilm, load_config("default"), seq_len=16, calibration=DOCS)


def _lm_only(models):
    return ModelSet(smollm2=models.smollm2, smollm2_tokenizer=models.smollm2_tokenizer, tiny=True,
                    fingerprints={"smollm2": models.fingerprints["smollm2"]})


@pytest.fixture(scope="module")
def server(models, encoder, tmp_path_factory):
    tools = default_tools()

    async def slow_echo(args, ctx):  # a tool that takes a while: the session's KV stays pinned meanwhile
        await asyncio.sleep(0.2)
        return {"city": args["city"], "days": args["days"], "forecast": "sunny"}

    tools.register("slow_echo", slow_echo)
    built = {}

    def devices():
        # FPGA: MiniLM only (int8 bundle on the bit-exact model); CPU: SmolLM2 only, so each step's
        # device is fixed and the test can check where it ran
        built["fpga"] = FpgaDevice(load_config("default"), models=models, encoder=encoder, name="fpga:golden")
        built["cpu"] = TorchDevice(_lm_only(models), "cpu", profile=False)
        return [built["fpga"], built["cpu"]]

    app = create_app(devices, agents=AgentRunner(tools))
    with ServerThread(app) as url:
        yield url, built, app


def _events(url: str, run_id: str, **kw) -> list[dict]:
    out = []
    with httpx.stream("GET", f"{url}/v1/agents/runs/{run_id}/events", timeout=60, **kw) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                if line == "data: [DONE]":
                    break
                out.append(json.loads(line[6:]))
    return out


def _run(url: str, agent: dict, inputs: dict | None = None) -> tuple[dict, list[dict]]:
    r = httpx.post(url + "/v1/agents/runs", json={"agent": agent, "input": inputs or {}}, timeout=30)
    assert r.status_code == 200, r.text
    started = r.json()
    assert started["object"] == "agent.run" and started["status"] in ("queued", "running")
    events = _events(url, started["id"])
    status = httpx.get(f"{url}/v1/agents/runs/{started['id']}", timeout=30).json()
    return status, events


def _reference_answer(models, messages, n):
    ids = models.smollm2_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return "".join(t.text for t in s.generate(models.smollm2, models.smollm2_tokenizer, ids, n))


def _cos(models, a: str, b: str) -> float:
    va, vb = models.minilm.encode([a, b])
    return float(va @ vb)


# ------------------------------------------------------------------ must-show
def test_agent_retrieves_on_the_fpga_and_answers_on_the_cpu(server, models):
    url, built, _ = server
    question = "paris is the capital of france"  # a stored document: its own nearest neighbour
    agent = {"name": "rag", "documents": DOCS, "steps": [
        {"id": "hits", "op": "retrieve", "query": "{{ input.question }}", "k": 2},
        {"id": "answer", "op": "generate", "max_tokens": 8,
         "messages": [{"role": "user", "content": "Context:\n{{ hits }}\nQuestion: {{ input.question }}"}]}]}
    runs_before = built["fpga"].calls
    status, events = _run(url, agent, {"question": question})
    assert status["status"] == "completed", status["error"]
    hits, answer = status["steps"]
    # retrieval: embeddings computed on the FPGA device (the int8 bundle on the bit-exact model)
    assert hits["devices"] == ["fpga:golden"] and answer["devices"] == ["cpu"]
    assert built["fpga"].calls > runs_before and built["fpga"].values == "bundle:golden"
    assert hits["output"][0]["text"] == question and hits["output"][0]["score"] == pytest.approx(1.0, abs=1e-3)
    for h in hits["output"]:  # int8 accelerator scores agree with the float model's cosines
        assert h["score"] == pytest.approx(_cos(models, question, h["text"]), abs=0.02)
    others = sorted((d for d in DOCS if d != question), key=lambda d: -_cos(models, question, d))
    assert hits["output"][1]["score"] == pytest.approx(_cos(models, question, others[0]), abs=0.02)
    # the answer: SmolLM2's reference generator on the same conversation
    context = "\n".join(h["text"] for h in hits["output"])
    ref = _reference_answer(models, [{"role": "user", "content": f"Context:\n{context}\nQuestion: {question}"}], 8)
    assert status["output_text"] == ref == answer["text"]
    assert status["usage"]["completion_tokens"] == answer["usage"]["completion_tokens"] >= 1
    types = [e["type"] for e in events]
    assert types[0] == "run.started" and types[-1] == "run.completed"
    assert types.index("memory.indexed") < types.index("step.started")
    memory = next(e for e in events if e["type"] == "memory.indexed")
    assert memory["documents"] == len(DOCS) and memory["devices"] == ["fpga:golden"]
    assert "".join(e["delta"] for e in events if e["type"] == "step.delta") == ref
    assert [e["seq"] for e in events] == list(range(len(events)))
    metrics = httpx.get(url + "/metrics").text
    assert 'weft_agent_runs_total{agent="rag",status="completed"} 1.0' in metrics


def test_tool_call_keeps_the_session_on_its_device_and_reuses_the_kv_prefix(server, models):
    url, built, app = server
    cpu = built["cpu"]
    hits_before = getattr(cpu, "prefix_hits", 0)
    agent = {"name": "tools", "system": "You look cities up.", "tools": [ECHO], "steps": [
        {"id": "call", "op": "tool", "tool_choice": "lookup", "max_tokens": 64,
         "messages": [{"role": "user", "content": "weather in {{ input.city }}?"}]},
        {"id": "reply", "op": "generate", "max_tokens": 6}]}
    status, events = _run(url, agent, {"city": "Oslo"})
    assert status["status"] == "completed", status["error"]
    call = status["steps"][0]["output"]["calls"][0]
    assert call["name"] == "lookup"
    args = call["arguments"]
    assert isinstance(args["city"], str) and isinstance(args["days"], int) and not isinstance(args["days"], bool)
    assert call["output"] == {"city": args["city"], "days": args["days"], "forecast": "sunny"}
    assert call["seconds"] >= 0.2
    # the reply continued the pinned KV cache of the tool-call step (prefilled only the new tokens)
    assert getattr(cpu, "prefix_hits", 0) == hits_before + 1
    types = [e["type"] for e in events]
    assert types.index("tool.call") < types.index("tool.result") < types.index("run.completed")
    # the reply's prompt is the call step's prompt + its generated tokens + the tool response, token
    # for token: built here from the chat template and the ChatML tail, independently of the runner
    tok = models.smollm2_tokenizer
    from weft.sw.server.tools import tools_system_prompt

    first = tok.apply_chat_template([{"role": "system", "content": tools_system_prompt([
        {"type": "function", "function": ECHO["function"]}], "You look cities up.")},
        {"role": "user", "content": "weather in Oslo?"}], add_generation_prompt=True, tokenize=True)
    tail = tok.encode("<|im_end|>\n<|im_start|>tool\n<tool_response>\n" + json.dumps(call["output"])
                      + "\n</tool_response><|im_end|>\n<|im_start|>assistant\n")
    used = status["steps"][0]["usage"]
    assert used["prompt_tokens"] == len(first)
    assert status["steps"][1]["usage"]["prompt_tokens"] == len(first) + used["completion_tokens"] + len(tail)
    # the run ended its sessions: nothing stays pinned
    engine = app.state.weft["engine"]
    assert not any(k.startswith(status["id"]) for k in engine.sessions)


def test_client_tool_pauses_the_run_until_its_output_arrives(server):
    url, built, app = server
    cpu = built["cpu"]
    tool = {**ECHO, "implementation": "client"}
    agent = {"name": "client-tools", "tools": [tool], "steps": [
        {"id": "call", "op": "tool", "tool_choice": "lookup",
         "messages": [{"role": "user", "content": "weather in Rome?"}]},
        {"id": "reply", "op": "generate", "max_tokens": 4}]}
    run = httpx.post(url + "/v1/agents/runs", json={"agent": agent}, timeout=30).json()
    required = None
    with httpx.stream("GET", f"{url}/v1/agents/runs/{run['id']}/events", timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                ev = json.loads(line[6:])
                if ev["type"] == "tool.required":
                    required = ev
                    break
    assert required is not None and required["name"] == "lookup"
    status = httpx.get(f"{url}/v1/agents/runs/{run['id']}", timeout=30).json()
    assert status["status"] == "requires_action"
    assert status["required_action"]["tool_calls"][0]["id"] == required["tool_call_id"]
    session = f"{run['id']}.main"
    engine = app.state.weft["engine"]
    assert engine.sessions[session][0].name == "cpu"  # the KV cache stays pinned while the client works
    hits = getattr(cpu, "prefix_hits", 0)
    wrong = httpx.post(f"{url}/v1/agents/runs/{run['id']}/tool_outputs",
                       json={"tool_outputs": [{"tool_call_id": "call_nope", "output": 1}]}, timeout=30)
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "unknown_tool_call"
    ok = httpx.post(f"{url}/v1/agents/runs/{run['id']}/tool_outputs", timeout=30, json={
        "tool_outputs": [{"tool_call_id": required["tool_call_id"], "output": {"temp": 24}}]})
    assert ok.status_code == 200
    events = _events(url, run["id"])
    assert events[-1]["type"] == "run.completed"
    final = httpx.get(f"{url}/v1/agents/runs/{run['id']}", timeout=30).json()
    assert final["steps"][0]["output"]["output"] == {"temp": 24} and final["required_action"] is None
    assert getattr(cpu, "prefix_hits", 0) == hits + 1
    late = httpx.post(f"{url}/v1/agents/runs/{run['id']}/tool_outputs", timeout=30, json={
        "tool_outputs": [{"tool_call_id": required["tool_call_id"], "output": 1}]})
    assert late.status_code == 409 and late.json()["error"]["code"] == "run_not_waiting"


def test_parallel_branches_have_their_own_threads(server, models):
    url, _, _ = server
    qs = ["first question", "second question"]
    agent = {"steps": [{"id": "both", "op": "parallel", "branches": [
        [{"id": "a", "op": "generate", "max_tokens": 5, "messages": [{"role": "user", "content": qs[0]}]}],
        [{"id": "b", "op": "generate", "max_tokens": 5, "messages": [{"role": "user", "content": qs[1]}]}]]},
        {"id": "sum", "op": "tool", "tools": ["calc"], "tool_choice": "calc",
         "arguments": {"expression": "{{ a.text | length }} + {{ b.text | length }}"}}],
        "tools": [{"type": "function", "implementation": "calculator", "function": {
            "name": "calc", "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                                           "required": ["expression"]}}}]}
    status, _ = _run(url, agent)
    assert status["status"] == "completed", status["error"]
    refs = [_reference_answer(models, [{"role": "user", "content": q}], 5) for q in qs]
    assert [st["text"] for st in status["steps"] if st["id"] in ("a", "b")] == refs
    assert status["output"]["output"] == len(refs[0]) + len(refs[1])
    assert status["output_text"] == str(len(refs[0]) + len(refs[1]))


def test_a_failing_branch_cancels_its_siblings(server):
    url, _, _ = server
    agent = {"tools": [ECHO], "steps": [{"id": "both", "op": "parallel", "branches": [
        [{"id": "long", "op": "generate", "max_tokens": 900, "messages": [{"role": "user", "content": "go"}]}],
        [{"id": "bad", "op": "tool", "tool_choice": "lookup", "arguments": {"city": 3, "days": 1}}]]}]}
    t = time.perf_counter()
    status, events = _run(url, agent)
    assert time.perf_counter() - t < 5
    assert status["status"] == "failed" and status["error"]["step"] == "bad"
    assert "'city' should be string" in status["error"]["message"]
    long = next(st for st in status["steps"] if st["id"] == "long")
    assert long["status"] == "cancelled"


def test_agent_run_errors(server):
    url, _, _ = server
    post = lambda body: httpx.post(url + "/v1/agents/runs", json=body, timeout=30)  # noqa: E731
    bad = post({"agent": {"steps": [{"id": "x", "op": "generate",
                                     "messages": [{"role": "user", "content": "{{ nope }}"}]}]}})
    assert bad.status_code == 400 and "nope" in bad.json()["error"]["message"]
    assert set(bad.json()["error"]) == {"message", "type", "param", "code"}
    assert post({"agent": {"steps": [{"id": "x", "op": "teleport"}]}}).status_code == 400
    assert post({"agent": {"steps": []}}).status_code == 400
    unknown = post({"agent": {"tools": [{"type": "function", "function": {"name": "rm_rf"}}],
                              "steps": [{"id": "x", "op": "tool", "arguments": {}}]}})
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "invalid_agent"
    assert "rm_rf" in unknown.json()["error"]["message"]
    missing = httpx.get(url + "/v1/agents/runs/run_nope", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "run_not_found"
    # arguments that break the tool's schema fail the run with a message naming the argument
    r = post({"agent": {"tools": [ECHO], "steps": [{"id": "x", "op": "tool", "tool_choice": "lookup",
                                                    "arguments": {"city": "Oslo", "days": "many"}}]}})
    run = r.json()
    _events(url, run["id"])
    final = httpx.get(f"{url}/v1/agents/runs/{run['id']}", timeout=10).json()
    assert final["status"] == "failed" and final["error"]["step"] == "x"
    assert "'days' should be integer" in final["error"]["message"]


def test_streamed_start_and_resume_with_last_event_id(server):
    url, _, _ = server
    agent = {"documents": DOCS[:2], "steps": [{"id": "e", "op": "embed", "texts": ["one", "two"]}]}
    lines = []
    with httpx.stream("POST", url + "/v1/agents/runs", json={"agent": agent, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            lines.append(line)
    evs = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    assert lines[-1] == "" or "[DONE]" in "".join(lines)
    assert evs[-1]["type"] == "run.completed"
    assert len(evs[-1]["output"]) == 2 and len(evs[-1]["output"][0]) == 64  # tiny MiniLM width
    rest = _events(url, evs[0]["run_id"], headers={"Last-Event-ID": "1"})
    assert [e["seq"] for e in rest] == [e["seq"] for e in evs][2:]


def test_cancel_a_run(server):
    url, _, _ = server
    agent = {"steps": [{"id": "long", "op": "generate", "max_tokens": 900,
                        "messages": [{"role": "user", "content": "go on"}]}]}
    run = httpx.post(url + "/v1/agents/runs", json={"agent": agent}, timeout=30).json()
    time.sleep(0.3)
    t = time.perf_counter()
    out = httpx.post(f"{url}/v1/agents/runs/{run['id']}/cancel", timeout=30).json()
    assert time.perf_counter() - t < 1.0  # the generation stops; the run does not wait for it
    assert out["status"] == "cancelled" and out["steps"][0]["status"] == "cancelled"
    assert out["error"]["type"] == "cancelled"
    assert _events(url, run["id"])[-1]["type"] == "run.cancelled"


# ------------------------------------------------------------------ pieces
def test_retrieval_memory_top_k_is_the_numpy_cosine_ranking():
    rng = np.random.default_rng(1)
    table = {f"doc{i}": rng.standard_normal(8) for i in range(20)}
    table["query"] = rng.standard_normal(8)

    async def embed(texts):
        return np.stack([table[t] * 3.0 for t in texts])  # unnormalized on purpose

    async def go():
        mem = RetrievalMemory(embed, batch=3)
        assert await mem.add([f"doc{i}" for i in range(20)]) == list(range(20))
        return await mem.search("query", 4)

    hits = asyncio.run(go())
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    scores = {k: float(unit(v) @ unit(table["query"])) for k, v in table.items() if k != "query"}
    best = sorted(scores, key=lambda k: -scores[k])[:4]
    assert [h.text for h in hits] == best
    assert [h.score for h in hits] == pytest.approx([scores[k] for k in best], abs=1e-6)


def test_calculator_matches_python_and_refuses_code():
    for expr in ["2 * (3 + 4)", "-7 // 2", "2 ** 10 % 7", "1.5 / 4 - 3"]:
        assert calculate(expr) == eval(expr)  # noqa: S307 - the reference, on literals only
    for bad in ["__import__('os')", "a + 1", "9 ** 9999", "1 / 0", "(1,"]:
        with pytest.raises(ToolError):
            calculate(bad)


def test_spec_validation_names_the_problem():
    with pytest.raises(ValueError, match="duplicate step ids: a"):
        AgentSpec.model_validate({"steps": [{"id": "a", "op": "embed", "texts": ["x"]},
                                            {"id": "a", "op": "embed", "texts": ["y"]}]})
    # branches cannot read each other's results
    with pytest.raises(ValueError, match="step 'c' reads a: a is not finished before it"):
        AgentSpec.model_validate({"steps": [{"id": "p", "op": "parallel", "branches": [
            [{"id": "a", "op": "embed", "texts": ["x"]}], [{"id": "b", "op": "embed", "texts": ["x"]},
                                                          {"id": "c", "op": "embed", "texts": ["{{ a }}"]}]]}]})
    with pytest.raises(ValueError, match="declares no tools"):
        AgentSpec.model_validate({"steps": [{"id": "t", "op": "tool"}]})
    with pytest.raises(ValueError, match="type object"):
        AgentSpec.model_validate({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "string"}}}], "steps": [{"id": "t", "op": "tool"}]})
    ok = AgentSpec.model_validate({"steps": [{"id": "p", "op": "parallel", "branches": [
        [{"id": "a", "op": "embed", "texts": ["x"]}], [{"id": "b", "op": "embed", "texts": ["y"]}]]},
        {"id": "c", "op": "embed", "texts": ["{{ a }} {{ b }}"]}]})
    assert [st.id for st in ok.steps] == ["p", "c"]


def test_tool_registry_runs_plain_and_async_tools():
    reg = ToolRegistry()
    reg.register("plain", lambda a, c: a["x"] + 1)

    @reg.register("later")
    async def later(a, c):
        return a["x"] * 2

    async def go():
        return await reg.call("plain", {"x": 1}, None), await reg.call("later", {"x": 4}, None)

    assert asyncio.run(go()) == (2, 8)
    with pytest.raises(ToolError, match="no tool implementation 'nope'"):
        asyncio.run(reg.call("nope", {}, None))


@pytest.mark.slow
def test_real_weights_retrieve_on_the_fpga_bundle_and_answer_on_the_cpu(real_models):
    real = real_models
    docs = ["The Louvre is closed on Tuesdays.", "The Eiffel Tower's top floor costs 36 euros for adults.",
            "Paris metro tickets cost 2.15 euros."]
    # the real MiniLM as an int8 bundle on the bit-exact model (slow: tens of seconds a sentence)
    enc = EncoderBundle.compile(real.minilm, load_config("default"), seq_len=16)
    app = create_app(lambda: [FpgaDevice(load_config("default"), models=real, encoder=enc, name="fpga:golden"),
                              TorchDevice(_lm_only(real), "cpu", profile=False)])
    question = "How much does the Eiffel Tower's top floor cost for an adult?"
    agent = {"documents": docs, "steps": [
        {"id": "hits", "op": "retrieve", "query": "{{ input.question }}", "k": 1},
        {"id": "answer", "op": "generate", "max_tokens": 12,
         "messages": [{"role": "user", "content": "Context:\n{{ hits }}\nQuestion: {{ input.question }}"}]}]}
    with ServerThread(app, startup_timeout_s=600) as url:
        r = httpx.post(url + "/v1/agents/runs", json={"agent": agent, "input": {"question": question}}, timeout=60)
        run_id = r.json()["id"]
        deadline = time.monotonic() + 1200
        while (status := httpx.get(f"{url}/v1/agents/runs/{run_id}", timeout=60).json())["status"] == "running":
            assert time.monotonic() < deadline
            time.sleep(1)
    assert status["status"] == "completed", status["error"]
    hits, answer = status["steps"]
    assert hits["devices"] == ["fpga:golden"] and answer["devices"] == ["cpu"]
    assert hits["output"][0]["text"] == docs[1]  # the float model ranks it first too:
    ref = real.minilm.encode([question] + docs)
    assert int(np.argmax(ref[1:] @ ref[0])) == 1
    assert "36" in status["output_text"]


def test_auth_and_too_many_active_runs(models):
    from weft.sw.devices import NullDevice
    from weft.sw.server import ServerSettings

    tools = ToolRegistry()
    gate = {}

    async def wait(args, ctx):  # holds its run open until the test lets it go
        while not gate.get("open"):
            await asyncio.sleep(0.01)
        return "done"

    tools.register("wait", wait)
    agent = {"tools": [{"type": "function", "implementation": "wait", "function": {"name": "hold"}}],
             "steps": [{"id": "h", "op": "tool", "arguments": {}}]}
    app = create_app(lambda: [NullDevice(tokenizer=models.smollm2_tokenizer)],
                     agents=AgentRunner(tools, max_active=1), settings=ServerSettings(api_key="sekret"))
    auth = {"Authorization": "Bearer sekret"}
    with ServerThread(app) as url:
        r = httpx.post(url + "/v1/agents/runs", json={"agent": agent}, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        first = httpx.post(url + "/v1/agents/runs", json={"agent": agent}, headers=auth, timeout=10)
        assert first.status_code == 200
        busy = httpx.post(url + "/v1/agents/runs", json={"agent": agent}, headers=auth, timeout=10)
        assert busy.status_code == 429 and busy.headers["retry-after"] and "limit 1" in busy.json()["error"]["message"]
        assert httpx.get(f"{url}/v1/agents/runs/{first.json()['id']}", timeout=10).status_code == 401
        gate["open"] = True
        events = _events(url, first.json()["id"], headers=auth)
        assert events[-1]["type"] == "run.completed" and events[-1]["output"]["output"] == "done"
        assert [c["name"] for c in events[-1]["output"]["calls"]] == ["hold"]
        again = httpx.post(url + "/v1/agents/runs", json={"agent": agent}, headers=auth, timeout=10)
        assert again.status_code == 200  # room again once the first run ended
