"""TLS for the NBD server, configured as qemu-nbd's is: ``--object
tls-creds-x509,id=ID,dir=DIR,endpoint=server[,verify-peer=on|off]`` and
``--tls-creds ID``, with QEMU's file names in DIR (qemu
crypto/tlscredsx509.c): ``ca-cert.pem``, ``server-cert.pem`` and
``server-key.pem`` required, ``ca-crl.pem`` and ``dh-params.pem`` used
when present.  ``verify-peer`` (on by default, as in QEMU) asks every
client for a certificate signed by the CA.

The handshake (handshake.py) then refuses every option but
NBD_OPT_STARTTLS (and NBD_OPT_ABORT) with NBD_REP_ERR_TLS_REQD until the
connection is upgraded, as qemu-nbd does (proto.md "TLS support", the
FORCEDTLS mode).
"""

import os
import ssl

from ..errors import InvalidArgumentError

CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
DH_PARAMS = "dh-params.pem"

# A client that connects and stalls in the TLS handshake is dropped after this.
HANDSHAKE_TIMEOUT = 30.0



class Credentials:
    """One ``tls-creds-x509`` object (cli/objects.py parses ``--object``)."""

    def __init__(self, id, dir, endpoint="client", verify_peer=True):
        self.id, self.dir, self.endpoint, self.verify_peer = id, dir, endpoint, verify_peer

    def server_context(self):
        """An ``ssl.SSLContext`` for the server side, or qemu's error."""
        if self.endpoint != "server":
            raise InvalidArgumentError("Failed to get TLS creds: Expected TLS credentials for a "
                                       "server endpoint")
        paths = {name: os.path.join(self.dir, name)
                 for name in (CA_CERT, CA_CRL, SERVER_CERT, SERVER_KEY, DH_PARAMS)}
        for name in (CA_CERT, SERVER_CERT, SERVER_KEY):       # qemu's order of loading
            try:
                with open(paths[name], "rb"):
                    pass
            except OSError as e:
                raise InvalidArgumentError(f"Unable to access credentials {paths[name]}: "
                                           f"{e.strerror}") from None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            ctx.load_cert_chain(paths[SERVER_CERT], paths[SERVER_KEY])
            ctx.load_verify_locations(cafile=paths[CA_CERT])
            if os.path.exists(paths[CA_CRL]):
                ctx.load_verify_locations(cafile=paths[CA_CRL])
                ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
            if os.path.exists(paths[DH_PARAMS]):
                ctx.load_dh_params(paths[DH_PARAMS])
        except (ssl.SSLError, ValueError) as e:
            raise InvalidArgumentError(f"Unable to load TLS credentials from {self.dir}: "
                                       f"{e}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if self.verify_peer else ssl.CERT_NONE
        return ctx
