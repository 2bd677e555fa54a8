"""``python -m benchmarks``: the benchmark suite (benchmarks/suite.py)."""

import sys

from .suite import main

sys.exit(main())
