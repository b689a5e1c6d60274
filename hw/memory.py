"""On-chip memories: the banked scratchpad and the accumulator with read-modify-write.

Both are built from :class:`amaranth.lib.memory.Memory` banks. Rows are interleaved:
row ``a`` lives in bank ``a % banks`` at bank row ``a // banks``, so consecutive rows
hit different banks and ports that walk rows in step rarely collide.

Common port protocol (``read_signature`` / ``write_signature``, the requester's view):

* a request is ``valid`` + ``addr`` (+ ``data`` for writes); it is accepted in a cycle where
  ``valid & ready``. ``ready`` is combinational from the other ports' requests: port 0
  has the highest priority, port i is ready unless a lower-numbered port requests the
  same bank in the same cycle (each bank serves one read and one write per cycle);
* **read latency 1**: for a read accepted in cycle c, ``rvalid`` is high in cycle c + 1 and
  ``rdata`` holds the row;
* reads are *transparent*: a read accepted in the same cycle as a write to the same row
  returns the newly written data. Writes take effect at the end of their cycle.

Throughput: every port moves one row per cycle when there is no bank conflict.
"""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, Value, signed
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .config import AcceleratorConfig

__all__ = ["read_signature", "write_signature", "update_signature", "Scratchpad", "Accumulator"]


def read_signature(depth: int, row: data.ArrayLayout) -> wiring.Signature:
    """Read port, requester's view: ``valid``, ``addr``, ``ready`` (in), ``rvalid`` (in), ``rdata`` (in)."""
    return wiring.Signature({
        "valid": Out(1), "addr": Out(range(depth)), "ready": In(1),
        "rvalid": In(1), "rdata": In(row),
    })


def write_signature(depth: int, row: data.ArrayLayout) -> wiring.Signature:
    """Write port, requester's view: ``valid``, ``addr``, ``data``, ``ready`` (in)."""
    return wiring.Signature({"valid": Out(1), "addr": Out(range(depth)), "data": Out(row), "ready": In(1)})


def update_signature(depth: int, row: data.ArrayLayout) -> wiring.Signature:
    """Accumulator update, requester's view: ``valid``, ``addr``, ``data``, ``accumulate``; always accepted."""
    return wiring.Signature({"valid": Out(1), "addr": Out(range(depth)), "data": Out(row), "accumulate": Out(1)})


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name}={value} is outside [{lo}, {hi if hi is not None else 'inf'}]")
    return value


def _check_geometry(depth: int, banks: int) -> int:
    _check_int("depth", depth, 1, 1 << 20)
    _check_int("banks", banks, 1, 32)
    if banks & (banks - 1):
        raise ValueError(f"banks={banks} is not a power of two")
    if depth % banks:
        raise ValueError(f"banks={banks} does not divide depth={depth}")
    return banks.bit_length() - 1


class _Banked:
    """Shared elaboration: banks, priority arbitration, read-data steering."""

    def _split(self, addr):
        if self.bank_bits == 0:
            return 0, addr
        return addr[:self.bank_bits], addr[self.bank_bits:]

    def _arbitrate(self, m: Module, ports, kind: str):
        """ports -> (grants, banks_of_ports, rows_of_ports); drives each port's ready."""
        grants, banks, rows = [], [], []
        for i, port in enumerate(ports):
            bank, row = self._split(port.addr)
            blocked = 0
            for j in range(i):
                other = banks[j]
                blocked = blocked | (ports[j].valid & (other == bank))
            grant = Signal(name=f"{kind}{i}_grant")
            m.d.comb += [port.ready.eq(~blocked), grant.eq(port.valid & ~blocked)]
            grants.append(grant)
            banks.append(bank)
            rows.append(row)
        return grants, banks, rows

    def _connect_reads(self, m: Module, ports, bank_read_ports):
        """Route arbitrated read requests to each bank's read port; steer data back (latency 1)."""
        grants, banks, rows = self._arbitrate(m, ports, "read")
        for b, rp in enumerate(bank_read_ports):
            m.d.comb += rp.en.eq(0)
            for i in reversed(range(len(ports))):  # lowest index assigned last: wins
                with m.If(grants[i] & (banks[i] == b)):
                    m.d.comb += [rp.addr.eq(rows[i]), rp.en.eq(1)]
        for i, port in enumerate(ports):
            sel = Signal(range(max(2, self.banks)), name=f"read{i}_bank")
            m.d.sync += [port.rvalid.eq(grants[i]), sel.eq(banks[i])]
            rdata = Value.cast(bank_read_ports[0].data)
            for b in range(1, self.banks):
                rdata = Mux(sel == b, Value.cast(bank_read_ports[b].data), rdata)
            m.d.comb += port.rdata.eq(rdata)


class Scratchpad(_Banked, wiring.Component):
    """Banked scratchpad of ``depth`` int8 rows of ``row_elems`` elements.

    Ports: ``read0..`` (:func:`read_signature`, flipped) and ``write0..``
    (:func:`write_signature`, flipped); see the module docstring for the protocol.
    Read latency 1 cycle; each port one row per cycle without bank conflicts; port 0
    has priority. Build with :meth:`from_config` for ``config.sp_rows`` x ``config.sp_row_elems``.
    """

    def __init__(self, depth: int, row_elems: int, banks: int = 1, *, read_ports: int = 1, write_ports: int = 1):
        self.bank_bits = _check_geometry(depth, banks)
        self.depth, self.banks = depth, banks
        self.row_elems = _check_int("row_elems", row_elems, 1, 1024)
        self.read_ports = _check_int("read_ports", read_ports, 1, 8)
        self.write_ports = _check_int("write_ports", write_ports, 1, 8)
        self.row_layout = data.ArrayLayout(signed(8), row_elems)
        #: Cycles from an accepted read to ``rvalid``/``rdata``.
        self.read_latency = 1
        members = {}
        for i in range(read_ports):
            members[f"read{i}"] = In(read_signature(depth, self.row_layout))
        for i in range(write_ports):
            members[f"write{i}"] = In(write_signature(depth, self.row_layout))
        super().__init__(members)

    @classmethod
    def from_config(cls, config: AcceleratorConfig, **kwargs) -> "Scratchpad":
        if not isinstance(config, AcceleratorConfig):
            raise ValueError(f"expected an AcceleratorConfig, got {type(config).__name__}")
        return cls(config.sp_rows, config.sp_row_elems, config.scratchpad.banks, **kwargs)

    def elaborate(self, platform):
        m = Module()
        reads = [getattr(self, f"read{i}") for i in range(self.read_ports)]
        writes = [getattr(self, f"write{i}") for i in range(self.write_ports)]
        wgrants, wbanks, wrows = self._arbitrate(m, writes, "write")
        bank_reads = []
        for b in range(self.banks):
            mem = Memory(shape=self.row_layout, depth=self.depth // self.banks, init=[])
            m.submodules[f"bank{b}"] = mem
            wp = mem.write_port()
            m.d.comb += wp.en.eq(0)
            for i in reversed(range(len(writes))):
                with m.If(wgrants[i] & (wbanks[i] == b)):
                    m.d.comb += [wp.addr.eq(wrows[i]), wp.data.eq(writes[i].data), wp.en.eq(1)]
            bank_reads.append(mem.read_port(transparent_for=(wp,)))
        self._connect_reads(m, reads, bank_reads)
        return m


class Accumulator(_Banked, wiring.Component):
    """Banked accumulator of ``depth`` rows of ``cols`` int32, with read-modify-write updates.

    Ports:

    * ``update`` (:func:`update_signature`, flipped): ``valid``, ``addr``, ``data`` (cols x
      int32), ``accumulate``. Always accepted, one row per cycle (it is the systolic
      array's output, which cannot stall). ``accumulate = 0`` writes ``data``;
      ``accumulate = 1`` writes ``row + data`` modulo 2**32 per element (MATMUL semantics).
      An update presented in cycle c reads the row in cycle c, adds in cycle c + 1 and
      writes at the end of cycle c + 1 (:attr:`update_latency` = 2). Back-to-back updates of
      the same row (any distance) are exact with no stall: the read in cycle c + 1 is
      transparent to the write of cycle c + 1 (write-to-read forwarding inside the bank);
    * ``read0..`` (:func:`read_signature`, flipped): read latency 1, priority by index;
      a read accepted in cycle c sees every update presented in cycle c - 1 or earlier.
    """

    def __init__(self, depth: int, cols: int, banks: int = 1, *, read_ports: int = 1):
        self.bank_bits = _check_geometry(depth, banks)
        self.depth, self.banks = depth, banks
        self.cols = _check_int("cols", cols, 1, 256)
        self.read_ports = _check_int("read_ports", read_ports, 1, 8)
        self.row_layout = data.ArrayLayout(signed(32), cols)
        self.read_latency = 1
        #: Cycles from an update to the end of the cycle that writes it.
        self.update_latency = 2
        members = {"update": In(update_signature(depth, self.row_layout))}
        for i in range(read_ports):
            members[f"read{i}"] = In(read_signature(depth, self.row_layout))
        super().__init__(members)

    @classmethod
    def from_config(cls, config: AcceleratorConfig, **kwargs) -> "Accumulator":
        if not isinstance(config, AcceleratorConfig):
            raise ValueError(f"expected an AcceleratorConfig, got {type(config).__name__}")
        return cls(config.acc_rows, config.acc_row_elems, config.accumulator.banks, **kwargs)

    def elaborate(self, platform):
        m = Module()
        reads = [getattr(self, f"read{i}") for i in range(self.read_ports)]
        up = self.update
        bank, row = self._split(up.addr)

        # stage 1 registers (the RMW read is in flight)
        v1 = Signal()
        acc1 = Signal()
        bank1 = Signal(range(max(2, self.banks)))
        row1 = Signal(range(self.depth // self.banks))
        data1 = Signal(self.row_layout)
        m.d.sync += [v1.eq(up.valid), acc1.eq(up.accumulate), bank1.eq(bank), row1.eq(row), data1.eq(up.data)]

        bank_reads = []
        old_rows = []
        wps = []
        for b in range(self.banks):
            mem = Memory(shape=self.row_layout, depth=self.depth // self.banks, init=[])
            m.submodules[f"bank{b}"] = mem
            wp = mem.write_port()
            rmw = mem.read_port(transparent_for=(wp,))
            m.d.comb += [rmw.addr.eq(row), rmw.en.eq(up.valid & (bank == b))]
            old_rows.append(rmw.data)
            wps.append(wp)
            bank_reads.append(mem.read_port(transparent_for=(wp,)))

        old = Signal(self.row_layout)
        m.d.comb += old.eq(old_rows[0])
        for b in range(1, self.banks):
            with m.If(bank1 == b):
                m.d.comb += old.eq(old_rows[b])
        new = Signal(self.row_layout)
        for j in range(self.cols):
            m.d.comb += new[j].eq(Mux(acc1, old[j] + data1[j], data1[j]))  # truncates: mod 2**32
        for b, wp in enumerate(wps):
            m.d.comb += [wp.addr.eq(row1), wp.data.eq(new), wp.en.eq(v1 & (bank1 == b))]

        self._connect_reads(m, reads, bank_reads)
        return m
