"""Accelerator configuration: built-ins, identity hash and validation messages."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from weft.hw.config import (ROW_ENGINE_MULTIPLIERS_PER_ELEMENT, AcceleratorConfig, ConfigError, builtin_config_names,
                            load_config)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "hw" / "configs"
BUILTINS = ("default", "tiny", "ulx3s")


def _raw(name: str) -> dict:
    """The built-in YAML as plain data, read independently of the loader."""
    return yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())


def _set(data: dict, dotted: str, value) -> dict:
    out = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    node = out
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return out


def _delete(data: dict, dotted: str) -> dict:
    out = copy.deepcopy(data)
    *parents, last = dotted.split(".")
    node = out
    for key in parents:
        node = node[key]
    del node[last]
    return out


# ---------------------------------------------------------------------- built-ins
def test_builtin_names_are_the_yaml_files():
    assert builtin_config_names() == sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert set(BUILTINS) <= set(builtin_config_names())


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_loads_with_the_file_values(name):
    raw = _raw(name)
    cfg = load_config(name)
    assert cfg.name == raw["name"] == name
    assert (cfg.array.rows, cfg.array.cols) == (raw["array"]["rows"], raw["array"]["cols"])
    assert (cfg.scratchpad.kib, cfg.scratchpad.banks) == (raw["scratchpad"]["kib"], raw["scratchpad"]["banks"])
    assert (cfg.accumulator.kib, cfg.accumulator.banks) == (raw["accumulator"]["kib"], raw["accumulator"]["banks"])
    assert cfg.vector.lanes == raw["vector"]["lanes"]
    assert cfg.bus.data_bits == raw["bus"]["data_bits"]
    assert cfg.queues.depth == raw["queues"]["depth"]
    assert cfg.queues.token_max == raw["queues"]["token_max"]
    assert cfg.device_memory.mib == raw["device_memory"]["mib"]
    assert cfg.clock_mhz == raw["clock_mhz"]
    cfg.validate()  # idempotent: a loaded configuration obeys its own rules
    # Loading the same file by path gives the same configuration.
    assert load_config(CONFIG_DIR / f"{name}.yaml") == cfg


@pytest.mark.parametrize("name, sp_row_elems, sp_rows, acc_rows, bus_bytes", [
    # hand-computed: sp row = max(rows, cols) int8; acc row = cols int32
    ("tiny", 4, 4 * 1024 // 4, 4 * 1024 // 16, 4),
    ("default", 16, 256 * 1024 // 16, 64 * 1024 // 64, 16),
    ("ulx3s", 8, 64 * 1024 // 8, 16 * 1024 // 32, 8),
])
def test_builtin_derived_geometry(name, sp_row_elems, sp_rows, acc_rows, bus_bytes):
    cfg = load_config(name)
    assert cfg.sp_row_elems == sp_row_elems
    assert cfg.sp_rows == sp_rows
    assert cfg.acc_rows == acc_rows
    assert cfg.bus_bytes == bus_bytes
    assert cfg.device_memory_bytes == _raw(name)["device_memory"]["mib"] << 20


def test_ulx3s_fits_its_target():
    cfg = load_config("ulx3s")
    assert cfg.target.max_multipliers == 156
    assert not cfg.vector.row_engine
    assert cfg.estimated_multipliers() == 8 * 8 + 2 * 8 <= 156


def test_row_engine_is_optional_and_counts_multipliers():
    default = load_config("default")
    assert default.vector.row_engine
    without = AcceleratorConfig.from_dict(_set(_raw("default"), "vector.row_engine", False))
    assert without.estimated_multipliers() == 16 * 16 + 2 * 16
    assert default.estimated_multipliers() > without.estimated_multipliers()


@pytest.mark.parametrize("name", ["tiny", "ulx3s"])
def test_multiplier_estimate_matches_the_netlist(name):
    from weft.boards.synth import count_hard_multipliers
    from weft.hw.array import SystolicArray
    from weft.hw.vector import RowEngine

    cfg = load_config(name)
    engine = replace(cfg, vector=replace(cfg.vector, row_engine=True))
    assert count_hard_multipliers(SystolicArray.from_config(cfg)) == cfg.array.rows * cfg.array.cols
    assert count_hard_multipliers(RowEngine(engine)) == ROW_ENGINE_MULTIPLIERS_PER_ELEMENT * cfg.acc_row_elems


# ---------------------------------------------------------------------- hash
REFORMATTED_DEFAULT = """\
# Same hardware as the built-in default, written differently and renamed.
clock_mhz: 200.0
device_memory:
  mib: 256
queues:
  token_max: 15
  depth: 8
bus:
  addr_bits: 32
  data_bits: 128
vector:
    lanes: 16
accumulator: {banks: 2, kib: 64}
scratchpad:
  banks: 4
  kib: 256
array:
  cols: 16
  rows: 16
description: |
  a completely different description
name: my-renamed-copy
"""


def test_hash_ignores_key_order_formatting_name_and_description(tmp_path):
    path = tmp_path / "copy.yaml"
    path.write_text(REFORMATTED_DEFAULT)
    copy_cfg = load_config(path)
    default = load_config("default")
    assert copy_cfg.name == "my-renamed-copy"
    assert copy_cfg != default
    assert copy_cfg.hash == default.hash
    assert copy_cfg.hash32 == default.hash32


def test_hash_shape_and_hash32():
    cfg = load_config("default")
    assert len(cfg.hash) == 64 and int(cfg.hash, 16) >= 0
    assert cfg.hash32 == int(cfg.hash[:8], 16)
    assert 0 <= cfg.hash32 < 1 << 32


def test_hash_is_stable_across_yaml_round_trip():
    for name in BUILTINS:
        cfg = load_config(name)
        again = AcceleratorConfig.from_dict(yaml.safe_load(cfg.to_yaml()))
        assert again == cfg
        assert again.hash == cfg.hash


def test_builtins_have_distinct_hashes():
    hashes = {load_config(n).hash for n in BUILTINS}
    assert len(hashes) == len(BUILTINS)


HARDWARE_CHANGES = [
    ("array.rows", 8),
    ("array.cols", 32),
    ("scratchpad.kib", 128),
    ("scratchpad.banks", 2),
    ("accumulator.kib", 32),
    ("accumulator.banks", 1),
    ("vector.lanes", 8),
    ("vector.row_engine", False),
    ("bus.data_bits", 64),
    ("bus.addr_bits", 64),
    ("queues.depth", 4),
    ("queues.token_max", 7),
    ("device_memory.mib", 128),
    ("clock_mhz", 250),
    ("target.part", "XC7A100T"),
    ("target.max_multipliers", 4000),
]


@pytest.mark.parametrize("field, value", HARDWARE_CHANGES, ids=[f for f, _ in HARDWARE_CHANGES])
def test_hash_changes_with_any_hardware_field(field, value):
    default = load_config("default")
    changed = AcceleratorConfig.from_dict(_set(_raw("default"), field, value))
    assert changed.hash != default.hash


def test_every_hardware_change_gives_a_different_hash():
    hashes = [AcceleratorConfig.from_dict(_set(_raw("default"), f, v)).hash for f, v in HARDWARE_CHANGES]
    assert len(set(hashes)) == len(hashes)


# ---------------------------------------------------------------------- validation
def _big_array(**extra) -> dict:
    """A 64x64 array with room for it: the base for the memory-size rules."""
    data = _set(_raw("default"), "array", {"rows": 64, "cols": 64})
    for k, v in extra.items():
        data = _set(data, k.replace("__", "."), v)
    return data


INVALID = [
    # (id, data, expected ConfigError.path, words the message must contain)
    ("unknown-top-level-key", _set(_raw("default"), "colour", "blue"), "colour", ["unknown key"]),
    ("unknown-nested-key", _set(_raw("default"), "array.depth", 3), "array.depth", ["unknown key", "rows", "cols"]),
    ("unknown-queue-key", _set(_raw("default"), "queues.size", 3), "queues.size", ["unknown key"]),
    ("string-where-int", _set(_raw("default"), "array.rows", "16"), "array.rows", ["expected int", "str"]),
    ("bool-where-int", _set(_raw("default"), "array.cols", True), "array.cols", ["expected int", "bool"]),
    ("bool-where-number", _set(_raw("default"), "clock_mhz", True), "clock_mhz", ["bool"]),
    ("int-where-bool", _set(_raw("default"), "vector.row_engine", 1), "vector.row_engine", ["expected bool", "int"]),
    ("float-where-int", _set(_raw("default"), "scratchpad.kib", 256.0), "scratchpad.kib", ["expected int", "float"]),
    ("int-where-str", _set(_raw("default"), "name", 5), "name", ["expected str"]),
    ("section-not-mapping", _set(_raw("default"), "array", 16), "array", ["mapping"]),
    ("array-rows-too-small", _set(_raw("default"), "array.rows", 1), "array.rows", ["outside the allowed range", "[2, 64]"]),
    ("array-cols-too-large", _set(_raw("default"), "array.cols", 128), "array.cols", ["outside the allowed range"]),
    ("scratchpad-too-small-for-a-tile", _big_array(scratchpad__kib=8), "scratchpad.kib", ["double-buffered tile", "256 rows"]),
    ("accumulator-too-small-for-a-tile", _big_array(accumulator__kib=16), "accumulator.kib", ["double-buffered tile", "130 rows"]),
    ("scratchpad-zero", _set(_raw("default"), "scratchpad.kib", 0), "scratchpad.kib", ["positive"]),
    ("bus-not-power-of-two", _set(_raw("default"), "bus.data_bits", 96), "bus.data_bits", ["power of two"]),
    ("bus-too-narrow", _set(_raw("default"), "bus.data_bits", 16), "bus.data_bits", ["outside the allowed range"]),
    ("addr-bits", _set(_raw("default"), "bus.addr_bits", 48), "bus.addr_bits", ["32 or 64"]),
    ("lanes-not-dividing-cols", _set(_raw("default"), "vector.lanes", 6), "vector.lanes", ["must divide", "16"]),
    ("banks-not-power-of-two", _set(_raw("default"), "scratchpad.banks", 3), "scratchpad.banks", ["power of two"]),
    ("queue-depth", _set(_raw("default"), "queues.depth", 1), "queues.depth", ["outside the allowed range"]),
    ("token-max-zero", _set(_raw("default"), "queues.token_max", 0), "queues.token_max", ["outside the allowed range"]),
    ("clock-zero", _set(_raw("default"), "clock_mhz", 0), "clock_mhz", ["outside"]),
    ("device-memory-beyond-32-bits", _set(_raw("default"), "device_memory.mib", 8192), "device_memory.mib", ["32-bit"]),
    ("too-many-multipliers", _set(_raw("ulx3s"), "array", {"rows": 16, "cols": 16}), "array",
     ["272 multipliers", "LFE5U-85F", "156"]),
    ("unsupported-dtype", _set(_raw("default"), "dtypes", {"input": "int4"}), "dtypes.input", ["not supported", "int8"]),
    ("unsupported-acc-dtype", _set(_raw("default"), "dtypes", {"accumulator": "int16"}), "dtypes.accumulator",
     ["not supported", "int32"]),
    ("unknown-dtype-key", _set(_raw("default"), "dtypes", {"output": "int8"}), "dtypes.output", ["unknown key"]),
    ("unknown-schema-version", _set(_raw("default"), "schema", 2), "schema", ["version 2", "not supported"]),
    ("schema-wrong-type", _set(_raw("default"), "schema", "1"), "schema", ["expected int"]),
    ("missing-name", _delete(_raw("default"), "name"), "name", ["required key is missing"]),
    ("missing-clock", _delete(_raw("default"), "clock_mhz"), "clock_mhz", ["required key is missing"]),
    ("missing-section", _delete(_raw("default"), "array"), "array", ["required section is missing"]),
    ("missing-nested-key", _delete(_raw("default"), "array.cols"), "array.cols", ["required key is missing"]),
    ("missing-device-memory", _delete(_raw("default"), "device_memory"), "device_memory", ["missing"]),
]


@pytest.mark.parametrize("data, path, words", [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_validation_error_names_field_and_rule(data, path, words):
    with pytest.raises(ConfigError) as info:
        AcceleratorConfig.from_dict(data)
    assert info.value.path == path
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


def test_optional_sections_default():
    data = _delete(_delete(_raw("default"), "queues"), "schema")
    cfg = AcceleratorConfig.from_dict(data)
    assert (cfg.queues.depth, cfg.queues.token_max) == (8, 15)
    assert cfg.target.max_multipliers == 0
    assert cfg.schema == 1


def test_integral_clock_and_float_clock_are_the_same_hardware():
    a = AcceleratorConfig.from_dict(_set(_raw("default"), "clock_mhz", 200))
    b = AcceleratorConfig.from_dict(_set(_raw("default"), "clock_mhz", 200.0))
    assert a.hash == b.hash


def test_top_level_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(path)


def test_malformed_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\narray: {rows: 4, cols: 4\nclock_mhz: 100\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "not valid YAML" in str(info.value)
    assert str(path) in str(info.value)


def test_file_error_messages_carry_the_source(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text((CONFIG_DIR / "default.yaml").read_text().replace("{lanes: 16}", "{lanes: 16, width: 3}"))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.path == "vector.width"


def test_nonexistent_builtin_name_lists_the_builtins():
    with pytest.raises(ConfigError) as info:
        load_config("enormous")
    message = str(info.value)
    assert "'enormous'" in message
    for name in BUILTINS:
        assert name in message


def test_nonexistent_yaml_path(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
