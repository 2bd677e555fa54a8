"""X.509 test certificates made with ``cryptography``, laid out as QEMU's
tls-creds-x509 and libnbd's tls-certificates=DIR expect them: a CA
(ca-cert.pem), the server's certificate and key (server-cert.pem,
server-key.pem, for localhost and 127.0.0.1) and a client's
(client-cert.pem, client-key.pem)."""

import datetime
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "qcow2fast tests"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject, key, issuer, issuer_key, *, ca=False, usage=None, sans=()):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(days=1))
         .not_valid_after(now + datetime.timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=not ca,
                                      content_commitment=False, data_encipherment=False,
                                      key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                                      encipher_only=False, decipher_only=False),
                        critical=True))
    if usage is not None:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(path, cert=None, key=None):
    if cert is not None:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    else:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        path.chmod(0o600)


def make_certificates(directory, *, client=True, ca_name="qcow2fast test CA"):
    """Write the CA, server and (with ``client``) client files into
    ``directory``; returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert(ca_name, ca_key, ca_name, ca_key, ca=True)
    _write(directory / "ca-cert.pem", cert=ca)
    server_key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    _write(directory / "server-cert.pem",
           cert=_cert("localhost", server_key, ca_name, ca_key,
                      usage=ExtendedKeyUsageOID.SERVER_AUTH, sans=sans))
    _write(directory / "server-key.pem", key=server_key)
    if client:
        client_key = ec.generate_private_key(ec.SECP256R1())
        _write(directory / "client-cert.pem",
               cert=_cert("qcow2fast test client", client_key, ca_name, ca_key,
                          usage=ExtendedKeyUsageOID.CLIENT_AUTH))
        _write(directory / "client-key.pem", key=client_key)
    return directory
