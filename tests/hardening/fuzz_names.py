"""The fuzzer's ``names`` target: the image names a command line takes --
``json:{...}`` option trees, ``--image-opts`` strings, ``blkdebug:RULES:
IMAGE`` with a rules file, ``file:`` and protocol names -- generated from
the drivers' option grammar and mutated character by character, then
given to ``info``, ``map`` and ``compare`` in process.  An input is the
name, a NUL, and the text of the rules file.  Anything but a clear error
(a Qcow2Error, an OSError, a usage error's exit status) is a finding."""

import json
import os

from qcow2fast.cli.json_filename import flat_items
from qcow2fast.host.blkdebug import EVENTS, IOTYPES

DRIVERS = ("qcow2", "raw", "file", "blkdebug", "null-co", "null-aio", "nbd", "ssh", "quorum",
           "bogus")
KEYS = {
    "qcow2": ("file", "backing", "data-file", "l2-cache-size", "cache-size",
              "refcount-cache-size", "lazy-refcounts", "cache-clean-interval"),
    "raw": ("file", "offset", "size"),
    "file": ("filename", "locking", "aio"),
    "blkdebug": ("image", "x-image", "config", "inject-error", "set-state", "align"),
    "null-co": ("size", "read-zeroes", "latency-ns", "filename"),
    "null-aio": ("size", "read-zeroes"),
    "nbd": ("server", "export", "x-dirty-bitmap"),
    "ssh": ("server", "path", "user", "host", "port", "host_key_check", "host-key-check"),
    "quorum": ("children", "vote-threshold", "read-pattern", "rewrite-corrupted", "blkverify"),
    "bogus": ("anything",),
}
RULE_KEYS = ("event", "state", "iotype", "errno", "sector", "once", "immediately", "new_state",
             "bogus")
VALUES = (0, 1, -1, 512, 4096, 1 << 31, 1 << 63, (1 << 64) + 1, 0.5, True, False, None,
          "", "on", "off", "4k", "0x10000", "1e3", "x" * 300, "\u00e9", [], {}, [1, 2])


def _value(rng, key, depth, files):
    if key in ("file", "image", "backing", "data-file") and depth < 4:
        return _node(rng, depth + 1, files) if rng.random() < 0.8 else rng.choice(files)
    if key in ("filename", "x-image", "config"):
        return rng.choice(files + ["", "/nonexistent", "json:{}", "null-co://"])
    if key == "event":
        return rng.choice(EVENTS + ("nope", ""))
    if key == "iotype":
        return rng.choice(IOTYPES + ("nope",))
    if key in ("inject-error", "set-state"):
        return [{k: _value(rng, k, depth + 1, files) for k in rng.sample(RULE_KEYS,
                                                                          rng.randrange(5))}
                for _ in range(rng.randrange(3))]
    if key == "children" and depth < 4:
        return [_node(rng, depth + 1, files) if rng.random() < 0.3 else
                {"driver": "file", "filename": rng.choice(files)}
                for _ in range(rng.randrange(4))]
    if key == "read-pattern":
        return rng.choice(("quorum", "fifo", "x", 1))
    if key == "host":                   # (no name to resolve: nothing waits on DNS)
        return rng.choice(("127.0.0.1", "", "::1", 1))
    if key == "port":
        return rng.choice(("0", 0, 0.42, "x", -1, "0x0", " 0", 1 << 70, "99999"))
    if key == "host_key_check":
        return rng.choice(("no", "yes", "md5:00", "sha256:", "maybe", 1))
    if key == "host-key-check":
        return {"mode": rng.choice(("none", "hash", "known_hosts", "x")),
                "type": rng.choice(("md5", "sha1", "sha256", "x")), "hash": "00"}
    if key == "server":
        return {"type": rng.choice(("unix", "inet", "vsock")),
                "path": "/nonexistent.sock", "host": rng.choice(("", "127.0.0.1")),
                "port": rng.choice(("0", 0.5, "x", "99999"))}
    return rng.choice(VALUES)


def _node(rng, depth, files):
    driver = rng.choice(DRIVERS)
    node = {"driver": driver} if rng.random() < 0.9 else {}
    for key in rng.sample(KEYS[driver], rng.randrange(len(KEYS[driver]) + 1)):
        node[key] = _value(rng, key, depth, files)
    return node


RULES = ('[inject-error]\nevent = "{e}"\nerrno = "{n}"\nonce = "{o}"\nsector = "{s}"\n',
         '[set-state]\nevent = "{e}"\nstate = "{n}"\nnew_state = "{s}"\n', '[{e}]\n', 'x = y\n',
         '# c\n\n[inject-error]\niotype = "{e}"\n')


def generate(rng, files):
    """A name (str) and a rules file's text."""
    rules = "".join(rng.choice(RULES).format(e=rng.choice(EVENTS + ("x",)),
                                             n=rng.choice((5, 0, -1, "x", 1 << 40)),
                                             o=rng.choice(("on", "off", "maybe")),
                                             s=rng.choice((0, 8, -1, "x")))
                    for _ in range(rng.randrange(4)))
    form = rng.random()
    if form < 0.5:
        tree = _node(rng, 0, files)
        text = json.dumps(tree)
        name = "json:" + (text.replace('"', "'") if rng.random() < 0.3 else text)
    elif form < 0.75:
        tree = _node(rng, 0, files)
        name = "opts:" + ",".join(f"{k}={v}" for k, v in flat_items(tree) if not isinstance(v, list))
    else:
        name = f"blkdebug:{rng.choice(['RULES', '', 'nope'])}:{rng.choice(files)}"
    return _mutate(name, rng), rules


def _mutate(name, rng):
    chars = list(name)
    for _ in range(rng.choice((0, 0, 1, 2, 5))):
        if not chars:
            break
        i = rng.randrange(len(chars))
        op = rng.random()
        if op < 0.4:
            del chars[i]
        elif op < 0.7:
            chars.insert(i, rng.choice('{}[]":,\'=\\.0a\x01\u00e9'))     # (no NUL: argv)
        else:
            chars[i] = rng.choice('{}[]":,\'=\\.-1')
    return "".join(chars)


def encode(name, rules):
    return name.encode("utf-8", "surrogatepass") + b"\0" + rules.encode()


def run(data, work):
    """The name through info, map and compare (against itself), in process."""
    from qcow2fast.cli import main
    raw_name, _, rules = data.partition(b"\0")
    name = raw_name.decode("utf-8", "replace")
    with open(os.path.join(work, "RULES"), "wb") as f:
        f.write(rules)
    name = name.replace("RULES", os.path.join(work, "RULES"))
    opts = name.startswith("opts:")
    args = ["--image-opts", name[len("opts:"):]] if opts else [name]
    for argv in (["info", *args], ["map", "--output=json", *args],
                 ["compare", *(["--image-opts"] if opts else []), args[-1], args[-1]]):
        try:
            main(argv)
        except SystemExit:
            pass            # a usage error: a clear message and a status


def files_in(work):
    """The names a generated tree points at: the seed image, a raw file."""
    raw = os.path.join(work, "names.raw")
    if not os.path.exists(raw):
        with open(raw, "wb") as f:
            f.write(bytes(65536))
    return [os.path.join(work, "seed.qcow2"), raw]
