"""HIL fixtures: one device session for the whole folder.

``WEFT_HIL_TARGET`` picks the target: unset or ``twin`` (default) launches a Verilator twin
of ``Core(tiny)``; a transport URI (``uart:/dev/ttyUSB0``, ``twin:/tmp/.../twin.sock``) opens
that device with :func:`weft.sw.driver.open_transport`. The device must be built for the
``tiny`` configuration (its CONFIG_HASH is checked on open).
"""

from __future__ import annotations

import os

import pytest

from weft.hw.config import load_config
from weft.sw.hil import TARGET_ENV, HilSession

TINY = load_config("tiny")


def hil_target() -> str:
    return os.environ.get(TARGET_ENV, "").strip() or "twin"


def target_is_launched_twin() -> bool:
    return hil_target() == "twin"


@pytest.fixture(scope="session")
def hil():
    session = HilSession(TINY, target=hil_target())
    try:
        yield session
    finally:
        session.close()


@pytest.fixture
def session(hil):
    """The shared session, with the device reset (a clean STATUS) before each test."""
    hil.device.reset()
    return hil
