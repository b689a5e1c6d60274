"""RTL tests of the REQUANT datapath (bench: tests/hw/benches/requant_bench.py)."""

from __future__ import annotations

import pytest

from weft.hw.requant import Requantizer
from weft.sim.rtl import run_bench

from .conftest import require_simulator

# Unit tests below build components only to check their arguments and geometry.
pytestmark = pytest.mark.filterwarnings("ignore::amaranth.hdl.UnusedElaboratable")

BENCH = "tests/hw/benches/requant_bench.py"


@pytest.mark.rtl
def test_requant_verilator(config):
    rq = Requantizer.from_config(config)
    run_bench(rq, BENCH, params={"lanes": rq.lanes, "latency": rq.latency, "seed": 3}, name="requant_top")


@pytest.mark.rtl
def test_requant_icarus():
    require_simulator("icarus")
    rq = Requantizer(2)
    run_bench(rq, BENCH, params={"lanes": 2, "latency": rq.latency, "seed": 5}, name="requant_top",
              simulator="icarus")


@pytest.mark.parametrize("kwargs, match", [({"lanes": 0}, "lanes=0"), ({"lanes": 2.0}, "lanes must be an int"),
                                           ({"lanes": 4, "tag_bits": 99}, "tag_bits=99")])
def test_requant_rejects_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Requantizer(**kwargs)
