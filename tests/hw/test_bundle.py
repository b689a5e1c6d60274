"""Program bundle file format: round trip, corruption, versions, configuration binding, tensors."""

from __future__ import annotations

import hashlib
import json
import struct

import numpy as np
import pytest

from weft.hw.bundle import (
    Bundle,
    BundleError,
    ChecksumError,
    ConfigMismatchError,
    Region,
    Segment,
    TensorSpec,
    TruncatedBundleError,
    VersionError,
    read_bundle,
)
from weft.hw.config import AcceleratorConfig, load_config
from weft.hw.isa import Instruction, Opcode, assemble

PROGRAM_TEXT = """\
load mem=sp local=0x0 dram=0x1000 rows=4 cols=4 stride=0x4 signal=matmul
preload sp=0x0 k=4 n=4 wait=load
matmul a=0x0 acc=0x0 m=4 k=4 accumulate=0 signal=store
store mem=acc local=0x0 dram=0x2000 rows=4 cols=4 stride=0x10 wait=matmul
halt
"""


def _bundle(config: AcceleratorConfig) -> Bundle:
    weights = bytes(range(256)) * 3
    return Bundle.for_config(
        config,
        program=assemble(PROGRAM_TEXT),
        program_address=0x80,
        segments=[Segment("weights", 0x1000, weights), Segment("params", 0x1800, b"\x01\x02\x03\x04" * 8)],
        inputs=[TensorSpec.dense("a", (4, 4), "int8", 0x1000, scale=0.5, zero_point=-3)],
        outputs=[TensorSpec("c", (4, 4), "int32", 0x2000, (16, 4))],
        regions=[Region("program", 0x80, 80, "program"), Region("weights", 0x1000, len(weights), "constant")],
        metadata={"kernel": "test", "shape": [4, 4, 4], "note": "h\u00e9llo"},
    )


@pytest.fixture(scope="module")
def tiny():
    return load_config("tiny")


@pytest.fixture(scope="module")
def data(tiny):
    return _bundle(tiny).to_bytes()


def _layout(data: bytes) -> dict:
    """Offsets of the file's parts, parsed from the documented header (docs/bundle.md)."""
    magic, major, minor, flags, mlen, plen = struct.unpack_from("<8sHHIQQ", data)
    manifest = json.loads(data[32:32 + mlen])
    payload = 32 + mlen
    return {"manifest": (32, 32 + mlen), "payload": payload, "digest": (payload + plen, payload + plen + 32),
            "program": payload + manifest["program"]["offset"],
            "weights": payload + manifest["segments"][0]["offset"], "json": manifest,
            "major": major, "minor": minor, "mlen": mlen, "plen": plen}


def _redigest(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


def _flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x40
    return bytes(out)


# ---------------------------------------------------------------------- round trip
def test_write_read_round_trip(tmp_path, tiny):
    original = _bundle(tiny)
    path = tmp_path / "b.weft"
    original.write(path)
    back = read_bundle(path, config=tiny)
    assert back == original
    assert back.program_bytes == original.program_bytes
    assert back.input("a").scale == 0.5 and back.input("a").zero_point == -3
    assert back.output("c").strides == (16, 4)
    assert back.metadata["note"] == "h\u00e9llo"


def test_file_layout_matches_the_documentation(data):
    parts = _layout(data)
    assert data[:8] == b"WEFTBNDL"
    assert (parts["major"], parts["minor"]) == (1, 0)
    assert len(data) == 32 + parts["mlen"] + parts["plen"] + 32
    assert data[-32:] == hashlib.sha256(data[:-32]).digest()
    manifest = parts["json"]
    assert manifest["config"]["name"] == "tiny"
    assert manifest["program"]["count"] == 5
    prog = data[parts["program"]:parts["program"] + manifest["program"]["size"]]
    assert hashlib.sha256(prog).hexdigest() == manifest["program"]["sha256"]
    assert len(prog) == 5 * 16 and prog[-16] == 0x01  # last instruction is halt


def test_empty_bundle_round_trips(tiny):
    empty = Bundle.for_config(tiny, program=[Instruction.make(Opcode.HALT)], program_address=0)
    assert Bundle.from_bytes(empty.to_bytes()) == empty


# ---------------------------------------------------------------------- corruption
def test_truncated_file_is_refused_at_every_cut(data):
    parts = _layout(data)
    cuts = sorted({0, 1, 8, 31, 32, 33, (32 + parts["mlen"]) // 2, parts["payload"], parts["program"] + 7,
                   parts["weights"] + 100, parts["digest"][0], len(data) - 1})
    for cut in cuts:
        with pytest.raises(TruncatedBundleError, match="truncated"):
            Bundle.from_bytes(data[:cut])


@pytest.mark.parametrize("where", ["manifest", "program", "weights", "digest"])
def test_flipped_byte_is_a_checksum_error(data, where):
    parts = _layout(data)
    offset = {"manifest": parts["manifest"][0] + 10, "program": parts["program"] + 20,
              "weights": parts["weights"] + 500, "digest": parts["digest"][0] + 31}[where]
    with pytest.raises(ChecksumError, match="checksum"):
        Bundle.from_bytes(_flip(data, offset))


@pytest.mark.parametrize("where", ["program", "weights"])
def test_section_checksum_catches_a_rewritten_file_digest(data, where):
    parts = _layout(data)
    offset = parts[where] + 3
    with pytest.raises(ChecksumError, match="does not match its checksum"):
        Bundle.from_bytes(_redigest(_flip(data, offset)[:-32]))


@pytest.mark.parametrize("offset", range(0, 32))
def test_flipped_header_byte_is_refused(data, offset):
    with pytest.raises(BundleError):
        Bundle.from_bytes(_flip(data, offset))


def test_bad_magic_is_not_a_bundle(data):
    with pytest.raises(BundleError, match="not a weft bundle"):
        Bundle.from_bytes(b"PK\x03\x04" + data[4:])
    with pytest.raises(BundleError, match="not a weft bundle"):
        Bundle.from_bytes(bytes(range(200)))


def test_trailing_garbage_is_refused(data):
    for extra in (b"\x00", b"garbage" * 10):
        with pytest.raises(BundleError, match=f"{len(extra)} unexpected bytes"):
            Bundle.from_bytes(data + extra)


def test_manifest_that_is_not_json(data):
    body = bytearray(data[:-32])
    body[32] = ord("!")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.from_bytes(_redigest(bytes(body)))


def _rebuild(manifest: dict, payload: bytes, major: int = 1, minor: int = 0) -> bytes:
    mbytes = json.dumps(manifest).encode()
    return _redigest(struct.pack("<8sHHIQQ", b"WEFTBNDL", major, minor, 0, len(mbytes), len(payload))
                     + mbytes + payload)


def test_manifest_missing_a_field(data):
    parts = _layout(data)
    manifest = dict(parts["json"])
    del manifest["outputs"]
    with pytest.raises(BundleError, match="outputs"):
        Bundle.from_bytes(_rebuild(manifest, data[parts["payload"]:parts["digest"][0]]))


def test_program_that_does_not_decode_is_a_bundle_error(data):
    # docs/bundle.md: "a program that does not decode" is one of the BundleErrors.
    parts = _layout(data)
    manifest = json.loads(json.dumps(parts["json"]))
    payload = bytearray(data[parts["payload"]:parts["digest"][0]])
    start = manifest["program"]["offset"]
    payload[start:start + 16] = bytes(16)  # opcode 0x00
    manifest["program"]["sha256"] = hashlib.sha256(payload[start:start + manifest["program"]["size"]]).hexdigest()
    with pytest.raises(BundleError, match="illegal opcode"):
        Bundle.from_bytes(_rebuild(manifest, bytes(payload)))


# ---------------------------------------------------------------------- versions
@pytest.mark.parametrize("major", [0, 2, 0xFFFF])
def test_unknown_major_version(data, major):
    body = bytearray(data[:-32])
    body[8:10] = major.to_bytes(2, "little")
    with pytest.raises(VersionError, match=f"format version {major}.0 is not supported"):
        Bundle.from_bytes(_redigest(bytes(body)))


def test_newer_minor_version_is_read(data):
    body = bytearray(data[:-32])
    body[10:12] = (7).to_bytes(2, "little")
    bundle = Bundle.from_bytes(_redigest(bytes(body)))
    assert bundle.format_version == (1, 7)


# ---------------------------------------------------------------------- configuration binding
def test_bundle_for_another_configuration(tmp_path, tiny):
    path = tmp_path / "b.weft"
    _bundle(tiny).write(path)
    with pytest.raises(ConfigMismatchError) as info:
        read_bundle(path, config=load_config("default"))
    message = str(info.value)
    assert "'tiny'" in message and "'default'" in message
    assert tiny.hash[:16] in message and load_config("default").hash[:16] in message


def test_renamed_but_identical_configuration_is_accepted(tiny):
    data = tiny.to_dict()
    data["name"] = "tiny-copy"
    renamed = AcceleratorConfig.from_dict(data)
    bundle = Bundle.from_bytes(_bundle(tiny).to_bytes(), config=renamed)
    assert bundle.config_name == "tiny"


def test_read_bundle_of_a_missing_file(tmp_path):
    with pytest.raises(BundleError, match="cannot read bundle"):
        read_bundle(tmp_path / "nothing.weft")


def test_lookup_of_unknown_tensor(tiny):
    with pytest.raises(BundleError, match="no input named 'x'.*have: a"):
        _bundle(tiny).input("x")


# ---------------------------------------------------------------------- tensors
def _numpy_view(memory: np.ndarray, spec: TensorSpec) -> np.ndarray:
    return np.ndarray(spec.shape, dtype=np.dtype(spec.dtype).newbyteorder("<"), buffer=memory,
                      offset=spec.address, strides=spec.strides)


def _touched(spec: TensorSpec, size: int) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    item = np.dtype(spec.dtype).itemsize
    for index in np.ndindex(*spec.shape):
        start = spec.address + sum(i * s for i, s in zip(index, spec.strides))
        mask[start:start + item] = True
    return mask


def test_dense_strides_by_hand():
    assert TensorSpec.dense("t", (2, 3, 4), "int32", 0).strides == (48, 16, 4)
    assert TensorSpec.dense("t", (5, 7), "int8", 0).strides == (7, 1)
    assert TensorSpec.dense("t", (3,), "uint8", 0).strides == (1,)
    assert TensorSpec.dense("t", (3, 4), "int32", 0).span == 48


STRIDED = [
    TensorSpec("padded_rows", (3, 4), "int32", 20, (64, 8)),  # every other int32, rows 64 bytes apart
    TensorSpec("column_major", (3, 5), "int8", 7, (1, 3)),
    TensorSpec("blocked_3d", (2, 3, 4), "int32", 100, (200, 40, 4)),
    TensorSpec("uint8_gaps", (4, 2), "uint8", 1, (10, 3)),
    TensorSpec("int32_odd_address", (2, 2), "int32", 3, (12, 4)),  # unaligned, little-endian bytes
]


@pytest.mark.parametrize("spec", STRIDED, ids=[s.name for s in STRIDED])
def test_strided_write_and_read_match_numpy(spec):
    rng = np.random.default_rng(7)
    info = np.iinfo(spec.dtype)
    value = rng.integers(info.min, info.max, spec.shape, endpoint=True).astype(np.dtype(spec.dtype).newbyteorder("<"))
    memory = np.full(512, 0xA5, dtype=np.uint8)
    spec.write_to(memory, value)
    np.testing.assert_array_equal(_numpy_view(memory, spec), value)
    np.testing.assert_array_equal(spec.read_from(memory), value)
    touched = _touched(spec, memory.size)
    assert np.all(memory[~touched] == 0xA5), "bytes outside the tensor were modified"
    extent = np.flatnonzero(touched)
    assert spec.span == extent.max() + 1 - spec.address


def test_zero_stride_read_broadcasts():
    spec = TensorSpec("row_broadcast", (4, 3), "int32", 8, (0, 4))
    memory = np.zeros(64, dtype=np.uint8)
    memory[8:20] = np.array([1, -2, 300], dtype="<i4").view(np.uint8)
    np.testing.assert_array_equal(spec.read_from(memory), np.tile(np.array([1, -2, 300]), (4, 1)))


def test_tensor_outside_memory_is_refused():
    spec = TensorSpec("t", (3, 4), "int32", 20, (64, 8))  # last byte at 20 + 128 + 24 + 3 = 175
    memory = np.zeros(175, dtype=np.uint8)
    with pytest.raises(BundleError, match="outside device memory"):
        spec.read_from(memory)
    spec.read_from(np.zeros(176, dtype=np.uint8))


def test_write_checks_shape_and_dtype():
    spec = TensorSpec.dense("t", (2, 2), "int8", 0)
    memory = np.zeros(16, dtype=np.uint8)
    with pytest.raises(BundleError, match="expected shape"):
        spec.write_to(memory, np.zeros((2, 3), np.int8))
    with pytest.raises(BundleError, match="expected dtype"):
        spec.write_to(memory, np.zeros((2, 2), np.int32))


def test_tensor_spec_validation():
    with pytest.raises(BundleError, match="unsupported dtype"):
        TensorSpec("t", (2,), "float32", 0, (4,))
    with pytest.raises(BundleError, match="strides"):
        TensorSpec("t", (2, 2), "int8", 0, (2,))
    with pytest.raises(BundleError, match="negative"):
        TensorSpec("t", (2,), "int8", -1, (1,))


def test_quantize_rounds_half_to_even_and_saturates():
    spec = TensorSpec.dense("t", (8,), "int8", 0, scale=0.5, zero_point=1)
    real = np.array([0.25, 0.75, -0.25, -0.75, 100.0, -100.0, 1.0, 0.0])
    # real / 0.5 = 0.5, 1.5, -0.5, -1.5, 200, -200, 2, 0 -> half-even 0, 2, -0, -2, then + 1, saturate
    np.testing.assert_array_equal(spec.quantize(real), [1, 3, 1, -1, 127, -128, 3, 1])
    np.testing.assert_array_equal(spec.dequantize(np.array([1, 3, -128])), [0.0, 1.0, -64.5])
    with pytest.raises(BundleError, match="no quantization scale"):
        TensorSpec.dense("raw", (1,), "int8", 0).quantize(np.zeros(1))
