"""The OpenAI-compatible HTTP API (FastAPI).

Endpoints: ``POST /v1/chat/completions`` (SSE streaming, tools/tool_choice), ``POST /v1/completions``,
``POST /v1/embeddings`` (float or base64), ``GET /v1/models``, ``GET /health``, ``GET /metrics``
(Prometheus), and agent runs (:mod:`weft.sw.agents`): ``POST /v1/agents/runs`` (start; ``"stream":
true`` answers with the event stream), ``GET /v1/agents/runs/{id}`` (status and result),
``GET /v1/agents/runs/{id}/events`` (server-sent events, replayed from the start or after
``Last-Event-ID``), ``POST /v1/agents/runs/{id}/tool_outputs`` (outputs of client tools),
``POST /v1/agents/runs/{id}/cancel``.

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 invalid
request (schema, sizes, context length), 401 bad or missing bearer token (when ``api_key`` is
set), 404 unknown model, 413 body too large, 429 over capacity (with ``Retry-After``), 503 no
healthy device. A client that disconnects cancels its request.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import numpy as np
from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from weft.sw.devices import canonical_model
from weft.sw.scheduler import SLO, Engine, NoDevice, Overloaded, Request, RequestFailed

from .metrics import Metrics
from .protocol import (AgentRunRequest, ApiError, ChatCompletionRequest, CompletionRequest, EmbeddingRequest,
                       ToolOutputsRequest, error_body)
from .tools import ToolCallConstraint, parse_tool_calls, tools_system_prompt

__all__ = ["ServerSettings", "create_app"]


@dataclass
class ServerSettings:
    api_key: str | None = None  # bearer token required on /v1/* when set
    max_body_bytes: int = 1 << 20
    max_tokens: int = 1024  # per request
    max_embedding_inputs: int = 256
    max_input_chars: int = 32768  # per text / message
    max_messages: int = 256
    max_queue: int = 64  # per device before 429
    policy: str = "slo"
    slo: SLO = field(default_factory=SLO)
    session_ttl_s: float = 30.0
    max_agent_runs: int = 32  # active agent runs before 429


def _err(status: int, message: str, type: str = "invalid_request_error", param=None, code=None, headers=None):
    return JSONResponse(error_body(message, type, param, code), status_code=status, headers=headers)


class _BodyLimit:
    """ASGI middleware: 413 for bodies over the limit (declared or streamed)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", ()):
            if k == b"content-length" and v.isdigit() and int(v) > self.limit:
                resp = _err(413, f"request body of {int(v)} bytes exceeds the limit of {self.limit} bytes",
                            code="request_too_large")
                return await resp(scope, receive, send)
        seen = 0
        start = time.perf_counter()

        async def timed_send(msg):
            if msg["type"] == "http.response.start":  # the server's own time, for overhead benchmarks
                ms = f"{(time.perf_counter() - start) * 1e3:.3f}".encode()
                msg = {**msg, "headers": [*msg.get("headers", []), (b"x-weft-server-ms", ms)]}
            await send(msg)

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise ApiError(413, f"request body exceeds the limit of {self.limit} bytes",
                                   code="request_too_large")
            return msg

        return await self.app(scope, limited, timed_send)


def create_app(devices_factory: Callable[[], Sequence] | None = None, *, engine: Engine | None = None,
               settings: ServerSettings | None = None, agents=None) -> FastAPI:
    """The app. Devices are built at start-up by ``devices_factory`` (inside the server's event
    loop) unless an ``engine`` is given (then the caller starts and stops it). ``agents``: the
    :class:`~weft.sw.agents.AgentRunner` behind ``/v1/agents/runs`` (default: one with the
    default tools)."""
    from weft.sw.agents import AgentRunner  # here: weft.sw.agents imports weft.sw.server.tools

    settings = settings or ServerSettings()
    if agents is None:
        agents = AgentRunner(max_active=settings.max_agent_runs, slo=settings.slo)
    metrics = Metrics()
    agents.on_finish.append(metrics.observe_run)
    state: dict = {"engine": engine}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        own = state["engine"] is None
        if own:
            eng = Engine(devices_factory(), settings.policy, max_queue=settings.max_queue,
                         session_ttl_s=settings.session_ttl_s)
            await eng.start()
            state["engine"] = eng
        metrics.attach(state["engine"])
        agents.bind(state["engine"])
        try:
            yield
        finally:
            await agents.close()
            if own:
                await state["engine"].stop()

    app = FastAPI(title="weft", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.weft = state

    def eng() -> Engine:
        return state["engine"]

    # ------------------------------------------------------------------ errors and auth
    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        metrics.http.labels(request.url.path, str(exc.status)).inc()
        return _err(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ())[1:]) or 'body'}: {e.get('msg')}"
                        for e in errs[:5])
        metrics.http.labels(request.url.path, "400").inc()
        return _err(400, f"invalid request: {msg}", param=loc, code="invalid_value")

    def check_auth(request: HttpRequest) -> None:
        if settings.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if got != f"Bearer {settings.api_key}":
            raise ApiError(401, "missing or invalid bearer token" if got else
                           "this server requires an API key (Authorization: Bearer ...)",
                           type="authentication_error", code="invalid_api_key")

    def resolve(name: str, op: str) -> str:
        model = canonical_model(name)
        served = eng().models()
        if model is None or model not in served:
            raise ApiError(404, f"model {name!r} is not served here; available: {', '.join(served)}",
                           param="model", code="model_not_found")
        try:
            eng().model_info(model, op)
        except NoDevice:
            raise ApiError(400, f"model {name!r} does not support {'embeddings' if op == 'embed' else 'generation'}",
                           param="model", code="model_not_supported") from None
        return model

    def submit(req: Request) -> Request:
        try:
            return eng().submit(req)
        except Overloaded as exc:
            raise ApiError(429, str(exc), type="rate_limit_error", code="overloaded",
                           headers={"Retry-After": str(max(1, int(exc.retry_after_s)))}) from None
        except NoDevice as exc:
            raise ApiError(503, str(exc), type="server_error", code="no_device") from None
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None

    async def wait_or_disconnect(req: Request, http: HttpRequest) -> Request:
        waiter = asyncio.ensure_future(req.wait())
        while True:
            done, _ = await asyncio.wait([waiter], timeout=0.25)
            if done:
                try:
                    return waiter.result()
                except RequestFailed as exc:
                    raise ApiError(500, str(exc), type="server_error", code="request_failed") from None
            if await http.is_disconnected():
                req.cancel()
                waiter.cancel()
                raise ApiError(499, "client disconnected", code="client_closed")

    # ------------------------------------------------------------------ plain endpoints
    @app.get("/health")
    async def health():
        e = eng()
        snap = e.snapshot()
        devices = []
        for d in e.devices:
            item = d.describe()
            item.update({k: snap[d.name][k] for k in ("queue_depth", "running", "kv_used_tokens",
                                                        "kv_capacity_tokens")})
            item["health"] = snap[d.name]["health"]
            devices.append(item)
        ok = any(x["health"] == "healthy" for x in devices)
        return JSONResponse({"status": "ok" if ok else "unavailable", "devices": devices,
                             "policy": e.policy.name, "stats": e.stats}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def prom():
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models(request: HttpRequest):
        check_auth(request)
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "weft", "devices": devs,
                 "description": eng().model_info(m).description} for m, devs in eng().models().items()]
        return {"object": "list", "data": data}

    # ------------------------------------------------------------------ embeddings
    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest, request: HttpRequest):
        check_auth(request)
        model = resolve(body.model, "embed")
        inp = body.input
        if isinstance(inp, str):
            texts = [inp]
        elif inp and all(isinstance(x, str) for x in inp):
            texts = list(inp)
        else:
            raise ApiError(400, "input must be a string or a list of strings (token arrays are not supported)",
                           param="input")
        if not texts:
            raise ApiError(400, "input must not be empty", param="input")
        if len(texts) > settings.max_embedding_inputs:
            raise ApiError(400, f"{len(texts)} inputs exceed the limit of {settings.max_embedding_inputs}",
                           param="input", code="too_many_inputs")
        for t in texts:
            if len(t) > settings.max_input_chars:
                raise ApiError(400, f"an input of {len(t)} characters exceeds the limit of "
                                    f"{settings.max_input_chars}", param="input", code="input_too_long")
            if not t.strip():
                raise ApiError(400, "inputs must not be empty strings", param="input")
        info = eng().model_info(model, "embed")
        if body.dimensions is not None and body.dimensions != info.dim:
            raise ApiError(400, f"{model} embeddings have {info.dim} dimensions", param="dimensions")
        req = submit(Request("embed", model, texts=texts, slo=settings.slo))
        await wait_or_disconnect(req, request)
        vecs = np.asarray(req.embeddings, dtype=np.float32)
        data = []
        for i, v in enumerate(vecs):
            emb = base64.b64encode(v.astype("<f4").tobytes()).decode() if body.encoding_format == "base64" \
                else v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        tokens = _count_embed_tokens(info, texts)
        return _json({"object": "list", "data": data, "model": model,
                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    # ------------------------------------------------------------------ generation
    def sampling(body) -> dict:
        return dict(temperature=body.temperature, top_p=body.top_p, seed=body.seed, priority=body.priority,
                    session=body.session, slo=settings.slo)

    def check_len(info, prompt: list[int], max_tokens: int) -> int:
        if max_tokens > settings.max_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} exceeds the limit of {settings.max_tokens}",
                           param="max_tokens")
        if len(prompt) >= info.max_context:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; the model's context is {info.max_context}",
                           param="messages", code="context_length_exceeded")
        return min(max_tokens, info.max_context - len(prompt))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: HttpRequest):
        check_auth(request)
        model = resolve(body.model, "generate")
        info = eng().model_info(model, "generate")
        if len(body.messages) > settings.max_messages:
            raise ApiError(400, f"{len(body.messages)} messages exceed the limit of {settings.max_messages}",
                           param="messages")
        tools = [t.model_dump() for t in body.tools] if body.tools else []
        names = [t["function"]["name"] for t in tools]
        processor, forced = None, None
        choice = body.tool_choice
        if choice is not None and not tools and choice != "none":
            raise ApiError(400, "tool_choice needs tools", param="tool_choice")
        if isinstance(choice, dict):
            forced = (choice.get("function") or {}).get("name")
            if forced not in names:
                raise ApiError(400, f"tool_choice names {forced!r}, which is not among the tools",
                               param="tool_choice")
        elif choice not in (None, "auto", "none", "required"):
            raise ApiError(400, f"tool_choice {choice!r} is not one of none, auto, required or a function",
                           param="tool_choice")
        use_tools = bool(tools) and choice != "none"
        messages = _render_messages(body.messages, tools if use_tools else [], settings)
        try:
            prompt = info.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:
            raise ApiError(400, f"cannot render the conversation: {exc}", param="messages") from None
        max_tokens = check_len(info, prompt, body.max_completion_tokens or body.max_tokens or 256)
        if use_tools and (choice == "required" or forced):
            selected = [t for t in tools if forced is None or t["function"]["name"] == forced]
            processor = ToolCallConstraint(info.tokenizer, selected)
            max_tokens = max(max_tokens, min(settings.max_tokens, info.max_context - len(prompt)))
        req = submit(Request("generate", model, prompt=prompt, max_tokens=max_tokens, logits_processor=processor,
                             **sampling(body)))
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        stops = _stops(body.stop)
        if body.stream:
            include_usage = bool((body.stream_options or {}).get("include_usage"))
            gen = _stream_chat(req, info, rid, created, model, stops, use_tools, names, include_usage, len(prompt))
            return StreamingResponse(gen, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, reason = await _collect(req, info, stops, request)
        msg: dict = {"role": "assistant", "content": text}
        if use_tools:
            calls, rest = parse_tool_calls(text, names)
            if calls:
                msg = {"role": "assistant", "content": rest or None, "tool_calls": calls}
                reason = "tool_calls"
        return _json({"id": rid, "object": "chat.completion", "created": created, "model": model,
                      "choices": [{"index": 0, "message": msg, "finish_reason": reason, "logprobs": None}],
                      "usage": _usage(len(prompt), len(req.output))})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HttpRequest):
        check_auth(request)
        model = resolve(body.model, "generate")
        info = eng().model_info(model, "generate")
        text = body.prompt if isinstance(body.prompt, str) else (body.prompt[0] if len(body.prompt) == 1 else None)
        if text is None:
            raise ApiError(400, "prompt must be a string or a list of one string", param="prompt")
        if not text or len(text) > settings.max_input_chars:
            raise ApiError(400, f"prompt must have 1 to {settings.max_input_chars} characters", param="prompt")
        prompt = info.tokenizer.encode(text)
        max_tokens = check_len(info, prompt, body.max_tokens)
        req = submit(Request("generate", model, prompt=prompt, max_tokens=max_tokens, **sampling(body)))
        rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        stops = _stops(body.stop)
        if body.stream:
            return StreamingResponse(_stream_completion(req, info, rid, created, model, stops),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        out, reason = await _collect(req, info, stops, request)
        return _json({"id": rid, "object": "text_completion", "created": created, "model": model,
                      "choices": [{"index": 0, "text": (text + out) if body.echo else out, "finish_reason": reason,
                                   "logprobs": None}],
                      "usage": _usage(len(prompt), len(req.output))})

    # ------------------------------------------------------------------ agent runs
    from weft.sw.agents import RunnerBusy, RunNotWaiting, SpecError

    app.state.agents = agents

    def get_run(run_id: str):
        run = agents.get(run_id)
        if run is None:
            raise ApiError(404, f"no agent run {run_id!r} (unknown, or finished long ago and dropped)",
                           param="run_id", code="run_not_found")
        return run

    @app.post("/v1/agents/runs")
    async def start_run(body: AgentRunRequest, request: HttpRequest):
        check_auth(request)
        try:
            run = agents.start(body.agent, body.input)
        except SpecError as exc:
            raise ApiError(400, str(exc), param=exc.param, code="invalid_agent") from None
        except RunnerBusy as exc:
            raise ApiError(429, str(exc), type="rate_limit_error", code="overloaded",
                           headers={"Retry-After": "1"}) from None
        if body.stream:
            return StreamingResponse(_run_events(run, -1), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return _json(run.to_dict())

    @app.get("/v1/agents/runs")
    async def list_runs(request: HttpRequest):
        check_auth(request)
        return _json({"object": "list", "data": [{"id": r.id, "object": "agent.run", "agent": r.spec.name,
                                                  "status": r.status, "created_at": r.created}
                                                 for r in agents.runs.values()]})

    @app.get("/v1/agents/runs/{run_id}")
    async def run_status(run_id: str, request: HttpRequest):
        check_auth(request)
        return _json(get_run(run_id).to_dict())

    @app.get("/v1/agents/runs/{run_id}/events")
    async def run_events(run_id: str, request: HttpRequest, after: int | None = None):
        check_auth(request)
        run = get_run(run_id)
        last = request.headers.get("last-event-id")
        if after is None and last is not None:
            if not last.strip().lstrip("-").isdigit():
                raise ApiError(400, f"Last-Event-ID must be an event number, got {last!r}", param="Last-Event-ID")
            after = int(last)
        return StreamingResponse(_run_events(run, -1 if after is None else after), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/agents/runs/{run_id}/tool_outputs")
    async def tool_outputs(run_id: str, body: ToolOutputsRequest, request: HttpRequest):
        check_auth(request)
        get_run(run_id)
        try:
            run = agents.submit_tool_outputs(run_id, [o.model_dump() for o in body.tool_outputs])
        except RunNotWaiting as exc:
            raise ApiError(409, str(exc), param="run_id", code="run_not_waiting") from None
        except ValueError as exc:
            raise ApiError(400, str(exc), param="tool_outputs", code="unknown_tool_call") from None
        await asyncio.sleep(0)  # let the run take the outputs before answering with its state
        return _json(run.to_dict())

    @app.post("/v1/agents/runs/{run_id}/cancel")
    async def cancel_run(run_id: str, request: HttpRequest):
        check_auth(request)
        run = get_run(run_id)
        agents.cancel(run_id)
        if run.task is not None:
            await asyncio.wait([run.task], timeout=5.0)
        return _json(run.to_dict())

    app.add_middleware(_BodyLimit, limit=settings.max_body_bytes)
    return app


# ---------------------------------------------------------------------- helpers
def _json(obj) -> Response:
    """A JSON response without FastAPI's generic encoder (the bodies here are plain data)."""
    return Response(json.dumps(obj, separators=(",", ":")), media_type="application/json")


def _usage(p: int, c: int) -> dict:
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _count_embed_tokens(info, texts) -> int:
    try:
        return int(sum(len(x) for x in info.tokenizer(texts).input_ids)) if info.tokenizer is not None \
            else sum(len(t.split()) + 2 for t in texts)
    except Exception:
        return sum(len(t.split()) + 2 for t in texts)


def _stops(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "stop takes up to 4 non-empty strings", param="stop")
    return stops


def _render_messages(messages, tools, settings) -> list[dict]:
    out = []
    for m in messages:
        try:
            text = m.text()
        except ValueError as exc:
            raise ApiError(400, str(exc), param="messages") from None
        if len(text) > settings.max_input_chars:
            raise ApiError(400, f"a message of {len(text)} characters exceeds the limit of "
                                f"{settings.max_input_chars}", param="messages", code="input_too_long")
        role = "system" if m.role == "developer" else m.role
        if m.tool_calls:
            text = (text + "\n" if text else "") + "\n".join(
                "<tool_call>\n" + json.dumps({"name": c.function.name,
                                              "arguments": _loads(c.function.arguments)}) + "\n</tool_call>"
                for c in m.tool_calls)
        if role == "tool":
            text = f"<tool_response>\n{text}\n</tool_response>"
        out.append({"role": role, "content": text})
    if tools:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": tools_system_prompt(tools, out[0]["content"])}
        else:
            out.insert(0, {"role": "system", "content": tools_system_prompt(tools)})
    return out


def _loads(s: str):
    try:
        return json.loads(s)
    except ValueError:
        return s


class _Detok:
    """Incremental detokenization with stop strings."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tok, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = 0  # characters emitted
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        full = self.tok.decode(self.ids, skip_special_tokens=True)
        if full.endswith("\ufffd"):
            return ""
        self.text = full
        hold = 0
        for s in self.stops:
            i = full.find(s)
            if i >= 0:
                self.text = full[:i]
                self.stopped = True
                break
            for k in range(min(len(s) - 1, len(full)), 0, -1):  # a stop string may be starting
                if full.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        end = len(self.text) if self.stopped else len(self.text) - hold
        delta = self.text[self.sent:end]
        self.sent = max(self.sent, end)
        return delta

    def flush(self) -> str:
        delta = self.text[self.sent:]
        self.sent = len(self.text)
        return delta


def _reason(req: Request, det: _Detok) -> str:
    return "stop" if det.stopped or req.finish_reason == "stop" else "length"


async def _collect(req: Request, info, stops, http: HttpRequest) -> tuple[str, str]:
    det = _Detok(info.tokenizer, stops)

    async def consume():
        async for tok in req.stream():
            det.push(tok)
            if det.stopped:
                req.cancel()
                break

    task = asyncio.ensure_future(consume())
    try:
        while True:
            done, _ = await asyncio.wait([task], timeout=0.25)
            if done:
                task.result()
                break
            if await http.is_disconnected():
                req.cancel()
                task.cancel()
                raise ApiError(499, "client disconnected", code="client_closed")
    except RequestFailed as exc:
        raise ApiError(500, str(exc), type="server_error", code="request_failed") from None
    det.flush()
    return det.text, _reason(req, det)


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


async def _stream_chat(req, info, rid, created, model, stops, use_tools, names, include_usage, n_prompt):
    det = _Detok(info.tokenizer, stops)
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}

    def chunk(delta, reason=None):
        return _sse({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]})

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for tok in req.stream():
            delta = det.push(tok)
            if delta and not use_tools:  # with tools the text may be a call: sent at the end
                yield chunk({"content": delta})
            if det.stopped:
                req.cancel()
                break
        tail = det.flush()
        reason = _reason(req, det)
        if use_tools:
            calls, rest = parse_tool_calls(det.text, names)
            if calls:
                if rest:
                    yield chunk({"content": rest})
                yield chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(calls)]})
                reason = "tool_calls"
            elif det.text:
                yield chunk({"content": det.text})
        elif tail:
            yield chunk({"content": tail})
        yield chunk({}, reason)
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(n_prompt, len(req.output))})
    except RequestFailed as exc:
        yield _sse(error_body(str(exc), "server_error", code="request_failed"))
    finally:
        if not req.done:
            req.cancel()  # the client went away (or the stream ended early)
    yield b"data: [DONE]\n\n"


async def _run_events(run, after: int):
    """An agent run's events as server-sent events (``id`` = event number, ``event`` = type),
    then ``data: [DONE]``. Leaving the stream does not cancel the run."""
    async for ev in run.follow(after):
        yield (f"id: {ev['seq']}\nevent: {ev['type']}\n".encode()
               + b"data: " + json.dumps(ev, separators=(",", ":"), default=str).encode() + b"\n\n")
    yield b"data: [DONE]\n\n"


async def _stream_completion(req, info, rid, created, model, stops):
    det = _Detok(info.tokenizer, stops)
    base = {"id": rid, "object": "text_completion", "created": created, "model": model}
    try:
        async for tok in req.stream():
            delta = det.push(tok)
            if delta:
                yield _sse({**base, "choices": [{"index": 0, "text": delta, "finish_reason": None, "logprobs": None}]})
            if det.stopped:
                req.cancel()
                break
        tail = det.flush()
        yield _sse({**base, "choices": [{"index": 0, "text": tail, "finish_reason": _reason(req, det),
                                         "logprobs": None}]})
    except RequestFailed as exc:
        yield _sse(error_body(str(exc), "server_error", code="request_failed"))
    finally:
        if not req.done:
            req.cancel()
    yield b"data: [DONE]\n\n"
