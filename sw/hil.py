"""Hardware-in-the-loop executor: run a bundle on the real core (twin or board) through the driver.

::

    from weft.sw.hil import HilSession, compare_with_golden, run_on_twin

    outputs, counters = run_on_twin(bundle, {"a": a}, config)          # launches, runs, closes
    with HilSession(config) as session:                                 # one twin, many runs
        outputs, counters = session.run(bundle, {"a": a}, watchdog_cycles=100_000)
        report = compare_with_golden(bundle, {"a": a}, config, session=session)
        print(report.summary()); print(report.performance.summary())

The target is a twin of :class:`weft.hw.core.Core` (built with Verilator, cached; see
``weft.sim.twin``) unless ``target`` names a transport URI (``twin:/path/twin.sock``,
later ``uart:/dev/ttyUSB0``), which is opened with :func:`weft.sw.driver.open_transport`.
Every call is bounded in time: ``timeout_s`` bounds the wait for the program, the
transport bounds each access, and ``watchdog_cycles`` (the core's ``WATCHDOG`` register)
stops a program that never halts with a :class:`~weft.sw.driver.DeviceError` whose
``status.error_cause`` is ``WATCHDOG``.

Counters returned by a run are the difference over that run (the core's counters count
since reset). :class:`Performance` turns them into projected numbers at the
configuration's clock: latency = CYCLES / clock_mhz, utilization = ARRAY_BUSY / CYCLES,
and the stall breakdown (fractions of CYCLES).
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ..hw.bundle import Bundle
from ..hw.config import AcceleratorConfig
from .driver import Device, open_transport

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "TARGET_ENV",
    "STALLS",
    "Performance",
    "Comparison",
    "HilSession",
    "run_on_twin",
    "compare_with_golden",
    "first_difference",
]

#: Default wall-clock bound for one program (seconds).
DEFAULT_TIMEOUT_S = 300.0
#: Environment variable naming the HIL target: ``twin`` (default) or a transport URI.
TARGET_ENV = "WEFT_HIL_TARGET"
#: The stall counters, in the order they are reported.
STALLS = ("stall_load", "stall_store", "stall_token", "stall_fetch")


# ---------------------------------------------------------------------- performance
@dataclass(frozen=True)
class Performance:
    """Projected performance of one run from its counters at ``clock_mhz``."""

    counters: Mapping[str, int]
    clock_mhz: float
    macs_per_cycle: int
    macs: int | None = None  #: useful multiply-accumulates, when known (GEMM: M*N*K)

    @property
    def cycles(self) -> int:
        return int(self.counters.get("cycles", 0))

    @property
    def latency_s(self) -> float:
        """Projected run time on the board: cycles / clock."""
        return self.cycles / (self.clock_mhz * 1e6)

    @property
    def runs_per_s(self) -> float:
        return 1.0 / self.latency_s if self.cycles else float("inf")

    @property
    def utilization(self) -> float:
        """ARRAY_BUSY / CYCLES: the fraction of cycles a row entered the array."""
        return self.counters.get("array_busy", 0) / self.cycles if self.cycles else 0.0

    @property
    def mac_utilization(self) -> float | None:
        """Useful MACs / (cycles * MACs per cycle), when ``macs`` is known."""
        if self.macs is None or not self.cycles:
            return None
        return self.macs / (self.cycles * self.macs_per_cycle)

    @property
    def gops(self) -> float | None:
        """Projected useful throughput in GOP/s (2 ops per MAC), when ``macs`` is known."""
        if self.macs is None or not self.cycles:
            return None
        return 2 * self.macs / self.latency_s / 1e9

    @property
    def stalls(self) -> dict[str, float]:
        """Each stall counter as a fraction of CYCLES (``load``, ``store``, ``token``, ``fetch``)."""
        c = self.cycles
        return {name.removeprefix("stall_"): (self.counters.get(name, 0) / c if c else 0.0) for name in STALLS}

    def summary(self) -> str:
        lat = self.latency_s
        lat_text = f"{lat * 1e6:.2f} us" if lat < 1e-3 else f"{lat * 1e3:.3f} ms"
        lines = [
            f"cycles {self.cycles:,} -> projected latency {lat_text} at {self.clock_mhz:g} MHz "
            f"({self.runs_per_s:,.0f} runs/s)",
            f"array utilization {self.utilization:.1%} (ARRAY_BUSY {self.counters.get('array_busy', 0):,} / CYCLES)",
        ]
        if self.macs is not None:
            lines.append(f"MAC utilization {self.mac_utilization:.1%}, {self.gops:.3f} GOP/s projected")
        stalls = ", ".join(f"{k} {v:.1%} ({self.counters.get('stall_' + k, 0):,})" for k, v in self.stalls.items())
        lines.append(f"stalls (share of cycles): {stalls}")
        lines.append(f"DMA {self.counters.get('bytes_read', 0):,} B read, {self.counters.get('bytes_written', 0):,} B "
                     f"written; {self.counters.get('instructions', 0):,} instructions")
        return "\n".join(lines)


def performance(counters: Mapping[str, int], config: AcceleratorConfig, *, macs: int | None = None) -> Performance:
    return Performance(dict(counters), float(config.clock_mhz), int(config.macs_per_cycle), macs)


# ---------------------------------------------------------------------- comparison
def first_difference(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> str | None:
    """None when every output has the same dtype, shape and bytes; else a sentence naming the
    first differing output and byte (offset into the output's C-order bytes)."""
    for name, w in want.items():
        if name not in got:
            return f"output {name!r} missing"
        g = np.asarray(got[name])
        w = np.asarray(w)
        if g.dtype != w.dtype or g.shape != w.shape:
            return f"output {name!r}: {g.dtype}{list(g.shape)} vs expected {w.dtype}{list(w.shape)}"
        gb = np.frombuffer(np.ascontiguousarray(g).tobytes(), np.uint8)
        wb = np.frombuffer(np.ascontiguousarray(w).tobytes(), np.uint8)
        diff = np.flatnonzero(gb != wb)
        if diff.size:
            i = int(diff[0])
            elem = i // max(w.itemsize, 1)
            index = tuple(int(v) for v in np.unravel_index(elem, w.shape)) if w.size else ()
            return (f"output {name!r}: {diff.size} of {wb.size} bytes differ; first at byte {i} "
                    f"(element {list(index)}): device 0x{gb[i]:02X}, bit-exact model 0x{wb[i]:02X} "
                    f"(values {g.reshape(-1)[elem]} vs {w.reshape(-1)[elem]})")
    extra = sorted(set(got) - set(want))
    if extra:
        return f"unexpected outputs {extra}"
    return None


@dataclass
class Comparison:
    """The device's run against the bit-exact model's."""

    identical: bool
    difference: str | None  #: first differing byte, or None
    outputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]
    counters: dict[str, int]
    performance: Performance
    golden_stats: Any = None
    wall_s: float = 0.0

    def summary(self) -> str:
        if self.identical:
            return "identical to the bit-exact model"
        return f"DIFFERS from the bit-exact model: {self.difference}"


# ---------------------------------------------------------------------- session
def _target(target: str | None) -> str:
    t = (target if target is not None else os.environ.get(TARGET_ENV, "")).strip()
    return t or "twin"


@dataclass
class HilSession:
    """A device (a launched twin of ``Core(config)``, or ``target``'s transport) opened through
    the driver; reuse it for many runs. Use as a context manager (closes the twin/link).

    ``target``: None (``$WEFT_HIL_TARGET``, default ``twin``), ``"twin"`` (launch a twin of
    ``design`` or ``Core(config)``), or a transport URI for :func:`open_transport`.
    ``launch_kwargs`` go to :meth:`weft.sim.twin.Twin.launch` (``call_timeout``, ``trace``, ...).
    """

    config: AcceleratorConfig
    target: str | None = None
    design: Any = None
    launch_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        self.target = _target(self.target)
        self.twin = None
        self.device: Device | None = None
        self.launch_s = 0.0
        t0 = time.monotonic()
        if self.target == "twin":
            from ..sim.twin import DEFAULT_TOP, Twin, core_verilog
            from .driver import TwinTransport

            kwargs = dict(self.launch_kwargs)
            if self.design is None:  # the core's Verilog, cached (converting the default core takes ~20 s)
                design = core_verilog(self.config)
                kwargs.setdefault("name", DEFAULT_TOP)
            else:
                design = self.design
            self.twin = Twin.launch(design, self.config, **kwargs)
            try:
                self.device = Device.open(TwinTransport(self.twin), self.config)
            except BaseException:
                self.twin.close()
                raise
        else:
            transport = open_transport(self.target)
            try:
                self.device = Device.open(transport, self.config)
            except BaseException:
                transport.close()
                raise
        self.launch_s = time.monotonic() - t0

    @property
    def is_twin(self) -> bool:
        return self.twin is not None

    def twin_cpu_s(self) -> float | None:
        """CPU seconds the twin process has used so far (None for a board or a twin this session
        did not launch). On a shared machine, simulated cycles per CPU second measure the
        twin's speed; per wall second they also measure the other jobs."""
        if self.twin is None:
            return None
        try:
            with open(f"/proc/{self.twin.process.pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            return None

    def describe(self) -> str:
        return self.device.transport.describe() if self.device else self.target

    def close(self) -> None:
        if self.device is not None:
            self.device.close()
        if self.twin is not None:
            self.twin.close()

    def __enter__(self) -> "HilSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, bundle: Bundle, inputs: Mapping[str, np.ndarray], *, watchdog_cycles: int | None = None,
            timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """Load ``bundle`` (refused before anything is written when it is for another
        configuration), write ``inputs``, run with ``WATCHDOG = watchdog_cycles`` (None or 0: off)
        for at most ``timeout_s`` seconds, and return (outputs, counters of this run).

        Raises :class:`~weft.sw.driver.DeviceError` (the core stopped on an error: watchdog, bus
        error, illegal instruction), :class:`~weft.sw.driver.DeviceTimeoutError`, or a
        :class:`~weft.sw.driver.TransportError` (twin died, link lost).
        """
        dev = self.device
        if dev is None:
            raise RuntimeError("the session is closed")
        bundle.check_config(self.config)
        dev.load_bundle(bundle)
        dev.write_inputs(inputs, bundle)
        dev.write_reg("WATCHDOG", int(watchdog_cycles or 0))
        before = dev.counters()
        dev.start()
        dev.wait(timeout_s=timeout_s)
        after = dev.counters()
        counters = {k: v - before.get(k, 0) for k, v in after.items()}
        return dev.read_outputs(bundle), counters

    def run_segments(self, bundle: Bundle, inputs: Mapping[str, np.ndarray], segments, *,
                     watchdog_cycles: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                     progress=None) -> tuple[dict[str, np.ndarray], dict[str, int], list[dict[str, int]]]:
        """Run ``bundle`` as consecutive pieces of its program and measure each one.

        ``segments``: ``(first, count)`` instruction ranges that cover the program in order,
        each ending where the program's own work is drained (after a kernel's ``fence``;
        :func:`weft.compiler.perf.layer_segments` gives them per layer or per kernel). For
        each piece the instruction after it is replaced by a ``halt`` (restored after),
        ``PROGRAM_ADDR``/``PROGRAM_COUNT`` point at the piece, and the core runs it from the
        state the previous piece left; the counters of each run are that piece's. The
        outputs are the whole program's (every kernel reads and writes device memory only).
        Each piece costs a few cycles of start-up (its first instruction fetch) that the
        whole run hides. Returns (outputs, total counters, per-segment counters).
        """
        from ..hw.isa import INSTR_BYTES, Instruction, Opcode

        dev = self.device
        if dev is None:
            raise RuntimeError("the session is closed")
        bundle.check_config(self.config)
        program = bundle.program
        segments = [(int(f), int(c)) for f, c in segments]
        pos = 0
        for first, count in segments:
            if first != pos or count <= 0:
                raise ValueError(f"segments must cover the program in order: got ({first}, {count}) at {pos}")
            pos = first + count
        if pos != len(program):
            raise ValueError(f"segments cover {pos} of the program's {len(program)} instructions")
        if not program or program[-1].opcode != Opcode.HALT:
            raise ValueError("the program must end with a halt to run it in segments")
        dev.load_bundle(bundle)
        dev.write_inputs(inputs, bundle)
        dev.write_reg("WATCHDOG", int(watchdog_cycles or 0))
        halt = Instruction.make(Opcode.HALT).encode()
        base = bundle.program_address
        per: list[dict[str, int]] = []
        start = dev.counters()
        before = start
        try:
            for i, (first, count) in enumerate(segments):
                end = first + count
                patch = program[end - 1].opcode != Opcode.HALT
                if patch:
                    original = program[end].encode()
                    dev.write_mem(base + end * INSTR_BYTES, halt)
                dev.write_reg("PROGRAM_ADDR", base + first * INSTR_BYTES)
                dev.write_reg("PROGRAM_COUNT", count + (1 if patch else 0))
                try:
                    dev.start()
                    dev.wait(timeout_s=timeout_s)
                finally:
                    if patch:
                        dev.write_mem(base + end * INSTR_BYTES, original)
                after = dev.counters()
                per.append({k: v - before.get(k, 0) for k, v in after.items()})
                before = after
                if progress is not None:
                    progress(i, per[-1])
        finally:
            dev.write_reg("PROGRAM_ADDR", base)
            dev.write_reg("PROGRAM_COUNT", len(program))
        total = {k: v - start.get(k, 0) for k, v in before.items()}
        return dev.read_outputs(bundle), total, per


def run_on_twin(bundle: Bundle, inputs: Mapping[str, np.ndarray], config: AcceleratorConfig, *,
                watchdog_cycles: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                session: HilSession | None = None) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """Run ``bundle`` on a twin of ``Core(config)`` (launched for this call and closed after,
    unless ``session`` is given) and return (outputs, counters of this run)."""
    if session is not None:
        return session.run(bundle, inputs, watchdog_cycles=watchdog_cycles, timeout_s=timeout_s)
    with HilSession(config, target="twin") as s:
        return s.run(bundle, inputs, watchdog_cycles=watchdog_cycles, timeout_s=timeout_s)


def _gemm_macs(bundle: Bundle) -> int | None:
    """M*N*K for a bundle from :func:`weft.compiler.gemm.build_gemm_bundle` (its metadata), else None."""
    meta = getattr(bundle, "metadata", None) or {}
    try:
        if meta.get("kernel") == "gemm":
            return int(meta["M"]) * int(meta["N"]) * int(meta["K"])
    except (AttributeError, KeyError, TypeError, ValueError):
        pass
    return None


def compare_with_golden(bundle: Bundle, inputs: Mapping[str, np.ndarray], config: AcceleratorConfig, *,
                        session: HilSession | None = None, watchdog_cycles: int | None = None,
                        timeout_s: float = DEFAULT_TIMEOUT_S, macs: int | None = None) -> Comparison:
    """Run ``bundle`` on the device (a fresh twin unless ``session``) and on the bit-exact model
    (:func:`weft.sim.golden.run_bundle`); report whether every output byte is identical, and
    if not, the first differing byte."""
    from ..sim.golden import run_bundle

    bundle.check_config(config)
    # The bit-exact model runs in a thread while the device runs (the twin is another process;
    # this thread only waits on its socket), so the comparison costs max(device, model).
    with ThreadPoolExecutor(max_workers=1) as pool:
        golden = pool.submit(run_bundle, bundle, inputs, config)
        t0 = time.monotonic()
        outputs, counters = run_on_twin(bundle, inputs, config, watchdog_cycles=watchdog_cycles,
                                        timeout_s=timeout_s, session=session)
        wall = time.monotonic() - t0
        expected, stats = golden.result()
    diff = first_difference(outputs, expected)
    return Comparison(diff is None, diff, outputs, expected, counters,
                      performance(counters, config, macs=macs if macs is not None else _gemm_macs(bundle)),
                      stats, wall)
