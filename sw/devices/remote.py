"""Devices on Ray actors (``weft serve --ray``): scale-out across machines.

Each device runs inside a Ray actor (:class:`DeviceHost`) placed by Ray's resources: FPGA devices
ask for the custom resource ``{"FPGA": 1}`` (a node with a board, or an emulated one, declares it:
``ray start --resources '{"FPGA": 1}'``), GPU devices for ``num_gpus=1``, CPU devices for one CPU.
The engine talks to each actor through :class:`RayDevice`, a :class:`~weft.sw.devices.base.Device`
like any other: same capabilities, cost model and memory accounting, asynchronous ``embed`` and
``step`` (awaiting the actor's result), so the scheduler does not know the device is remote.

* The actor keeps the sequences and their KV caches; each ``step`` ships only what changed (new
  sequences in full, the decoded ones as ``(seq_id, output ids)``). ``free``/``pin``/``unpin`` are
  fire-and-forget calls; a synchronous (single-threaded) actor runs its calls in submission order,
  so they land between the right steps.
* The cost model is the actor's, copied once; the proxy corrects it online from what it measures
  (round trips included), as every device does.
* Tokenizers stay local (the server renders chat templates and counts tokens itself).
* A dead actor (its process or node lost, ``ray.kill``) is a :class:`DeviceFailure`: the engine
  moves the device's requests elsewhere.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from .base import Capabilities, Device, DeviceError, DeviceFailure, Health, MemoryInfo, ModelInfo, Seq

__all__ = ["DeviceHost", "RayDevice", "make_ray_devices", "ray_options", "ray_available"]


_LOST = None  # Ray's "actor gone" exception types, looked up on first use (Ray is optional)


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def ray_options(item: str) -> dict:
    """Ray resources for a device spec item: FPGA boards by the custom resource ``FPGA``, GPUs
    by ``num_gpus``, CPU devices by one CPU; the null device needs nothing."""
    kind = item.partition(":")[0]
    if kind == "fpga":
        return {"num_cpus": 0, "resources": {"FPGA": 1}}
    if kind == "gpu":
        return {"num_cpus": 0, "num_gpus": 1}
    if kind == "cpu":
        return {"num_cpus": 1}
    if kind == "null":
        return {"num_cpus": 0}
    raise DeviceError(f"unknown device {item!r}; expected fpga:emu, fpga:golden, fpga:sim, cpu, gpu or null")


class DeviceHost:
    """The actor side: builds one device from a spec item (loading its own models) and runs the
    proxy's calls on it, one at a time."""

    def __init__(self, item: str, models: Sequence[str], tiny: bool, options: dict | None = None) -> None:
        from . import ModelSet, make_devices

        kind = item.partition(":")[0]
        if kind == "gpu":
            item = "gpu"  # Ray shows the actor only its own GPU, as cuda:0
        # an FPGA device serves MiniLM only: do not load SmolLM2 into its process
        names = [m for m in models if kind != "fpga" or m == "minilm"] if kind != "null" else []
        if kind == "null":
            names = ["smollm2"] if "smollm2" in models else []
        self.models = ModelSet.load(names, tiny=tiny)
        self.device = make_devices(item, self.models, **(options or {}))[0]
        self._seqs: dict[str, Seq] = {}
        self._loop = asyncio.new_event_loop()

    def describe(self) -> dict:
        d = self.device
        caps = d.capabilities
        infos = {m: replace(d.model_info(m), tokenizer=None) for m in caps.embed_models | caps.generate_models}
        return {"name": d.name, "kind": d.kind, "capabilities": caps, "cost": d.cost, "infos": infos,
                "memory": d.memory(), "describe": d.describe(), "pid": os.getpid(), "node": _node_ip()}

    def _state(self) -> tuple[MemoryInfo, str, float]:
        return self.device.memory(), self.device.health().value, self.device.busy_s

    def embed(self, model: str, texts: list[str]):
        out = self._loop.run_until_complete(self.device.embed(model, texts))
        return np.asarray(out, np.float32), self._state()

    def step(self, model: str, prefill: list[Seq], decode: list[tuple[str, list[int]]]):
        for s in prefill:
            self._seqs[s.seq_id] = s
        running = []
        for sid, output in decode:
            seq = self._seqs.get(sid)
            if seq is None:
                raise DeviceError(f"device {self.device.name} holds no sequence {sid!r}")
            seq.output = list(output)
            running.append(seq)
        tokens = self._loop.run_until_complete(self.device.step(model, prefill, running))
        return tokens, self._state()

    def free(self, seq_id: str) -> None:
        self._seqs.pop(seq_id, None)
        self.device.free(seq_id)

    def pin(self, seq_id: str, output: list[int], session: str) -> int:
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return 0
        seq.output = list(output)
        return self.device.pin(seq, session)

    def unpin(self, session: str) -> None:
        self.device.unpin(session)

    def kill(self, reason: str) -> None:
        self.device.kill(reason)

    def stats(self) -> dict:
        """Counters of the device in the actor (calls, busy time, KV prefix reuses)."""
        d = self.device
        return {"calls": d.calls, "busy_s": d.busy_s, "prefix_hits": getattr(d, "prefix_hits", 0)}


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:  # outside Ray (tests of the class itself)
        return "local"


class RayDevice(Device):
    """A device living in a Ray actor (see the module doc). ``owned``: :meth:`close` kills the
    actor (the engine that built it owns it)."""

    def __init__(self, actor, info: dict, tokenizers: dict[str, Any] | None = None, *, owned: bool = True) -> None:
        super().__init__(info["name"])
        self.actor = actor
        self.kind = info["kind"]
        self._caps: Capabilities = info["capabilities"]
        self._cost = info["cost"]
        tokenizers = tokenizers or {}
        self._infos: dict[str, ModelInfo] = {m: replace(i, tokenizer=tokenizers.get(m, i.tokenizer))
                                             for m, i in info["infos"].items()}
        self._memory: MemoryInfo = info["memory"]
        self._remote = info["describe"]
        self.pid, self.node = info["pid"], info["node"]
        self.owned = owned

    @classmethod
    def connect(cls, actor, tokenizers: dict[str, Any] | None = None, *, owned: bool = False,
                timeout_s: float = 300.0) -> RayDevice:
        import ray

        return cls(actor, ray.get(actor.describe.remote(), timeout=timeout_s), tokenizers, owned=owned)

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    @property
    def cost(self):
        return self._cost

    def model_info(self, model: str) -> ModelInfo:
        if model not in self._infos:
            raise DeviceError(f"device {self.name} does not serve {model!r}")
        return self._infos[model]

    def memory(self) -> MemoryInfo:
        return self._memory

    def describe(self) -> dict:
        out = {**self._remote, **super().describe(), "remote": "ray", "pid": self.pid, "node": self.node}
        return out

    def _update(self, state) -> None:
        mem, health, _ = state
        self._memory = mem
        if health != Health.HEALTHY.value and self._health is Health.HEALTHY:
            self._health, self._failure = Health.FAILED, "the remote device reports failure"

    async def _call(self, method, *args):
        import ray

        global _LOST
        if _LOST is None:
            _LOST = tuple(getattr(ray.exceptions, n) for n in ("RayActorError", "ActorUnavailableError")
                          if hasattr(ray.exceptions, n))

        self._check()
        start = time.perf_counter()
        try:
            result, state = await method.remote(*args)
        except DeviceError:  # the device's own error, re-raised through Ray with its type
            raise
        except _LOST as exc:
            super().kill(f"Ray actor lost: {type(exc).__name__}")
            raise DeviceFailure(f"device {self.name}: its Ray actor is gone ({type(exc).__name__})") from exc
        except ray.exceptions.RayError as exc:
            super().kill(f"{type(exc).__name__}: {exc}")
            raise DeviceFailure(f"device {self.name} failed remotely: {exc}") from exc
        finally:
            self.busy_s += time.perf_counter() - start
            self.calls += 1
        self._update(state)
        self._check()
        return result

    async def embed(self, model: str, texts) -> np.ndarray:
        if not self._caps.serves(model, "embed"):
            raise DeviceError(f"device {self.name} does not serve embeddings for {model!r}")
        return await self._call(self.actor.embed, model, list(texts))

    async def step(self, model: str, prefill: Sequence[Seq], decode: Sequence[Seq]) -> dict[str, int]:
        if not self._caps.serves(model, "generate"):
            raise DeviceError(f"device {self.name} does not serve generation for {model!r}")
        # ship new sequences without their local RNG (the actor seeds its own from ``seed``)
        fresh = [replace(s, output=list(s.output), generator=None) for s in prefill]
        return await self._call(self.actor.step, model, fresh, [(s.seq_id, list(s.output)) for s in decode])

    def free(self, seq_id: str) -> None:
        if self._health is Health.HEALTHY:
            self.actor.free.remote(seq_id)

    def pin(self, seq: Seq, session: str) -> int:
        if self._health is not Health.HEALTHY:
            return 0
        self.actor.pin.remote(seq.seq_id, list(seq.output), session)
        return seq.length  # what the actor's cache holds (the count is not worth a round trip)

    def unpin(self, session: str) -> None:
        if self._health is Health.HEALTHY:
            self.actor.unpin.remote(session)

    def kill(self, reason: str = "killed") -> None:
        super().kill(reason)
        try:
            self.actor.kill.remote(reason)
        except Exception:  # the actor may be gone already
            pass

    def close(self) -> None:
        if self.owned:
            import ray

            try:
                ray.kill(self.actor)
            except Exception:
                pass


def _local_tokenizers(models: Sequence[str], tiny: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "smollm2" in models:
        from weft.sw.models import smollm2 as s

        out["smollm2"] = s.tiny_tokenizer() if tiny else s.load_tokenizer()
    if "minilm" in models:
        from weft.sw.models import minilm

        out["minilm"] = minilm.tiny_tokenizer() if tiny else minilm.BertTokenizer.from_pretrained()
    return out


def make_ray_devices(spec: str, models: Sequence[str], *, tiny: bool = False, timeout_s: float = 600.0,
                     **options) -> list[RayDevice]:
    """One Ray actor per device of ``spec`` (the ``--devices`` syntax), placed by
    :func:`ray_options`; returns their proxies. Ray must be initialised (``ray.init``). A device
    whose resource no node offers is an error, not a wait."""
    import ray

    if not ray.is_initialized():
        raise DeviceError("Ray is not initialised: call ray.init() (or ray.init(address=...)) first")
    items = [s.strip() for s in spec.split(",") if s.strip()]
    if not items:
        raise DeviceError("no devices given")
    if len(set(items)) != len(items):
        raise DeviceError(f"duplicate device names in {spec!r}")
    total = ray.cluster_resources()
    need: dict[str, float] = {}
    for item in items:
        opts = ray_options(item)
        for k, v in {**opts.get("resources", {}), "GPU": opts.get("num_gpus", 0),
                     "CPU": opts.get("num_cpus", 0)}.items():
            need[k] = need.get(k, 0) + v
    short = [f"{k} (need {v:g}, the cluster has {total.get(k, 0):g})" for k, v in need.items()
             if v > total.get(k, 0)]
    if short:
        raise DeviceError("the Ray cluster lacks resources for " + spec + ": " + ", ".join(short)
                          + "; start nodes with e.g. ray start --resources '{\"FPGA\": 1}'")
    host = ray.remote(DeviceHost)
    actors = [host.options(name=None, max_restarts=0, **ray_options(item)).remote(item, list(models), tiny, options)
              for item in items]
    try:
        infos = ray.get([a.describe.remote() for a in actors], timeout=timeout_s)
    except Exception:
        for a in actors:
            ray.kill(a)
        raise
    tokenizers = _local_tokenizers(models, tiny)
    return [RayDevice(a, info, tokenizers, owned=True) for a, info in zip(actors, infos)]
