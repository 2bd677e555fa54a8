"""qcow2fast bench-suite [--quick] [--only NAME ...] [--out DIR]

The benchmark suite of the repository's ``benchmarks/`` directory (the same
as ``python -m benchmarks``): every scenario beside QEMU, with JSON results,
a Markdown report and plots.  The suite is not part of the installed
package; it runs from a clone (an editable install finds it)."""

import sys
from pathlib import Path

from .options import UsageError

NAME = "bench-suite"


def add_parser(sub):
    # Listed for --help; main() hands the arguments to the suite's own parser.
    sub.add_parser(NAME, help="run the benchmark suite (python -m benchmarks)", add_help=False)


def run_argv(argv):
    repo = Path(__file__).resolve().parents[2]
    if not (repo / "benchmarks" / "suite.py").is_file():
        raise UsageError(f"{NAME} needs the repository's benchmarks/ directory, which is not "
                         f"installed with the package: run it from a clone "
                         f"(pip install -e .)")
    sys.path.insert(0, str(repo))
    from benchmarks import suite
    return suite.main(argv, prog=f"qcow2fast {NAME}")
