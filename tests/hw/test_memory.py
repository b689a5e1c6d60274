"""RTL tests of the scratchpad and accumulator (bench: tests/hw/benches/memory_bench.py)."""

from __future__ import annotations

import pytest

from weft.hw.memory import Accumulator, Scratchpad
from weft.sim.rtl import run_bench

from .conftest import require_simulator

# Unit tests below build components only to check their arguments and geometry.
pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")

BENCH = "tests/hw/benches/memory_bench.py"


def _sp_params(sp: Scratchpad, seed: int) -> dict:
    return {"kind": "scratchpad", "depth": sp.depth, "elems": sp.row_elems, "banks": sp.banks,
            "read_ports": sp.read_ports, "write_ports": sp.write_ports, "seed": seed}


def _acc_params(acc: Accumulator, seed: int) -> dict:
    return {"kind": "accumulator", "depth": acc.depth, "elems": acc.cols, "banks": acc.banks,
            "read_ports": acc.read_ports, "seed": seed}


@pytest.mark.rtl
def test_scratchpad_verilator(config):
    sp = Scratchpad.from_config(config, read_ports=2, write_ports=2)
    run_bench(sp, BENCH, params=_sp_params(sp, 11), name="sp_top")


@pytest.mark.rtl
def test_accumulator_verilator(config):
    acc = Accumulator.from_config(config, read_ports=2)
    run_bench(acc, BENCH, params=_acc_params(acc, 12), name="acc_top")


@pytest.mark.rtl
def test_memories_icarus():
    require_simulator("icarus")
    sp = Scratchpad(64, 4, 4, read_ports=2, write_ports=2)
    run_bench(sp, BENCH, params=_sp_params(sp, 13), name="sp_top", simulator="icarus")
    acc = Accumulator(32, 3, 2, read_ports=1)
    run_bench(acc, BENCH, params=_acc_params(acc, 14), name="acc_top", simulator="icarus")


@pytest.mark.parametrize("cls, kwargs, match", [
    (Scratchpad, {"depth": 10, "row_elems": 4, "banks": 4}, "does not divide"),
    (Scratchpad, {"depth": 12, "row_elems": 4, "banks": 3}, "power of two"),
    (Scratchpad, {"depth": 16, "row_elems": 0}, "row_elems=0"),
    (Scratchpad, {"depth": 16, "row_elems": 4, "read_ports": 0}, "read_ports=0"),
    (Accumulator, {"depth": 0, "cols": 4}, "depth=0"),
    (Accumulator, {"depth": 16, "cols": 4, "banks": True}, "banks must be an int"),
])
def test_memories_reject_bad_args(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_from_config_geometry(config):
    sp = Scratchpad.from_config(config)
    acc = Accumulator.from_config(config)
    assert (sp.depth, sp.row_elems, sp.banks) == (config.sp_rows, config.sp_row_elems, config.scratchpad.banks)
    assert (acc.depth, acc.cols, acc.banks) == (config.acc_rows, config.array.cols, config.accumulator.banks)
    with pytest.raises(ValueError, match="AcceleratorConfig"):
        Scratchpad.from_config(None)
