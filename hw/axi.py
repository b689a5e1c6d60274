"""AXI4 and AXI4-Lite interface signatures (flat, standard lowercase member names).

Both signatures are written from the **master's** point of view: the master's port is
``Out(sig)``, the slave's ``In(sig)`` (equivalently ``Out(sig.flip())``). Every member has
the standard AXI name in lower case, so an Amaranth port named ``axi`` appears in Verilog as
``axi__awaddr``, ``axi__rdata``, ... (Amaranth joins a port name and a member name with
two underscores). cocotbext-axi finds them with ``AxiBus.from_prefix(dut, "axi_")`` and
``AxiLiteBus.from_prefix(dut, "csr_")`` (it adds one more ``_`` itself).

AXI4 members (master's view; ``Out`` driven by the master):

=========  =======================================  =========================================
channel    master -> slave                          slave -> master
=========  =======================================  =========================================
AW         awid awaddr awlen awsize awburst awlock  awready
           awcache awprot awvalid
W          wdata wstrb wlast wvalid                 wready
B          bready                                   bid bresp bvalid
AR         arid araddr arlen arsize arburst arlock  arready
           arcache arprot arvalid
R          rready                                   rid rdata rresp rlast rvalid
=========  =======================================  =========================================

IDs are at least one bit wide (cocotbext-axi requires ``*id`` signals); weft's masters
drive ID 0 and issue in-order traffic only. AXI4-Lite has the five channels without IDs,
lengths, sizes, bursts and ``last`` (``awprot``/``arprot`` are included).
"""

from __future__ import annotations

import enum

from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["Burst", "Resp", "AXI4Signature", "AXI4LiteSignature", "AXI_MAX_BURST", "AXI_BOUNDARY"]

#: Longest INCR burst in beats (AXI4).
AXI_MAX_BURST = 256
#: Bursts must not cross this address boundary (bytes).
AXI_BOUNDARY = 4096


class Burst(enum.IntEnum):
    """``AxBURST`` encodings."""

    FIXED = 0
    INCR = 1
    WRAP = 2


class Resp(enum.IntEnum):
    """``xRESP`` encodings."""

    OKAY = 0
    EXOKAY = 1
    SLVERR = 2
    DECERR = 3


def _check(name: str, value, allowed) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value not in allowed:
        raise ValueError(f"{name}={value} is not allowed ({allowed_text(allowed)})")
    return value


def allowed_text(allowed) -> str:
    if isinstance(allowed, range):
        return f"allowed: {allowed.start}..{allowed.stop - 1}"
    return "allowed: " + ", ".join(str(a) for a in allowed)


_DATA_WIDTHS = (8, 16, 32, 64, 128, 256, 512, 1024)


class AXI4Signature(wiring.Signature):
    """Full AXI4 master interface.

    Parameters: ``addr_width`` (1..64), ``data_width`` (8..1024, a power of two),
    ``id_width`` (1..16, default 1).
    """

    def __init__(self, *, addr_width: int = 32, data_width: int = 32, id_width: int = 1):
        self.addr_width = _check("addr_width", addr_width, range(1, 65))
        self.data_width = _check("data_width", data_width, _DATA_WIDTHS)
        self.id_width = _check("id_width", id_width, range(1, 17))
        a, d, i = addr_width, data_width, id_width
        super().__init__({
            # write address
            "awid": Out(i), "awaddr": Out(a), "awlen": Out(8), "awsize": Out(3), "awburst": Out(2),
            "awlock": Out(1), "awcache": Out(4), "awprot": Out(3), "awvalid": Out(1), "awready": In(1),
            # write data
            "wdata": Out(d), "wstrb": Out(d // 8), "wlast": Out(1), "wvalid": Out(1), "wready": In(1),
            # write response
            "bid": In(i), "bresp": In(2), "bvalid": In(1), "bready": Out(1),
            # read address
            "arid": Out(i), "araddr": Out(a), "arlen": Out(8), "arsize": Out(3), "arburst": Out(2),
            "arlock": Out(1), "arcache": Out(4), "arprot": Out(3), "arvalid": Out(1), "arready": In(1),
            # read data
            "rid": In(i), "rdata": In(d), "rresp": In(2), "rlast": In(1), "rvalid": In(1), "rready": Out(1),
        })

    def __eq__(self, other):
        return (isinstance(other, AXI4Signature) and self.addr_width == other.addr_width
                and self.data_width == other.data_width and self.id_width == other.id_width)

    def __hash__(self):
        return hash((type(self), self.addr_width, self.data_width, self.id_width))

    def __repr__(self):
        return f"AXI4Signature(addr_width={self.addr_width}, data_width={self.data_width}, id_width={self.id_width})"


class AXI4LiteSignature(wiring.Signature):
    """AXI4-Lite master interface. ``addr_width`` 1..64, ``data_width`` 32 or 64."""

    def __init__(self, *, addr_width: int = 12, data_width: int = 32):
        self.addr_width = _check("addr_width", addr_width, range(1, 65))
        self.data_width = _check("data_width", data_width, (32, 64))
        a, d = addr_width, data_width
        super().__init__({
            "awaddr": Out(a), "awprot": Out(3), "awvalid": Out(1), "awready": In(1),
            "wdata": Out(d), "wstrb": Out(d // 8), "wvalid": Out(1), "wready": In(1),
            "bresp": In(2), "bvalid": In(1), "bready": Out(1),
            "araddr": Out(a), "arprot": Out(3), "arvalid": Out(1), "arready": In(1),
            "rdata": In(d), "rresp": In(2), "rvalid": In(1), "rready": Out(1),
        })

    def __eq__(self, other):
        return (isinstance(other, AXI4LiteSignature) and self.addr_width == other.addr_width
                and self.data_width == other.data_width)

    def __hash__(self):
        return hash((type(self), self.addr_width, self.data_width))

    def __repr__(self):
        return f"AXI4LiteSignature(addr_width={self.addr_width}, data_width={self.data_width})"
