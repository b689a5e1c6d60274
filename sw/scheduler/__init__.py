"""The scheduler (engine): continuous batching per device, KV-cache admission control and
preemption, priorities, SLO-aware placement (and round-robin / least-loaded baselines), agent
session affinity, requeue on device failure, backpressure and cancellation.

Typical use (inside an event loop)::

    engine = await Engine(devices, policy="slo").start()
    req = engine.submit(Request("generate", "smollm2", prompt=ids, max_tokens=32))
    async for token_id in req.stream():
        ...
    await engine.stop()
"""

from .engine import DeviceWorker, Engine
from .policy import POLICIES, LeastLoaded, Policy, RoundRobin, SloAware, make_policy
from .request import SLO, NoDevice, Overloaded, Request, RequestFailed, SchedulerError, estimate_tokens
from .virtual import VirtualClockLoop, run_virtual

__all__ = ["DeviceWorker", "Engine", "POLICIES", "LeastLoaded", "Policy", "RoundRobin", "SloAware", "make_policy",
           "SLO", "NoDevice", "Overloaded", "Request", "RequestFailed", "SchedulerError", "estimate_tokens",
           "VirtualClockLoop", "run_virtual"]
