"""HIL tests: the same functions against the twin (default) and a board (``WEFT_HIL_TARGET``).

Registers, memory, a DMA loopback program and GEMM bundles against the bit-exact model,
all on ``tiny``. See docs/hil.md.
"""

from __future__ import annotations

import numpy as np
import pytest

from weft.compiler.gemm import build_gemm_bundle
from weft.hw.bundle import Bundle, Segment, TensorSpec
from weft.hw.isa import assemble
from weft.hw.registers import ID_VALUE
from weft.hw.vector_numerics import fixed_point_scale, pack_scale_word
from weft.sw.driver import Device, open_transport
from weft.sw.hil import TARGET_ENV, compare_with_golden, first_difference

from .conftest import SLOW_LINK_PATTERN_BYTES, TINY, hil_target, is_slow_link, target_is_launched_twin

pytestmark = [pytest.mark.rtl, pytest.mark.verilator_only, pytest.mark.every_transport]


def test_identity_and_scratch_registers(session):
    dev = session.device
    assert dev.read_reg("ID") == ID_VALUE
    assert dev.read_reg("CONFIG_HASH") == TINY.hash32
    assert dev.read_field("CONFIG_INFO", "rows") == TINY.array.rows
    assert dev.read_field("VERSION", "major") == 0
    for v in (0, 0xFFFFFFFF, 0x5A5AA5A5, 0xA5A55A5A, *(1 << i for i in range(32))):
        dev.write_reg("SCRATCH", v)
        assert dev.read_reg("SCRATCH") == v
    status = dev.status()
    assert not status.busy and not status.error


def test_memory_patterns(session):
    dev = session.device
    size = TINY.device_memory_bytes
    rng = np.random.default_rng(11)
    patterns = {
        "zeros": np.zeros(4096, np.uint8),
        "ones": np.full(4096, 0xFF, np.uint8),
        "checker": np.tile(np.array([0x55, 0xAA], np.uint8), 2048),
        "walking ones": np.array([1 << (i % 8) for i in range(4096)], np.uint8),
        "address in data": np.arange(1 << 16, dtype="<u4").view(np.uint8),
        "random": rng.integers(0, 256, 100_003, dtype=np.uint8),
    }
    if is_slow_link(session):  # the UART twin moves about 2.5 KB/s: the same patterns, shorter
        patterns = {name: data[:SLOW_LINK_PATTERN_BYTES] for name, data in patterns.items()}
    for name, data in patterns.items():
        for addr in (0, 3, size // 2 + 1, size - data.size):
            dev.write_mem(addr, data)
            got = np.frombuffer(dev.read_mem(addr, data.size), np.uint8)
            assert np.array_equal(got, data), f"{name} at 0x{addr:X}: {first_difference({'m': got}, {'m': data})}"
    # a write does not disturb its neighbours
    dev.write_mem(0x1000, bytes(range(16)))
    dev.write_mem(0x1004, b"\xEE")
    assert dev.read_mem(0x1000, 16) == bytes(range(4)) + b"\xEE" + bytes(range(5, 16))


def _loopback_bundle(src: int, dst: int, rows: int, cols: int, src_stride: int, dst_stride: int,
                     data: bytes) -> Bundle:
    program = assemble(f"""
        load mem=sp local=0x10 dram={src:#x} rows={rows} cols={cols} stride={src_stride:#x} signal=store
        store mem=sp local=0x10 dram={dst:#x} rows={rows} cols={cols} stride={dst_stride:#x} wait=load
        halt
    """)
    out = TensorSpec.dense("image", (rows * dst_stride,), "uint8", dst)
    return Bundle.for_config(TINY, program=program, program_address=0x1000,
                             segments=[Segment("source", src, data)], inputs=[], outputs=[out])


@pytest.mark.parametrize("src,dst,rows,src_stride,dst_stride", [
    (0x2_0000, 0x3_0000, 64, 4, 4),      # contiguous
    (0x2_0000, 0x4_0001, 37, 12, 8),     # strided source, gaps and an unaligned destination
    (0x2_0003, 0x5_0000, 200, 4, 4),     # unaligned source
])
def test_dma_loopback(session, src, dst, rows, src_stride, dst_stride):
    """LOAD device memory -> scratchpad, STORE scratchpad -> device memory elsewhere; bytes compared."""
    dev = session.device
    cols = min(TINY.sp_row_elems, 4)
    rng = np.random.default_rng(rows)
    data = rng.integers(0, 256, rows * src_stride, dtype=np.uint8).tobytes()
    bundle = _loopback_bundle(src, dst, rows, cols, src_stride, dst_stride, data)
    fill = b"\xEE" * (rows * dst_stride + 16)
    dev.write_mem(dst - 8, fill)  # the bytes around and between the destination rows must survive
    outputs, counters = session.run(bundle, {}, watchdog_cycles=1_000_000, timeout_s=30)
    got = dev.read_mem(dst - 8, len(fill))
    want = bytearray(fill)
    for r in range(rows):
        want[8 + r * dst_stride:8 + r * dst_stride + cols] = data[r * src_stride:r * src_stride + cols]
    assert got == bytes(want), first_difference({"m": np.frombuffer(got, np.uint8)},
                                                {"m": np.frombuffer(bytes(want), np.uint8)})
    assert outputs["image"].tobytes() == bytes(want[8:8 + rows * dst_stride])
    assert counters["bytes_written"] == rows * cols
    assert counters["bytes_read"] >= rows * cols  # plus instruction fetch
    assert counters["instructions"] == 3 and counters["cycles"] > 0


def _gemm(rng, M, N, K, *, int8: bool, relu: bool = False):
    a = rng.integers(-128, 128, (M, K), dtype=np.int8)
    b = rng.integers(-128, 128, (K, N), dtype=np.int8)
    kwargs = {}
    if int8:
        mult, shift = fixed_point_scale(rng.uniform(0.5, 2.0, N) / (128 * np.sqrt(K)))
        kwargs = {"bias": rng.integers(-30000, 30000, N).astype(np.int32), "scale_words": pack_scale_word(mult, shift),
                  "relu": relu}
    return build_gemm_bundle(TINY, b, M, **kwargs), {"a": a}


@pytest.mark.parametrize("M,N,K,int8", [(7, 5, 9, False), (9, 6, 13, True), (33, 10, 5, True), (4, 4, 40, False)])
def test_gemm_matches_golden(session, M, N, K, int8):
    rng = np.random.default_rng(M * 1000 + N * 10 + K)
    bundle, inputs = _gemm(rng, M, N, K, int8=int8, relu=int8)
    report = compare_with_golden(bundle, inputs, TINY, session=session, watchdog_cycles=10_000_000, timeout_s=60)
    assert report.identical, report.difference
    perf = report.performance
    c = report.counters
    assert c["array_busy"] > 0 and c["cycles"] >= c["array_busy"] + sum(c[s] for s in
                                                                       ("stall_load", "stall_store", "stall_token"))
    assert 0 < perf.utilization <= 1 and 0 < perf.mac_utilization <= 1
    assert perf.latency_s == pytest.approx(c["cycles"] / (TINY.clock_mhz * 1e6))
    assert "projected latency" in perf.summary()


def test_first_difference_names_the_byte():
    a = np.arange(12, dtype=np.int32).reshape(3, 4)
    b = a.copy()
    assert first_difference({"c": a}, {"c": b}) is None
    b[1, 2] = 99
    text = first_difference({"c": a}, {"c": b})
    assert "byte 24" in text and "[1, 2]" in text


@pytest.mark.skipif(target_is_launched_twin(), reason=f"set {TARGET_ENV}=URI to run against a board")
def test_target_uri_opens_through_open_transport(session):
    """With a board (or an external twin) named by URI, the session's link is that transport's."""
    assert session.twin is None
    assert session.describe().split(":", 1)[0] == hil_target().split(":", 1)[0]
    assert Device(session.device.transport, TINY).read_reg("ID") == ID_VALUE
    assert callable(open_transport)
