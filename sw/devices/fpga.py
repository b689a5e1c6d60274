"""FPGA devices.

Two parts, kept apart so the compiled path drops in when it lands:

* an **executor** runs a program bundle: ``run(bundle, inputs) -> (outputs, stats)``.
  :class:`GoldenExecutor` uses the bit-exact model (``weft.sim.golden.run_bundle``);
  :class:`DriverExecutor` uses the device driver API (``weft.sw.driver``: the Verilator twin
  or a board, whichever transport it was opened on).
* :class:`FpgaDevice` serves requests with it, **paced** (emulated-board mode) to the board's
  latency from the compiler's performance model at the configuration's clock: a call returns no
  earlier than the model says the board would.

What ``fpga:emu`` is today: MiniLM bundles for the accelerator are still being built, so the
emulated board computes embedding *values* with the CPU reference model (``values="cpu-reference"``,
reported by :meth:`FpgaDevice.describe` and ``/health``) and *paces* each batch to
:class:`~weft.sw.devices.cost.FpgaCostModel` (the MiniLM GEMMs on the configuration, at
``clock_mhz``). Its latencies are the board's predicted ones; its values are not yet the int8
accelerator's. :meth:`FpgaDevice.run_bundle` already runs real bundles through the executor,
paced the same way.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from .base import Capabilities, Device, DeviceError, MemoryInfo, ModelInfo
from .cost import FpgaCostModel
from .models import ModelSet

__all__ = ["BundleExecutor", "GoldenExecutor", "DriverExecutor", "FpgaDevice", "roofline_seconds"]


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
    (twin or board); returns the outputs and the performance counters."""

    name = "driver"

    def __init__(self, driver_device) -> None:
        self.device = driver_device

    def run(self, bundle, inputs):
        outputs = self.device.run(inputs, bundle=bundle)
        return outputs, self.device.counters()


def roofline_seconds(config, macs: int, bytes_moved: int) -> float:
    """Board time of a run from its counts: max(compute at peak MACs, bytes over the bus)."""
    cycles = max(macs / config.macs_per_cycle, bytes_moved / config.bus_bytes)
    return cycles / (config.clock_mhz * 1e6)


class FpgaDevice(Device):
    """An FPGA device. ``mode="emu"``: emulated board (values computed on the host, paced to the
    performance model); ``mode="board"``: a real or twin board behind ``executor`` (its latency
    is whatever the board takes; no pacing)."""

    kind = "fpga"

    def __init__(self, config, *, models: ModelSet | None = None, executor: BundleExecutor | None = None,
                 mode: str = "emu", name: str | None = None, max_embed_batch: int = 32,
                 host_overhead_s: float = 0.0005) -> None:
        if mode not in ("emu", "board"):
            raise DeviceError(f"FPGA mode must be 'emu' or 'board', got {mode!r}")
        super().__init__(name or f"fpga:{mode}")
        self.config = config
        self.mode = mode
        self.executor = executor or GoldenExecutor(config)
        self.minilm = models.minilm if models is not None else None
        encoder = {}
        if self.minilm is not None:
            c = self.minilm.config
            encoder = dict(hidden=c.hidden_size, heads=c.num_attention_heads,
                           intermediate=c.intermediate_size, layers=c.num_hidden_layers)
        self._cost = FpgaCostModel(config, host_overhead_s=host_overhead_s, encoder=encoder)
        # The board model's latency, never corrected: what pacing waits for.
        self._board = FpgaCostModel(config, host_overhead_s=host_overhead_s, encoder=encoder)
        self._caps = Capabilities(
            embed_models=frozenset({"minilm"} if self.minilm is not None else ()),
            max_embed_batch=max_embed_batch)
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
        return {**super().describe(), "mode": self.mode, "values": self.values,
                "executor": self.executor.name, "config": self.config.name,
                "clock_mhz": self.config.clock_mhz}

    # ------------------------------------------------------------ execution
    async def embed(self, model: str, texts):
        start = time.perf_counter()
        out = await super().embed(model, texts)
        if self.mode == "emu":
            lengths = [len(x) for x in self.minilm.tokenize(list(texts)).input_ids] if texts else [1]
            await self._pace(start, self._board.base("embed", batch=len(texts), tokens=max(lengths)))
        return out

    def _embed(self, model: str, texts: list[str]) -> np.ndarray:
        if self.mode == "board":
            raise DeviceError("MiniLM bundles for the accelerator are not built yet; "
                              "use fpga:emu (host values, board-paced)")
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
