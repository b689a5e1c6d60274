"""Twin benchmark: build time, register round trip, bulk memory throughput, cycles per second.

``python -m weft.sim.twin.bench [config ...]`` (or, once wired, ``weft bench twin``) prints
one table row per configuration, measured on the stand-in top (registers + DMA).
The build is timed in a private cache folder so it is a cold build, not a cache hit.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np

from ...hw.config import load_config
from ..bench import describe_host, format_table
from . import RunReason, Twin
from .standin import StandInTop, copy_count

__all__ = ["bench_twin", "main"]


def bench_twin(config_name: str = "tiny", *, cold_build: bool = True, reg_ops: int = 2000,
               mem_mib: int = 16) -> dict:
    config = load_config(config_name)
    design = StandInTop(config)
    old = os.environ.get("WEFT_TWIN_CACHE_DIR")
    tmp = tempfile.TemporaryDirectory(prefix="weft-twin-bench-") if cold_build else None
    if tmp is not None:
        os.environ["WEFT_TWIN_CACHE_DIR"] = tmp.name
    try:
        t0 = time.monotonic()
        twin = Twin.launch(design, config)
        launch_s = time.monotonic() - t0
    finally:
        if tmp is not None:
            if old is None:
                os.environ.pop("WEFT_TWIN_CACHE_DIR", None)
            else:
                os.environ["WEFT_TWIN_CACHE_DIR"] = old
    try:
        c = twin.client
        # register round trip (SCRATCH reads: socket + a few simulated cycles each)
        t = time.perf_counter()
        for _ in range(reg_ops):
            c.reg_read(0x28)
        reg_us = (time.perf_counter() - t) / reg_ops * 1e6
        # bulk memory
        n = mem_mib << 20
        data = np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes()
        t = time.perf_counter()
        c.mem_write(0, data)
        write_mbs = n / (time.perf_counter() - t) / 1e6
        t = time.perf_counter()
        back = c.mem_read(0, n)
        read_mbs = n / (time.perf_counter() - t) / 1e6
        assert back == data
        # idle clocking
        t = time.perf_counter()
        r = c.run(2_000_000)
        idle_cps = r.cycles_run / (time.perf_counter() - t)
        # clocking with the DMA copying 4 MiB at one beat per cycle
        rows = (4 << 20) // 256
        c.reg_write(0x20, 0x3)
        c.reg_write(0x18, 0)
        c.reg_write(0x2C, 8 << 20)
        c.reg_write(0x1C, copy_count(rows, 256))
        c.reg_write(0x10, 1)
        t = time.perf_counter()
        r = c.run(1 << 40, until_irq=True, wall_s=120)
        busy_s = time.perf_counter() - t
        assert r.reason == RunReason.IRQ
        assert c.mem_read(8 << 20, 4 << 20) == data[:4 << 20]
        busy_cps = r.cycles_run / busy_s
    finally:
        twin.close()
        if tmp is not None:
            tmp.cleanup()
    return {
        "config": config.name,
        "bus_bits": config.bus.data_bits,
        "build_s": round(twin.build.build_s, 1),
        "launch_s": round(launch_s, 1),
        "reg_rt_us": round(reg_us, 1),
        "mem_write_MBps": round(write_mbs),
        "mem_read_MBps": round(read_mbs),
        "idle_Mcps": round(idle_cps / 1e6, 2),
        "dma_Mcps": round(busy_cps / 1e6, 2),
        "dma_cycles_4MiB": r.cycles_run,
    }


def main(argv: list[str] | None = None) -> int:
    names = (argv if argv is not None else sys.argv[1:]) or ["tiny", "default"]
    rows = [bench_twin(name) for name in names]
    headers = list(rows[0])
    print(f"twin benchmark (stand-in top: registers + DMA), on {describe_host()}")
    print(format_table(headers, [[r[h] for h in headers] for r in rows]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
