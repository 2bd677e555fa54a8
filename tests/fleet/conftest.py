"""A fleet of small images: qemu-made qcow2 (and raw) sources with data in
a few places, one of them malformed."""

import os
import random

import pytest

from tests.helpers.qemu_util import MiB, patch, qemu_img, qemu_io

N_IMAGES = 20
BAD = 6                 # the malformed one: its L1 table offset is not aligned
L1_TABLE_OFFSET = 40    # the header field's offset (qcow2.txt)

# What the destinations are made with (convert's keyword arguments), in turn.
VARIANTS = [{}, {"compress": True}, {"options": {"cluster_size": 4096}},
            {"compress": True, "options": {"compression_type": "zstd"}},
            {"format": "raw"}]


class Fleet:
    def __init__(self, root):
        self.root = root
        self.sources, self.jobs = [], []
        rng = random.Random(24)
        for i in range(N_IMAGES):
            fmt = "raw" if i % 4 == 3 else "qcow2"
            src = str(root / f"src{i}.{fmt}")
            qemu_img("create", "-q", "-f", fmt, src, f"{2 + i % 3}M")
            cmds = [f"write -P {1 + (i + k) % 250} {rng.randrange(0, 64) * 16384} {16384 * (1 + k)}"
                    for k in range(3)]
            qemu_io(src, *cmds, fmt=fmt)
            if i == BAD:
                assert fmt == "qcow2"
                patch(src, L1_TABLE_OFFSET, ">Q", 0x30007)
            variant = dict(VARIANTS[i % len(VARIANTS)])
            dest = str(root / f"dst{i}.{variant.get('format', 'qcow2')}")
            self.sources.append((src, fmt))
            self.jobs.append({"source": src, "destination": dest, **variant})

    def destination(self, i):
        return self.jobs[i]["destination"]

    def assert_converted(self, records, skip=(BAD,)):
        """Every good job's record is ok and its image equals its source
        (qemu-img compare), qcow2 outputs checking clean in qemu-img."""
        for i, (job, rec) in enumerate(zip(self.jobs, records)):
            if i in skip:
                continue
            assert rec.ok and rec.status == "ok" and rec.error is None, rec
            assert rec.bytes == os.path.getsize(job["destination"]) > 0, rec
            assert rec.source_bytes == os.path.getsize(job["source"]), rec
            assert rec.worker and rec.seconds > 0, rec
            src, src_fmt = self.sources[i]
            fmt = job.get("format", "qcow2")
            if fmt == "qcow2":
                p = qemu_img("check", "-q", job["destination"], check=False)
                assert p.returncode == 0, (job, p.stderr_text)
            p = qemu_img("compare", "-q", "-f", src_fmt, "-F", fmt, src, job["destination"],
                         check=False)
            assert p.returncode == 0, (job, p.stdout_text, p.stderr_text)

    def assert_bad(self, rec):
        """The malformed image's record: failed, with the field and offset
        in its error, no destination left behind."""
        assert rec.status == "failed" and not rec.ok and rec.exit_status == 1, rec
        assert "l1_table_offset" in rec.error and "0x28" in rec.error, rec.error
        assert rec.source == self.jobs[BAD]["source"]
        assert not os.path.exists(self.destination(BAD))
        assert rec.bytes is None


@pytest.fixture
def fleet(tmp_path):
    return Fleet(tmp_path)
