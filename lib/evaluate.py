"""`python -m lib.evaluate`: the evaluation CLI (argument parsing and the run live in lib.evaluation.cli)."""
from __future__ import annotations

import sys

from lib.evaluation.cli import build_parser, evaluate, main, run

__all__ = ["build_parser", "evaluate", "main", "run"]

if __name__ == "__main__":
    sys.exit(main())
