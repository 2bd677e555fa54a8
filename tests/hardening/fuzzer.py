"""A structure-aware fuzzer for qcow2fast: seeded mutations of real images
made by qemu (header fields, L1/L2 entries, refcount table and block
entries, header extensions, the snapshot table, raw bytes, truncation;
with fuzz_structures.py the fields of every header extension, the bitmap
directory and tables, snapshot entries, the LUKS header and the name
strings) and
of a real NBD client's byte stream (handshake options and requests), and
of image names (json: trees, --image-opts, blkdebug rules: fuzz_names.py).

Each input runs in a forked child under RLIMIT_AS (1 GiB) and RLIMIT_CPU,
with a wall-clock timeout.  A run is a *finding* when the child dies from
a signal, hangs, runs out of memory, raises anything but a Qcow2Error or
an OSError (a clear error), or changes an image it opened read-only.

Used by scripts/fuzz.py (long runs, optionally driven by atheris) and by
tests/hardening/test_fuzz.py (a quick seeded set)."""

import json
import os
import random
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
import traceback

from tests.hardening import fuzz_names
from tests.hardening.fuzz_structures import NAMES, structures
from tests.helpers.qemu_util import PBKDF2_TIMING_ATTEMPTS

QEMU_IMG = shutil.which("qemu-img") or "qemu-img"
QEMU_IO = shutil.which("qemu-io") or "qemu-io"
AS_LIMIT = 1 << 30
LUKS_SECRET = "fuzz"        # the LUKS seed's passphrase, given to every target
# The LUKS key-derivation work one input may ask for (spec/luks.py's bounds,
# lowered in the child): the real bounds (2^24 per slot, 2^26 in all) are
# legal images' seconds of PBKDF2 per open, and a target that opens the
# image six times spent them past the timeout (a "hang" that was only the
# KDF).  Above these, an input is refused by the checks that refuse images
# above the real bounds (tests/api/test_luks_bad_input.py).  The seed's
# slots (iter-time=10 ms) stay far below on any machine.
FUZZ_LUKS_ITERATIONS = 1 << 20
FUZZ_LUKS_TOTAL_ITERATIONS = 1 << 21
TARGETS = ("open", "read", "block_status", "check", "repair", "convert", "lifecycle", "chain",
           "nbd", "names")
WRITING = ("repair", "lifecycle", "chain")      # targets that may change their input

# -- seeds: images qemu made --------------------------------------------------------------


def _run(*argv, cwd=None):
    """Run a qemu tool; a LUKS create that qemu fails to time PBKDF2 for
    is repeated (tests/helpers/qemu_util.py)."""
    for _ in range(PBKDF2_TIMING_ATTEMPTS):
        p = subprocess.run([str(a) for a in argv], capture_output=True, cwd=cwd)
        if p.returncode == 0 or b"accurate CPU usage" not in p.stderr:
            break
    p.check_returncode()


def make_seeds(d):
    """A few small qemu-made images covering the structures mutated."""
    seeds = []

    def create(name, size, opts, *io):
        path = os.path.join(d, name)
        # (in ``d``: qemu 7.2 makes a relative data file name from the current directory)
        _run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", opts, path, size, cwd=d)
        if io:
            _run(QEMU_IO, *sum((["-c", c] for c in io), []), path, cwd=d)
        seeds.append(path)
        return path

    create("v3.qcow2", "4M", "cluster_size=65536", "write -P 1 0 128k",
           "write -c -P 2 256k 64k", "write -z 512k 64k", "write -P 3 3M 4k")
    create("small.qcow2", "1M", "cluster_size=4096,refcount_bits=1", "write -P 4 0 20k",
           "write -c -P 5 64k 4k")
    create("v2.qcow2", "1M", "compat=0.10,cluster_size=4096", "write -P 6 4k 8k")
    create("extl2.qcow2", "2M", "cluster_size=65536,extended_l2=on", "write -P 7 0 6k",
           "write -z 64k 8k")
    snap = create("snap.qcow2", "1M", "cluster_size=4096,refcount_bits=64",
                  "write -P 8 0 8k")
    _run(QEMU_IMG, "snapshot", "-c", "s1", snap)
    _run(QEMU_IO, "-c", "write -P 9 0 4k", snap)
    create("zstd.qcow2", "1M", "cluster_size=4096,compression_type=zstd",
           "write -c -P 10 0 8k")
    # the newer parsers (fuzz_structures.py): a backing file name, bitmaps
    # with set bits, an external data file, LUKS; snapshots with VM state
    base = create("base.qcow2", "1M", "cluster_size=4096", "write -P 11 0 8k")
    top = os.path.join(d, "bitmaps.qcow2")
    _run(QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", "-b",
         os.path.basename(base), "-F", "qcow2", top)
    _run(QEMU_IMG, "bitmap", "--add", "-g", "8192", top, "b0")
    _run(QEMU_IMG, "bitmap", "--add", top, "b1")
    import qcow2fast
    with qcow2fast.open(top, "r+") as img:      # (qemu-img cannot set bits offline)
        img.write(4096, b"\x0c" * 20000)
    seeds.append(top)
    create("datafile.qcow2", "1M", "cluster_size=4096,data_file=datafile.data",
           "write -P 13 0 8k")
    luks = os.path.join(d, "luks.qcow2")
    secret = ["--object", f"secret,id=sec0,data={LUKS_SECRET}"]
    _run(QEMU_IMG, "create", "-q", "-f", "qcow2", *secret, "-o",
         "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,cluster_size=4096",
         luks, "1M")
    _run(QEMU_IO, *secret, "--image-opts", "-c", "write -P 14 0 8k",
         f"driver=qcow2,file.filename={luks},encrypt.key-secret=sec0")
    seeds.append(luks)
    vm = create("vmstate.qcow2", "1M", "cluster_size=4096", "write -P 15 0 4k")
    _run(QEMU_IMG, "snapshot", "-c", "first", vm)
    _run(QEMU_IO, "-c", "write -P 16 0 4k", vm)
    _run(QEMU_IMG, "snapshot", "-c", "second-with-a-longer-name", vm)
    return seeds


# -- mutating images ----------------------------------------------------------------------

HEADER_FIELDS = [  # (offset, struct format) of each header field (qcow2.txt)
    (4, ">I"), (8, ">Q"), (16, ">I"), (20, ">I"), (24, ">Q"), (32, ">I"), (36, ">I"),
    (40, ">Q"), (48, ">Q"), (56, ">I"), (60, ">I"), (64, ">Q"), (72, ">Q"), (80, ">Q"),
    (88, ">Q"), (96, ">I"), (100, ">I"), (104, ">B")]
INTERESTING = [0, 1, 2, 7, 8, 9, 16, 21, 22, 63, 64, 511, 512, 4095, 4096, 65535, 65536,
               1 << 20, 1 << 24, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40, 1 << 56,
               (1 << 62), (1 << 63), (1 << 64) - 1]
ENTRY_BITS = [0, 1, 9, 16, 30, 31, 32, 55, 56, 61, 62, 63]


def _u(buf, off, fmt):
    return struct.unpack_from(fmt, buf, off)[0] if off + struct.calcsize(fmt) <= len(buf) \
        else 0


def _put(buf, off, fmt, value, rng):
    n = struct.calcsize(fmt)
    if off < 0 or off + n > len(buf):
        return
    struct.pack_into(fmt, buf, off, value & ((1 << (8 * n)) - 1))


def _value(rng, old, bits):
    r = rng.random()
    if r < 0.4:
        return rng.choice(INTERESTING)
    if r < 0.6:
        return old ^ (1 << rng.randrange(bits))
    if r < 0.8:
        return old + rng.choice((-1, 1, -8, 8, -512, 512, -4096, 4096, 65536))
    return rng.getrandbits(bits)


def _tables(buf):
    """File offsets of the entries of the structures the header names."""
    cb = _u(buf, 20, ">I")
    cs = 1 << cb if 9 <= cb <= 21 else 65536
    out = {}
    l1_off, l1_size = _u(buf, 40, ">Q"), _u(buf, 36, ">I")
    out["l1"] = [l1_off + 8 * i for i in range(min(l1_size, 64)) if l1_off + 8 * i < len(buf)]
    l2s = [(_u(buf, o, ">Q") & 0x00FFFFFFFFFFFE00) for o in out["l1"]]
    out["l2"] = [t + 8 * i for t in l2s if t and t < len(buf) for i in range(cs // 8)
                 if t + 8 * i < len(buf)]
    rt = _u(buf, 48, ">Q")
    out["reftable"] = [rt + 8 * i for i in range(cs // 8) if rt + 8 * i < len(buf)][:64]
    blocks = [_u(buf, o, ">Q") & ~0x1FF for o in out["reftable"]]
    out["refblock"] = [b + 2 * i for b in blocks if b and b < len(buf)
                       for i in range(min(cs // 2, 4096))]
    so = _u(buf, 64, ">Q")
    out["snapshot"] = [so + i for i in range(0, 48) if 0 < so + i < len(buf)]
    hl = _u(buf, 100, ">I") if _u(buf, 4, ">I") == 3 else 72
    out["extension"] = [hl + i for i in range(0, 64, 4) if hl + i < min(len(buf), cs)]
    return out, cs


def mutate_image(data, rng, n=None):
    """``data`` with 1 to 4 structure-aware mutations."""
    buf = bytearray(data)
    for _ in range(n or rng.randint(1, 4)):
        tables, cs = _tables(buf)
        kind = rng.choice(("header", "header", "l1", "l2", "l2", "reftable", "refblock",
                           "snapshot", "extension", "bytes", "truncate", "structure",
                           "structure", "structure", "name"))
        if kind in ("structure", "name"):
            fields, names = structures(buf)
            if kind == "name" and names:
                off, n = rng.choice(names)
                new = rng.choice(NAMES)
                buf[off:off + n] = (new + bytes(n))[:n]
            kinds = [v for v in fields.values() if v]
            if kind == "structure" and kinds:
                off, fmt = rng.choice(rng.choice(kinds))
                _put(buf, off, fmt, _value(rng, _u(buf, off, fmt), 8 * struct.calcsize(fmt)),
                     rng)
            continue
        if kind == "header":
            off, fmt = rng.choice(HEADER_FIELDS)
            _put(buf, off, fmt, _value(rng, _u(buf, off, fmt), 8 * struct.calcsize(fmt)), rng)
        elif kind in ("l1", "l2", "reftable") and tables[kind]:
            off = rng.choice(tables[kind])
            old = _u(buf, off, ">Q")
            if rng.random() < 0.5:
                new = old ^ (1 << rng.choice(ENTRY_BITS))
            elif rng.random() < 0.5:
                new = (old & (0xFF << 56)) | (rng.randrange(max(len(buf) // cs + 2, 1)) * cs)
            else:
                new = _value(rng, old, 64)
            _put(buf, off, ">Q", new, rng)
        elif kind == "refblock" and tables[kind]:
            off = rng.choice(tables[kind])
            _put(buf, off, ">H", _value(rng, _u(buf, off, ">H"), 16), rng)
        elif kind in ("snapshot", "extension") and tables[kind]:
            off = rng.choice(tables[kind])
            fmt = rng.choice((">I", ">H", ">Q"))
            _put(buf, off, fmt, _value(rng, _u(buf, off, fmt), 8 * struct.calcsize(fmt)), rng)
        elif kind == "bytes" and buf:
            for _ in range(rng.randint(1, 8)):
                buf[rng.randrange(len(buf))] = rng.getrandbits(8)
        elif kind == "truncate" and len(buf) > 512:
            del buf[rng.randrange(512, len(buf)):]
    return bytes(buf)


# -- NBD client streams --------------------------------------------------------------------

BITMAP_NAME = "fz"
BITMAP_CONTEXT = "qemu:dirty-bitmap:" + BITMAP_NAME


def nbd_stream(rng):
    """A client's byte stream: a handshake (fixed newstyle, options) and
    requests, as a real client sends them; a list of messages."""
    from qcow2fast.nbd import protocol as P
    msgs = [P.CLIENT_FLAGS.pack(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES)]

    def option(opt, data=b""):
        msgs.append(P.OPTION_HEADER.pack(P.IHAVEOPT, opt, len(data)) + data)
    option(P.NBD_OPT_STRUCTURED_REPLY)
    # Half the streams select the export's dirty bitmap alone (_target_nbd
    # adds it): their BLOCK_STATUS requests, with any flags and ranges, go
    # to the C loop (_ext/nbdio.RequestLoop), as do small READs.
    bitmap = rng.random() < 0.5
    q = BITMAP_CONTEXT.encode() if bitmap else b"base:allocation"
    option(P.NBD_OPT_SET_META_CONTEXT, P.U32.pack(0) + P.U32.pack(1) + P.U32.pack(len(q)) + q)
    if rng.random() < 0.2:
        option(P.NBD_OPT_LIST)
    option(P.NBD_OPT_GO, P.U32.pack(0) + P.U16.pack(1) + P.U16.pack(P.NBD_INFO_BLOCK_SIZE))
    for h in range(rng.randint(1, 6)):
        cmd = rng.choice((P.NBD_CMD_READ, P.NBD_CMD_WRITE, P.NBD_CMD_BLOCK_STATUS,
                          P.NBD_CMD_TRIM, P.NBD_CMD_WRITE_ZEROES, P.NBD_CMD_FLUSH,
                          P.NBD_CMD_CACHE))
        off, length = rng.randrange(0, 1 << 20, 512), rng.choice((512, 4096, 65536))
        flags = 0
        if bitmap and rng.random() < 0.6:
            cmd = P.NBD_CMD_BLOCK_STATUS
            off = rng.choice((off, rng.randrange(0, 1 << 64)))
            length = rng.choice((length, 0, rng.randrange(0, 1 << 32)))
            flags = rng.choice((0, 0, P.NBD_CMD_FLAG_REQ_ONE, P.NBD_CMD_FLAG_FUA,
                                P.NBD_CMD_FLAG_DF, rng.randrange(0, 1 << 16)))
        msg = P.REQUEST.pack(P.NBD_REQUEST_MAGIC, flags, cmd, h, off, length)
        if cmd == P.NBD_CMD_WRITE:
            msg += bytes([h]) * length
        msgs.append(msg)
    msgs.append(P.REQUEST.pack(P.NBD_REQUEST_MAGIC, 0, P.NBD_CMD_DISC, 99, 0, 0))
    return msgs


def mutate_stream(msgs, rng):
    msgs = list(msgs)
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(msgs))
        m = bytearray(msgs[i])
        r = rng.random()
        if r < 0.5 and m:               # a field: a u16/u32/u64 at a 2-aligned offset
            fmt = rng.choice((">H", ">I", ">Q"))
            off = rng.randrange(0, max(1, len(m) - 1), 2)
            _put(m, off, fmt, _value(rng, _u(m, off, fmt), 8 * struct.calcsize(fmt)), rng)
        elif r < 0.7 and m:
            m[rng.randrange(len(m))] = rng.getrandbits(8)
        elif r < 0.8:
            del m[rng.randrange(len(m) + 1):]
        elif r < 0.9:
            msgs.insert(i, bytes(m))
            continue
        else:
            del msgs[i]
            continue
        msgs[i] = bytes(m)
    return b"".join(msgs)


# -- targets (run in the child) -----------------------------------------------------------


def _target_image(target, path, work):
    import qcow2fast
    if target == "check":
        from qcow2fast.fsck.check import check_image
        check_image(path)
        return
    if target == "repair":
        from qcow2fast.cli import main
        main(["check", "-q", "-r", "all", path])
        return
    if target == "convert":
        qcow2fast.convert(path, os.path.join(work, "out.qcow2"), format="qcow2",
                          key_secret=LUKS_SECRET)
        return
    if target == "lifecycle":
        _lifecycle(path)
        return
    if target == "chain":
        _chain(path, work)
        return
    with qcow2fast.open(path, "r", backing=False, untrusted=True, key_secret=LUKS_SECRET) as img:
        if target == "read":
            for pos in range(0, min(img.size, 8 << 20), 1 << 20):
                img.read(pos, min(1 << 20, img.size - pos))
        elif target == "block_status":
            img.block_status(0, min(img.size, 64 << 20))


def _lifecycle(path):
    """Snapshot, resize and amend steps on the image (opened for writing),
    each refused or not on its own: a refusal (Qcow2Error, OSError) ends
    only its step."""
    import qcow2fast
    from qcow2fast import Qcow2Error
    from qcow2fast.ops.amend import amend

    def on_image(step):
        with qcow2fast.open(path, "r+", backing=False, key_secret=LUKS_SECRET) as img:
            step(img)
    steps = [
        lambda: on_image(lambda img: img.create_snapshot("fz")),
        lambda: on_image(lambda img: img.resize(img.size + (1 << 20))),
        lambda: on_image(lambda img: img.apply_snapshot("fz")),
        lambda: on_image(lambda img: img.delete_snapshot("fz")),
        lambda: amend(path, {"compat": "0.10"}, key_secret=LUKS_SECRET),
        lambda: amend(path, {"compat": "1.1", "refcount_bits": 64}, key_secret=LUKS_SECRET),
        lambda: on_image(lambda img: img.resize(max(512, img.size // 2 + 1536), shrink=True)),
        lambda: on_image(lambda img: img.resize(img.size + 137 * 512, preallocation="falloc")),
    ]
    for step in steps:
        try:
            step()
        except (Qcow2Error, OSError):
            pass


def _chain(path, work):
    """Commit into the image (a clean top over it), a safe rebase of the
    image onto a clean base, and the bitmap operations on it; each step
    refused or not on its own.  Nothing is written but the image and the
    clean files made here (never a backing file the image names)."""
    import qcow2fast
    from qcow2fast import Qcow2Error
    from qcow2fast.ops.commit import commit
    from qcow2fast.ops.rebase import rebase
    d = os.path.join(work, f"chain-{os.getpid()}")
    os.mkdir(d)
    top, new_base = os.path.join(d, "top.qcow2"), os.path.join(d, "new-base.qcow2")

    def over_it():
        qcow2fast.create(top, None, backing_file=os.path.abspath(path), backing_format="qcow2",
                         cluster_size=4096)
        with qcow2fast.open(top, "r+", key_secret=LUKS_SECRET) as img:
            img.write(0, b"\x5a" * 12288)
            img.write(img.size - 4096, b"\xa5" * 4096)
        commit(top, key_secret=LUKS_SECRET)

    def rebased():
        qcow2fast.create(new_base, 4 << 20, cluster_size=4096)
        with qcow2fast.open(new_base, "r+") as img:
            img.write(8192, b"\x33" * 20000)
        rebase(path, new_base, backing_fmt="qcow2", key_secret=LUKS_SECRET)

    def bitmaps():
        with qcow2fast.open(path, "r+", backing=False, key_secret=LUKS_SECRET) as img:
            for step in (lambda: img.add_bitmap("fz", granularity=4096),
                         lambda: img.write(0, b"\x01" * 8192),
                         lambda: [img.merge_bitmap(b.name, "fz") for b in img.bitmaps],
                         lambda: img.disable_bitmap("fz"),
                         lambda: img.clear_bitmap("fz"),
                         lambda: img.bitmaps and img.remove_bitmap(img.bitmaps[0].name)):
                try:
                    step()
                except (Qcow2Error, OSError):
                    pass
    try:
        for step in (over_it, rebased, bitmaps):
            try:
                step()
            except (Qcow2Error, OSError):
                pass
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _target_nbd(stream, path):
    from qcow2fast.host.raw import RawImage  # noqa: F401  (the server's imports, early)
    from qcow2fast.nbd.channel import Channel, Disconnected
    from qcow2fast.nbd.export import Export, open_export_image
    from qcow2fast.nbd.handshake import ProtocolError, negotiate
    from qcow2fast.nbd.transmission import Transmission
    img = open_export_image(path, read_only=False, fmt="qcow2")
    bitmaps = []
    try:
        img.add_bitmap(BITMAP_NAME, granularity=4096)
        for k in range(40):
            img.write_zeroes(k * 24576, 4096 * (1 + k % 3))
        bitmaps.append(BITMAP_NAME)
    except Exception:           # noqa: B902 - a v2 or refused image: no bitmap to export
        pass
    a, b = socket.socketpair()
    errors = []

    def serve():
        try:
            chan, export = Channel(a), Export(img, "", None, False, bitmaps=bitmaps)
            session = negotiate(chan, export)
            if session is not None:
                Transmission(chan, export, session).run()
                chan.flush()
        except (Disconnected, ProtocolError, BrokenPipeError, ConnectionResetError):
            pass
        except BaseException as e:          # noqa: B902 - reported as a finding
            errors.append(e)
        finally:
            a.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    b.settimeout(10)

    def drain():
        try:
            while b.recv(1 << 20):
                pass
        except OSError:
            pass
    d = threading.Thread(target=drain, daemon=True)
    d.start()
    # Half the streams arrive in pieces, cut anywhere, a pause between them:
    # requests then come alone (a synchronous client's, the C loop's READs)
    # or split across receives.
    rng = random.Random(zlib.crc32(stream))
    cuts = sorted(rng.randrange(len(stream) + 1) for _ in range(rng.choice((0, 12))))
    try:
        for lo, hi in zip([0, *cuts], [*cuts, len(stream)]):
            b.sendall(stream[lo:hi])
            if hi < len(stream):
                time.sleep(0.0003)
        b.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    t.join()
    d.join()
    b.close()
    img.close()
    if errors:
        raise errors[0]


def _child(target, data, work, status_fd):
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))
    from qcow2fast.spec import luks
    luks.MAX_ITERATIONS = FUZZ_LUKS_ITERATIONS
    luks.MAX_TOTAL_ITERATIONS = FUZZ_LUKS_TOTAL_ITERATIONS
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    res = {"outcome": "ok", "refused": None}
    try:
        if target == "nbd":
            path = os.path.join(work, "nbd.qcow2")
            shutil.copyfile(os.path.join(work, "seed.qcow2"), path)
            _target_nbd(data, path)
        elif target == "names":
            fuzz_names.run(data, work)
        else:
            path = os.path.join(work, "in.qcow2")
            with open(path, "wb") as f:
                f.write(data)
            _target_image(target, path, work)
            if target not in WRITING:
                with open(path, "rb") as f:
                    if f.read() != data:
                        res = {"outcome": "modified", "error": "a read-only target wrote"}
    except MemoryError:
        res = {"outcome": "memory", "error": traceback.format_exc()}
    except BaseException as e:              # noqa: B902
        from qcow2fast import Qcow2Error
        if not isinstance(e, (Qcow2Error, OSError)):
            res = {"outcome": "exception", "error": traceback.format_exc()}
        else:
            res["refused"] = type(e).__name__
    os.write(status_fd, json.dumps(res).encode())
    os._exit(0)


def run_one(target, data, work, timeout=20):
    """Run one input in a forked child; returns a result dict whose
    ``outcome`` is "ok" or names the finding."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            _child(target, data, work, w)
        except BaseException:           # noqa: B902 - the harness itself failed: say how
            os.write(w, json.dumps({"outcome": "harness",
                                    "error": traceback.format_exc()}).encode())
        finally:
            os._exit(3)
    os.close(w)
    out, status, hung = b"", None, False
    import select
    deadline_left = timeout
    while True:
        ready, _, _ = select.select([r], [], [], deadline_left)
        if not ready:
            hung = True
            os.kill(pid, signal.SIGKILL)
            break
        chunk = os.read(r, 65536)
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    os.close(r)
    if hung:
        return {"outcome": "hang", "error": f"no answer within {timeout} s"}
    if os.WIFSIGNALED(status):
        return {"outcome": "signal", "error": f"killed by signal {os.WTERMSIG(status)}"}
    try:
        return json.loads(out)
    except ValueError:
        return {"outcome": "crash", "error": f"child exit {status}, output {out[:200]!r}"}


class Fuzzer:
    """Seeded mutation fuzzing of one target over ``seeds`` (image paths)."""

    def __init__(self, target, seeds, work, seed=0):
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}")
        self.target, self.work, self.rng = target, work, random.Random(seed)
        self.seeds = [open(p, "rb").read() for p in seeds]
        shutil.copyfile(seeds[0], os.path.join(work, "seed.qcow2"))
        self.executions, self.findings = 0, []
        self.refused = {}           # clear errors by class (the rest ran to the end)

    def next_input(self):
        if self.target == "nbd":
            return mutate_stream(nbd_stream(self.rng), self.rng)
        if self.target == "names":
            return fuzz_names.encode(*fuzz_names.generate(self.rng,
                                                          fuzz_names.files_in(self.work)))
        return mutate_image(self.rng.choice(self.seeds), self.rng)

    def run(self, executions=None, seconds=None, on_finding=None):
        stop = time.monotonic() + seconds if seconds else None
        while (executions is None or self.executions < executions) and \
                (stop is None or time.monotonic() < stop):
            data = self.next_input()
            res = run_one(self.target, data, self.work)
            self.executions += 1
            why = res.get("refused") or "completed"
            self.refused[why] = self.refused.get(why, 0) + 1
            if res["outcome"] != "ok":
                self.findings.append((data, res))
                if on_finding is not None:
                    on_finding(data, res)
        return self.findings


def main(argv):
    """``python -m tests.hardening.fuzzer TARGET EXECUTIONS SEED``: fuzz in
    this (fresh, single-threaded) process -- forking from a process with
    other threads (a test session's) can leave a child stuck on a lock
    one of them held -- and print a JSON summary line."""
    import tempfile
    target, executions, seed = argv[0], int(argv[1]), int(argv[2])
    with tempfile.TemporaryDirectory(prefix="qcow2fast-fuzz-") as d:
        f = Fuzzer(target, make_seeds(d), d, seed)
        f.run(executions)
        print(json.dumps({"executions": f.executions, "outcomes": f.refused,
                          "findings": [r for _, r in f.findings[:3]],
                          "nfindings": len(f.findings)}))


if __name__ == "__main__":
    main(sys.argv[1:])
