"""``python -m vmoe ...``: the same as the ``vmoe`` command."""
import sys

from vmoe.cli import main

if __name__ == "__main__":
    sys.exit(main())
