"""``python -m clq_compile``: the ``clq`` command line."""

import sys

from clq_compile.cli import main

sys.exit(main())
