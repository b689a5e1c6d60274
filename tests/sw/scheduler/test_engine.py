"""The engine on simulated devices under a virtual clock (deterministic, no sleeping)."""

import asyncio

import pytest

from weft.sw.devices import LinearCostModel, SimDevice
from weft.sw.scheduler import (SLO, Engine, NoDevice, Overloaded, Request, RequestFailed, run_virtual)
from weft.sw.scheduler.bench import Workload, capacity, run_load

FAST = LinearCostModel({"embed": (0.002, 1e-6, 0.0), "prefill": (0.005, 1e-5, 0.0), "decode": (0.01, 0.001, 0.0)})
SLOW = LinearCostModel({"embed": (0.02, 1e-5, 0.0), "prefill": (0.05, 1e-4, 0.0), "decode": (0.1, 0.01, 0.0)})


def gen(n=10, prompt=20, **kw):
    return Request("generate", "smollm2", prompt=[5] * prompt, max_tokens=n, **kw)


def run(coro_fn, *devices, **engine_kw):
    async def main():
        engine = await Engine(list(devices), **engine_kw).start()
        try:
            return await coro_fn(engine)
        finally:
            await engine.stop()
    return run_virtual(main())


def test_continuous_batching_admits_new_sequences_into_the_running_batch():
    dev = SimDevice("d", FAST)

    async def body(engine):
        first = engine.submit(gen(50))
        await asyncio.sleep(0.1)  # first is decoding
        second = engine.submit(gen(5))
        await second.wait()
        assert not first.done  # second joined, finished, and left while first still runs
        await first.wait()
        return first, second
    first, second = run(body, dev)
    assert len(first.output) == 50 and len(second.output) == 5
    assert second.ttft < 0.05 and first.finish_reason == "length"


def test_embeddings_are_batched_per_request():
    dev = SimDevice("d", FAST, generate=False, max_embed_batch=8)

    async def body(engine):
        reqs = [engine.submit(Request("embed", "minilm", texts=[f"text {i}", "b"])) for i in range(4)]
        for r in reqs:
            await r.wait()
        return reqs
    reqs = run(body, dev)
    assert dev.calls == 1  # 8 sentences, one device call
    assert all(r.embeddings.shape == (2, 384) for r in reqs)


def test_kv_admission_and_preemption_lose_nothing():
    dev = SimDevice("d", FAST, kv_capacity_tokens=100)

    async def body(engine):
        reqs = [engine.submit(gen(30, prompt=20)) for _ in range(4)]
        for r in reqs:
            await r.wait()
        return reqs, engine
    reqs, engine = run(body, dev)
    assert all(len(r.output) == 30 for r in reqs)
    assert engine.stats["preemptions"] > 0
    pattern = reqs[0].output
    assert all(r.output == pattern for r in reqs)  # recomputed sequences continue where they were


def test_priority_preempts_lower_priority_work():
    dev = SimDevice("d", FAST, kv_capacity_tokens=45)

    async def body(engine):
        low = engine.submit(gen(30, prompt=10, priority=0))
        await asyncio.sleep(0.05)
        high = engine.submit(gen(5, prompt=35, priority=10))
        await high.wait()
        assert not low.done
        await low.wait()
        return low, high
    low, high = run(body, dev)
    assert low.preemptions == 1 and high.ttft < 0.05 and len(low.output) == 30


def test_slo_policy_places_on_the_faster_device_and_baselines_spread():
    async def body(engine):
        reqs = [engine.submit(gen(10)) for _ in range(6)]
        for r in reqs:
            await r.wait()
        return [r.device for r in reqs]
    assert run(body, SimDevice("slow", SLOW), SimDevice("fast", FAST), policy="slo").count("fast") == 6
    rr = run(body, SimDevice("slow", SLOW), SimDevice("fast", FAST), policy="round_robin")
    assert rr == ["slow", "fast"] * 3
    ll = run(body, SimDevice("slow", SLOW), SimDevice("fast", FAST), policy="least_loaded")
    assert ll.count("slow") == 3


def test_failed_device_requeues_every_accepted_request():
    a, b = SimDevice("a", FAST), SimDevice("b", FAST)

    async def body(engine):
        reqs = [engine.submit(gen(40)) for _ in range(6)]
        reqs += [engine.submit(Request("embed", "minilm", texts=["x"] * 3)) for _ in range(4)]
        await asyncio.sleep(0.1)
        a.kill("pulled the plug")
        for r in reqs:
            await r.wait()
        return reqs, engine
    reqs, engine = run(body, a, b)
    assert all(r.finish_reason in ("length", "stop") for r in reqs)
    gens = [r for r in reqs if r.op == "generate"]
    assert all(len(r.output) == 40 for r in gens)
    assert all(r.output == gens[0].output for r in gens)  # no token lost or duplicated
    assert engine.stats["reroutes"] > 0 and engine.stats["lost"] == 0
    assert any(r.devices[:2] == ["a", "b"] for r in gens)
    assert engine.workers["a"].failed


def test_failure_without_another_device_fails_the_request_clearly():
    a = SimDevice("a", FAST)

    async def body(engine):
        r = engine.submit(gen(40))
        await asyncio.sleep(0.05)
        a.kill()
        with pytest.raises(RequestFailed, match="no other device"):
            await r.wait()
        with pytest.raises(NoDevice):
            engine.submit(gen(4))
    run(body, a)


def test_backpressure_refuses_beyond_the_queue_limit():
    async def body(engine):
        accepted = [engine.submit(gen(5)) for _ in range(3)]
        with pytest.raises(Overloaded):
            engine.submit(gen(5))
        for r in accepted:
            await r.wait()
        engine.submit(gen(5))  # room again
        return engine
    engine = run(body, SimDevice("d", FAST), max_queue=3)
    assert engine.stats["rejected"] == 1


def test_cancellation_frees_the_sequence():
    dev = SimDevice("d", FAST)

    async def body(engine):
        r = engine.submit(gen(1000))
        got = []
        async for tok in r.stream():
            got.append(tok)
            if len(got) == 3:
                r.cancel()
        await asyncio.sleep(0.05)
        return r, engine
    r, engine = run(body, dev)
    assert r.finish_reason == "cancelled" and len(r.output) < 10
    assert engine.workers["d"].running == {} and dev.memory().kv_used_tokens == 0


def test_agent_session_sticks_to_its_kv_and_expires():
    a, b = SimDevice("a", FAST), SimDevice("b", FAST)

    async def body(engine):
        first = engine.submit(gen(5, session="S"))
        await first.wait()
        home = first.device
        other = engine.workers["b" if home == "a" else "a"]
        for _ in range(3):  # load the session's device: affinity still wins
            engine.submit(gen(50))
        follow = engine.submit(gen(5, prompt=30, session="S"))
        await follow.wait()
        assert follow.device == home and engine.workers[home].pins.get("S")
        pinned_before = engine.workers[home].device.memory().kv_pinned_tokens
        await asyncio.sleep(engine.session_ttl_s + 1)
        return pinned_before, engine, other
    pinned, engine, _ = run(body, a, b, session_ttl_s=2.0)
    assert pinned > 0
    assert "S" not in engine.sessions
    assert a.memory().kv_pinned_tokens == 0 and b.memory().kv_pinned_tokens == 0


def test_online_correction_learns_a_miscalibrated_device():
    dev = SimDevice("d", FAST, cost_error=0.25)  # the scheduler believes it is 4x faster

    async def body(engine):
        for _ in range(5):
            await engine.submit(gen(20)).wait()
    run(body, dev)
    assert dev.cost.factor["decode"] > 2.5


def test_slo_policy_beats_round_robin_at_80_percent_load():
    w = Workload()
    rate = 0.8 * capacity(w)
    slo = run_load("slo", rate, n=400)
    rr = run_load("round_robin", rate, n=400)
    assert slo["lost"] == rr["lost"] == 0
    assert slo["ttft_p99"] * 3 <= rr["ttft_p99"]
    assert slo["goodput"] >= 1.5 * rr["goodput"]


def test_device_killed_mid_load_loses_no_request():
    r = run_load("slo", 0.6 * capacity(Workload()), n=300, kill="gpu", kill_at=3.0)
    assert r["accepted"] == 300 and r["completed"] == 300 and r["lost"] == 0 and r["reroutes"] > 0


def test_slo_dataclass_judges_requests():
    r = Request("embed", "minilm", texts=["x"], slo=SLO(e2e_s=0.5))
    assert not r.met_slo()
