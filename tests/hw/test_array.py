"""RTL tests of the systolic array (bench: tests/hw/benches/array_bench.py)."""

from __future__ import annotations

import pytest

from weft.hw.array import ProcessingElement, SystolicArray, psum_width
from weft.sim.rtl import run_bench

from .conftest import require_simulator

# Unit tests below build components only to check their arguments and geometry.
pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")

BENCH = "tests/hw/benches/array_bench.py"


def _params(array: SystolicArray, seed: int = 1) -> dict:
    return {"rows": array.rows, "cols": array.cols, "latency": array.latency, "drain": array.drain,
            "tag_bits": array.tag_bits, "seed": seed}


@pytest.mark.rtl
def test_array_verilator(config):
    array = SystolicArray.from_config(config, tag_bits=3)
    run_bench(array, BENCH, params=_params(array), name="array_top")


@pytest.mark.rtl
def test_array_icarus():
    require_simulator("icarus")
    array = SystolicArray(4, 3)  # non-square, no tag
    run_bench(array, BENCH, params=_params(array, seed=7), name="array_top", simulator="icarus")


def test_array_geometry(config):
    array = SystolicArray.from_config(config)
    assert array.latency == config.array.rows + config.array.cols + 1  # select, multiply, add stages
    # partial sums exact for the worst case (all -128 x -128)
    assert config.array.rows * 128 * 128 < 2 ** (psum_width(config.array.rows) - 1)


@pytest.mark.parametrize("kwargs, match", [
    ({"rows": 0, "cols": 4}, "rows=0"),
    ({"rows": 4, "cols": "4"}, "cols must be an int"),
    ({"rows": 4, "cols": 4, "tag_bits": -1}, "tag_bits=-1"),
])
def test_array_rejects_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SystolicArray(**kwargs)


def test_array_from_config_type():
    with pytest.raises(ValueError, match="AcceleratorConfig"):
        SystolicArray.from_config({"rows": 4})
    with pytest.raises(ValueError, match="psum_bits"):
        ProcessingElement(8)
