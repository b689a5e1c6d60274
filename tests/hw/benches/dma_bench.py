"""cocotb bench for weft.hw.dma.DMA (run by tests/hw/test_dma.py).

Memory: cocotbext-axi's AxiRam on the ``axi__*`` ports (it asserts that no burst crosses
4 KiB and that WLAST matches AWLEN). Reference model: the same 2-D strided copy done on
Python ``bytearray``s: a read of (addr, rows, n, stride) yields, for r < rows, the bytes
``mem[addr + r*stride : addr + r*stride + n]`` as beats of B bytes from lane 0; a write
stores the rows in order (later rows win where rows overlap).

Timing convention (weft.sim.benchlib): inputs change at falling edges; a handshake is
sampled in the ReadOnly phase before the next rising edge.
"""

from __future__ import annotations

import collections
import random

import cocotb
from cocotb.triggers import FallingEdge, ReadOnly
from cocotbext.axi import AxiBus, AxiRam

from weft.sim.benchlib import Cycle, params

P = params()
W = P["data_bits"]
B = W // 8
MAXN = P["max_row_bytes"]
NBITS = MAXN.bit_length()
BYTES_BITS = B.bit_length()
SEED = P.get("seed", 1)
MEM_SIZE = 1 << 16
ERR_BASE = 0xC000  # accesses to [ERR_BASE, ERR_BASE + 4096) get SLVERR in test_errors


# ---------------------------------------------------------------------- packing
def pack_cmd(addr: int, rows: int, n: int, stride: int) -> int:
    return addr | rows << 32 | n << 48 | stride << (48 + NBITS)


def pack_beat(data: bytes, nbytes: int, last: bool) -> int:
    return int.from_bytes(data.ljust(B, b"\0"), "little") | nbytes << W | int(last) << (W + BYTES_BITS)


def unpack_beat(v: int) -> tuple[bytes, int, int]:
    data = (v & ((1 << W) - 1)).to_bytes(B, "little")
    return data, (v >> W) & ((1 << BYTES_BITS) - 1), (v >> (W + BYTES_BITS)) & 1


# ---------------------------------------------------------------------- stream drivers
class Source:
    """Drives ``<prefix>__valid/__payload``; presents queued payloads with probability ``p``."""

    def __init__(self, dut, prefix: str, rng: random.Random, p: float = 1.0):
        self.valid = getattr(dut, f"{prefix}__valid")
        self.payload = getattr(dut, f"{prefix}__payload")
        self.ready = getattr(dut, f"{prefix}__ready")
        self.clk = dut.clk
        self.rng, self.p = rng, p
        self.queue: collections.deque[int] = collections.deque()
        self.cur: int | None = None
        self.sent = 0
        self.valid.value = 0

    def idle(self) -> bool:
        return self.cur is None and not self.queue

    async def run(self):
        while True:
            await FallingEdge(self.clk)
            if self.cur is None and self.queue and self.rng.random() < self.p:
                self.cur = self.queue.popleft()
            self.valid.value = int(self.cur is not None)
            if self.cur is not None:
                self.payload.value = self.cur
            await ReadOnly()
            if self.cur is not None and int(self.ready.value):
                self.cur = None
                self.sent += 1


class Sink:
    """Drives ``<prefix>__ready`` high with probability ``p``; calls ``on_beat(payload, cycle)``."""

    def __init__(self, dut, prefix: str, rng: random.Random, on_beat, p: float = 1.0):
        self.valid = getattr(dut, f"{prefix}__valid")
        self.payload = getattr(dut, f"{prefix}__payload")
        self.ready = getattr(dut, f"{prefix}__ready")
        self.clk = dut.clk
        self.rng, self.p, self.on_beat = rng, p, on_beat
        self.ready.value = 0
        self.cycle = 0

    async def run(self):
        while True:
            await FallingEdge(self.clk)
            self.cycle += 1
            r = self.rng.random() < self.p
            self.ready.value = int(r)
            await ReadOnly()
            if r and int(self.valid.value):
                self.on_beat(int(self.payload.value), self.cycle)


def pauser(rng: random.Random, p: float):
    while True:
        yield rng.random() < p


class Env:
    def __init__(self, dut, seed: int, *, p_pause: float = 0.0, p_valid: float = 1.0, p_ready: float = 1.0,
                 p_cmd: float = 1.0):
        self.dut = dut
        self.rng = random.Random(seed)
        self.ram = AxiRam(AxiBus.from_prefix(dut, "axi_"), dut.clk, dut.rst, size=MEM_SIZE)
        self.model = bytearray(self.rng.randbytes(MEM_SIZE))
        self.ram.write(0, bytes(self.model))
        if p_pause:
            for ch in (self.ram.write_if.aw_channel, self.ram.write_if.w_channel, self.ram.write_if.b_channel,
                       self.ram.read_if.ar_channel, self.ram.read_if.r_channel):
                ch.set_pause_generator(pauser(random.Random(self.rng.random()), p_pause))
        self.rd_cmd = Source(dut, "rd_cmd", random.Random(self.rng.random()), p_cmd)
        self.wr_cmd = Source(dut, "wr_cmd", random.Random(self.rng.random()), p_cmd)
        self.wr_data = Source(dut, "wr_data", random.Random(self.rng.random()), p_valid)
        self.rd_rows: collections.deque[bytes] = collections.deque()  # expected rows, in order
        self.rd_partial = bytearray()
        self.rd_beats = 0
        self.rd_bytes = 0
        self.rd_rows_done = 0
        self.rd_first_cycle = self.rd_last_cycle = None
        self.rd_sink = Sink(dut, "rd_data", random.Random(self.rng.random()), self._on_rd, p_ready)
        self.done: list[tuple[int, int]] = []  # (error, cycle)
        self.done_sink = Sink(dut, "wr_done", random.Random(self.rng.random()),
                              lambda v, c: self.done.append((v & 1, c)), p_ready)

    async def start(self):
        clk = Cycle(self.dut)
        await clk.start(reset_cycles=4)
        for task in (self.rd_cmd, self.wr_cmd, self.wr_data, self.rd_sink, self.done_sink):
            cocotb.start_soon(task.run())
        return clk

    # ---- read side
    def _on_rd(self, v: int, cycle: int):
        data, nbytes, last = unpack_beat(v)
        assert self.rd_rows, f"unexpected rd_data beat {data.hex()} (no row expected)"
        row = self.rd_rows[0]
        off = len(self.rd_partial)
        want = min(B, len(row) - off)
        assert nbytes == want, f"row {self.rd_rows_done}: beat at byte {off} has bytes={nbytes}, expected {want}"
        assert last == (off + want == len(row)), f"row {self.rd_rows_done}: last={last} at byte {off} of {len(row)}"
        self.rd_partial += data[:nbytes]
        self.rd_beats += 1
        self.rd_bytes += nbytes
        if self.rd_first_cycle is None:
            self.rd_first_cycle = cycle
        self.rd_last_cycle = cycle
        if last:
            got = bytes(self.rd_partial)
            assert got == row, f"row {self.rd_rows_done}: got {got.hex()}, expected {row.hex()}"
            self.rd_rows.popleft()
            self.rd_partial = bytearray()
            self.rd_rows_done += 1

    def read(self, addr: int, rows: int, n: int, stride: int):
        """Queue a read command; the expected rows come from the model memory now."""
        self.rd_cmd.queue.append(pack_cmd(addr, rows, n, stride))
        if n:
            for r in range(rows):
                a = (addr + r * stride) % (1 << 32)
                self.rd_rows.append(bytes(self.model[a:a + n]))

    # ---- write side
    def write(self, addr: int, rows: int, n: int, stride: int, apply: bool = True) -> list[bytes]:
        self.wr_cmd.queue.append(pack_cmd(addr, rows, n, stride))
        data = []
        if n:
            for r in range(rows):
                row = self.rng.randbytes(n)
                data.append(row)
                for k in range(0, n, B):
                    chunk = row[k:k + B]
                    self.wr_data.queue.append(pack_beat(chunk, len(chunk), k + B >= n))
                if apply:
                    a = addr + r * stride
                    self.model[a:a + n] = row
        return data

    async def wait_until(self, cond, limit: int, what: str):
        for _ in range(limit):
            if cond():
                return
            await FallingEdge(self.dut.clk)
        raise AssertionError(f"timeout after {limit} cycles waiting for {what}")

    def check_memory(self, lo: int = 0, hi: int = MEM_SIZE):
        got = self.ram.read(lo, hi - lo)
        want = bytes(self.model[lo:hi])
        if got != want:
            bad = next(i for i in range(hi - lo) if got[i] != want[i])
            raise AssertionError(f"memory differs first at 0x{lo + bad:x}: got {got[bad:bad + 16].hex()}, "
                                 f"expected {want[bad:bad + 16].hex()}")


# ---------------------------------------------------------------------- random patterns
def random_pattern(rng: random.Random, lo: int, hi: int, *, overlap: bool) -> tuple[int, int, int, int]:
    """(addr, rows, n, stride) inside [lo, hi), often unaligned and crossing 4 KiB pages."""
    n = rng.choice([1, 2, B - 1 or 1, B, B + 1, 2 * B + 3, MAXN, MAXN - 1, rng.randint(1, MAXN), rng.randint(1, MAXN)])
    n = max(1, min(n, MAXN))
    rows = rng.choice([0, 1, 1, 2, 3, 4, 5, 7])
    kinds = ["eq", "gt", "page", "zero"] + (["lt"] if overlap else [])
    kind = rng.choice(kinds)
    stride = {"eq": n, "gt": n + rng.randint(1, 3 * B), "page": rng.randint(max(n, 4000), 4200), "zero": 0,
              "lt": rng.randint(1, max(1, n - 1))}[kind]
    span = (max(rows, 1) - 1) * stride + n
    if span >= hi - lo:
        rows, stride, span = 1, n, n
    if rng.random() < 0.5:  # place a row across a page boundary
        page = rng.randrange((lo + 4095) // 4096 * 4096, hi, 4096) if hi - lo > 4096 else lo
        addr = page - rng.randint(1, n) if n > 1 else page - 1
        addr = max(lo, min(addr, hi - span))
    else:
        addr = rng.randint(lo, hi - span)
    return addr, rows, n, stride


# ---------------------------------------------------------------------- tests
@cocotb.test()
async def test_read_random(dut):
    """Random unaligned 2-D reads with backpressure on AR, R and rd_data."""
    env = Env(dut, SEED, p_pause=0.3, p_ready=0.7, p_cmd=0.6)
    await env.start()
    rng = random.Random(SEED + 1)
    for _ in range(P.get("commands", 40)):
        env.read(*random_pattern(rng, 0, MEM_SIZE, overlap=True))
    env.read(100, 0, 5, 5)  # rows == 0
    env.read(0xFFF, 3, 2, 0)  # stride 0 across a page
    total_rows = len(env.rd_rows)
    await env.wait_until(lambda: not env.rd_rows and env.rd_cmd.idle(), 40000, "read data")
    for _ in range(20):
        await FallingEdge(dut.clk)
    assert not int(dut.rd_data__valid.value), "extra rd_data beat"
    assert not int(dut.rd_error.value)
    assert not int(dut.rd_busy.value)
    dut._log.info("read %d rows, %d beats", total_rows, env.rd_beats)
    assert int(dut.bytes_read.value) == env.rd_bytes


@cocotb.test()
async def test_write_random(dut):
    """Random unaligned 2-D writes (overlapping and stride-0 rows too) with backpressure."""
    env = Env(dut, SEED + 10, p_pause=0.3, p_valid=0.7, p_ready=0.7, p_cmd=0.6)
    await env.start()
    rng = random.Random(SEED + 11)
    ncmd = P.get("commands", 40)
    total = 0
    for _ in range(ncmd):
        addr, rows, n, stride = random_pattern(rng, 0, MEM_SIZE, overlap=True)
        env.write(addr, rows, n, stride)
        total += rows * n
    env.write(100, 0, 5, 5)  # rows == 0: done without traffic
    env.write(0x1FFE, 3, 5, 0)  # stride 0 across a page: last row wins
    total += 15
    await env.wait_until(lambda: len(env.done) == ncmd + 2, 60000, "write completions")
    assert all(err == 0 for err, _ in env.done), env.done
    assert env.wr_data.idle(), "the DMA did not take all row beats"
    env.check_memory()
    assert int(dut.bytes_written.value) == total
    assert not int(dut.wr_error.value)


@cocotb.test()
async def test_read_write_concurrent(dut):
    """Reads of the low half while writes fill the high half, both with backpressure."""
    env = Env(dut, SEED + 20, p_pause=0.2, p_valid=0.8, p_ready=0.8)
    await env.start()
    rng = random.Random(SEED + 21)
    half = MEM_SIZE // 2
    n_wr = P.get("commands", 40) // 2
    for _ in range(n_wr):
        env.read(*random_pattern(rng, 0, half, overlap=True))
        env.write(*random_pattern(rng, half, MEM_SIZE, overlap=False))
    await env.wait_until(lambda: not env.rd_rows and len(env.done) == n_wr, 60000, "both sides")
    env.check_memory()


@cocotb.test()
async def test_errors(dut):
    """SLVERR responses: wr_done.error for the commands that touch the bad window, sticky flags."""
    env = Env(dut, SEED + 30)
    orig_w, orig_r = env.ram.write_if._write, env.ram.read_if._read

    async def bad_write(address, data):
        if ERR_BASE <= address < ERR_BASE + 4096:
            raise ValueError("injected")
        await orig_w(address, data)

    async def bad_read(address, length):
        if ERR_BASE <= address < ERR_BASE + 4096:
            raise ValueError("injected")
        return await orig_r(address, length)

    env.ram.write_if._write = bad_write
    env.ram.read_if._read = bad_read
    await env.start()
    env.write(0x100, 2, 7, 64)
    env.write(ERR_BASE - 3, 2, 9, 100)  # first row straddles into the bad window
    env.write(0x300, 1, 7, 0)
    await env.wait_until(lambda: len(env.done) == 3, 5000, "write completions")
    assert [e for e, _ in env.done] == [0, 1, 0], env.done
    assert int(dut.wr_error.value) == 1
    assert int(dut.rd_error.value) == 0
    env.read(0x40, 1, 8, 0)
    await env.wait_until(lambda: not env.rd_rows, 5000, "good read")
    assert int(dut.rd_error.value) == 0
    got = []  # the bad row's data is undefined: only its beats are checked
    env._on_rd = lambda v, c: got.append(unpack_beat(v))  # noqa: E731
    env.rd_sink.on_beat = env._on_rd
    env.rd_cmd.queue.append(pack_cmd(ERR_BASE + 5, 1, 2 * B, 0))
    await env.wait_until(lambda: got and got[-1][2] == 1, 5000, "bad read")
    assert int(dut.rd_error.value) == 1
    assert sum(b for _, b, _ in got) == 2 * B


async def _watch_w(dut, stalls: dict):
    while True:
        await FallingEdge(dut.clk)
        await ReadOnly()
        if int(dut.wr_busy.value):
            wv, wr = int(dut.axi__wvalid.value), int(dut.axi__wready.value)
            stalls["no wvalid"] += not wv
            stalls["no wready"] += wv and not wr
            stalls["no awready"] += int(dut.axi__awvalid.value) and not int(dut.axi__awready.value)


@cocotb.test()
async def test_throughput(dut):
    """No backpressure: bus beats per cycle in steady state, and first-beat latency."""
    env = Env(dut, SEED + 40)
    await env.start()

    # latency: command to first rd_data beat, one row
    c0 = env.rd_sink.cycle
    env.read(0x1000, 1, B, B)
    await env.wait_until(lambda: not env.rd_rows, 2000, "latency read")
    lat = env.rd_first_cycle - c0
    dut._log.info("read latency (cmd valid -> first rd_data beat, AxiRam): %d cycles", lat)

    results = {}
    cases = (("read aligned", MAXN, 0x2000, False), ("read unaligned", MAXN, 0x2003, False),
             ("write aligned", MAXN, 0x6000, True), ("write unaligned", MAXN, 0x6005, True),
             ("read 1-beat rows", B, 0x8000, False), ("write 1-beat rows", B, 0x9000, True))
    for name, n, addr, write in cases:
        rows = max(8, 2048 // n) if n == B else max(8, 2048 // MAXN)
        if write:
            t0 = env.done_sink.cycle
            stalls = {"no wvalid": 0, "no wready": 0, "no awready": 0}
            mon = cocotb.start_soon(_watch_w(dut, stalls))
            env.write(addr, rows, n, n)
            await env.wait_until(lambda: len(env.done) == 1, 40000, "write done")
            mon.cancel()
            cycles = env.done[0][1] - t0
            env.done.clear()
            dut._log.info("%s: W channel stall cycles %s", name, stalls)
        else:
            env.rd_first_cycle = None
            env.read(addr, rows, n, n)
            await env.wait_until(lambda: not env.rd_rows, 40000, "read data")
            cycles = env.rd_last_cycle - env.rd_first_cycle + 1
        bus_beats = rows * (-(-((addr % B) + n) // B))
        results[name] = bus_beats / cycles
        dut._log.info("%s: %d rows x %d bytes, %d bus beats in %d cycles: %.3f beats/cycle",
                      name, rows, n, bus_beats, cycles, bus_beats / cycles)
    env.check_memory()
    floor = P.get("min_beats_per_cycle", 0.0)
    for name, rate in results.items():
        if "1-beat" in name:  # per-row overheads: reported, not asserted
            continue
        assert rate >= floor, f"{name}: {rate:.3f} beats/cycle < {floor}"
