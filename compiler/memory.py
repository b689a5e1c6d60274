"""Device-memory planning: a bump allocator that records the memory map."""

from __future__ import annotations

from weft.hw.bundle import Region
from weft.hw.config import AcceleratorConfig

__all__ = ["DeviceMemoryPlan", "OutOfDeviceMemory", "ALIGN"]

#: Every region starts on this boundary: a whole number of bus beats for any allowed bus
#: width, so DMA bursts of different tensors never share a beat.
ALIGN = 128


class OutOfDeviceMemory(ValueError):
    pass


class DeviceMemoryPlan:
    """Hands out aligned, non-overlapping device-memory regions in order."""

    def __init__(self, config: AcceleratorConfig, base: int = 0):
        self.config = config
        self.top = base
        self.regions: list[Region] = []

    def allocate(self, name: str, size: int, kind: str) -> int:
        address = -(-self.top // ALIGN) * ALIGN
        end = address + max(size, 1)
        if end > self.config.device_memory_bytes:
            raise OutOfDeviceMemory(
                f"region {name!r} ({size} bytes) does not fit: device memory of configuration "
                f"{self.config.name!r} is {self.config.device_memory_bytes} bytes, {address} already used "
                f"(short by {end - self.config.device_memory_bytes} bytes)")
        self.regions.append(Region(name, address, size, kind))
        self.top = end
        return address
