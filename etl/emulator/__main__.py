"""``python -m etl.emulator``."""

import sys

from etl.emulator.cli import main

sys.exit(main(sys.argv[1:]))
