"""Helpers shared by the twin and driver tests: stand-in twins and a bytes model of the copy."""

from __future__ import annotations

import contextlib

import numpy as np

from weft.hw.config import load_config
from weft.sim.twin import Twin
from weft.sim.twin.standin import StandInTop, copy_count

__all__ = ["launch_standin", "standin", "start_copy", "copy_model", "copy_count"]


def launch_standin(config_name: str = "tiny", **kwargs) -> Twin:
    config = load_config(config_name)
    return Twin.launch(StandInTop(config), config, **kwargs)


def start_copy(client, src: int, dst: int, rows: int, row_bytes: int, *, irq: bool = True) -> None:
    """Program the stand-in's copy through raw register writes and start it."""
    assert client.reg_write(0x24, 0x3) == 0  # IRQ_STATUS: clear
    assert client.reg_write(0x20, 0x3 if irq else 0) == 0  # IRQ_ENABLE
    assert client.reg_write(0x18, src) == 0  # PROGRAM_ADDR: source
    assert client.reg_write(0x2C, dst) == 0  # WATCHDOG: destination
    assert client.reg_write(0x1C, copy_count(rows, row_bytes)) == 0
    assert client.reg_write(0x10, 1) == 0  # CONTROL.start


def copy_model(memory: np.ndarray, src: int, dst: int, rows: int, row_bytes: int) -> None:
    n = rows * row_bytes
    memory[dst:dst + n] = memory[src:src + n].copy()


@contextlib.contextmanager
def standin(config_name: str = "tiny", **kwargs):
    twin = launch_standin(config_name, **kwargs)
    try:
        yield twin
    finally:
        twin.close()
