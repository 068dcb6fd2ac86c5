"""The metanetwork stage: a graph network that edits a model's weights so that whole channels
become unimportant, the zoo of data models it learns from, meta-training and ``transform``.

>>> from metaprune.models import create_model
>>> from metaprune.graph import to_graph
>>> from metaprune.metanet import Metanet, MetanetConfig
>>> g = to_graph(create_model("cifar_resnet20", 10, 1))
>>> x, edges = Metanet.for_graph(g, MetanetConfig(hidden=8, layers=1))(g)
>>> x.shape == g.x.shape
True
"""

from metaprune.metanet.checkpoint import load_metanet, save_metanet
from metaprune.metanet.config import MetanetConfig, MetaTrainConfig
from metaprune.metanet.loss import dependency_groups, group_sparsity
from metaprune.metanet.meta_train import meta_train, score_members
from metaprune.metanet.model import Metanet
from metaprune.metanet.transform import edit_params, edited_graph, transform_model
from metaprune.metanet.zoo import ZooConfig, build_zoo, list_members, load_member

__all__ = [
    "MetaTrainConfig",
    "Metanet",
    "MetanetConfig",
    "ZooConfig",
    "build_zoo",
    "dependency_groups",
    "edit_params",
    "edited_graph",
    "group_sparsity",
    "list_members",
    "load_member",
    "load_metanet",
    "meta_train",
    "save_metanet",
    "score_members",
    "transform_model",
]
