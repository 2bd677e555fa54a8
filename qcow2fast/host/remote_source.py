"""What a remote image's block cache (host/remote.py) reads from: a
:class:`Source` made by each kind of remote -- fsspec and http(s) in
host/remote.py, NBD exports in host/remote_nbd.py, ssh:// files in
host/remote_ssh.py -- which import it from here, not from remote.py."""

import importlib

from ..errors import UnsupportedFeatureError

EXTRA = "pip install qcow2fast[remote]"     # what a missing optional library asks for


def optional(module, what):
    """The optional library ``module`` of the extra, or a clear error that
    ``what`` needs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UnsupportedFeatureError(f"{what} need {module}: {EXTRA}",
                                      feature="remote") from None


class Source:
    """What the cache fetches from: ``fetch(start, end)`` returns those
    bytes, or (when given) ``fetch_into(start, buf)`` fills ``buf`` with the
    bytes at ``start``; ``reopen()`` the same object again (in a forked
    child, whose event loop and connections are not the parent's), or None."""

    def __init__(self, name, size, fetch, close=None, reopen=None, fetch_into=None,
                 block_status=None):
        """``block_status(offset, length)``: [(length, NBD_STATE flags)] of
        the object from ``offset`` (an NBD export's), or None."""
        self.name, self.size, self.fetch, self._close = name, size, fetch, close
        self.reopen, self.fetch_into = reopen, fetch_into
        self.block_status = block_status

    def close(self):
        if self._close is not None:
            self._close()
