"""qemu's ``blkdebug`` error-injection driver (block/blkdebug.c): a filter
that fails chosen requests with a chosen errno, armed by the events the
qcow2 driver announces as it works (``read_aio`` before a data read,
``cluster_free`` before freeing clusters, ...).  What storage tests and
qemu-iotests use to see how a program lives with a failing disk.

Named ``blkdebug:RULES:IMAGE`` (RULES: a file of qemu's config syntax,
may be empty), or as a node: ``json:{"driver": "blkdebug", "image": NODE,
"inject-error": [...], "set-state": [...]}`` / ``--image-opts
driver=blkdebug,image.*=...``.

Semantics as qemu's: the driver starts in state 1.  An event runs the
rules named for it whose ``state`` is 0 or the current state: a
``set-state`` rule moves the state, an ``inject-error`` rule becomes
*active* (the first such rule of an event first empties the active list).
Each request then fails with the first active rule whose ``iotype`` covers
it and whose ``sector`` (if given) lies inside it; a ``once`` rule is
removed when it fires.  The ``none`` event fires when the node opens.

Where it sits: below the qcow2 engine (the ``file`` or ``data-file``
child: _ext/debugfile.pyx, the engine announcing its events through
``ImageState.debug_event``), or above any image (``image`` a format node:
:class:`BlkdebugImage`, whose requests are the guest's; no engine event
reaches it, only ``none`` arms its rules).
"""

import errno as E
import os
import re

from ..errors import InvalidArgumentError

# qapi/block-core.json BlkdebugEvent (qemu 7.2), in its order.
EVENTS = (
    "l1_update", "l1_grow_alloc_table", "l1_grow_write_table", "l1_grow_activate_table",
    "l2_load", "l2_update", "l2_update_compressed", "l2_alloc_cow_read", "l2_alloc_write",
    "read_aio", "read_backing_aio", "read_compressed", "write_aio", "write_compressed",
    "vmstate_load", "vmstate_save", "cow_read", "cow_write", "reftable_load",
    "reftable_grow", "reftable_update", "refblock_load", "refblock_update",
    "refblock_update_part", "refblock_alloc", "refblock_alloc_hookup",
    "refblock_alloc_write", "refblock_alloc_write_blocks", "refblock_alloc_write_table",
    "refblock_alloc_switch_table", "cluster_alloc", "cluster_alloc_bytes", "cluster_free",
    "flush_to_os", "flush_to_disk", "pwritev_rmw_head", "pwritev_rmw_after_head",
    "pwritev_rmw_tail", "pwritev_rmw_after_tail", "pwritev", "pwritev_zero", "pwritev_done",
    "empty_image_prepare", "l1_shrink_write_table", "l1_shrink_free_l2_clusters",
    "cor_write", "cluster_alloc_space", "none")
IOTYPES = ("read", "write", "write-zeroes", "discard", "flush", "block-status")
READ, WRITE, WRITE_ZEROES, DISCARD, FLUSH, BLOCK_STATUS = range(len(IOTYPES))
DEFAULT_IOTYPES = (1 << BLOCK_STATUS) - 1     # every type but block-status
SECTOR = 512

INJECT, SET_STATE = "inject-error", "set-state"
RULE_OPTIONS = {INJECT: ("event", "state", "iotype", "errno", "sector", "once", "immediately"),
                SET_STATE: ("event", "state", "new_state")}
NODE_OPTIONS = ("driver", "config", "image", "x-image", "align", "max-transfer",
                "opt-write-zero", "max-write-zero", "opt-discard", "max-discard",
                INJECT, SET_STATE, "take-child-perms", "unshare-child-perms")
PREFIX = "blkdebug:"


class Rule:
    __slots__ = ("action", "event", "state", "errno", "offset", "iotypes", "once", "new_state")

    def __init__(self, action, opts):
        unknown = [k for k in opts if k not in RULE_OPTIONS[action]]
        if unknown:
            raise InvalidArgumentError(f"Invalid parameter '{unknown[0]}'")
        event = opts.get("event")
        if event is None:
            raise InvalidArgumentError("Missing event name for rule")
        if event not in EVENTS:
            raise InvalidArgumentError(f"Parameter 'event' does not accept value '{event}'")
        self.action, self.event = action, event
        self.state = _number(opts, "state", 0)
        self.new_state = _number(opts, "new_state", 0)
        self.errno = _number(opts, "errno", E.EIO)
        sector = _number(opts, "sector", -1)
        self.offset = -1 if sector == -1 else sector * SECTOR
        self.once = _bool(opts, "once")
        iotype = opts.get("iotype")
        if iotype is not None and iotype not in IOTYPES:
            raise InvalidArgumentError(f"Parameter 'iotype' does not accept value '{iotype}'")
        self.iotypes = DEFAULT_IOTYPES if iotype is None else 1 << IOTYPES.index(iotype)
        _bool(opts, "immediately")      # (when the error is returned: no difference here)


class Rules:
    """One blkdebug node's rules and state (qemu's BDRVBlkdebugState)."""

    def __init__(self, rules=()):
        self.state = 1
        self.by_event = {}
        self.active = []
        for rule in rules:              # (qemu inserts each rule at its list's head)
            self.by_event.setdefault(rule.event, []).insert(0, rule)

    def event(self, name):
        """The driver announces ``name``: run its rules (process_rule)."""
        new_state, injected = self.state, False
        for rule in self.by_event.get(name, ()):
            if rule.state and rule.state != self.state:
                continue
            if rule.action == INJECT:
                if not injected:
                    self.active, injected = [], True
                self.active.insert(0, rule)
            else:
                new_state = rule.new_state
        self.state = new_state

    def check(self, offset, nbytes, iotype):
        """The errno a request of ``iotype`` on [offset, offset+nbytes)
        fails with (rule_check), or 0."""
        for rule in self.active:
            at = rule.offset
            if (at == -1 or (nbytes and offset <= at < offset + nbytes)) and \
                    rule.iotypes >> iotype & 1:
                break
        else:
            return 0
        if rule.once:
            self.active.remove(rule)
            self.by_event[rule.event].remove(rule)
        return rule.errno

    def fail(self, offset, nbytes, iotype, name):
        """Raise the OSError a request fails with, if one does."""
        err = self.check(offset, nbytes, iotype)
        if err:
            raise OSError(err, os.strerror(err), name)


def rules_from(node):
    """The Rules of a blkdebug node: its ``config`` file's, then its own
    ``inject-error``/``set-state`` lists; the ``none`` event has fired."""
    rules = []
    config = node.get("config")
    if config not in (None, ""):
        rules += read_config(str(config))      # (qemu takes a number as its name too)
    for action in (INJECT, SET_STATE):
        items = node.get(action, [])
        if isinstance(items, dict):     # (flattened keys: inject-error.0.event=...)
            items = [items[k] for k in sorted(items, key=int)]
        rules += [Rule(action, dict(item)) for item in items]
    out = Rules(rules)
    out.event("none")
    return out


_GROUP = re.compile(r'\[\s*([^\]\s"]+)\s*(?:"[^"]*")?\s*\]')
_OPTION = re.compile(r'\s*(\S+)\s*=\s*"([^"]*)"')


def read_config(path):
    """The rules of a blkdebug config file (qemu_config_parse's syntax:
    ``[inject-error]`` / ``[set-state]`` groups of ``key = "value"`` lines,
    ``#`` comments)."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise InvalidArgumentError(f"Could not read blkdebug config file: {e.strerror}") \
            from None
    groups, group = [], None
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        m = _GROUP.fullmatch(line.strip())
        if m:
            if m.group(1) not in RULE_OPTIONS:
                raise InvalidArgumentError(f"{path}:{lineno}: There is no option group "
                                           f"'{m.group(1)}'")
            group = (m.group(1), {})
            groups.append(group)
            continue
        m = _OPTION.fullmatch(line)
        if not m:
            raise InvalidArgumentError(f"{path}:{lineno}: Parse error")
        if group is None:
            raise InvalidArgumentError(f"{path}:{lineno}: No group defined")
        group[1][m.group(1)] = m.group(2)
    return [Rule(action, opts) for action, opts in groups]


def split_name(name):
    """(config path or None, image name) of ``blkdebug:CONFIG:IMAGE``."""
    rest = name[len(PREFIX):]
    config, sep, image = rest.partition(":")
    if not sep:
        raise InvalidArgumentError("blkdebug requires both config file and image path")
    return config or None, image


def is_blkdebug_name(name):
    return isinstance(name, str) and name.startswith(PREFIX)


def _number(opts, key, default):
    value = opts.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidArgumentError(f"Parameter '{key}' expects a number")
    try:
        return int(value, 0) if isinstance(value, str) else int(value)
    except (ValueError, OverflowError):
        raise InvalidArgumentError(f"Parameter '{key}' expects a number") from None


def _bool(opts, key):
    value = opts.get(key, False)
    if isinstance(value, bool):
        return value
    v = str(value).lower()
    if v in ("on", "yes", "true", "y"):
        return True
    if v in ("off", "no", "false", "n"):
        return False
    raise InvalidArgumentError(f"Parameter '{key}' expects 'on' or 'off'")


class BlkdebugImage:
    """blkdebug above an image (its ``image`` child a format node, as
    qemu-iotests put it to fail guest requests and block status): each
    request of the block-device interface (host/device.py) passes
    ``rules`` first; everything else is the image's."""

    def __init__(self, image, rules, *, align=0):
        if align and (align >= 1 << 31 or align & (align - 1)):
            raise InvalidArgumentError(f"Cannot meet constraints with align {align}")
        self.image, self.rules, self.align = image, rules, align

    def __getattr__(self, name):        # (called only for what is not set here)
        return getattr(self.image, name)

    def readinto(self, offset, buf):
        self.rules.fail(offset, memoryview(buf).nbytes, READ, self.image.path)
        return self.image.readinto(offset, buf)

    def read(self, offset, length):
        buf = bytearray(length)
        self.readinto(offset, buf)
        return bytes(buf)

    def write(self, offset, data):
        self.rules.fail(offset, memoryview(data).nbytes, WRITE, self.image.path)
        return self.image.write(offset, data)

    def flush(self):
        self.rules.fail(0, 0, FLUSH, self.image.path)
        self.image.flush()

    def block_status(self, offset=0, length=None):
        if length is None:
            length = self.image.size - offset
        self.rules.fail(offset, length, BLOCK_STATUS, self.image.path)
        return self.image.block_status(offset, length)

    def close(self):
        self.image.close()


def node_parts(node):
    """(Rules, the ``image`` child's node) of a blkdebug node (a json: name
    or --image-opts, nested); a bare ``x-image`` name is a file node."""
    unknown = [key for key in node if key not in NODE_OPTIONS]
    if unknown:
        raise InvalidArgumentError(f"Block protocol 'blkdebug' doesn't support the option "
                                   f"'{unknown[0]}'")
    image = node.get("image")
    if image is None and isinstance(node.get("x-image"), str):
        image = {"driver": "file", "filename": node["x-image"]}
    if isinstance(image, str):
        image = {"driver": "file", "filename": image}
    if not isinstance(image, dict):
        raise InvalidArgumentError("A block device must be specified for \"image\"")
    return rules_from(node), image
