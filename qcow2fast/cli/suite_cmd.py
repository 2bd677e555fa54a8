"""qcow2fast bench-suite [--quick] [--only NAME ...] [--out DIR]

The benchmark suite, installed with the package (qcow2fast/benchsuite/;
from a clone also ``python -m benchmarks``): every scenario beside QEMU,
with JSON results, a Markdown report and plots (matplotlib: the ``bench``
extra)."""

NAME = "bench-suite"


def add_parser(sub):
    # Listed for --help; main() hands the arguments to the suite's own parser.
    sub.add_parser(NAME, help="run the benchmark suite", add_help=False)


def run_argv(argv):
    from ..benchsuite import suite
    return suite.main(argv, prog=f"qcow2fast {NAME}")
