#!/usr/bin/env python3
"""Long runs of the hypothesis state machines (the suite runs 25-40
examples of each): random writes, zeroes, discards, reopens, qemu-io
sessions, snapshots, resize and amend against a bytearray model, with
qemu-img check and qemu reading every image at the end of each example.

    scripts/hunt.py [--minutes 60] [--examples 300] [--seed N] [--out DIR]

Each round runs the state-machine tests once with QCOW2FAST_EXAMPLES set
and a new seed (``--hypothesis-seed``, printed: the round can be rerun);
hypothesis first replays the examples it keeps in the repository's
``.hypothesis``, which the suite's own runs on this machine share.  Rounds go on until the
minutes are spent (a round that started is finished).  Per round: the
seed, the examples run by each machine (the tests log them through
QCOW2FAST_HUNT_LOG), the outcome.  A
failing round's pytest output (the falsifying steps and the blob that
replays them) goes to ``--out``; the script then stops and exits 1.

Two real bugs were found this way (data loss in ``amend -o compat=0.10``
over a shared zero cluster, and a VM-state one): run it after changes to
the allocating write, snapshots, resize or amend.
"""

import argparse
import collections
import os
import random
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MACHINES = [
    "tests/api/test_properties.py::test_random_operation_sequences",
    "tests/api/test_properties.py::test_random_operation_sequences_extended_l2",
    "tests/api/test_compressed_write.py::test_random_sequences_with_compressed_writes",
]


def run_round(seed, examples, tests, out):
    """(passed, Counter of examples run per machine, seconds) of one pytest
    run of ``tests``."""
    fd, log = tempfile.mkstemp(prefix="qcow2fast-hunt-", suffix=".log")
    os.close(fd)
    # (the machines append their name to QCOW2FAST_HUNT_LOG for each example)
    env = dict(os.environ, QCOW2FAST_EXAMPLES=str(examples), QCOW2FAST_HUNT_LOG=log)
    env.pop("CI", None)             # CI derandomizes hypothesis: a hunt wants new examples
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    if seed is not None:
        cmd.append(f"--hypothesis-seed={seed}")
    t = time.time()
    p = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    elapsed = time.time() - t
    with open(log) as f:
        counts = collections.Counter(f.read().split())
    os.unlink(log)
    if p.returncode != 0:
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, f"hunt-seed-{seed}.txt")
        with open(path, "w") as f:
            f.write(" ".join(cmd) + "\n\n" + p.stdout)
        print(f"  FAILED: pytest exited {p.returncode}; its output: {path}", flush=True)
    return p.returncode == 0, counts, elapsed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=60, help="start no round after this")
    ap.add_argument("--examples", type=int, default=300,
                    help="examples per machine per round (QCOW2FAST_EXAMPLES)")
    ap.add_argument("--seed", type=int, help="the first new round's seed (default: random)")
    ap.add_argument("--out", default="hunt-findings", help="where failing rounds' output goes")
    ap.add_argument("tests", nargs="*", default=MACHINES,
                    help="pytest ids of the state-machine tests (default: all of them)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    stop = time.time() + 60 * args.minutes
    totals = collections.Counter()
    rounds, ok = 0, True
    while ok and time.time() < stop:
        seed = args.seed + rounds if args.seed is not None else rng.randrange(2 ** 32)
        ok, counts, elapsed = run_round(seed, args.examples, args.tests, args.out)
        rounds += 1
        totals.update(counts)
        print(f"round {rounds} seed {seed}: {'passed' if ok else 'FAILED'} in {elapsed:.0f}s "
              f"({_ran(counts)})", flush=True)
    print(f"{rounds} rounds, {sum(totals.values())} examples run ({_ran(totals)}): "
          f"{'no failure' if ok else 'a failure, see above'}")
    return 0 if ok else 1


def _ran(counts):
    """'Machine examples, ...' (the database's replayed ones included)."""
    return ", ".join(f"{m} {n}" for m, n in sorted(counts.items()))


if __name__ == "__main__":
    sys.exit(main())
