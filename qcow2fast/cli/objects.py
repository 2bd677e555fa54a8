"""qemu's ``--object TYPE,id=ID,key=value,...`` arguments (``,,`` for a
comma; ``qom-type=TYPE`` also accepted), with qemu's messages.  Only the
x509 TLS credentials are implemented (``serve --tls-creds``); the other
types qemu knows are refused by name."""

from ..nbd.tls import Credentials
from .options import UsageError, split_options

X509_TYPE = "tls-creds-x509"
QOM_TYPES = (X509_TYPE, "tls-creds-psk", "tls-creds-anon", "secret", "authz-simple",
             "authz-list", "authz-listfile", "authz-pam")
_BOOL = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}


def parse_object(text):
    """One ``--object`` argument -> a :class:`qcow2fast.nbd.tls.Credentials`."""
    items = split_options(text)
    props = {}
    if items and items[0][1] is None:
        props["qom-type"] = items.pop(0)[0]
    for key, value in items:
        props[key] = value
    qom_type = props.pop("qom-type", None)
    if qom_type is None:
        raise UsageError("Parameter 'qom-type' is missing")
    if qom_type not in QOM_TYPES:
        raise UsageError(f"Parameter 'qom-type' does not accept value '{qom_type}'")
    if qom_type != X509_TYPE:
        raise UsageError(f"object type '{qom_type}' is not supported by qcow2fast "
                         f"(supported: {X509_TYPE})")
    oid = props.pop("id", None)
    if not oid:
        raise UsageError("Parameter 'id' is missing")
    endpoint = props.pop("endpoint", "client")
    if endpoint not in ("client", "server"):
        raise UsageError(f"Parameter 'endpoint' does not accept value '{endpoint}'")
    verify = props.pop("verify-peer", "on")
    if verify not in _BOOL:
        raise UsageError("Parameter 'verify-peer' expects 'on' or 'off'")
    directory = props.pop("dir", None)
    props.pop("loaded", None)           # accepted by qemu, without effect
    props.pop("sanity-check", None)     # qemu's own certificate checks: OpenSSL's here
    if "priority" in props:
        raise UsageError(f"{X509_TYPE}: 'priority' (a GnuTLS priority string) is not "
                         "supported")
    if props:
        raise UsageError(f"Property '{X509_TYPE}.{next(iter(props))}' not found")
    if directory is None:
        raise UsageError("Parameter 'dir' is missing")
    return Credentials(oid, directory, endpoint, _BOOL[verify])


def tls_context(objects, creds_id):
    """The server's SSLContext for ``--tls-creds ID`` among the ``--object``
    arguments given."""
    creds = {}
    for text in objects:
        c = parse_object(text)
        if c.id in creds:
            raise UsageError(f"attempt to add duplicate property '{c.id}' to object "
                             "(type 'container')")
        creds[c.id] = c
    if creds_id not in creds:
        raise UsageError(f"Failed to get TLS creds: No TLS credentials with id '{creds_id}'")
    return creds[creds_id].server_context()
