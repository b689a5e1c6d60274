"""Benchmarks that drive the hardware through the driver API, as a host program would."""

from __future__ import annotations

import time

import numpy as np

from weft.compiler.gemm import build_gemm_bundle
from weft.hw.config import AcceleratorConfig
from weft.hw.core import Core
from weft.hw.vector_numerics import fixed_point_scale, pack_scale_word
from weft.sim.golden import run_bundle
from weft.sim.twin import Twin
from weft.sw.driver import Device, TwinTransport

__all__ = ["bench_gemm"]


def bench_gemm(config: AcceleratorConfig, shapes: list[tuple[int, int, int]], *, seed: int = 0,
               progress=lambda line: None) -> dict:
    """Run int8 GEMM bundles on the core in the Verilator twin and check each against the
    bit-exact model. Utilization = (M*N*K / (rows*cols)) / CYCLES, from the core's counters."""
    rng = np.random.default_rng(seed)
    rows = []
    start = time.monotonic()
    with Twin.launch(Core(config), config) as twin:
        launch_s = time.monotonic() - start
        progress(f"twin ready in {launch_s:.0f} s")
        device = Device.open(TwinTransport(twin), config)
        sim_cycles, sim_wall = 0, 0.0
        for M, N, K in shapes:
            a = rng.integers(-128, 128, (M, K), dtype=np.int8)
            b = rng.integers(-128, 128, (K, N), dtype=np.int8)
            mult, shift = fixed_point_scale(np.full(N, 1.0 / (128 * np.sqrt(K))))
            bundle = build_gemm_bundle(config, b, M, bias=np.zeros(N, np.int32),
                                       scale_words=pack_scale_word(mult, shift))
            device.load_bundle(bundle)
            device.write_inputs({"a": a})
            before = device.counters()
            t0 = time.monotonic()
            device.start()
            device.wait(timeout_s=3600)
            wall = time.monotonic() - t0
            c = {k: v - before[k] for k, v in device.counters().items()}
            expected, _ = run_bundle(bundle, {"a": a}, config)
            exact = bool(np.array_equal(device.read_outputs()["c"], expected["c"]))
            ideal = M * N * K / config.macs_per_cycle
            sim_cycles += c["cycles"]
            sim_wall += wall
            rows.append({"shape": f"{M}x{N}x{K}", "cycles": c["cycles"], "ideal": ideal,
                         "utilization": ideal / c["cycles"], "exact": exact, "wall_s": wall, **c})
            progress(f"{M}x{N}x{K}: {c['cycles']} cycles in {wall:.1f} s")
    return {"rows": rows, "cycles_per_s": sim_cycles / max(sim_wall, 1e-9), "launch_s": launch_s}
