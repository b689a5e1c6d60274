"""Instruction set: binary encoding, assembly text, validation and the generated reference."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weft.hw.isa import (
    HEADER_BITS,
    INSTR_BYTES,
    OPS,
    Instruction,
    IsaError,
    Mem,
    Opcode,
    Queue,
    assemble,
    decode_program,
    disassemble,
    encode_program,
    format_instruction,
    parse_instruction,
    render_markdown,
)

ROOT = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------- strategies
@st.composite
def instructions(draw):
    spec = draw(st.sampled_from(sorted(OPS.values(), key=lambda s: s.opcode)))
    args = {f.name: draw(st.integers(0, f.max)) for f in spec.fields}
    wait = signal = frozenset()
    if spec.takes_tokens:
        own = spec.queue if spec.queue is not None else Queue(args["queue"])
        others = [q for q in Queue if q != own]
        wait = frozenset(draw(st.sets(st.sampled_from(others))))
        signal = frozenset(draw(st.sets(st.sampled_from(others))))
    return Instruction(spec.opcode, args, wait, signal)


programs = st.lists(instructions(), min_size=0, max_size=20)
FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------- round trips
@FAST
@given(programs)
def test_asm_disasm_round_trip_is_exact(program):
    text = disassemble(program)
    again = assemble(text)
    assert again == program
    assert disassemble(again) == text


@FAST
@given(programs)
def test_encode_decode_round_trip(program):
    data = encode_program(program)
    assert len(data) == len(program) * INSTR_BYTES
    assert decode_program(data) == program
    assert encode_program(decode_program(data)) == data


@FAST
@given(instructions())
def test_single_instruction_round_trips(instr):
    assert Instruction.decode(instr.encode()) == instr
    assert parse_instruction(format_instruction(instr)) == instr
    assert str(instr) == format_instruction(instr)


@FAST
@given(instructions(), st.integers(HEADER_BITS, 127))
def test_any_bit_above_the_fields_is_rejected(instr, bit):
    end = HEADER_BITS + sum(f.bits for f in instr.spec.fields)
    if bit < end:
        return  # inside a field: not reserved
    word = int.from_bytes(instr.encode(), "little") | (1 << bit)
    with pytest.raises(IsaError, match="reserved bits"):
        Instruction.decode(word.to_bytes(INSTR_BYTES, "little"))


# ---------------------------------------------------------------------- encoding, by hand
def test_halt_encoding_by_hand():
    assert Instruction.make(Opcode.HALT).encode() == bytes([0x01]) + bytes(15)
    assert Instruction.make(Opcode.FENCE).encode() == bytes([0x02]) + bytes(15)


def test_load_encoding_by_hand():
    # docs/isa.md layout for load: header 0..15 (opcode, wait 8..11, signal 12..15), then
    # mem@16 (1 bit), local@17 (20), dram@37 (32), rows@69 (16), cols@85 (12), stride@97 (24).
    instr = Instruction.make(Opcode.LOAD, mem=Mem.ACC, local=5, dram=0x1000, rows=3, cols=4, stride=0x10,
                             wait=["store"], signal=["matmul", "vector"])
    expected = (0x10 | (0b1000 << 8) | (0b0110 << 12) | (1 << 16) | (5 << 17) | (0x1000 << 37)
                | (3 << 69) | (4 << 85) | (0x10 << 97))
    assert instr.encode() == expected.to_bytes(16, "little")


def test_matmul_and_token_encoding_by_hand():
    # matmul: a@16 (20), acc@36 (20), m@56 (16), k@72 (8), accumulate@80 (1)
    mm = Instruction.make(Opcode.MATMUL, a=0xABCDE, acc=0x12345, m=0xFFFF, k=16, accumulate=1, wait=["load"])
    expected = 0x21 | (1 << 8) | (0xABCDE << 16) | (0x12345 << 36) | (0xFFFF << 56) | (16 << 72) | (1 << 80)
    assert mm.encode() == expected.to_bytes(16, "little")
    # token: queue@16 (2)
    tok = Instruction.make(Opcode.TOKEN, queue=Queue.STORE, signal=["load"])
    assert tok.encode() == (0x03 | (1 << 12) | (3 << 16)).to_bytes(16, "little")


def test_requant_layout_by_hand():
    # src@16 (20), dst@36 (20), rows@56 (16), param@72 (20), relu@92 (1)
    rq = Instruction.make(Opcode.REQUANT, src=1, dst=2, rows=3, param=4, relu=1)
    expected = 0x30 | (1 << 16) | (2 << 36) | (3 << 56) | (4 << 72) | (1 << 92)
    assert rq.encode() == expected.to_bytes(16, "little")


# ---------------------------------------------------------------------- decode errors
@pytest.mark.parametrize("opcode", [0x00, 0x04, 0x0F, 0x12, 0x22, 0x3F, 0xFF])
def test_decode_rejects_illegal_opcodes(opcode):
    with pytest.raises(IsaError, match=f"illegal opcode 0x{opcode:02x}"):
        Instruction.decode(bytes([opcode]) + bytes(15))


def test_zeroed_memory_is_not_a_program():
    with pytest.raises(IsaError, match="illegal opcode 0x00"):
        decode_program(bytes(64))


@pytest.mark.parametrize("size", [0, 1, 15, 17, 32])
def test_decode_rejects_wrong_length(size):
    with pytest.raises(IsaError, match="expected 16 bytes"):
        Instruction.decode(b"\x01" + bytes(size - 1) if size else b"")


def test_decode_program_rejects_partial_instruction():
    data = encode_program([Instruction.make(Opcode.HALT)]) + b"\x01\x00"
    with pytest.raises(IsaError, match="whole number"):
        decode_program(data)


def test_decode_program_names_the_bad_instruction():
    good = Instruction.make(Opcode.FENCE).encode()
    with pytest.raises(IsaError, match="instruction 2: illegal opcode"):
        decode_program(good + good + bytes(16))


def test_decode_rejects_reserved_bits_of_halt():
    with pytest.raises(IsaError, match="reserved bits 16..127"):
        Instruction.decode(bytes([0x01, 0x00, 0x01]) + bytes(13))
    with pytest.raises(IsaError, match="reserved"):
        Instruction.decode(bytes([0x01]) + bytes(14) + b"\x80")


def test_decode_rejects_reserved_bit_127_of_load():
    word = int.from_bytes(Instruction.make(Opcode.LOAD, mem=0, local=0, dram=0, rows=1, cols=1, stride=0).encode(),
                          "little") | (1 << 127)
    with pytest.raises(IsaError, match="reserved bits 121..127"):
        Instruction.decode(word.to_bytes(16, "little"))


def test_decode_rejects_tokens_on_halt_and_self_tokens():
    with pytest.raises(IsaError, match="takes no tokens"):
        Instruction.decode(bytes([0x01, 0x01]) + bytes(14))  # halt wait=load
    with pytest.raises(IsaError, match="itself"):
        Instruction.decode(bytes([0x21, 0x02]) + bytes(14))  # matmul wait=matmul
    with pytest.raises(IsaError, match="itself"):
        # token queue=vector signal=vector
        Instruction.decode((0x03 | (0b0100 << 12) | (2 << 16)).to_bytes(16, "little"))


# ---------------------------------------------------------------------- construction errors
def _load(**over):
    args = dict(mem=0, local=0, dram=0, rows=1, cols=1, stride=0)
    args.update(over)
    return args


@pytest.mark.parametrize("field, value, bits", [
    ("local", 1 << 20, 20), ("dram", 1 << 32, 32), ("rows", 1 << 16, 16), ("cols", 1 << 12, 12),
    ("stride", 1 << 24, 24), ("mem", 2, 1), ("rows", -1, 16),
])
def test_instruction_rejects_out_of_range_field(field, value, bits):
    with pytest.raises(IsaError, match=f"{field}={value} does not fit {bits} bits"):
        Instruction(Opcode.LOAD, _load(**{field: value}))


def test_instruction_accepts_field_maxima():
    instr = Instruction(Opcode.LOAD, _load(local=(1 << 20) - 1, dram=(1 << 32) - 1, rows=0xFFFF, cols=0xFFF,
                                           stride=(1 << 24) - 1, mem=1))
    assert Instruction.decode(instr.encode()) == instr


def test_instruction_rejects_missing_and_unknown_fields():
    args = _load()
    del args["cols"]
    with pytest.raises(IsaError, match="field 'cols' is missing"):
        Instruction(Opcode.LOAD, args)
    with pytest.raises(IsaError, match="unknown field 'colour'"):
        Instruction(Opcode.LOAD, _load(colour=1))
    with pytest.raises(IsaError, match="unknown field 'queue'"):
        Instruction(Opcode.HALT, {"queue": 0})


@pytest.mark.parametrize("opcode, args, wait, signal", [
    (Opcode.LOAD, _load(), ["load"], []),
    (Opcode.STORE, _load(), [], ["store"]),
    (Opcode.PRELOAD, dict(sp=0, k=1, n=1), ["matmul"], []),
    (Opcode.MATMUL, dict(a=0, acc=0, m=1, k=1, accumulate=0), [], ["matmul"]),
    (Opcode.REQUANT, dict(src=0, dst=0, rows=1, param=0, relu=0), ["vector"], ["store"]),
    (Opcode.TOKEN, dict(queue=Queue.VECTOR), ["load"], ["vector"]),
    (Opcode.TOKEN, dict(queue=Queue.LOAD), ["load"], []),
])
def test_instruction_rejects_self_tokens(opcode, args, wait, signal):
    with pytest.raises(IsaError, match="cannot wait for or signal itself"):
        Instruction.make(opcode, wait=wait, signal=signal, **args)


@pytest.mark.parametrize("opcode", [Opcode.HALT, Opcode.FENCE])
@pytest.mark.parametrize("tokens", [dict(wait=["load"]), dict(signal=["store"])])
def test_halt_and_fence_take_no_tokens(opcode, tokens):
    with pytest.raises(IsaError, match="takes no tokens"):
        Instruction.make(opcode, **tokens)


def test_instruction_rejects_unknown_opcode_and_queue():
    with pytest.raises(IsaError, match="unknown opcode"):
        Instruction(0x00)
    with pytest.raises(IsaError, match="unknown queue 'dma'"):
        Instruction.make(Opcode.TOKEN, queue=0, wait=["dma"])


def test_token_queue_decides_the_executing_queue():
    assert Instruction.make(Opcode.TOKEN, queue=Queue.STORE, wait=["load"]).queue is Queue.STORE
    assert Instruction.make(Opcode.MATMUL, a=0, acc=0, m=1, k=1, accumulate=0).queue is Queue.MATMUL
    assert Instruction.make(Opcode.HALT).queue is None


def test_fields_are_attributes():
    instr = Instruction.make(Opcode.PRELOAD, sp=7, k=3, n=2)
    assert (instr.sp, instr.k, instr.n) == (7, 3, 2)
    with pytest.raises(AttributeError):
        instr.m


def test_vrow_wide_flag_round_trips_after_unsigned():
    from weft.hw.decode import instruction_layout

    instr = Instruction.make(Opcode.VROW, func="softmax", src_mem=Mem.ACC, src=0x10, dst=0x80, param=0x8, rows=4,
                             len=300, causal=1, wide=1, wait=["load"], signal=["store"])
    assert (instr.wide, instr.unsigned) == (1, 0)
    assert Instruction.decode(instr.encode()) == instr
    text = format_instruction(instr)
    assert "causal=1 unsigned=0 wide=1" in text
    assert parse_instruction(text) == instr and assemble(text) == [instr]
    lo = {f.name: pos for f, pos in OPS[Opcode.VROW].layout()}
    assert lo["wide"] == lo["unsigned"] + 1 == 114
    word = int.from_bytes(instr.encode(), "little")
    assert (word >> lo["wide"]) == 1  # the flag is the top used bit; the rest is reserved
    assert "wide" in instruction_layout(Opcode.VROW).members  # the RTL's view comes from the same table
    # An instruction written without the flag (every program before it) has wide = 0.
    plain = parse_instruction("vrow func=softmax src_mem=acc src=0x10 dst=0x80 param=0x8 rows=4 len=300")
    assert plain.wide == 0 and Instruction.decode(plain.encode()) == plain


# ---------------------------------------------------------------------- assembly text
def test_canonical_text_by_hand():
    program = [
        Instruction.make(Opcode.LOAD, mem=Mem.SP, local=0, dram=0x1000, rows=16, cols=16, stride=0x200,
                         signal=["matmul"]),
        Instruction.make(Opcode.PRELOAD, sp=0x10, k=16, n=16, wait=["load"]),
        Instruction.make(Opcode.MATMUL, a=0, acc=0, m=16, k=16, accumulate=0, signal=["store", "vector"]),
        Instruction.make(Opcode.TOKEN, queue=Queue.VECTOR, wait=["store", "load"]),
        Instruction.make(Opcode.HALT),
    ]
    assert disassemble(program) == (
        "load mem=sp local=0x0 dram=0x1000 rows=16 cols=16 stride=0x200 signal=matmul\n"
        "preload sp=0x10 k=16 n=16 transpose=0 wait=load\n"
        "matmul a=0x0 acc=0x0 m=16 k=16 accumulate=0 signal=vector,store\n"
        "token queue=vector wait=load,store\n"
        "halt\n"
    )


def test_assembler_accepts_comments_case_and_number_prefixes():
    text = """
    # a comment line

    LOAD mem=ACC local=10 dram=0b1000 rows=0x2 cols=4 stride=16 signal=Matmul ; trailing comment
    preload sp=0o7 k=2 n=4 wait=load
    halt  # done
    """
    program = assemble(text)
    assert program == [
        Instruction.make(Opcode.LOAD, mem=Mem.ACC, local=10, dram=8, rows=2, cols=4, stride=16, signal=["matmul"]),
        Instruction.make(Opcode.PRELOAD, sp=7, k=2, n=4, wait=["load"]),
        Instruction.make(Opcode.HALT),
    ]


GOOD_PREFIX = "# program\nhalt\n"  # the bad line below is line 3
BAD_LINES = [
    ("jump to=0", "unknown mnemonic 'jump'"),
    ("halt now", "expected name=value"),
    ("load mem=sp local=0 dram=0 rows=1 cols=1 stride=", "expected name=value"),
    ("preload sp=0 k=1 n=1 depth=3", "unknown field 'depth'"),
    ("preload sp=0 sp=1 k=1 n=1", "given twice"),
    ("preload sp=zero k=1 n=1", "bad value 'zero'"),
    ("load mem=dram local=0 dram=0 rows=1 cols=1 stride=0", "bad value 'dram' for field mem"),
    ("preload sp=0 k=256 n=1", "k=256 does not fit 8 bits"),
    ("preload sp=0 k=1", "field 'n' is missing"),
    ("preload sp=0 k=1 n=1 wait=matmul", "itself"),
    ("fence signal=load", "takes no tokens"),
    ("preload sp=0 k=1 n=1 wait=dma", "unknown queue 'dma'"),
    ("token queue=dma", "bad value 'dma'"),
]


@pytest.mark.parametrize("line, words", BAD_LINES, ids=[b[1] for b in BAD_LINES])
def test_assembler_errors_carry_the_line_number(line, words):
    with pytest.raises(IsaError) as info:
        assemble(GOOD_PREFIX + line + "\nhalt\n")
    message = str(info.value)
    assert message.startswith("line 3: "), message
    assert words in message


# ---------------------------------------------------------------------- generated docs
def test_docs_isa_md_is_up_to_date():
    path = ROOT / "docs" / "isa.md"
    assert path.exists(), "docs/isa.md is missing: run `make docs`"
    assert path.read_text() == render_markdown(), "docs/isa.md is out of date with weft/hw/isa.py: run `make docs`"


def test_reference_lists_every_opcode_and_field():
    text = render_markdown()
    for spec in OPS.values():
        assert f"## `{spec.mnemonic}` (0x{spec.opcode:02x})" in text
        for f in spec.fields:
            assert f"`{f.name}`" in text
