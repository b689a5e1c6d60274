"""The engine: one continuous-batching worker per device, placement across devices.

* **Per device** (:class:`DeviceWorker`): embeddings are batched per request (up to the device's
  ``max_embed_batch`` sentences); generation is batched per token: at every iteration waiting
  sequences are admitted (prefilled) while the KV cache, the decode batch and the prefill token
  budget allow, and every running sequence decodes one token. KV memory is accounted in tokens;
  when it runs out, the lowest-priority (latest) running sequence is preempted (its cache freed,
  recomputed later; tokens already streamed are kept). Waiting requests are ordered by priority,
  then arrival (FCFS only for the baseline policies).
* **Across devices** (:mod:`.policy`): the SLO-aware policy predicts each candidate's TTFT, TPOT
  and completion time from its cost model and queue state and picks the fastest that meets the
  request's SLO; baselines are round-robin and least-loaded. An agent session sticks to the
  device holding its KV cache while its tool call runs (pinned, with a TTL, evicted under memory
  pressure).
* **Backpressure**: a request is refused (:class:`Overloaded`, HTTP 429) when every device that
  could take it already has ``max_queue`` requests waiting.
* **Failure**: when a device fails, every request it held (waiting or running) is placed again on
  the remaining devices, keeping the tokens already generated; an accepted request is lost only if
  no device able to run it is left (then it ends with :class:`RequestFailed`).

All times come from the event loop's clock, so the same engine runs under a virtual clock
(``weft bench serve``) and a real one.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence

from weft.sw.devices.base import Device, DeviceError, DeviceFailure, Health, ModelInfo, Seq

from .policy import Policy, make_policy
from .request import NoDevice, Overloaded, Request, RequestFailed, estimate_tokens

__all__ = ["Engine", "DeviceWorker"]

log = logging.getLogger("weft.scheduler")


class DeviceWorker:
    """Queues, running batch and KV accounting of one device; its loop is one asyncio task."""

    def __init__(self, engine: Engine, device: Device) -> None:
        self.engine = engine
        self.device = device
        self.name = device.name
        self.waiting_embed: list = []  # heap of (key, seqno, request)
        self.waiting_gen: list = []
        self.running: dict[str, Request] = {}  # seq_id -> request (generation)
        self.embedding: list[Request] = []  # the embed batch in flight
        self.pins: OrderedDict[str, int] = OrderedDict()  # session -> pinned KV tokens
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.failed = False
        self.iterations = 0
        self.preemptions = 0
        caps = device.capabilities
        self.kv_capacity = device.memory().kv_capacity_tokens if caps.generate_models else 0
        self._infos: dict[str, ModelInfo] = {}

    # ------------------------------------------------------------ state
    def info(self, model: str) -> ModelInfo:
        if model not in self._infos:
            self._infos[model] = self.device.model_info(model)
        return self._infos[model]

    @property
    def queue_depth(self) -> int:
        return len(self.waiting_embed) + len(self.waiting_gen)

    @property
    def outstanding(self) -> int:
        return self.queue_depth + len(self.running) + len(self.embedding)

    def kv_used(self) -> int:
        return sum(r.seq.length + 1 for r in self.running.values())

    def kv_free(self) -> int:
        return self.kv_capacity - self.kv_used() - sum(self.pins.values())

    def healthy(self) -> bool:
        return not self.failed and self.device.health() is Health.HEALTHY

    def serves(self, req: Request) -> bool:
        return self.device.capabilities.serves(req.model, req.op)

    def requests(self) -> list[Request]:
        return ([r for _, _, r in self.waiting_embed] + [r for _, _, r in self.waiting_gen]
                + list(self.running.values()) + list(self.embedding))

    def enqueue(self, req: Request) -> None:
        key = -req.priority if self.engine.policy.use_priorities else 0
        heap = self.waiting_embed if req.op == "embed" else self.waiting_gen
        heapq.heappush(heap, (key, req._seqno, req))
        req.device = self.name
        req.devices.append(self.name)
        self.wake.set()

    # ------------------------------------------------------------ prediction (for placement)
    def predict(self, req: Request) -> tuple[float, float, float]:
        """(ttft, tpot, completion) predicted for ``req`` if placed here now (seconds)."""
        cost, caps = self.device.cost, self.device.capabilities
        prio = req.priority if self.engine.policy.use_priorities else None
        ahead = lambda r: prio is None or r.priority >= prio  # noqa: E731
        n_run = len(self.running)
        ctx = (sum(r.seq.length for r in self.running.values()) / n_run) if n_run else 0.0
        decode_step = cost.predict("decode", batch=n_run, context=ctx) if n_run else 0.0
        # Embedding batches waiting (they interleave with generation iterations).
        embed_texts = [t for _, _, r in self.waiting_embed if ahead(r) for t in r.texts]
        embed_s = 0.0
        if embed_texts:
            tok = max(estimate_tokens(t) for t in embed_texts)
            nb = -(-len(embed_texts) // caps.max_embed_batch)
            embed_s = nb * cost.predict("embed", batch=min(len(embed_texts), caps.max_embed_batch), tokens=tok)
        in_flight = 0.0
        if self.embedding:
            texts = [t for r in self.embedding for t in r.texts]
            in_flight = 0.5 * cost.predict("embed", batch=len(texts), tokens=max(map(estimate_tokens, texts)))
        if req.op == "embed":
            tok = max(estimate_tokens(t) for t in req.texts)
            own = cost.predict("embed", batch=len(req.texts), tokens=tok)
            t = in_flight + embed_s + own + (decode_step if n_run else 0.0)
            return t, 0.0, t
        gen_ahead = [r for _, _, r in self.waiting_gen if ahead(r)]
        prefill_tokens = sum(len(r.prompt) + len(r.output) for r in gen_ahead) + len(req.prompt)
        iterations = max(1, -(-prefill_tokens // caps.max_prefill_tokens))
        slots_needed = n_run + len(gen_ahead) + 1 - caps.max_decode_batch
        slot_wait = 0.0
        if slots_needed > 0 and n_run:
            remaining = sorted(r.max_tokens - len(r.output) for r in self.running.values())
            slot_wait = remaining[min(slots_needed, len(remaining)) - 1] * decode_step
        ttft = (in_flight + embed_s + slot_wait + iterations * decode_step
                + cost.predict("prefill", tokens=prefill_tokens))
        batch = min(caps.max_decode_batch, n_run + len(gen_ahead) + 1)
        tpot = cost.predict("decode", batch=batch, context=max(ctx, len(req.prompt) + req.max_tokens / 2))
        if embed_s and n_run:
            tpot += embed_s / max(1.0, req.max_tokens)  # the embeddings queued interleave with decode
        return ttft, tpot, ttft + max(0, req.max_tokens - 1) * tpot

    # ------------------------------------------------------------ loop
    async def run(self) -> None:
        try:
            while True:
                self.engine._expire_sessions(self)
                if not (self.waiting_embed or self.waiting_gen or self.running):
                    self.wake.clear()
                    timeout = self.engine.session_ttl_s if self.pins else None
                    try:
                        await asyncio.wait_for(self.wake.wait(), timeout)
                    except TimeoutError:
                        pass
                    continue
                if not self.healthy():
                    raise DeviceFailure(f"device {self.name} is not healthy")
                self.iterations += 1
                if self.waiting_embed:
                    await self._embed_iteration()
                if self.waiting_gen or self.running:
                    await self._gen_iteration()
                await asyncio.sleep(0)  # let submitters and streams run between iterations
        except DeviceFailure as exc:
            log.warning("device %s failed: %s", self.name, exc)
            self.engine._on_device_failure(self, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: fail the device's requests rather than hang them
            log.exception("worker %s crashed", self.name)
            self.engine._on_device_failure(self, exc)

    def _pop_live(self, heap: list) -> Request | None:
        while heap:
            _, _, req = heapq.heappop(heap)
            if req.cancelled:
                self.engine._finish(req, "cancelled")
                continue
            return req
        return None

    async def _embed_iteration(self) -> None:
        caps, engine = self.device.capabilities, self.engine
        batch: list[Request] = []
        n = 0
        while self.waiting_embed:
            nxt = self.waiting_embed[0][2]
            if batch and n + len(nxt.texts) > caps.max_embed_batch:
                break
            req = self._pop_live(self.waiting_embed)
            if req is None:
                break
            batch.append(req)
            n += len(req.texts)
        if not batch:
            return
        self.embedding = batch
        texts = [t for r in batch for t in r.texts]
        start = engine.now()
        try:
            vectors = await self.device.embed(batch[0].model, texts) if len({r.model for r in batch}) == 1 \
                else None
            if vectors is None:  # mixed models in one queue: one call per model
                raise DeviceError("mixed embedding models in a batch")
        except DeviceFailure:
            raise
        except DeviceError as exc:
            for r in batch:
                engine._finish(r, "error", RequestFailed(str(exc)))
            self.embedding = []
            return
        self.device.cost.observe("embed", engine.now() - start, batch=len(texts),
                                 tokens=max(map(estimate_tokens, texts)))
        self.embedding = []
        i = 0
        for r in batch:
            r.embeddings = vectors[i:i + len(r.texts)]
            i += len(r.texts)
            engine._finish(r, "cancelled" if r.cancelled else "stop")

    def _admit(self) -> list[Request]:
        caps, admitted = self.device.capabilities, []
        budget = caps.max_prefill_tokens
        use_prio = self.engine.policy.use_priorities
        while self.waiting_gen and len(self.running) + len(admitted) < caps.max_decode_batch:
            req = self.waiting_gen[0][2]
            if req.cancelled:
                self._pop_live(self.waiting_gen)
                continue
            need = len(req.prompt) + len(req.output) + 1
            if admitted and need > budget:
                break
            if need > self.kv_capacity:
                heapq.heappop(self.waiting_gen)
                self.engine._finish(req, "error", RequestFailed(
                    f"prompt of {need} tokens exceeds device {self.name}'s KV capacity {self.kv_capacity}"))
                continue
            reserved = sum(len(r.prompt) + len(r.output) + 1 for r in admitted)
            while self.kv_free() - reserved < need:
                if self.pins:  # evict the least recently used agent session first
                    session, _ = self.pins.popitem(last=False)
                    self.device.unpin(session)
                    self.engine.sessions.pop(session, None)
                    continue
                victim = self._victim(req.priority if use_prio else None)
                if victim is None:
                    return admitted
                self._preempt(victim)
            heapq.heappop(self.waiting_gen)
            admitted.append(req)
            budget -= need
        return admitted

    def _victim(self, below_priority: int | None) -> Request | None:
        """The running request to preempt: lowest priority, then latest arrival; only one of lower
        priority than ``below_priority`` when given."""
        cands = [r for r in self.running.values()
                 if below_priority is None or r.priority < below_priority]
        if not cands:
            return None
        return min(cands, key=lambda r: (r.priority, -r._seqno))

    def _preempt(self, req: Request) -> None:
        del self.running[req.seq.seq_id]
        self.device.free(req.seq.seq_id)
        req.seq = None
        req.preemptions += 1
        self.preemptions += 1
        self.engine.stats["preemptions"] += 1
        key = -req.priority if self.engine.policy.use_priorities else 0
        heapq.heappush(self.waiting_gen, (key, req._seqno, req))

    async def _gen_iteration(self) -> None:
        engine = self.engine
        for sid, r in list(self.running.items()):
            if r.cancelled:
                del self.running[sid]
                self.device.free(sid)
                engine._finish(r, "cancelled")
        # Growth of the running batch by one token each: preempt when the cache is full.
        while self.running and self.kv_free() < len(self.running):
            if self.pins:
                session, _ = self.pins.popitem(last=False)
                self.device.unpin(session)
                engine.sessions.pop(session, None)
                continue
            self._preempt(self._victim(None))
        new = self._admit()
        for r in new:
            r.seq = Seq(f"{r.id}.{len(r.devices)}.{r.preemptions}", r.model, list(r.prompt), r.max_tokens,
                        r.temperature, r.top_p, r.seed, r.logits_processor, r.session, list(r.output))
        decode = [r for r in self.running.values()]
        if not new and not decode:
            return
        for r in new:
            self.running[r.seq.seq_id] = r
        model = (new or decode)[0].model
        start = engine.now()
        tokens = await self.device.step(model, [r.seq for r in new], [r.seq for r in decode])
        elapsed = engine.now() - start
        self._observe(new, decode, elapsed)
        now = engine.now()
        info = self.info(model)
        for r in new + decode:
            sid = r.seq.seq_id if r.seq is not None else None
            if sid is None or sid not in self.running:
                continue  # preempted or removed meanwhile
            tok = tokens.get(sid)
            if r.cancelled:
                del self.running[sid]
                self.device.free(sid)
                engine._finish(r, "cancelled")
                continue
            stop = r.stop_ids if r.stop_ids is not None else info.stop_ids
            if tok in stop:
                self._retire(r, "stop")
                continue
            r.seq.output.append(tok)
            r._emit(tok, now)
            if len(r.output) >= r.max_tokens:
                self._retire(r, "length")
            elif r.seq.length >= info.max_context:
                self._retire(r, "length")

    def _observe(self, new: Sequence[Request], decode: Sequence[Request], elapsed: float) -> None:
        cost = self.device.cost
        shapes = []
        if new:
            shapes.append(("prefill", {"tokens": sum(r.seq.length for r in new)}))
        if decode:
            shapes.append(("decode", {"batch": len(decode),
                                      "context": sum(r.seq.length for r in decode) / len(decode)}))
        preds = [cost.base(op, **s) for op, s in shapes]
        total = sum(preds)
        if total <= 0:
            return
        for (op, s), p in zip(shapes, preds):
            cost.observe(op, elapsed * p / total, **s)

    def _retire(self, r: Request, reason: str) -> None:
        sid = r.seq.seq_id
        del self.running[sid]
        if r.session is not None and self.engine.policy.session_affinity:
            tokens = self.device.pin(r.seq, r.session)
            if tokens:
                old = self.engine.sessions.get(r.session)
                if old is not None and old[0] is not self:
                    old[0].pins.pop(r.session, None)
                    old[0].device.unpin(r.session)
                self.pins.pop(r.session, None)
                self.pins[r.session] = tokens
                self.engine.sessions[r.session] = (self, self.engine.now() + self.engine.session_ttl_s)
        else:
            self.device.free(sid)
        self.engine._finish(r, reason)


class Engine:
    """Places requests on devices and runs one :class:`DeviceWorker` per device.

    ``policy``: ``"slo"`` (SLO-aware, default), ``"round_robin"`` or ``"least_loaded"`` (FCFS
    baselines), or a :class:`~weft.sw.scheduler.policy.Policy`. Use inside a running event loop:
    ``await engine.start()`` ... ``await engine.stop()`` (or ``async with engine``).
    """

    def __init__(self, devices: Sequence[Device], policy: str | Policy = "slo", *, max_queue: int = 64,
                 session_ttl_s: float = 30.0) -> None:
        if not devices:
            raise ValueError("an engine needs at least one device")
        self.devices = list(devices)
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.max_queue = max_queue
        self.session_ttl_s = session_ttl_s
        self.workers: dict[str, DeviceWorker] = {}
        self.sessions: dict[str, tuple[DeviceWorker, float]] = {}
        self.stats = {"submitted": 0, "rejected": 0, "reroutes": 0, "preemptions": 0, "lost": 0,
                      "completed": 0, "cancelled": 0, "failed": 0}
        self.on_finish: list[Callable[[Request], None]] = []
        self.on_reroute: list[Callable[[Request, str, str | None], None]] = []
        self._seqno = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> Engine:
        self._loop = asyncio.get_running_loop()
        for d in self.devices:
            w = DeviceWorker(self, d)
            self.workers[d.name] = w
            w.task = asyncio.create_task(w.run(), name=f"weft-worker-{d.name}")
        return self

    async def stop(self) -> None:
        for w in self.workers.values():
            if w.task is not None:
                w.task.cancel()
        for w in self.workers.values():
            if w.task is not None:
                try:
                    await w.task
                except (asyncio.CancelledError, Exception):
                    pass
            for r in w.requests():
                self._finish(r, "error", RequestFailed("the server is shutting down"))
        for d in self.devices:
            d.close()

    async def __aenter__(self) -> Engine:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def now(self) -> float:
        return (self._loop or asyncio.get_running_loop()).time()

    # ------------------------------------------------------------ models
    def model_info(self, model: str, op: str | None = None) -> ModelInfo:
        for w in self.workers.values() or [DeviceWorker(self, d) for d in self.devices]:
            caps = w.device.capabilities
            if (op in (None, "embed") and model in caps.embed_models) or \
                    (op in (None, "generate") and model in caps.generate_models):
                return w.info(model)
        raise NoDevice(f"no device serves model {model!r}" + (f" for {op}" if op else ""))

    def models(self) -> dict[str, list[str]]:
        """model -> names of the devices serving it."""
        out: dict[str, list[str]] = {}
        for d in self.devices:
            for m in sorted(d.capabilities.embed_models | d.capabilities.generate_models):
                out.setdefault(m, []).append(d.name)
        return out

    # ------------------------------------------------------------ submission
    def submit(self, req: Request) -> Request:
        """Accept ``req`` onto a device or raise :class:`Overloaded` (all full) or
        :class:`NoDevice` (nothing healthy serves it)."""
        if req.op == "embed" and not req.texts:
            raise ValueError("an embedding request needs at least one text")
        if req.op == "generate" and not req.prompt:
            raise ValueError("a generation request needs a non-empty prompt")
        req._attach(self.now(), next(self._seqno))
        worker = self._place(req, respect_queue=True)
        worker.enqueue(req)
        self.stats["submitted"] += 1
        return req

    def _candidates(self, req: Request, exclude: Sequence[str] = ()) -> list[DeviceWorker]:
        return [w for w in self.workers.values() if w.serves(req) and w.healthy() and w.name not in exclude]

    def _place(self, req: Request, *, respect_queue: bool, exclude: Sequence[str] = ()) -> DeviceWorker:
        cands = self._candidates(req, exclude)
        if not cands:
            raise NoDevice(f"no healthy device serves {req.op} for model {req.model!r}")
        if req.session is not None and self.policy.session_affinity:
            held = self.sessions.get(req.session)
            if held is not None and held[0] in cands and (not respect_queue or held[0].queue_depth < self.max_queue):
                return held[0]
        open_ = [w for w in cands if w.queue_depth < self.max_queue] if respect_queue else cands
        worker = self.policy.choose(req, cands, open_)
        if worker is None:
            self.stats["rejected"] += 1
            raise Overloaded(f"all {len(cands)} device(s) serving {req.model!r} have {self.max_queue} "
                             "requests waiting; retry later", retry_after_s=1.0)
        return worker

    def _finish(self, req: Request, reason: str, error: BaseException | None = None) -> None:
        if req.done:
            return
        req._finish(reason, self.now(), error)
        key = {"stop": "completed", "length": "completed", "cancelled": "cancelled"}.get(reason, "failed")
        self.stats[key] += 1
        for cb in self.on_finish:
            try:
                cb(req)
            except Exception:  # an observer must not break the engine
                log.exception("on_finish observer failed")

    # ------------------------------------------------------------ failures and sessions
    def _on_device_failure(self, worker: DeviceWorker, exc: BaseException) -> None:
        worker.failed = True
        if worker.device.health() is Health.HEALTHY:
            worker.device.kill(str(exc))
        orphans = worker.requests()
        worker.waiting_embed.clear()
        worker.waiting_gen.clear()
        worker.running.clear()
        worker.embedding = []
        for s in list(worker.pins):
            self.sessions.pop(s, None)
        worker.pins.clear()
        for req in orphans:
            if req.done:
                continue
            if req.cancelled:
                self._finish(req, "cancelled")
                continue
            req.seq = None
            try:
                target = self._place(req, respect_queue=False, exclude=[worker.name])
            except NoDevice as e:
                self.stats["lost"] += 1
                self._finish(req, "error", RequestFailed(
                    f"device {worker.name} failed and no other device serves {req.model!r}: {e}"))
                continue
            target.enqueue(req)
            self.stats["reroutes"] += 1
            for cb in self.on_reroute:
                cb(req, worker.name, target.name)

    def _expire_sessions(self, worker: DeviceWorker) -> None:
        now = self.now()
        for session in list(worker.pins):
            held = self.sessions.get(session)
            if held is None or held[1] <= now:
                worker.pins.pop(session, None)
                worker.device.unpin(session)
                self.sessions.pop(session, None)

    def end_session(self, session: str) -> None:
        held = self.sessions.pop(session, None)
        if held is not None:
            held[0].pins.pop(session, None)
            held[0].device.unpin(session)

    # ------------------------------------------------------------ introspection
    def snapshot(self) -> dict:
        out = {}
        for name, w in self.workers.items():
            mem = w.device.memory()
            out[name] = {
                "kind": w.device.kind, "health": "failed" if w.failed else w.device.health().value,
                "queue_depth": w.queue_depth, "running": len(w.running) + len(w.embedding),
                "kv_capacity_tokens": w.kv_capacity, "kv_used_tokens": w.kv_used(),
                "kv_pinned_tokens": sum(w.pins.values()), "device_kv_used_tokens": mem.kv_used_tokens,
                "busy_s": w.device.busy_s, "iterations": w.iterations, "preemptions": w.preemptions,
                "cost": w.device.cost.describe(),
            }
        return out
