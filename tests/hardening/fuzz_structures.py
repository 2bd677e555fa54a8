"""Where the fuzzer's structure-aware mutations land beyond the header and
the cluster tables (tests/hardening/fuzzer.py): the fields of the header
extensions (their magics and lengths, the backing format, the feature-name
table, the bitmaps extension, the full-disk-encryption pointer, the
external data file name), the bitmap directory and its bitmap tables, the
snapshot table (every entry's fields, its extra data, its L1 table), and
the LUKS header with its key slots; and the name strings (backing file,
data file, feature, snapshot and bitmap names).

Everything is read from the mutated buffer itself, bounded: a walk stops
at the end of the buffer or after a few dozen entries, so a mutation that
made a length absurd only shortens the walk."""

import struct

# header extension magics (docs/interop/qcow2.txt)
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
MAX_WALK = 32

# interesting name contents: untrusted-image rules, parsers of json:,
# protocols, NULs, no terminator, very long
NAMES = [b"", b"/etc/passwd", b"../../escape.qcow2", b"json:{\"driver\":\"file\"}",
         b"nbd://localhost/x", b"a\0b", b"\xff\xfe", b"x" * 1023, b"in.qcow2", b"."]


def _u(buf, off, fmt):
    n = struct.calcsize(fmt)
    return struct.unpack_from(fmt, buf, off)[0] if 0 <= off and off + n <= len(buf) else None


def _extensions(buf):
    """[(magic, data offset, data length)] of the header extension list."""
    version = _u(buf, 4, ">I")
    pos = (_u(buf, 100, ">I") or 104) if version == 3 else 72
    out = []
    for _ in range(MAX_WALK):
        magic, n = _u(buf, pos, ">I"), _u(buf, pos + 4, ">I")
        if magic is None or n is None or magic == 0:
            break
        out.append((magic, pos + 8, n))
        pos += 8 + ((n + 7) & ~7)
    return out


def structures(buf):
    """{kind: [(file offset, struct format)]} of the fields above, and
    [(offset, length)] of the name strings."""
    f = {k: [] for k in ("extension", "bitmaps", "snapshot", "luks")}
    names = []
    bo, bn = _u(buf, 8, ">Q"), _u(buf, 16, ">I")
    if bo and bn and bo + min(bn, 1023) <= len(buf):
        names.append((bo, min(bn, 1023)))
    for magic, off, n in _extensions(buf):
        f["extension"] += [(off - 8, ">I"), (off - 4, ">I")]
        if magic in (EXT_BACKING_FORMAT, EXT_DATA_FILE) and off + n <= len(buf):
            names.append((off, n))
        elif magic == EXT_FEATURE_TABLE:
            for e in range(off, off + min(n, 48 * MAX_WALK), 48):
                f["extension"] += [(e, ">B"), (e + 1, ">B")]
                names.append((e + 2, 46))
        elif magic == EXT_BITMAPS:
            f["extension"] += [(off, ">I"), (off + 4, ">I"), (off + 8, ">Q"), (off + 16, ">Q")]
            _bitmap_directory(buf, _u(buf, off + 16, ">Q"), _u(buf, off, ">I"), f, names)
        elif magic == EXT_CRYPTO:
            f["extension"] += [(off, ">Q"), (off + 8, ">Q")]
            _luks(buf, _u(buf, off, ">Q"), f)
    _snapshot_table(buf, _u(buf, 64, ">Q"), _u(buf, 60, ">I"), f, names)
    return f, [(o, n) for o, n in names if 0 < o and o + n <= len(buf)]


def _bitmap_directory(buf, pos, count, f, names):
    for _ in range(min(count or 0, MAX_WALK)):
        if pos is None or _u(buf, pos + 24, ">B") is None:
            return
        f["bitmaps"] += [(pos, ">Q"), (pos + 8, ">I"), (pos + 12, ">I"), (pos + 16, ">B"),
                         (pos + 17, ">B"), (pos + 18, ">H"), (pos + 20, ">I")]
        table, size = _u(buf, pos, ">Q"), _u(buf, pos + 8, ">I")
        # the bitmap table's entries (cluster offsets, or 1: all ones)
        if table and table < len(buf):
            f["bitmaps"] += [(table + 8 * i, ">Q") for i in range(min(size, 64))
                             if table + 8 * i + 8 <= len(buf)]
        name_size, extra = _u(buf, pos + 18, ">H"), _u(buf, pos + 20, ">I")
        names.append((pos + 24 + extra, name_size))
        pos += (24 + extra + name_size + 7) & ~7


def _snapshot_table(buf, pos, count, f, names):
    for _ in range(min(count or 0, MAX_WALK)):
        if pos is None or _u(buf, pos + 40, ">B") is None:
            return
        f["snapshot"] += [(pos, ">Q"), (pos + 8, ">I"), (pos + 12, ">H"), (pos + 14, ">H"),
                          (pos + 16, ">I"), (pos + 20, ">I"), (pos + 24, ">Q"),
                          (pos + 32, ">I"), (pos + 36, ">I")]
        l1, l1_size = _u(buf, pos, ">Q"), _u(buf, pos + 8, ">I")
        if l1 and l1 < len(buf):
            f["snapshot"] += [(l1 + 8 * i, ">Q") for i in range(min(l1_size, 16))
                              if l1 + 8 * i + 8 <= len(buf)]
        extra = _u(buf, pos + 36, ">I")
        f["snapshot"] += [(pos + 40 + 8 * i, ">Q") for i in range(min(extra // 8, 3))]
        id_size, name_size = _u(buf, pos + 12, ">H"), _u(buf, pos + 14, ">H")
        names += [(pos + 40 + extra, id_size), (pos + 40 + extra + id_size, name_size)]
        pos += (40 + extra + id_size + name_size + 7) & ~7


def _luks(buf, pos, f):
    """The LUKS1 header: version, the three spec strings' first bytes,
    payload offset, key bytes, digest iterations, and each key slot's
    state, iterations, key material offset and stripes."""
    if pos is None or _u(buf, pos + 592, ">I") is None:
        return
    f["luks"] += [(pos + 6, ">H"), (pos + 8, ">B"), (pos + 40, ">B"), (pos + 72, ">B"),
                  (pos + 104, ">I"), (pos + 108, ">I"), (pos + 164, ">I")]
    for s in range(8):
        k = pos + 208 + 48 * s
        f["luks"] += [(k, ">I"), (k + 4, ">I"), (k + 40, ">I"), (k + 44, ">I")]
