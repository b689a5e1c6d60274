"""Throughput of the UART transport against a twin of ``UartTop`` (bytes over the pty).

    python -m weft.sw.driver.uart_bench [CONFIG] [--bytes N] [--clocks-per-bit C]

Launches (builds, cached) a twin of the core with the UART bridge, opens
:class:`~weft.sw.driver.uart.UartTransport` on its pseudo-terminal and prints: the register
round trip, memory write and read throughput in bytes/s, the twin's simulated cycles per
second while it served them, and the line efficiency (payload bytes per byte time on the
line: the frame overhead and the host's turnaround). On a board the same frames move at
``baud / 10`` bytes/s times that efficiency.
"""

from __future__ import annotations

import argparse
import os
import time


def main(argv: list[str] | None = None) -> int:
    from ...hw.config import load_config
    from ...hw.uart import UartTop
    from ...sim.twin import Twin
    from .uart import UartTransport

    ap = argparse.ArgumentParser(prog="python -m weft.sw.driver.uart_bench", description=__doc__.split("\n")[0])
    ap.add_argument("config", nargs="?", default="tiny")
    ap.add_argument("--bytes", type=int, default=16384, help="bytes written and read back (default 16384)")
    ap.add_argument("--clocks-per-bit", type=int, default=4)
    ap.add_argument("--reads", type=int, default=50, help="register reads timed (default 50)")
    args = ap.parse_args(argv)
    config = load_config(args.config)
    t0 = time.monotonic()
    with Twin.launch(UartTop(config, clocks_per_bit=args.clocks_per_bit), config) as twin:
        info = twin.client.uart_info()
        print(f"twin of UartTop({config.name}) ready in {time.monotonic() - t0:.1f} s; UART on {info.pty}, "
              f"{info.clocks_per_bit} clocks per bit")
        t = UartTransport(info.pty, timeout=5.0)
        c0 = twin.client.cycles()
        t1 = time.monotonic()
        for _ in range(args.reads):
            t.read32(0)
        reg_s = (time.monotonic() - t1) / args.reads
        data = os.urandom(args.bytes)
        t1 = time.monotonic()
        t.write_mem(0x1000, data)
        w_s = time.monotonic() - t1
        t1 = time.monotonic()
        back = t.read_mem(0x1000, len(data))
        r_s = time.monotonic() - t1
        cycles = twin.client.cycles() - c0
        wall = reg_s * args.reads + w_s + r_s
        if back != data:
            print("MISMATCH: the bytes read back differ from those written")
            return 1
        line = twin.client.uart_info()
        byte_cycles = 10 * info.clocks_per_bit
        busy_bytes = line.bytes_in + line.bytes_out
        print(f"register read round trip {reg_s * 1e3:.2f} ms ({args.reads} reads)")
        print(f"memory write {args.bytes / w_s:,.0f} B/s, read {args.bytes / r_s:,.0f} B/s "
              f"({args.bytes} bytes each, {t.max_payload}-byte frames)")
        print(f"twin: {cycles:,} cycles in {wall:.2f} s = {cycles / wall:,.0f} cycles/s; "
              f"{busy_bytes:,} bytes on the line = {busy_bytes * byte_cycles / max(cycles, 1):.0%} of the cycles "
              f"carried a byte; retries {t.stats.retries}")
        eff = 2 * args.bytes / ((line.bytes_in + line.bytes_out) or 1)
        print(f"payload share of the line bytes {eff:.0%}: on a board expect at most baud / 10 x {eff:.0%} B/s "
              f"(e.g. {3e6 / 10 * eff:,.0f} B/s at 3,000,000 baud), less each frame's host turnaround")
        t.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
