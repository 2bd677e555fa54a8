"""``python -m benchmarks``: the benchmark suite (qcow2fast/benchsuite/suite.py)."""

import sys

from .suite import main

sys.exit(main())
