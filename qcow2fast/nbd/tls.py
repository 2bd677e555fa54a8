"""TLS for the NBD server, configured as qemu-nbd's is: ``--object
tls-creds-x509,id=ID,dir=DIR,endpoint=server[,verify-peer=on|off]`` and
``--tls-creds ID``, with QEMU's file names in DIR (qemu
crypto/tlscredsx509.c): ``ca-cert.pem``, ``server-cert.pem`` and
``server-key.pem`` required, ``ca-crl.pem`` and ``dh-params.pem`` used
when present.  ``verify-peer`` (on by default, as in QEMU) asks every
client for a certificate signed by the CA.

``endpoint=client`` credentials (``serve -L``, nbd/listing.py): ``ca-cert.pem``
required, ``client-cert.pem``/``client-key.pem`` used when present, the
server's certificate checked against the CA and the host name.

The handshake (handshake.py) then refuses every option but
NBD_OPT_STARTTLS (and NBD_OPT_ABORT) with NBD_REP_ERR_TLS_REQD until the
connection is upgraded, as qemu-nbd does (proto.md "TLS support", the
FORCEDTLS mode).
"""

import contextlib
import os
import ssl

from ..errors import InvalidArgumentError

CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"
DH_PARAMS = "dh-params.pem"

# A client that connects and stalls in the TLS handshake is dropped after this.
HANDSHAKE_TIMEOUT = 30.0



class Credentials:
    """One ``tls-creds-x509`` object (cli/objects.py parses ``--object``)."""

    def __init__(self, id, dir, endpoint="client", verify_peer=True):
        self.id, self.dir, self.endpoint, self.verify_peer = id, dir, endpoint, verify_peer

    def server_context(self):
        """An ``ssl.SSLContext`` for the server side, or qemu's error."""
        ctx, path = self._context("server", (CA_CERT, SERVER_CERT, SERVER_KEY))
        with self._loading():
            ctx.load_cert_chain(path(SERVER_CERT), path(SERVER_KEY))
            self._load_ca(ctx, path)
            if os.path.exists(path(DH_PARAMS)):
                ctx.load_dh_params(path(DH_PARAMS))
        ctx.verify_mode = ssl.CERT_REQUIRED if self.verify_peer else ssl.CERT_NONE
        return ctx

    def client_context(self):
        """An ``ssl.SSLContext`` for a client (``qemu-nbd -L``): the CA's
        certificate required, the client's own used when present; the
        server's certificate checked against the CA and the host name
        unless ``verify-peer=off``."""
        ctx, path = self._context("client", (CA_CERT,))
        with self._loading():
            self._load_ca(ctx, path)
            if os.path.exists(path(CLIENT_CERT)) and os.path.exists(path(CLIENT_KEY)):
                ctx.load_cert_chain(path(CLIENT_CERT), path(CLIENT_KEY))
        ctx.check_hostname = self.verify_peer
        ctx.verify_mode = ssl.CERT_REQUIRED if self.verify_peer else ssl.CERT_NONE
        return ctx

    def _context(self, endpoint, required):
        """A new context for ``endpoint`` once the ``required`` files can be
        read (qemu's order and words), and the path of a file in DIR."""
        if self.endpoint != endpoint:
            raise InvalidArgumentError("Failed to get TLS creds: Expected TLS credentials for a "
                                       f"{endpoint} endpoint")
        path = lambda name: os.path.join(self.dir, name)     # noqa: E731
        for name in required:
            try:
                with open(path(name), "rb"):
                    pass
            except OSError as e:
                raise InvalidArgumentError(f"Unable to access credentials {path(name)}: "
                                           f"{e.strerror}") from None
        return ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if endpoint == "server"
                              else ssl.PROTOCOL_TLS_CLIENT), path

    @staticmethod
    def _load_ca(ctx, path):
        ctx.load_verify_locations(cafile=path(CA_CERT))
        if os.path.exists(path(CA_CRL)):
            ctx.load_verify_locations(cafile=path(CA_CRL))
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF

    @contextlib.contextmanager
    def _loading(self):
        try:
            yield
        except (ssl.SSLError, ValueError) as e:
            raise InvalidArgumentError(f"Unable to load TLS credentials from {self.dir}: "
                                       f"{e}") from None
