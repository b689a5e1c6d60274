"""Running agent programs server-side, on the scheduler.

:class:`AgentRunner` takes an :class:`~weft.sw.agents.spec.AgentSpec` and its inputs and runs it
as an asyncio task (:class:`AgentRun`): every model call is a :class:`~weft.sw.scheduler.Request`
submitted to the :class:`~weft.sw.scheduler.Engine`, so each step lands on whatever device the
placement policy picks (MiniLM on an FPGA device, SmolLM2 on a CPU or GPU, ...).

* **Threads and sessions.** Generation steps continue a *thread* (a conversation kept as token
  ids). Each thread is a scheduler session (``<run id>.<thread>``): when a step ends, its KV cache
  stays pinned on its device (the engine's session TTL) and the next step of the thread, after a
  tool has run, goes to that device and prefills only the new tokens, because the new prompt is
  the old prompt + reply + the new messages, token for token. Sessions end with the run.
* **Tools** use SmolLM2's chat-template tool prompt (:mod:`weft.sw.server.tools`): the spec's tools
  are listed in the thread's system message; a ``tool`` step constrains decoding to a
  ``<tool_call>`` block following the tool's JSON schema (``tool_choice`` ``required`` or a name),
  parses it, validates the arguments against the schema and runs the implementation from the
  :class:`~weft.sw.agents.tools.ToolRegistry`; the output goes back into the thread as a
  ``<tool_response>``.
* **Events.** A run records events (``run.started``, ``memory.indexed``, ``step.started``,
  ``step.delta``, ``tool.call``, ``tool.result``, ``step.completed``, ``run.completed`` /
  ``run.failed`` / ``run.cancelled``); :meth:`AgentRun.follow` replays them and follows live ones
  (the HTTP API streams them as server-sent events).
* **Client tools.** A tool whose ``implementation`` is ``"client"`` is run by the client: the run
  turns ``requires_action`` (event ``tool.required`` with the call id, name and validated
  arguments) and waits for :meth:`AgentRunner.submit_tool_outputs` (HTTP
  ``POST /v1/agents/runs/{id}/tool_outputs``), its KV cache pinned meanwhile.
* **Backpressure.** A model call refused with ``Overloaded`` waits and retries (the run was
  accepted; its steps are not dropped); too many active runs refuse new ones (:class:`RunnerBusy`).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from weft.sw.scheduler import SLO, Engine, NoDevice, Overloaded, Request, RequestFailed
from weft.sw.server.tools import ToolCallConstraint, parse_tool_calls, tools_system_prompt, validate_arguments

from .memory import RetrievalMemory
from .spec import (AgentSpec, EmbedStep, GenerateStep, ParallelStep, RememberStep, RetrieveStep, SpecError,
                   ToolStep, iter_steps)
from .templates import Value, render, render_value
from .tools import ToolContext, ToolError, ToolRegistry, default_tools

__all__ = ["AgentRunner", "AgentRun", "RunNotWaiting", "RunnerBusy", "StepError", "CLIENT"]

log = logging.getLogger("weft.agents")

#: devices used by the current step (each branch task has its own)
_step_devices: contextvars.ContextVar[list | None] = contextvars.ContextVar("weft_step_devices", default=None)


CLIENT = "client"  # the implementation name of tools the client runs (the run waits for their output)


class RunNotWaiting(RuntimeError):
    """Tool outputs posted to a run that waits for none (HTTP 409)."""


class RunnerBusy(RuntimeError):
    """Too many agent runs are active (HTTP 429)."""


class StepError(RuntimeError):
    """A step that cannot complete; the run fails with this message."""

    def __init__(self, step: str, message: str) -> None:
        super().__init__(f"step {step!r}: {message}")
        self.step = step


@dataclass
class _Thread:
    """A conversation as token ids (prompt + replies, ChatML), and what to append next."""

    name: str
    session: str
    tokens: list[int] = field(default_factory=list)
    pending: list[dict] = field(default_factory=list)  # messages not yet in ``tokens``
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class AgentRun:
    """One run of an agent: status, step results, output, and its event log."""

    def __init__(self, spec: AgentSpec, inputs: Mapping[str, Any]) -> None:
        self.id = f"run_{uuid.uuid4().hex[:24]}"
        self.spec = spec
        self.inputs = dict(inputs)
        self.status = "queued"  # running, completed, failed, cancelled
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self.steps: dict[str, dict] = {}
        self.output: Any = None
        self.output_text: str | None = None
        self.error: dict | None = None
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "embedded_texts": 0}
        self.events: list[dict] = []
        self.threads: dict[str, _Thread] = {}
        self.requests: set[Request] = set()
        self.waiting: dict[str, dict] = {}  # client tool calls waiting for their output, by call id
        self.task: asyncio.Task | None = None
        self._changed = asyncio.Event()

    @property
    def done(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")

    def emit(self, type: str, **data) -> None:
        self.events.append({"seq": len(self.events), "type": type, "run_id": self.id, "created": time.time(), **data})
        self._changed.set()
        self._changed = asyncio.Event()

    async def follow(self, after: int = -1) -> AsyncIterator[dict]:
        """Events with ``seq > after``: those recorded, then live ones until the run ends."""
        i = after + 1
        while True:
            while i < len(self.events):
                yield self.events[i]
                i += 1
            if self.done:
                return
            await self._changed.wait()

    async def wait(self) -> AgentRun:
        if self.task is not None:
            await asyncio.shield(self.task)
        return self

    def to_dict(self) -> dict:
        return {"id": self.id, "object": "agent.run", "agent": self.spec.name, "status": self.status,
                "created_at": self.created, "started_at": self.started, "finished_at": self.finished,
                "input": self.inputs, "output": self.output, "output_text": self.output_text,
                "steps": list(self.steps.values()), "usage": dict(self.usage), "error": self.error,
                "required_action": {"tool_calls": [
                    {"id": k, "step": w["step"], "name": w["name"], "arguments": w["arguments"]}
                    for k, w in self.waiting.items()]} if self.waiting else None,
                "events": len(self.events)}


class AgentRunner:
    """Starts, keeps and cancels agent runs on an engine (``bind(engine)`` first).

    ``chat_model`` / ``embed_model``: the models' names in the engine. ``max_active``: runs at
    once before :class:`RunnerBusy`; ``keep``: finished runs kept for status queries."""

    def __init__(self, tools: ToolRegistry | None = None, *, chat_model: str = "smollm2",
                 embed_model: str = "minilm", max_active: int = 32, keep: int = 1000,
                 tool_timeout_s: float = 30.0, client_tool_timeout_s: float = 600.0, slo: SLO | None = None,
                 overload_wait_s: float = 60.0) -> None:
        self.tools = tools if tools is not None else default_tools()
        self.chat_model, self.embed_model = chat_model, embed_model
        self.max_active, self.keep = max_active, keep
        self.tool_timeout_s = tool_timeout_s
        self.client_tool_timeout_s = client_tool_timeout_s
        self.slo = slo or SLO()
        self.overload_wait_s = overload_wait_s
        self.engine: Engine | None = None
        self.runs: OrderedDict[str, AgentRun] = OrderedDict()
        self.on_finish: list = []  # callbacks f(run) when a run ends (metrics)

    def bind(self, engine: Engine) -> None:
        self.engine = engine

    # ------------------------------------------------------------------ public
    def check(self, spec: AgentSpec) -> None:
        """What a spec needs from this server: tool implementations and served models."""
        for t in spec.tools:
            impl = t.implementation or t.name
            if impl != CLIENT and impl not in self.tools:
                raise SpecError(f"tool {t.name!r}: no implementation {impl!r} on this server "
                                f"(available: {', '.join(self.tools.names())})", "agent.tools")
        steps = iter_steps(spec.steps)
        served = self.engine.models() if self.engine is not None else {}
        chat = any(isinstance(s, GenerateStep) or (isinstance(s, ToolStep) and s.arguments is None) for s in steps)
        if chat and self.chat_model not in served:
            raise SpecError(f"the agent generates text but no device serves {self.chat_model!r}", "agent.steps")
        embeds = bool(spec.documents) or any(isinstance(s, (EmbedStep, RetrieveStep, RememberStep)) for s in steps)
        if embeds and self.embed_model not in served:
            raise SpecError(f"the agent embeds text but no device serves {self.embed_model!r}", "agent.steps")

    def start(self, spec: AgentSpec, inputs: Mapping[str, Any] | None = None) -> AgentRun:
        """Check ``spec`` and start it; returns the run at once (it runs as a task)."""
        if self.engine is None:
            raise RuntimeError("the agent runner is not bound to an engine")
        self.check(spec)
        active = sum(1 for r in self.runs.values() if not r.done)
        if active >= self.max_active:
            raise RunnerBusy(f"{active} agent runs are active (limit {self.max_active}); retry later")
        run = AgentRun(spec, inputs or {})
        self.runs[run.id] = run
        self._trim()
        run.task = asyncio.create_task(self._run(run), name=f"weft-agent-{run.id}")
        return run

    def get(self, run_id: str) -> AgentRun | None:
        return self.runs.get(run_id)

    def cancel(self, run_id: str) -> AgentRun | None:
        run = self.runs.get(run_id)
        if run is not None and not run.done and run.task is not None:
            run.task.cancel()
        return run

    async def close(self) -> None:
        tasks = [r.task for r in self.runs.values() if r.task is not None and not r.done]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _trim(self) -> None:
        finished = [k for k, r in self.runs.items() if r.done]
        for k in finished[: max(0, len(self.runs) - self.keep)]:
            del self.runs[k]

    # ------------------------------------------------------------------ the run
    async def _run(self, run: AgentRun) -> None:
        run.status, run.started = "running", time.time()
        run.emit("run.started", agent=run.spec.name)
        memory = RetrievalMemory(lambda texts: self._embed(run, texts))
        ctx: dict[str, Any] = {"input": run.inputs}
        try:
            if run.spec.documents:
                devices: list[str] = []
                token = _step_devices.set(devices)
                try:
                    await memory.add(run.spec.documents)
                finally:
                    _step_devices.reset(token)
                run.emit("memory.indexed", documents=len(run.spec.documents), devices=sorted(set(devices)))
            await self._steps(run, run.spec.steps, ctx, memory, branch=None)
            out_id = run.spec.output or run.spec.steps[-1].id
            rec = run.steps[out_id]
            run.output, run.output_text = rec["output"], rec["text"]
            run.status = "completed"
            run.emit("run.completed", output=run.output, output_text=run.output_text)
        except asyncio.CancelledError:
            run.status = "cancelled"
            run.error = {"message": "the run was cancelled", "type": "cancelled", "step": None}
            run.emit("run.cancelled")
        except Exception as exc:  # every failure ends the run with an explicit error
            step = getattr(exc, "step", None)
            kind = ("step_error" if isinstance(exc, StepError) else "request_failed"
                    if isinstance(exc, (RequestFailed, NoDevice)) else "internal_error")
            if kind == "internal_error":
                log.exception("agent run %s crashed", run.id)
            run.status = "failed"
            run.error = {"message": str(exc), "type": kind, "step": step}
            run.emit("run.failed", error=run.error)
        finally:
            for r in list(run.requests):
                r.cancel()
            for th in run.threads.values():
                self.engine.end_session(th.session)
            run.finished = time.time()
            run._changed.set()
            for cb in self.on_finish:
                try:
                    cb(run)
                except Exception:  # an observer must not break the runner
                    log.exception("agent on_finish observer failed")

    async def _steps(self, run, steps, ctx, memory, branch: str | None) -> None:
        for step in steps:
            await self._step(run, step, ctx, memory, branch)

    async def _step(self, run: AgentRun, step, ctx: dict, memory: RetrievalMemory, branch: str | None) -> None:
        rec = {"id": step.id, "op": step.op, "status": "running", "started_at": time.time(), "finished_at": None,
               "devices": [], "output": None, "text": None, "error": None}
        run.steps[step.id] = rec
        run.emit("step.started", step=step.id, op=step.op)
        devices: list[str] = []
        token = _step_devices.set(devices)
        try:
            text, data = await self._execute(run, step, ctx, memory, branch, rec)
        except asyncio.CancelledError:
            rec.update(status="cancelled", finished_at=time.time())
            raise
        except StepError as exc:
            rec.update(status="failed", error=str(exc), finished_at=time.time(), devices=sorted(set(devices)))
            run.emit("step.failed", step=step.id, error=str(exc))
            raise
        except (ToolError, ValueError, RequestFailed, NoDevice) as exc:
            rec.update(status="failed", error=str(exc), finished_at=time.time(), devices=sorted(set(devices)))
            run.emit("step.failed", step=step.id, error=str(exc))
            raise StepError(step.id, str(exc)) from exc
        finally:
            _step_devices.reset(token)
        rec.update(status="completed", finished_at=time.time(), output=data, text=text,
                   devices=list(dict.fromkeys(devices)))
        ctx[step.id] = Value(text, data)
        run.emit("step.completed", step=step.id, result=rec)

    async def _execute(self, run, step, ctx, memory, branch, rec) -> tuple[str, Any]:
        try:
            if isinstance(step, RetrieveStep):
                hits = await memory.search(render(step.query, ctx), step.k)
                data = [h.to_dict() for h in hits]
                return "\n".join(h.text for h in hits), data
            if isinstance(step, RememberStep):
                texts = [render(t, ctx) for t in step.texts]
                idx = await memory.add(texts)
                return f"{len(idx)} documents added", {"indices": idx, "size": len(memory)}
            if isinstance(step, EmbedStep):
                texts = [render(t, ctx) for t in step.texts]
                if any(not t.strip() for t in texts):
                    raise StepError(step.id, "texts must not render to empty strings")
                vecs = await self._embed(run, texts)
                return f"{len(texts)} embeddings of dimension {vecs.shape[1]}", vecs.tolist()
            if isinstance(step, GenerateStep):
                return await self._generate_step(run, step, ctx, branch, rec)
            if isinstance(step, ToolStep):
                return await self._tool_step(run, step, ctx, memory, branch, rec)
            if isinstance(step, ParallelStep):
                branch_ctx = [dict(ctx) for _ in step.branches]
                await _all_or_none([self._steps(run, b, c, memory, f"{step.id}_{i}")
                                    for i, (b, c) in enumerate(zip(step.branches, branch_ctx))])
                for b, c in zip(step.branches, branch_ctx):
                    for s in iter_steps(b):
                        ctx[s.id] = c[s.id]
                last = [run.steps[b[-1].id] for b in step.branches]
                return "\n\n".join(r["text"] or "" for r in last), [r["output"] for r in last]
        except Exception as exc:
            if type(exc).__name__ in ("UndefinedError", "SecurityError", "TemplateError", "TemplateSyntaxError"):
                raise StepError(step.id, f"template: {exc}") from exc
            raise
        raise StepError(step.id, f"unknown op {step.op!r}")  # pragma: no cover - the spec validates ops

    # ------------------------------------------------------------------ model calls
    async def _submit(self, run: AgentRun, req: Request) -> Request:
        """Submit, waiting out backpressure (the run was accepted; its steps are not dropped)."""
        deadline = time.monotonic() + self.overload_wait_s
        while True:
            try:
                self.engine.submit(req)
                break
            except Overloaded as exc:
                if time.monotonic() > deadline:
                    raise RequestFailed(f"the devices stayed overloaded for {self.overload_wait_s:g} s: {exc}") \
                        from None
                await asyncio.sleep(min(exc.retry_after_s, 0.25))
        run.requests.add(req)
        return req

    async def _finish(self, run: AgentRun, req: Request) -> Request:
        try:
            await req.wait()
        except asyncio.CancelledError:  # the run was cancelled: stop the request too, now
            req.cancel()
            raise
        finally:
            run.requests.discard(req)
            devs = _step_devices.get()
            if devs is not None:
                devs.extend(d for d in req.devices if d)
        return req

    async def _embed(self, run: AgentRun, texts: list[str]) -> np.ndarray:
        req = await self._submit(run, Request("embed", self.embed_model, texts=list(texts), slo=self.slo))
        await self._finish(run, req)
        run.usage["embedded_texts"] += len(texts)
        return np.asarray(req.embeddings, np.float32)

    async def _client_tool(self, run: AgentRun, step_id: str, call_id: str, name: str, arguments) -> Any:
        """Wait for the client to post this call's output (``submit_tool_outputs``); the run is
        ``requires_action`` meanwhile and the thread's KV cache stays pinned."""
        fut = asyncio.get_running_loop().create_future()
        run.waiting[call_id] = {"fut": fut, "step": step_id, "name": name, "arguments": arguments}
        run.status = "requires_action"
        run.emit("tool.required", step=step_id, tool_call_id=call_id, name=name, arguments=arguments)
        try:
            return await asyncio.wait_for(fut, self.client_tool_timeout_s)
        except TimeoutError:
            raise StepError(step_id, f"no output for client tool {name!r} (call {call_id}) within "
                                     f"{self.client_tool_timeout_s:g} s") from None
        finally:
            run.waiting.pop(call_id, None)
            if not run.waiting and run.status == "requires_action":
                run.status = "running"

    def submit_tool_outputs(self, run_id: str, outputs: list[Mapping[str, Any]]) -> AgentRun | None:
        """Outputs of client tool calls: ``[{"tool_call_id", "output"}]``. Raises
        :class:`RunNotWaiting` if the run waits for none, ``ValueError`` for an unknown call id."""
        run = self.runs.get(run_id)
        if run is None:
            return None
        if run.status != "requires_action":
            raise RunNotWaiting(f"run {run_id} is {run.status}, not waiting for tool outputs")
        ids = [o["tool_call_id"] for o in outputs]
        unknown = [i for i in ids if i not in run.waiting]
        if unknown or len(set(ids)) != len(ids):
            raise ValueError(f"tool_call_id {', '.join(unknown) or 'repeated'}: the run waits for "
                             f"{', '.join(run.waiting)}")
        for o in outputs:
            entry = run.waiting[o["tool_call_id"]]
            if not entry["fut"].done():
                entry["fut"].set_result(o["output"])
        return run

    def _info(self):
        return self.engine.model_info(self.chat_model, "generate")

    def _thread(self, run: AgentRun, step, branch: str | None) -> _Thread | None:
        name = step.thread
        if "thread" not in step.model_fields_set and branch is not None:
            name = branch  # each parallel branch has its own conversation unless it names one
        if name is None:
            return None
        th = run.threads.get(name)
        if th is None:
            th = run.threads[name] = _Thread(name, f"{run.id}.{name}")
        return th

    def _system(self, run: AgentRun) -> str | None:
        spec = run.spec
        if spec.tools:
            return tools_system_prompt([t.openai() for t in spec.tools], spec.system or "")
        return spec.system

    def _prompt(self, run: AgentRun, th: _Thread | None, messages: list[dict], step_id: str) -> list[int]:
        """The prompt for a step: a new conversation rendered by the chat template, or the
        thread's tokens + the new messages in ChatML (so the thread's pinned KV is a prefix)."""
        tok = self._info().tokenizer
        new = (th.pending if th is not None else []) + messages
        if th is None or not th.tokens:
            system = self._system(run)
            msgs = ([{"role": "system", "content": system}] if system else []) + new
            if not any(m["role"] == "user" for m in msgs):
                raise StepError(step_id, "a new conversation needs at least one user message")
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        else:
            tail = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in new)
            ids = th.tokens + tok.encode(tail + "<|im_start|>assistant\n")
        if th is not None:
            th.pending = []
        return list(ids)

    async def _generate(self, run: AgentRun, step, prompt: list[int], th: _Thread | None,
                        processor=None) -> tuple[str, Request]:
        info = self._info()
        room = info.max_context - len(prompt)
        if room < 1:
            raise StepError(step.id, f"the conversation has {len(prompt)} tokens; the model's context is "
                                     f"{info.max_context}")
        limit = min(step.max_tokens, room)
        if processor is not None:
            # a constrained call ends by itself once the block is complete: let it finish (as the
            # chat endpoint does) rather than cut it into JSON that does not parse
            limit = max(limit, min(1024, room))
        req = Request("generate", self.chat_model, prompt=prompt, max_tokens=limit,
                      temperature=step.temperature, top_p=step.top_p, seed=step.seed, logits_processor=processor,
                      session=th.session if th is not None else None, slo=self.slo)
        await self._submit(run, req)
        tok, sent = info.tokenizer, ""
        try:
            async for _ in req.stream():
                text = tok.decode(req.output, skip_special_tokens=True)
                if not text.endswith("\ufffd") and len(text) > len(sent) and text.startswith(sent):
                    run.emit("step.delta", step=step.id, delta=text[len(sent):])
                    sent = text
        except asyncio.CancelledError:
            req.cancel()
            run.requests.discard(req)
            raise
        except RequestFailed:
            pass  # _finish raises it again, after noting the devices it ran on
        await self._finish(run, req)
        run.usage["prompt_tokens"] += len(prompt)
        run.usage["completion_tokens"] += len(req.output)
        if th is not None:
            # the reply stays in the thread exactly as generated (its KV cache is pinned)
            th.tokens = prompt + list(req.output) + tok.encode("<|im_end|>\n")
        return tok.decode(req.output, skip_special_tokens=True), req

    def _messages(self, step, ctx) -> list[dict]:
        return [{"role": m.role, "content": render(m.content, ctx)} for m in step.messages]

    async def _generate_step(self, run, step: GenerateStep, ctx, branch, rec) -> tuple[str, Any]:
        th = self._thread(run, step, branch)
        messages = self._messages(step, ctx)
        async with th.lock if th is not None else _nolock():
            prompt = self._prompt(run, th, messages, step.id)
            text, req = await self._generate(run, step, prompt, th)
        rec["usage"] = {"prompt_tokens": len(prompt), "completion_tokens": len(req.output)}
        rec["finish_reason"] = req.finish_reason
        return text, {"text": text, "finish_reason": req.finish_reason}

    async def _tool_step(self, run, step: ToolStep, ctx, memory, branch, rec) -> tuple[str, Any]:
        spec = run.spec
        allowed = [t for t in spec.tools if step.tools is None or t.name in step.tools]
        by_name = {t.name: t for t in allowed}
        th = self._thread(run, step, branch)
        async with th.lock if th is not None else _nolock():
            if step.arguments is not None:
                name = step.tool_choice if step.tool_choice in by_name else allowed[0].name
                calls = [{"name": name, "arguments": render_value(step.arguments, ctx)}]
                if th is not None:
                    block = json.dumps({"name": name, "arguments": calls[0]["arguments"]})
                    th.pending.append({"role": "assistant", "content": f"<tool_call>\n{block}\n</tool_call>"})
            else:
                selected = [by_name[step.tool_choice]] if step.tool_choice in by_name else allowed
                processor = None
                if step.tool_choice != "auto":
                    processor = ToolCallConstraint(self._info().tokenizer, [t.openai() for t in selected])
                prompt = self._prompt(run, th, self._messages(step, ctx), step.id)
                text, req = await self._generate(run, step, prompt, th, processor)
                rec["usage"] = {"prompt_tokens": len(prompt), "completion_tokens": len(req.output)}
                found, rest = parse_tool_calls(text, [t.name for t in selected])
                if not found:
                    if step.tool_choice == "auto":
                        return rest, {"calls": [], "text": rest}
                    raise StepError(step.id, f"the model produced no valid tool call (output: {text[:200]!r})")
                calls = [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])}
                         for c in found]
            results = []
            for call in calls:
                tool = by_name[call["name"]]
                problems = validate_arguments(call["arguments"], tool.function.parameters)
                if problems:
                    raise StepError(step.id, f"tool {tool.name!r} arguments {json.dumps(call['arguments'])}: "
                                             + "; ".join(problems))
                call_id = f"call_{uuid.uuid4().hex[:24]}"
                run.emit("tool.call", step=step.id, tool_call_id=call_id, name=tool.name, arguments=call["arguments"])
                started = time.perf_counter()
                if tool.implementation == CLIENT:
                    output = await self._client_tool(run, step.id, call_id, tool.name, call["arguments"])
                else:
                    try:
                        output = await asyncio.wait_for(
                            self.tools.call(tool.implementation or tool.name, call["arguments"],
                                            ToolContext(run.id, step.id, memory)), self.tool_timeout_s)
                        json.dumps(output)
                    except TimeoutError:
                        raise StepError(step.id, f"tool {tool.name!r} took longer than {self.tool_timeout_s:g} s") \
                            from None
                    except (ToolError, TypeError, ValueError) as exc:
                        raise StepError(step.id, f"tool {tool.name!r} failed: {exc}") from None
                seconds = time.perf_counter() - started
                run.emit("tool.result", step=step.id, tool_call_id=call_id, name=tool.name, output=output,
                         seconds=seconds)
                results.append({"id": call_id, "name": tool.name, "arguments": call["arguments"], "output": output,
                                "seconds": seconds})
                if th is not None:
                    th.pending.append({"role": "tool",
                                       "content": f"<tool_response>\n{json.dumps(output)}\n</tool_response>"})
        outputs = [r["output"] for r in results]
        text = json.dumps(outputs[0] if len(outputs) == 1 else outputs)
        return text, {"calls": results, "output": outputs[0] if len(outputs) == 1 else outputs}


async def _all_or_none(coros) -> None:
    """Run ``coros`` concurrently; when one fails, cancel the others (their requests stop) and
    raise its error. (``asyncio.gather`` would leave the siblings running.)"""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
    except asyncio.CancelledError:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
    if failed:
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        raise failed[0].exception()


class _nolock:
    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return False
