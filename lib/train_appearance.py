"""`python -m lib.train_appearance DATA [DATA ...] --out runs/appearance`: self-supervised fine-tuning of
the appearance prior fused across volumes (lib.training.appearance)."""
import sys

from lib.training.appearance import main

if __name__ == "__main__":
    sys.exit(main())
