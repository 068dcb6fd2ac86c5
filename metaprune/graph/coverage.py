"""Converter coverage over torchvision's classification builders.

:func:`check_builder` builds one ``torchvision.models`` classifier at a small configuration
(:func:`builder_config`), converts it with :func:`~metaprune.graph.to_graph` at a small input,
rebuilds it with :func:`~metaprune.graph.from_graph` onto a NaN-filled copy (so that a tensor the
graph does not carry cannot pass) and compares every tensor (``torch.equal``) and the outputs.
The result is ``exact``, ``refused`` (one :class:`~metaprune.errors.GraphError`, its message) or
``failed`` (anything else: a bug). Used by ``tests/graph/test_torchvision_table.py`` and
``tools/convert_coverage.py``.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from metaprune.errors import GraphError

#: builders whose weights (or graph) are too large for the default test suite
SIZE_NOTE = "over the default suite's size budget"


@dataclass
class Config:
    """How one builder is built and fed: builder kwargs and the input shape."""

    name: str
    kwargs: dict = field(default_factory=dict)
    input_shape: tuple[int, int, int, int] = (2, 3, 64, 64)


def list_builders() -> list[str]:
    """Every torchvision classification builder (``torchvision.models.list_models(module=torchvision.models)``)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def builder_config(name: str, num_classes: int = 10) -> Config:
    """The small configuration of builder ``name``: ``num_classes`` outputs, no auxiliary heads, the
    smallest convenient input (64 px; 32 px ViTs with ``image_size=32``, 75 px Inception, 224 px
    MaxViT, whose partitions need it)."""
    kw: dict = {"num_classes": num_classes}
    size = 64
    if name in ("googlenet", "inception_v3"):
        kw.update(aux_logits=False, init_weights=False)
        size = 75 if name == "inception_v3" else 64
    elif name.startswith("vit_"):
        size = 28 if name == "vit_h_14" else 32
        kw["image_size"] = size
    elif name.startswith("maxvit"):
        size = 224
    return Config(name, kw, (2, 3, size, size))


def build(cfg: Config, seed: int = 0) -> nn.Module:
    """The builder's model in eval mode, weights from ``seed``; BatchNorm statistics made non-trivial."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.get_model(cfg.name, **cfg.kwargs).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                if m.num_batches_tracked is not None:
                    m.num_batches_tracked.fill_(7)
    return model


def num_params(name: str) -> int:
    """Parameters of builder ``name`` (its ImageNet weights' count, a size estimate that builds nothing)."""
    import torchvision

    try:
        return int(torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"])
    except Exception:  # noqa: BLE001 - no weights entry: build it on the meta device
        with torch.device("meta"):
            m = torchvision.models.get_model(name, **builder_config(name).kwargs)
        return sum(p.numel() for p in m.parameters())


def _poisoned(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose every tensor is NaN (floats) or -1 (integers)."""
    t = copy.deepcopy(model)
    with torch.no_grad():
        for v in t.state_dict(keep_vars=True).values():
            v.fill_(float("nan") if v.is_floating_point() else -1)
    return t


def check_model(model: nn.Module, input_shape: tuple[int, ...]) -> dict:
    """Round-trip ``model`` (no architecture spec) through the graph; returns ``{"status", "detail"}``:
    ``exact``, ``refused`` (a GraphError) or ``failed`` (another exception, or a difference)."""
    from metaprune.graph import from_graph, to_graph

    t0 = time.perf_counter()
    try:
        g = to_graph(model, input_shape=input_shape, cache=False)
        t1 = time.perf_counter()
        back = from_graph(g, template=_poisoned(model))
    except GraphError as e:
        return {"status": "refused", "detail": str(e)}
    except Exception as e:  # noqa: BLE001 - a crash is a bug the table must show
        return {"status": "failed", "detail": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    t2 = time.perf_counter()
    sd, sb = model.state_dict(), back.state_dict()
    if list(sd) != list(sb):
        return {"status": "failed", "detail": "the rebuilt model has other tensor names"}
    diff = [k for k in sd if sd[k].dtype != sb[k].dtype or not torch.equal(sd[k], sb[k])]
    if diff:
        return {"status": "failed", "detail": f"tensors differ after the round trip: {diff[:5]}"}
    if back.training != model.training:
        return {"status": "failed", "detail": "train/eval mode differs"}
    x = torch.randn(input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(x), back(x)
    if not torch.equal(a, b):
        return {"status": "failed", "detail": f"outputs differ by {(a - b).abs().max().item():.3g}"}
    return {"status": "exact", "detail": f"{g.num_nodes} nodes, {g.num_edges} edges",
            "to_graph_s": round(t1 - t0, 3), "from_graph_s": round(t2 - t1, 3)}


def reduce_depth(model: nn.Module, keep: int = 2) -> int:
    """Keep the first ``keep`` blocks of every ``nn.Sequential`` made of more than ``keep`` blocks of one
    class (the repeated, shape-preserving blocks of a stage: ViT encoder layers, ConvNeXt / RegNet /
    ResNet / EfficientNet stages); widths, heads and every layer type stay. Returns the blocks removed."""
    def sig(k: nn.Module) -> tuple:
        return type(k), tuple((n, tuple(v.shape)) for n, v in k.state_dict().items())

    removed = 0
    for m in list(model.modules()):
        kids = list(m.children()) if isinstance(m, nn.Sequential) else []
        # repeated blocks: the same class, and after the first (which may change width or stride) the same
        # tensors; stages of different widths (RegNet's trunk) are not cut
        if len(kids) > keep and len({type(k) for k in kids}) == 1 and len({sig(k) for k in kids[1:]}) == 1 \
                and any(True for _ in kids[0].parameters()) and not isinstance(kids[0], (nn.Conv2d, nn.Linear)):
            for name in list(m._modules)[keep:]:
                del m._modules[name]
            removed += len(kids) - keep
    return removed


def check_builder(name: str, num_classes: int = 10, reduce: bool = False) -> dict:
    """:func:`check_model` on builder ``name`` at :func:`builder_config`; adds ``input_shape`` and
    ``params``. With ``reduce`` the model's repeated blocks are cut to two per stage first
    (:func:`reduce_depth`; ``reduced`` says how many were removed). A builder that cannot be built at
    that configuration is ``failed``."""
    cfg = builder_config(name, num_classes)
    try:
        model = build(cfg)
    except Exception as e:  # noqa: BLE001
        return {"status": "failed", "detail": f"building it: {type(e).__name__}: {str(e).splitlines()[0]}",
                "input_shape": list(cfg.input_shape)}
    extra = {}
    if reduce:
        extra["reduced"] = reduce_depth(model)
    res = check_model(model, cfg.input_shape)
    return {**res, "input_shape": list(cfg.input_shape), "params": sum(p.numel() for p in model.parameters()), **extra}


__all__ = ["Config", "build", "builder_config", "check_builder", "check_model", "list_builders", "num_params",
           "reduce_depth"]
