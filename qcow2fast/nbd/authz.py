"""Who may connect over TLS, as qemu's QAuthZ objects say it (qemu
authz/simple.c, list.c, listfile.c; ``qemu-nbd --tls-authz ID``): the
identity checked is the client certificate's distinguished name as GnuTLS
writes it (gnutls_x509_crt_get_dn: the certificate's order, ``O=...,CN=...``).

- ``authz-simple,id=ID,identity=DN``: that identity only.
- ``authz-list,id=ID,policy=allow|deny,rules.N.match=M,rules.N.policy=P,
  rules.N.format=exact|glob``: the first rule that matches decides, else
  the policy (default deny); glob is GLib's (``*`` and ``?`` only).
- ``authz-listfile,id=ID,filename=F[,refresh=on|off]``: the same list from
  a JSON file (``{"policy": ..., "rules": [{"match": ..., ...}]}``), read
  again when it changes (``refresh``, the default)."""

import json
import logging
import os
import re

from ..errors import InvalidArgumentError

log = logging.getLogger("qcow2fast.nbd")

# GnuTLS's short names of the attributes of a distinguished name (Python's
# ssl module gives the long ones); others are shown by their long name.
SHORT_NAMES = {"commonName": "CN", "countryName": "C", "localityName": "L",
               "stateOrProvinceName": "ST", "organizationName": "O",
               "organizationalUnitName": "OU", "domainComponent": "DC", "userId": "UID",
               "emailAddress": "EMAIL", "streetAddress": "STREET", "serialNumber": "serialNumber",
               "title": "title", "surname": "surName", "givenName": "givenName",
               "initials": "initials", "generationQualifier": "generationQualifier",
               "dnQualifier": "dnQualifier", "pseudonym": "pseudonym", "name": "name",
               "postalCode": "postalCode"}
_SPECIAL = re.compile(r'([,+"\\<>;])')


def peer_identity(sock):
    """The distinguished name of the TLS peer's certificate (None without one)."""
    cert = sock.getpeercert()
    if not cert or "subject" not in cert:
        return None
    parts = []
    for rdn in cert["subject"]:
        parts.append("+".join(f"{SHORT_NAMES.get(k, k)}={_escape(v)}" for k, v in rdn))
    return ",".join(parts)


def _escape(value):
    value = _SPECIAL.sub(r"\\\1", value)
    if value.startswith(("#", " ")):
        value = "\\" + value
    return value[:-1] + "\\ " if value.endswith(" ") else value


class Simple:
    def __init__(self, identity):
        self.identity = identity

    def allows(self, identity):
        return identity == self.identity


class List:
    POLICIES = ("deny", "allow")
    FORMATS = ("exact", "glob")

    def __init__(self, policy="deny", rules=()):
        """``rules``: [{"match", "policy", "format"}] as qemu's QAuthZListRule."""
        self.policy = _choice("policy", policy, self.POLICIES)
        self.rules = []
        for i, rule in enumerate(rules):
            if not isinstance(rule, dict):
                raise InvalidArgumentError(f"rules.{i}: expected a rule, not {rule!r}")
            for key in rule:
                if key not in ("match", "policy", "format"):
                    raise InvalidArgumentError(f"Parameter 'rules.{i}.{key}' is unexpected")
            for key in ("match", "policy"):
                if key not in rule:
                    raise InvalidArgumentError(f"Parameter 'rules.{i}.{key}' is missing")
            fmt = _choice(f"rules.{i}.format", rule.get("format", "exact"), self.FORMATS)
            match = str(rule["match"])
            pattern = re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c)
                                         for c in match), re.S) if fmt == "glob" else None
            self.rules.append((match, pattern,
                               _choice(f"rules.{i}.policy", rule["policy"], self.POLICIES)))

    def allows(self, identity):
        for match, pattern, policy in self.rules:
            if (pattern.fullmatch(identity) if pattern else match == identity):
                return policy == "allow"
        return self.policy == "allow"


class ListFile:
    def __init__(self, filename, refresh=True):
        self.filename, self.refresh = filename, refresh
        self._stamp = None
        self._list = self._load()

    def _load(self):
        try:
            with open(self.filename, "rb") as f:
                self._stamp = os.fstat(f.fileno()).st_mtime_ns
                text = f.read()
        except OSError as e:
            raise InvalidArgumentError(f"Unable to read '{self.filename}': Failed to open file "
                                       f"\u201c{self.filename}\u201d: {e.strerror}") from None
        try:
            obj = json.loads(text)
        except ValueError as e:
            raise InvalidArgumentError(f"{self.filename}: JSON parse error, {e}") from None
        if not isinstance(obj, dict):
            raise InvalidArgumentError(f"File '{self.filename}' must contain a JSON object")
        bad = [k for k in obj if k not in ("policy", "rules")]
        if bad:
            raise InvalidArgumentError(f"Property 'authz-list.{bad[0]}' not found")
        return List(obj.get("policy", "deny"), obj.get("rules", []))

    def allows(self, identity):
        if self.refresh:
            try:
                changed = os.stat(self.filename).st_mtime_ns != self._stamp
            except OSError:
                changed = False
            if changed:                 # (qemu: its file monitor's reload)
                try:
                    self._list = self._load()
                except InvalidArgumentError as e:
                    log.warning("%s", e)
                    self._list = None   # as qemu's: nobody, until the file is right again
        return self._list is not None and self._list.allows(identity)


def _choice(key, value, allowed):
    if value not in allowed:
        raise InvalidArgumentError(f"Parameter '{key}' does not accept value '{value}'")
    return value
