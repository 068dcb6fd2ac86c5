"""Apply a metanetwork: one forward pass over a model's graph, then back to a network."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metaprune.errors import ModelFileError
from metaprune.graph import Graph, from_graph, graph_params, to_graph
from metaprune.metanet.model import Metanet

BN_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def edited_graph(net: Metanet, graph: Graph) -> Graph:
    """``graph`` with the metanetwork's edited node and edge features (no gradient)."""
    from metaprune.graph import EdgeGroup

    with torch.no_grad():  # a float64 model's graph is float64; the metanetwork reads its own dtype
        x, ea = net(graph.astype(next(net.parameters()).dtype))
    edges = {k: EdgeGroup(g.index, ea[k].detach(), g.role, g.layer) for k, g in graph.edges.items()}
    return Graph(x.detach(), graph.x_mask, graph.node_role, graph.node_layer, graph.node_depth, edges, graph.spec)


def edit_params(net: Metanet, graph: Graph, buffers: dict[str, Tensor]) -> dict[str, Tensor]:
    """Differentiable parameters of the edited network, keyed like its ``state_dict()``.

    BatchNorm buffers come from ``buffers`` (detached copies of the original model's), so a
    train-mode ``functional_call`` normalises with batch statistics and updates only the copies.
    """
    x, ea = net(graph)
    params = graph_params(graph, x, ea)
    for k in params:
        if k.rsplit(".", 1)[-1] in BN_BUFFERS and k in buffers:
            params[k] = buffers[k]
    return params


def transform_model(net: Metanet, model: nn.Module, calib_data=None, calib_batches: int = 8,
                    batch_size: int = 128, device: str | torch.device = "cpu") -> nn.Module:
    """Edit ``model`` with ``net`` (one forward pass) and return the edited network (eval mode).

    With ``calib_data`` (a training dataset) the BatchNorm running statistics are re-estimated on
    ``calib_batches`` batches, the inference counterpart of the train-mode statistics used in
    meta-training; without it, the original running statistics are kept.
    """
    was = model.training
    net.eval()
    g = edited_graph(net, to_graph(model))
    out = from_graph(g)
    model.train(was)
    _check_finite(out, "edited by the metanetwork")
    if calib_data is not None and calib_batches > 0:
        from metaprune.pruning import recalibrate_bn

        out.to(device)
        recalibrate_bn(out, calib_data, calib_batches, batch_size, device)
        _check_finite(out, "after BatchNorm recalibration")
    return out.eval()


def _check_finite(model: nn.Module, when: str) -> None:
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        share = sum(int((~torch.isfinite(v)).sum()) for k, v in model.state_dict().items() if k in bad)
        total = sum(v.numel() for v in model.state_dict().values() if v.is_floating_point())
        raise ModelFileError(f"the model {when} has NaN or infinite values ({share:,} of {total:,}, in "
                             f"{', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); the metanetwork does not fit "
                             "this model or is broken: nothing was written")
