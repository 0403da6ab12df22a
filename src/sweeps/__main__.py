"""`python -m src.sweeps COMMAND [overrides]`: see src/sweeps/cli.py."""
import sys

from src.sweeps.cli import main

sys.exit(main(sys.argv[1:]))
