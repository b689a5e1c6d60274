"""System twin: build cache, socket protocol, AXI memory model, register access, faults.

Runs against the stand-in top (registers + DMA with the core's ports). The tiny
configuration (32-bit bus, 16 MiB) is built once (~10-20 s) and cached; the default
configuration (128-bit bus: Verilator's wide-port path) adds one more cached build.
"""

from __future__ import annotations

import os
import signal
import struct
import threading
import time

import numpy as np
import pytest

from weft.hw.config import load_config
from weft.hw.registers import ID_VALUE, VERSION_MAJOR, VERSION_MINOR
from weft.sim.twin import (HEADER, Op, RunReason, StatusCode, Twin, TwinBuildError, TwinDied, TwinRequestError,
                           TwinTimeout, _have_header, build, registered_inputs)
from weft.sim.twin.standin import StandInTop

from .twin_fixtures import copy_model, launch_standin, standin, start_copy

pytestmark = [pytest.mark.rtl, pytest.mark.verilator_only]  # the twin is a Verilator C++ model

TINY = load_config("tiny")


@pytest.fixture
def client(twin):
    twin.client.reset(4)
    twin.client.set_latency(0, 0)
    return twin.client


# ---------------------------------------------------------------------- build and process
def test_build_is_cached(twin):
    from weft.sim.rtl import to_verilog

    again = build(to_verilog(StandInTop(TINY), "weft_top"), "weft_top")
    assert not again.built and again.executable == twin.build.executable
    assert again.executable.exists()


def test_harness_change_relinks_without_rebuilding_the_model(twin, monkeypatch):
    """The Verilated model is cached by Verilog and options; a harness change recompiles the
    harness and relinks into a new executable next to the old one, leaving the model's objects."""
    import weft.sim.twin as twin_mod
    from weft.sim.rtl import to_verilog

    verilog = to_verilog(StandInTop(TINY), "weft_top")
    obj = twin.build.executable.parent
    model_objs = {p: p.stat().st_mtime_ns for p in obj.glob("Vtwin*.o")}
    assert model_objs
    monkeypatch.setattr(twin_mod, "_harness_key", lambda: "0123456789abcdef")
    relinked = build(verilog, "weft_top")
    try:
        assert relinked.built and relinked.directory == twin.build.directory
        assert relinked.executable != twin.build.executable and relinked.executable.exists()
        assert twin.build.executable.exists()  # the running twin's executable stays
        assert {p: p.stat().st_mtime_ns for p in obj.glob("Vtwin*.o")} == model_objs
        assert not build(verilog, "weft_top").built
    finally:
        relinked.executable.unlink(missing_ok=True)


def test_bad_toplevel_name_is_refused():
    with pytest.raises(ValueError, match="no module named"):
        build("module a(input clk); endmodule\n", "b")


_SMALL_TOP = """module top(clk, rst, a, y);
  input clk;
  input rst;
  input [7:0] a;
  output [7:0] y;
  reg [7:0] r = 8'h00;
  always @(posedge clk) r <= rst ? 8'h00 : a;
  assign y = r;
endmodule
"""


def test_registered_inputs_puts_a_register_before_every_input_but_clk():
    import re

    text = registered_inputs(_SMALL_TOP, "top")
    assert "module top__core(clk, rst, a, y);" in text  # the original, renamed
    wrapper = text[text.index("\nmodule top("):]
    assert re.search(r"input \[7:0\] a;", wrapper) and re.search(r"output \[7:0\] y;", wrapper)
    assert "always @(posedge clk) rst__q <= rst;" in wrapper
    assert "always @(posedge clk) a__q <= a;" in wrapper
    assert "clk__q" not in wrapper and "y__q" not in wrapper
    assert "top__core core (.clk(clk), .rst(rst__q), .a(a__q), .y(y));" in wrapper


def test_registered_inputs_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="no module named"):
        registered_inputs(_SMALL_TOP, "other")
    with pytest.raises(ValueError, match=r"ports \['y'\]"):
        registered_inputs(_SMALL_TOP.replace("output [7:0] y;", "output logic [7:0] y;"), "top")
    with pytest.raises(ValueError, match="no clk input"):
        registered_inputs(_SMALL_TOP.replace("clk", "clock"), "top")


def test_hello_reports_the_configuration(client):
    info = client.hello()
    assert info.bus_bytes == TINY.bus_bytes
    assert info.mem_bytes == TINY.device_memory_bytes
    assert info.protocol == 1


def test_close_removes_the_socket_and_its_folder():
    twin = launch_standin("tiny")
    path, folder = twin.socket_path, twin.workdir
    assert path.exists()
    twin.close()
    assert twin.process.returncode == 0
    assert not path.exists() and not folder.exists()


def test_sigterm_removes_the_socket():
    with standin("tiny") as twin:
        twin.process.send_signal(signal.SIGTERM)
        twin.process.wait(timeout=5)
        assert not twin.socket_path.exists()
        with pytest.raises(TwinDied):
            twin.client.cycles()


# ---------------------------------------------------------------------- registers
def test_identity_and_scratch_registers(client):
    assert client.reg_read(0x00) == (ID_VALUE, 0)
    assert client.reg_read(0x04) == (VERSION_MAJOR << 16 | VERSION_MINOR, 0)
    assert client.reg_read(0x08) == (TINY.hash32, 0)
    for value in (0, 0xFFFFFFFF, 0xA5A55A5A, 0x12345678):
        assert client.reg_write(0x28, value) == 0
        assert client.reg_read(0x28) == (value, 0)
    assert client.reg_write(0x28, 0xCAFEBABE, strobe=0b0101) == 0  # byte strobes honoured
    assert client.reg_read(0x28)[0] == 0x12FE56BE


def test_unmapped_register_is_slverr(client):
    assert client.reg_read(0x3F0) == (0, 2)
    assert client.reg_write(0x3F0, 1) == 2


def test_reset_restores_registers(client):
    client.reg_write(0x28, 0x1234)
    client.reset(4)
    assert client.reg_read(0x28)[0] == 0


# ---------------------------------------------------------------------- memory
def test_memory_patterns_match_numpy(client):
    rng = np.random.default_rng(7)
    size = TINY.device_memory_bytes
    model = np.zeros(size, np.uint8)
    client.reset(4, clear_memory=True)
    lengths = [1, 2, 3, 5, 7, 64, 255, 4097, 65_537, 1 << 20]
    lengths += [int(x) for x in rng.integers(1, 1 << 16, 6)]
    for n in lengths:
        addr = int(rng.integers(0, size - n))
        data = rng.integers(0, 256, n, dtype=np.uint8)
        client.mem_write(addr, data.tobytes())
        model[addr:addr + n] = data
        a2 = int(rng.integers(0, size - n))
        assert client.mem_read(a2, n) == model[a2:a2 + n].tobytes()
        assert client.mem_read(addr, n) == data.tobytes()
    assert client.mem_read(size - 1, 1) == model[-1:].tobytes()
    assert client.mem_read(0, size) == model.tobytes()  # the whole image, in frames


def test_memory_out_of_range_is_refused(client):
    size = TINY.device_memory_bytes
    with pytest.raises(TwinRequestError, match="outside device memory") as info:
        client.mem_read(size - 4, 8)
    assert info.value.status == StatusCode.OUT_OF_RANGE
    with pytest.raises(TwinRequestError, match="outside device memory"):
        client.mem_write(size, b"x")
    assert client.mem_read(0, 0) == b""
    assert client.reg_read(0)[0] == ID_VALUE  # the connection survives a refused request


def test_clear_memory_on_reset(client):
    client.mem_write(100, b"\xff" * 16)
    client.reset(2)
    assert client.mem_read(100, 16) == b"\xff" * 16
    client.reset(2, clear_memory=True)
    assert client.mem_read(100, 16) == bytes(16)


# ---------------------------------------------------------------------- clock loop and DMA through the AXI model
def test_run_budget_and_cycle_count(client):
    c0 = client.cycles()
    r = client.run(1000)
    assert (r.cycles_run, r.reason, r.irq) == (1000, RunReason.BUDGET, False)
    assert r.cycle == c0 + 1000 == client.cycles()
    lo = client.reg_read(0x40)[0]  # CYCLES_LO: the design's own cycle counter agrees
    assert 1000 <= lo <= client.cycles()


def test_run_wall_limit(client):
    t0 = time.monotonic()
    r = client.run(1 << 50, wall_s=0.3)
    assert r.reason == RunReason.WALL
    assert time.monotonic() - t0 < 3


@pytest.mark.parametrize("config_name", ["tiny", "default"])
@pytest.mark.parametrize("latency", [0, 9])
def test_dma_copy_matches_bytes_model(config_name, latency, request):
    config = load_config(config_name)
    twin = request.getfixturevalue("twin") if config_name == "tiny" else _default_twin(request)
    c = twin.client
    c.reset(4)
    c.set_latency(latency, latency)
    rng = np.random.default_rng(latency + len(config_name))
    window = 1 << 18
    model = rng.integers(0, 256, window, dtype=np.uint8)
    c.mem_write(0, model.tobytes())
    b = config.bus_bytes
    cases = [(0, 0x10000, 1, 1), (3, 0x10005, 7, 33), (0x101, 0x20003, 100, 255), (b, 0x30000 + b, 64, 256),
             (17, 0x38001, 3, 200)]
    for src, dst, rows, row_bytes in cases:
        start_copy(c, src, dst, rows, row_bytes)
        r = c.run(1_000_000, until_irq=True)
        assert r.reason == RunReason.IRQ, f"copy {src:#x}->{dst:#x} did not finish"
        status = c.reg_read(0x14)[0]
        assert status & 0b111 == 0b010, f"STATUS=0x{status:08x}"
        copy_model(model, src, dst, rows, row_bytes)
        n = rows * row_bytes
        if latency == 0 and n >= 64 * 256:  # one beat per cycle: close to bytes / bus width
            assert r.cycles_run < n / b * 1.3 + 50
    assert c.mem_read(0, window) == model.tobytes()
    c.set_latency(0, 0)


_DEFAULT_TWIN: list[Twin] = []


def _default_twin(request) -> Twin:
    if not _DEFAULT_TWIN:
        _DEFAULT_TWIN.append(launch_standin("default"))
        request.session.addfinalizer(lambda: _DEFAULT_TWIN.pop().close())
    return _DEFAULT_TWIN[0]


def test_out_of_range_burst_gets_slverr(client):
    size = TINY.device_memory_bytes
    start_copy(client, size - 64, 0x1000, 2, 64)  # the second row reads past the end
    r = client.run(100_000, until_irq=True)
    assert r.irq
    status = client.reg_read(0x14)[0]
    assert status & 0b100 and (status >> 8) & 0xFF == 1  # error, BUS_READ
    client.reset(4)
    start_copy(client, 0, size - 32, 1, 64)  # writes past the end
    assert client.run(100_000, until_irq=True).irq
    status = client.reg_read(0x14)[0]
    assert status & 0b100 and (status >> 8) & 0xFF == 2  # error, BUS_WRITE


def test_run_until_irq_returns_at_once_when_irq_is_high(client):
    start_copy(client, 0, 0x1000, 1, 4)
    assert client.run(10_000, until_irq=True).irq
    r = client.run(10_000, until_irq=True)
    assert r.cycles_run == 0 and r.reason == RunReason.IRQ


# ---------------------------------------------------------------------- faults
def test_killed_twin_gives_a_clear_error_quickly():
    with standin("tiny") as twin:
        c = twin.client
        threading.Timer(0.3, lambda: os.kill(twin.process.pid, signal.SIGKILL)).start()
        t0 = time.monotonic()
        with pytest.raises(TwinDied, match="SIGKILL") as info:
            c.run(1 << 50, wall_s=30)
        assert time.monotonic() - t0 < 5
        assert "RUN" in str(info.value)
        with pytest.raises(TwinDied):  # and every later call fails at once
            c.reg_read(0)
    assert not twin.socket_path.exists() and not twin.workdir.exists()


def test_stopped_twin_times_out():
    with standin("tiny", call_timeout=0.5) as twin:
        os.kill(twin.process.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            with pytest.raises(TwinTimeout, match="did not answer REG_READ"):
                twin.client.reg_read(0)
            assert time.monotonic() - t0 < 3
        finally:
            os.kill(twin.process.pid, signal.SIGCONT)


def test_malformed_requests_are_answered(client):
    with pytest.raises(TwinRequestError, match="unknown opcode"):
        client.call(99)
    with pytest.raises(TwinRequestError, match="too short"):
        client.call(Op.MEM_READ, b"\x00")
    assert client.reg_read(0)[0] == ID_VALUE
    assert HEADER.size == 12 and struct.calcsize("<IHHI") == 12


def test_trace_needs_a_trace_build(client, tmp_path):
    with pytest.raises(TwinRequestError, match="without waveform support"):
        client.trace(tmp_path / "x.fst", 0, 10)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["fst", "vcd"])
def test_trace_window(tmp_path, fmt):
    if fmt == "fst" and not _have_header("lz4.h", dict(os.environ)):
        with pytest.raises(TwinBuildError, match="liblz4-dev"):
            launch_standin("tiny", trace=fmt)
        pytest.skip("FST needs the lz4 development headers (apt-get install -y liblz4-dev)")
    with standin("tiny", trace=fmt) as twin:
        c = twin.client
        assert c.info.trace == fmt
        path = tmp_path / f"copy.{fmt}"
        now = c.cycles()
        c.trace(path, now, now + 200)
        start_copy(c, 0, 0x100, 4, 16)
        c.run(500, until_irq=True)
        c.run(300)
        assert path.exists() and path.stat().st_size > 100
        if fmt == "vcd":
            text = path.read_text()
            assert "axi__arvalid" in text and "csr__rdata" in text
            assert f"#{2 * (now + 199) + 1}" in text and f"#{2 * (now + 200)}" not in text


def test_twin_exits_when_its_host_dies(tmp_path):
    """A host killed without closing its twin: the twin notices and removes its socket and folder."""
    import subprocess
    import sys

    script = tmp_path / "host.py"
    script.write_text(
        "import time\n"
        "from tests.sim.twin_fixtures import launch_standin\n"
        "t = launch_standin('tiny')\n"
        "print(t.process.pid, t.workdir, flush=True)\n"
        "time.sleep(60)\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    host = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=root,
                            env={**os.environ, "PYTHONPATH": root})
    try:
        pid, workdir = host.stdout.readline().split()
    finally:
        host.kill()
        host.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(int(pid), signal.SIGKILL)
        pytest.fail("the twin outlived its host by 10 s")
    assert not os.path.exists(workdir)


def test_model_threads_from_the_environment(monkeypatch):
    from weft.sim.twin import model_threads

    monkeypatch.delenv("WEFT_TWIN_THREADS", raising=False)
    assert model_threads() == 1
    monkeypatch.setenv("WEFT_TWIN_THREADS", "2")
    assert model_threads() == 2
    for bad in ("0", "two", "-1", "65"):
        monkeypatch.setenv("WEFT_TWIN_THREADS", bad)
        with pytest.raises(ValueError, match="WEFT_TWIN_THREADS"):
            model_threads()
