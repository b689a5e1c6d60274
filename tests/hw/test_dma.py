"""RTL tests of the DMA engine (bench: tests/hw/benches/dma_bench.py)."""

from __future__ import annotations

import pytest

from weft.hw.axi import AXI4LiteSignature, AXI4Signature
from weft.hw.dma import DMA, default_read_fifo_depth, max_burst_beats
from weft.sim.rtl import run_bench, to_verilog

BENCH = "tests/hw/benches/dma_bench.py"


def _params(dma: DMA, **extra) -> dict:
    return {"data_bits": dma.data_bits, "max_row_bytes": dma.max_row_bytes, "seed": 1, **extra}


@pytest.mark.rtl
def test_dma_verilator(config):
    dma = DMA.from_config(config)
    # steady state: at least 0.9 bus beats per cycle on long transfers with no backpressure
    run_bench(dma, BENCH, params=_params(dma, commands=40, min_beats_per_cycle=0.9), name="dma_top")


def test_dma_ports_have_axi_names():
    text = to_verilog(DMA(data_bits=64), "dma_top")
    for name in ("axi__araddr", "axi__arlen", "axi__rdata", "axi__rlast", "axi__awaddr", "axi__wstrb",
                 "axi__wlast", "axi__bresp", "axi__arid", "axi__rid", "axi__awid", "axi__bid"):
        assert f" {name};" in text, name


def test_dma_geometry():
    assert max_burst_beats(32, 256) == 65
    assert max_burst_beats(128, 256) == 17
    assert default_read_fifo_depth(32, 256) == 128
    assert default_read_fifo_depth(128, 256) == 64


@pytest.mark.parametrize("kwargs, match", [
    ({"data_bits": 48}, "power of two"),
    ({"data_bits": 16}, "data_bits=16"),
    ({"addr_bits": 40}, "addr_bits=40"),
    ({"max_row_bytes": 0}, "max_row_bytes=0"),
    ({"max_row_bytes": 1024, "data_bits": 32}, "AXI4 allows at most 256"),
    ({"max_outstanding": 0}, "max_outstanding=0"),
    ({"read_fifo_depth": 16}, "cannot hold one burst"),
    ({"max_row_bytes": "8"}, "must be an int"),
])
def test_dma_rejects_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DMA(**kwargs)


def test_dma_from_config_type():
    with pytest.raises(ValueError, match="AcceleratorConfig"):
        DMA.from_config({"bus": 32})


def test_axi_signature_args():
    with pytest.raises(ValueError, match="data_width=24"):
        AXI4Signature(data_width=24)
    with pytest.raises(ValueError, match="data_width=128"):
        AXI4LiteSignature(data_width=128)
    assert AXI4Signature(data_width=64) == AXI4Signature(data_width=64)
    assert AXI4Signature(data_width=64) != AXI4Signature(data_width=32)
    assert "arlen" in AXI4Signature().members and "arlen" not in AXI4LiteSignature().members
