"""Property test: random op sequences against a bytearray model.

A hypothesis state machine picks a random geometry (cluster_bits 9..16,
refcount_bits 1..64, compat 0.10/1.1, optionally a small backing file with
random content, qcow2 or raw), then runs random write / write_zeroes /
discard / flush / close+reopen steps -- and, in between, sessions of qemu-io
writing the same image and internal snapshots taken/deleted with qemu-img --
comparing reads with the model.  Snapshot contents must never change.  At the end of each
example qemu-img check must be clean and qemu must read the model.
"""

import os

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, precondition, rule,
                                 run_state_machine_as_test)

import qcow2fast
from qcow2fast.errors import LimitExceededError
from tests.helpers.model import ModelImage
from tests.helpers.qemu_util import (IN_CI, Rng, assert_bytes_equal, qemu_check, qemu_img, qemu_io,
                                     qemu_raw)

pytestmark = pytest.mark.qemu

# QCOW2FAST_EXAMPLES raises the count for a long bug hunt (the suite keeps 40).
SETTINGS = settings(
    max_examples=int(os.environ.get("QCOW2FAST_EXAMPLES", "40")),
    stateful_step_count=50,
    deadline=None,
    derandomize=IN_CI,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)
# scripts/hunt.py counts the examples run: one line per example (the machine's name).
HUNT_LOG = os.environ.get("QCOW2FAST_HUNT_LOG")


class Qcow2Machine(RuleBasedStateMachine):
    workdir = None
    counter = 0
    extended_l2 = False         # ExtendedL2Machine: subclusters (v3, clusters >= 16 KiB)

    def __init__(self):
        super().__init__()
        self.img = None
        self.m = None
        self.path = None
        if HUNT_LOG:
            with open(HUNT_LOG, "a") as f:
                f.write(type(self).__name__ + "\n")

    # ------------------------------------------------------------ set-up
    @initialize(cluster_bits=st.integers(9, 16),
                refcount_order=st.integers(0, 6),
                v2=st.booleans(),
                lazy=st.booleans(),
                sectors=st.integers(1, 4096),
                backing=st.sampled_from([None, None, "qcow2", "raw"]),
                backing_sectors=st.integers(1, 4096),
                seed=st.integers(0, 2 ** 32 - 1))
    def setup(self, cluster_bits, refcount_order, v2, lazy, sectors, backing,
              backing_sectors, seed):
        Qcow2Machine.counter += 1
        d = os.path.join(self.workdir, f"ex{Qcow2Machine.counter}")
        os.mkdir(d)
        if self.extended_l2:
            cluster_bits, v2 = 14 + cluster_bits % 4, False    # 16 KiB .. 128 KiB
        cs = 1 << cluster_bits
        compat = "0.10" if v2 else "1.1"
        rb = 16 if v2 else 1 << refcount_order
        size = sectors * 512
        self.rng = Rng(seed)
        initial = bytearray(size)
        self.backing_path = None
        self.backing_content = None
        kw = dict(cluster_size=cs, refcount_bits=rb, compat=compat,
                  extended_l2=self.extended_l2)
        if lazy and not v2:
            kw["lazy_refcounts"] = True
        if backing:
            bsize = backing_sectors * 512
            content = bytearray(bsize)
            for _ in range(4):
                off, n = self.rng.span(bsize, bsize // 2 + 1)
                content[off:off + n] = self.rng.randbytes(n)
            content = bytes(content)
            if backing == "raw":
                bp = os.path.join(d, "base.raw")
                with open(bp, "wb") as f:
                    f.write(content)
            else:
                bp = os.path.join(d, "base.qcow2")
                qcow2fast.create(bp, bsize, cluster_size=512 << self.rng.randrange(0, 8),
                                 compat=compat)
                with qcow2fast.open(bp, "r+") as b:
                    b.write(0, content)
            self.backing_path, self.backing_fmt = bp, backing
            self.backing_content = content
            kw.update(backing_file=bp, backing_format=backing)
            n = min(size, bsize)
            initial[:n] = content[:n]
        self.path = os.path.join(d, "img.qcow2")
        self.desc = f"{self.path}: cs={cs} rb={rb} compat={compat} size={size} {kw}"
        qcow2fast.create(self.path, size, **kw)
        self.img = qcow2fast.open(self.path, "r+")
        self.m = ModelImage(self.img, bytes(initial),
                            bytes(initial) if backing else None)
        self.cs = cs
        self.rb = rb
        self.snapshots = {}
        self.snap_counter = 0

    # ------------------------------------------------------------ helpers
    def _span(self, data, max_clusters=3):
        size = self.m.size
        aligned = data.draw(st.booleans())
        if aligned:
            unit = self.cs
            if self.extended_l2:        # a cluster or a subcluster boundary
                unit = data.draw(st.sampled_from([self.cs, self.cs // 32]))
            c = data.draw(st.integers(0, max(0, (size - 1) // unit)))
            off = c * unit
        else:
            off = data.draw(st.integers(0, size - 1))
        length = data.draw(st.one_of(
            st.integers(1, 1024),
            st.integers(1, max_clusters * self.cs + 1024),
            st.sampled_from([self.cs, 2 * self.cs, 512])))
        return off, max(1, min(length, size - off))

    # ------------------------------------------------------------ rules
    @precondition(lambda self: self.img is not None)
    @rule(data=st.data())
    def write(self, data):
        off, n = self._span(data)
        kind = data.draw(st.sampled_from(["random", "pattern", "zeros"]))
        if kind == "random":
            b = self.rng.randbytes(n)
        elif kind == "pattern":
            b = bytes([data.draw(st.integers(0, 255))]) * n
        else:
            b = bytes(n)                         # explicit zero data
        self.m.write(off, b)

    @precondition(lambda self: self.img is not None)
    @rule(data=st.data(), may_unmap=st.booleans())
    def write_zeroes(self, data, may_unmap):
        off, n = self._span(data)
        self.m.write_zeroes(off, n, may_unmap=may_unmap)

    @precondition(lambda self: self.img is not None)
    @rule(data=st.data())
    def discard(self, data):
        off, n = self._span(data)
        self.m.discard(off, n)

    @precondition(lambda self: self.img is not None)
    @rule()
    def flush(self):
        self.m.flush()

    @precondition(lambda self: self.img is not None)
    @rule(data=st.data())
    def read(self, data):
        off, n = self._span(data, max_clusters=8)
        self.m.check_read(off, n)

    @precondition(lambda self: self.img is not None)
    @rule(small_cache=st.booleans())
    def reopen(self, small_cache):
        self.img.close()
        kw = {}
        if small_cache:
            kw = dict(l2_cache_size=2 * self.cs, refcount_cache_size=4 * self.cs)
        self.img = qcow2fast.open(self.path, "r+", **kw)
        self.m.img = self.img
        self.m.check_all()

    @precondition(lambda self: self.img is not None)
    @rule(data=st.data())
    def qemu_session(self, data):
        """Close, let qemu-io write the same image, reopen."""
        self.img.close()
        cmds = []
        for _ in range(data.draw(st.integers(1, 3))):
            off, n = self._span(data)
            if data.draw(st.booleans()):
                pat = data.draw(st.integers(0, 255))
                cmds.append(f"write -q -P {pat} {off} {n}")
                self.m.data[off:off + n] = bytes([pat]) * n
            else:
                cmds.append(f"write -q -z {off} {n}")
                self.m.data[off:off + n] = bytes(n)
            self.m.log.append(("qemu-io", cmds[-1]))
        qemu_io(self.path, *cmds)
        self.img = qcow2fast.open(self.path, "r+")
        self.m.img = self.img
        self.m.check_all()

    @precondition(lambda self: self.img is not None and self.rb >= 2
                  and len(self.snapshots) < min(3, (1 << self.rb) - 2))
    @rule()
    def qemu_snapshot(self):
        """Close, take an internal snapshot with qemu-img, reopen."""
        self.img.close()
        self.snap_counter += 1
        name = f"snap{self.snap_counter}"
        qemu_img("snapshot", "-c", name, self.path)
        self.snapshots[name] = bytes(self.m.data)
        self.m.log.append(("qemu-img snapshot -c", name))
        self.img = qcow2fast.open(self.path, "r+")
        self.m.img = self.img

    @precondition(lambda self: self.img is not None and self.snapshots)
    @rule(data=st.data())
    def qemu_snapshot_delete(self, data):
        self.img.close()
        name = data.draw(st.sampled_from(sorted(self.snapshots)))
        qemu_img("snapshot", "-d", name, self.path)
        del self.snapshots[name]
        self.m.log.append(("qemu-img snapshot -d", name))
        self.img = qcow2fast.open(self.path, "r+")
        self.m.img = self.img
        self.m.check_all()

    # ------------------------------------------------------------ resize and amend
    # (Without snapshots: applying one restores its own size; resizing
    # images with snapshots is covered by tests/interop/test_interop_resize_amend.py.)
    @precondition(lambda self: self.img is not None and not self.snapshots)
    @rule(data=st.data())
    def resize(self, data):
        """Grow or shrink (Image.resize): the new area reads as zeros, but the
        tail of a partial last cluster may keep bytes a shrink left (qemu)."""
        old = self.m.size
        new = data.draw(st.integers(1, max(8, 2 * old // 512))) * 512
        if new < old:
            # Shrinks end on a cluster boundary here: the tail of a partial
            # last cluster keeps old bytes (qemu), which a snapshot taken
            # later would capture; the interop tests cover unaligned shrinks.
            new = min(old, -(-new // self.cs) * self.cs)
        prealloc = data.draw(st.sampled_from(["off", "off", "metadata", "falloc", "full"]))
        prealloc = prealloc if new > old else "off"
        self.m.log.append(("resize", new, prealloc))
        try:
            self.img.resize(new, shrink=True, preallocation=prealloc)
        except qcow2fast.UnsupportedFeatureError:      # v2 over a longer backing file
            assert self.img.version < 3 and self.backing_path
            return
        stale = getattr(self, "stale", {})
        if new < old:
            self.stale = {i: self.m.data[i]
                          for i in range(new, min(old, -(-new // self.cs) * self.cs))}
            self.m.data[new:] = b""
        else:
            got = self.img.read(old, new - old)
            for i, b in enumerate(got):
                assert b in (0, stale.get(old + i, 0)), (old + i, b, self.m.history())
            self.m.data[old:] = got
            self.stale = {}
        if self.backing_content is not None:
            self.m.backing = (self.backing_content + bytes(new))[:new]
        self.m.check_all()

    @precondition(lambda self: self.img is not None)
    @rule(data=st.data())
    def amend(self, data):
        """Close, amend refcount_bits / lazy_refcounts / compat, reopen: the
        disk and every snapshot unchanged (a refused amend changes nothing)."""
        self.img.close()
        key = data.draw(st.sampled_from(["refcount_bits", "lazy_refcounts", "compat"]))
        value = {"refcount_bits": lambda: str(1 << data.draw(st.integers(0, 6))),
                 "lazy_refcounts": lambda: data.draw(st.sampled_from(["on", "off"])),
                 "compat": lambda: data.draw(st.sampled_from(["0.10", "1.1"]))}[key]()
        self.m.log.append(("amend", key, value))
        try:
            qcow2fast.amend(self.path, {key: value})
        except qcow2fast.Qcow2Error as e:
            self.m.log.append(("refused", str(e)))
        self.img = qcow2fast.open(self.path, "r+")
        self.m.img = self.img
        self.rb = self.img.refcount_bits
    # ------------------------------------------------------------ qcow2fast's snapshots
    # Self-contained: the names the qemu-img rules above use are shared
    # (self.snapshots), so either tool's snapshots are applied and deleted
    # by the other.  Applying needs one reference of headroom.
    @precondition(lambda self: self.img is not None and self.rb >= 2
                  and len(self.snapshots) < min(3, (1 << self.rb) - 3))
    @rule(vm_state=st.booleans())
    def qf_snapshot_create(self, vm_state):
        self.snap_counter += 1
        name = f"snap{self.snap_counter}"
        state = self.rng.randbytes(self.rng.randrange(1, 3 * self.cs)) if vm_state else None
        before = [s.name for s in self.img.snapshots]
        try:
            self.img.create_snapshot(name, vm_state=state)
        except LimitExceededError:
            # Compressed clusters sharing a host cluster can overflow a
            # narrow refcount (qemu refuses too): nothing may have changed.
            assert [s.name for s in self.img.snapshots] == before
            self.m.check_all()
            return
        self.snapshots[name] = bytes(self.m.data)
        self.m.log.append(("create_snapshot", name, len(state or b"")))
        if state is not None:
            assert self.img.read_vmstate(name, 0, len(state)) == state

    @precondition(lambda self: self.img is not None and self.snapshots
                  and len(self.snapshots) <= (1 << self.rb) - 3)
    @rule(data=st.data())
    def qf_snapshot_apply(self, data):
        name = data.draw(st.sampled_from(sorted(self.snapshots)))
        try:
            self.img.apply_snapshot(name)
        except LimitExceededError:          # as in qf_snapshot_create
            self.m.check_all()
            return
        self.m.data[:] = self.snapshots[name]
        self.m.log.append(("apply_snapshot", name))
        self.m.check_all()

    @precondition(lambda self: self.img is not None and self.snapshots)
    @rule(data=st.data())
    def qf_snapshot_delete(self, data):
        name = data.draw(st.sampled_from(sorted(self.snapshots)))
        self.img.delete_snapshot(name)
        del self.snapshots[name]
        self.m.log.append(("delete_snapshot", name))
        self.m.check_all()

    # ------------------------------------------------------------ the end
    def teardown(self):
        if self.img is None:
            return
        try:
            self.m.check_all()
        finally:
            self.img.close()
        expected = bytes(self.m.data)
        try:
            qemu_check(self.path)
            assert_bytes_equal(qemu_raw(self.path), expected, "qemu's view")
            for name, content in self.snapshots.items():
                assert_bytes_equal(qemu_raw(self.path, snapshot=name), content,
                                   f"snapshot {name}")
            if self.backing_path:
                assert_bytes_equal(qemu_raw(self.backing_path, fmt=self.backing_fmt),
                                   self.backing_content, "backing file")
            with qcow2fast.open(self.path) as img:
                assert_bytes_equal(img.read(0, img.size), expected, "read after reopen")
        except AssertionError as e:
            raise AssertionError(f"{self.desc}\n{e}\nrecent ops:\n{self.m.history()}") from None


def test_random_operation_sequences(tmp_path):
    Qcow2Machine.workdir = str(tmp_path)
    run_state_machine_as_test(Qcow2Machine, settings=SETTINGS)


class ExtendedL2Machine(Qcow2Machine):
    extended_l2 = True


def test_random_operation_sequences_extended_l2(tmp_path):
    """The same, on images with extended L2 entries (subclusters)."""
    ExtendedL2Machine.workdir = str(tmp_path)
    run_state_machine_as_test(ExtendedL2Machine, settings=SETTINGS)
