"""System twin: the accelerator top as a Verilator model in its own process, behind a socket.

The twin is a C++ program (``harness.cpp`` in this folder) built with Verilator around the
Verilog of a top that has weft's core ports (``clk``, ``rst``, ``axi__*`` AXI4 master,
``csr__*`` AXI4-Lite slave, ``irq``). It holds the device memory (``config.device_memory_bytes``)
on the C++ side behind an AXI4 slave model (INCR/FIXED/WRAP bursts, one beat per cycle,
optional extra latency, WSTRB honoured, SLVERR outside memory), drives the registers with
an AXI4-Lite master, runs the clock loop and answers a small framed binary protocol on a
Unix domain socket (``docs/hil.md``). No Python runs per clock.

Typical use::

    with Twin.launch(component, config) as twin:        # builds (cached) and starts it
        twin.client.reg_read(0x00)                       # raw protocol calls
        dev = Device.open(TwinTransport(twin), config)   # or through the driver

Builds are cached under ``.cache/twin/<hash>/`` (``$WEFT_TWIN_CACHE_DIR`` overrides), keyed
by the Verilog text, the harness sources, the Verilator version and the build options; a
file lock lets parallel pytest workers share one build.

Every socket call has a timeout; a twin that died or stopped answering raises
:class:`TwinDied` / :class:`TwinTimeout` naming what happened (exit status or signal, the
tail of the twin's log), never hangs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import toolchain
from ..rtl import VERILATOR_WAIVERS, file_lock, log_tail

__all__ = [
    "PROTOCOL_VERSION",
    "Op",
    "StatusCode",
    "RunReason",
    "TwinError",
    "TwinBuildError",
    "TwinDied",
    "TwinTimeout",
    "TwinRequestError",
    "TwinBuild",
    "TwinInfo",
    "RunResult",
    "UartInfo",
    "has_uart_ports",
    "registered_inputs",
    "cache_root",
    "harness_sources",
    "build",
    "core_verilog",
    "DEFAULT_OPT",
    "TwinClient",
    "Twin",
]

PROTOCOL_VERSION = 1
HEADER = struct.Struct("<IHHI")  # length, code (op / status), op echo or flags, seq
MAX_PAYLOAD = 64 << 20
#: Default toplevel name used when converting a component.
DEFAULT_TOP = "weft_top"
_HERE = Path(__file__).resolve().parent
_VERILATOR_WAIVERS = tuple(VERILATOR_WAIVERS)  # the same lint waivers as the cocotb benches


class Op:
    HELLO = 1
    REG_READ = 2
    REG_WRITE = 3
    MEM_READ = 4
    MEM_WRITE = 5
    RUN = 6
    RESET = 7
    CYCLES = 8
    TRACE = 9
    SET_LATENCY = 10
    SHUTDOWN = 11
    UART_INFO = 12

    @classmethod
    def name(cls, code: int) -> str:
        for k, v in vars(cls).items():
            if v == code and k.isupper():
                return k
        return f"op {code}"


class StatusCode:
    OK = 0
    BAD_REQUEST = 1
    OUT_OF_RANGE = 2
    BUS_TIMEOUT = 3
    UNSUPPORTED = 4
    TOO_LARGE = 5


class RunReason:
    BUDGET = 0  #: ran the requested number of cycles
    IRQ = 1  #: irq was high
    WALL = 2  #: the wall-clock limit passed first


class TwinError(RuntimeError):
    """Something went wrong with the twin process or its socket."""


class TwinBuildError(TwinError):
    """Verilator could not build the twin; the message holds the log's tail."""


class TwinDied(TwinError):
    """The twin process is gone (crashed, killed, or exited)."""


class TwinTimeout(TwinError, TimeoutError):
    """The twin did not answer a call in time."""


class TwinRequestError(TwinError):
    """The twin answered a call with an error status (bad address, unsupported, ...)."""

    def __init__(self, status: int, op: int, message: str):
        self.status = status
        self.op = op
        super().__init__(f"twin refused {Op.name(op)}: {message}")


# ---------------------------------------------------------------------- build
def cache_root() -> Path:
    env = os.environ.get("WEFT_TWIN_CACHE_DIR")
    if env:
        root = Path(env)
    else:
        repo = _HERE.parents[1]
        root = repo / ".cache" / "twin" if (repo / "pyproject.toml").exists() else Path.home() / ".cache" / "weft" / "twin"
    root.mkdir(parents=True, exist_ok=True)
    return root


def harness_sources() -> list[Path]:
    """The C++ files compiled into every twin (part of the cache key)."""
    return sorted(p for p in _HERE.iterdir() if p.suffix in (".cpp", ".h"))


_UART_PORTS = ("uart_rx", "uart_tx", "uart_busy", "uart_clocks_per_bit")


def has_uart_ports(verilog_text: str) -> bool:
    """Whether the Verilog declares the ports of :class:`weft.hw.uart.UartTop` (the twin then
    plays the far end of its serial line on a pseudo-terminal; see ``harness.cpp``)."""
    decl = r"^\s*(input|output)\s+(wire\s+)?(\[[^\]]*\]\s*)?"
    found = [p for p in _UART_PORTS if re.search(rf"{decl}{p}\s*[;,)]", verilog_text, re.M)]
    if found and len(found) != len(_UART_PORTS):
        missing = sorted(set(_UART_PORTS) - set(found))
        raise ValueError(f"the top has UART ports {found} but not {missing}: a UART twin needs all of "
                         f"{list(_UART_PORTS)}")
    return bool(found)


def registered_inputs(verilog_text: str, top: str) -> str:
    """``verilog_text`` with module ``top`` renamed ``<top>__core`` under a new ``top`` with
    the same ports that registers every input except ``clk`` before the core sees it.

    Why: Verilator evaluates all logic that depends on a top-level input (and through the
    synchronous reset that is most of the next-state logic) at every ``eval()``, twice a
    cycle. With registered inputs that logic depends on state only and is evaluated once,
    after the clock edge. The harness keeps the core's view cycle-exact by driving each
    cycle's inputs one edge early (``System::cycle`` in ``harness.cpp``)."""
    match = re.search(rf"^module\s+{re.escape(top)}\s*\(", verilog_text, re.M)
    if not match:
        raise ValueError(f"the Verilog has no module named {top!r}")
    end = verilog_text.find("\nendmodule", match.end())
    body = verilog_text[match.end():end]
    ports = re.findall(r"^\s*(input|output)\s+(?:wire\s+|reg\s+)?(\[\d+:0\]\s*)?([A-Za-z_][A-Za-z0-9_$]*)\s*;",
                       body, re.M)
    header = verilog_text[match.end():verilog_text.find(");", match.end())]
    listed = {name.strip() for name in header.split(",")}
    names = {name for _, _, name in ports}
    if names != listed:
        raise ValueError(f"module {top!r}: cannot read the declarations of ports {sorted(listed ^ names)}")
    if "clk" not in names:
        raise ValueError(f"module {top!r} has no clk input")
    lines = [f"module {top}({', '.join(name for _, _, name in ports)});"]
    for direction, width, name in ports:
        lines.append(f"  {direction} {width or ''}{name};")
    for direction, width, name in ports:
        if direction == "input" and name != "clk":
            lines.append(f"  reg {width or ''}{name}__q = 0;")
            lines.append(f"  always @(posedge clk) {name}__q <= {name};")
    connections = ", ".join(f".{name}({name}__q)" if direction == "input" and name != "clk" else f".{name}({name})"
                            for direction, _, name in ports)
    lines.append(f"  {top}__core core ({connections});")
    lines.append("endmodule")
    renamed = verilog_text[:match.start()] + f"module {top}__core(" + verilog_text[match.end():]
    return renamed.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"


@dataclass(frozen=True)
class TwinBuild:
    """A built twin: the executable, its folder, and whether this call built it."""

    executable: Path
    directory: Path
    built: bool
    build_s: float
    trace: str  #: "" (none), "fst" or "vcd"
    top: str


def _trace_format(trace: bool | str) -> str:
    if trace is False or trace is None or trace == "":
        return ""
    fmt = "fst" if trace is True else str(trace).lower()
    if fmt not in ("fst", "vcd"):
        raise ValueError(f"trace={trace!r}: use False, True (FST), 'fst' or 'vcd'")
    return fmt


def _have_header(header: str, env: dict[str, str]) -> bool:
    try:
        r = subprocess.run(["g++", "-x", "c++", "-E", "-o", os.devnull, "-"], input=f"#include <{header}>\n",
                           capture_output=True, text=True, env=env, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


#: C++ optimisation of the Verilated model and the harness. -O2 runs the default core about
#: 2x faster than -O1 for about 1.5x the compile time (docs/hil.md, "Speed").
DEFAULT_OPT = "-O2"
#: Verilator options for speed: its own full optimisation; X values resolved the cheap way
#: (weft's RTL resets every register it reads, so no X reaches an output).
SPEED_FLAGS = ("-O3", "--x-assign", "fast", "--x-initial", "fast")


def model_threads() -> int:
    """Threads of the Verilated model: ``WEFT_TWIN_THREADS`` (default 1). With 2 free cores,
    2 threads ran the default core 1.45x faster in wall time (and 0.75x per CPU second), so it
    pays for one long run (``weft bench minilm``), not under ``pytest -n 2``."""
    raw = os.environ.get("WEFT_TWIN_THREADS", "1")
    if not raw.isdigit() or not 1 <= int(raw) <= 64:
        raise ValueError(f"WEFT_TWIN_THREADS={raw!r}: expected a thread count from 1 to 64")
    return int(raw)


def _harness_key() -> str:
    h = hashlib.sha256()
    for src in harness_sources():
        h.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def build(verilog_text: str, top: str, *, trace: bool | str = False, opt: str = DEFAULT_OPT, jobs: int = 1,
          timeout_s: float = 1800) -> TwinBuild:
    """Build the twin for ``verilog_text`` (toplevel module ``top``) unless a cached build exists.

    The model is of ``registered_inputs(verilog_text, top)``: the harness's clock loop drives
    the inputs one edge early to match (see that function).

    ``trace`` adds waveform support: True or ``"fst"`` (``--trace-fst``; needs the lz4
    development headers, Debian ``liblz4-dev``), ``"vcd"`` (``--trace``, no extra library).
    ``opt`` is the C++ optimisation level of the model and harness; ``jobs`` the parallel
    compile jobs (keep 1 on small machines).

    Two cache levels: the Verilated model (``.cache/twin/<key>/obj_dir``) is keyed by the
    Verilog text, the Verilator version and the build options, and is compiled only when
    one of them changes; the executable (``obj_dir/twin_sim-<harness hash>``) is keyed by
    the harness sources, so a harness change recompiles one file and relinks (seconds).
    """
    trace = _trace_format(trace)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", top):
        raise ValueError(f"toplevel name {top!r} is not a Verilog identifier")
    verilog_text = registered_inputs(verilog_text, top)  # also refuses a missing module
    env = {**os.environ, **toolchain.verilator_env()}
    version = toolchain.verilator_version()
    options = {"trace": trace, "opt": opt, "top": top, "verilator": list(version), "protocol": PROTOCOL_VERSION,
               "waivers": list(_VERILATOR_WAIVERS), "flags": list(SPEED_FLAGS)}
    threads = model_threads()
    if threads > 1:  # only then, so the keys of single-threaded builds stay as they were
        options["threads"] = threads
    uart = has_uart_ports(verilog_text)
    if uart:  # only then, so the keys of builds without a UART stay as they were
        options["uart"] = True
    h = hashlib.sha256()
    h.update(verilog_text.encode())
    h.update(b"\0")
    h.update(json.dumps(options, sort_keys=True).encode())
    key = h.hexdigest()[:20]
    hkey = _harness_key()
    directory = cache_root() / key
    obj = directory / "obj_dir"
    exe = obj / f"twin_sim-{hkey}"
    marker = directory / "weft_twin.json"
    make_vars = f"OPT_FAST={opt} OPT_SLOW=-O0 OPT_GLOBAL={opt}"
    env["MAKEFLAGS"] = f"{env.get('MAKEFLAGS', '')} {make_vars}".strip()
    with file_lock(directory.with_suffix(".lock")):
        if marker.exists() and exe.exists():
            return TwinBuild(exe, directory, False, 0.0, trace, top)
        t0 = time.monotonic()
        log = directory / "build.log"
        # the model's makefile lists the harness's .cpp files: relinking works while every one
        # of them was compiled into this build (a new file needs Verilator to run again)
        same_files = all((obj / f"{src.stem}.o").exists() for src in harness_sources() if src.suffix == ".cpp")
        if marker.exists() and same_files and (obj / "Vtwin.mk").exists():
            # the model is built: recompile the harness and relink
            for src in harness_sources():
                shutil.copy(src, directory / src.name)
            cmd = ["make", "-C", "obj_dir", "-f", "Vtwin.mk", "twin_sim"]
        else:
            if directory.exists():  # an earlier build died half-way
                shutil.rmtree(directory)
            directory.mkdir(parents=True)
            (directory / f"{top}.v").write_text(verilog_text)
            harness = [shutil.copy(src, directory / src.name) for src in harness_sources()]
            cpp = [str(Path(p)) for p in harness if str(p).endswith(".cpp")]
            cmd = [
                str(toolchain.verilator_root() / "bin" / "verilator"),
                "--cc", "--exe", "--build", "-j", str(jobs), *SPEED_FLAGS,
                *(("--threads", str(threads)) if threads > 1 else ()),
                "--top-module", top, "--prefix", "Vtwin", "-Mdir", "obj_dir", "-o", "twin_sim",
                *_VERILATOR_WAIVERS,
                "-CFLAGS", f"{opt} -std=c++17" + (" -DWEFT_UART" if uart else ""),
                f"{top}.v", *cpp,
            ]
            if trace:
                if trace == "fst" and not _have_header("lz4.h", env):
                    shutil.rmtree(directory, ignore_errors=True)
                    raise TwinBuildError("FST waveforms need the lz4 development headers, which are not installed "
                                         "(Debian: apt-get install -y liblz4-dev); or launch with trace='vcd'")
                cmd[1:1] = ["--trace-fst" if trace == "fst" else "--trace"]
                cmd[cmd.index("-CFLAGS") + 1] += f" -DWEFT_TRACE_{trace.upper()}"
        with open(log, "a") as fh:
            fh.write(" ".join(cmd) + "\n")
            fh.flush()
            try:
                proc = subprocess.run(cmd, cwd=directory, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                      timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise TwinBuildError(f"twin build of {top} took longer than {timeout_s:.0f} s; log {log}:\n"
                                     f"{log_tail(log)}") from None
        elapsed = time.monotonic() - t0
        if proc.returncode != 0 or not (obj / "twin_sim").exists():
            raise TwinBuildError(f"twin build of {top} failed (exit {proc.returncode}); log {log}:\n{log_tail(log)}")
        shutil.copy2(obj / "twin_sim", exe)
        if not marker.exists():
            marker.write_text(json.dumps({**options, "build_s": round(elapsed, 2)}, indent=1))
        return TwinBuild(exe, directory, True, elapsed, trace, top)


def core_verilog(config: Any, name: str = DEFAULT_TOP) -> str:
    """Verilog of ``weft.hw.core.Core(config)``, cached under ``.cache/twin/verilog/``.

    Amaranth's conversion of the ``default`` core takes about 20 s; the cache key is the
    configuration (its full dictionary), the bytes of every ``weft.hw`` source file and the
    Amaranth version, so any change to the RTL generators or the configuration converts
    again."""
    import importlib.metadata

    hw = Path(__file__).resolve().parents[2] / "hw"
    h = hashlib.sha256()
    h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode() + b"\0" + name.encode() + b"\0")
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        h.update(importlib.metadata.version("amaranth").encode())
    for src in sorted(hw.rglob("*.py")):
        h.update(str(src.relative_to(hw)).encode() + b"\0" + src.read_bytes() + b"\0")
    folder = cache_root() / "verilog"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{config.name}-{h.hexdigest()[:20]}.v"
    if path.is_file():
        return path.read_text()
    from ..rtl import to_verilog
    from ...hw.core import Core

    text = to_verilog(Core(config), name)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return text


# ---------------------------------------------------------------------- client
@dataclass(frozen=True)
class TwinInfo:
    protocol: int
    bus_bytes: int
    mem_bytes: int
    cycles: int
    trace: str  #: "" (built without waveforms), "fst" or "vcd"
    read_latency: int
    write_latency: int


@dataclass(frozen=True)
class UartInfo:
    """The serial line of a UART twin (``UART_INFO``)."""

    pty: str  #: the pseudo-terminal's path (open it like a serial port)
    clocks_per_bit: int
    bytes_in: int  #: bytes the host wrote to the pty so far
    bytes_out: int  #: bytes the design sent back
    frame_errors: int  #: bytes from the design whose stop bit was 0


@dataclass(frozen=True)
class RunResult:
    cycles_run: int
    reason: int  #: :class:`RunReason`
    irq: bool
    cycle: int  #: cycle count after the run

    @property
    def reason_name(self) -> str:
        return {0: "budget", 1: "irq", 2: "wall"}.get(self.reason, str(self.reason))


class TwinClient:
    """One connection to a twin's socket. Every call waits at most ``timeout`` seconds.

    ``process`` (optional) is the twin's :class:`subprocess.Popen`; with it, a lost
    connection is reported with the process's exit status, and ``log`` its log file.
    After a timeout or a lost connection the client is closed (the stream's state is
    unknown) and every later call raises at once.
    """

    def __init__(self, path: str | os.PathLike, *, timeout: float = 30.0, process: subprocess.Popen | None = None,
                 log: Path | None = None, connect_timeout: float | None = None):
        self.path = str(path)
        self.timeout = timeout
        self.process = process
        self.log = log
        self._seq = 0
        self._broken: str | None = None
        self._sock: socket.socket | None = None
        deadline = time.monotonic() + (timeout if connect_timeout is None else connect_timeout)
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
            try:
                s.connect(self.path)
                break
            except OSError as exc:
                s.close()
                if self.process is not None and self.process.poll() is not None:
                    raise TwinDied(f"twin process exited before accepting connections ({self._exit_text()})"
                                   f"{self._log_text()}") from None
                if time.monotonic() >= deadline:
                    raise TwinTimeout(f"cannot connect to twin socket {self.path}: {exc}") from None
                time.sleep(0.02)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._sock = s
        self.info = self.hello()
        if self.info.protocol != PROTOCOL_VERSION:
            self.close()
            raise TwinError(f"twin speaks protocol {self.info.protocol}, this weft speaks {PROTOCOL_VERSION}")

    # ------------------------------------------------------------------ framing
    def _exit_text(self) -> str:
        if self.process is None:
            return "no process handle"
        rc = self.process.poll()
        if rc is None:
            return f"pid {self.process.pid} still running"
        if rc < 0:
            try:
                name = signal.Signals(-rc).name
            except ValueError:
                name = str(-rc)
            return f"pid {self.process.pid} killed by signal {name}"
        return f"pid {self.process.pid} exited with status {rc}"

    def _log_text(self) -> str:
        if self.log is None:
            return ""
        tail = log_tail(self.log, 15).strip()
        return f"; twin log {self.log}:\n{tail}" if tail else ""

    def _fail(self, what: str, op: int, exc: Exception | None) -> TwinError:
        self.close()
        # give a dying process a moment to be reaped so its status can be named
        if self.process is not None and not isinstance(exc, (socket.timeout, TimeoutError)):
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=0.5)
        alive = self.process is None or self.process.poll() is None
        detail = f" ({exc})" if exc else ""
        if isinstance(exc, socket.timeout) and alive:
            err: TwinError = TwinTimeout(f"twin did not answer {Op.name(op)} within {what}; connection closed")
        elif alive and self.process is None:
            err = TwinDied(f"twin connection lost during {Op.name(op)}{detail}: the twin at {self.path} is gone "
                           f"or closed the connection")
        elif alive:
            err = TwinDied(f"twin connection lost during {Op.name(op)}{detail} ({self._exit_text()})")
        else:
            err = TwinDied(f"twin process died during {Op.name(op)} ({self._exit_text()}){self._log_text()}")
        self._broken = str(err)
        return err

    def _recv_exact(self, n: int, deadline: float, op: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out")
            self._sock.settimeout(left)
            k = self._sock.recv_into(view[got:], n - got)
            if k == 0:
                raise ConnectionResetError("the twin closed the connection")
            got += k
        return bytes(buf)

    def call(self, op: int, payload: bytes = b"", *, timeout: float | None = None) -> bytes:
        """Send one request and return the response payload (raises on error status)."""
        if self._broken is not None:
            raise TwinDied(f"twin connection is closed: {self._broken}")
        if self._sock is None:
            raise TwinError("twin connection is closed")
        if len(payload) > MAX_PAYLOAD + 64:
            raise ValueError(f"request of {len(payload)} bytes exceeds the frame limit of {MAX_PAYLOAD}")
        t = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + t
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        try:
            self._sock.settimeout(t)
            self._sock.sendall(HEADER.pack(len(payload), op, 0, seq) + payload if len(payload) < 65536
                               else HEADER.pack(len(payload), op, 0, seq))
            if len(payload) >= 65536:
                self._sock.sendall(payload)
            length, status, op_echo, seq_echo = HEADER.unpack(self._recv_exact(HEADER.size, deadline, op))
            body = self._recv_exact(length, deadline, op) if length else b""
        except (socket.timeout, TimeoutError) as exc:
            raise self._fail(f"{t:.1f} s", op, exc) from None
        except OSError as exc:
            raise self._fail("", op, exc) from None
        if seq_echo != seq or op_echo != op:
            err = self._fail("", op, None)
            raise TwinError(f"twin protocol out of step (sent {Op.name(op)} #{seq}, got {Op.name(op_echo)} "
                            f"#{seq_echo}); {err}")
        if status != StatusCode.OK:
            raise TwinRequestError(status, op, body.decode(errors="replace"))
        return body

    # ------------------------------------------------------------------ operations
    def hello(self) -> TwinInfo:
        proto, bus, mem, cycles, trace, rl, wl = struct.unpack("<IIQQIII", self.call(Op.HELLO))
        return TwinInfo(proto, bus, mem, cycles, {1: "fst", 2: "vcd"}.get(trace, ""), rl, wl)

    def reg_read(self, offset: int) -> tuple[int, int]:
        """(value, AXI response code) of the 32-bit register at byte ``offset``."""
        value, resp = struct.unpack("<II", self.call(Op.REG_READ, struct.pack("<I", offset)))
        return value, resp

    def reg_write(self, offset: int, value: int, strobe: int = 0xF) -> int:
        """Write a register; returns the AXI response code."""
        (resp,) = struct.unpack("<I", self.call(Op.REG_WRITE, struct.pack("<III", offset, value & 0xFFFFFFFF, strobe)))
        return resp

    def mem_read(self, address: int, size: int) -> bytes:
        out = bytearray()
        step = 16 << 20
        for lo in range(address, address + size, step):
            n = min(step, address + size - lo)
            out += self.call(Op.MEM_READ, struct.pack("<QQ", lo, n))
        return bytes(out)

    def mem_write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        data = memoryview(data).cast("B")
        step = 16 << 20
        for lo in range(0, len(data), step):
            self.call(Op.MEM_WRITE, struct.pack("<Q", address + lo) + bytes(data[lo:lo + step]))

    def run(self, max_cycles: int, *, until_irq: bool = False, wall_s: float = 10.0) -> RunResult:
        """Clock up to ``max_cycles`` (stop early on irq when ``until_irq``, or after ``wall_s``)."""
        wall_ms = max(1, int(wall_s * 1000))
        body = self.call(Op.RUN, struct.pack("<QII", max_cycles, 1 if until_irq else 0, wall_ms),
                         timeout=wall_s + self.timeout)
        done, reason, irq, cycle = struct.unpack("<QIIQ", body)
        return RunResult(done, reason, bool(irq), cycle)

    def reset(self, cycles: int = 4, *, clear_memory: bool = False, clear_cycles: bool = False) -> None:
        self.call(Op.RESET, struct.pack("<II", cycles, (1 if clear_memory else 0) | (2 if clear_cycles else 0)))

    def cycles(self) -> int:
        return struct.unpack("<Q", self.call(Op.CYCLES))[0]

    def trace(self, path: str | os.PathLike, start: int, end: int) -> None:
        """Write a waveform of cycles [start, end) to ``path`` (twin built with ``trace``; FST or VCD
        as built). Only one window at a time; a new call closes the previous file."""
        self.call(Op.TRACE, struct.pack("<QQ", start, end) + os.fsencode(os.path.abspath(path)))

    def set_latency(self, read: int, write: int = 0) -> None:
        """Extra cycles before the first R beat of each read burst / the B of each write burst."""
        self.call(Op.SET_LATENCY, struct.pack("<II", read, write))

    def uart_info(self) -> UartInfo:
        """The pty path and line counters of a twin whose top has a UART (TwinRequestError with
        status 4 otherwise)."""
        body = self.call(Op.UART_INFO)
        cpb, bin_, bout, ferr = struct.unpack_from("<IQQQ", body)
        return UartInfo(os.fsdecode(body[28:]), cpb, bin_, bout, ferr)

    def shutdown(self, timeout: float = 5.0) -> None:
        with contextlib.suppress(TwinError):
            self.call(Op.SHUTDOWN, timeout=timeout)
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


# ---------------------------------------------------------------------- process
def _top_of(design: Any, name: str | None) -> tuple[str, str]:
    if isinstance(design, str):
        modules = re.findall(r"^\s*module\s+([A-Za-z_][A-Za-z0-9_$]*)", design, re.M)
        if not modules:
            raise ValueError("the Verilog text has no module")
        if name is None:
            # the top is the module nobody instantiates
            tops = [m for m in modules if not re.search(rf"^\s*{re.escape(m)}\s+[A-Za-z_\\]", design, re.M)]
            if len(tops) != 1:
                raise ValueError(f"cannot tell the toplevel module among {modules}; pass name=")
            name = tops[0]
        return design, name
    from ..rtl import to_verilog

    name = name or DEFAULT_TOP
    return to_verilog(design, name), name


class Twin:
    """A running twin process and a connection to it. Use :meth:`launch`; close with
    :meth:`close` or a ``with`` block (the socket file and its folder are removed)."""

    def __init__(self, process: subprocess.Popen, socket_path: Path, workdir: Path, client: TwinClient,
                 build_info: TwinBuild, config: Any):
        self.process = process
        self.socket_path = socket_path
        self.workdir = workdir
        self.client = client
        self.build = build_info
        self.config = config

    @classmethod
    def launch(cls, design: Any, config: Any, *, name: str | None = None, trace: bool | str = False,
               read_latency: int = 0, write_latency: int = 0, call_timeout: float = 30.0,
               start_timeout: float = 30.0, mem_bytes: int | None = None, opt: str = DEFAULT_OPT) -> "Twin":
        """Build (cached) and start a twin of ``design`` (an Amaranth component or Verilog text).

        ``config`` gives the memory size (``device_memory_bytes``, or ``mem_bytes``) and bus
        width. Returns once the twin answers on its socket.
        """
        verilog_text, top = _top_of(design, name)
        b = build(verilog_text, top, trace=trace, opt=opt)
        mem = int(mem_bytes if mem_bytes is not None else config.device_memory_bytes)
        workdir = Path(tempfile.mkdtemp(prefix="weft-twin-"))
        sock = workdir / "twin.sock"
        log = workdir / "twin.log"
        cmd = [str(b.executable), "--socket", str(sock), "--mem-bytes", str(mem),
               "--bus-bytes", str(config.bus.data_bits // 8), "--read-latency", str(read_latency),
               "--write-latency", str(write_latency), "--parent-pid", str(os.getpid()), "--workdir", str(workdir)]
        with open(log, "wb") as fh:
            process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
                                       start_new_session=True)
        try:
            client = TwinClient(sock, timeout=call_timeout, process=process, log=log, connect_timeout=start_timeout)
        except BaseException:
            _stop(process)
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        return cls(process, sock, workdir, client, b, config)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def connect(self, *, timeout: float | None = None) -> TwinClient:
        """A new connection (the twin serves one connection at a time; close the old one first)."""
        self.client.close()
        self.client = TwinClient(self.socket_path, timeout=timeout or self.client.timeout, process=self.process,
                                 log=self.workdir / "twin.log")
        return self.client

    def close(self) -> None:
        """Shut the twin down (politely, then by force) and remove its socket and folder."""
        if self.process.poll() is None:
            polite = self.client._broken is None and self.client._sock is not None
            self.client.shutdown(timeout=2.0)
            _stop(self.process, grace_s=3.0 if polite else 0.0)
        else:
            self.client.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Twin":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(timeout=2)
            shutil.rmtree(self.workdir, ignore_errors=True)


def _stop(process: subprocess.Popen, grace_s: float = 3.0) -> None:
    """Wait ``grace_s`` for the process to exit, then SIGTERM, then SIGKILL."""
    try:
        process.wait(timeout=grace_s)
        return
    except subprocess.TimeoutExpired:
        pass
    process.terminate()
    try:
        process.wait(timeout=3.0)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=3.0)
