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

__all__ = ["GemmCost", "gemm_cost", "graph_gemms", "model_cost", "perf_table", "Segment", "layer_segments",
           "TimingParams", "program_cost", "segment_cycles", "program_macs", "layer_utilization"]


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


# ---------------------------------------------------------------------- program-level model
@dataclass(frozen=True)
class Segment:
    """A run of consecutive kernels of a bundle's program (a layer, or one kernel)."""

    name: str
    layer: str
    first: int
    count: int
    kernels: tuple[str, ...]
    ops: tuple[str, ...]


def layer_segments(bundle, per: str = "layer") -> list[Segment]:
    """The bundle's program cut into consecutive pieces from its kernel table
    (``metadata["kernels"]``, written by :func:`weft.compiler.lower.lower`): one per layer
    (``per="layer"``; the layer names of the kernels, in program order) or one per kernel
    (``per="kernel"``). The pieces cover the whole program; instructions between or after
    kernels (the final ``halt``) join the piece before them."""
    if per not in ("layer", "kernel"):
        raise ValueError(f"per={per!r}: use 'layer' or 'kernel'")
    kernels = (getattr(bundle, "metadata", None) or {}).get("kernels") or []
    n = len(bundle.program)
    if not kernels:
        return [Segment("program", "program", 0, n, (), ())]
    out: list[list] = []
    for k in sorted(kernels, key=lambda k: k["first"]):
        key = k["layer"] if per == "layer" else k["name"]
        if out and out[-1][0] == key and per == "layer":
            out[-1][3].append(k["name"])
            out[-1][4].append(k["op"] or "prologue")
            continue
        out.append([key, k["layer"], k["first"], [k["name"]], [k["op"] or "prologue"]])
    segs = []
    for i, (name, layer, first, names, ops) in enumerate(out):
        first = 0 if i == 0 else first
        end = out[i + 1][2] if i + 1 < len(out) else n
        segs.append(Segment(name, layer, first, end - first, tuple(names), tuple(ops)))
    return segs


@dataclass(frozen=True)
class TimingParams:
    """Latencies of the core's units (``hw/units.py``, ``hw/dma.py``, ``hw/vector.py``) that
    the program-level model uses; each was read from the RTL's documented timing or measured
    on it (docs/compiler.md, "Performance model")."""

    read_latency: int = 5  #: DMA read command -> first row written (memory answering at once)
    store_overhead: int = 8  #: STORE command -> AW, first W, last B, wr_done (besides the beats)
    preload_per_row: float = 3.0  #: PRELOAD cycles per weight-tile row read
    requant_latency: int = 6  #: REQUANT last row read -> written, and the parameter-row reads
    vector_overhead: int = 10  #: VMAP/VBIN/VROW pipeline fill and drain per instruction
    queue_depth: int = 8  #: instruction FIFO per queue when the configuration does not say
    load_jobs: int = 4  #: LOADs in flight
    fetch_ahead: int = 8  #: instructions fetched ahead of dispatch (the fetch FIFO)


def _vector_cycles(ins, config: AcceleratorConfig, p: TimingParams) -> int:
    """Cycles the row engine spends on one VMAP / VBIN / VROW (from its per-row throughput,
    docs/hardware.md, "Vector unit throughput")."""
    from weft.hw.isa import Opcode, VROW_FUNCS

    a = ins.args
    rows = int(a.get("rows", 0))
    if rows == 0:
        return 1
    if ins.opcode == Opcode.VMAP:
        return rows + p.vector_overhead
    if ins.opcode == Opcode.VBIN:
        return 2 * rows + p.vector_overhead
    func = VROW_FUNCS[a["func"]] if isinstance(a["func"], int) else str(a["func"])
    E = config.acc_row_elems if a.get("src_mem", 1) else config.sp_row_elems
    slices = -(-int(a["len"]) // E)
    if func == "softmax":
        per = 3 * slices + 56.5 + (3 if a.get("wide") else 0)  # a wide reciprocal: 43 division steps, not 40
    elif func in ("layernorm", "rmsnorm"):
        per = 5 * slices + 106.5
    else:
        per = slices + 4
    return int(round(rows * per)) + p.vector_overhead


def program_cost(config: AcceleratorConfig, program, params: TimingParams | None = None) -> list[int]:
    """Model the core running ``program`` (a list of :class:`weft.hw.isa.Instruction`):
    in-order dispatch (one instruction per fetch, ``FENCE``/``HALT`` wait for every queue to
    drain) into four queues that run concurrently and hand each other dependency tokens;
    LOADs share the DMA read channel (one bus beat per cycle, instruction fetch first),
    STOREs the write channel (one at a time); PRELOAD overlaps the previous MATMUL; MATMUL
    streams one row per cycle; REQUANT ``cols / lanes`` cycles per row; the row engine's
    per-row costs. Returns the cycle at which each instruction completes (FENCE/HALT: when
    they dispatch), so the cycles of instructions ``[a, b)`` ending in a fence are
    ``t[b - 1] - t[a - 1]``."""
    from collections import deque

    from weft.hw.isa import INSTR_BYTES, Mem, Opcode, Queue

    p = params or TimingParams()
    B = config.bus_bytes
    R, C = config.array.rows, config.array.cols
    lanes = config.vector.lanes
    fetch_beats = -(-INSTR_BYTES // B)
    depth = getattr(getattr(config, "queues", None), "depth", p.queue_depth)
    tokens: dict = {}
    unit_free = {q: 0 for q in Queue}
    issued: dict = {q: deque() for q in Queue}  # issue times of the last queue_depth instructions
    load_done: deque = deque()
    read_free = write_free = 0
    stream_free = 0  # the array accepts the next MATMUL row
    last_swap = -10**9  # cycle the last preloaded tile was swapped in
    preload_done = None  # completion of a preload not yet swapped in
    t_disp = 0
    done_all = 0
    out = []
    for ins in program:
        op = ins.opcode
        if op in (Opcode.FENCE, Opcode.HALT):
            t_disp = max(t_disp + fetch_beats, done_all + 1)
            out.append(t_disp)
            continue
        q = ins.queue
        fifo = issued[q]
        d = t_disp + fetch_beats  # fetch delivers one instruction per ceil(16 / bus bytes) cycles
        if len(fifo) >= depth:
            d = max(d, fifo.popleft())
        t_disp = d
        # instruction fetch shares the read channel (first priority), running ahead of dispatch
        # by up to the fetch FIFO: its beats delay the loads queued behind them
        read_free = max(read_free, d - p.fetch_ahead * fetch_beats) + fetch_beats
        ready = max(d + 1, unit_free[q])
        for src in ins.wait:
            lst = tokens.get((src, q))
            if lst:
                ready = max(ready, lst.popleft())
        a = ins.args
        if op == Opcode.TOKEN:
            start, complete = ready, ready + 1
            unit_free[q] = complete
        elif op == Opcode.LOAD:
            if len(load_done) >= p.load_jobs:
                ready = max(ready, load_done.popleft())
            rows, cols = int(a["rows"]), int(a["cols"])
            n = cols * (4 if a["mem"] == Mem.ACC else 1)
            if rows == 0 or n == 0:
                start = ready
                complete = start + rows + 1
            else:
                o, s = int(a["dram"]) % B, int(a["stride"]) % B
                beats = 0
                if s == 0:
                    bus = -(-(o + n) // B)
                    beats = rows * (bus + (1 if o and bus == -(-n // B) else 0))
                else:
                    for r in range(rows):
                        orow = (o + r * s) % B
                        bus = -(-(orow + n) // B)
                        beats += bus + (1 if orow and bus == -(-n // B) else 0)
                start = max(ready, read_free)
                read_free = start + beats
                complete = read_free + p.read_latency
            unit_free[q] = start + 1
            load_done.append(complete)
        elif op == Opcode.STORE:
            rows, cols = int(a["rows"]), int(a["cols"])
            n = cols * (4 if a["mem"] == Mem.ACC else 1)
            o, s = int(a["dram"]) % B, int(a["stride"]) % B
            beats = sum(-(-(((o + r * s) % B) + n) // B) for r in range(rows)) if s else rows * -(-(o + n) // B)
            start = max(ready, write_free)
            complete = start + beats + p.store_overhead
            write_free = unit_free[q] = complete
        elif op == Opcode.PRELOAD:
            rows = int(a["n"]) if a.get("transpose") else int(a["k"])
            start = max(ready, last_swap + R + C)  # the array holds a swapped-in tile rows + cols cycles
            complete = start + int(round(p.preload_per_row * rows))
            preload_done = complete
            unit_free[q] = start + 1
        elif op == Opcode.MATMUL:
            m = int(a["m"])
            start = max(ready, stream_free)
            if preload_done is not None:
                start = max(start, preload_done)
                last_swap = start
                preload_done = None
            stream_free = start + m
            complete = start + m + R + C + 2
            unit_free[q] = start + 1
        elif op == Opcode.REQUANT:
            start = ready
            complete = start + 2 + int(a["rows"]) * max(1, C // lanes) + p.requant_latency
            unit_free[q] = complete
        else:  # VBIN / VMAP / VROW
            start = ready
            complete = start + _vector_cycles(ins, config, p)
            unit_free[q] = complete
        fifo.append(start)
        for dst in ins.signal:
            tokens.setdefault((q, dst), deque()).append(complete)
        done_all = max(done_all, complete)
        out.append(complete)
    return out


def segment_cycles(config: AcceleratorConfig, bundle, segments: list[Segment],
                   params: TimingParams | None = None) -> list[int]:
    """Modelled cycles of each segment, each run on its own (as the twin's per-segment runs:
    the core starts empty, and the segment ends at its last fence/halt)."""
    out = []
    for s in segments:
        t = program_cost(config, bundle.program[s.first:s.first + s.count], params)
        out.append(int(t[-1]) if t else 0)
    return out


def program_macs(program) -> int:
    """Useful multiply-accumulates of a program: each MATMUL's ``m x k`` rows times the
    columns of the tile preloaded before it."""
    from weft.hw.isa import Opcode

    n, macs = 0, 0
    for ins in program:
        if ins.opcode == Opcode.PRELOAD:
            n = int(ins.args["n"])
        elif ins.opcode == Opcode.MATMUL:
            macs += int(ins.args["m"]) * int(ins.args["k"]) * n
    return macs


def layer_utilization(config: AcceleratorConfig, bundle, graph: Graph | None = None,
                      params: TimingParams | None = None) -> list[dict]:
    """The performance model's estimate per layer of ``bundle`` (:func:`layer_segments`, each
    piece modelled alone as :func:`segment_cycles` does) and a last row ``"total"``: ``cycles``,
    ``array_macs`` (:func:`program_macs`: what the array multiplies, a two-digit GEMM twice) and
    ``array_util`` = array_macs / (cycles * MACs per cycle); with ``graph``, also ``model_macs``
    (the graph's GEMMs, :func:`graph_gemms`, by the layer of the kernel that runs each node)
    and ``model_util``."""
    segs = layer_segments(bundle, "layer")
    cycles = segment_cycles(config, bundle, segs, params)
    layer_of = {k["node"]: k["layer"] for k in (bundle.metadata or {}).get("kernels", []) if k.get("node")}
    model: dict[str, int] = {}
    if graph is not None:
        for name, M, N, K, count, _ in graph_gemms(graph):
            layer = layer_of.get(name.split(":")[0])
            if layer is not None:
                model[layer] = model.get(layer, 0) + M * N * K * count
    rows = []
    for s, c in zip(segs, cycles):
        rows.append({"layer": s.name, "cycles": c, "array_macs": program_macs(bundle.program[s.first:s.first + s.count])})
        if graph is not None:
            rows[-1]["model_macs"] = model.get(s.name, 0)
    if rows:
        rows.append({"layer": "total", **{k: sum(r[k] for r in rows) for k in rows[0] if k != "layer"}})
    rate = config.macs_per_cycle
    for r in rows:
        r["array_util"] = r["array_macs"] / (r["cycles"] * rate) if r["cycles"] else 0.0
        if "model_macs" in r:
            r["model_util"] = r["model_macs"] / (r["cycles"] * rate) if r["cycles"] else 0.0
    return rows
