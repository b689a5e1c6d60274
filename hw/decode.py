"""Instruction layouts for the RTL, generated from :mod:`weft.hw.isa`.

Nothing here restates the encoding: every layout is built from the ISA's tables, so a
field added there appears in the hardware's view of the instruction word.
"""

from __future__ import annotations

from amaranth.hdl import Module, Signal, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from .isa import HEADER_BITS, INSTR_BITS, MASK_BITS, OPCODE_BITS, OPS, Opcode, Queue

__all__ = ["HEADER_LAYOUT", "instruction_layout", "InstructionClassifier", "NUM_QUEUES"]

NUM_QUEUES = len(Queue)

HEADER_LAYOUT = data.StructLayout({
    "opcode": unsigned(OPCODE_BITS),
    "wait": unsigned(MASK_BITS),
    "signal": unsigned(MASK_BITS),
})


def instruction_layout(opcode: Opcode) -> data.StructLayout:
    """The whole 128-bit word of ``opcode`` as a struct: ``header``, each field, ``reserved``."""
    spec = OPS[Opcode(opcode)]
    members: dict[str, object] = {"header": HEADER_LAYOUT}
    for f, _lo in spec.layout():
        members[f.name] = unsigned(f.bits)
    used = HEADER_BITS + sum(f.bits for f in spec.fields)
    if used < INSTR_BITS:
        members["reserved"] = unsigned(INSTR_BITS - used)
    return data.StructLayout(members)


class InstructionClassifier(wiring.Component):
    """Combinational: which queue runs an instruction word, and whether it is legal.

    Ports: ``word`` (in, 128 bits); ``queue`` (out, queue number, for queue
    instructions); ``is_fence``, ``is_halt`` (out); ``legal`` (out): the opcode exists,
    its reserved bits are zero, and no queue waits for or signals itself.
    Latency 0 (purely combinational).
    """

    def __init__(self):
        super().__init__({"word": In(INSTR_BITS), "queue": Out(2), "is_fence": Out(1),
                          "is_halt": Out(1), "legal": Out(1)})

    def elaborate(self, platform):
        m = Module()
        header = data.View(HEADER_LAYOUT, self.word[:HEADER_BITS])
        with m.Switch(header.opcode):
            for opcode, spec in OPS.items():
                with m.Case(int(opcode)):
                    view = data.View(instruction_layout(opcode), self.word)
                    reserved_ok = (view.reserved == 0) if "reserved" in instruction_layout(opcode).members else 1
                    if opcode == Opcode.TOKEN:
                        m.d.comb += self.queue.eq(view.queue)
                    elif spec.queue is not None:
                        m.d.comb += self.queue.eq(int(spec.queue))
                    if not spec.takes_tokens:
                        tokens_ok = (header.wait == 0) & (header.signal == 0)
                    else:
                        own = Signal(MASK_BITS, name=f"own_{spec.mnemonic}")
                        m.d.comb += own.eq(1 << self.queue)
                        tokens_ok = ((header.wait | header.signal) & own) == 0
                    m.d.comb += [
                        self.legal.eq(reserved_ok & tokens_ok),
                        self.is_fence.eq(opcode == Opcode.FENCE),
                        self.is_halt.eq(opcode == Opcode.HALT),
                    ]
            with m.Default():  # every output assigned, so the case statement is complete
                m.d.comb += [self.legal.eq(0), self.queue.eq(0), self.is_fence.eq(0), self.is_halt.eq(0)]
        return m
