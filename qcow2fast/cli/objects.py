"""qemu's ``--object TYPE,id=ID,key=value,...`` arguments (``,,`` for a
comma; ``qom-type=TYPE`` also accepted), with qemu's messages.  The x509
TLS credentials (``serve --tls-creds``), secrets
(``secret,id=ID,data=...|file=...[,format=raw|base64]``, referenced by
``encrypt.key-secret=ID``) and the authz-simple/-list/-listfile checks
(``serve --tls-authz``, nbd/authz.py) are implemented; the other types
qemu knows are refused by name."""

import base64
import binascii

from ..engine.secret import Secret
from ..errors import InvalidArgumentError
from .options import UsageError, split_options

SECRET_TYPE = "secret"

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
    if qom_type == "authz-pam":         # (qemu built without PAM says so too)
        raise UsageError("invalid object type: authz-pam")
    if qom_type not in (X509_TYPE, SECRET_TYPE) and qom_type not in AUTHZ_TYPES:
        raise UsageError(f"object type '{qom_type}' is not supported by qcow2fast "
                         f"(supported: {X509_TYPE}, {SECRET_TYPE}, {', '.join(AUTHZ_TYPES)})")
    oid = props.pop("id", None)
    if not oid:
        raise UsageError("Parameter 'id' is missing")
    if qom_type == SECRET_TYPE:
        return SecretObject(oid, _secret_value(props))
    if qom_type in AUTHZ_TYPES:
        return AuthzObject(oid, _authz(qom_type, props))
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
    from ..nbd.tls import Credentials   # (not at import: CLI start-up)
    return Credentials(oid, directory, endpoint, _BOOL[verify])


def tls_context(objects, creds_id, client=False):
    """The server's (or ``client``'s) SSLContext for ``--tls-creds ID``
    among the ``--object`` arguments given."""
    found = _objects(objects).get(creds_id)
    if found is None or isinstance(found, (SecretObject, AuthzObject)):
        raise UsageError(f"Failed to get TLS creds: No TLS credentials with id '{creds_id}'")
    return found.client_context() if client else found.server_context()


def tls_authz(objects, authz_id):
    """The QAuthZ object ``--tls-authz ID`` names (nbd/authz.py)."""
    found = _objects(objects).get(authz_id)
    if not isinstance(found, AuthzObject):
        raise UsageError(f"Cannot find QAuthZ object ID {authz_id}")
    return found.authz


def _objects(objects):
    """{id: object} of the ``--object`` arguments, each parsed and checked
    (as qemu creates them all)."""
    out = {}
    for text in objects or ():
        o = parse_object(text)
        if o.id in out:
            raise UsageError(f"attempt to add duplicate property '{o.id}' to object "
                             "(type 'container')")
        out[o.id] = o
    return out


AUTHZ_TYPES = ("authz-simple", "authz-list", "authz-listfile")


class AuthzObject:
    """A ``--object authz-*``: its id and the check (nbd/authz.py)."""

    def __init__(self, oid, authz):
        self.id, self.authz = oid, authz


def _authz(qom_type, props):
    from ..nbd import authz
    try:
        if qom_type == "authz-simple":
            identity = props.pop("identity", None)
            _no_more(props)
            if identity is None:
                raise UsageError("Parameter 'identity' is missing")
            return authz.Simple(identity)
        if qom_type == "authz-listfile":
            filename = props.pop("filename", None)
            refresh = props.pop("refresh", "on")
            _no_more(props)
            if filename is None:
                raise UsageError("filename not provided")
            if refresh not in _BOOL:
                raise UsageError("Parameter 'refresh' expects 'on' or 'off'")
            return authz.ListFile(filename, _BOOL[refresh])
        rules = {}                          # authz-list: rules.N.KEY
        for key in [k for k in props if k.startswith("rules.")]:
            index, _, field = key[len("rules."):].partition(".")
            if not index.isdigit() or not field:
                raise UsageError(f"Parameter '{key}' is unexpected")
            rules.setdefault(int(index), {})[field] = props.pop(key)
        policy = props.pop("policy", "deny")
        _no_more(props)
        if sorted(rules) != list(range(len(rules))):
            raise UsageError("Parameter 'rules' is missing an index: rules.N are numbered 0, 1, ...")
        return authz.List(policy, [rules[i] for i in range(len(rules))])
    except InvalidArgumentError as e:
        raise UsageError(str(e)) from None


def _no_more(props):
    if props:
        raise UsageError(f"Parameter '{next(iter(props))}' is unexpected")


class SecretObject:
    """A ``--object secret``: its id and value (a Secret: never shown)."""

    def __init__(self, oid, value):
        self.id, self.value = oid, value

    def __repr__(self):
        return f"SecretObject(id={self.id!r})"


def _secret_value(props):
    """qemu's secret object (crypto/secret.c, secret_common.c)."""
    data, path = props.pop("data", None), props.pop("file", None)
    fmt = props.pop("format", "raw")
    props.pop("loaded", None)
    if "keyid" in props or "iv" in props:
        raise UsageError("secret: encrypted secrets (keyid, iv) are not supported by qcow2fast")
    if props:
        raise UsageError(f"Parameter '{next(iter(props))}' is unexpected")
    if fmt not in ("raw", "base64"):
        raise UsageError(f"Parameter 'format' does not accept value '{fmt}'")
    if data is not None and path is not None:
        raise UsageError("'file' and 'data' are mutually exclusive")
    if data is None and path is None:
        raise UsageError("Either 'file' or 'data' must be provided")
    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise UsageError(f"Unable to read {path}: Failed to open file \u201c{path}\u201d: "
                             f"{e.strerror}") from None
    else:
        raw = data.encode()
    if fmt == "base64":
        try:
            raw = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise UsageError("Base64 data contains invalid characters") from None
    return Secret(raw)


def secrets(objects):
    """{id: Secret} of the ``--object secret`` arguments (every object is
    parsed and checked, as qemu creates them all)."""
    return {k: o.value for k, o in _objects(objects).items() if isinstance(o, SecretObject)}


def lookup_secret(table, oid):
    """The secret ``oid`` names (qemu's message when there is none)."""
    if oid not in table:
        raise UsageError(f"No secret with id '{oid}'")
    return table[oid]
