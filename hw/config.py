"""Accelerator configuration: the one description every part of weft reads.

A configuration is a frozen :class:`AcceleratorConfig` loaded from YAML and validated
field by field. The generator, compiler, performance model, bit-exact model and driver
all take the same object; its :attr:`~AcceleratorConfig.hash` travels with every
compiled bundle and is readable from the hardware's registers.

Derived geometry (all in one place so nobody recomputes it differently):

* the scratchpad holds int8 rows of :attr:`~AcceleratorConfig.sp_row_elems` elements
  (``max(rows, cols)``), :attr:`~AcceleratorConfig.sp_rows` of them;
* the accumulator holds int32 rows of ``cols`` elements, :attr:`~AcceleratorConfig.acc_rows`
  of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "SCHEMA_VERSION",
    "ConfigError",
    "ArrayConfig",
    "MemoryConfig",
    "VectorConfig",
    "BusConfig",
    "QueueConfig",
    "DeviceMemoryConfig",
    "TargetConfig",
    "AcceleratorConfig",
    "load_config",
    "builtin_config_names",
]

#: Version of the YAML schema this module reads. Bumped when a field changes meaning.
SCHEMA_VERSION = 1

#: Element widths in bytes. Only int8 operands and int32 accumulation exist today.
INPUT_BYTES = 1
ACC_BYTES = 4

#: 18x18 hard multipliers the row engine needs per accumulator-row element: it evaluates
#: every function in parallel, with products up to 66 x 16 bits that take several blocks
#: each. Counted from its netlist (``weft.boards.synth.count_hard_multipliers``; a test
#: keeps this number equal to that count).
ROW_ENGINE_MULTIPLIERS_PER_ELEMENT = 74


class ConfigError(ValueError):
    """A configuration that breaks a rule. The message names the field and the rule."""

    def __init__(self, path: str, message: str):
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


def _is_pow2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


@dataclass(frozen=True)
class ArrayConfig:
    """Systolic array shape. ``rows`` is the reduction (K) depth, ``cols`` the output width (N)."""

    rows: int
    cols: int


@dataclass(frozen=True)
class MemoryConfig:
    """An on-chip memory: total capacity in KiB and the number of banks."""

    kib: int
    banks: int


@dataclass(frozen=True)
class VectorConfig:
    """Vector unit: requantizer elements per cycle, and whether the row engine is built.

    The row engine (VBIN / VMAP / VROW: residual adds, GELU, SiLU, softmax, norms, rotary
    embeddings) computes a whole accumulator row per cycle with every function in
    parallel; it needs far more multipliers than a small FPGA has, so a configuration for
    one can leave it out (``row_engine: false``): such a core runs GEMM + REQUANT
    programs only, and the bit-exact model and the compiler refuse vector-row
    instructions for it.
    """

    lanes: int
    row_engine: bool = True


@dataclass(frozen=True)
class BusConfig:
    """AXI4 master data width and address width, in bits."""

    data_bits: int
    addr_bits: int = 32


@dataclass(frozen=True)
class QueueConfig:
    """Instruction queues between dispatch and the load/matmul/vector/store units.

    ``depth`` is each queue's FIFO depth; ``token_max`` the most tokens one
    (producer, consumer) pair can hold before the producer stalls.
    """

    depth: int = 8
    token_max: int = 15


@dataclass(frozen=True)
class DeviceMemoryConfig:
    """Device (off-core) memory reachable by the DMA, in MiB."""

    mib: int


@dataclass(frozen=True)
class TargetConfig:
    """Physical limits of the part this configuration is meant for (optional)."""

    part: str = ""
    max_multipliers: int = 0  # 0: no limit checked


@dataclass(frozen=True)
class AcceleratorConfig:
    """A validated accelerator description. Build with :func:`load_config` or :meth:`from_dict`."""

    name: str
    array: ArrayConfig
    scratchpad: MemoryConfig
    accumulator: MemoryConfig
    vector: VectorConfig
    bus: BusConfig
    device_memory: DeviceMemoryConfig
    clock_mhz: float
    queues: QueueConfig = field(default_factory=QueueConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    description: str = ""
    dtypes: tuple[tuple[str, str], ...] = (
        ("input", "int8"),
        ("weight", "int8"),
        ("accumulator", "int32"),
    )
    schema: int = SCHEMA_VERSION

    # ------------------------------------------------------------------ geometry
    @property
    def sp_row_elems(self) -> int:
        """int8 elements in one scratchpad row (holds one A row or one B row of a tile)."""
        return max(self.array.rows, self.array.cols)

    @property
    def sp_row_bytes(self) -> int:
        return self.sp_row_elems * INPUT_BYTES

    @property
    def sp_rows(self) -> int:
        return self.scratchpad.kib * 1024 // self.sp_row_bytes

    @property
    def acc_row_elems(self) -> int:
        """int32 elements in one accumulator row (one output row of a tile)."""
        return self.array.cols

    @property
    def acc_row_bytes(self) -> int:
        return self.acc_row_elems * ACC_BYTES

    @property
    def acc_rows(self) -> int:
        return self.accumulator.kib * 1024 // self.acc_row_bytes

    @property
    def bus_bytes(self) -> int:
        return self.bus.data_bits // 8

    @property
    def device_memory_bytes(self) -> int:
        return self.device_memory.mib * 1024 * 1024

    @property
    def macs_per_cycle(self) -> int:
        return self.array.rows * self.array.cols

    def estimated_multipliers(self) -> int:
        """Hard multipliers the generated core needs: one per PE, two per vector lane
        (the requantizer's 32x16 product) and, with the row engine, its per-element products
        (:data:`ROW_ENGINE_MULTIPLIERS_PER_ELEMENT` for each accumulator-row element)."""
        row_engine = ROW_ENGINE_MULTIPLIERS_PER_ELEMENT * self.acc_row_elems if self.vector.row_engine else 0
        return self.array.rows * self.array.cols + 2 * self.vector.lanes + row_engine

    # ------------------------------------------------------------------ identity
    def to_dict(self) -> dict[str, Any]:
        """The configuration as plain data, in the YAML schema's shape."""
        out = dataclasses.asdict(self)
        out["dtypes"] = dict(self.dtypes)
        return out

    def _hashed_content(self) -> dict[str, Any]:
        content = self.to_dict()
        # Names and prose do not change the machine: two files that differ only there
        # describe the same hardware and accept the same programs.
        content.pop("name")
        content.pop("description")
        return content

    @property
    def hash(self) -> str:
        """SHA-256 (hex) of the canonical content; independent of formatting, key order and name."""
        canonical = json.dumps(self._hashed_content(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def hash32(self) -> int:
        """First 32 bits of :attr:`hash`: the value the hardware's CONFIG_HASH register holds."""
        return int(self.hash[:8], 16)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dict(cls, data: Any, *, source: str = "") -> "AcceleratorConfig":
        """Validate ``data`` (as read from YAML) and build the configuration."""
        return _parse(data, source)

    def validate(self) -> None:
        """Check the rules that relate fields to each other; raise :class:`ConfigError`."""
        _check_rules(self)


# ---------------------------------------------------------------------- parsing
_SECTIONS: dict[str, type] = {
    "array": ArrayConfig,
    "scratchpad": MemoryConfig,
    "accumulator": MemoryConfig,
    "vector": VectorConfig,
    "bus": BusConfig,
    "queues": QueueConfig,
    "device_memory": DeviceMemoryConfig,
    "target": TargetConfig,
}
_SCALARS: dict[str, tuple[type, ...]] = {
    "name": (str,),
    "description": (str,),
    "clock_mhz": (int, float),
    "schema": (int,),
}
_SUPPORTED_DTYPES = {"input": "int8", "weight": "int8", "accumulator": "int32"}


def _type_name(types: tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in types)


def _check_type(path: str, value: Any, types: tuple[type, ...]) -> Any:
    # bool is an int in Python; a YAML `true` where a number belongs is a mistake.
    if (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
        raise ConfigError(path, f"expected {_type_name(types)}, got {type(value).__name__} {value!r}")
    return value


def _parse_section(path: str, data: Any, cls: type) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(path, f"expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(f"{path}.{key}", f"unknown key (allowed: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING:
                raise ConfigError(f"{path}.{name}", "required key is missing")
            continue
        expected = {"int": (int,), "str": (str,), "bool": (bool,)}[f.type] if isinstance(f.type, str) else (f.type,)
        kwargs[name] = _check_type(f"{path}.{name}", data[name], expected)
    return cls(**kwargs)


def _parse(data: Any, source: str) -> AcceleratorConfig:
    prefix = f"{source}: " if source else ""
    if not isinstance(data, dict):
        raise ConfigError("", f"{prefix}configuration must be a mapping, got {type(data).__name__}")
    allowed = set(_SECTIONS) | set(_SCALARS) | {"dtypes"}
    for key in data:
        if key not in allowed:
            raise ConfigError(key, f"unknown key (allowed: {', '.join(sorted(allowed))})")
    schema = data.get("schema", SCHEMA_VERSION)
    _check_type("schema", schema, (int,))
    if schema != SCHEMA_VERSION:
        raise ConfigError("schema", f"version {schema} is not supported (this weft reads {SCHEMA_VERSION})")
    kwargs: dict[str, Any] = {"schema": schema}
    for key in ("name", "clock_mhz"):
        if key not in data:
            raise ConfigError(key, "required key is missing")
    kwargs["name"] = _check_type("name", data["name"], _SCALARS["name"])
    kwargs["description"] = _check_type("description", data.get("description", ""), _SCALARS["description"])
    kwargs["clock_mhz"] = float(_check_type("clock_mhz", data["clock_mhz"], _SCALARS["clock_mhz"]))
    for key, cls in _SECTIONS.items():
        if key in data:
            kwargs[key] = _parse_section(key, data[key], cls)
        elif key not in ("queues", "target"):
            raise ConfigError(key, "required section is missing")
    dtypes = data.get("dtypes", _SUPPORTED_DTYPES)
    if not isinstance(dtypes, dict):
        raise ConfigError("dtypes", f"expected a mapping, got {type(dtypes).__name__}")
    for key, value in dtypes.items():
        if key not in _SUPPORTED_DTYPES:
            raise ConfigError(f"dtypes.{key}", f"unknown key (allowed: {', '.join(_SUPPORTED_DTYPES)})")
        if value != _SUPPORTED_DTYPES[key]:
            raise ConfigError(f"dtypes.{key}", f"{value!r} is not supported (only {_SUPPORTED_DTYPES[key]})")
    kwargs["dtypes"] = tuple(_SUPPORTED_DTYPES.items())
    config = AcceleratorConfig(**kwargs)
    _check_rules(config)
    return config


# ---------------------------------------------------------------------- rules
ARRAY_DIM_RANGE = (2, 64)
BUS_BITS_RANGE = (32, 1024)
LANES_RANGE = (1, 64)
QUEUE_DEPTH_RANGE = (2, 64)
TOKEN_MAX_RANGE = (1, 255)


def _check_range(path: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ConfigError(path, f"{value} is outside the allowed range [{lo}, {hi}]")


def _check_rules(c: AcceleratorConfig) -> None:
    for dim in ("rows", "cols"):
        _check_range(f"array.{dim}", getattr(c.array, dim), *ARRAY_DIM_RANGE)
    _check_range("vector.lanes", c.vector.lanes, *LANES_RANGE)
    if c.array.cols % c.vector.lanes:
        raise ConfigError("vector.lanes", f"{c.vector.lanes} must divide array.cols ({c.array.cols}) "
                          "so an accumulator row is a whole number of vector beats")
    _check_range("bus.data_bits", c.bus.data_bits, *BUS_BITS_RANGE)
    if not _is_pow2(c.bus.data_bits):
        raise ConfigError("bus.data_bits", f"{c.bus.data_bits} is not a power of two")
    if c.bus.addr_bits not in (32, 64):
        raise ConfigError("bus.addr_bits", f"{c.bus.addr_bits} is not 32 or 64")
    if c.clock_mhz <= 0 or c.clock_mhz > 1000:
        raise ConfigError("clock_mhz", f"{c.clock_mhz} is outside (0, 1000]")
    _check_range("queues.depth", c.queues.depth, *QUEUE_DEPTH_RANGE)
    _check_range("queues.token_max", c.queues.token_max, *TOKEN_MAX_RANGE)
    for mem in ("scratchpad", "accumulator"):
        m: MemoryConfig = getattr(c, mem)
        if m.kib <= 0:
            raise ConfigError(f"{mem}.kib", f"{m.kib} must be positive")
        if not _is_pow2(m.banks) or m.banks > 32:
            raise ConfigError(f"{mem}.banks", f"{m.banks} must be a power of two no larger than 32")
    # One double-buffered tile: two A tiles (rows x K-slice) and two B tiles in the
    # scratchpad, two output tiles plus the requantization parameter rows in the accumulator.
    sp_need = 4 * c.sp_row_elems
    if c.sp_rows < sp_need:
        need_kib = -(-sp_need * c.sp_row_bytes // 1024)
        raise ConfigError("scratchpad.kib", f"{c.scratchpad.kib} KiB holds {c.sp_rows} rows; one double-"
                          f"buffered tile needs {sp_need} rows ({need_kib} KiB)")
    acc_need = 2 * c.array.rows + 2
    if c.acc_rows < acc_need:
        need_kib = -(-acc_need * c.acc_row_bytes // 1024)
        raise ConfigError("accumulator.kib", f"{c.accumulator.kib} KiB holds {c.acc_rows} rows; one double-"
                          f"buffered tile needs {acc_need} rows ({need_kib} KiB)")
    for mem, rows in (("scratchpad", c.sp_rows), ("accumulator", c.acc_rows)):
        banks = getattr(c, mem).banks
        if rows % banks:
            raise ConfigError(f"{mem}.banks", f"{banks} banks do not divide {rows} rows")
    if c.sp_rows > 1 << 20 or c.acc_rows > 1 << 20:
        raise ConfigError("scratchpad.kib", "on-chip memories are limited to 2^20 rows (the ISA's address field)")
    if c.device_memory.mib <= 0 or c.device_memory_bytes > (1 << c.bus.addr_bits):
        raise ConfigError("device_memory.mib", f"{c.device_memory.mib} MiB does not fit a "
                          f"{c.bus.addr_bits}-bit address space")
    if c.device_memory_bytes > 1 << 32:
        raise ConfigError("device_memory.mib", "the ISA addresses at most 4096 MiB of device memory")
    if c.target.max_multipliers and c.estimated_multipliers() > c.target.max_multipliers:
        raise ConfigError("array", f"needs {c.estimated_multipliers()} multipliers "
                          f"({c.array.rows}x{c.array.cols} PEs + 2 per vector lane"
                          + (f" + {ROW_ENGINE_MULTIPLIERS_PER_ELEMENT} per row-engine element" if c.vector.row_engine else "")
                          + "), but "
                          f"target {c.target.part or '(unnamed)'} has {c.target.max_multipliers}")


# ---------------------------------------------------------------------- files
def builtin_config_names() -> list[str]:
    """Names of the configurations shipped with weft (``hw/configs/*.yaml``)."""
    folder = resources.files("weft.hw") / "configs"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_config(name_or_path: str | Path) -> AcceleratorConfig:
    """Load a built-in configuration by name (``tiny``, ``default``, ``ulx3s``) or a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError("", f"configuration file {path} does not exist")
        text, source = path.read_text(), str(path)
    else:
        names = builtin_config_names()
        if str(name_or_path) not in names:
            raise ConfigError("", f"no built-in configuration {str(name_or_path)!r} (built-in: {', '.join(names)})")
        text = (resources.files("weft.hw") / "configs" / f"{name_or_path}.yaml").read_text()
        source = f"built-in {name_or_path}"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{source}: not valid YAML: {exc}") from None
    return AcceleratorConfig.from_dict(data, source=source)
