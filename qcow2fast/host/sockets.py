"""Client sockets with qemu's messages (util/qemu-sockets.c,
``inet_connect_saddr``): what the NBD client (nbd/client.py) and the ssh
driver (host/remote_ssh.py) say when a server cannot be reached."""

import socket


def shown(address):
    """A TCP (host, port) as qemu writes it, or a Unix socket's path."""
    return address if isinstance(address, str) else f"{address[0]}:{address[1]}"


def connect(address, timeout, error=OSError):
    """A connected stream socket to ``address``, a (host, port) or a Unix
    socket's path; ``error(errno, message)`` raised with qemu's message if
    the name does not resolve or nobody answers."""
    try:
        if isinstance(address, str):
            return _unix(address, timeout)
        return socket.create_connection(address, timeout)
    except socket.gaierror as e:
        raise error(e.errno, f"address resolution failed for {shown(address)}: "
                             f"{e.strerror}") from None
    except OSError as e:
        raise error(e.errno, f"Failed to connect to '{shown(address)}': {e.strerror}") from None


def _unix(path, timeout):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except BaseException:
        s.close()
        raise
    return s
