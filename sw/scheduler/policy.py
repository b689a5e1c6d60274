"""Placement policies: which device's queue a new request joins.

``choose(req, candidates, open_)``: ``candidates`` are the healthy devices serving the request,
``open_`` those of them with room in their queue; return one of ``open_`` or ``None`` (refuse:
HTTP 429).

* :class:`SloAware` -- predicted TTFT/TPOT/completion from each device's cost model and queue
  state (:meth:`DeviceWorker.predict`); among the devices predicted to meet the request's SLO,
  the earliest completion; if none would, the one that misses it least. Priorities order the
  queues; agent sessions stick to their KV cache.
* :class:`RoundRobin` -- the next device in turn (per model and operation), FCFS queues.
* :class:`LeastLoaded` -- the device with the fewest requests waiting or running, FCFS queues.
"""

from __future__ import annotations

import itertools

__all__ = ["Policy", "SloAware", "RoundRobin", "LeastLoaded", "make_policy", "POLICIES"]


class Policy:
    name = "policy"
    use_priorities = False
    session_affinity = False

    def choose(self, req, candidates, open_):  # pragma: no cover - abstract
        raise NotImplementedError


class SloAware(Policy):
    name = "slo"
    use_priorities = True
    session_affinity = True

    def choose(self, req, candidates, open_):
        if not open_:
            return None
        scored = []
        for w in open_:
            ttft, tpot, done = w.predict(req)
            if req.op == "embed":
                miss = max(0.0, done - req.slo.e2e_s) / req.slo.e2e_s
            else:
                miss = max(0.0, ttft - req.slo.ttft_s) / req.slo.ttft_s + \
                    max(0.0, tpot - req.slo.tpot_s) / req.slo.tpot_s
            scored.append((miss > 0, miss if miss > 0 else 0.0, done, w.outstanding, w))
        scored.sort(key=lambda s: s[:4])
        return scored[0][4]


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self) -> None:
        self._turn: dict[tuple[str, str], itertools.count] = {}

    def choose(self, req, candidates, open_):
        key = (req.model, req.op)
        n = next(self._turn.setdefault(key, itertools.count()))
        w = candidates[n % len(candidates)]
        return w if w in open_ else None


class LeastLoaded(Policy):
    name = "least_loaded"

    def choose(self, req, candidates, open_):
        if not open_:
            return None
        return min(open_, key=lambda w: w.outstanding)


POLICIES = {"slo": SloAware, "round_robin": RoundRobin, "least_loaded": LeastLoaded}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(POLICIES)}") from None
