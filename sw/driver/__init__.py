"""Device driver API: one :class:`Device` over several transports.

::

    from weft.sw.driver import Device, TwinTransport
    with Twin.launch(design, config) as twin:
        dev = Device.open(TwinTransport(twin), config)   # checks ID and CONFIG_HASH
        dev.load_bundle(bundle); dev.write_inputs({"x": x})
        dev.start(); dev.wait(timeout_s=10)
        outputs = dev.read_outputs(); counters = dev.counters()

Transports: :class:`TwinTransport` (the simulated board, ``weft.sim.twin``); UART and PCIe
transports subclass :class:`Transport` and register a URI scheme (:func:`register_transport`).
"""

from .device import (ConfigHashMismatch, Device, DeviceError, DeviceTimeoutError, DriverError, IdentityError,
                     Status)
from .transport import Transport, TransportError, open_transport, register_transport, transport_schemes
from .twin import TwinTransport, TwinTransportError

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
]
