"""The name qemu shows for an image opened by a ``json:`` name (block.c
``bdrv_refresh_filename`` and the drivers' ``refresh_filename``): the plain
name of its file when the options say no more than that file does, else
``json:`` and the node's *full options* -- its driver, its strong runtime
options (those that change what the node is) and its children's full
options, in qemu's QDict order.

- a protocol node names itself: a file its ``filename``, an http(s) node
  its ``url``, an NBD node its URI, a null device ``null-co://`` unless a
  strong option (``size``, ``read-zeroes``) is given;
- a blkdebug node is ``blkdebug:CONFIG:IMAGE`` while its only strong
  option is ``config`` (block/blkdebug.c: rules given inline, ``align``
  and the other limits are not in that name);
- a format node (qcow2, raw) takes its file's name when the file is a
  protocol node (blkdebug is one) and no strong option of its own is
  given (raw's ``offset``/``size``, qcow2's ``encrypt.key-secret``);
- a quorum node has no plain name (its children are listed).

Options given as nested objects are flattened as qemu flattens them
(``set-state.0.event``); values keep their JSON types.
"""

from ..host import null
from .common import flatten, json_name

# drv->strong_runtime_opts (a trailing "." matches every key under it)
STRONG = {
    "null-co": null.STRONG, "null-aio": null.STRONG,
    "blkdebug": ("config", "inject-error.", "set-state.", "align", "max-transfer",
                 "opt-write-zero", "max-write-zero", "opt-discard", "max-discard"),
    "raw": ("offset", "size"),
    "qcow2": ("encrypt.key-secret",),
    "quorum": ("vote-threshold", "rewrite-corrupted", "read-pattern"),
    "ssh": ("host", "port", "path", "user", "host_key_check", "server."),
}
CHILDREN = {"qcow2": ("file", "data-file"), "raw": ("file",), "blkdebug": ("image",)}
PROTOCOLS = ("file", "http", "https", "nbd", "ssh", "null-co", "null-aio", "blkdebug")
GLOBAL = ("driver", "filename")         # copied into the full options, never strong


def refreshed_name(tree, fmt=None):
    """qemu's name for the node ``tree`` (a parsed json: name; ``fmt``: the
    top driver when the name leaves it to probing), or None for a node
    this does not know (the caller keeps its own name)."""
    node = _refresh(tree, fmt)
    if node is None:
        return None
    exact, full = node
    return exact if exact else json_name(full)


def size_known(tree):
    """Whether qemu knows the allocated size of the node (its ``disk
    size``): not through blkdebug, which has none to give (a qcow2 node
    over it neither)."""
    file = tree.get("file")
    return tree.get("driver") != "blkdebug" and driver_of(file) != "blkdebug"


def has_directory(tree):
    """Whether names relative to the image have a directory (qemu's
    bdrv_dirname: through the format node's file and blkdebug's image; a
    quorum node has none)."""
    node = tree
    while isinstance(node, dict):
        if node.get("driver") == "quorum":
            return False
        node = node.get("file", node.get("image"))
    return True


def _refresh(node, driver=None):
    """(exact file name or "", full options) of a node, or None."""
    if isinstance(node, str):                   # a file child given by its name
        node = {"driver": "file", "filename": node}
    if not isinstance(node, dict):
        return None
    driver = node.get("driver") or driver or ("file" if "filename" in node else None)
    if driver is None:
        return None
    children = {}
    for key in CHILDREN.get(driver, ()):
        if node.get(key) is not None:
            child = _refresh(node[key], "file")
            if child is None:
                return None
            children[key] = child
    if driver == "quorum":              # (quorum_gather_child_options: a list)
        listed = [_refresh(c, "file") for c in node.get("children") or ()]
        if None in listed:
            return None
        children["children"] = ("", [full for _, full in listed])
    full, strong = {}, False
    for key in GLOBAL:
        if key in node or key == "driver":
            full[key] = node.get(key, driver)
    flat = [(k, v) for k, v in flatten({k: v for k, v in node.items()
                                         if k not in children and k not in GLOBAL})]
    for key, value in flat:
        if any(key == s or (s.endswith(".") and key.startswith(s))
               for s in STRONG.get(driver, ())):
            full[key], strong = value, True
    for key, (_, child_full) in children.items():
        full[key] = child_full
    return _exact(node, driver, full, strong, children), full


def _exact(node, driver, full, strong, children):
    if driver == "file":
        return str(node.get("filename", ""))
    if driver in ("http", "https"):
        return str(node.get("url", ""))
    if driver == "nbd":
        from ..nbd.client import canonical, uri_of
        try:
            return canonical(uri_of(dict(flatten(node)))[0])
        except Exception:               # (an unusable node: the open says why)
            return ""
    if driver == "ssh":
        from ..host.remote_ssh import node_name
        try:
            return node_name(dict(flatten(node)))
        except Exception:               # (an unusable node: the open says why)
            return ""
    if driver in null.DRIVERS:
        return "" if strong else f"{driver}://"
    if driver == "blkdebug":
        image = children.get("image")
        if image is None or not image[0] or set(full) - {"driver", "config", "image"}:
            return ""
        return f"blkdebug:{full.get('config', '')}:{image[0]}"
    file = children.get("file")
    if driver == "quorum" or file is None or strong or not file[0] or \
            driver_of(node["file"]) not in PROTOCOLS:
        return ""
    return file[0]


def driver_of(child):
    """A child node's driver (a bare name is a file node)."""
    return child.get("driver", "file") if isinstance(child, dict) else "file"
