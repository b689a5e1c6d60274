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


@pytest.fixture
def real_models(tmp_path, monkeypatch):
    """MiniLM and SmolLM2 with their real weights (``make setup`` installs the packages; the
    test skips where they are missing), with device profiles cached in a fresh folder."""
    from weft.sw.devices import ModelSet
    from weft.sw.models import minilm, smollm2

    try:
        minilm.model_path(), smollm2.default_gguf_path()
    except Exception as exc:  # the weights packages are not installed
        pytest.skip(f"real weights not installed: {exc}")
    monkeypatch.setenv("WEFT_CACHE", str(tmp_path))
    return ModelSet.load()
