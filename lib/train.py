"""`python -m lib.train DATA [DATA ...] --out runs/mini`: self-supervised SD-FSMIS training (lib.training)."""
import sys

from lib.training.loop import main

if __name__ == "__main__":
    sys.exit(main())
