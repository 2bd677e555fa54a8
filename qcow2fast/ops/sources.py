"""The sources of a conversion (qemu-img convert SRC1 SRC2 ...): raw and
qcow2 images concatenated into one guest disk, and what each unit of it
needs before any data is read (from the sources' block status)."""

import errno
import os

import numpy as np

from ..engine.backing import probe_format
from ..host import file as hostfile
from ..host.remote import is_url
from ..errors import ConvertError, InvalidArgumentError, Qcow2Error
from ..extent import Extent
from ..spec.constants import SECTOR
from ..host.raw import RawImage

# Unit classification before reading: nothing to do, reads as zeros but must
# be written as zeros (a top layer over a backing file), or must be read.
SKIP, MUST_ZERO, READ = 0, 1, 2


class Sources:
    """Several images concatenated (qemu-img convert's SRC1 SRC2 ...).
    ``salvage``: None, or a function taking the warning for each sector
    that cannot be read, which then reads as zeros (--salvage)."""

    salvage = None
    status_notes = ()       # --salvage: (guest offset, warning) of the block status walk

    def __init__(self, images, names, owned=None):
        """``owned``: the images to close with the sources (default: all)."""
        self.images, self.names = images, names
        self.owned = images if owned is None else owned
        self.starts = np.cumsum([0] + [im.size for im in images]).tolist()
        self.size = self.starts[-1]

    def pieces(self, offset, length):
        """(image index, offset in it, offset in the range, length) covering the range."""
        end = offset + length
        for i, im in enumerate(self.images):
            a, b = max(offset, self.starts[i]), min(end, self.starts[i + 1])
            if a < b:
                yield i, a - self.starts[i], a - offset, b - a

    def readinto(self, offset, mv, notes=None):
        """Read the guest range at ``offset`` into ``mv``; with ``salvage``
        the warnings for what could not be read are appended to ``notes``
        (with those of the block status walk for the range, in disk order,
        as qemu's copy pass repeats them)."""
        said = []
        for i, off, at, n in self.pieces(offset, len(mv)):
            try:
                self.images[i].readinto(off, mv[at:at + n])
            except (Qcow2Error, OSError) as e:
                if self.salvage is None:
                    # qemu's line (the request's first byte, the errno's
                    # words); a malformed image says what and where instead
                    why = _why(e) if isinstance(e, OSError) and e.errno else \
                        f"{self.names[i]}: {e}"
                    raise ConvertError(f"error while reading at byte {offset}: {why}") from e
                said += self._salvage(self.images[i], off, mv[at:at + n], self.starts[i])
        if self.status_notes:
            end = offset + len(mv)
            said += [(at, 0, text) for at, text in self.status_notes if offset <= at < end]
        notes.extend(text for _, _, text in sorted(said))

    @staticmethod
    def _salvage(image, offset, mv, start):
        """qemu-img convert --salvage: the range again, sector by sector;
        a sector that cannot be read becomes zeros, with qemu's warning
        ((guest offset, 1, warning) each)."""
        said = []
        for k in range(0, len(mv), SECTOR):
            part = mv[k:k + SECTOR]
            try:
                image.readinto(offset + k, part)
            except (Qcow2Error, OSError) as e:
                part[:] = 0
                said.append((start + offset + k, 1, f"error while reading offset {offset + k}: "
                             f"{_why(e)}"))
        return said

    def extents(self):
        """(offset, length, kind, depth) over the whole concatenation.  With
        ``salvage``, a range whose block status cannot be read is asked for
        again in smaller pieces, down to a sector, which is then read as
        data (qemu-img convert's walk, whose warnings come out here and
        again as the copy reaches them)."""
        self.status_notes = []
        for i, im in enumerate(self.images):
            try:
                exts = (im.block_status(0, im.size) if self.salvage is None else
                        list(self._salvaged_status(im, self.starts[i]))) if im.size else []
            except (Qcow2Error, OSError) as e:
                raise ConvertError(f"error while reading the metadata of {self.names[i]!r}: "
                                   f"{e}") from e
            for e in exts:
                yield self.starts[i] + e.offset, e.length, e.kind, e.depth

    def _salvaged_status(self, image, start):
        size = -(-image.size // SECTOR)             # in sectors, as qemu walks
        pos = 0
        while pos < size:
            n = size - pos
            while True:
                try:
                    exts = image.block_status(pos * SECTOR, min(n * SECTOR, image.size -
                                                                pos * SECTOR))
                    break
                except (Qcow2Error, OSError) as e:
                    if n > 1:
                        n = -(-n // 4)              # qemu's retry on a shorter range
                        continue
                    text = f"error while reading block status at offset {pos * SECTOR}: " \
                        f"{_why(e)}"
                    self.salvage(text)
                    self.status_notes.append((start + pos * SECTOR, text))
                    exts = [Extent(pos * SECTOR, SECTOR, "data", None, 0)]
                    break
            yield from exts
            pos = -(-(exts[-1].offset + exts[-1].length) // SECTOR)

    def close(self):
        for im in self.owned:
            im.close()


def open_sources(names, fmt, snapshot=None, *, force_share=False, untrusted=False,
                 key_secret=None, remote=None):
    """Open the sources (``snapshot``: an internal snapshot of the only,
    qcow2, source to read instead of its active layer; ``force_share``,
    ``untrusted``, ``key_secret``, ``remote``: as :func:`qcow2fast.open`
    takes them).  A source that is not a name is an open block device
    (host/device.py, e.g. a null device) read as it is, and left open."""
    if snapshot is not None and len(names) > 1:
        raise InvalidArgumentError("a snapshot (-l) can only be read from a single source")
    images, owned = [], []
    try:
        for name in names:
            if not isinstance(name, (str, os.PathLike)):
                if snapshot is not None:
                    raise InvalidArgumentError("a snapshot (-l) needs a source by name")
                images.append(name)
                continue
            path = os.fspath(name)
            if not is_url(path) and not os.path.exists(path):
                raise hostfile.not_found(path)
            f = fmt or probe_format(path, remote)
            if f == "qcow2":
                from ..engine.image import Image
                images.append(Image(path, "r", cache_clean_interval=0, snapshot=snapshot,
                                    force_share=force_share, untrusted=untrusted,
                                    key_secret=key_secret, remote=remote))
            elif snapshot is not None:
                raise InvalidArgumentError(f"{path}: a {f} image has no internal snapshots")
            elif f == "raw":
                images.append(RawImage(path, force_share=force_share, remote=remote))
            else:
                raise InvalidArgumentError(f"unknown or unsupported source format {f!r}")
            owned.append(images[-1])
    except BaseException:
        for im in owned:
            im.close()
        raise
    return Sources(images, [n.path if im is n else os.fspath(n)
                            for n, im in zip(names, images)], owned)


def _why(e):
    """qemu's words for a failed request: its errno's (a corrupt cluster
    is an EIO to qemu)."""
    return os.strerror(e.errno if isinstance(e, OSError) and e.errno else errno.EIO)


class UnitMarks:
    """What each unit needs, from the sources' block status (no data read):
    READ where any byte is data, MUST_ZERO where the output must say zero
    explicitly (``top_only``: zeros in the source's top layer over a backing
    file, up to ``zero_below``, the target backing file's size, if known), else SKIP -- computed a batch at a time, so memory stays bounded
    whatever the disk size.  ``skip_as`` turns SKIP into another mark (-S 0:
    READ; an existing target: MUST_ZERO)."""

    def __init__(self, src, unit, *, top_only, skip_as=SKIP, zero_below=None):
        self.unit, self.skip_as = unit, skip_as
        self.count = -(-src.size // unit)
        starts, ends, what = [], [], []
        for off, length, kind, depth in src.extents():
            if top_only and depth > 0:
                continue
            mark = READ if kind in ("data", "compressed") else MUST_ZERO if top_only else SKIP
            if mark == MUST_ZERO and zero_below is not None:
                # past the end of the target's backing file it reads zeros anyway
                if off >= zero_below:
                    continue
                length = min(length, zero_below - off)
            if mark != SKIP:
                starts.append(off // unit)
                ends.append(-(-(off + length) // unit))
                what.append(mark)
        self.starts = np.array(starts, np.int64)     # in disk order, not overlapping
        self.ends = np.array(ends, np.int64)
        self.what = np.array(what, np.uint8)

    def get(self, first, count):
        """The marks of units [first, first + count)."""
        i = int(np.searchsorted(self.ends, first, side="right"))
        j = int(np.searchsorted(self.starts, first + count, side="left"))
        out = np.full(count, SKIP, np.uint8)
        # Extents may share a unit (a data extent and a zero one): READ wins.
        for mark in (MUST_ZERO, READ):
            sel = self.what[i:j] == mark
            for a, b in zip(self.starts[i:j][sel].tolist(), self.ends[i:j][sel].tolist()):
                out[max(a, first) - first:min(b, first + count) - first] = mark
        if self.skip_as != SKIP:
            out[out == SKIP] = self.skip_as
        return out
