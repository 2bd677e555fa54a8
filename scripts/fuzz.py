#!/usr/bin/env python3
"""Long fuzzing runs of qcow2fast (the quick seeded set is in
tests/hardening/test_fuzz.py).

    scripts/fuzz.py --target read --seconds 600 --seed 1 [--out findings/]
    scripts/fuzz.py --target check --engine atheris --seconds 600

Targets: open, read, block_status, check, repair (check -r all on a copy),
convert, lifecycle (snapshots, resize, amend), chain (commit into the image,
a safe rebase of it, its bitmaps), nbd (the server's handshake and request parser fed mutated client
streams), names (json:, --image-opts and blkdebug: names through info, map and compare).  The default engine mutates qemu-made images structure by
structure (tests/hardening/fuzzer.py) and runs each input in a forked child
under RLIMIT_AS=1G with a timeout; ``--engine atheris`` (pip install
atheris) drives the same mutator with coverage feedback from the Python
code, in process.  Findings are written to --out as the input plus a
.txt with the error; the summary line gives executions and findings.
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.hardening import fuzzer  # noqa: E402


def save(out, n, data, res):
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, f"finding-{n:04d}-{res['outcome']}")
    with open(base + ".bin", "wb") as f:
        f.write(data)
    with open(base + ".txt", "w") as f:
        f.write(res.get("error", "") + "\n")
    print(f"finding {n}: {res['outcome']}: {base}.bin", flush=True)


def run_mutator(args, work, seeds):
    fz = fuzzer.Fuzzer(args.target, seeds, work, args.seed)
    count = [0]

    def found(data, res):
        count[0] += 1
        if args.out:
            save(args.out, count[0], data, res)
        else:
            print(res["outcome"], res.get("error", "")[-800:], flush=True)
    t = time.monotonic()
    fz.run(executions=args.executions, seconds=args.seconds, on_finding=found)
    dt = time.monotonic() - t
    print(f"target {args.target} seed {args.seed}: {fz.executions} executions in {dt:.0f} s, "
          f"{len(fz.findings)} findings; outcomes {fz.refused}")
    return 1 if fz.findings else 0


def run_atheris(args, work, seeds):
    import random

    import atheris
    with atheris.instrument_imports():
        import qcow2fast  # noqa: F401
        from qcow2fast.fsck import check  # noqa: F401
    from qcow2fast import Qcow2Error
    seed_data = [open(p, "rb").read() for p in seeds]
    path = os.path.join(work, "in.qcow2")

    def mutator(data, max_size, seed):
        rng = random.Random(seed)
        base = data if len(data) > 512 and rng.random() < 0.8 else rng.choice(seed_data)
        return fuzzer.mutate_image(base, rng)[:max(max_size, 512)]

    def one(data):
        with open(path, "wb") as f:
            f.write(data)
        try:
            fuzzer._target_image(args.target, path, work)
        except (Qcow2Error, OSError):
            pass
    if args.target in ("nbd", "names"):
        raise SystemExit("the atheris engine runs image targets; nbd and names use the mutator "
                         "engine")
    argv = [sys.argv[0], f"-max_total_time={args.seconds or 60}", "-rss_limit_mb=1024",
            "-timeout=20", f"-seed={args.seed}", f"-max_len={8 << 20}"]
    atheris.Setup(argv, one, custom_mutator=mutator)
    atheris.Fuzz()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", choices=fuzzer.TARGETS, required=True)
    p.add_argument("--seconds", type=float)
    p.add_argument("--executions", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", choices=("mutator", "atheris"), default="mutator")
    p.add_argument("--out", help="directory for the inputs that found something")
    args = p.parse_args()
    if not args.seconds and not args.executions:
        args.seconds = 60
    with tempfile.TemporaryDirectory(prefix="qcow2fast-fuzz-") as work:
        seeds = fuzzer.make_seeds(work)
        if args.engine == "atheris":
            return run_atheris(args, work, seeds)
        return run_mutator(args, work, seeds)


if __name__ == "__main__":
    sys.exit(main())
