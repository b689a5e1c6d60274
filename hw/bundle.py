"""Program bundle: the one file format every executor reads.

The compiler writes a bundle; the bit-exact model, the simulated accelerator and a board
read it. Layout (all integers little-endian)::

    offset  size  content
    0       8     magic b"WEFTBNDL"
    8       2     format major version
    10      2     format minor version
    12      4     flags (0)
    16      8     manifest length L (bytes of UTF-8 JSON)
    24      8     payload length P
    32      L     manifest (JSON)
    32+L    P     payload: the instruction stream and constant segments, each at the
                  offset the manifest gives, relative to the payload start
    32+L+P  32    SHA-256 of every byte before it

The manifest holds the configuration's name and hash, where the program and each
constant segment go in device memory, the input and output tensors (name, shape, dtype,
address, byte strides, quantization), the memory map and free-form metadata. A reader
refuses a truncated file, a checksum mismatch, an unknown major version and, when given
the device's configuration, a bundle built for another configuration.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .config import AcceleratorConfig
from .isa import INSTR_BYTES, Instruction, IsaError, decode_program, encode_program

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "BundleError",
    "TruncatedBundleError",
    "ChecksumError",
    "VersionError",
    "ConfigMismatchError",
    "TensorSpec",
    "Segment",
    "Region",
    "Bundle",
    "read_bundle",
]

MAGIC = b"WEFTBNDL"
FORMAT_VERSION = (1, 0)
_HEADER = struct.Struct("<8sHHIQQ")
_DIGEST_BYTES = 32
_DTYPES = {"int8": np.int8, "int32": np.int32, "uint8": np.uint8}


class BundleError(ValueError):
    """A bundle that cannot be read or does not belong to this device."""


class TruncatedBundleError(BundleError):
    pass


class ChecksumError(BundleError):
    pass


class VersionError(BundleError):
    pass


class ConfigMismatchError(BundleError):
    pass


@dataclass(frozen=True)
class TensorSpec:
    """Where a tensor lives in device memory and how to convert it to real numbers.

    ``strides`` are in bytes, one per dimension (row-major when built with :meth:`dense`).
    Real value = ``scale * (q - zero_point)``; ``scale`` None means the tensor is raw integers.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    address: int
    strides: tuple[int, ...]
    scale: float | None = None
    zero_point: int = 0

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))
        if self.dtype not in _DTYPES:
            raise BundleError(f"tensor {self.name!r}: unsupported dtype {self.dtype!r} (supported: {', '.join(_DTYPES)})")
        if len(self.strides) != len(self.shape):
            raise BundleError(f"tensor {self.name!r}: {len(self.shape)} dimensions but {len(self.strides)} strides")
        if any(d < 0 for d in self.shape) or self.address < 0 or any(s < 0 for s in self.strides):
            raise BundleError(f"tensor {self.name!r}: negative shape, stride or address")

    @classmethod
    def dense(cls, name: str, shape: Iterable[int], dtype: str, address: int, **quant) -> "TensorSpec":
        shape = tuple(int(d) for d in shape)
        item = np.dtype(_DTYPES[dtype]).itemsize
        strides, step = [], item
        for d in reversed(shape):
            strides.append(step)
            step *= max(d, 1)
        return cls(name, shape, dtype, address, tuple(reversed(strides)), **quant)

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(_DTYPES[self.dtype]).newbyteorder("<")

    @property
    def itemsize(self) -> int:
        return self.np_dtype.itemsize

    @property
    def span(self) -> int:
        """Bytes from the first to one past the last element."""
        if not self.shape or 0 in self.shape:
            return self.itemsize if not self.shape else 0
        return sum((d - 1) * s for d, s in zip(self.shape, self.strides)) + self.itemsize

    def _byte_offsets(self) -> np.ndarray:
        offsets = np.zeros(self.shape, dtype=np.int64)
        for axis, (d, s) in enumerate(zip(self.shape, self.strides)):
            index = [None] * len(self.shape)
            index[axis] = slice(None)
            offsets = offsets + (np.arange(d, dtype=np.int64) * s)[tuple(index)]
        return offsets

    def write_to(self, memory: np.ndarray, value: np.ndarray) -> None:
        """Store ``value`` (already of this dtype and shape) into a uint8 memory image."""
        value = np.asarray(value)
        if value.shape != self.shape:
            raise BundleError(f"tensor {self.name!r}: expected shape {self.shape}, got {value.shape}")
        if value.dtype != self.np_dtype:
            raise BundleError(f"tensor {self.name!r}: expected dtype {self.dtype}, got {value.dtype}")
        self._check_bounds(memory)
        raw = np.ascontiguousarray(value).view(np.uint8).reshape(*self.shape, self.itemsize)
        index = self._byte_offsets()[..., None] + np.arange(self.itemsize) + self.address
        memory[index] = raw

    def read_from(self, memory: np.ndarray) -> np.ndarray:
        """Read this tensor out of a uint8 memory image."""
        self._check_bounds(memory)
        index = self._byte_offsets()[..., None] + np.arange(self.itemsize) + self.address
        raw = np.ascontiguousarray(memory[index])
        return raw.view(self.np_dtype).reshape(self.shape)

    def _check_bounds(self, memory: np.ndarray) -> None:
        if self.address + self.span > memory.size:
            raise BundleError(f"tensor {self.name!r} at 0x{self.address:x} (+{self.span} bytes) lies outside "
                              f"device memory of {memory.size} bytes")

    def stored(self, value: np.ndarray) -> np.ndarray:
        """A user's value as this tensor's stored integers: floats are quantized with the
        tensor's scale; integers are range-checked and cast."""
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.floating):
            return self.quantize(value)
        if value.dtype != self.np_dtype:
            info = np.iinfo(self.np_dtype)
            if value.size and (value.min() < info.min or value.max() > info.max):
                raise BundleError(f"tensor {self.name!r}: values outside {self.dtype}")
            value = value.astype(self.np_dtype)
        return value

    def quantize(self, real: np.ndarray) -> np.ndarray:
        """Real values to this tensor's integers: round half to even, saturate."""
        if self.scale is None:
            raise BundleError(f"tensor {self.name!r} has no quantization scale")
        info = np.iinfo(self.np_dtype)
        q = np.rint(np.asarray(real, dtype=np.float64) / self.scale) + self.zero_point
        return np.clip(q, info.min, info.max).astype(self.np_dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        if self.scale is None:
            raise BundleError(f"tensor {self.name!r} has no quantization scale")
        return (np.asarray(q, dtype=np.float64) - self.zero_point) * self.scale

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "address": self.address,
                "strides": list(self.strides), "scale": self.scale, "zero_point": self.zero_point}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TensorSpec":
        return cls(data["name"], tuple(data["shape"]), data["dtype"], int(data["address"]), tuple(data["strides"]),
                   data.get("scale"), int(data.get("zero_point", 0)))


@dataclass(frozen=True)
class Segment:
    """Constant bytes (weights, tables, parameters) loaded to ``address`` before the program runs."""

    name: str
    address: int
    data: bytes


@dataclass(frozen=True)
class Region:
    """One entry of the memory map: a named, typed address range."""

    name: str
    address: int
    size: int
    kind: str  # program | constant | input | output | scratch


@dataclass
class Bundle:
    """An in-memory program bundle. :meth:`to_bytes` / :func:`read_bundle` convert it."""

    config_name: str
    config_hash: str
    program: list[Instruction]
    program_address: int
    segments: list[Segment] = field(default_factory=list)
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    format_version: tuple[int, int] = FORMAT_VERSION

    @classmethod
    def for_config(cls, config: AcceleratorConfig, **kwargs) -> "Bundle":
        return cls(config_name=config.name, config_hash=config.hash, **kwargs)

    def check_config(self, config: AcceleratorConfig) -> None:
        """Refuse to run on a device whose configuration differs from the one compiled for."""
        if self.config_hash != config.hash:
            raise ConfigMismatchError(
                f"bundle was built for configuration {self.config_name!r} (hash {self.config_hash[:16]}), "
                f"but the device is {config.name!r} (hash {config.hash[:16]}); recompile for {config.name!r}")

    def input(self, name: str) -> TensorSpec:
        return _find(self.inputs, name, "input")

    def output(self, name: str) -> TensorSpec:
        return _find(self.outputs, name, "output")

    @property
    def program_bytes(self) -> bytes:
        return encode_program(self.program)

    def memory_top(self) -> int:
        """One past the highest device-memory byte the bundle uses."""
        tops = [self.program_address + len(self.program) * INSTR_BYTES]
        tops += [s.address + len(s.data) for s in self.segments]
        tops += [t.address + t.span for t in (*self.inputs, *self.outputs)]
        tops += [r.address + r.size for r in self.regions]
        return max(tops)

    # ------------------------------------------------------------------ serialise
    def to_bytes(self) -> bytes:
        chunks: list[bytes] = []
        offset = 0

        def place(data: bytes) -> dict[str, Any]:
            nonlocal offset
            entry = {"offset": offset, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            chunks.append(data)
            offset += len(data)
            return entry

        program = self.program_bytes
        manifest = {
            "format": list(self.format_version),
            "config": {"name": self.config_name, "hash": self.config_hash},
            "program": {"address": self.program_address, "count": len(self.program), **place(program)},
            "segments": [{"name": s.name, "address": s.address, **place(s.data)} for s in self.segments],
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "regions": [{"name": r.name, "address": r.address, "size": r.size, "kind": r.kind} for r in self.regions],
            "metadata": self.metadata,
        }
        manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
        payload = b"".join(chunks)
        header = _HEADER.pack(MAGIC, *self.format_version, 0, len(manifest_bytes), len(payload))
        body = header + manifest_bytes + payload
        return body + hashlib.sha256(body).digest()

    def write(self, path: str | Path) -> None:
        Path(path).write_bytes(self.to_bytes())

    @classmethod
    def from_bytes(cls, data: bytes, *, config: AcceleratorConfig | None = None, source: str = "bundle") -> "Bundle":
        if len(data) < _HEADER.size:
            raise TruncatedBundleError(f"{source}: truncated: {len(data)} bytes is shorter than the {_HEADER.size}-byte header")
        magic, major, minor, _flags, manifest_len, payload_len = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise BundleError(f"{source}: not a weft bundle (bad magic {magic!r})")
        if major != FORMAT_VERSION[0]:
            raise VersionError(f"{source}: format version {major}.{minor} is not supported "
                               f"(this weft reads {FORMAT_VERSION[0]}.x)")
        expected = _HEADER.size + manifest_len + payload_len + _DIGEST_BYTES
        if len(data) < expected:
            raise TruncatedBundleError(f"{source}: truncated: header announces {expected} bytes, file has {len(data)}")
        if len(data) > expected:
            raise BundleError(f"{source}: {len(data) - expected} unexpected bytes after the checksum")
        body, digest = data[:-_DIGEST_BYTES], data[-_DIGEST_BYTES:]
        if hashlib.sha256(body).digest() != digest:
            raise ChecksumError(f"{source}: checksum mismatch: the file is corrupted")
        try:
            manifest = json.loads(body[_HEADER.size:_HEADER.size + manifest_len])
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleError(f"{source}: manifest is not valid JSON: {exc}") from None
        payload = body[_HEADER.size + manifest_len:]

        def take(entry: dict[str, Any], what: str) -> bytes:
            lo, size = int(entry["offset"]), int(entry["size"])
            chunk = payload[lo:lo + size]
            if len(chunk) != size or hashlib.sha256(chunk).hexdigest() != entry["sha256"]:
                raise ChecksumError(f"{source}: {what} does not match its checksum")
            return chunk

        try:
            prog = manifest["program"]
            try:
                program = decode_program(take(prog, "program"))
            except IsaError as exc:
                raise BundleError(f"{source}: program does not decode: {exc}") from None
            if len(program) != prog["count"]:
                raise BundleError(f"{source}: manifest announces {prog['count']} instructions, found {len(program)}")
            bundle = cls(
                config_name=manifest["config"]["name"],
                config_hash=manifest["config"]["hash"],
                program=program,
                program_address=int(prog["address"]),
                segments=[Segment(s["name"], int(s["address"]), take(s, f"segment {s['name']!r}"))
                          for s in manifest["segments"]],
                inputs=[TensorSpec.from_json(t) for t in manifest["inputs"]],
                outputs=[TensorSpec.from_json(t) for t in manifest["outputs"]],
                regions=[Region(r["name"], int(r["address"]), int(r["size"]), r["kind"]) for r in manifest["regions"]],
                metadata=manifest.get("metadata", {}),
                format_version=(major, minor),
            )
        except (KeyError, TypeError) as exc:
            raise BundleError(f"{source}: manifest is missing or mistypes {exc}") from None
        if config is not None:
            bundle.check_config(config)
        return bundle


def read_bundle(path: str | Path, *, config: AcceleratorConfig | None = None) -> Bundle:
    """Read and verify a bundle file; with ``config``, also refuse one built for another configuration."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read bundle {path}: {exc.strerror}") from None
    return Bundle.from_bytes(data, config=config, source=str(path))


def _find(specs: list[TensorSpec], name: str, what: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise BundleError(f"no {what} named {name!r} (have: {', '.join(s.name for s in specs) or 'none'})")
