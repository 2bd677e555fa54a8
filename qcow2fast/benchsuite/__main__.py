"""``python -m qcow2fast.benchsuite``: the benchmark suite (suite.py)."""

import sys

from .suite import main

sys.exit(main())
