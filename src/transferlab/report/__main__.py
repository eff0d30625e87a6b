"""`python -m transferlab.report <sweep_dir>`: the same as `transferlab report`."""

import sys

from transferlab.report import main

sys.exit(main(sys.argv[1:]))
