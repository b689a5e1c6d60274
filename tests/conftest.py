"""Suite-wide hooks."""

from __future__ import annotations

import pytest

from weft.sim.rtl import default_simulator


def pytest_collection_modifyitems(config, items):
    # `make sim SIM=icarus` runs the RTL benches on Icarus; benches that only make sense on
    # Verilator (the C++ twin) or would take too long on Icarus say so with a marker.
    if default_simulator() != "icarus":
        return
    skip = pytest.mark.skip(reason="Verilator only (or too slow for Icarus); run `make sim` for these")
    for item in items:
        if "verilator_only" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def twin():
    """A stand-in twin (register block + DMA on `tiny`), shared by the tests of one module."""
    from tests.sim.twin_fixtures import standin

    with standin("tiny") as t:
        yield t
