"""A decode-step bundle kept loaded on one device: one program run per generated token.

A compiled decode step (``weft.compiler.lower`` of a decoder's decode-step graph) holds its KV
cache in device memory: each cache is a bundle input and the bundle output at the same address
(``metadata["in_place"]``), so it stays on the device from step to step. Per step the host
writes only the small inputs (the token's embedding, ``kv_len``, the RoPE table row, the slot),
rewrites the cache-append STOREs for this step's slot (their ``dram`` field is an immediate:
``metadata["patch_sites"]``, docs/bundle.md), starts the program and reads the logits back.

:class:`DecodeSession` does that over a *target* that holds the loaded bundle:

* :class:`GoldenTarget`: the bit-exact model (:class:`weft.sim.golden.GoldenMachine`), kept
  between runs;
* :class:`DriverTarget`: a :class:`weft.sw.driver.Device` (the Verilator twin or a board,
  whichever transport it was opened on; nothing here knows which).

The cache is written once (:meth:`DecodeSession.load_cache`, e.g. with a prefill bundle's cache
outputs, whose integers and column order the decode bundle shares) and read back with
:meth:`DecodeSession.read_cache`.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from weft.hw.bundle import Bundle, TensorSpec
from weft.hw.config import AcceleratorConfig
from weft.hw.isa import INSTR_BYTES, Instruction, Opcode

__all__ = ["DecodeSessionError", "GoldenTarget", "DriverTarget", "DecodeSession", "patched_stores"]


class DecodeSessionError(RuntimeError):
    """A decode bundle or a request the session cannot serve (bad slot, cache of the wrong shape)."""


class GoldenTarget:
    """The bit-exact model holding one loaded bundle between runs."""

    name = "golden"

    def __init__(self, bundle: Bundle, config: AcceleratorConfig):
        from weft.sim.golden import GoldenMachine

        self.bundle = bundle
        self.machine = GoldenMachine.for_bundle(bundle, config)
        self.program = self.machine.load_bundle(bundle)
        self.last_stats: Any = None

    def write_tensor(self, spec: TensorSpec, value: np.ndarray) -> None:
        spec.write_to(self.machine.memory, spec.stored(value))

    def read_tensor(self, spec: TensorSpec) -> np.ndarray:
        return spec.read_from(self.machine.memory)

    def write_instructions(self, index: int, words: bytes) -> None:
        """Overwrite instructions ``index ..`` in device memory; the machine runs them as the
        fetch unit decodes them from there."""
        address = self.bundle.program_address + index * INSTR_BYTES
        self.machine.write(address, words)
        count = len(words) // INSTR_BYTES
        self.program[index:index + count] = self.machine.fetch_program(address, count)

    def run(self):
        self.last_stats = self.machine.run(self.program)
        return self.last_stats


class DriverTarget:
    """A device behind the driver API (:class:`weft.sw.driver.Device`) with the bundle loaded.
    ``timeout_s`` bounds one run; ``watchdog_cycles`` (None: leave the register alone) sets
    ``WATCHDOG``. ``last_stats``: the performance counters of the last run."""

    name = "driver"

    def __init__(self, bundle: Bundle, device, *, timeout_s: float = 600.0, watchdog_cycles: int | None = None):
        self.bundle = bundle
        self.device = device
        self.timeout_s = timeout_s
        device.load_bundle(bundle)
        if watchdog_cycles is not None:
            device.write_reg("WATCHDOG", int(watchdog_cycles))
        self.last_stats: dict[str, int] | None = None

    def write_tensor(self, spec: TensorSpec, value: np.ndarray) -> None:
        self.device.write_tensor(spec, value)

    def read_tensor(self, spec: TensorSpec) -> np.ndarray:
        return self.device.read_tensor(spec)

    def write_instructions(self, index: int, words: bytes) -> None:
        self.device.write_mem(self.bundle.program_address + index * INSTR_BYTES, words)

    def run(self):
        before = self.device.counters()
        self.device.start()
        self.device.wait(timeout_s=self.timeout_s)
        after = self.device.counters()
        self.last_stats = {k: v - before.get(k, 0) for k, v in after.items()}
        return self.last_stats


def patched_stores(bundle: Bundle, slots: Mapping[str, int]) -> list[tuple[int, Instruction]]:
    """The append STOREs of ``bundle`` (``metadata["patch_sites"]``) rewritten for this step:
    ``dram = base + slot * step`` with ``slot`` from ``slots`` (kv-slot input name -> slot).
    Returns (instruction index, instruction) pairs in index order."""
    out = []
    for site in bundle.metadata.get("patch_sites", []):
        name = site["input"]
        if name not in slots:
            raise DecodeSessionError(f"patch site {site['index']} needs the slot input {name!r} (given: "
                                     f"{', '.join(slots) or 'none'})")
        slot = int(slots[name])
        if not 0 <= slot < int(site["slots"]):
            raise DecodeSessionError(f"slot {slot} is outside the cache of {site['slots']} slots")
        ins = bundle.program[site["index"]]
        if ins.opcode != Opcode.STORE:
            raise DecodeSessionError(f"patch site {site['index']} is a {ins.spec.mnemonic}, not a store: the "
                                     "bundle's metadata does not match its program")
        args = {**ins.args, "dram": int(site["base"]) + slot * int(site["step"])}
        out.append((int(site["index"]), Instruction(ins.opcode, args, ins.wait, ins.signal)))
    return sorted(out, key=lambda p: p[0])


class DecodeSession:
    """A decode-step bundle loaded once into ``target`` (:class:`GoldenTarget` or
    :class:`DriverTarget`; :meth:`on_golden` / :meth:`on_device` build them).

    ``host``: the graph whose host nodes derive the per-step inputs from the model's inputs
    (the decode graph itself, or :func:`weft.compiler.pipeline.host_graph` of it).
    """

    def __init__(self, bundle: Bundle, host, target):
        meta = bundle.metadata
        self.in_place: dict[str, str] = dict(meta.get("in_place", {}))
        if not self.in_place:
            raise DecodeSessionError("the bundle has no in-place cache (metadata 'in_place'): not a decode step")
        for out, inp in self.in_place.items():
            if bundle.output(out).address != bundle.input(inp).address:
                raise DecodeSessionError(f"output {out!r} is not at the address of input {inp!r}")
        self.bundle, self.host, self.target = bundle, host, target
        self.cache_inputs = list(self.in_place.values())
        self.step_inputs = [s.name for s in bundle.inputs if s.name not in self.in_place.values()]
        self.step_outputs = [s for s in bundle.outputs if s.name not in self.in_place]
        self.slot_inputs = list(meta.get("kv_slot_inputs", {}))
        patched_stores(bundle, {name: 0 for name in self.slot_inputs})  # the metadata matches the program
        self.steps = 0

    @classmethod
    def on_golden(cls, bundle: Bundle, host, config: AcceleratorConfig) -> "DecodeSession":
        """On the bit-exact model."""
        return cls(bundle, host, GoldenTarget(bundle, config))

    @classmethod
    def on_device(cls, bundle: Bundle, host, device, **kwargs) -> "DecodeSession":
        """On an opened :class:`weft.sw.driver.Device` (``kwargs``: :class:`DriverTarget`'s)."""
        return cls(bundle, host, DriverTarget(bundle, device, **kwargs))

    # ------------------------------------------------------------------ cache
    def load_cache(self, cache: Mapping[str, np.ndarray]) -> None:
        """Write every cache input: ``cache`` maps each of :attr:`cache_inputs` to its stored
        int8 integers in the device's column order (a prefill bundle's cache outputs as read
        back: same scale, same interleaved key columns), of the input's size."""
        missing = [n for n in self.cache_inputs if n not in cache]
        extra = sorted(set(cache) - set(self.cache_inputs))
        if missing or extra:
            raise DecodeSessionError(f"cache inputs do not match the bundle: missing {missing or 'none'}, "
                                     f"unknown {extra or 'none'}")
        for name in self.cache_inputs:
            spec = self.bundle.input(name)
            value = np.asarray(cache[name])
            if value.dtype != spec.np_dtype or value.size != int(np.prod(spec.shape)):
                raise DecodeSessionError(f"cache {name!r}: expected {int(np.prod(spec.shape))} {spec.dtype} values, "
                                         f"got {value.size} {value.dtype}")
            self.target.write_tensor(spec, value.reshape(spec.shape))

    def read_cache(self) -> dict[str, np.ndarray]:
        """The cache outputs' stored integers (graph shapes, the device's column order)."""
        return {out: self.target.read_tensor(self.bundle.output(out)) for out in self.in_place}

    # ------------------------------------------------------------------ steps
    def step(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One decode step: the per-step inputs from the model's ``feeds`` (for SmolLM2
        ``input_ids`` and ``position``; the host nodes of :attr:`host` derive the rest), the
        append STOREs patched for the slot, one run. Returns the outputs other than the cache
        (the logits), as stored integers."""
        from weft.compiler.pipeline import host_inputs

        inputs = host_inputs(self.host, feeds, self.bundle, names=self.step_inputs)
        stores = patched_stores(self.bundle, {name: int(np.asarray(inputs[name]).ravel()[0])
                                              for name in self.slot_inputs})
        for name in self.step_inputs:
            self.target.write_tensor(self.bundle.input(name), inputs[name])
        for first, run in _consecutive(stores):  # one write per run of adjacent instructions
            self.target.write_instructions(first, b"".join(ins.encode() for ins in run))
        self.target.run()
        self.steps += 1
        return {spec.name: self.target.read_tensor(spec) for spec in self.step_outputs}


def _consecutive(pairs: list[tuple[int, Instruction]]):
    run: list[Instruction] = []
    first = prev = None
    for index, ins in pairs:
        if run and index != prev + 1:
            yield first, run
            run = []
        if not run:
            first = index
        run.append(ins)
        prev = index
    if run:
        yield first, run
