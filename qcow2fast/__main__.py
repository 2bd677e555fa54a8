import sys

from .cli import main  # the package's __init__ has set OPENBLAS_NUM_THREADS

sys.exit(main())
