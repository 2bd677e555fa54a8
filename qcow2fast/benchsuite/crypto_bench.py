"""Encrypted images (LUKS, aes-256-xts-plain64) beside qemu-img, in one run.

    python -m benchmarks.crypto_bench [--quick] [--runs N] [--json OUT]

Figures, each the median over runs, qemu-img and qcow2fast alternating:

- convert raw -> LUKS qcow2 (``-o encrypt.format=luks,...``) and back
  (``--image-opts ...,encrypt.key-secret=ID -O raw``), MB/s of guest data;
- 4 KiB reads and 4 KiB overwrites at queue depth 1 of a page-cached,
  fully allocated encrypted image, IOPS: ``qcow2fast bench --object
  secret,... --image-opts`` against qemu's own driver.  qemu-img 7.2's
  bench takes no ``--object`` (so it cannot open an encrypted image):
  qemu's side is qemu-io given N and 2N ``-c "read -q ..."``/``write -q``
  commands (N at most 10000: argument space) at consecutive 4 KiB offsets,
  IOPS = N / (t(2N) - t(N)) (start-up and key unlocking cancel out; each
  command still costs qemu-io's parsing, so qemu's figure is a low bound);

and the machine's limit, ``openssl speed -evp aes-256-xts`` at 512-byte
blocks.  Both outputs of each convert are checked (``qemu-img compare``).
"""

import json
import shutil
import re
import statistics
import sys
import time

from .common import MiB, bench_parser, choose_tmpdir, log, qcow2fast_command, run

PW = "bench-passphrase"
ITER = "encrypt.iter-time=10"
QEMU_IO_MAX = 10000     # qemu-io commands per run (command-line arguments)


def obj():
    return ["--object", f"secret,id=s0,data={PW}"]


def opts(path):
    return f"driver=qcow2,file.filename={path},encrypt.key-secret=s0"


def timed(cmd):
    """Seconds ``cmd`` takes; qemu-img 7.2 sometimes fails to time PBKDF2
    ("Unable to get accurate CPU usage", about one run in four): such a run
    is repeated."""
    for _ in range(50):
        t = time.perf_counter()
        p = run(cmd, check=False)
        dt = time.perf_counter() - t
        if p.returncode == 0:
            return dt
        if "accurate CPU usage" not in p.stderr:
            break
    run(cmd)            # raises with the output
    return dt


def bench_iops(cmd):
    """IOPS from the 'Run completed in X seconds.' line both tools print."""
    p = run(cmd)
    m = re.search(r"Run completed in ([0-9.]+) seconds", p.stdout + p.stderr)
    count = int(cmd[cmd.index("-c") + 1])
    return count / float(m.group(1))


def openssl_limit():
    p = run(["openssl", "speed", "-evp", "aes-256-xts", "-bytes", "512", "-seconds", "2"],
            check=False)
    m = re.search(r"AES-256-XTS\s+([0-9.]+)k", p.stdout)
    return float(m.group(1)) * 1000 / 1e6 if m else None


def main(argv=None):
    p = bench_parser("crypto_bench", __doc__, "a 64 MiB image, 3 runs")
    a = p.parse_args(argv)
    size = 64 * MiB if a.quick else 512 * MiB
    runs = a.runs or (3 if a.quick else 5)
    count = 20000 if a.quick else 100000
    qemu = a.qemu_img
    qf = qcow2fast_command()
    tmp, _ = choose_tmpdir(a.tmpdir, 6 * size, prefix="qcow2fast-crypto-bench-")
    try:
        return _run(a, qemu, qf, tmp, size, runs, count)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _run(a, qemu, qf, tmp, size, runs, count):
    raw = f"{tmp}/src.raw"
    with open(raw, "wb") as f:                       # incompressible, fully allocated
        block = bytes(range(256)) * (MiB // 256)
        for i in range(size // MiB):
            f.write(block[i % 256:] + block[:i % 256])
    enc_opts = f"encrypt.format=luks,encrypt.key-secret=s0,{ITER}"
    results = {}

    def side_by_side(name, make, unit, per):
        samples = {"qemu-img": [], "qcow2fast": []}
        for _ in range(runs):
            for tool, base in (("qemu-img", [qemu]), ("qcow2fast", qf)):
                samples[tool].append(make(tool, base))
        q, f = (statistics.median(samples[t]) for t in ("qemu-img", "qcow2fast"))
        qv, fv = per(q), per(f)
        results[name] = {"unit": unit, "qemu-img": qv, "qcow2fast": fv, "ratio": fv / qv,
                         "samples": samples}
        log(f"{name:24} qemu-img {qv:10.1f} {unit:6} qcow2fast {fv:10.1f} {unit:6} "
            f"ratio {fv / qv:5.2f}")

    outs = {}

    def convert_in(tool, base):
        out = f"{tmp}/enc-{tool}.qcow2"
        run(["rm", "-f", out])
        outs[tool] = out
        return timed([*base, "convert", *obj(), "-O", "qcow2", "-o", enc_opts, raw, out])

    side_by_side("convert raw->luks", convert_in, "MB/s", lambda t: size / t / 1e6)
    for out in outs.values():
        run([qemu, "compare", *obj(), "--image-opts",
             f"driver=raw,file.filename={raw}", opts(out)])

    def convert_out(tool, base):
        out = f"{tmp}/back-{tool}.raw"
        run(["rm", "-f", out])
        t = timed([*base, "convert", *obj(), "-O", "raw", "--image-opts",
                   opts(outs["qemu-img"]), out])
        run(["cmp", "-s", raw, out])
        return t

    side_by_side("convert luks->raw", convert_out, "MB/s", lambda t: size / t / 1e6)

    img = outs["qemu-img"]
    with open(img, "rb") as f:              # page-cached
        while f.read(8 * MiB):
            pass

    def qemu_io_iops(op):
        n = min(count, QEMU_IO_MAX)         # 2n -c arguments must fit in ARG_MAX

        def run_n(k):
            cmds = []
            for i in range(k):
                cmds += ["-c", f"{op} -q {i * 4096 % size} 4k"]
            return timed(["qemu-io", *obj(), "--image-opts", opts(img), "-t", "writeback",
                          *cmds])
        return n / max(run_n(2 * n) - run_n(n), 1e-9)

    def reads(tool, base):
        if tool == "qemu-img":
            return qemu_io_iops("read")
        return bench_iops([*base, "bench", *obj(), "--image-opts", opts(img),
                           "-c", str(count), "-d", "1", "-s", "4096", "-S", "4096"])

    def writes(tool, base):
        if tool == "qemu-img":
            return qemu_io_iops("write")
        return bench_iops([*base, "bench", *obj(), "--image-opts", opts(img), "-w",
                           "-c", str(count), "-d", "1", "-s", "4096", "-S", "4096"])

    side_by_side("4k reads QD1", reads, "IOPS", lambda v: v)
    side_by_side("4k overwrites QD1", writes, "IOPS", lambda v: v)
    limit = openssl_limit()
    if limit:
        log(f"openssl speed -evp aes-256-xts (512-byte blocks): {limit:.0f} MB/s")
    results["openssl aes-256-xts MB/s"] = limit
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
