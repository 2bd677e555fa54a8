"""A passphrase held so that it never shows: no repr, no str, no pickle.
Light on purpose (the CLI's parser and --object use it before any engine
module is imported)."""

from ..errors import InvalidArgumentError


class Secret:
    """A passphrase: its bytes are only reachable through ``value``; repr
    and str never show them."""

    __slots__ = ("_value",)

    def __init__(self, value):
        if isinstance(value, Secret):
            value = value.value
        if isinstance(value, str):
            value = value.encode()
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise InvalidArgumentError("a secret must be bytes or str")
        self._value = bytes(value)

    @property
    def value(self):
        return self._value

    def __repr__(self):
        return "Secret(***)"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("a Secret cannot be pickled")
