"""FPGA devices.

Two parts, kept apart so the compiled path drops in when it lands:

* an **executor** runs a program bundle: ``run(bundle, inputs) -> (outputs, stats)``.
  :class:`GoldenExecutor` uses the bit-exact model (``weft.sim.golden.run_bundle``);
  :class:`DriverExecutor` uses the device driver API (``weft.sw.driver``: the Verilator twin
  or a board, whichever transport it was opened on).
* :class:`FpgaDevice` serves requests with it, **paced** (emulated-board mode) to the board's
  latency from the compiler's performance model at the configuration's clock: a call returns no
  earlier than the model says the board would.

Where embedding *values* come from (reported as ``values`` by :meth:`FpgaDevice.describe`,
``/health`` and ``/v1/models``):

* ``fpga:emu`` computes them with the CPU reference model (``values="cpu-reference"``) and *paces*
  each batch to :class:`~weft.sw.devices.cost.FpgaCostModel` (the MiniLM GEMMs on the
  configuration, at ``clock_mhz``): the board's predicted latency, float values.
* ``fpga:golden`` (an :class:`EncoderBundle` given to the device) runs MiniLM compiled to an int8
  program bundle for the configuration, one sentence per run, through the executor
  (``values="bundle:golden"``: the bit-exact model; ``"bundle:driver"``: the twin or a board), then
  mean-pools and normalizes on the host. In ``emu`` mode it is paced the same way.
* ``fpga:sim`` is the same bundle in ``board`` mode on a :class:`DriverExecutor` that owns a
  Verilator twin of the core (:meth:`DriverExecutor.launch_twin`): every embedding runs through
  the RTL, with no pacing (the latency is the simulation's); :meth:`FpgaDevice.close` shuts the
  twin down. The twin is bit-exact, so its values equal ``fpga:golden``'s on the same bundle.

:meth:`FpgaDevice.run_bundle` runs any bundle through the executor, paced the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from .base import Capabilities, Device, DeviceError, DeviceFailure, Health, MemoryInfo, ModelInfo
from .cost import FpgaCostModel
from .models import ModelSet

__all__ = ["BundleExecutor", "GoldenExecutor", "DriverExecutor", "EncoderBundle", "FpgaDevice",
           "roofline_seconds"]


class BundleExecutor(Protocol):
    name: str

    def run(self, bundle, inputs: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], Any]: ...


class GoldenExecutor:
    """Runs bundles on the bit-exact model (numpy)."""

    name = "golden"

    def __init__(self, config) -> None:
        self.config = config

    def run(self, bundle, inputs):
        from weft.sim.golden import run_bundle

        return run_bundle(bundle, inputs, self.config)


class DriverExecutor:
    """Runs bundles through the driver API on an opened :class:`weft.sw.driver.device.Device`
    (twin or board); returns the outputs and the performance counters of the run (the
    difference over it; the core's counters count since reset).

    Runs are serialized. ``timeout_s`` bounds one run's wait. ``on_close`` (optional) releases
    what the executor owns (the twin, the link) when :meth:`close` is called; ``on_abort``
    (optional) stops it at once when a run is still going after ``close_grace_s`` (the twin
    process is killed, which ends the run with a transport error). ``alive`` (optional) tells
    whether the target is still there between runs (the twin process has not exited)."""

    name = "driver"

    def __init__(self, driver_device, *, timeout_s: float = 600.0, on_close=None, on_abort=None, alive=None,
                 close_grace_s: float = 2.0, description: str | None = None) -> None:
        import threading

        self.device = driver_device
        self.timeout_s = timeout_s
        self.close_grace_s = close_grace_s
        self._on_close, self._on_abort, self._alive = on_close, on_abort, alive
        self._lock = threading.Lock()
        self.closed = False
        self.runs = 0
        self.description = description or _describe_transport(driver_device)

    @classmethod
    def launch_twin(cls, config, **kwargs) -> DriverExecutor:
        """Launch a Verilator twin of ``Core(config)`` (built once and cached under
        ``.cache/twin``; see :mod:`weft.sim.twin`), open it through the driver (identity and
        configuration hash checked) and return an executor that owns it: :meth:`close` shuts
        the twin process down. Errors (a failed build, a twin that does not start) are raised
        as :class:`DeviceError` naming the configuration."""
        from weft.sw.hil import HilSession

        try:
            session = HilSession(config, target="twin")
        except Exception as exc:
            raise DeviceError(f"cannot start the twin of the {config.name!r} core: {type(exc).__name__}: {exc}") \
                from exc
        twin = session.twin

        def abort() -> None:
            if twin.process.poll() is None:
                twin.process.kill()

        ex = cls(session.device, on_close=session.close, on_abort=abort, alive=lambda: twin.process.poll() is None,
                 description=f"twin of Core({config.name}), pid {twin.process.pid} "
                             f"({'built' if twin.build.built else 'cached'} {twin.build.directory.name})",
                 **kwargs)
        ex.session, ex.launch_s = session, session.launch_s
        return ex

    @property
    def alive(self) -> bool:
        return not self.closed and (self._alive is None or bool(self._alive()))

    def run(self, bundle, inputs):
        with self._lock:
            if self.closed:
                raise DeviceFailure("the driver executor is closed (its twin or link was released)")
            dev = self.device
            before = dev.counters()
            outputs = dev.run(inputs, bundle=bundle, timeout_s=self.timeout_s)
            after = dev.counters()
            self.runs += 1
        return outputs, {k: v - before.get(k, 0) for k, v in after.items()}

    def close(self) -> None:
        """Release the target (idempotent). A run still going after ``close_grace_s`` is
        aborted first."""
        if self.closed:
            return
        self.closed = True
        got = self._lock.acquire(timeout=self.close_grace_s)
        try:
            if not got and self._on_abort is not None:
                self._on_abort()
            if self._on_close is not None:
                self._on_close()
        finally:
            if got:
                self._lock.release()


def _describe_transport(driver_device) -> str:
    try:
        return driver_device.transport.describe()
    except Exception:  # a stand-in device without a transport
        return "driver"


class EncoderBundle:
    """MiniLM compiled for one accelerator configuration at a fixed sequence length: the int8
    program bundle, the host part of the graph (token and position embeddings, run on the host
    before each bundle run) and the tokenizer. :meth:`embed` gives sentence embeddings computed
    by the bundle on an executor."""

    def __init__(self, bundle, host_graph, tokenizer, seq_len: int, hidden: int) -> None:
        self.bundle, self.host, self.tokenizer = bundle, host_graph, tokenizer
        self.seq_len, self.hidden = seq_len, hidden
        self.input_names = {v.name for v in host_graph.inputs}

    @classmethod
    def compile(cls, minilm, config, *, seq_len: int = 32, calibration=None) -> EncoderBundle:
        """Export ``minilm`` (a :class:`weft.sw.models.minilm.MiniLM`) to ONNX at ``seq_len``,
        calibrate on ``calibration`` sentences (default: the built-in set), quantize and lower
        it for ``config`` (the same pipeline as ``weft embed``)."""
        from weft.compiler.frontend import import_onnx
        from weft.compiler.lower import lower
        from weft.compiler.pipeline import host_graph, quantize_for_device
        from weft.sw.accuracy import CALIBRATION_SENTENCES

        if not (isinstance(seq_len, int) and 2 <= seq_len <= minilm.config.max_position_embeddings):
            raise DeviceError(f"seq_len must be 2..{minilm.config.max_position_embeddings}, got {seq_len!r}")
        graph = import_onnx(minilm.export_onnx(seq_len=seq_len))
        names = {v.name for v in graph.inputs}
        sentences = list(calibration or CALIBRATION_SENTENCES)
        feeds = [{k: v for k, v in _feeds(minilm.tokenizer, s, seq_len).items() if k in names} for s in sentences]
        bundle = lower(quantize_for_device(graph, feeds), config, model="all-MiniLM-L6-v2",
                       metadata={"seq_len": seq_len})
        return cls(bundle, host_graph(graph), minilm.tokenizer, seq_len, minilm.config.hidden_size)

    def embed(self, executor: BundleExecutor, texts: list[str]) -> tuple[np.ndarray, list]:
        """(embeddings ``(len(texts), hidden)`` float32, unit norm; the executor's stats per run).
        Sentences longer than ``seq_len`` tokens are truncated, as the tokenizer does."""
        from weft.compiler.pipeline import device_outputs, host_inputs

        out = np.zeros((len(texts), self.hidden), np.float32)
        stats = []
        for i, text in enumerate(texts):
            feeds = _feeds(self.tokenizer, text, self.seq_len)
            inputs = host_inputs(self.host, {k: v for k, v in feeds.items() if k in self.input_names}, self.bundle)
            outputs, st = executor.run(self.bundle, inputs)
            stats.append(st)
            h = next(iter(device_outputs(self.bundle, outputs).values())).astype(np.float64)
            h = h.reshape(-1, h.shape[-1])[: self.seq_len]
            mask = feeds["attention_mask"][0].astype(np.float64)[:, None]
            pooled = (h * mask).sum(axis=0) / max(mask.sum(), 1.0)
            out[i] = pooled / max(float(np.linalg.norm(pooled)), 1e-12)
        return out, stats


def _feeds(tokenizer, text: str, seq_len: int) -> dict[str, np.ndarray]:
    enc = tokenizer([text], max_length=seq_len, padding="max_length")
    ids = np.asarray(enc.input_ids, np.int64)
    return {"input_ids": ids, "attention_mask": np.asarray(enc.attention_mask, np.int64),
            "token_type_ids": np.zeros_like(ids)}


def roofline_seconds(config, macs: int, bytes_moved: int) -> float:
    """Board time of a run from its counts: max(compute at peak MACs, bytes over the bus)."""
    cycles = max(macs / config.macs_per_cycle, bytes_moved / config.bus_bytes)
    return cycles / (config.clock_mhz * 1e6)


class FpgaDevice(Device):
    """An FPGA device. ``mode="emu"``: emulated board (paced to the performance model);
    ``mode="board"``: a real or twin board behind ``executor`` (its latency is whatever the board
    takes; no pacing). With ``encoder`` (an :class:`EncoderBundle`) embeddings are computed by the
    compiled bundle on ``executor``; without, by the CPU reference model (``emu`` only)."""

    kind = "fpga"

    def __init__(self, config, *, models: ModelSet | None = None, executor: BundleExecutor | None = None,
                 mode: str = "emu", name: str | None = None, max_embed_batch: int = 32,
                 host_overhead_s: float = 0.0005, encoder: EncoderBundle | None = None) -> None:
        if mode not in ("emu", "board"):
            raise DeviceError(f"FPGA mode must be 'emu' or 'board', got {mode!r}")
        super().__init__(name or f"fpga:{mode}")
        self.config = config
        self.mode = mode
        self.executor = executor or GoldenExecutor(config)
        self.minilm = models.minilm if models is not None else None
        shape = {}
        if self.minilm is not None:
            c = self.minilm.config
            shape = dict(hidden=c.hidden_size, heads=c.num_attention_heads,
                         intermediate=c.intermediate_size, layers=c.num_hidden_layers)
        self._cost = FpgaCostModel(config, host_overhead_s=host_overhead_s, encoder=shape)
        # The board model's latency, never corrected: what pacing waits for.
        self._board = FpgaCostModel(config, host_overhead_s=host_overhead_s, encoder=shape)
        self._caps = Capabilities(
            embed_models=frozenset({"minilm"} if self.minilm is not None else ()),
            max_embed_batch=max_embed_batch)
        self.encoder = encoder
        if encoder is not None:
            self.values = f"bundle:{self.executor.name}"
        else:
            self.values = "cpu-reference" if mode == "emu" else "board"
        self.paced_s = 0.0  # total time spent waiting for the board model

    @property
    def capabilities(self) -> Capabilities:
        return self._caps

    @property
    def cost(self) -> FpgaCostModel:
        return self._cost

    def model_info(self, model: str) -> ModelInfo:
        if model == "minilm" and self.minilm is not None:
            return ModelInfo("minilm", "embed", self.minilm.max_length, dim=self.minilm.config.hidden_size,
                             tokenizer=self.minilm.tokenizer,
                             description=f"all-MiniLM-L6-v2 on {self.name} ({self.config.name}, "
                                         f"{self.config.clock_mhz:g} MHz; values: {self.values})")
        raise DeviceError(f"device {self.name} does not serve {model!r}")

    def memory(self) -> MemoryInfo:
        return MemoryInfo(0, 0)

    def describe(self) -> dict[str, Any]:
        out = {**super().describe(), "mode": self.mode, "values": self.values,
               "executor": self.executor.name, "config": self.config.name,
               "seq_len": self.encoder.seq_len if self.encoder is not None else None,
               "clock_mhz": self.config.clock_mhz}
        if getattr(self.executor, "description", None):
            out["target"] = self.executor.description
        return out

    def health(self) -> Health:
        # a twin process that exited (or a link that went away) between calls fails the device now,
        # not at its next request
        if self._health is Health.HEALTHY and getattr(self.executor, "alive", True) is False:
            self.kill("closed" if getattr(self.executor, "closed", False)
                      else f"the target is gone: {getattr(self.executor, 'description', 'driver')}")
        return super().health()

    def close(self) -> None:
        """Stop the worker thread, then release the executor's target: for ``fpga:sim`` the twin
        process is shut down (a run still going after a grace period is aborted). Idempotent;
        the scheduler's :meth:`~weft.sw.scheduler.Engine.stop` calls it for every device."""
        super().close()
        closer = getattr(self.executor, "close", None)
        if closer is not None:
            closer()

    # ------------------------------------------------------------ execution
    async def embed(self, model: str, texts):
        start = time.perf_counter()
        out = await super().embed(model, texts)
        if self.mode == "emu":
            lengths = [len(x) for x in self.minilm.tokenize(list(texts)).input_ids] if texts else [1]
            await self._pace(start, self._board.base("embed", batch=len(texts), tokens=max(lengths)))
        return out

    def _embed(self, model: str, texts: list[str]) -> np.ndarray:
        if self.encoder is not None:
            return self.encoder.embed(self.executor, texts)[0]
        if self.mode == "board":
            raise DeviceError("a board serves MiniLM through a compiled encoder: "
                              "pass encoder=EncoderBundle.compile(...)")
        return self.minilm.encode(texts, batch_size=max(1, len(texts)))

    async def run_bundle(self, bundle, inputs: Mapping[str, np.ndarray]):
        """Run a compiled bundle through the executor; in emulated mode, paced to the board time
        implied by the run's counts (:func:`roofline_seconds`)."""
        start = time.perf_counter()
        outputs, stats = await self._timed(self.executor.run, bundle, inputs)
        if self.mode == "emu" and hasattr(stats, "macs"):
            await self._pace(start, roofline_seconds(self.config, stats.macs,
                                                     stats.bytes_loaded + stats.bytes_stored))
        return outputs, stats

    async def _pace(self, start: float, board_s: float) -> None:
        remaining = board_s - (time.perf_counter() - start)
        if remaining > 0:
            self.paced_s += remaining
            await asyncio.sleep(remaining)
            self.busy_s += remaining
        self._check()
