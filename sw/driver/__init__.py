"""Device driver API: one :class:`Device` over several transports.

::

    from weft.sw.driver import Device, TwinTransport
    with Twin.launch(design, config) as twin:
        dev = Device.open(TwinTransport(twin), config)   # checks ID and CONFIG_HASH
        dev.load_bundle(bundle); dev.write_inputs({"x": x})
        dev.start(); dev.wait(timeout_s=10)
        outputs = dev.read_outputs(); counters = dev.counters()

Transports (each registers a URI scheme for :func:`open_transport`): :class:`TwinTransport`
(``twin:<socket>``, the simulated board, ``weft.sim.twin``), :class:`UartTransport`
(``uart:///dev/ttyUSB0?baud=3000000``, the UART bridge ``weft.hw.uart``) and
:class:`XdmaTransport` (``xdma:///dev/xdma0``, PCIe through the XDMA driver's files).
"""

from .device import (ConfigHashMismatch, Device, DeviceError, DeviceTimeoutError, DriverError, IdentityError,
                     Status)
from .transport import Transport, TransportError, open_transport, register_transport, transport_schemes
from .twin import TwinTransport, TwinTransportError
from .uart import UartTransport, UartTransportError
from .xdma import XdmaTransport, XdmaTransportError

__all__ = [
    "Device",
    "Status",
    "DriverError",
    "IdentityError",
    "ConfigHashMismatch",
    "DeviceError",
    "DeviceTimeoutError",
    "Transport",
    "TransportError",
    "open_transport",
    "register_transport",
    "transport_schemes",
    "TwinTransport",
    "TwinTransportError",
    "UartTransport",
    "UartTransportError",
    "XdmaTransport",
    "XdmaTransportError",
]
