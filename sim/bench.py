"""Benchmarks of the simulators, printed as tables that say what they ran on."""

from __future__ import annotations

import os
import platform
import time

import numpy as np

from weft.compiler.gemm import build_gemm_bundle
from weft.hw.config import AcceleratorConfig
from weft.sim.golden import run_bundle

__all__ = ["describe_host", "bench_golden", "format_table"]


def describe_host() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, numpy {np.__version__}"


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def bench_golden(config: AcceleratorConfig, shapes: list[tuple[int, int, int]], seed: int = 0) -> list[dict]:
    """Time the bit-exact model on int32 GEMM bundles; check each result against numpy."""
    rng = np.random.default_rng(seed)
    results = []
    for M, N, K in shapes:
        a = rng.integers(-128, 128, (M, K), dtype=np.int8)
        b = rng.integers(-128, 128, (K, N), dtype=np.int8)
        start = time.perf_counter()
        bundle = build_gemm_bundle(config, b, M)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        outputs, stats = run_bundle(bundle, {"a": a}, config)
        run_s = time.perf_counter() - start
        exact = bool(np.array_equal(outputs["c"], a.astype(np.int64) @ b.astype(np.int64)))
        count = sum(stats.instructions.values())
        results.append({"shape": f"{M}x{N}x{K}", "instructions": count, "build_s": build_s, "run_s": run_s,
                        "instr_per_s": count / run_s, "gmac_per_s": stats.macs / run_s / 1e9, "exact": exact})
    return results
