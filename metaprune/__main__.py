"""``python -m metaprune`` (also what ``torchrun -m metaprune`` runs)."""

import sys

from metaprune.cli import main

sys.exit(main())
