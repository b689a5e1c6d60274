"""The twin's UART additions: UART_INFO on a twin without a UART is refused clearly (the
UART twin itself is exercised by tests/hil: the `uart` session and test_uart_link.py)."""

from __future__ import annotations

import pytest

from weft.sim.twin import Op, StatusCode, TwinRequestError

pytestmark = [pytest.mark.rtl, pytest.mark.verilator_only]


def test_uart_info_on_a_twin_without_uart_is_refused(twin):
    with pytest.raises(TwinRequestError, match="has no UART") as info:
        twin.client.uart_info()
    assert info.value.status == StatusCode.UNSUPPORTED and info.value.op == Op.UART_INFO
    assert twin.client.reg_read(0)[1] == 0  # the connection stays usable
