"""The one interface every runtime device offers (FPGA, CPU, GPU, simulated, null).

A device serves *models* (``"minilm"`` embeddings, ``"smollm2"`` generation) and exposes:

* :attr:`Device.capabilities` -- which models and operations, batch limits;
* :meth:`Device.memory` -- KV-cache capacity and use, in tokens (the scheduler's admission
  control and preemption work in these units);
* :meth:`Device.health` -- ``healthy`` or ``failed``; a failed device raises
  :class:`DeviceFailure` from every call;
* asynchronous batch execution: :meth:`Device.embed` (request-level batches) and
  :meth:`Device.step` (one token-level iteration: prefill some sequences, decode others);
* :attr:`Device.cost` -- a :class:`~weft.sw.devices.cost.CostModel` predicting the latency of
  those calls, which the scheduler compares across devices.

Sequences (:class:`Seq`) are owned by the scheduler; a device keeps each one's KV cache,
keyed by ``seq_id``, until :meth:`Device.free` (or a session pin, :meth:`Device.pin`).
"""

from __future__ import annotations

import abc
import asyncio
import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = [
    "DeviceError", "DeviceFailure", "Health", "Capabilities", "MemoryInfo", "ModelInfo", "Seq",
    "Device", "sample_token",
]


class DeviceError(RuntimeError):
    """A request a device cannot serve (unknown model, too long...)."""


class DeviceFailure(DeviceError):
    """The device itself failed (lost board, CUDA error, killed): its work must move elsewhere."""


class Health(str, enum.Enum):
    HEALTHY = "healthy"
    FAILED = "failed"


@dataclass(frozen=True)
class Capabilities:
    """What a device can run. ``embed_models``/``generate_models`` name served models."""

    embed_models: frozenset[str] = frozenset()
    generate_models: frozenset[str] = frozenset()
    max_embed_batch: int = 32
    max_decode_batch: int = 16
    max_prefill_tokens: int = 2048  # prompt tokens prefilled in one step, all sequences together

    def serves(self, model: str, op: str) -> bool:
        return model in (self.embed_models if op == "embed" else self.generate_models)


@dataclass(frozen=True)
class MemoryInfo:
    """KV-cache memory in tokens (of the device's generation model)."""

    kv_capacity_tokens: int
    kv_used_tokens: int
    kv_pinned_tokens: int = 0  # held for agent sessions between their steps
    bytes_per_token: int = 0

    @property
    def kv_free_tokens(self) -> int:
        return self.kv_capacity_tokens - self.kv_used_tokens - self.kv_pinned_tokens


@dataclass(frozen=True)
class ModelInfo:
    """What the scheduler and the server need to know about a served model."""

    name: str
    op: str  # "embed" or "generate"
    max_context: int
    dim: int = 0  # embedding width (embed models)
    stop_ids: frozenset[int] = frozenset()
    tokenizer: Any = None  # SmolLM2Tokenizer / BertTokenizer (for prompt rendering, counting)
    description: str = ""


@dataclass
class Seq:
    """A generation in progress. The prompt is token ids; ``output`` grows one id per step."""

    seq_id: str
    model: str
    prompt: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    #: optional ``f(output_ids, logits) -> logits`` applied before sampling (constrained decoding)
    logits_processor: Callable[[list[int], torch.Tensor], torch.Tensor] | None = None
    session: str | None = None
    output: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.output)

    def rng(self) -> torch.Generator:
        if self.generator is None:
            self.generator = torch.Generator()
            self.generator.manual_seed(int(self.seed) if self.seed is not None
                                       else int(torch.seed() % (2 ** 63)))
        return self.generator


def sample_token(logits: torch.Tensor, seq: Seq) -> int:
    """Greedy (temperature 0) or nucleus sampling from one row of logits, with the sequence's
    own seeded generator, after its logits processor."""
    logits = logits.detach().float().cpu().reshape(-1)
    if seq.logits_processor is not None:
        logits = seq.logits_processor(seq.output, logits)
    if seq.temperature <= 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.double() / seq.temperature, dim=-1)
    if seq.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = (torch.cumsum(sorted_p, dim=-1) - sorted_p) < seq.top_p
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        choice = torch.multinomial(sorted_p / sorted_p.sum(), 1, generator=seq.rng())
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=seq.rng()))


class Device(abc.ABC):
    """Base class. Subclasses implement the ``_embed``/``_step`` work (run in a worker thread
    by default so the event loop stays free) and describe themselves."""

    kind: str = "device"  # "fpga", "cpu", "gpu", "sim", "null"

    def __init__(self, name: str) -> None:
        self.name = name
        self._health = Health.HEALTHY
        self._failure: str | None = None
        self._executor = None
        self.busy_s = 0.0  # total time spent executing (for utilization)
        self.calls = 0
        self.created = time.perf_counter()

    # ------------------------------------------------------------ description
    @property
    @abc.abstractmethod
    def capabilities(self) -> Capabilities: ...

    @property
    @abc.abstractmethod
    def cost(self):
        """The device's :class:`~weft.sw.devices.cost.CostModel`."""

    @abc.abstractmethod
    def model_info(self, model: str) -> ModelInfo: ...

    def memory(self) -> MemoryInfo:
        return MemoryInfo(0, 0)

    def health(self) -> Health:
        return self._health

    def describe(self) -> dict[str, Any]:
        caps = self.capabilities
        return {"name": self.name, "kind": self.kind, "health": self.health().value,
                "embed_models": sorted(caps.embed_models),
                "generate_models": sorted(caps.generate_models),
                "failure": self._failure}

    # ------------------------------------------------------------ failure
    def kill(self, reason: str = "killed") -> None:
        """Mark the device failed (tests and fault injection; a real failure does the same)."""
        self._health = Health.FAILED
        self._failure = reason

    def _check(self) -> None:
        if self._health is Health.FAILED:
            raise DeviceFailure(f"device {self.name} has failed: {self._failure}")

    # ------------------------------------------------------------ execution
    async def embed(self, model: str, texts: Sequence[str]) -> np.ndarray:
        """Embeddings ``(len(texts), dim)`` float32 for one request-level batch."""
        self._check()
        if not self.capabilities.serves(model, "embed"):
            raise DeviceError(f"device {self.name} does not serve embeddings for {model!r}")
        return await self._timed(self._embed, model, list(texts))

    async def step(self, model: str, prefill: Sequence[Seq], decode: Sequence[Seq]) -> dict[str, int]:
        """One continuous-batching iteration: prefill ``prefill`` (new sequences, KV created),
        decode one token for each of ``decode``; returns the next token id of every sequence."""
        self._check()
        if not self.capabilities.serves(model, "generate"):
            raise DeviceError(f"device {self.name} does not serve generation for {model!r}")
        return await self._timed(self._step, model, list(prefill), list(decode))

    async def _timed(self, fn, *args):
        start = time.perf_counter()
        try:
            result = await self._run(fn, *args)
        except DeviceError:
            raise
        except Exception as exc:  # a crash inside the device: it is now failed
            self.kill(f"{type(exc).__name__}: {exc}")
            raise DeviceFailure(f"device {self.name} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self.busy_s += time.perf_counter() - start
            self.calls += 1
        self._check()  # killed while the call ran: its result is not trusted
        return result

    async def _run(self, fn, *args):
        """Run blocking work on the device's own single worker thread (one call at a time)."""
        if self._executor is None:
            from concurrent.futures import ThreadPoolExecutor

            self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"weft-{self.name}")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _embed(self, model: str, texts: list[str]) -> np.ndarray:  # pragma: no cover - abstract-ish
        raise DeviceError(f"device {self.name} cannot embed")

    def _step(self, model: str, prefill: list[Seq], decode: list[Seq]) -> dict[str, int]:  # pragma: no cover
        raise DeviceError(f"device {self.name} cannot generate")

    # ------------------------------------------------------------ KV cache
    def free(self, seq_id: str) -> None:
        """Drop a sequence's KV cache (finished, cancelled or preempted)."""

    def pin(self, seq: Seq, session: str) -> int:
        """Keep a finished sequence's KV cache for its agent session's next step; returns the
        tokens pinned (0 if the device keeps nothing)."""
        self.free(seq.seq_id)
        return 0

    def unpin(self, session: str) -> None:
        """Drop a session's pinned KV cache (TTL expired, evicted, session closed)."""

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
