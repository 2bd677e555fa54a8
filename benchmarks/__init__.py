"""``python -m benchmarks[.NAME]`` from a clone: the benchmark suite.

The suite's modules live in the package, ``qcow2fast/benchsuite/``, so that
they install with it (``pip install qcow2fast[bench]``, then
``qcow2fast bench-suite``).  This package is their entry from the
repository: its search path is this directory, then the package's, so
``python -m benchmarks.io_bench`` runs qcow2fast/benchsuite/io_bench.py and
a scenario module placed here (``from .common import ...``) finds the
suite's helpers.  A scenario lands in the package to be installed.
"""

import os as _os

from qcow2fast import benchsuite as _benchsuite

__path__ = [_os.path.dirname(_os.path.abspath(__file__)), *_benchsuite.__path__]
