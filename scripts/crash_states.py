"""The long crash-state run: every configuration of tests/crash/workloads.py,
recorded with several seeds, its crash states checked (tests/crash/harness.py
says how they are made and what is checked).

    python -m scripts.crash_states [--states N] [--seed S] [--seeds K]
                                   [--config NAME ...] [--per-epoch P] [--qemu-repair]

``--states N``: states sampled per recording (default: all of them);
``--seeds K``: recordings per configuration, seeds S..S+K-1;
``--qemu-repair``: dirty states are also repaired by ``qemu-img check -r all``
and must then check clean.  Prints, per configuration, the states planned,
tried and found consistent, and the dirty ones; exits 1 if any state failed
(each failure is printed with the file it was kept in).
"""

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.crash.harness import run_config          # noqa: E402
from tests.crash.workloads import BY_NAME, CONFIGS  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m scripts.crash_states",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--states", type=int, default=None, help="states per recording (default all)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=1, help="recordings per configuration")
    ap.add_argument("--config", action="append", choices=sorted(BY_NAME), default=None)
    ap.add_argument("--per-epoch", type=int, default=3,
                    help="random states between two barriers (the last applies all)")
    ap.add_argument("--qemu-repair", action="store_true")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    configs = [BY_NAME[n] for n in args.config] if args.config else CONFIGS
    root = args.workdir or tempfile.mkdtemp(prefix="qcow2fast-crash-")
    print(f"{'configuration':34} {'planned':>8} {'tried':>7} {'consistent':>10} {'dirty':>6} "
          f"{'time':>7}", flush=True)
    totals = [0, 0, 0, 0]
    failed = []
    for cfg in configs:
        row = [0, 0, 0, 0]
        t = time.time()
        for seed in range(args.seed, args.seed + args.seeds):
            d = os.path.join(root, f"{cfg.name}-{seed}")
            planned, tried, dirty, failures = run_config(
                cfg, d, seed, states=args.states, per_epoch=args.per_epoch,
                qemu_repair=args.qemu_repair, log=lambda m: print("  FAILED", m, flush=True))
            row = [row[0] + planned, row[1] + tried, row[2] + tried - len(failures),
                   row[3] + dirty]
            failed += failures
        totals = [a + b for a, b in zip(totals, row)]
        print(f"{cfg.name:34} {row[0]:8} {row[1]:7} {row[2]:10} {row[3]:6} "
              f"{time.time() - t:6.0f}s", flush=True)
    print(f"{'total':34} {totals[0]:8} {totals[1]:7} {totals[2]:10} {totals[3]:6}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
