"""metaprune: make trained CNNs and ViTs small and fast.

Stages (one sub-package each): :mod:`metaprune.models` (architecture registry),
:mod:`metaprune.data` (datasets and tasks), :mod:`metaprune.engine` (train / eval /
measure), :mod:`metaprune.graph` (network <-> graph), :mod:`metaprune.metanet`
(graph metanetwork), :mod:`metaprune.pruning` (torch-pruning wrapper and reports).
Structured Pruning Adapters live in the sibling package :mod:`spa`.
"""

__version__ = "0.1.0"

from metaprune.errors import MetapruneError  # noqa: E402
from metaprune.models import create_model, list_models  # noqa: E402

__all__ = ["MetapruneError", "create_model", "list_models", "__version__"]
