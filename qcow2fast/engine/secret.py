"""A passphrase held so that it never shows: no repr, no str, no pickle;
and the passphrases of a backing chain's layers.  Light on purpose (the
CLI's parser and --object use it before any engine module is imported)."""

import os

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


class ChainSecrets:
    """The passphrases of a chain's encrypted layers, each by its depth
    (0: the image opened, 1: its backing file, ...; qemu's
    ``encrypt.key-secret``, ``backing.encrypt.key-secret``, ...) or by its
    file name; a layer in neither has none (as in qemu) unless one
    passphrase serves them all (``for_all``: what an image opened with a
    single ``key_secret`` hands to the layers below it)."""

    __slots__ = ("_by_depth", "_by_path", "_all")

    def __init__(self, secrets=None, *, _by_depth=None, _by_path=None, _all=None):
        self._by_depth, self._by_path = dict(_by_depth or {}), dict(_by_path or {})
        self._all = _all
        for key, value in (secrets or {}).items():
            if value is None:
                continue
            if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
                self._by_depth[key] = Secret(value)
            elif isinstance(key, (str, os.PathLike)):
                self._by_path[_path_key(key)] = Secret(value)
            else:
                raise InvalidArgumentError("key_secret: a mapping's keys are layer depths "
                                           "(0: the image, 1: its backing file, ...) or file "
                                           "names")

    @classmethod
    def for_all(cls, secret):
        return cls(_all=Secret(secret))

    def _own(self, depth, path):
        s = self._by_depth.get(depth)
        return s if s is not None else self._by_path.get(_path_key(path))

    def get(self, depth, path):
        """The passphrase of the layer at ``depth`` whose file is ``path``, or None."""
        s = self._own(depth, path)
        return s if s is not None else self._all

    def inherited(self, depth, path):
        """Whether that layer's passphrase is the one given for all layers
        (not named for it)."""
        return self._all is not None and self._own(depth, path) is None

    def below(self, k):
        """The same passphrases seen from the layer ``k`` down (its depth 0)."""
        return ChainSecrets(_by_depth={d - k: s for d, s in self._by_depth.items() if d >= k},
                            _by_path=self._by_path, _all=self._all)

    def __repr__(self):
        return "ChainSecrets(***)"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("a ChainSecrets cannot be pickled")


def _path_key(path):
    path = os.fspath(path)
    return path if "://" in path else os.path.realpath(path)
