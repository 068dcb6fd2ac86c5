"""Channel criteria must rank by what they claim (not all like L2); gate learns on data; reconstruction helps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from metaprune.errors import ConfigError
from metaprune.pruning import PruneConfig, prune
from metaprune.pruning.reconstruct import recalibrate_bn_batches


class TinyCNN(nn.Module):
    """conv1 -> bn1 -> relu -> conv2 -> bn2 -> relu -> pool -> fc: two pruning groups of 4 channels."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def _designed_cnn() -> TinyCNN:
    """conv1's channels: 0 = one big weight, 1 = many small weights, 2 = big weights but BN scale ~0,
    3 = medium. BN scales (but 2), biases and conv2's input columns are equal, so the group ranks
    follow the conv1 rows (L1 / L2), the BN scale (bn) or gamma x column (functional)."""
    torch.manual_seed(0)
    m = TinyCNN().eval()
    with torch.no_grad():
        rows = torch.zeros(4, 9)
        rows[0, 0] = 3.0  # L1 3, L2^2 9  -> lowest L1
        rows[1] = 0.5  # L1 4.5, L2^2 2.25 -> lowest L2
        rows[2] = 2.0  # L1 18, L2^2 36 but gamma 0.01 -> lowest bn / functional
        rows[3] = 1.2  # L1 10.8, L2^2 12.96
        m.conv1.weight.copy_(rows.view(4, 1, 3, 3))
        m.bn1.weight.copy_(torch.tensor([1.0, 1.0, 0.01, 1.0]))
        m.bn1.bias.zero_()
        m.conv2.weight.fill_(0.3)
    return m


def _removed_conv1_channel(model: TinyCNN, pruned: TinyCNN) -> int:
    kept = [int(torch.cdist(r.flatten()[None], model.conv1.weight.flatten(1)).argmin())
            for r in pruned.conv1.weight]
    assert len(kept) == 3
    return ({0, 1, 2, 3} - set(kept)).pop()


@pytest.mark.parametrize("criterion,removed", [("l2", 1), ("l1", 0), ("bn", 2), ("functional", 2)])
def test_each_criterion_removes_the_channel_it_ranks_lowest(criterion, removed):
    m = _designed_cnn()
    res = prune(m, PruneConfig(round_to=1, ratio=0.25, criterion=criterion), input_shape=(1, 8, 8))
    assert _removed_conv1_channel(m, res.model) == removed


def test_functional_differs_from_l2_and_follows_consumer_columns():
    m = _designed_cnn()
    with torch.no_grad():  # channel 3 now feeds conv2 with near-zero columns: useless downstream
        m.bn1.weight.fill_(1.0)
        m.conv2.weight[:, 3] = 1e-3
    l2 = prune(m, PruneConfig(round_to=1, ratio=0.25, criterion="l2"), input_shape=(1, 8, 8))
    fn = prune(m, PruneConfig(round_to=1, ratio=0.25, criterion="functional"), input_shape=(1, 8, 8))
    assert _removed_conv1_channel(m, l2.model) == 1
    assert _removed_conv1_channel(m, fn.model) == 3


def test_random_is_seeded_and_not_l2():
    m = _designed_cnn()
    picks = {_removed_conv1_channel(m, prune(m, PruneConfig(round_to=1, ratio=0.25, criterion="random", seed=s),
                                             input_shape=(1, 8, 8)).model) for s in range(6)}
    assert len(picks) > 1  # not a fixed ranking
    a = prune(m, PruneConfig(round_to=1, ratio=0.25, criterion="random", seed=3), input_shape=(1, 8, 8)).model
    b = prune(m, PruneConfig(round_to=1, ratio=0.25, criterion="random", seed=3), input_shape=(1, 8, 8)).model
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _mlp_task(n_batches=20, batch=64):
    """Hidden units 3 and 4 carry the label (x0 > 0) through small weights; the other six have big
    weights but read only noise inputs and barely reach the output: L2 keeps them, the data says drop them."""
    torch.manual_seed(0)
    m = TinyMLP().eval()
    with torch.no_grad():
        m.fc1.weight.zero_()
        m.fc1.bias.zero_()
        m.fc2.weight.zero_()
        m.fc2.bias.zero_()
        m.fc1.weight[3, 0], m.fc1.weight[4, 0] = 0.3, -0.3
        m.fc2.weight[1, 3], m.fc2.weight[0, 4] = 3.0, 3.0
        for u in (0, 1, 2, 5, 6, 7):
            m.fc1.weight[u, 1:] = torch.randn(7) * 3.0
            m.fc2.weight[:, u] = torch.randn(2) * 0.02
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n_batches):
        x = torch.randn(batch, 8, generator=g)
        batches.append((x, (x[:, 0] > 0).long()))
    return m, batches


def _kept_hidden(model, pruned) -> set[int]:
    return {int((model.fc1.weight - r).abs().sum(1).argmin()) for r in pruned.fc1.weight}


def test_gate_learns_which_units_matter_where_l2_fails():
    m, batches = _mlp_task()
    l2 = prune(m, PruneConfig(round_to=1, ratio=0.5, criterion="l2"), input_shape=(8,))
    assert not {3, 4} <= _kept_hidden(m, l2.model)  # the magnitude ranking drops a label unit
    res = prune(m, PruneConfig(round_to=1, ratio=0.5, criterion="gate", gate_steps=40, seed=0), input_shape=(8,),
                calibration=batches)
    assert {3, 4} <= _kept_hidden(m, res.model)
    info = res.info["gate"]
    # the objective is the divergence from the unpruned net's predictions: near 0 once the label units are kept
    assert info["steps"] == 40 and info["seconds"] > 0 and info["loss_last"] < 0.1
    assert info["objective"] == "distill" and info["cosine"]
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    acc = lambda net: float((net(x).argmax(1) == y).float().mean())  # noqa: E731
    assert acc(res.model) >= acc(m) - 0.005 and acc(m) - 0.05 > acc(l2.model)  # the unpruned net's accuracy (0.92)
    assert not hasattr(res.model, "_metaprune_gate_scores") and not hasattr(m, "_metaprune_gate_scores")


def test_gate_is_deterministic_under_seed_and_needs_data():
    m, batches = _mlp_task(n_batches=4)
    cfg = PruneConfig(round_to=1, ratio=0.5, criterion="gate", gate_steps=6, seed=5)
    a = prune(m, cfg, input_shape=(8,), calibration=batches)
    b = prune(m, cfg, input_shape=(8,), calibration=batches)
    assert torch.equal(a.model.fc1.weight, b.model.fc1.weight)
    with pytest.raises(ConfigError, match="gate"):
        prune(m, cfg, input_shape=(8,))


def test_gate_global_learns_a_split_and_respects_the_layer_cap(synthetic_data):
    from metaprune.data import BatchLoader
    from metaprune.models import create_model

    torch.manual_seed(0)
    model = create_model("cifar_resnet20", num_classes=10, in_chans=1).eval()
    calib = BatchLoader(synthetic_data.train, 16, shuffle=True, seed=0)
    res = prune(model, PruneConfig(round_to=1, speedup=2.0, criterion="gate", global_pruning=True, gate_steps=3,
                                   max_layer_ratio=0.7), input_shape=(1, 16, 16), calibration=calib)
    assert res.target_met and res.info["gate"]["global"]
    base = {n: c.out_channels for n, c in model.named_modules() if isinstance(c, nn.Conv2d)}
    widths = {n: c.out_channels for n, c in res.model.named_modules() if isinstance(c, nn.Conv2d)}
    assert all(widths[n] >= round(0.3 * base[n]) for n in base)
    assert len({widths[n] / base[n] for n in base}) > 1


@pytest.mark.parametrize("criterion", ["functional", "gate"])
def test_vit_heads_and_mlp_channels(criterion):
    from metaprune.models import create_model

    torch.manual_seed(0)
    vit = create_model("vit_tiny_p4", num_classes=10, in_chans=1, image_size=16).eval()
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randn(8, 1, 16, 16, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    res = prune(vit, PruneConfig(round_to=1, ratio=0.4, criterion=criterion, gate_steps=2), input_shape=(1, 16, 16),
                calibration=calib if criterion == "gate" else None)
    assert res.heads_after == [1] * len(res.heads_before) and res.heads_before[0] == 3
    assert res.model(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    mlp = [m for n, m in res.model.named_modules() if n.endswith("mlp.0")]
    assert mlp and all(m.out_features < 768 for m in mlp)


def _conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 10)).eval()


def test_reconstruction_lowers_the_output_error():
    net = _conv_net()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(32, 1, 12, 12, generator=g), torch.zeros(32, dtype=torch.long)) for _ in range(4)]
    with torch.no_grad():  # running statistics of the unpruned net = its own data
        recalibrate_bn_batches(net, [b[0] for b in batches])
    x = torch.randn(64, 1, 12, 12, generator=g)
    cfg = dict(ratio=0.5, criterion="l2", reconstruct_batches=4)
    plain = prune(net, PruneConfig(round_to=1, **cfg), input_shape=(1, 12, 12)).model
    recalibrate_bn_batches(plain, [b[0] for b in batches])
    res = prune(net, PruneConfig(round_to=1, **cfg, reconstruct=True), input_shape=(1, 12, 12), calibration=batches)
    info = res.info["reconstruct"]
    assert info["layers"] == 3 and info["batches"] == 4  # consumers: conv 3, conv 6, the classifier
    assert info["rel_err_after"] < 0.5 * info["rel_err_before"]
    with torch.no_grad():
        ref = net(x)
        e_plain = float(((plain(x) - ref) ** 2).mean())
        e_rec = float(((res.model(x) - ref) ** 2).mean())
    assert e_rec < 0.5 * e_plain
    assert not hasattr(res.model, "_metaprune_prune_history")
    # the same refit afterwards from PruneResult.history (what tools/baselines.py does)
    from metaprune.pruning.reconstruct import reconstruct

    again = prune(net, PruneConfig(round_to=1, **cfg), input_shape=(1, 12, 12))
    later = reconstruct(net, again.model, batches, 4, history=again.history)
    assert later["layers"] == 3 and abs(later["rel_err_after"] - info["rel_err_after"]) < 1e-6


def test_reconstruction_is_on_by_default_with_calibration_batches():
    """``reconstruct="auto"`` (the default): given calibration batches, prune refits exactly as with True;
    without them it prunes exactly as with False (no error)."""
    net = _conv_net()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 1, 12, 12, generator=g), torch.zeros(16, dtype=torch.long)) for _ in range(2)]
    assert PruneConfig(ratio=0.5).reconstruct == "auto"
    kw = dict(round_to=1, ratio=0.5, reconstruct_batches=2)
    auto = prune(net, PruneConfig(**kw), input_shape=(1, 12, 12), calibration=batches)
    on = prune(net, PruneConfig(**kw, reconstruct=True), input_shape=(1, 12, 12), calibration=batches)
    off = prune(net, PruneConfig(**kw, reconstruct=False), input_shape=(1, 12, 12), calibration=batches)
    assert auto.info["reconstruct"]["auto"] is True and on.info["reconstruct"]["auto"] is False
    assert auto.info["reconstruct"]["layers"] == 3 and "reconstruct" not in off.info
    for a, b in zip(auto.model.state_dict().values(), on.model.state_dict().values()):
        assert torch.equal(a, b)
    assert not torch.equal(auto.model[3].weight, off.model[3].weight)  # conv 3 read pruned channels: refitted
    free = prune(net, PruneConfig(**kw), input_shape=(1, 12, 12))  # no batches: plain pruning
    assert "reconstruct" not in free.info
    assert all(torch.equal(a, b) for a, b in zip(free.model.state_dict().values(),
                                                 prune(net, PruneConfig(**kw, reconstruct=False),
                                                       input_shape=(1, 12, 12)).model.state_dict().values()))


def test_default_refit_with_taylor_uses_its_own_batches(monkeypatch):
    """taylor's gradient batches may differ from the refit's (the CLI: 64 in file order vs seeded 128); a
    one-shot iterator that the criterion consumes is not refitted on (skipped with a note, no error)."""
    from metaprune.pruning import reconstruct as rec_mod

    net = _conv_net()
    g = torch.Generator().manual_seed(3)
    small = [(torch.randn(4, 1, 12, 12, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]
    big = [(torch.randn(16, 1, 12, 12, generator=g), torch.zeros(16, dtype=torch.long)) for _ in range(2)]
    seen = []
    real = rec_mod.reconstruct
    monkeypatch.setattr(rec_mod, "reconstruct", lambda o, p, b, *a, **k: seen.append(len(next(iter(b))[0])) or real(o, p, b, *a, **k))
    cfg = PruneConfig(round_to=1, ratio=0.5, criterion="taylor", reconstruct_batches=2)
    res = prune(net, cfg, input_shape=(1, 12, 12), calibration=small, reconstruct_calibration=big)
    assert seen == [16] and res.info["reconstruct"]["batches"] == 2
    once = prune(net, cfg, input_shape=(1, 12, 12), calibration=iter(small))
    assert "one-shot" in once.info["reconstruct"]["skipped"] and seen == [16]
    assert prune(net, cfg, input_shape=(1, 12, 12), calibration=small).info["reconstruct"]["layers"] == 3


def test_cli_taylor_refits_on_seeded_batches_of_128(model_file, tmp_path, monkeypatch):
    from metaprune.cli import main
    from metaprune.pruning import reconstruct as rec_mod

    seen = []
    real = rec_mod.reconstruct
    monkeypatch.setattr(rec_mod, "reconstruct", lambda o, p, b, *a, **k: seen.append(len(next(iter(b))[0])) or real(o, p, b, *a, **k))
    assert main(["prune", model_file, "--ratio", "0.5", "--criterion", "taylor", "--data", "synthetic",
                 "--eval-batches", "1", "--reconstruct-batches", "1", "--no-latency", "-o", str(tmp_path / "o"), "-q"]) == 0
    assert seen == [128]


def test_curve_reconstruct_must_be_a_bool(synthetic_data, tiny_resnet):
    from metaprune.pruning import prunability_curve

    with pytest.raises(ConfigError, match="true or false"):
        prunability_curve(tiny_resnet, synthetic_data, max_speedup=2.0, steps=1, reconstruct="false")


def test_cli_task_refuses_an_explicit_reconstruct(model_file, tmp_path, capsys):
    from metaprune.cli import main

    assert main(["prune", model_file, "--ratio", "0.5", "--task", "fmnist-tops", "--reconstruct",
                 "-o", str(tmp_path / "b")]) == 2
    assert "leave out --reconstruct" in capsys.readouterr().err


def test_reconstruction_shows_progress(monkeypatch):
    """The refit (on by default with data) walks its layers under a progress bar."""
    from metaprune.engine import runtime

    seen = []
    real = runtime.progress
    monkeypatch.setattr(runtime, "progress", lambda it, desc="", **k: seen.append((desc, k.get("total"))) or real(it, desc, **k))
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(8, 1, 12, 12, generator=g), torch.zeros(8, dtype=torch.long))]
    res = prune(_conv_net(), PruneConfig(round_to=1, ratio=0.5), input_shape=(1, 12, 12), calibration=batches)
    assert ("reconstruct", res.info["reconstruct"]["layers"]) in seen


@pytest.mark.parametrize("value", ["yes", "on", 2, None])
def test_reconstruct_setting_is_checked(value):
    with pytest.raises(ConfigError, match="reconstruct"):
        PruneConfig(ratio=0.5, reconstruct=value)


def test_reconstruction_in_chunks_gives_the_same_fit(monkeypatch):
    """Large layers accumulate the normal equations over batch chunks (bounded memory); the fit is the same."""
    from metaprune.pruning import reconstruct as rec_mod

    net = _conv_net()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(16, 1, 12, 12, generator=g), torch.zeros(16, dtype=torch.long)) for _ in range(2)]
    cfg = PruneConfig(round_to=1, ratio=0.5, criterion="l2", reconstruct=True, reconstruct_batches=2)
    whole = prune(net, cfg, input_shape=(1, 12, 12), calibration=batches)
    calls = []
    rows = rec_mod._rows
    monkeypatch.setattr(rec_mod, "_rows", lambda *a: calls.append(len(a[1])) or rows(*a))
    monkeypatch.setattr(rec_mod, "CHUNK_ELEMENTS", 12 * 12 * 73 * 3)  # 3 images of conv 3 (8 x 3 x 3 + 1 columns)
    chunked = prune(net, cfg, input_shape=(1, 12, 12), calibration=batches)
    assert min(calls) < 16  # the convs really in chunks
    for a, b in zip(whole.model.state_dict().values(), chunked.model.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert chunked.info["reconstruct"]["rel_err_after"] == pytest.approx(whole.info["reconstruct"]["rel_err_after"],
                                                                         rel=1e-9)


def test_reconstruction_needs_data():
    with pytest.raises(Exception, match="calibration"):
        prune(_conv_net(), PruneConfig(round_to=1, ratio=0.5, reconstruct=True), input_shape=(1, 12, 12))


def test_gate_scores_follow_iterative_global_steps():
    """Global pruning runs several torch-pruning steps; the learned scores must track the removed channels."""
    m, batches = _mlp_task()
    cfg = PruneConfig(round_to=1, ratio=0.5, criterion="gate", gate_steps=40, global_pruning=True, global_steps=4,
                      max_layer_ratio=0.8)
    res = prune(copy.deepcopy(m), cfg, input_shape=(8,), calibration=batches)
    assert {3, 4} <= _kept_hidden(m, res.model)


@pytest.fixture
def model_file(tmp_path):
    from metaprune.io import save_model
    from metaprune.models import create_model

    torch.manual_seed(0)
    return str(save_model(create_model("cifar_resnet20", num_classes=10, in_chans=1), tmp_path / "src.safetensors"))


@pytest.mark.parametrize("args", [["--criterion", "gate"], ["--reconstruct"], ["--criterion", "gate", "--gate-steps", "0",
                                                                                 "--data", "synthetic"]])
def test_cli_gate_and_reconstruct_refuse_without_data(model_file, tmp_path, args, capsys):
    from metaprune.cli import main

    rc = main(["prune", model_file, "--ratio", "0.5", *args, "--no-latency", "-o", str(tmp_path / "o"), "-q"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and ("--data" in err or "gate-steps" in err)
    assert not (tmp_path / "o" / "model.safetensors").exists()


@pytest.mark.parametrize("flag", [[], ["--no-reconstruct"]])
def test_cli_reconstructs_by_default_with_data(model_file, tmp_path, flag, capsys):
    import json

    from metaprune.cli import main

    out = tmp_path / "o"
    assert main(["prune", model_file, "--ratio", "0.5", "--data", "synthetic", "--eval-batches", "1",
                 "--reconstruct-batches", "2", "--no-latency", "-o", str(out), *flag]) == 0
    rep = json.loads((out / "report.json").read_text())
    cap = capsys.readouterr()
    printed = cap.out
    assert ("then reconstruction" in cap.err) is not bool(flag)  # the status line says what will run
    if flag:
        assert rep["config"]["reconstruct"] is False and "reconstruct" not in rep["result"]
        assert "reconstructed" not in printed
    else:
        assert rep["config"]["reconstruct"] == "auto"
        rec = rep["result"]["reconstruct"]
        assert rec["auto"] is True and rec["batches"] == 2 and rec["layers"] > 0
        assert rec["rel_err_after"] <= rec["rel_err_before"]
        assert "reconstructed" in printed and "--no-reconstruct" in printed


def test_cli_gate_reports_its_seconds(model_file, tmp_path):
    import json

    from metaprune.cli import main

    out = tmp_path / "o"
    assert main(["prune", model_file, "--ratio", "0.5", "--criterion", "gate", "--gate-steps", "2", "--data",
                 "synthetic", "--eval-batches", "1", "--no-latency", "-o", str(out), "-q"]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["config"]["criterion"] == "gate" and rep["config"]["gate_steps"] == 2
    assert rep["result"]["gate"]["steps"] == 2 and rep["result"]["gate"]["seconds"] > 0


def test_taylor_removes_the_channel_without_gradient():
    """Channel 2 has big weights but conv2 never reads it: |w * dL/dw| is 0 there, L2 keeps it."""
    m = _designed_cnn()
    with torch.no_grad():
        m.bn1.weight.fill_(1.0)
        m.conv2.weight[:, 2] = 0.0
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(2)]
    ty = prune(m, PruneConfig(round_to=1, ratio=0.25, criterion="taylor"), input_shape=(1, 8, 8), calibration=batches)
    l2 = prune(m, PruneConfig(round_to=1, ratio=0.25, criterion="l2"), input_shape=(1, 8, 8))
    assert _removed_conv1_channel(m, ty.model) == 2
    assert _removed_conv1_channel(m, l2.model) == 1


@pytest.mark.slow  # ~20 s on an idle core (batches of 128 for the gate and the refit)
def test_curve_with_gate_and_reconstruction(synthetic_data, tiny_resnet):
    from metaprune.pruning import prunability_curve

    c = prunability_curve(tiny_resnet, synthetic_data, max_speedup=2.0, steps=1, criterion="gate", val_batches=1,
                          calib_batches=1, batch_size=64, gate_steps=2, reconstruct=True, reconstruct_batches=1)
    assert c["gate"]["steps"] == 2 and c["reconstruct"] and len(c["accs"]) >= 2
    assert c["gate"]["ratio_range"][1] == pytest.approx(1 - 2.0 ** -0.5)
