"""XdmaTransport on files: the real opener (OsXdmaFiles) on regular files and a FIFO, and the
twin-backed stand-in's error semantics. The driver stack over the stand-in runs in the
``xdma`` HIL session (test_hil.py, test_faults.py).

What regular files can show: the mmap window's offsets, width and byte order, pread/pwrite at
the device address (c2h is a link to the h2c file here, so what was written reads back),
short transfers, EOF, and the event file's wait. They cannot react to a register write; the
stand-in on the twin does that.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time

import pytest

from weft.sw.driver import open_transport
from weft.sw.driver import xdma as xdma_mod
from weft.sw.driver.xdma import OsXdmaFiles, TwinXdmaFiles, XdmaTransport, XdmaTransportError, parse_uri



@pytest.fixture
def card(tmp_path):
    prefix = tmp_path / "xdma0"
    user = bytearray(4096)
    struct.pack_into("<II", user, 0, 0x54464557, 0xCAFEF00D)
    (tmp_path / "xdma0_user").write_bytes(bytes(user))
    with open(tmp_path / "xdma0_h2c_0", "wb") as fh:
        fh.truncate(1 << 20)
    os.symlink(tmp_path / "xdma0_h2c_0", tmp_path / "xdma0_c2h_0")
    return prefix


def test_os_files_registers_and_dma(card, monkeypatch):
    t = open_transport(f"xdma://{card}?channel=0&memory_bytes={1 << 20}")
    assert isinstance(t, XdmaTransport) and t.describe() == f"xdma:{card}"
    assert t.read32(0) == 0x54464557 and t.read32(4) == 0xCAFEF00D
    t.write32(0x18, 0x12345678)
    assert t.read32(0x18) == 0x12345678
    raw = (card.parent / "xdma0_user").read_bytes()
    assert raw[0x18:0x1C] == bytes([0x78, 0x56, 0x34, 0x12])  # one little-endian 32-bit word at 0x18
    monkeypatch.setattr(xdma_mod, "MAX_TRANSFER", 1000)  # several pread/pwrite calls per transfer
    data = os.urandom(4321)
    t.write_mem(0x1003, data)
    assert t.read_mem(0x1003, len(data)) == data
    assert (card.parent / "xdma0_h2c_0").read_bytes()[0x1003:0x1003 + len(data)] == data
    assert t.wait_irq(0.01) is None  # no events file: the driver polls
    with pytest.raises(ValueError, match="outside the card's memory of 1048576 bytes"):
        t.read_mem((1 << 20) - 2, 4)
    with pytest.raises(ValueError, match="multiple of 4 inside the 4096-byte user BAR"):
        t.read32(4096)
    with pytest.raises(ValueError, match="multiple of 4"):
        t.write32(2, 0)
    t.close()
    # without a size the card's answer decides: reading past the end is an error, not a hang
    t = XdmaTransport(str(card))
    with pytest.raises(XdmaTransportError, match="returned no data"):
        t.read_mem((1 << 20) - 2, 4)
    t.close()


def test_os_files_events(card):
    fifo = card.parent / "xdma0_events_0"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)  # keeps the FIFO open so the reader's open does not block
    try:
        t = XdmaTransport(OsXdmaFiles(str(card)))
        t0 = time.monotonic()
        assert t.wait_irq(0.2) is False and 0.15 < time.monotonic() - t0 < 2
        threading.Timer(0.1, lambda: os.write(writer, struct.pack("<I", 1))).start()
        assert t.wait_irq(5.0) is True
        t.close()
    finally:
        os.close(writer)


def test_missing_files_and_bad_uri(tmp_path):
    with pytest.raises(XdmaTransportError, match="cannot open the XDMA files of xdma:.*nope"):
        XdmaTransport(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="option 'bar' is unknown"):
        parse_uri("/dev/xdma0?bar=1")
    with pytest.raises(ValueError, match="names no device"):
        parse_uri("")
    with pytest.raises(ValueError, match="page size"):
        OsXdmaFiles("/dev/xdma0", user_bytes=100)


class _FakeClient:
    """Just enough of a TwinClient for the stand-in's error paths (no twin needed)."""

    path = "fake"

    class info:
        mem_bytes = 1 << 16

    def __init__(self):
        self.mem = bytearray(1 << 16)

    def mem_write(self, a, d):
        self.mem[a:a + len(d)] = d

    def mem_read(self, a, n):
        return bytes(self.mem[a:a + n])

    def reg_read(self, off):
        return (0x11, 2) if off == 0x40 else (off, 0)

    def reg_write(self, off, v):
        return 0


def test_standin_semantics():
    files = TwinXdmaFiles(_FakeClient(), max_transfer=100)
    t = XdmaTransport(files, memory_bytes=None)
    data = bytes(range(256)) * 3
    t.write_mem(10, data)  # 8 short pwrites
    assert t.read_mem(10, len(data)) == data
    with pytest.raises(XdmaTransportError, match=r"pwrite of .* at 0xFFFF.*errno %d" % errno.EIO):
        t.write_mem(0xFFFF, b"ab")
    assert t.read32(0x40) == 0xFFFFFFFF  # a failed read answers all ones, as over PCIe
    assert t.read32(0x44) == 0x44
    w = files.user()
    with pytest.raises(OSError, match="unaligned"):
        w.read32(2)

    def gone(*a, **k):
        from weft.sim.twin import TwinDied

        raise TwinDied("twin process died during MEM_READ (pid 1 killed by signal SIGKILL)")

    files.client.mem_read = gone  # a card that stopped answering: EIO, reported with the file
    with pytest.raises(XdmaTransportError, match="pread of 5 bytes at 0x10 .*SIGKILL.*errno 5"):
        t.read_mem(0x10, 5)
