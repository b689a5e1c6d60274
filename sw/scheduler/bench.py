"""``weft bench serve``: the scheduler under load on devices with known service times.

Three simulated devices stand for an FPGA (fast embeddings, no generation), a GPU (fast at
both) and a CPU (slow at both); their true service times are the linear models in
:data:`DEVICES`. A mixed workload (embeddings and chat generations) arrives as a Poisson or a
gamma process at fractions of the pool's capacity; every policy (SLO-aware, round-robin,
least-loaded) runs the same arrivals on the same devices. Time is virtual (:mod:`.virtual`):
the numbers are the scheduler's decisions on these service times, not host speed.

**Capacity** is the highest arrival rate the devices could sustain with ideal placement: each
request type's per-request work on each device at the largest batch that meets the TPOT SLO
(decode) or at the device's maximum batch (embeddings), split across devices by a two-type
linear program (:func:`capacity`).
"""

from __future__ import annotations

import asyncio
import math
import random
from dataclasses import dataclass

import numpy as np

from weft.sw.devices.cost import LinearCostModel
from weft.sw.devices.sim import SimDevice

from .engine import Engine
from .request import SLO, Overloaded, Request
from .virtual import run_virtual

__all__ = ["DEVICES", "Workload", "capacity", "run_load", "sweep", "format_table", "plot"]

#: name -> (service times, serves embeddings, serves generation, max decode batch)
DEVICES = {
    "fpga": (LinearCostModel({"embed": (0.002, 2e-6, 0.0)}), True, False, 0),
    "gpu": (LinearCostModel({"embed": (0.004, 4e-6, 0.0), "prefill": (0.006, 4e-5, 0.0),
                             "decode": (0.010, 0.0015, 0.0)}), True, True, 32),
    "cpu": (LinearCostModel({"embed": (0.010, 6e-5, 0.0), "prefill": (0.020, 6e-4, 0.0),
                             "decode": (0.030, 0.012, 0.0)}), True, True, 8),
}


@dataclass(frozen=True)
class Workload:
    embed_fraction: float = 0.3
    embed_texts: tuple[int, int] = (1, 4)  # sentences per request
    embed_words: tuple[int, int] = (8, 40)
    prompt_tokens: tuple[int, int] = (32, 256)
    output_tokens: tuple[int, int] = (16, 64)
    slo: SLO = SLO(ttft_s=0.5, tpot_s=0.1, e2e_s=0.25)

    def mean(self, lohi) -> float:
        return (lohi[0] + lohi[1]) / 2


def _devices(cost_error: float = 1.0, seed: int = 0) -> list[SimDevice]:
    out = []
    for i, (name, (svc, emb, gen, batch)) in enumerate(DEVICES.items()):
        out.append(SimDevice(name, svc, embed=emb, generate=gen, max_decode_batch=max(1, batch),
                             max_embed_batch=16, max_prefill_tokens=1024, cost_error=cost_error, jitter=0.05,
                             seed=seed + i))
    return out


def _work(w: Workload) -> dict[str, dict[str, float]]:
    """Per-request device seconds of each type on each device (see the module doc)."""
    out: dict[str, dict[str, float]] = {}
    texts = w.mean(w.embed_texts)
    tokens = w.mean(w.embed_words) * 5 // 4 + 2
    for name, (svc, emb, gen, batch) in DEVICES.items():
        out[name] = {}
        if emb:
            out[name]["embed"] = svc.base("embed", batch=16, tokens=tokens) / 16 * texts
        if gen:
            ctx = w.mean(w.prompt_tokens) + w.mean(w.output_tokens) / 2
            n = max([b for b in range(1, batch + 1) if svc.base("decode", batch=b, context=ctx) <= w.slo.tpot_s]
                    or [1])
            per_token = svc.base("decode", batch=n, context=ctx) / n
            out[name]["generate"] = svc.base("prefill", tokens=w.mean(w.prompt_tokens)) + \
                per_token * w.mean(w.output_tokens)
    return out


def capacity(w: Workload) -> float:
    """Requests per second the pool sustains with ideal placement (two-type LP by comparative
    advantage, bisected on the rate)."""
    work = _work(w)
    p = {"embed": w.embed_fraction, "generate": 1 - w.embed_fraction}

    def feasible(lam: float) -> bool:
        need = {k: lam * p[k] for k in p}
        # embeddings go first to the devices comparatively best at them
        order = sorted(work, key=lambda d: work[d].get("embed", math.inf) / work[d].get("generate", math.inf)
                       if "generate" in work[d] else 0.0)
        free = {d: 1.0 for d in work}
        for d in order:
            if "embed" in work[d] and need["embed"] > 0:
                take = min(need["embed"], free[d] / work[d]["embed"])
                need["embed"] -= take
                free[d] -= take * work[d]["embed"]
        for d in reversed(order):
            if "generate" in work[d] and need["generate"] > 0:
                take = min(need["generate"], free[d] / work[d]["generate"])
                need["generate"] -= take
                free[d] -= take * work[d]["generate"]
        return need["embed"] <= 1e-9 and need["generate"] <= 1e-9

    lo, hi = 0.0, 10000.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if feasible(mid) else (lo, mid)
    return lo


def _arrivals(rate: float, n: int, process: str, cv: float, rng: random.Random) -> list[float]:
    t, out = 0.0, []
    for _ in range(n):
        if process == "poisson":
            t += rng.expovariate(rate)
        else:  # gamma with the given coefficient of variation
            k = 1.0 / (cv * cv)
            t += rng.gammavariate(k, 1.0 / (k * rate))
        out.append(t)
    return out


def _make_request(w: Workload, rng: random.Random) -> Request:
    words = "the quick brown fox jumps over a lazy dog while weft schedules tokens".split()
    if rng.random() < w.embed_fraction:
        texts = [" ".join(rng.choice(words) for _ in range(rng.randint(*w.embed_words)))
                 for _ in range(rng.randint(*w.embed_texts))]
        return Request("embed", "minilm", texts=texts, slo=w.slo)
    return Request("generate", "smollm2", prompt=[5] * rng.randint(*w.prompt_tokens),
                   max_tokens=rng.randint(*w.output_tokens), slo=w.slo)


def run_load(policy: str, rate: float, *, n: int = 600, workload: Workload = Workload(), process: str = "poisson",
             cv: float = 2.0, seed: int = 0, cost_error: float = 1.0, kill: str | None = None,
             kill_at: float | None = None) -> dict:
    """One run in virtual time: ``n`` requests at ``rate`` per second. Returns the summary."""
    rng = random.Random(seed)
    times = _arrivals(rate, n, process, cv, rng)
    reqs = [_make_request(workload, rng) for _ in range(n)]

    async def main():
        loop = asyncio.get_running_loop()
        devices = _devices(cost_error, seed)
        engine = await Engine(devices, policy, max_queue=10_000).start()
        t0 = loop.time()
        accepted, rejected = [], 0

        async def killer():
            await asyncio.sleep(kill_at)
            next(d for d in devices if d.name == kill).kill("killed by the benchmark")

        if kill:
            asyncio.ensure_future(killer())
        for t, r in zip(times, reqs):
            delay = t0 + t - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                accepted.append(engine.submit(r))
            except Overloaded:
                rejected += 1
        for r in accepted:
            try:
                await r.wait()
            except Exception:
                pass
        span = loop.time() - t0
        stats = dict(engine.stats)
        await engine.stop()
        return accepted, rejected, span, stats

    accepted, rejected, span, stats = run_virtual(main())
    ok = [r for r in accepted if r.finish_reason in ("stop", "length")]
    ttft = np.array([r.ttft for r in ok])
    gen = [r for r in ok if r.op == "generate"]
    tpot = np.array([r.tpot for r in gen if r.tpot is not None])
    e2e = np.array([r.e2e for r in ok])
    pct = lambda a, q: float(np.percentile(a, q)) if len(a) else float("nan")  # noqa: E731
    duration = times[-1]
    return {
        "policy": policy, "rate": rate, "requests": n, "accepted": len(accepted), "rejected": rejected,
        "completed": len(ok), "lost": len(accepted) - len(ok), "reroutes": stats["reroutes"],
        "ttft_p50": pct(ttft, 50), "ttft_p90": pct(ttft, 90), "ttft_p99": pct(ttft, 99),
        "tpot_p50": pct(tpot, 50), "tpot_p90": pct(tpot, 90), "tpot_p99": pct(tpot, 99),
        "e2e_p50": pct(e2e, 50), "e2e_p90": pct(e2e, 90), "e2e_p99": pct(e2e, 99),
        "slo_attainment": sum(r.met_slo() for r in accepted) / n,
        "goodput": sum(r.met_slo() for r in accepted) / duration, "throughput": len(ok) / span,
        "per_device": {d: sum(1 for r in ok if r.device == d) for d in DEVICES},
    }


def sweep(loads=(0.2, 0.4, 0.6, 0.8, 0.9, 1.0), policies=("slo", "round_robin", "least_loaded"), **kw) -> tuple[float, list[dict]]:
    w = kw.get("workload", Workload())
    cap = capacity(w)
    rows = []
    for load in loads:
        for p in policies:
            r = run_load(p, load * cap, **kw)
            r["load"] = load
            rows.append(r)
    return cap, rows


def format_table(rows: list[dict]) -> str:
    head = ["load", "policy", "rate/s", "done", "lost", "TTFT p50", "p90", "p99", "TPOT p50", "p99",
            "e2e p50", "p99", "SLO %", "goodput/s"]
    lines = [head]
    for r in rows:
        ms = lambda x: f"{x * 1e3:.0f}" if math.isfinite(x) else "-"  # noqa: E731
        lines.append([f"{r['load']:.0%}", r["policy"], f"{r['rate']:.1f}", str(r["completed"]), str(r["lost"]),
                      ms(r["ttft_p50"]), ms(r["ttft_p90"]), ms(r["ttft_p99"]), ms(r["tpot_p50"]), ms(r["tpot_p99"]),
                      ms(r["e2e_p50"]), ms(r["e2e_p99"]), f"{100 * r['slo_attainment']:.1f}", f"{r['goodput']:.1f}"])
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["  ".join(c.rjust(wd) for c, wd in zip(row, widths)) for row in lines]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out) + "\n(latencies in ms; TTFT of an embedding request is its end-to-end time)"


def plot(rows: list[dict], path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for p in sorted({r["policy"] for r in rows}):
        sel = [r for r in rows if r["policy"] == p]
        x = [r["load"] * 100 for r in sel]
        axes[0].plot(x, [r["ttft_p99"] * 1e3 for r in sel], marker="o", label=p)
        axes[1].plot(x, [r["tpot_p99"] * 1e3 for r in sel], marker="o", label=p)
        axes[2].plot(x, [r["goodput"] for r in sel], marker="o", label=p)
    axes[0].set_yscale("log")
    for ax, t in zip(axes, ["p99 TTFT (ms, log)", "p99 TPOT (ms)", "goodput (req/s meeting SLO)"]):
        ax.set_xlabel("offered load (% of capacity)")
        ax.set_title(t)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
