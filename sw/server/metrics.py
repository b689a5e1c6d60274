"""Prometheus metrics (prefix ``weft_``), fed by the engine's observers; one registry per app."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

__all__ = ["Metrics"]

_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _EngineCollector:
    def __init__(self, engine) -> None:
        self.engine = engine
        self._last: dict[str, tuple[float, float]] = {}

    def collect(self):
        q = GaugeMetricFamily("weft_queue_depth", "Requests waiting per device", labels=["device"])
        run = GaugeMetricFamily("weft_running_requests", "Requests running per device", labels=["device"])
        util = GaugeMetricFamily("weft_device_utilization",
                                 "Fraction of time the device was executing since the last scrape",
                                 labels=["device"])
        kv = GaugeMetricFamily("weft_kv_used_tokens", "KV-cache tokens in use (running + pinned)",
                               labels=["device"])
        kvc = GaugeMetricFamily("weft_kv_capacity_tokens", "KV-cache capacity in tokens", labels=["device"])
        up = GaugeMetricFamily("weft_device_healthy", "1 if the device is healthy", labels=["device"])
        now = time.perf_counter()
        for name, w in self.engine.workers.items():
            q.add_metric([name], w.queue_depth)
            run.add_metric([name], len(w.running) + len(w.embedding))
            busy = w.device.busy_s
            t0, b0 = self._last.get(name, (w.device.created, 0.0))
            util.add_metric([name], min(1.0, max(0.0, (busy - b0) / max(now - t0, 1e-9))))
            self._last[name] = (now, busy)
            kv.add_metric([name], w.kv_used() + sum(w.pins.values()))
            kvc.add_metric([name], w.kv_capacity)
            up.add_metric([name], 1.0 if w.healthy() else 0.0)
        yield from (q, run, util, kv, kvc, up)
        stats = self.engine.stats
        for key, doc in (("reroutes", "Requests moved to another device after a failure"),
                         ("rejected", "Requests refused with 429 (all queues full)"),
                         ("preemptions", "Sequences preempted for KV-cache memory"),
                         ("lost", "Accepted requests no device could finish")):
            g = GaugeMetricFamily(f"weft_{key}_total", doc)  # engine-owned counters
            g.add_metric([], stats[key])
            yield g


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.ttft = Histogram("weft_ttft_seconds", "Time to first token", ["model", "device"], buckets=_LAT, registry=r)
        self.tpot = Histogram("weft_tpot_seconds", "Time per output token after the first", ["model", "device"],
                              buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0), registry=r)
        self.e2e = Histogram("weft_e2e_seconds", "Request latency, arrival to last token", ["model", "op"],
                             buckets=_LAT, registry=r)
        self.requests = Counter("weft_requests", "Finished requests by outcome", ["model", "op", "outcome"], registry=r)
        self.slo_total = Counter("weft_slo_requests", "Requests judged against their SLO", ["model", "op"], registry=r)
        self.slo_met = Counter("weft_slo_met", "Requests that met their SLO", ["model", "op"], registry=r)
        self.http = Counter("weft_http_requests", "HTTP requests by path and status", ["path", "status"], registry=r)
        self.tokens = Counter("weft_generated_tokens", "Tokens generated", ["model"], registry=r)
        self.agent_runs = Counter("weft_agent_runs", "Agent runs finished, by status", ["agent", "status"], registry=r)
        self.agent_seconds = Histogram("weft_agent_run_seconds", "Agent run duration, start to end", ["agent"],
                                       buckets=_LAT + (60.0, 120.0, 300.0), registry=r)
        self._collector = None

    def attach(self, engine) -> None:
        if self._collector is None:
            self._collector = _EngineCollector(engine)
            self.registry.register(self._collector)
        engine.on_finish.append(self.observe)

    def observe_run(self, run) -> None:
        """An agent run ended (:class:`weft.sw.agents.AgentRun`)."""
        self.agent_runs.labels(run.spec.name, run.status).inc()
        if run.started is not None and run.finished is not None:
            self.agent_seconds.labels(run.spec.name).observe(run.finished - run.started)

    def observe(self, req) -> None:
        dev = req.device or "none"
        self.requests.labels(req.model, req.op, req.finish_reason or "unknown").inc()
        if req.finish_reason in ("stop", "length"):
            if req.op == "generate":
                if req.ttft is not None:
                    self.ttft.labels(req.model, dev).observe(req.ttft)
                if req.tpot is not None:
                    self.tpot.labels(req.model, dev).observe(req.tpot)
                self.tokens.labels(req.model).inc(len(req.output))
            self.e2e.labels(req.model, req.op).observe(req.e2e)
            self.slo_total.labels(req.model, req.op).inc()
            if req.met_slo():
                self.slo_met.labels(req.model, req.op).inc()
