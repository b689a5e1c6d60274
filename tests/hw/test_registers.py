"""Register map and AXI4-Lite register block (bench: tests/hw/benches/registers_bench.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from weft.hw.config import load_config
from weft.hw.registers import (COUNTERS, ID_VALUE, REGISTERS, Access, Registers, config_info, register,
                               render_markdown, reset_value)
from weft.sim.rtl import run_bench, to_verilog

BENCH = "tests/hw/benches/registers_bench.py"
DOC = Path(__file__).resolve().parents[2] / "docs" / "registers.md"


@pytest.mark.rtl
def test_registers_verilator(config):
    run_bench(Registers(config), BENCH, params={"config": config.name, "seed": 3}, name="regs_top")


def test_registers_doc_is_current():
    assert DOC.exists() and DOC.read_text() == render_markdown(), \
        "docs/registers.md is out of date with weft/hw/registers.py: run `make docs`"


def test_register_map_shape():
    offsets = [r.offset for r in REGISTERS]
    assert len(set(offsets)) == len(offsets)
    assert register("ID").reset == ID_VALUE == 0x54464557
    for _, base, _ in COUNTERS:
        lo, hi = register(f"{base}_LO"), register(f"{base}_HI")
        assert hi.offset == lo.offset + 4 and lo.offset % 8 == 0
    assert register("IRQ_STATUS").access is Access.W1C
    assert register("CONTROL").access is Access.W1S
    with pytest.raises(KeyError):
        register("NOPE")


def test_config_values(config):
    assert reset_value(register("CONFIG_HASH"), config) == config.hash32
    info = config_info(config)
    assert info & 0xFF == config.array.rows and (info >> 8) & 0xFF == config.array.cols
    assert (info >> 16) & 0xFF == config.vector.lanes and info >> 24 == config.bus.data_bits // 8
    with pytest.raises(ValueError, match="pass config"):
        reset_value(register("CONFIG_HASH"))


def test_registers_csr_port_names():
    text = to_verilog(Registers(load_config("tiny")), "regs_top")
    for name in ("csr__awaddr", "csr__wstrb", "csr__bresp", "csr__araddr", "csr__rdata", "csr__rresp", "irq"):
        assert f" {name};" in text, name


@pytest.mark.parametrize("kwargs, match", [
    ({"config": "tiny"}, "AcceleratorConfig"),
    ({"addr_width": 4}, "addr_width=4"),
])
def test_registers_rejects_bad_args(kwargs, match):
    args = {"config": load_config("tiny"), **kwargs}
    with pytest.raises(ValueError, match=match):
        Registers(**args)
