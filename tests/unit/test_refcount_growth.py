"""Refcount table growth (engine/refcount.py) against measure (ops/measure.py).

Writing through ``qcow2fast.open(..., "r+")`` to a 512-byte-cluster image
until its refcount table has moved at least twice must leave an image that
qemu-img check finds clean, that reads back what was written, and whose
refcount table and blocks are no fewer than what measure's refcount
function says the clusters of that file need.  qemu-img measure and
qcow2fast measure agree on ``fully-allocated`` for the same options.
(measure's refcount arithmetic alone: test_measure.py.)"""

import json
import os
import struct

import pytest

import qcow2fast
from qcow2fast.ops.measure import measure, refcount_metadata_size
from qcow2fast.spec.geometry import Geometry
from tests.helpers.cli_util import run_cli
from tests.helpers.qemu_util import MiB, header, qemu_check, qemu_img, qemu_io

CS = 512
REFCOUNT_BITS = (1, 2, 4, 8, 16, 32, 64)


def refcount_structures(path):
    """(refcount blocks, refcount table clusters) of the image, read from
    its header and refcount table."""
    h = header(path)
    cs = 1 << h["cluster_bits"]
    with open(path, "rb") as f:
        f.seek(h["refcount_table_offset"])
        raw = f.read(h["refcount_table_clusters"] * cs)
    entries = struct.unpack(f">{len(raw) // 8}Q", raw)
    return sum(1 for e in entries if e), h["refcount_table_clusters"]


def table_location(path):
    h = header(path)
    return h["refcount_table_offset"], h["refcount_table_clusters"]


@pytest.mark.qemu
@pytest.mark.parametrize("rb", REFCOUNT_BITS, ids=[f"rb{b}" for b in REFCOUNT_BITS])
def test_grown_refcount_table_counts_the_whole_file(tmp_path, rng, capsys, rb):
    order = rb.bit_length() - 1
    # One refcount block counts CS*8/rb clusters and one table cluster holds
    # CS/8 blocks: the table created with the image moves once the file
    # passes CS/8 blocks' worth of clusters and again later (it grows by
    # at least one cluster each time).  Write until it has moved twice.
    block_bytes = CS * (CS * 8 // rb)
    expect = 2 * (CS // 8) * block_bytes
    cap = 4 * expect
    size = -(-cap // MiB) * MiB
    chunk = max(64 * 1024, expect // 64 // CS * CS)
    path = str(tmp_path / "grow.qcow2")
    qcow2fast.create(path, size, cluster_size=CS, refcount_bits=rb)
    slots = list(range(0, size, chunk))[:-1]
    rng.shuffle(slots)
    written = []
    locations = [table_location(path)]
    with qcow2fast.open(path, "r+") as img:
        for i, off in enumerate(slots):
            pattern = 1 + i % 255
            img.write(off, bytes([pattern]) * chunk)
            written.append((off, pattern))
            img.flush()
            if table_location(path) != locations[-1]:
                locations.append(table_location(path))
            if len(locations) > 2:
                break
    assert len(locations) > 2, (f"the refcount table moved {len(locations) - 1} time(s) "
                                f"after writing {len(written) * chunk} bytes: {locations}")
    assert [c for _, c in locations] == sorted(c for _, c in locations)

    qemu_check(path)
    qemu_io(path, *(f"read -q -P {p} {off} {chunk}" for off, p in written))

    file_clusters = -(-os.path.getsize(path) // CS)
    blocks, table_clusters = refcount_structures(path)
    counted = file_clusters - blocks - table_clusters          # everything else
    need_blocks, need_table = Geometry(CS.bit_length() - 1, order).refcount_layout(counted)
    assert blocks >= need_blocks, (blocks, need_blocks, file_clusters)
    assert table_clusters >= need_table, (table_clusters, need_table, file_clusters)
    assert (blocks + table_clusters) * CS >= refcount_metadata_size(counted, CS, order)

    # measure: qemu-img, the command line and the API agree, for a new
    # image of the same size and for this image as the source.
    opts = f"cluster_size={CS},refcount_bits={rb}"
    want = json.loads(qemu_img("measure", "--output=json", "-O", "qcow2", "-o", opts,
                               "--size", str(size)).stdout_text)
    status, out, err = run_cli(capsys, "measure", "--output=json", "-O", "qcow2", "-o", opts,
                               "--size", str(size))
    assert status == 0, err
    assert json.loads(out)["fully-allocated"] == want["fully-allocated"]
    assert measure(size=size, cluster_size=CS, refcount_bits=rb)["fully-allocated"] == \
        want["fully-allocated"]
    want = json.loads(qemu_img("measure", "--output=json", "-f", "qcow2", "-O", "qcow2",
                               "-o", opts, path).stdout_text)
    status, out, err = run_cli(capsys, "measure", "--output=json", "-f", "qcow2", "-O", "qcow2",
                               "-o", opts, path)
    assert status == 0, err
    got = json.loads(out)
    assert (got["fully-allocated"], got["required"]) == \
        (want["fully-allocated"], want["required"])
