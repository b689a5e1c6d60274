"""Server overhead on the null device: what one request costs the HTTP layer and the engine
when the device takes no time. Reports the server-side time (request received to response
headers, the ``x-weft-server-ms`` header) and the client's round trip over loopback."""

from __future__ import annotations

import statistics
import time

__all__ = ["server_overhead", "agent_step_overhead", "ray_hop"]


def server_overhead(n: int = 300, endpoint: str = "embeddings") -> dict:
    import httpx

    from weft.sw.devices import ModelSet, NullDevice

    from .app import ServerSettings, create_app
    from .run import ServerThread

    tok = ModelSet.load(["smollm2"], tiny=True).smollm2_tokenizer
    app = create_app(lambda: [NullDevice("null", tokenizer=tok)], settings=ServerSettings())
    body = {"embeddings": ("/v1/embeddings", {"model": "minilm", "input": "hello world"}),
            "chat": ("/v1/chat/completions", {"model": "smollm2", "max_tokens": 1,
                                              "messages": [{"role": "user", "content": "hi"}]})}[endpoint]
    server, client = [], []
    with ServerThread(app) as url, httpx.Client(base_url=url) as c:
        for i in range(n + 20):
            t = time.perf_counter()
            r = c.post(body[0], json=body[1])
            dt = time.perf_counter() - t
            r.raise_for_status()
            if i >= 20:  # warm-up
                server.append(float(r.headers["x-weft-server-ms"]))
                client.append(dt * 1e3)
    q = lambda a, p: statistics.quantiles(a, n=100)[p - 1]  # noqa: E731
    return {"endpoint": endpoint, "n": n, "server_p50_ms": statistics.median(server), "server_p99_ms": q(server, 99),
            "client_p50_ms": statistics.median(client), "client_p99_ms": q(client, 99)}


def _quantiles(samples_s: list[float]) -> tuple[float, float]:
    ms = sorted(x * 1e3 for x in samples_s)
    return statistics.median(ms), statistics.quantiles(ms, n=100)[98]


def agent_step_overhead(runs: int = 50, steps: int = 10) -> dict:
    """The agent runner's own time per step: runs of ``steps`` ``embed`` steps on the null device,
    in process (no HTTP); p50 / p99 of run time divided by steps, in ms."""
    import asyncio

    from weft.sw.agents import AgentRunner, AgentSpec
    from weft.sw.devices import ModelSet, NullDevice
    from weft.sw.scheduler import Engine

    tok = ModelSet.load(["smollm2"], tiny=True).smollm2_tokenizer
    spec = AgentSpec.model_validate({"steps": [{"id": f"e{i}", "op": "embed", "texts": ["hello"]}
                                               for i in range(steps)]})

    async def go():
        async with Engine([NullDevice("null", tokenizer=tok)]) as eng:
            runner = AgentRunner()
            runner.bind(eng)
            times = []
            for i in range(runs + 5):
                t = time.perf_counter()
                run = await runner.start(spec).wait()
                if run.status != "completed":
                    raise RuntimeError(f"benchmark run failed: {run.error}")
                if i >= 5:  # warm-up
                    times.append((time.perf_counter() - t) / steps)
            return times

    p50, p99 = _quantiles(asyncio.run(go()))
    return {"runs": runs, "steps": steps, "p50_ms": p50, "p99_ms": p99}


def ray_hop(n: int = 300) -> dict:
    """What a Ray actor adds to a device call, on a local Ray instance (2 CPUs): the null device's
    ``embed`` and one decode step of the tiny SmolLM2 on a CPU device, each in process and through
    its actor (:class:`weft.sw.devices.RayDevice`); p50 / p99 in ms."""
    import asyncio
    import os

    import ray

    from weft.sw.devices import ModelSet, NullDevice, TorchDevice, make_ray_devices
    from weft.sw.devices.base import Seq

    async def embeds(dev):
        out = []
        for i in range(n + 20):
            t = time.perf_counter()
            await dev.embed("minilm", ["hello world"])
            if i >= 20:
                out.append(time.perf_counter() - t)
        return _quantiles(out)

    async def decodes(dev):
        seq = Seq("bench", "smollm2", [5, 6, 7, 8], 10_000)
        seq.output.append((await dev.step("smollm2", [seq], []))["bench"])
        out = []
        for i in range(min(n, 200) + 10):
            t = time.perf_counter()
            tok = (await dev.step("smollm2", [], [seq]))["bench"]
            if i >= 10:
                out.append(time.perf_counter() - t)
            seq.output.append(tok)
        dev.free("bench")
        return _quantiles(out)

    models = ModelSet.load(["smollm2"], tiny=True)
    result = {"null_local": asyncio.run(embeds(NullDevice("null", tokenizer=models.smollm2_tokenizer))),
              "decode_local": asyncio.run(decodes(TorchDevice(models, "cpu", profile=False)))}
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = {d.name: d for d in make_ray_devices("null,cpu", ["smollm2"], tiny=True, profile=False)}
        result["null_ray"] = asyncio.run(embeds(remote["null"]))
        result["decode_ray"] = asyncio.run(decodes(remote["cpu"]))
        for d in remote.values():
            d.close()
    finally:
        if started:
            ray.shutdown()
    return result
