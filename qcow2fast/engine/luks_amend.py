"""LUKS key slot management through amend (qemu's
qcrypto_block_luks_amend_add_keyslot / _erase_keyslots): ``encrypt.state``
active (a new passphrase in a free or given slot) or inactive (slots
erased by index or by the passphrase they hold), with qemu's rules and
messages.  Every refusal is made before anything is written; the slot
writes order themselves (engine/luks.py: store_key, erase_key).

Options (amend's names): ``encrypt.state``, ``encrypt.keyslot``,
``encrypt.new-secret``, ``encrypt.old-secret`` (passphrases: bytes, str,
Secret, or a function returning one, called once the image is known to be
encrypted), ``encrypt.iter-time``.
"""

from ..errors import InvalidArgumentError
from ..spec import luks as L
from . import luks
from .secret import Secret

KEYS = ("encrypt.state", "encrypt.keyslot", "encrypt.new-secret", "encrypt.old-secret",
        "encrypt.iter-time")


def _int(opts, key):
    v = opts.get(key)
    if v is None or isinstance(v, int):
        return v
    try:
        return int(v, 0)
    except (TypeError, ValueError):
        raise InvalidArgumentError(f"Parameter '{key}' expects a number") from None


def _secret(value):
    if value is None:
        return None
    return Secret(value() if callable(value) else value)


def plan(img, opts, force=False):
    """Check the encrypt.* amend options against the open image ``img``;
    returns a function that makes the change."""
    enc = img.encryption
    if enc is None or enc.header is None:
        raise InvalidArgumentError("Can't amend encryption options - encryption not present")
    state = opts.get("encrypt.state")
    if state is None:
        raise InvalidArgumentError("Parameter 'state' is missing")
    if state not in ("active", "inactive"):
        raise InvalidArgumentError(f"Parameter 'state' does not accept value '{state}'")
    slot, iter_time = _int(opts, "encrypt.keyslot"), _int(opts, "encrypt.iter-time")
    new, old = (_secret(opts.get(k)) for k in ("encrypt.new-secret", "encrypt.old-secret"))
    h = enc.header
    read = enc.reader(img.state.file)
    if slot is not None and not 0 <= slot < L.NUM_KEY_SLOTS:
        raise InvalidArgumentError(f"Invalid keyslot {slot} specified, must be between 0 and "
                                   f"{L.NUM_KEY_SLOTS - 1}")
    active = [s.enabled for s in h.slots]
    if state == "active":
        if new is None:
            raise InvalidArgumentError("'new-secret' is required to activate a keyslot")
        if old is not None:
            raise InvalidArgumentError("'old-secret' must not be given when activating keyslots")
        if slot is None:
            if all(active):
                raise InvalidArgumentError("Can't add a keyslot - all keyslots are in use")
            slot = active.index(False)
        if not force and active[slot]:
            raise InvalidArgumentError(f"Refusing to overwrite active keyslot {slot} - "
                                       "please erase it first")
        _, key = luks.find_key(h, img.key_secret, read)
        return lambda: luks.store_key(h, slot, new, key,
                                      iter_time or L.DEFAULT_ITER_TIME_MS,
                                      _writer(enc, img), img.state.barrier)
    if new is not None:
        raise InvalidArgumentError("'new-secret' must not be given when erasing keyslots")
    if iter_time is not None:
        raise InvalidArgumentError("'iter-time' must not be given when erasing keyslots")
    if slot is not None:
        if old is not None and luks.load_key(h, slot, old, read) is None:
            raise InvalidArgumentError(f"Given keyslot {slot} doesn't contain the given old "
                                       "password for erase operation")
        if not force and not active[slot]:
            raise InvalidArgumentError(f"Given keyslot {slot} is already erased (inactive) ")
        if not force and sum(active) == 1:
            raise InvalidArgumentError(f"Attempt to erase the only active keyslot {slot} which "
                                       "will erase all the data in the image irreversibly - "
                                       "refusing operation")
        slots = [slot]
    elif old is not None:
        slots = [i for i in range(L.NUM_KEY_SLOTS) if luks.load_key(h, i, old, read)]
        if not slots:
            raise InvalidArgumentError("No keyslots match given (old) password for erase "
                                       "operation")
        if not force and len(slots) == sum(active):
            raise InvalidArgumentError("All the active keyslots match the (old) password that "
                                       "was given and erasing them will erase all the data in "
                                       "the image irreversibly - refusing operation")
    else:
        raise InvalidArgumentError("To erase keyslot(s), either explicit keyslot index or the "
                                   "password currently contained in them must be given")

    def erase():
        for i in slots:
            luks.erase_key(h, i, _writer(enc, img), img.state.barrier)
    return erase


def _writer(enc, img):
    if img.read_only:
        raise InvalidArgumentError(img.state.read_only_reason())
    return enc.writer(img.state.file)
