"""Requests as the scheduler sees them, and the handle the caller keeps."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["SLO", "Request", "SchedulerError", "Overloaded", "NoDevice", "RequestFailed", "estimate_tokens"]

_ids = itertools.count()


class SchedulerError(RuntimeError):
    pass


class Overloaded(SchedulerError):
    """Every device that could take the request is at capacity (HTTP 429)."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class NoDevice(SchedulerError):
    """No healthy device serves this model and operation (HTTP 503 / 404)."""


class RequestFailed(SchedulerError):
    """An accepted request could not be completed (all devices able to run it failed)."""


@dataclass(frozen=True)
class SLO:
    """Latency objectives: time to first token and per output token for generation, end to end
    for embeddings (seconds)."""

    ttft_s: float = 2.0
    tpot_s: float = 0.25
    e2e_s: float = 1.0


def estimate_tokens(text: str) -> int:
    """A tokenizer-free token estimate for cost predictions (~4 characters a token, plus the
    special tokens)."""
    return max(1, len(text) // 4) + 2


@dataclass(eq=False)
class Request:
    """``op="embed"`` with ``texts``, or ``op="generate"`` with ``prompt`` (token ids).

    After :meth:`Engine.submit`: ``async for tok in req.stream()`` yields generated token ids as
    they come; ``await req.wait()`` waits for the end (embeddings in ``req.embeddings``);
    ``req.cancel()`` stops it (the client went away)."""

    op: str
    model: str
    texts: list[str] = field(default_factory=list)
    prompt: list[int] = field(default_factory=list)
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: frozenset[int] | None = None  # default: the model's
    logits_processor: Callable | None = None
    priority: int = 0  # higher runs first (SLO-aware policy only)
    slo: SLO = field(default_factory=SLO)
    session: str | None = None  # agent session: steps stay where its KV cache lives
    id: str = field(default_factory=lambda: f"r{next(_ids)}")
    metadata: dict[str, Any] = field(default_factory=dict)

    # ---- filled in by the engine
    arrival: float = 0.0
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None  # "stop", "length", "cancelled", "error"
    error: BaseException | None = None
    device: str | None = None
    devices: list[str] = field(default_factory=list)  # every device it was placed on
    output: list[int] = field(default_factory=list)
    embeddings: np.ndarray | None = None
    cancelled: bool = False
    preemptions: int = 0
    seq: Any = None
    _events: asyncio.Queue | None = None
    _done: asyncio.Event | None = None
    _seqno: int = 0

    def __post_init__(self) -> None:
        if self.op not in ("embed", "generate"):
            raise ValueError(f"op must be 'embed' or 'generate', got {self.op!r}")

    # ---- for the caller
    @property
    def done(self) -> bool:
        return self.finished_at is not None

    @property
    def reroutes(self) -> int:
        return max(0, len(self.devices) - 1)

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.arrival

    @property
    def e2e(self) -> float | None:
        return None if self.finished_at is None else self.finished_at - self.arrival

    @property
    def tpot(self) -> float | None:
        if self.finished_at is None or self.first_token_at is None or len(self.output) < 2:
            return None
        return (self.finished_at - self.first_token_at) / (len(self.output) - 1)

    def met_slo(self) -> bool:
        if self.finish_reason in (None, "cancelled", "error"):
            return False
        if self.op == "embed":
            return self.e2e <= self.slo.e2e_s
        ok = self.ttft is not None and self.ttft <= self.slo.ttft_s
        return ok and (self.tpot is None or self.tpot <= self.slo.tpot_s)

    def cancel(self) -> None:
        self.cancelled = True
        if self._events is not None:
            self._events.put_nowait(None)

    async def wait(self) -> Request:
        await self._done.wait()
        if self.error is not None:
            raise self.error
        return self

    async def stream(self) -> AsyncIterator[int]:
        """Token ids as generated; ends when the request ends (raises its error, if any)."""
        while True:
            item = await self._events.get()
            if item is None:
                if self.done or self.cancelled:
                    if self.error is not None:
                        raise self.error
                    return
                continue
            yield item

    # ---- for the engine
    def _attach(self, now: float, seqno: int) -> None:
        self.arrival = now
        self._seqno = seqno
        self._events = asyncio.Queue()
        self._done = asyncio.Event()

    def _emit(self, token: int, now: float) -> None:
        if self.first_token_at is None:
            self.first_token_at = now
        self.output.append(token)
        self._events.put_nowait(token)

    def _finish(self, reason: str, now: float, error: BaseException | None = None) -> None:
        if self.finished_at is not None:
            return
        if self.op == "embed" and self.first_token_at is None and reason != "cancelled":
            self.first_token_at = now
        self.finished_at = now
        self.finish_reason = reason
        self.error = error
        self._events.put_nowait(None)
        self._done.set()
