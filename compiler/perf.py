"""Analytic performance model of the GEMMs of an IR graph on one configuration (a skeleton:
the vector-unit ops are not modelled yet).

For each GEMM ``M x K @ K x N`` the tiling is :func:`weft.compiler.gemm.plan_gemm`'s (the
kernel the back end will emit): ``m_blocks`` blocks of ``mb`` rows, ``n_tiles`` column
tiles of ``cols``, ``k_tiles`` slices of ``rows``. Assumptions:

* **Compute**, per step (one ``k x n`` weight tile, one block of ``m`` rows):
  ``PRELOAD`` takes ``k`` cycles (one weight row per cycle); ``MATMUL`` streams the ``m``
  rows, one per cycle, plus the array's pipeline fill/drain of ``rows + cols - 1`` cycles.
  Preload and matmul are in one queue, so they do not overlap each other.
* **DMA** (bytes over the AXI bus at ``config.bus_bytes`` per cycle, no burst overheads): A
  is read once (each block at ``j == 0``), every B tile once per row block (``m_blocks``
  times the whole weight), bias+scale words (``2 x N`` int32) once per row block for int8
  output, the output written once (int8, or int32 for raw accumulators).
* **Overlap**: the kernel double-buffers A blocks, B tiles and outputs, so DMA overlaps
  compute: ``cycles = max(compute, dma) + exposed``, where ``exposed`` is the first step's
  loads (nothing to overlap with yet) and the last tile's store.
* **Utilization** = ``(M N K / (rows cols)) / cycles``: the fraction of peak MACs.

Attention is modelled as its two GEMMs per head (``q k^T``: S x Dh @ Dh x S_kv with int32
output; ``P v``: S x S_kv @ S_kv x Dh, int8 output), heads run one after the other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from weft.hw.config import AcceleratorConfig

from .gemm import plan_gemm
from .ir import Graph

__all__ = ["GemmCost", "gemm_cost", "graph_gemms", "model_cost", "perf_table"]


@dataclass(frozen=True)
class GemmCost:
    name: str
    M: int
    N: int
    K: int
    count: int  # identical GEMMs (heads x batch)
    output: str
    compute_cycles: int
    dma_bytes: int
    dma_cycles: int
    cycles: int  # per GEMM
    macs: int  # per GEMM

    @property
    def total_cycles(self) -> int:
        return self.cycles * self.count

    @property
    def total_macs(self) -> int:
        return self.macs * self.count

    def utilization(self, config: AcceleratorConfig) -> float:
        return (self.macs / config.macs_per_cycle) / self.cycles


def gemm_cost(config: AcceleratorConfig, M: int, N: int, K: int, *, output: str = "int8",
              name: str = "gemm", count: int = 1) -> GemmCost:
    R, C = config.array.rows, config.array.cols
    plan = plan_gemm(config, M, N, K, output=output)
    fill = R + C - 1
    compute = 0
    for i in range(plan.m_blocks):
        m = plan.block_rows(i)
        for j in range(plan.n_tiles):
            for t in range(plan.k_tiles):
                k = min(R, K - t * R)
                compute += k + m + fill
    out_bytes = M * N * (1 if output == "int8" else 4)
    a_bytes = M * K
    b_bytes = K * N * plan.m_blocks
    p_bytes = 2 * N * 4 * plan.m_blocks if output == "int8" else 0
    dma_bytes = a_bytes + b_bytes + p_bytes + out_bytes
    bus = config.bus_bytes
    dma = math.ceil(dma_bytes / bus)
    m0, n0, k0 = plan.block_rows(0), min(C, N), min(R, K)
    first_loads = math.ceil((m0 * k0 + k0 * n0 + (2 * n0 * 4 if output == "int8" else 0)) / bus)
    mlast = plan.block_rows(plan.m_blocks - 1)
    last_store = math.ceil(mlast * min(C, N - (plan.n_tiles - 1) * C) * (1 if output == "int8" else 4) / bus)
    cycles = max(compute, dma) + first_loads + last_store
    return GemmCost(name, M, N, K, count, output, compute, dma_bytes, dma, cycles, M * N * K)


def graph_gemms(graph: Graph) -> list[tuple[str, int, int, int, int, str]]:
    """(name, M, N, K, count, output) for every GEMM of ``graph`` (Attention expanded)."""
    out = []
    for n in graph.nodes:
        if n.device != "device":
            continue
        if n.op == "Linear":
            xs = graph.shape(n.inputs[0])
            K, N = graph.consts[n.inputs[1]].shape
            M = math.prod(xs[:-1])
            out.append((n.name, M, N, K, 1, "int8"))
        elif n.op == "MatMul":
            a, b = graph.shape(n.inputs[0]), graph.shape(n.inputs[1])
            batch = math.prod(graph.values[n.outputs[0]].shape[:-2])
            out.append((n.name, a[-2], b[-1], a[-1], batch, "int8"))
        elif n.op == "Attention":
            B, S, D = graph.shape(n.inputs[0])
            Skv = graph.shape(n.inputs[1])[1]
            H = n.attrs["num_heads"]
            dh = D // H
            out.append((n.name + ":qk", S, Skv, dh, B * H, "int32"))
            out.append((n.name + ":pv", S, graph.shape(n.inputs[2])[2] // H, Skv, B * H, "int8"))
    return out


def model_cost(config: AcceleratorConfig, graph: Graph) -> list[GemmCost]:
    return [gemm_cost(config, M, N, K, output=o, name=name, count=c) for name, M, N, K, c, o in graph_gemms(graph)]


def perf_table(config: AcceleratorConfig, graph: Graph, *, short_names: bool = True) -> str:
    """A per-GEMM table plus totals (cycles, time at ``config.clock_mhz``, bytes, utilization)."""
    costs = model_cost(config, graph)
    head = f"{'gemm':44s} {'M':>5s} {'N':>5s} {'K':>5s} {'x':>3s} {'compute':>9s} {'dma B':>10s} {'dma cyc':>9s} {'cycles':>10s} {'util':>6s}"
    lines = [f"GEMM performance model on '{config.name}' ({config.array.rows}x{config.array.cols} array, "
             f"{config.bus_bytes} B/cycle bus, {config.clock_mhz:g} MHz)", head, "-" * len(head)]
    for c in costs:
        name = c.name[-44:] if short_names else c.name
        lines.append(f"{name:44s} {c.M:5d} {c.N:5d} {c.K:5d} {c.count:3d} {c.compute_cycles * c.count:9d} "
                     f"{c.dma_bytes * c.count:10d} {c.dma_cycles * c.count:9d} {c.total_cycles:10d} "
                     f"{c.utilization(config):6.1%}")
    total = sum(c.total_cycles for c in costs)
    macs = sum(c.total_macs for c in costs)
    dma = sum(c.dma_bytes * c.count for c in costs)
    lines.append("-" * len(head))
    util = macs / config.macs_per_cycle / total if total else 0.0
    lines.append(f"total: {len(costs)} GEMM kinds, {macs / 1e6:.1f} M MACs, {total} cycles "
                 f"({total / config.clock_mhz / 1e3:.2f} ms at {config.clock_mhz:g} MHz), "
                 f"{dma / 1e6:.2f} MB moved, utilization {util:.1%}")
    return "\n".join(lines)
