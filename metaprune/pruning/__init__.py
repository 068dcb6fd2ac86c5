"""Structured pruning on torch-pruning's DepGraph: targets (channel ratio, MAC speed-up, params),
criteria (group L1/L2, BN scale, Taylor, random), whole attention heads, the group-norm sparse
learning baseline, reports and prunability curves.

>>> from metaprune.models import create_model
>>> from metaprune.pruning import PruneConfig, prune
>>> res = prune(create_model("cifar_resnet20", 10, 1), PruneConfig(speedup=2.0), input_shape=(1, 28, 28))
>>> round(res.speedup, 1)
2.0
"""

from metaprune.pruning.config import CRITERIA, PruneConfig
from metaprune.pruning.curve import plot_curve, plot_curves, prunability_curve, recalibrate_bn
from metaprune.pruning.engine import PruneResult, layer_widths, prune, prune_once
from metaprune.pruning.report import compare, format_table, load_report
from metaprune.pruning.sparse import SparseRegularizer
from metaprune.pruning.structure import find_classifier

__all__ = [
    "CRITERIA",
    "PruneConfig",
    "PruneResult",
    "SparseRegularizer",
    "compare",
    "find_classifier",
    "format_table",
    "layer_widths",
    "load_report",
    "plot_curve",
    "plot_curves",
    "prunability_curve",
    "prune",
    "prune_once",
    "recalibrate_bn",
]
