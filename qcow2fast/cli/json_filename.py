"""``json:{...}`` file names: qemu's block-driver option trees given as
a file name (qemu block.c, ``bdrv_parse_filename``/``parse_json_filename``),
for the drivers qcow2fast has, with qemu's messages:

- ``{"driver": "qcow2", "file": {"driver": "file", "filename": P}}``,
  with ``"backing": null`` for the image alone (its unallocated clusters
  read as zeros), and the ``--image-opts`` cache keys;
- ``{"driver": "raw", "file": NODE, "offset": N, "size": N}``: a window on
  a file or on a qcow2/raw node (block/raw-format.c);
- ``{"driver": "file", "filename": P}``: the file itself;
- ``{"driver": "http"|"https", "url": U}``: a remote image (qemu's curl
  driver; common.protocol_node);
- ``{"driver": "null-co"|"null-aio", "size": N, "read-zeroes": B}``: a
  device that stores nothing (host/null.py);
- ``{"driver": "blkdebug", "image": NODE, "inject-error": [...], ...}``:
  qemu's error-injection filter (host/blkdebug.py), as a qcow2 node's
  ``file`` or above a format node;
- ``{"driver": "quorum", "children": [FILE...], "vote-threshold": N}``:
  replicas that vote on reads (host/quorum.py), as a qcow2 or raw node's
  ``file``, or the image itself;
- no ``driver``: the format of ``file`` is probed.

Dotted keys (``"file.filename": P``) are the same as nested objects.
``open_json(name, ...)`` returns an open image (the block-device
interface of host/device.py).
"""

from .. import open as open_qcow2
from ..engine.backing import FILE_PROTOCOL, JSON_PREFIX as PREFIX, parse_json_name, probe_format
from ..errors import InvalidArgumentError, Qcow2Error
from ..host import blkdebug
from ..host.null import DRIVERS as NULL_DRIVERS, OPTIONS as NULL_OPTIONS, NullImage
from ..host.raw import RawImage
from ..host.remote import is_url
from ..host.window import RawWindow
from ..spec.header import QCOW_MAGIC
from .common import (IMAGE_OPTS, file_path, flatten, image_option, json_name, open_error,
                     protocol_node, qdict_first)
from .options import UsageError, opt_size
from .refresh import driver_of, refreshed_name


def is_json(name):
    return isinstance(name, str) and name.startswith(PREFIX)


def shown_name(name, img):
    """The name qemu shows for an image opened as ``name``: a json: name of
    a plain image shows as its file's name, a ``file:`` name without it."""
    if name.startswith(FILE_PROTOCOL):
        return file_path(name)
    if is_url(name) and name.lower().startswith(("nbd", "ssh:")):   # refreshed as qemu does
        from ..host.remote_ssh import parse_url
        from ..nbd.client import canonical
        try:
            return canonical(name) if name.lower().startswith("nbd") else parse_url(name).name
        except Qcow2Error:
            return name
    return img.path if is_json(name) and getattr(img, "path", None) else name


def parse(name):
    """The option tree of a ``json:`` file name, dotted keys nested."""
    try:
        return parse_json_name(name)
    except InvalidArgumentError as e:
        raise UsageError(str(e)) from None


def open_json(name, *, writable=False, fmt=None, tree=None, **extra):
    """Open the image a ``json:`` file name describes (``fmt``, e.g. -f,
    is the top-level ``driver``, over the name's own as in qemu, whose
    options from the name never replace given ones; ``extra``, e.g. the
    cache mode, goes to every qcow2 node).  ``tree``: the name's options
    already nested (an --image-opts string's)."""
    tree = parse(name) if tree is None else tree
    if fmt:
        tree["driver"] = fmt
    try:
        return _open(tree, writable, extra)
    except (Qcow2Error, OSError) as e:
        raise open_error(name, e) from e


def _open(node, writable, extra):
    driver = node.get("driver")
    if driver is None:
        below = node.get("file")
        null = isinstance(below, dict) and below.get("driver") in NULL_DRIVERS
        driver = "raw" if null else _probe(below)
    if driver in ("file", "http", "https"):
        path, remote = _file_path(node)
        return RawImage(path, writable=writable, remote=remote)
    if driver == "nbd":                 # an NBD export (nbd/client.py)
        from ..nbd.client import uri_of
        uri, context = uri_of(dict(flatten(node)))
        image = RawImage(uri, writable=writable, remote={"nbd_context": context})
        image.format = "nbd"            # (what qemu-img info calls the node)
        return image
    if driver == "ssh":                 # a file over SFTP (host/remote_ssh.py)
        from ..host.remote_ssh import url_of
        image = RawImage(url_of(dict(flatten(node))), writable=writable, remote={})
        image.format = "ssh"
        return image
    if driver in NULL_DRIVERS:
        _only(node, NULL_OPTIONS, f"Block protocol '{driver}' doesn't support the option")
        return NullImage.from_options(node, writable=writable, json_name=json_name)
    if driver == "blkdebug":
        return _open_blkdebug(node, writable, extra)
    if driver == "qcow2":
        return _open_qcow2(node, writable, extra)
    if driver == "raw":
        return _open_raw(node, writable, extra)
    if driver == "quorum":              # the image is the quorum node itself
        name, spec = _quorum(node)
        image = RawImage(name, writable=writable, quorum=spec)
        image.format = "quorum"
        return image
    raise InvalidArgumentError(f"Unknown driver '{driver}'")


def _probe(node):
    """The format of the image on a protocol node (qemu's probing)."""
    if driver_of(node) != "quorum":
        return probe_format(*_file_path(node))
    name, spec = _quorum(node)
    image = RawImage(name, quorum=spec)
    try:
        return "qcow2" if image.file.pread(0, 4) == QCOW_MAGIC else "raw"
    finally:
        image.close()


def _file_path(node):
    """(path, remote options) of a protocol node: a file, or a URL."""
    if isinstance(node, str):
        raise InvalidArgumentError(f"Cannot find device='{node}' nor node-name='{node}'")
    if not isinstance(node, dict) or ("filename" not in node and "url" not in node
                                      and node.get("driver") != "ssh"):
        raise InvalidArgumentError("A block device must be specified for \"file\"")
    if node.get("driver", "file") == "file":
        _only(node, ("driver", "filename"), "Block protocol 'file' doesn't support the option")
    try:
        return protocol_node(node)
    except UsageError as e:
        raise InvalidArgumentError(str(e)) from None


def _only(node, keys, message):
    """Refuse an option not in ``keys``: the first in qemu's order of the
    flattened names (``file.driver``), as qemu names it."""
    unknown = [key for key in _flat(node) if key.split(".", 1)[0] not in keys]
    if unknown:
        raise InvalidArgumentError(f"{message} '{qdict_first(unknown)}'")


def _flat(node):
    return (key for key, _ in flat_items(node))


def flat_items(node, prefix=""):
    """(dotted key, value) of a node's options, nested objects flattened."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from flat_items(value, prefix + key + ".")
        else:
            yield prefix + key, value


def _needs_file(node):
    """A format node opens its ``file`` child before it looks at its options."""
    if node.get("file") is None:
        raise InvalidArgumentError("A block device must be specified for \"file\"")


def _open_qcow2(node, writable, extra):
    _needs_file(node)
    if isinstance(node["file"], dict) and node["file"].get("driver") in NULL_DRIVERS:
        raise InvalidArgumentError("Image is not in qcow2 format")     # (it reads zeros)
    _only(node, ("driver", "file", "backing", "data-file", *IMAGE_OPTS),
          "Block format 'qcow2' does not support the option")
    kw = dict(image_option(key, str(node[key]).lower() if isinstance(node[key], bool)
                           else str(node[key])) for key in node if key in IMAGE_OPTS)
    backing = node.get("backing", True)
    if backing is not None and backing is not True:     # a node name: not supported
        raise InvalidArgumentError("Block format 'qcow2' does not support the option "
                                   "'backing'")
    if driver_of(node["file"]) == "quorum":
        (path, kw["quorum"]), remote, rules = _quorum(node["file"]), None, None
    else:
        path, remote, rules = _protocol(node.get("file"))
    if node.get("data-file") is not None:       # a file node, or its name
        kw["data_file"], _, kw["data_file_blkdebug"] = _protocol(node["data-file"])
    extra = dict(extra)                 # (backing=False from the caller: info's no-backing open)
    wanted = extra.pop("backing", True)
    backing = backing is not None and wanted
    return open_qcow2(path, "r+" if writable else "r", backing=backing,
                      cache_clean_interval=kw.pop("cache_clean_interval", 0), remote=remote,
                      blkdebug=rules, **kw, **extra)


def _quorum(node):
    """(name, QuorumSpec) of a quorum node (host/quorum.py) over file nodes."""
    from ..host.quorum import QuorumSpec

    def child_path(child):
        path, remote = _file_path(child)
        if remote or driver_of(child) != "file":
            raise InvalidArgumentError("a quorum child must be a file node (driver 'file')")
        return path
    spec = QuorumSpec.of(refreshed_name(node) or "quorum", node, child_path)
    return spec.name, spec


def _protocol(node):
    """(path, remote options, blkdebug rules or None) of a qcow2 node's
    child: a file node (or its name), maybe under a blkdebug filter."""
    rules = None
    if isinstance(node, dict) and node.get("driver") == "blkdebug":
        rules, node = blkdebug.node_parts(node)
    if isinstance(node, str):
        node = {"driver": "file", "filename": node}
    return (*_file_path(node), rules)


def existing_target(name, fmt):
    """convert -n into a ``json:`` name: (path, format, keyword arguments
    to open it with) of a qcow2 or raw node over a file (a qcow2 node's
    ``data-file`` child, under blkdebug or not, included)."""
    node = parse(name)
    driver = fmt or node.get("driver") or "raw"
    if driver not in ("qcow2", "raw") or not isinstance(node.get("file"), dict):
        raise UsageError(f"Could not open '{name}': a target must be a qcow2 or raw node "
                         "over a file")
    try:
        _only(node, ("driver", "file") + (("data-file",) if driver == "qcow2" else ()),
              f"Block format '{driver}' does not support the option")
        if driver_of(node["file"]) == "quorum":
            raise InvalidArgumentError("a target's file must be a local file, not a quorum "
                                       "node")
        path, remote, rules = _protocol(node["file"])
        kw = {}
        if node.get("data-file") is not None:
            kw["data_file"], _, kw["data_file_blkdebug"] = _protocol(node["data-file"])
    except InvalidArgumentError as e:
        raise UsageError(f"Could not open '{name}': {e}") from None
    if rules is not None or remote:
        raise UsageError(f"Could not open '{name}': a target's file must be a local file")
    return path, driver, kw


def _open_blkdebug(node, writable, extra):
    """blkdebug above a format node (or over a file: the filter is then the
    image, its format "blkdebug" as qemu names it)."""
    rules, below = blkdebug.node_parts(node)
    align = _size(node, "align") or 0
    if below.get("driver", "file") == "file":
        path, remote = _file_path(below)
        image = RawImage(path, writable=writable, remote=remote)
    else:
        image = _open(below, writable, extra)
    if below.get("driver", "file") not in ("qcow2", "raw"):    # over a protocol node
        image.format = "blkdebug"
    try:
        return blkdebug.BlkdebugImage(image, rules, align=align)
    except BaseException:
        image.close()
        raise


def _open_raw(node, writable, extra):
    _needs_file(node)
    _only(node, ("driver", "file", "offset", "size"),
          "Block format 'raw' does not support the option")
    offset, size = (_size(node, key) for key in ("offset", "size"))
    below = node.get("file")
    if isinstance(below, dict) and below.get("driver") in NULL_DRIVERS:
        _only(below, NULL_OPTIONS, f"Block protocol '{below['driver']}' doesn't support "
              "the option")
        image = NullImage.from_options(below, writable=writable, fmt="raw",
                                       json_name=lambda o: json_name({"driver": "raw",
                                                                      "file": o}))
    elif driver_of(below) == "quorum":
        name, spec = _quorum(below)
        image = RawImage(name, writable=writable, quorum=spec)
    elif isinstance(below, dict) and below.get("driver", "file") not in ("file", "http",
                                                                          "https"):
        image = _open(below, writable, extra)       # a format node
    else:
        path, remote = _file_path(below)
        image = RawImage(path, writable=writable, remote=remote)
    if offset is None and size is None:
        return image
    try:
        return RawWindow(image, offset or 0, size)
    except BaseException:
        image.close()
        raise


def _size(node, key):
    value = node.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or (isinstance(value, int) and value < 0) or \
            not isinstance(value, (int, str)):
        raise InvalidArgumentError(f"Parameter '{key}' expects a non-negative number "
                                   "below 2^64")
    return value if isinstance(value, int) else opt_size(value, key)
