"""convert_many / check_many on a Dask LocalCluster (2 worker processes)
and on the default local process pool, and ``qcow2fast fleet`` with JSON
and CSV manifests: 20 small images, one malformed, whose error is in its
record while the others convert; qemu-img check and compare are the
oracle for every output."""

import csv
import json
import logging
import os
import subprocess
import sys

import pytest
from dask.distributed import Client, LocalCluster

from qcow2fast.fleet import ConvertJob, check_many, convert_many
from qcow2fast.spec.constants import QCOW_OFLAG_COPIED
from tests.fleet.conftest import BAD, N_IMAGES
from tests.helpers.cli_util import run_cli
from tests.helpers.qemu_util import (l2_entry_offset, patch, qemu_check, qemu_img, qemu_map,
                                      read_at)

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def dask_client():
    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1,
                      dashboard_address=":0", silence_logs=logging.ERROR) as cluster, \
            Client(cluster) as client:
        yield client


def _pid(record):
    return int(record.worker.rsplit(":", 1)[1])


def _qcow2_outputs(fleet):
    return [fleet.destination(i) for i, job in enumerate(fleet.jobs)
            if i != BAD and job.get("format", "qcow2") == "qcow2"]


def _assert_checks_as_qemu(records, paths):
    for rec, path in zip(records, paths):
        q = qemu_check(path)
        assert rec.status == "clean" and rec.exit_status == q.pop("exit_code") == 0, rec
        q["filename"] = rec.check["filename"]
        assert rec.check == q


def _rows(out):
    """The summary table's rows: {status: images}."""
    lines = out.splitlines()
    end = next(i for i, line in enumerate(lines) if line.startswith("total"))
    return {line.split()[0]: int(line.split()[1]) for line in lines[1:end + 1]}


def test_dask_cluster_converts_and_checks(fleet, dask_client, capsys):
    workers = set(dask_client.run(os.getpid).values())
    assert len(workers) == 2
    executor = dask_client.get_executor()
    seen = []
    records = convert_many(fleet.jobs, executor, progress=seen.append)
    assert len(records) == len(seen) == N_IMAGES
    assert {id(r) for r in seen} == {id(r) for r in records}
    fleet.assert_converted(records)
    fleet.assert_bad(records[BAD])
    assert {_pid(r) for r in records} <= workers          # run by the cluster's processes

    paths = _qcow2_outputs(fleet)
    bad_source = fleet.jobs[BAD]["source"]
    checks = check_many(paths + [bad_source], executor)
    _assert_checks_as_qemu(checks[:-1], paths)
    bad = checks[-1]
    q = qemu_img("check", bad_source, check=False)
    assert bad.status == "failed" and bad.exit_status == q.returncode == 1
    assert "l1_table_offset" in bad.error and bad.check is None

    # The CLI on the same cluster: its scheduler's address, a CSV manifest.
    manifest = fleet.root / "check.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path"])
        w.writerows([p] for p in paths)
    status, out, err = run_cli(capsys, "fleet", "check", "--scheduler",
                               dask_client.scheduler.address, "--manifest", manifest)
    assert status == 0, err
    assert _rows(out) == {"clean": len(paths), "total": len(paths)}, out


def test_local_process_pool_is_the_default(fleet):
    jobs = [ConvertJob(j["source"], j["destination"],
                       {k: v for k, v in j.items() if k not in ("source", "destination")})
            for j in fleet.jobs[:BAD + 1]]
    records = convert_many(jobs)
    assert os.getpid() not in {_pid(r) for r in records}
    fleet.assert_converted(records)
    fleet.assert_bad(records[BAD])

    # A leaked cluster in one output: check reports it, -r leaks repairs it.
    leaky = _qcow2_outputs(fleet)[0]
    data = next(x for x in qemu_map(leaky) if x["data"] and "offset" in x)
    e = l2_entry_offset(leaky, data["start"])
    (entry,) = read_at(leaky, e, ">Q")
    assert entry & QCOW_OFLAG_COPIED
    patch(leaky, e, ">Q", 0)                  # the cluster is no longer referenced
    q = qemu_check(leaky, expect_clean=False)
    (rec,) = check_many([leaky])
    assert rec.status == "leaks" and rec.exit_status == q["exit_code"] == 3
    assert rec.check["leaks"] == q["leaks"] >= 1
    (rec,) = check_many([leaky], repair="leaks")
    assert rec.status == "clean" and rec.check["leaks-fixed"] == q["leaks"], rec
    qemu_check(leaky)


def test_cli_json_manifest(fleet, capsys):
    jobs = []
    for job in fleet.jobs:              # options as qemu-img's -o text
        job = dict(job)
        if "options" in job:
            job["options"] = ",".join(f"{k}={v}" for k, v in job["options"].items())
        jobs.append(job)
    manifest = fleet.root / "jobs.json"
    manifest.write_text(json.dumps({"jobs": jobs}))
    records = fleet.root / "records.json"
    status, out, err = run_cli(capsys, "fleet", "convert", "-j", "2", "-p",
                               "--manifest", manifest, "--json", records)
    assert status == 1                   # one image failed
    assert _rows(out) == {"ok": N_IMAGES - 1, "failed": 1, "total": N_IMAGES}, out
    bad = fleet.jobs[BAD]
    assert f"failed: {bad['source']} -> {bad['destination']}: l1_table_offset" in out
    assert f"{N_IMAGES}/{N_IMAGES}" in err            # the progress bar, drawn with -p
    saved = json.loads(records.read_text())
    assert [r["path"] for r in saved] == [j["destination"] for j in fleet.jobs]
    assert saved[BAD]["status"] == "failed" and "l1_table_offset" in saved[BAD]["error"]
    fleet.assert_converted([_Saved(r) for r in saved])


class _Saved:
    """A record read back from --json."""

    def __init__(self, d):
        self.__dict__.update(d)
        self.ok = d["exit_status"] == 0


@pytest.mark.parametrize("text, message", [
    ('[{"source": "a", "destination": "b", "colour": 1}]', "job 1: unknown key 'colour'"),
    ('[{"destination": "b"}]', "job 1"),
    ('{"nope": 1}', "expected a list of jobs"),
    ('[{"source": "a", "destination": "b", "compress": "maybe"}]', "compress"),
])
def test_cli_manifest_errors(tmp_path, capsys, text, message):
    manifest = tmp_path / "m.json"
    manifest.write_text(text)
    status, out, err = run_cli(capsys, "fleet", "convert", "--manifest", manifest)
    assert status == 1 and message in err and str(manifest) in err, err


def test_dask_missing_names_the_extra(tmp_path):
    manifest = tmp_path / "m.json"
    manifest.write_text("[]")
    code = ("import sys; sys.modules['dask'] = None\n"
            "from qcow2fast.cli import main\n"
            f"sys.exit(main(['fleet', 'check', '--scheduler', 'tcp://127.0.0.1:9',"
            f" '--manifest', {str(manifest)!r}]))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 1 and "pip install 'qcow2fast[dask]'" in p.stderr, p.stderr


def test_threads_per_job_share_the_cpus(monkeypatch, tmp_path):
    """A job that does not say how many threads gets the CPUs' share of a
    local pool's worker (not a thread per CPU in every worker), 1 on any
    other executor; a job that says keeps its own."""
    import concurrent.futures
    import qcow2fast.fleet as fleet
    cpus = os.cpu_count()
    seen = []
    monkeypatch.setattr(fleet, "run_convert", lambda job: seen.append(job.options) or
                        fleet.Record("convert", job.destination, "ok", 0))
    jobs = [ConvertJob("a.raw", tmp_path / "a.qcow2"),
            ConvertJob("b.raw", tmp_path / "b.qcow2", {"threads": 3})]
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        assert all(r.ok for r in convert_many(jobs, ex))
    assert sorted(o["threads"] for o in seen) == [1, 3]
    with concurrent.futures.ProcessPoolExecutor(2) as pool:
        assert fleet._threads_per_job(pool) == max(1, cpus // 2)
    with concurrent.futures.ProcessPoolExecutor(1) as pool:
        assert fleet._threads_per_job(pool) == cpus
