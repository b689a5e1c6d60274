"""Runtime devices: FPGA (driver API / emulated board), CPU and GPU (PyTorch reference models),
simulated and null devices; each with a cost model the scheduler compares.

``make_devices("fpga:emu,cpu,gpu", models)`` builds them from a ``--devices`` string:

=================  ==========================================================================
``fpga:emu``       emulated board: MiniLM embeddings, values from the CPU reference model,
                   latency paced to the compiler's performance model (``fpga:emu@ulx3s`` picks
                   the configuration; default ``default``)
``fpga:golden``    the same board, but the values come from MiniLM compiled to an int8 bundle
                   for the configuration and run on the bit-exact model (compiled at start-up,
                   sequence length ``seq_len``, 32 by default)
``fpga:sim``       the same bundle run through the RTL: a Verilator twin of the core for the
                   configuration (``fpga:sim@tiny``; built once, cached under ``.cache/twin``)
                   launched at start-up and opened through the driver API; every embedding is
                   a run on the twin (``values="bundle:driver"``, bit-exact, no pacing: as slow
                   as the simulation). Closing the device (server shutdown) stops the twin.
                   Without MiniLM in ``models`` no twin is launched (nothing would run on it)
``cpu``            PyTorch reference models on the host
``gpu``            the same on CUDA (``gpu:1`` for another GPU); an error without one
``null``           returns at once (server overhead measurements)
=================  ==========================================================================
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .base import (Capabilities, Device, DeviceError, DeviceFailure, Health, MemoryInfo, ModelInfo, Seq,
                   sample_token)
from .cost import CostModel, FpgaCostModel, LinearCostModel
from .fpga import DriverExecutor, EncoderBundle, FpgaDevice, GoldenExecutor
from .models import MODEL_NAMES, ModelSet, canonical_model
from .remote import RayDevice, make_ray_devices, ray_available
from .sim import NullDevice, SimDevice
from .torch_device import TorchDevice, cuda_available

__all__ = [
    "Capabilities", "Device", "DeviceError", "DeviceFailure", "Health", "MemoryInfo", "ModelInfo", "Seq",
    "sample_token", "CostModel", "FpgaCostModel", "LinearCostModel", "DriverExecutor", "EncoderBundle", "FpgaDevice",
    "GoldenExecutor", "MODEL_NAMES", "ModelSet", "canonical_model", "NullDevice", "RayDevice", "SimDevice",
    "TorchDevice", "cuda_available", "make_devices", "make_ray_devices", "ray_available",
]


def make_devices(spec: str, models: ModelSet, *, profile: bool = True, seq_len: int = 32,
                 progress: Callable[[str], None] | None = None, **torch_kw) -> list[Device]:
    """Devices from a comma-separated list (see the module doc). On an error the devices already
    built are closed (a launched twin is stopped) before it is raised. ``progress`` gets a line
    as each device starts to build and when it is ready (compiling MiniLM, launching a twin and
    profiling a CPU take from seconds to minutes)."""
    devices: list[Device] = []
    say = progress or (lambda line: None)
    try:
        for item in [s.strip() for s in spec.split(",") if s.strip()]:
            start = time.perf_counter()
            devices.append(_make_device(item, models, profile=profile, seq_len=seq_len, say=say, **torch_kw))
            say(f"device {item} ready in {time.perf_counter() - start:.1f} s")
        names = [d.name for d in devices]
        if len(set(names)) != len(names):
            raise DeviceError(f"duplicate device names in {spec!r}")
        if not devices:
            raise DeviceError("no devices given")
    except BaseException:
        for d in devices:
            d.close()
        raise
    return devices


def _make_device(item: str, models: ModelSet, *, profile: bool, seq_len: int, say: Callable[[str], None],
                 **torch_kw) -> Device:
    kind, _, rest = item.partition(":")
    if kind == "fpga":
        mode, _, cfg_name = rest.partition("@")
        from weft.hw.config import ConfigError, load_config

        if mode not in ("", "emu", "golden", "sim"):
            raise DeviceError(f"device {item!r}: FPGA devices are fpga:emu, fpga:golden or fpga:sim")
        try:
            config = load_config(cfg_name or "default")
        except (ConfigError, OSError) as exc:
            raise DeviceError(f"device {item!r}: {exc}") from None
        name = f"fpga:{mode or 'emu'}"
        encoder = None
        if mode in ("golden", "sim") and models.minilm is not None:
            say(f"device {item}: compiling MiniLM for {config.name!r} ...")
            encoder = EncoderBundle.compile(models.minilm, config, seq_len=min(seq_len, models.minilm.max_length))
        if mode == "sim" and encoder is not None:
            say(f"device {item}: launching the twin of the {config.name!r} core (built once, then cached) ...")
            executor = DriverExecutor.launch_twin(config)
            return FpgaDevice(config, models=models, mode="board", executor=executor, encoder=encoder, name=name)
        return FpgaDevice(config, models=models, mode="emu", encoder=encoder, name=name)
    if kind == "cpu":
        if profile:
            say(f"device {item}: profiling the models (cached on disk after the first start) ...")
        return TorchDevice(models, "cpu", name=item, profile=profile, **torch_kw)
    if kind == "gpu":
        if not cuda_available():
            raise DeviceError(f"device {item!r}: no CUDA GPU is available on this machine")
        return TorchDevice(models, f"cuda:{rest or 0}", name=item, profile=profile, **torch_kw)
    if kind == "null":
        return NullDevice(item, tokenizer=models.smollm2_tokenizer)
    raise DeviceError(f"unknown device {item!r}; expected fpga:emu, fpga:golden, fpga:sim, cpu, gpu or null")
