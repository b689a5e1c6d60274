"""Run a cocotb bench against an Amaranth component: convert, build (cached), simulate.

Typical use from a pytest test::

    from weft.sim.rtl import run_bench

    def test_array(tmp_path):
        run_bench(SystolicArray(config), "tests.hw.benches.array_bench",
                  params={"config": "tiny"})

What :func:`run_bench` does:

1. converts the component to Verilog with ``amaranth.back.verilog`` (no ``src``
   attributes, so moving Python lines does not force a rebuild);
2. builds it with cocotb's Python runner (``cocotb_tools.runner``), Verilator by default
   or Icarus (as Verilog-2005: :data:`ICARUS_ARGS`), with ``timescale=("1ns", "1ps")``,
   in a cache folder keyed by a hash of the Verilog, the simulator and its version and
   the build arguments. A rerun with unchanged RTL reuses the build; concurrent
   pytest-xdist workers that need the same build wait for one another on a file lock,
   workers with different builds run in parallel;
3. runs the bench module's ``@cocotb.test()`` functions in a private run folder. The
   ``params`` mapping reaches the bench as JSON: :func:`weft.sim.benchlib.params` reads it
   (through the ``WEFT_BENCH_PARAMS`` environment variable, which names the file);
4. raises :class:`RtlBenchFailure` (an ``AssertionError``) naming the failed cocotb tests,
   with the tail of the simulator log, or :class:`RtlBuildError` with the build log's tail.

The cache lives in ``$WEFT_CACHE_DIR`` if set, else ``<repo>/.cache/rtl`` (git-ignored).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import itertools
import json
import os
import re
import shutil
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from . import toolchain

__all__ = [
    "RtlBuildError",
    "RtlBenchFailure",
    "BenchResult",
    "VERILATOR_WAIVERS",
    "ICARUS_ARGS",
    "cache_root",
    "file_lock",
    "log_tail",
    "to_verilog",
    "build",
    "run_bench",
    "default_simulator",
    "PARAMS_ENV",
    "SIM_ENV",
]

#: Environment variable that carries the path of the bench's JSON parameter file.
PARAMS_ENV = "WEFT_BENCH_PARAMS"

#: Environment variable naming the default simulator (set by ``make sim SIM=...``).
SIM_ENV = "WEFT_SIM"

#: Verilator lint warnings that Amaranth's generated Verilog always triggers, waived one by
#: one (no ``-Wno-fatal``, so any other warning still fails the build):
#: Amaranth widens and truncates operands implicitly (WIDTHEXPAND / WIDTHTRUNC) and
#: concatenates mixed-width values (WIDTHCONCAT); its memories can be declared wider
#: than some ports use. Its per-signal ``case`` statements stop after the last case that
#: assigns that signal, with the default assignment before the ``case`` (CASEINCOMPLETE).
VERILATOR_WAIVERS = (
    "-Wno-WIDTHEXPAND",
    "-Wno-WIDTHTRUNC",
    "-Wno-WIDTHCONCAT",
    "-Wno-CASEINCOMPLETE",
)

#: Icarus compiles the Verilog as Verilog-2005, after cocotb's own ``-g2012`` (the last
#: ``-g`` wins). Amaranth's Verilog is Yosys ``write_verilog`` output in Verilog-2005 (not
#: SystemVerilog): each ``always @*`` block reads a dummy ``reg ... = 0`` so that the
#: initialiser's time-0 event runs the block once (Yosys PR 2273). Under ``-g2012`` Icarus
#: applies declaration initialisers before time 0 without an event, so a combinational
#: block whose inputs do not change after reset stays X (for example the DMA's
#: ``rd_data.valid`` until the first read, and next-state logic that then loads X into
#: registers). Verilator evaluates every block at start-up and has no such problem.
#: (cocotb's wave-dump module for Icarus uses SystemVerilog ``string``; :func:`build` does
#: not compile it.)
ICARUS_ARGS = ("-g2005",)

_TIMESCALE = ("1ns", "1ps")
_run_counter = itertools.count()


class RtlBuildError(RuntimeError):
    """The Verilog did not build. The message holds the build command's log tail."""


class RtlBenchFailure(AssertionError):
    """The simulation ran and some cocotb tests failed (or the simulator crashed)."""


@dataclass
class BenchResult:
    """What one :func:`run_bench` call did."""

    simulator: str
    build_dir: Path
    run_dir: Path
    built: bool  # False when the cached build was reused
    convert_s: float
    build_s: float
    run_s: float
    tests: dict[str, str] = field(default_factory=dict)  # cocotb test name -> "pass" | "fail" | "skip"


# ---------------------------------------------------------------------- paths
def cache_root() -> Path:
    """Folder that holds cached builds (created on demand)."""
    env = os.environ.get("WEFT_CACHE_DIR")
    if env:
        root = Path(env)
    else:
        repo = Path(__file__).resolve().parents[1]
        root = repo / ".cache" / "rtl" if (repo / "pyproject.toml").exists() else Path.home() / ".cache" / "weft" / "rtl"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if needed): one builder per cache entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def log_tail(path: Path, lines: int = 60) -> str:
    """The last ``lines`` lines of a log, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------- conversion
def to_verilog(component: Any, name: str = "top") -> str:
    """Verilog for an Amaranth component (ports from its wiring signature, plus clk/rst)."""
    from amaranth.back import verilog

    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"toplevel name {name!r} is not a Verilog identifier")
    return verilog.convert(component, name=name, emit_src=False)


# ---------------------------------------------------------------------- build
def _runner(simulator: str):
    from cocotb_tools.runner import get_runner

    toolchain.require(simulator)
    return get_runner(simulator)


def _build_key(verilog_text: str, simulator: str, name: str, build_args: Sequence[str]) -> str:
    import cocotb

    h = hashlib.sha256()
    version = toolchain.verilator_version() if simulator == "verilator" else ()
    for part in (verilog_text, simulator, repr(version), cocotb.__version__, name,
                 repr(tuple(build_args)), repr(_TIMESCALE)):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


#: C++ optimisation of Verilator models: cocotb benches spend their time in Python, so
#: a cheap compile beats a fast model (Verilator's own default is -Os everywhere).
VERILATOR_CXX_OPT = {"OPT_FAST": "-O1", "OPT_SLOW": "-O0", "OPT_GLOBAL": "-O1"}


@contextlib.contextmanager
def _makeflags(extra: Mapping[str, str]) -> Iterator[None]:
    old = os.environ.get("MAKEFLAGS")
    os.environ["MAKEFLAGS"] = " ".join([old or "", *(f"{k}={v}" for k, v in extra.items())]).strip()
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("MAKEFLAGS", None)
        else:
            os.environ["MAKEFLAGS"] = old


def build(verilog_text: str, *, name: str = "top", simulator: str = "verilator",
          build_args: Sequence[str] = (), cxx_opt: Mapping[str, str] | None = None) -> tuple[Path, bool, float]:
    """Build ``verilog_text`` (toplevel ``name``) unless a cached build exists.

    ``cxx_opt`` overrides :data:`VERILATOR_CXX_OPT` (make variables of Verilator's makefile).
    Returns (build folder, whether it was built now, seconds spent building).
    """
    if simulator not in toolchain.SIMULATORS:
        raise ValueError(f"unknown simulator {simulator!r} (known: {', '.join(toolchain.SIMULATORS)})")
    toolchain.require(simulator)
    args = list(build_args)
    make_vars: dict[str, str] = {}
    if simulator == "verilator":
        args = [*VERILATOR_WAIVERS, *args]
        make_vars = dict(VERILATOR_CXX_OPT if cxx_opt is None else cxx_opt)
    else:
        args = [*ICARUS_ARGS, *args]
    key = _build_key(verilog_text, simulator, name, [*args, *sorted(make_vars.items())])
    build_dir = cache_root() / f"{name}-{simulator}-{key}"
    marker = build_dir / "weft_build.json"
    with file_lock(build_dir.with_suffix(".lock")):
        if marker.exists():
            return build_dir, False, 0.0
        if build_dir.exists():  # an earlier build died half-way
            shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True)
        source = build_dir / f"{name}.v"
        source.write_text(verilog_text)
        log = build_dir / "build.log"
        runner = _runner(simulator)
        t0 = time.monotonic()
        try:
            with _makeflags(make_vars):
                runner.build(sources=[source], hdl_toplevel=name, build_dir=build_dir, build_args=args,
                             timescale=_TIMESCALE, always=True, log_file=log)
        except (RuntimeError, SystemExit, OSError) as exc:
            raise RtlBuildError(f"{simulator} build of {name} failed ({exc}); log {log}:\n{log_tail(log)}") from None
        elapsed = time.monotonic() - t0
        marker.write_text(json.dumps({"simulator": simulator, "toplevel": name, "build_s": round(elapsed, 2),
                                      "build_args": args, "make": make_vars}, indent=1))
        return build_dir, True, elapsed


# ---------------------------------------------------------------------- run
def _resolve_module(bench: str | os.PathLike) -> str:
    """Dotted module name for ``bench`` (a dotted name or a .py path), importable in the simulator."""
    text = str(bench)
    if text.endswith(".py") or os.sep in text:
        path = Path(text).resolve()
        if not path.is_file():
            raise ValueError(f"bench file {path} does not exist")
        folder = str(path.parent)
        if folder not in sys.path:  # the simulator's PYTHONPATH is this process's sys.path
            sys.path.append(folder)
        return path.stem
    if importlib.util.find_spec(text) is None:
        raise ValueError(f"bench module {text!r} is not importable from this process")
    return text


def _parse_results(path: Path) -> dict[str, str]:
    tests: dict[str, str] = {}
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        name = case.get("name", "?")
        if case.find("failure") is not None or case.find("error") is not None:
            tests[name] = "fail"
        elif case.find("skipped") is not None:
            tests[name] = "skip"
        else:
            tests[name] = "pass"
    return tests


def default_simulator() -> str:
    """The simulator benches use unless told otherwise: ``$WEFT_SIM`` (``make sim SIM=...``), else Verilator."""
    return os.environ.get(SIM_ENV) or "verilator"


def run_bench(component: Any, bench: str | os.PathLike, *, params: Mapping[str, Any] | None = None,
              name: str = "top", simulator: str | None = None, testcase: str | Sequence[str] | None = None,
              seed: int | None = None, build_args: Sequence[str] = (), waves: bool = False,
              verilog_text: str | None = None) -> BenchResult:
    """Convert ``component``, build it (cached) and run the cocotb tests in ``bench``.

    ``bench`` is a dotted module name importable from this process or a ``.py`` file.
    ``params`` (JSON-serialisable) is handed to the bench (:func:`weft.sim.benchlib.params`).
    ``testcase`` restricts the run to those cocotb test names. ``waves`` writes a trace
    (Icarus: FST; Verilator needs a build with ``--trace``, pass it in ``build_args``).
    Pass ``verilog_text`` to skip the conversion (``component`` is then ignored).
    Raises :class:`RtlBuildError` or :class:`RtlBenchFailure`; returns a :class:`BenchResult`.
    """
    simulator = simulator or default_simulator()
    module = _resolve_module(bench)
    t0 = time.monotonic()
    if verilog_text is None:
        verilog_text = to_verilog(component, name)
    convert_s = time.monotonic() - t0
    build_dir, built, build_s = build(verilog_text, name=name, simulator=simulator, build_args=build_args)

    test_id = os.environ.get("PYTEST_CURRENT_TEST", module).split(" ")[0]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", test_id)[-80:]
    run_dir = build_dir / "runs" / f"{slug}-{os.getpid()}-{next(_run_counter)}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    params_file = run_dir / "params.json"
    params_file.write_text(json.dumps(dict(params or {}), indent=1, sort_keys=True))
    results = run_dir / "results.xml"
    log = run_dir / "sim.log"

    runner = _runner(simulator)
    t1 = time.monotonic()
    failure: str | None = None
    try:
        runner.test(test_module=module, hdl_toplevel=name, hdl_toplevel_lang="verilog", build_dir=build_dir, test_dir=run_dir,
                    results_xml=str(results), extra_env={PARAMS_ENV: str(params_file)},
                    testcase=testcase, seed=seed, waves=waves, timescale=_TIMESCALE, log_file=log)
    except SystemExit as exc:  # the runner exits when tests fail under pytest
        failure = f"simulator exit status {exc.code}"
    except (RuntimeError, OSError) as exc:
        failure = str(exc)
    run_s = time.monotonic() - t1

    tests: dict[str, str] = {}
    if results.exists():
        try:
            tests = _parse_results(results)
        except ET.ParseError as exc:
            failure = failure or f"unreadable results file {results}: {exc}"
    result = BenchResult(simulator, build_dir, run_dir, built, convert_s, build_s, run_s, tests)
    failed = [t for t, status in tests.items() if status == "fail"]
    if not tests and failure is None:
        failure = f"no cocotb tests ran (module {module}, testcase {testcase!r})"
    if failed or failure:
        what = f"failed cocotb tests: {', '.join(failed)}" if failed else failure
        raise RtlBenchFailure(f"{module} on {simulator}: {what}\nlog {log}:\n{log_tail(log, 80)}")
    return result
