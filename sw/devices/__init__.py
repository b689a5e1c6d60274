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
``cpu``            PyTorch reference models on the host
``gpu``            the same on CUDA (``gpu:1`` for another GPU); an error without one
``null``           returns at once (server overhead measurements)
=================  ==========================================================================
"""

from __future__ import annotations

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
                 **torch_kw) -> list[Device]:
    """Devices from a comma-separated list (see the module doc)."""
    devices: list[Device] = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        kind, _, rest = item.partition(":")
        if kind == "fpga":
            mode, _, cfg_name = rest.partition("@")
            from weft.hw.config import load_config

            if mode not in ("", "emu", "golden"):
                raise DeviceError(f"device {item!r}: FPGA devices are fpga:emu or fpga:golden")
            config = load_config(cfg_name or "default")
            encoder = None
            if mode == "golden" and models.minilm is not None:
                encoder = EncoderBundle.compile(models.minilm, config, seq_len=min(seq_len, models.minilm.max_length))
            devices.append(FpgaDevice(config, models=models, mode="emu", encoder=encoder,
                                      name=f"fpga:{mode or 'emu'}"))
        elif kind == "cpu":
            devices.append(TorchDevice(models, "cpu", name=item, profile=profile, **torch_kw))
        elif kind == "gpu":
            if not cuda_available():
                raise DeviceError(f"device {item!r}: no CUDA GPU is available on this machine")
            devices.append(TorchDevice(models, f"cuda:{rest or 0}", name=item, profile=profile, **torch_kw))
        elif kind == "null":
            devices.append(NullDevice(item, tokenizer=models.smollm2_tokenizer))
        else:
            raise DeviceError(f"unknown device {item!r}; expected fpga:emu, fpga:golden, cpu, gpu or null")
    names = [d.name for d in devices]
    if len(set(names)) != len(names):
        raise DeviceError(f"duplicate device names in {spec!r}")
    if not devices:
        raise DeviceError("no devices given")
    return devices
