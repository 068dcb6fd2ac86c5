"""CUDA paths (skipped without a GPU): training with bf16 AMP, CUDA-event latency, graph and pruning on GPU."""

import pytest
import torch

from metaprune import create_model

pytestmark = pytest.mark.cuda


def test_train_amp_on_cuda(synthetic_data):
    from metaprune.engine import TrainConfig, train

    r = train(create_model("cifar_resnet20", in_chans=1), synthetic_data,
              TrainConfig(epochs=2, batch_size=64, device="cuda", amp=True, lr=0.05))
    assert next(r.model.parameters()).is_cuda and r.best_val_acc > 10


def test_latency_uses_cuda_events(tiny_resnet):
    from metaprune.engine import measure_latency

    r = measure_latency(tiny_resnet.cuda(), (1, 28, 28), 8, "cuda", torch.bfloat16, repeats=3)
    assert r["device"].startswith("cuda") and r["dtype"] == "bfloat16" and r["ms"] > 0


def test_graph_round_trip_of_a_cuda_model(tiny_resnet):
    from metaprune.graph import from_graph, to_graph

    m = tiny_resnet.cuda()
    back = from_graph(to_graph(m)).cuda().eval()
    x = torch.randn(2, 1, 28, 28, device="cuda")
    assert torch.equal(m(x), back(x))


def test_prune_on_cuda(tiny_resnet):
    from metaprune.pruning import PruneConfig, prune

    res = prune(tiny_resnet.cuda(), PruneConfig(speedup=2.0), input_shape=(1, 28, 28))
    assert res.model(torch.randn(2, 1, 28, 28, device="cuda")).shape == (2, 10)


def test_metanet_forward_backward_on_cuda(tiny_resnet):
    from metaprune.graph import to_graph
    from metaprune.metanet.config import MetanetConfig
    from metaprune.metanet.model import Metanet

    g = to_graph(tiny_resnet).to("cuda")
    net = Metanet.for_graph(g, MetanetConfig(hidden=16, layers=2, edge_chunk=5000, checkpoint=True)).cuda()
    x, ea = net(g)
    (x.square().mean() + sum(v.square().mean() for v in ea.values())).backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
