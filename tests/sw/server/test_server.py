"""The HTTP API through the official openai client, against a server on 127.0.0.1 (tiny models)."""

import base64
import json

import httpx
import numpy as np
import openai
import pytest

from weft.hw.config import load_config
from weft.sw.devices import FpgaDevice, LinearCostModel, ModelSet, SimDevice, TorchDevice
from weft.sw.models import smollm2 as s
from weft.sw.server import ServerSettings, ServerThread, create_app

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                                    "unit": {"enum": ["c", "f"]}},
                   "required": ["city", "days", "unit"]}}}]


@pytest.fixture(scope="module")
def models():
    return ModelSet.load(tiny=True)


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    import os
    os.environ["WEFT_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    app = create_app(lambda: [FpgaDevice(load_config("default"), models=models), TorchDevice(models, "cpu")],
                     settings=ServerSettings(max_body_bytes=64 * 1024))
    with ServerThread(app) as url:
        yield url


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_are_listed(client):
    ids = {m.id for m in client.models.list().data}
    assert ids == {"minilm", "smollm2"}


def test_chat_completion_matches_the_reference_model(client, models):
    msgs = [{"role": "user", "content": "hello"}]
    r = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=8, temperature=0)
    ids = models.smollm2_tokenizer.apply_chat_template(msgs, tokenize=True)
    ref = "".join(t.text for t in s.generate(models.smollm2, models.smollm2_tokenizer, ids, 8))
    assert r.choices[0].message.content == ref
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens <= 8
    assert r.choices[0].finish_reason in ("length", "stop")


def test_streamed_chat_equals_the_unstreamed_one(client):
    kw = dict(model="smollm2", messages=[{"role": "user", "content": "stream please"}], max_tokens=12,
              temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1


def test_completions_and_sampling_seed(client):
    a = client.completions.create(model="smollm2", prompt="once upon", max_tokens=6, temperature=0.9, seed=3)
    b = client.completions.create(model="smollm2", prompt="once upon", max_tokens=6, temperature=0.9, seed=3)
    assert a.choices[0].text == b.choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt="once upon", max_tokens=6, temperature=0.9, seed=3, stream=True))
    assert streamed == a.choices[0].text


def test_embeddings_float_and_base64(client, models, server):
    texts = ["the first sentence", "and a second"]
    r = client.embeddings.create(model="minilm", input=texts)  # the client asks for base64
    got = np.array([d.embedding for d in r.data])
    np.testing.assert_allclose(got, models.minilm.encode(texts), atol=1e-5)
    raw = httpx.post(server + "/v1/embeddings", json={"model": "minilm", "input": "x y", "encoding_format": "float"})
    assert len(raw.json()["data"][0]["embedding"]) == models.minilm.config.hidden_size
    b64 = httpx.post(server + "/v1/embeddings", json={"model": "minilm", "input": "x y",
                                                      "encoding_format": "base64"}).json()
    vec = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(vec, raw.json()["data"][0]["embedding"], atol=1e-6)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_parse_and_follow_the_schema(client, choice):
    r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "weather in Paris?"}],
                                       tools=TOOLS, tool_choice=choice, max_tokens=64)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    call = msg.tool_calls[0]
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert isinstance(args["city"], str) and isinstance(args["days"], int) and args["unit"] in ("c", "f")
    # the conversation continues with the tool's answer
    follow = client.chat.completions.create(model="smollm2", max_tokens=4, messages=[
        {"role": "user", "content": "weather in Paris?"}, msg.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}])
    assert follow.choices[0].message.role == "assistant"


def test_streamed_tool_call(client):
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "weather?"}], tools=TOOLS, tool_choice="required",
        max_tokens=64, stream=True))
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function.name == "get_weather"
    json.loads(calls[0].function.arguments)


def test_errors_have_openai_shape(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=[], max_tokens=2)
    assert "messages" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="smollm2", input="x")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "x" * 5000}],
                                       max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded"
    big = httpx.post(server + "/v1/embeddings", json={"model": "minilm", "input": "x" * 100_000})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    bad = httpx.post(server + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "error" in bad.json()


def test_health_and_metrics(client, server):
    client.embeddings.create(model="minilm", input="count me")
    h = httpx.get(server + "/health").json()
    assert h["status"] == "ok"
    fpga = next(d for d in h["devices"] if d["name"] == "fpga:emu")
    assert fpga["values"] == "cpu-reference"
    text = httpx.get(server + "/metrics").text
    for name in ("weft_queue_depth", "weft_device_utilization", "weft_ttft_seconds", "weft_tpot_seconds",
                 "weft_e2e_seconds", "weft_slo_met_total", "weft_reroutes_total", "weft_requests_total"):
        assert name in text


def test_client_disconnect_cancels_the_request(server):
    import time

    with httpx.stream("POST", server + "/v1/chat/completions", json={
            "model": "smollm2", "max_tokens": 900, "stream": True,
            "messages": [{"role": "user", "content": "go on"}]}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content":"' in line and '"content":""' not in line:
                break
    for _ in range(100):
        stats = httpx.get(server + "/health").json()["stats"]
        if stats["cancelled"] >= 1:
            break
        time.sleep(0.05)
    assert stats["cancelled"] >= 1


def test_auth_and_backpressure(models):
    slow = LinearCostModel({"embed": (0.5, 0.0, 0.0), "prefill": (0.5, 0, 0), "decode": (0.5, 0, 0)})
    app = create_app(lambda: [SimDevice("sim", slow, tokenizer=models.smollm2_tokenizer)],
                     settings=ServerSettings(api_key="sekret", max_queue=1))
    with ServerThread(app) as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        c = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        assert c.models.list().data
        assert httpx.get(url + "/health").status_code == 200  # open without a token
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(6) as pool:
            futs = [pool.submit(c.embeddings.create, model="minilm", input=f"t{i}") for i in range(6)]
            errors = [f.exception() for f in futs]
        limited = [e for e in errors if isinstance(e, openai.RateLimitError)]
        assert limited and limited[0].response.headers["retry-after"]
        assert any(e is None for e in errors)


@pytest.mark.slow
def test_real_models_through_the_openai_client(real_models):
    real = real_models
    app = create_app(lambda: [FpgaDevice(load_config("default"), models=real), TorchDevice(real, "cpu")])
    with ServerThread(app, startup_timeout_s=600) as url:
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=300)
        r = c.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=12, temperature=0,
                                      messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in r.choices[0].message.content
        e = c.embeddings.create(model="all-MiniLM-L6-v2", input=["The weather is lovely today.",
                                                                 "It's so sunny outside!", "He drove to the stadium."])
        v = np.array([d.embedding for d in e.data])
        assert v.shape == (3, 384) and v[0] @ v[1] > v[0] @ v[2]
