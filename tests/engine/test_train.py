import torch

from metaprune import create_model
from metaprune.engine import TrainConfig, evaluate, measure_latency, profile_model, train


def test_training_learns_and_selects_on_validation(synthetic_data, tmp_path):
    torch.manual_seed(0)
    m = create_model("cifar_resnet20", num_classes=10, in_chans=1)
    before = evaluate(m, synthetic_data.val)["acc"]
    cfg = TrainConfig(epochs=3, batch_size=32, lr=0.05, device="cpu", augment=False)
    r = train(m, synthetic_data, cfg, out_dir=tmp_path)
    assert r.best_val_acc == max([before] + [h["val_acc"] for h in r.history])
    assert r.best_val_acc > 50 > before
    assert abs(evaluate(r.model, synthetic_data.val)["acc"] - r.best_val_acc) < 1e-6
    assert (tmp_path / "last.pt").exists()


def test_resume_continues_from_last_epoch(synthetic_data, tmp_path):
    # a constant learning rate: a longer run continues the shorter one exactly, so it may resume
    # (with a schedule over the run's length, another --epochs is another run: tests/engine/test_resume.py)
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, device="cpu", max_steps_per_epoch=2, schedule="constant")
    torch.manual_seed(0)
    train(create_model("cifar_resnet20", in_chans=1), synthetic_data, cfg, out_dir=tmp_path)
    cfg2 = TrainConfig(epochs=2, batch_size=64, lr=0.05, device="cpu", max_steps_per_epoch=2, schedule="constant")
    torch.manual_seed(0)
    r = train(create_model("cifar_resnet20", in_chans=1), synthetic_data, cfg2, out_dir=tmp_path)
    assert [h["epoch"] for h in r.history] == [0, 1]
    st = torch.load(tmp_path / "last.pt", weights_only=True)
    assert st["epoch"] == 1


def test_profile_reports_params_macs_latency(tiny_resnet):
    p = profile_model(tiny_resnet, (1, 28, 28), batches=(1, 4), repeats=2)
    assert p["params"] == sum(x.numel() for x in tiny_resnet.parameters())
    assert 30e6 < p["macs"] < 33e6
    assert set(p["latency"]) == {"1", "4"} and p["latency"]["4"]["ms"] > 0
    assert measure_latency(tiny_resnet, (1, 28, 28), 2, repeats=2)["batch"] == 2


def test_adamw_optimizer_steps_as_torch_adamw_and_sgd_runs_keep_their_identity():
    """--optimizer adamw: torch's AdamW (beta1 = momentum), decay on weights only; the SGD default leaves a
    run's identity as before the option existed (older resume checkpoints and zoos stay valid)."""
    from metaprune.engine.train import make_optimizer

    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    cfg = TrainConfig(optimizer="adamw", lr=0.01, weight_decay=0.1, momentum=0.8)
    opt = make_optimizer(lin, cfg)
    assert isinstance(opt, torch.optim.AdamW) and opt.param_groups[0]["betas"] == (0.8, 0.999)
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    lin(torch.ones(1, 3)).sum().backward()
    opt.step()
    # first AdamW step: p -= lr * (sign(g) + wd * p) for weights (|m_hat / sqrt(v_hat)| = 1), no decay on biases
    assert torch.allclose(lin.weight, w0 * (1 - 0.01 * 0.1) - 0.01, atol=1e-6)
    assert torch.allclose(lin.bias, b0 - 0.01, atol=1e-6)
    assert "optimizer" not in TrainConfig().identity() and TrainConfig(optimizer="adamw").identity()["optimizer"]
    assert isinstance(make_optimizer(lin, TrainConfig()), torch.optim.SGD)
