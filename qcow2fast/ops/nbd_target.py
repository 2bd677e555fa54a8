"""An NBD export as a conversion's target (``qemu-img convert -O qcow2 SRC
nbd+unix:///EXP?socket=S``: a new image written onto an export, as a
qcow2 file inside an OVA tar served by ``qemu-nbd --offset``; or ``-O raw
[-n]``: the disk's bytes, written at random through ``open_export``).

A new qcow2 image is written as the qcow2 writer writes a stream (stdout):
in order from offset 0, metadata first.  ``NbdStream.fd`` is the write
end of a pipe; a thread reads it a block at a time and sends each block
to the export (a block of zeros as NBD_CMD_WRITE_ZEROES).  ``finish``
waits for the last block and flushes the export: the convert succeeds
only once the server said every write and the flush were done."""

import os
import threading

from ..nbd.client import NbdClient, NbdError
from ..host.remote import is_writable, protocol_of

BLOCK = 1 << 20
_ZEROS = bytes(BLOCK)


def is_nbd_name(name):
    return (protocol_of(name) or "").startswith("nbd")


def is_remote_target(name):
    """An NBD export or an ``ssh://`` file (host/remote_ssh.SshTarget, the
    same calls): the remote images that open for writing, written through
    their connection, never renamed into place."""
    return is_writable(name)


def open_export(uri, create=True):
    """A connection to ``uri`` for writing at random (a raw target); an
    ssh:// file is made or emptied on the server unless ``create`` is False."""
    if not is_nbd_name(uri):
        from ..host.remote_ssh import SshTarget
        return SshTarget(uri, create=create)
    client = NbdClient(uri)
    if client.read_only:
        client.close()
        raise NbdError(30, f"Could not open '{uri}': the export is read-only")
    return client


class NbdStream:
    """The bytes written to ``fd``, sent in order to the export ``uri``."""

    def __init__(self, uri):
        self.client = open_export(uri)
        self._r, self.fd = os.pipe()
        self.error = None
        self.sent = 0
        self._thread = threading.Thread(target=self._send, name="qcow2fast-nbd-target",
                                        daemon=True)
        self._thread.start()

    def _send(self):
        buf = bytearray(BLOCK)
        mv = memoryview(buf)
        try:
            while True:
                n = 0
                while n < BLOCK:
                    k = os.readv(self._r, [mv[n:]])
                    if k == 0:
                        break
                    n += k
                if n == 0:
                    return
                if mv[:n] == _ZEROS[:n]:
                    self.client.write_zeroes(self.sent, n)
                else:
                    self.client.pwrite(mv[:n], self.sent)
                self.sent += n
                if n < BLOCK:
                    return
        except BaseException as e:          # said by finish(); the writer sees EPIPE
            self.error = e
        finally:
            os.close(self._r)

    def finish(self, ok):
        """Wait for the sender; raise its error if it had one (the cause of
        a failed write to the pipe, too), else flush the export when ``ok``.
        Closes everything."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        self._thread.join()
        try:
            if self.error is not None:
                raise self.error
            if ok:
                self.client.flush()
        finally:
            self.client.close()
