"""Run the fercache command line from a checkout without installing: `python cli.py --help`."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fercache.cli import main

if __name__ == "__main__":
    main()
