"""An NBD server for qcow2fast images (NetworkBlockDevice/nbd doc/proto.md).

    import qcow2fast.nbd
    with qcow2fast.nbd.serve("disk.qcow2", socket_path="/tmp/disk.sock") as server:
        ...                                   # nbd+unix:///?socket=/tmp/disk.sock
    server = qcow2fast.nbd.serve(img, host="127.0.0.1", port=0)   # an open Image
    server.address; server.serve_forever(); server.close()
    async with qcow2fast.nbd.serve(img, socket_path=p) as server:  # from asyncio
        await server.wait_closed()

Modules: protocol (wire format), handshake (option haggling), transmission
(requests), channel (buffered socket I/O), export (the image as an NBD
export), contexts (metadata contexts: base:allocation,
qemu:allocation-depth, qemu:dirty-bitmap:NAME), tls (X.509 credentials,
STARTTLS), server (listener, threads, socket activation).

The names below are imported on first use: the client (``nbd.client``,
for nbd:// images and targets) does not load the server and asyncio.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .._lazy import lazy_attribute

if TYPE_CHECKING:
    from .export import MAX_PAYLOAD, Export
    from .server import Server, serve, socket_activation_sockets

__all__ = ["serve", "Server", "Export", "MAX_PAYLOAD", "socket_activation_sockets"]
_LAZY = {"MAX_PAYLOAD": ".export", "Export": ".export", "Server": ".server",
         "serve": ".server", "socket_activation_sockets": ".server"}


def __getattr__(name: str) -> Any:
    return lazy_attribute(__name__, _LAZY, globals(), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
