"""Simulated devices with known service times, and the null device.

:class:`SimDevice` takes a :class:`~weft.sw.devices.cost.LinearCostModel` as its *true* service
time, waits that long with ``asyncio.sleep`` (no thread: under the benchmark's virtual clock a
whole load test runs in seconds), and returns made-up values: a fixed token pattern for
generation, hash-derived unit vectors for embeddings. Its cost model (what the scheduler sees)
is a copy, optionally mis-calibrated by ``cost_error`` so the online correction has work to do.

:class:`NullDevice` is a ``SimDevice`` whose calls take no time: what remains of a request's
latency is the server's own overhead.
"""

from __future__ import annotations

import asyncio
import hashlib
import random

import numpy as np

from .base import Capabilities, Device, DeviceError, MemoryInfo, ModelInfo, Seq
from .cost import LinearCostModel

__all__ = ["SimDevice", "NullDevice"]


class SimDevice(Device):
    kind = "sim"

    def __init__(self, name: str, service: LinearCostModel, *, embed: bool = True, generate: bool = True,
                 kv_capacity_tokens: int = 1 << 20, max_decode_batch: int = 16, max_embed_batch: int = 32,
                 max_prefill_tokens: int = 2048, cost_error: float = 1.0, jitter: float = 0.0, seed: int = 0,
                 tokenizer=None, max_context: int = 2048, dim: int = 384, text: str = "weft ") -> None:
        super().__init__(name)
        self.service = service
        self._cost = LinearCostModel({op: tuple(v * cost_error for v in c) for op, c in service.coef.items()})
        self._caps = Capabilities(
            embed_models=frozenset({"minilm"} if embed else ()),
            generate_models=frozenset({"smollm2"} if generate else ()),
            max_embed_batch=max_embed_batch, max_decode_batch=max_decode_batch,
            max_prefill_tokens=max_prefill_tokens)
        self._kv: dict[str, int] = {}
        self._pins: dict[str, int] = {}
        self._capacity = kv_capacity_tokens
        self.jitter = jitter
        self._rng = random.Random(seed)
        if tokenizer is None:
            from weft.sw.models.smollm2 import tiny_tokenizer

            tokenizer = tiny_tokenizer()
        self.tokenizer = tokenizer
        self.pattern = tokenizer.encode(text) or [3]
        self.max_context = max_context
        self.dim = dim

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    @property
    def cost(self) -> LinearCostModel:
        return self._cost

    def model_info(self, model: str) -> ModelInfo:
        if model == "minilm" and "minilm" in self._caps.embed_models:
            return ModelInfo("minilm", "embed", 512, dim=self.dim, description=f"simulated on {self.name}")
        if model == "smollm2" and "smollm2" in self._caps.generate_models:
            return ModelInfo("smollm2", "generate", self.max_context, tokenizer=self.tokenizer,
                             stop_ids=self.tokenizer.stop_ids, description=f"simulated on {self.name}")
        raise DeviceError(f"device {self.name} does not serve {model!r}")

    def memory(self) -> MemoryInfo:
        return MemoryInfo(self._capacity, sum(self._kv.values()), sum(self._pins.values()))

    def _service(self, op: str, **shape) -> float:
        t = self.service.base(op, **shape)
        if self.jitter:
            t *= max(0.0, self._rng.gauss(1.0, self.jitter))
        return t

    async def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            await asyncio.sleep(seconds)
        self.busy_s += seconds
        self.calls += 1
        self._check()

    async def embed(self, model: str, texts) -> np.ndarray:
        self._check()
        if not self._caps.serves(model, "embed"):
            raise DeviceError(f"device {self.name} does not serve embeddings for {model!r}")
        tokens = max((len(t.split()) + 2 for t in texts), default=1)
        await self._sleep(self._service("embed", batch=len(texts), tokens=tokens))
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            seed = int.from_bytes(hashlib.sha256(t.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            out[i] = v / np.linalg.norm(v)
        return out

    async def step(self, model: str, prefill, decode) -> dict[str, int]:
        self._check()
        if not self._caps.serves(model, "generate"):
            raise DeviceError(f"device {self.name} does not serve generation for {model!r}")
        t = 0.0
        if prefill:
            t += self._service("prefill", tokens=sum(s.length for s in prefill))
        if decode:
            t += self._service("decode", batch=len(decode), context=sum(s.length for s in decode) / len(decode))
        await self._sleep(t)
        out = {}
        for s in list(prefill) + list(decode):
            self._kv[s.seq_id] = s.length + 1
            out[s.seq_id] = self.pattern[len(s.output) % len(self.pattern)]
            if s.logits_processor is not None:
                import torch

                logits = torch.zeros(self.tokenizer.vocab_size)
                logits[out[s.seq_id]] = 1.0
                out[s.seq_id] = int(torch.argmax(s.logits_processor(s.output, logits)))
        return out

    def free(self, seq_id: str) -> None:
        self._kv.pop(seq_id, None)

    def pin(self, seq: Seq, session: str) -> int:
        n = self._kv.pop(seq.seq_id, 0)
        if n:
            self._pins[session] = n
        return n

    def unpin(self, session: str) -> None:
        self._pins.pop(session, None)


class NullDevice(SimDevice):
    """Every call returns at once: for measuring the server's own overhead."""

    kind = "null"

    def __init__(self, name: str = "null", **kw) -> None:
        zero = LinearCostModel({"embed": (0.0, 0.0, 0.0), "prefill": (0.0, 0.0, 0.0),
                                "decode": (0.0, 0.0, 0.0)})
        super().__init__(name, zero, **kw)

    async def _sleep(self, seconds: float) -> None:
        self.calls += 1
        self._check()
