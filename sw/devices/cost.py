"""Cost models: predicted latency (seconds) of a device call, so the scheduler can compare
devices and queue states.

Three operations, each with its shape:

* ``embed(batch, tokens)``  -- a request-level batch of ``batch`` sentences padded to ``tokens``;
* ``prefill(tokens)``       -- prompt tokens prefilled in one step (all sequences together);
* ``decode(batch, context)`` -- one token for each of ``batch`` sequences of mean length ``context``.

:class:`LinearCostModel` fits ``t = a + b*x + c*y`` per operation to a profile (CPU/GPU: measured
at start-up over batch sizes and lengths, cached on disk under ``.cache/weft/profiles/``;
simulated devices: given). :class:`FpgaCostModel` comes from the compiler's analytic GEMM
performance model at the configuration's clock. Both are corrected online: every measured call
updates a per-operation factor (exponentially weighted ratio measured / predicted).
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["OPS", "CostModel", "LinearCostModel", "FpgaCostModel", "minilm_gemms",
           "profile_cache_dir", "load_or_profile"]

OPS = ("embed", "prefill", "decode")


def _features(op: str, shape: Mapping[str, float]) -> tuple[float, float]:
    """The two regressors of each operation (besides the constant)."""
    if op == "embed":
        bt = shape["batch"] * shape["tokens"]
        return bt, bt * shape["tokens"]  # linear layers, attention
    if op == "prefill":
        t = shape["tokens"]
        return t, t * t
    if op == "decode":
        return shape["batch"], shape["batch"] * shape["context"]
    raise ValueError(f"unknown operation {op!r}; expected one of {OPS}")


class CostModel:
    """Base: predictions times an online correction factor per operation."""

    #: weight of a new measurement in the correction factor
    alpha: float = 0.2

    def __init__(self) -> None:
        self.factor = {op: 1.0 for op in OPS}
        self.observations = {op: 0 for op in OPS}

    def base(self, op: str, **shape: float) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def predict(self, op: str, **shape: float) -> float:
        return max(0.0, self.base(op, **shape)) * self.factor[op]

    def observe(self, op: str, measured_s: float, **shape: float) -> None:
        """Fold a measured latency into the operation's correction factor."""
        base = self.base(op, **shape)
        if base <= 0 or not math.isfinite(measured_s) or measured_s < 0:
            return
        ratio = min(max(measured_s / base, 0.05), 20.0)
        f = self.factor[op]
        self.factor[op] = (1 - self.alpha) * f + self.alpha * ratio
        self.observations[op] += 1

    def describe(self) -> dict:
        return {"type": type(self).__name__, "factor": dict(self.factor)}


@dataclass
class LinearCostModel(CostModel):
    """``t = a + b*x + c*y`` per operation (see :func:`_features`); coefficients in seconds."""

    coef: dict[str, tuple[float, float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        CostModel.__init__(self)

    def base(self, op: str, **shape: float) -> float:
        if op not in self.coef:
            return math.inf
        a, b, c = self.coef[op]
        x, y = _features(op, shape)
        return a + b * x + c * y

    @classmethod
    def fit(cls, samples: Iterable[tuple[str, Mapping[str, float], float]]) -> LinearCostModel:
        """Least squares (coefficients clamped to >= 0) from ``(op, shape, seconds)`` samples."""
        by_op: dict[str, list] = {}
        for op, shape, t in samples:
            by_op.setdefault(op, []).append((_features(op, shape), t))
        coef = {}
        for op, rows in by_op.items():
            X = np.array([[1.0, x, y] for (x, y), _ in rows])
            t = np.array([t for _, t in rows])
            sol = _nnls3(X, t)
            coef[op] = tuple(float(v) for v in sol)
        return cls(coef)

    def to_json(self) -> dict:
        return {"coef": {k: list(v) for k, v in self.coef.items()}}

    @classmethod
    def from_json(cls, data: Mapping) -> LinearCostModel:
        return cls({k: tuple(float(x) for x in v) for k, v in data["coef"].items()})

    def describe(self) -> dict:
        return {**super().describe(), "coef": {k: list(v) for k, v in self.coef.items()}}


def _nnls3(X: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Non-negative least squares by trying every subset of the (three) columns."""
    best, best_err = np.zeros(X.shape[1]), math.inf
    n = X.shape[1]
    for mask in range(1, 1 << n):
        cols = [i for i in range(n) if mask >> i & 1]
        sol, *_ = np.linalg.lstsq(X[:, cols], t, rcond=None)
        if (sol < 0).any():
            continue
        full = np.zeros(n)
        full[cols] = sol
        err = float(((X @ full - t) ** 2).sum())
        if err < best_err:
            best, best_err = full, err
    return best


# ------------------------------------------------------------------------------ FPGA
def minilm_gemms(batch: int, tokens: int, *, hidden: int = 384, heads: int = 12,
                 intermediate: int = 1536, layers: int = 6):
    """(name, M, N, K, count, output) of every GEMM of a BERT/MiniLM encoder forward pass
    (the same expansion :func:`weft.compiler.perf.graph_gemms` makes of the compiled graph)."""
    M, dh = batch * tokens, hidden // heads
    per_layer = [
        ("q", M, hidden, hidden, 1, "int8"), ("k", M, hidden, hidden, 1, "int8"),
        ("v", M, hidden, hidden, 1, "int8"),
        ("attn:qk", tokens, tokens, dh, batch * heads, "int32"),
        ("attn:pv", tokens, dh, tokens, batch * heads, "int8"),
        ("o", M, hidden, hidden, 1, "int8"),
        ("ffn1", M, intermediate, hidden, 1, "int8"), ("ffn2", M, hidden, intermediate, 1, "int8"),
    ]
    return per_layer * layers


class FpgaCostModel(CostModel):
    """Latency of MiniLM on the accelerator from :func:`weft.compiler.perf.gemm_cost`: GEMM
    cycles / ``clock_mhz``, plus a fixed host overhead per call (tokenization, DMA setup).

    The compiler's model covers the GEMMs only (the vector unit is not modelled yet), so this
    is a lower bound of the real board's time; the online correction factor absorbs the rest
    once the device measures real calls."""

    def __init__(self, config, *, host_overhead_s: float = 0.0005, encoder: Mapping | None = None,
                 token_bucket: int = 8) -> None:
        super().__init__()
        self.config = config
        self.host_overhead_s = host_overhead_s
        self.encoder = dict(encoder or {})
        self.token_bucket = token_bucket

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - one model per device, few shapes
    def cycles(self, batch: int, tokens: int) -> int:
        from weft.compiler.perf import gemm_cost

        total = 0
        for name, M, N, K, count, out in minilm_gemms(batch, tokens, **self.encoder):
            total += gemm_cost(self.config, M, N, K, output=out, name=name, count=count).total_cycles
        return total

    def base(self, op: str, **shape: float) -> float:
        if op != "embed":
            return math.inf  # the FPGA device serves the encoder only (for now)
        b = max(1, int(shape["batch"]))
        t = max(1, int(shape["tokens"]))
        t = -(-t // self.token_bucket) * self.token_bucket  # bucket lengths: few distinct shapes
        return self.host_overhead_s + self.cycles(b, t) / (self.config.clock_mhz * 1e6)

    def describe(self) -> dict:
        return {**super().describe(), "config": self.config.name,
                "clock_mhz": self.config.clock_mhz}


# ------------------------------------------------------------------------------ profiles
def profile_cache_dir() -> Path:
    """``$WEFT_CACHE/profiles`` or ``.cache/weft/profiles`` in the working directory."""
    root = os.environ.get("WEFT_CACHE")
    return (Path(root) if root else Path(".cache") / "weft") / "profiles"


def load_or_profile(key: str, measure: Callable[[], list[tuple[str, dict, float]]], *,
                    refresh: bool = False) -> tuple[LinearCostModel, bool]:
    """The fitted profile cached under ``key`` or, when absent (or ``refresh``), ``measure()``
    run now, fitted and cached. Returns (model, came_from_cache)."""
    path = profile_cache_dir() / f"{key}.json"
    if path.exists() and not refresh:
        try:
            data = json.loads(path.read_text())
            return LinearCostModel.from_json(data), True
        except (ValueError, KeyError, TypeError):
            pass  # corrupt cache: profile again
    samples = measure()
    model = LinearCostModel.fit(samples)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({**model.to_json(), "samples": samples, "created": time.time()}, indent=1))
    tmp.replace(path)
    return model, False
