"""qemu's quorum driver (block/quorum.c): one disk kept in several files
(the children) that vote on every read.

- ``read-pattern=quorum`` (the default): every child is read; where they
  differ, each 512-byte sector votes: identical contents are one version,
  the version most children returned wins (the first of them on a tie) if
  it has at least ``vote-threshold`` votes, else the read fails (EIO). A
  child whose read fails has no vote. (qemu votes on each request as a
  whole: a request that mixes agreeing and disagreeing sectors fails there
  and may succeed here, with the same bytes wherever both succeed.)
- ``read-pattern=fifo``: the first child whose read succeeds.
- ``rewrite-corrupted=on``: after a vote, the children that returned
  another version of a sector are rewritten with the winner (when opened
  for writing).
- Writes, zero writes and flushes go to every child and succeed when at
  least ``vote-threshold`` children succeed.
- The children must be one size at open (qemu's quorum_getlength: EIO
  otherwise); writes past the end grow every child, as qemu's writes past
  a node's end do.

The children are file nodes (local files), locked as the node's own file
would be. ``blkverify`` is refused (not supported).
"""

import errno
from dataclasses import dataclass

from ..errors import InvalidArgumentError, UnsupportedFeatureError

OPTIONS = ("driver", "children", "vote-threshold", "read-pattern", "rewrite-corrupted",
           "blkverify")
PATTERNS = ("quorum", "fifo")
SECTOR = 512                            # the unit of a vote


@dataclass(frozen=True)
class QuorumSpec:
    """A quorum node's options: its children's file names and how they vote."""
    name: str                   # the node's name (its refreshed json: name)
    children: tuple
    threshold: int
    pattern: str = "quorum"
    rewrite: bool = False

    @classmethod
    def of(cls, name, node, child_path):
        """From a json: node (values as given there); ``child_path(node)``:
        the file name of a child node (raising on anything but a file)."""
        unknown = [key for key in node if key not in OPTIONS]
        if unknown:
            raise InvalidArgumentError(f"Block format 'quorum' does not support the option "
                                       f"'{unknown[0]}'")
        children = node.get("children")
        if isinstance(children, dict):          # ("children.0": ... nested by index)
            keys = sorted(children, key=lambda k: int(k) if str(k).isdigit() else -1)
            if [str(k) for k in keys] != [str(i) for i in range(len(keys))]:
                raise InvalidArgumentError("Option children is not a valid array")
            children = [children[k] for k in keys]
        if not isinstance(children, list) or not children:
            raise InvalidArgumentError("Number of provided children must be 1 or more")
        threshold = _number(node.get("vote-threshold", 0))
        if threshold < 1:
            raise InvalidArgumentError("Parameter 'vote-threshold' expects a value >= 1")
        if threshold > len(children):
            raise InvalidArgumentError("threshold may not exceed children count")
        pattern = node.get("read-pattern", "quorum")
        if pattern not in PATTERNS:
            raise InvalidArgumentError("Please set read-pattern as fifo or quorum")
        if _flag(node, "blkverify"):
            raise InvalidArgumentError("quorum: blkverify=on is not supported")
        return cls(name, tuple(child_path(c) for c in children), threshold, pattern,
                   _flag(node, "rewrite-corrupted") and pattern == "quorum")


def check_image(path, names, dirty_for_writing):
    """An image on a quorum node: it has no directory, so a backing or data
    file name relative to it (not absolute, no protocol) is an error (qemu's
    words); a dirty one is not repaired through the node."""
    if dirty_for_writing:
        raise UnsupportedFeatureError(f"{path}: a dirty image is not repaired on a quorum "
                                      "node (check -r all each child)")
    for name in names:
        if name and not name.startswith("/") and ":" not in name.split("/", 1)[0]:
            raise InvalidArgumentError("Cannot generate a base directory for quorum nodes")


def open_quorum(spec, open_child, zero, writable=False):
    """The File of a quorum node: ``open_child(path)`` opens (and locks)
    each child file; ``zero(fd, offset, length, write)`` zeroes a range of
    one (host/file.py's)."""
    from .._ext.hookfile import hook_file
    files = []
    try:
        for path in spec.children:
            files.append(open_child(path))
        return hook_file(Quorum(spec, files, writable, zero), writable=writable)
    except BaseException:
        for f in files:
            f.close()
        raise


class Quorum:
    """The reader behind a quorum node's HookFile (see the module's docstring)."""

    def __init__(self, spec, files, writable, zero=None):
        self.spec, self.files, self.writable, self._zero = spec, files, writable, zero
        self.name = spec.name
        sizes = [f.size() for f in files]
        if len(set(sizes)) != 1:
            e = OSError(errno.EIO, "the children are not all one size "
                        f"({', '.join(map(str, sizes))} bytes)", spec.name)
            e.qemu = "Could not refresh total sector count: Input/output error"
            raise e

    growable = True                     # (hookfile: a file, not a device)

    @property
    def size(self):
        return self.files[0].size()

    def truncate(self, size):
        self._each(lambda f: f.truncate(size))

    def readinto(self, buf, off):
        mv = memoryview(buf).cast("B")
        if self.spec.pattern == "fifo":
            error = None
            for f in self.files:
                try:
                    f.preadinto(mv, off)
                    return
                except OSError as e:
                    error = error or e
            raise error
        reads, errors = [], []              # (child index, its bytes) of the reads done
        for i, f in enumerate(self.files):
            data = bytearray(len(mv))
            try:
                f.preadinto(data, off)
                reads.append((i, data))
            except OSError as e:
                errors.append(e)
        if len(reads) < self.spec.threshold:
            raise errors[0]
        if all(data == reads[0][1] for _, data in reads[1:]):      # (the usual case)
            mv[:] = reads[0][1]
            return
        for at in range(0, len(mv), SECTOR):           # else each sector votes
            self._vote(mv, off, at, reads)

    def _vote(self, mv, off, at, reads):
        versions = []                       # [bytes, [child index...]] in child order
        for i, data in reads:
            piece = bytes(data[at:at + SECTOR])
            same = next((v for v in versions if v[0] == piece), None)
            if same is None:
                versions.append([piece, [i]])
            else:
                same[1].append(i)
        winner = max(versions, key=lambda v: len(v[1]))
        if len(winner[1]) < self.spec.threshold:
            raise OSError(errno.EIO, f"no quorum at offset {off + at}: {len(winner[1])} of "
                          f"the {self.spec.threshold} children needed agree", self.name)
        mv[at:at + len(winner[0])] = winner[0]
        if self.spec.rewrite and self.writable:
            for piece, children in versions:
                if piece is not winner[0]:
                    for i in children:
                        self.files[i].pwrite(winner[0], off + at)

    def _each(self, call):
        """``call(file)`` on every child; an error only if fewer than the
        threshold succeed (then the first child's error)."""
        errors = []
        for f in self.files:
            try:
                call(f)
            except OSError as e:
                errors.append(e)
        if len(self.files) - len(errors) < self.spec.threshold:
            raise errors[0]

    def pwrite(self, buf, off):
        self._each(lambda f: f.pwrite(buf, off))

    def write_zeroes(self, off, n):
        self._each(lambda f: self._zero(f.fd, off, n, f.pwrite))

    def flush(self):
        self._each(lambda f: f.sync_all())

    def drop_cache(self):
        pass

    def close(self):
        for f in self.files:
            f.close()


def _number(value):
    if isinstance(value, bool) or not isinstance(value, (int, str)) or \
            (isinstance(value, str) and not value.isdigit()):
        raise InvalidArgumentError("Parameter 'vote-threshold' expects a number")
    return int(value)


def _flag(node, key):
    value = node.get(key, False)
    if isinstance(value, str) and value in ("on", "off", "true", "false"):
        return value in ("on", "true")
    if not isinstance(value, bool):
        raise InvalidArgumentError(f"Parameter '{key}' expects 'on' or 'off'")
    return value
