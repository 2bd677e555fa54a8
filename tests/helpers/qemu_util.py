"""Helpers shared by the test modules: the qemu oracle and qcow2 byte surgery.

Everything that runs qemu-img / qemu-io lives here so the tests read as
scenarios.  Each helper raises AssertionError with qemu's own output when
qemu disagrees, so a failing test shows why.

The qcow2 layout constants come from QEMU's docs/interop/qcow2.txt.
"""

import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile

import pytest

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
HAVE_QEMU = bool(QEMU_IMG and QEMU_IO)
IN_CI = os.environ.get("CI", "").strip().lower() == "true"

# The repository root (tests/helpers/ is two levels below it): child Pythons
# get it on sys.path, so they import this checkout's qcow2fast.
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KiB = 1024
MiB = 1024 * 1024

# ---------------------------------------------------------------- header layout
# Byte offsets of the header fields (qcow2.txt, "Header").
H_MAGIC = 0
H_VERSION = 4
H_BACKING_FILE_OFFSET = 8
H_BACKING_FILE_SIZE = 16
H_CLUSTER_BITS = 20
H_SIZE = 24
H_CRYPT_METHOD = 32
H_L1_SIZE = 36
H_L1_TABLE_OFFSET = 40
H_REFCOUNT_TABLE_OFFSET = 48
H_REFCOUNT_TABLE_CLUSTERS = 56
H_NB_SNAPSHOTS = 60
H_SNAPSHOTS_OFFSET = 64
H_INCOMPATIBLE = 72
H_COMPATIBLE = 80
H_AUTOCLEAR = 88
H_REFCOUNT_ORDER = 96
H_HEADER_LENGTH = 100
H_COMPRESSION_TYPE = 104

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4

EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857

L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
QCOW_OFLAG_COPIED = 1 << 63
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0

KINDS = ("data", "zero", "unallocated", "compressed")

# Geometry matrix used by the interop tests: qemu only allows refcount_bits
# other than 16 with compat=1.1.
CLUSTER_SIZES = (512, 4 * KiB, 64 * KiB, 2 * MiB)
REFCOUNT_BITS = (1, 2, 4, 8, 16, 32, 64)
GEOMETRIES = ([(cs, rb, "1.1") for cs in CLUSTER_SIZES for rb in REFCOUNT_BITS]
              + [(cs, 16, "0.10") for cs in CLUSTER_SIZES])


def geom_id(g):
    cs, rb, compat = g
    return f"cs{cs}-rb{rb}-v{'3' if compat == '1.1' else '2'}"


def require(present, msg):
    """Skip (or, under CI=true, fail) when a tool the test needs is missing."""
    if present:
        return
    if IN_CI:
        pytest.fail(msg + " -- required when CI=true", pytrace=False)
    pytest.skip(msg)


def require_qemu():
    """Skip (or, under CI=true, fail) when the qemu oracle is missing."""
    require(HAVE_QEMU, "qemu-img/qemu-io not installed (Debian package qemu-utils)")


# ---------------------------------------------------------------- running qemu
# qemu 7.2 times LUKS's PBKDF2 with the thread's CPU clock and gives up with
# "Unable to get accurate CPU usage" when a short run reads as 0 ms (about
# one LUKS create in four here, whatever the test): such a run is repeated.
PBKDF2_TIMING_ERROR = "Unable to get accurate CPU usage"
PBKDF2_TIMING_ATTEMPTS = 50


def run(args, *, check=True, timeout=300, input=None):
    """Run a command (again while qemu fails to time PBKDF2); on failure
    raise AssertionError showing its output."""
    for _ in range(PBKDF2_TIMING_ATTEMPTS):
        p = subprocess.run([str(a) for a in args], capture_output=True, timeout=timeout,
                           input=input)
        p.stdout_text = p.stdout.decode(errors="replace")
        p.stderr_text = p.stderr.decode(errors="replace")
        if p.returncode == 0 or PBKDF2_TIMING_ERROR not in p.stderr_text:
            break
    if check and p.returncode != 0:
        raise AssertionError(
            f"command failed (exit {p.returncode}): {' '.join(map(str, args))}\n"
            f"--- stdout ---\n{p.stdout_text[-4000:]}\n--- stderr ---\n{p.stderr_text[-4000:]}")
    return p


def qemu_img(*args, check=True, timeout=300):
    require_qemu()
    return run([QEMU_IMG, *args], check=check, timeout=timeout)


def qemu_io(path, *cmds, fmt="qcow2", check=True, extra=()):
    """Run qemu-io commands (each a -c string) on ``path``."""
    require_qemu()
    args = [QEMU_IO, "-f", fmt, *extra]
    for c in cmds:
        args += ["-c", c]
    args.append(str(path))
    p = run(args, check=check)
    if check:
        out = p.stdout_text + p.stderr_text
        assert "failed" not in out and "error" not in out.lower(), (
            f"qemu-io reported a failure on {path}:\n{out[-4000:]}")
    return p


def qemu_raw_filled(path, size, pattern):
    """A raw image of ``size`` bytes made by qemu-img, every byte ``pattern``."""
    qemu_img("create", "-q", "-f", "raw", path, str(size))
    qemu_io(path, f"write -q -P {pattern:#x} 0 {size}", fmt="raw")
    return path


def qemu_create(path, size, *, cluster_size=65536, refcount_bits=16, compat="1.1",
                backing=None, backing_fmt=None, **opts):
    """qemu-img create -f qcow2 with the given options (extra opts as key=value)."""
    o = [f"cluster_size={cluster_size}", f"compat={compat}"]
    if compat != "0.10":
        o.append(f"refcount_bits={refcount_bits}")
    for k, v in opts.items():
        o.append(f"{k}={v}")
    args = ["create", "-q", "-f", "qcow2", "-o", ",".join(o)]
    if backing is not None:
        args += ["-b", str(backing), "-F", backing_fmt or "qcow2"]
    args.append(str(path))
    if size is not None:
        args.append(str(size))
    qemu_img(*args)
    return str(path)


def qemu_info(path, fmt="qcow2"):
    return json.loads(qemu_img("info", "--output=json", "-f", fmt, str(path)).stdout_text)


def qemu_raw(path, *, fmt="qcow2", snapshot=None, extra=()):
    """The image's guest content as seen by qemu (qemu-img convert -O raw)."""
    path = str(path)
    fd, out = tempfile.mkstemp(prefix=os.path.basename(path) + ".",
                               suffix=".raw", dir=os.path.dirname(path) or ".")
    os.close(fd)
    try:
        args = ["convert", "-f", fmt, "-O", "raw", *extra]
        if snapshot is not None:
            args += ["-l", f"snapshot.name={snapshot}"]
        qemu_img(*args, path, out)
        with open(out, "rb") as f:
            return f.read()
    finally:
        os.unlink(out)


def qemu_raw_slice(path, offset, length, *, fmt="qcow2"):
    """qemu's view of [offset, offset+length) only (a raw node with offset/size
    on top of the image), for images too large to convert whole."""
    path = os.path.abspath(str(path))
    start = offset // 512 * 512                  # the raw driver wants sectors
    end = -(-(offset + length) // 512) * 512
    spec = {"driver": "raw", "offset": start, "size": end - start,
            "file": {"driver": fmt, "file": {"driver": "file", "filename": path}}}
    fd, out = tempfile.mkstemp(suffix=".slice.raw", dir=os.path.dirname(path))
    os.close(fd)
    try:
        qemu_img("convert", "-O", "raw", "json:" + json.dumps(spec), out)
        with open(out, "rb") as f:
            data = f.read()
        assert len(data) == end - start
        return data[offset - start:offset - start + length]
    finally:
        os.unlink(out)


def qemu_check(path, *, expect_clean=True, fmt="qcow2"):
    """``qemu-img check --output=json``; with expect_clean assert no errors/leaks."""
    p = qemu_img("check", "--output=json", "-f", fmt, str(path), check=False)
    try:
        result = json.loads(p.stdout_text)
    except ValueError:
        raise AssertionError(f"qemu-img check {path} gave no JSON (exit {p.returncode}):\n"
                             f"{p.stdout_text}\n{p.stderr_text}") from None
    result["exit_code"] = p.returncode
    if expect_clean:
        bad = {k: result.get(k, 0) for k in ("corruptions", "leaks", "check-errors")}
        if p.returncode != 0 or any(bad.values()):
            human = qemu_img("check", "-f", fmt, str(path), check=False)
            raise AssertionError(
                f"qemu-img check {path}: exit {p.returncode}, {bad}\n"
                f"{human.stdout_text[-6000:]}\n{human.stderr_text[-2000:]}")
    return result


def qemu_map(path, fmt="qcow2"):
    return json.loads(qemu_img("map", "--output=json", "-f", fmt, str(path)).stdout_text)


def map_at(path, offset):
    """qemu-img map's extent holding guest ``offset``."""
    return next(e for e in qemu_map(path) if e["start"] <= offset < e["start"] + e["length"])


def assert_compressed(path, offset):
    """qemu-img map: guest ``offset`` is data of the top layer, compressed."""
    e = map_at(path, offset)
    assert e["data"] and e["depth"] == 0 and "offset" not in e, e


def assert_plain(path, offset):
    """qemu-img map: guest ``offset`` is plain data of the top layer."""
    e = map_at(path, offset)
    assert e["data"] and e["depth"] == 0 and "offset" in e, e


def qemu_compare(path, expected, *, fmt="qcow2"):
    """``qemu-img compare`` the image against expected content (bytes or a raw path)."""
    path = str(path)
    tmp = None
    if isinstance(expected, (bytes, bytearray, memoryview)):
        fd, tmp = tempfile.mkstemp(suffix=".expected.raw", dir=os.path.dirname(path) or ".")
        with os.fdopen(fd, "wb") as f:
            f.write(expected)
        raw = tmp
    else:
        raw = str(expected)
    try:
        p = qemu_img("compare", "-f", fmt, "-F", "raw", path, raw, check=False)
        if p.returncode != 0:
            detail = ""
            if tmp is not None:
                detail = describe_mismatch(qemu_raw(path, fmt=fmt), bytes(expected))
            raise AssertionError(f"qemu-img compare {path} (exit {p.returncode}): "
                                 f"{p.stdout_text.strip()} {p.stderr_text.strip()} {detail}")
    finally:
        if tmp is not None:
            os.unlink(tmp)


def describe_mismatch(actual, expected, context=16):
    if len(actual) != len(expected):
        return f"length {len(actual)} != expected {len(expected)}"
    if actual == expected:
        return "equal"
    # Find the first and last differing byte quickly.
    step = 1 << 16
    first = next(i for i in range(0, len(actual), step)
                 if actual[i:i + step] != expected[i:i + step])
    first = next(i for i in range(first, min(first + step, len(actual)))
                 if actual[i] != expected[i])
    last = next(i for i in range(len(actual) - 1, -1, -1) if actual[i] != expected[i]) \
        if len(actual) <= (1 << 22) else None
    n = sum(1 for i in range(first, min(len(actual), first + (1 << 16)))
            if actual[i] != expected[i])
    return (f"first difference at byte {first:#x} (last {last if last is None else hex(last)},"
            f" {n} of the next 64 KiB differ): actual "
            f"{bytes(actual[first:first + context]).hex()} expected "
            f"{bytes(expected[first:first + context]).hex()}")


def assert_bytes_equal(actual, expected, what="content"):
    if bytes(actual) != bytes(expected):
        raise AssertionError(f"{what} differs: {describe_mismatch(actual, expected)}")


def assert_qemu_content(path, expected, *, fmt="qcow2", snapshot=None):
    """qemu's view of the image equals ``expected`` (with a useful diff)."""
    got = qemu_raw(path, fmt=fmt, snapshot=snapshot)
    assert_bytes_equal(got, expected, f"qemu's view of {os.path.basename(str(path))}"
                       + (f" snapshot {snapshot}" if snapshot else ""))


# ---------------------------------------------------------------- block status
def assert_extents_contiguous(extents, start, length, chain_len):
    """Extents cover [start, start+length) in order, without gaps or overlaps."""
    assert len(extents) > 0, "block_status returned no extents"
    pos = start
    for e in extents:
        assert e.offset == pos, f"extent {e} does not start at {pos:#x} (gap/overlap)"
        assert e.length > 0, f"empty extent {e}"
        assert e.kind in KINDS, f"unknown kind in {e}"
        assert 0 <= e.depth <= chain_len, f"depth out of range in {e} (chain {chain_len})"
        if e.kind == "data":
            assert isinstance(e.host_offset, int) and e.host_offset >= 0, e
        elif e.kind == "unallocated":
            assert e.host_offset is None, f"host_offset should be None for {e}"
        if e.kind == "unallocated":
            assert e.depth < chain_len, (
                f"unallocated extent must name a layer of the chain ({chain_len}): {e}")
        pos += e.length
    assert pos == start + length, f"extents end at {pos:#x}, expected {start + length:#x}"


def assert_block_status_matches_qemu(extents, qmap, size, chain_len):
    """Compare qcow2fast extents with ``qemu-img map --output=json``.

    Compared per byte range: "reads data from some layer" (data/compressed)
    versus "reads as zero / unallocated".  Where both say data, the layer
    (depth) must agree, compressed must match qemu's data-without-offset,
    and the host offset must equal qemu's.
    """
    assert_extents_contiguous(extents, 0, size, chain_len)
    qpos = 0
    for q in qmap:
        assert q["start"] == qpos
        qpos += q["length"]
    assert qpos == size, f"qemu map covers {qpos}, size {size}"

    bounds = sorted({0, size} | {e.offset for e in extents} | {q["start"] for q in qmap})
    ei = qi = 0
    problems = []
    for a, b in zip(bounds, bounds[1:]):
        while extents[ei].offset + extents[ei].length <= a:
            ei += 1
        while qmap[qi]["start"] + qmap[qi]["length"] <= a:
            qi += 1
        e, q = extents[ei], qmap[qi]
        f_data = e.kind in ("data", "compressed")
        if f_data != bool(q["data"]):
            problems.append(f"[{a:#x},{b:#x}): qcow2fast {e.kind} (depth {e.depth}) but qemu "
                            f"data={q['data']} zero={q['zero']} depth={q['depth']}")
            continue
        if e.depth != q["depth"]:
            problems.append(f"[{a:#x},{b:#x}): {e.kind} at depth {e.depth} != qemu depth "
                            f"{q['depth']}")
        if not f_data:
            if (e.kind == "zero") != bool(q["present"]):
                problems.append(f"[{a:#x},{b:#x}): qcow2fast {e.kind} but qemu "
                                f"present={q['present']}")
            continue
        if "offset" in q:
            if e.kind != "data":
                problems.append(f"[{a:#x},{b:#x}): qcow2fast says {e.kind}, qemu has a "
                                f"plain data cluster at host offset {q['offset']:#x}")
            elif e.host_offset + (a - e.offset) != q["offset"] + (a - q["start"]):
                problems.append(f"[{a:#x},{b:#x}): host offset "
                                f"{e.host_offset + (a - e.offset):#x} != qemu "
                                f"{q['offset'] + (a - q['start']):#x}")
        elif e.kind != "compressed":
            problems.append(f"[{a:#x},{b:#x}): qcow2fast {e.kind}, qemu says compressed "
                            "(data without offset)")
        if len(problems) > 20:
            break
    assert not problems, "block_status disagrees with qemu-img map:\n" + "\n".join(problems)


# ---------------------------------------------------------------- header surgery
def read_at(path, offset, fmt):
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(struct.calcsize(fmt))
    return struct.unpack(fmt, data)


def patch(path, offset, fmt, *values):
    """struct.pack_into ``values`` at ``offset`` of the file (in place)."""
    buf = bytearray(struct.calcsize(fmt))
    struct.pack_into(fmt, buf, 0, *values)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(buf)


def patch_bytes(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def header(path):
    """The header fields qcow2fast tests need, parsed with struct from the file."""
    with open(path, "rb") as f:
        d = f.read(112)
    (magic, version, bfo, bfs, cluster_bits, size, crypt, l1_size, l1_off, rt_off,
     rt_clusters, nb_snap, snap_off) = struct.unpack_from(">4sIQIIQIIQQIIQ", d, 0)
    h = dict(magic=magic, version=version, backing_file_offset=bfo, backing_file_size=bfs,
             cluster_bits=cluster_bits, size=size, crypt_method=crypt, l1_size=l1_size,
             l1_table_offset=l1_off, refcount_table_offset=rt_off,
             refcount_table_clusters=rt_clusters, nb_snapshots=nb_snap,
             snapshots_offset=snap_off)
    if version >= 3:
        (h["incompatible_features"], h["compatible_features"], h["autoclear_features"],
         h["refcount_order"], h["header_length"]) = struct.unpack_from(">QQQII", d, 72)
    else:
        h.update(incompatible_features=0, compatible_features=0, autoclear_features=0,
                 refcount_order=4, header_length=72)
    return h


def is_dirty(path):
    return bool(header(path)["incompatible_features"] & INCOMPAT_DIRTY)


def is_marked_corrupt(path):
    return bool(header(path)["incompatible_features"] & INCOMPAT_CORRUPT)


def read_extensions(path):
    """[(type, data)] of the header extensions, and the offset of the area."""
    h = header(path)
    cs = 1 << h["cluster_bits"]
    with open(path, "rb") as f:
        area = f.read(cs)
    pos = h["header_length"]
    exts = []
    while pos + 8 <= len(area):
        t, n = struct.unpack_from(">II", area, pos)
        if t == EXT_END:
            break
        exts.append((t, area[pos + 8:pos + 8 + n]))
        pos += 8 + n + (-n % 8)
    return exts, h["header_length"]


def write_extensions(path, exts):
    """Rewrite the header extension area (the image must have no backing file)."""
    h = header(path)
    assert h["backing_file_offset"] == 0, "write_extensions: image has a backing file"
    out = bytearray()
    for t, data in exts:
        out += struct.pack(">II", t, len(data)) + data + b"\0" * (-len(data) % 8)
    out += struct.pack(">II", EXT_END, 0)
    assert h["header_length"] + len(out) <= 1 << h["cluster_bits"]
    patch_bytes(path, h["header_length"], bytes(out))


def l2_entry_offset(path, guest_offset):
    """File offset of the L2 entry mapping ``guest_offset`` (its L2 table must exist)."""
    h = header(path)
    cb = h["cluster_bits"]
    l2_bits = cb - 3
    l1_index = guest_offset >> (cb + l2_bits)
    l2_index = (guest_offset >> cb) & ((1 << l2_bits) - 1)
    (l1e,) = read_at(path, h["l1_table_offset"] + 8 * l1_index, ">Q")
    l2_off = l1e & L1E_OFFSET_MASK
    assert l2_off, f"no L2 table for guest offset {guest_offset:#x}"
    return l2_off + 8 * l2_index


def l1_entry_offset(path, guest_offset):
    h = header(path)
    cb = h["cluster_bits"]
    return h["l1_table_offset"] + 8 * (guest_offset >> (cb + cb - 3))


def compressed_descriptor(entry, cluster_bits):
    """(host_offset, nb_additional_sectors) of a compressed L2 entry."""
    x = 62 - (cluster_bits - 8)
    return entry & ((1 << x) - 1), (entry >> x) & ((1 << (cluster_bits - 8)) - 1)


def make_compressed_entry(host_offset, nb_sectors, cluster_bits):
    x = 62 - (cluster_bits - 8)
    assert host_offset < (1 << x)
    return QCOW_OFLAG_COMPRESSED | (nb_sectors << x) | host_offset


# ---------------------------------------------------------------- data helpers
def rand_bytes(rng, n):
    return rng.randbytes(n)


def compressible_bytes(rng, n):
    """Data that deflates to roughly half: random letters from a 16-symbol alphabet."""
    return rng.randbytes(n).translate(_COMPRESSIBLE_TABLE)


_COMPRESSIBLE_TABLE = bytes(b"abcdefghijklmnop"[i & 15] for i in range(256))


def file_state(path):
    """(bytes, mtime_ns, size) of a file, to prove it was not modified."""
    st = os.stat(path)
    with open(path, "rb") as f:
        data = f.read()
    return data, st.st_mtime_ns, st.st_size


def run_python(code, *, timeout=120, check=True, mem_limit=None):
    """Run ``code`` in a child Python (repo root on sys.path)."""
    prelude = ""
    if mem_limit:
        prelude = ("import resource\n"
                   f"resource.setrlimit(resource.RLIMIT_AS, ({mem_limit}, {mem_limit}))\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    p = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True,
                       timeout=timeout, env=env, cwd=REPO)
    p.stdout_text = p.stdout.decode(errors="replace")
    p.stderr_text = p.stderr.decode(errors="replace")
    if check and p.returncode != 0:
        raise AssertionError(f"child python failed (exit {p.returncode}):\n"
                             f"{p.stdout_text[-3000:]}\n{p.stderr_text[-3000:]}")
    return p


class Rng(random.Random):
    """random.Random with helpers for offsets inside an image."""

    def span(self, size, max_len):
        """A random (offset, length) inside [0, size), length >= 1."""
        length = self.randint(1, min(max_len, size))
        return self.randint(0, size - length), length
