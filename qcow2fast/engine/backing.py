"""Backing files: resolving names and probing formats (opening the chain
is engine/chain.py).

Unlike qemu 7.2, a chain is bounded (MAX_CHAIN_DEPTH images, the top
included; ``open(..., max_chain_depth=N)`` changes it) and a loop is an
error, and a backing file without a recorded format is probed only for the
qcow2 magic (anything else is read as raw).
"""

import json
import os

from ..errors import InvalidArgumentError
from ..host import remote
from ..host.null import is_null_name
from ..spec import header as hdr

MAX_CHAIN_DEPTH = 4096      # real chains reach 1000 (arXiv 2205.06842); qemu has no bound


FILE_PROTOCOL = "file:"
JSON_PREFIX = "json:"       # qemu's block-driver option tree as a name (cli/json_filename.py)
BLKDEBUG_PREFIX = "blkdebug:"   # qemu's error-injection driver: blkdebug:[RULES]:IMAGE
JSON_FORMATS = ("qcow2", "raw")


def parse_json_name(name):
    """The option tree of a ``json:`` name, dotted keys (``"file.filename"``)
    nested as objects, as qemu's ``parse_json_filename``."""
    try:
        tree = json.loads(_double_quoted(name[len(JSON_PREFIX):]))
    except ValueError as e:
        raise InvalidArgumentError(f"Could not parse the JSON options: {e}") from None
    if not isinstance(tree, dict):
        raise InvalidArgumentError("Invalid JSON object given")
    return nested(tree)


def _double_quoted(text):
    """qemu's JSON (qobject/json-lexer.c) as standard JSON: qemu also takes
    strings in single quotes, where ``\\'`` is a quote and ``"`` a plain
    character.  Double-quoted strings are copied as they are; what is not
    valid JSON stays invalid."""
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c not in "'\"":
            j = i + 1
            while j < n and text[j] not in "'\"":
                j += 1
            out.append(text[i:j])
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i:j + 1])
            j += 1
        else:
            j, body = i + 1, []
            while j < n and text[j] != "'":
                if text[j] == "\\" and j + 1 < n:
                    body.append("'" if text[j + 1] == "'" else text[j:j + 2])
                    j += 2
                else:
                    body.append('\\"' if text[j] == '"' else text[j])
                    j += 1
            out.append('"' + "".join(body) + ('"' if j < n else ""))
            j += 1
        i = j
    return "".join(out)


def nested(tree):
    """Dotted keys (``file.filename``) as nested objects."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            value = nested(value)
        head, dot, rest = key.partition(".")
        if dot:
            sub = out.setdefault(head, {})
            if not isinstance(sub, dict):
                raise InvalidArgumentError(f"Cannot mix '{head}' and '{key}' in the JSON "
                                           "options")
            sub.update(nested({rest: value}))
        else:
            out[key] = value
    return out


def json_file(name):
    """(path, format or None) of a plain ``json:`` backing name: a qcow2 or
    raw node over a file node, or a file node (``{"driver": "file",
    "filename": P}``); None for any other tree (other drivers, options).
    The path is used as written (qemu: relative to the working directory)."""
    try:
        tree = parse_json_name(name)
    except InvalidArgumentError:
        return None
    fmt = tree.pop("driver", None)
    if fmt == "file":
        tree, fmt = {"file": dict(tree, driver="file")}, None
    elif fmt is not None and fmt not in JSON_FORMATS:
        return None
    node = tree.pop("file", None)
    if isinstance(node, dict) and node.get("driver") == "blkdebug":
        node = node.get("image")        # (its rules: json_blkdebug_rules)
    if tree or not isinstance(node, dict) or node.get("driver", "file") != "file":
        return None
    path = node.get("filename")
    if set(node) - {"driver", "filename"} or not isinstance(path, str):
        return None
    return path, fmt


def json_blkdebug_rules(name):
    """The rules of qemu's blkdebug filter (host/blkdebug.py) over the file
    of a plain ``json:`` backing name (json_file), or None."""
    if not name.startswith(JSON_PREFIX) or json_file(name) is None:
        return None
    node = parse_json_name(name).get("file")
    if not (isinstance(node, dict) and node.get("driver") == "blkdebug"):
        return None
    from ..host.blkdebug import node_parts
    return node_parts(node)[0]


def backing_format(header_format, name):
    """The format of a backing file: the header's, else a json: name's driver."""
    if header_format or not name.startswith(JSON_PREFIX):
        return header_format
    target = json_file(name)
    return target and target[1]


def resolve_backing_path(image_path, name):
    """qemu resolves a relative backing name against the image's directory
    (a remote image's: its URL, host/remote.py); a ``file:`` name (the file
    protocol, named) is a path as it is, as is a plain ``json:`` name's file
    (json_file; any other json: name is returned as it is)."""
    if name.startswith(FILE_PROTOCOL):
        return name[len(FILE_PROTOCOL):]
    if is_null_name(name):              # a protocol's name: as it is (qemu's path_combine)
        return name
    if name.startswith(JSON_PREFIX):
        target = json_file(name)
        return target[0] if target else name
    if remote.is_url(image_path) or remote.is_url(name):
        return remote.join(image_path, name)
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(os.path.abspath(image_path)), name)


def qemu_name(image, name):
    """How qemu names the backing file ``name`` of ``image`` in its
    messages: a relative name joined to the directory of the image as the
    image was named (path_combine; not made absolute); another name (a
    protocol, json:) as it resolves."""
    path = resolve_backing_path(image, name)
    if os.path.isabs(name) or path != os.path.join(os.path.dirname(os.path.abspath(image)), name):
        return path
    return os.path.join(os.path.dirname(image), name)


def blkdebug_image(name):
    """The image a qemu ``blkdebug:RULES:IMAGE`` name wraps (RULES, a file
    of error-injection rules, may be empty), or None for another name.
    Only for what does no I/O through the name (create's look at a backing
    file's size): qcow2fast does not inject blkdebug's errors."""
    if not name.startswith(BLKDEBUG_PREFIX):
        return None
    rules, sep, image = name[len(BLKDEBUG_PREFIX):].partition(":")
    return image if sep else None


def probe_format(path, remote_options=None):
    return "qcow2" if read_head(path, 4, remote_options) == hdr.QCOW_MAGIC else "raw"


def read_head(path, n, remote_options=None):
    """The first ``n`` bytes of the image file ``path`` (local or remote)."""
    if remote.is_remote(path):
        return remote.read_head(path, n, remote_options)
    with open(path, "rb") as f:
        return f.read(n)


def identity(path):
    """What makes two names the same image (loop detection)."""
    return path if remote.is_url(path) else os.path.realpath(path)
