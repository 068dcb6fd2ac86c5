"""`metaprune convert` on a bare state dict, a model file and back."""

from __future__ import annotations

import torch
from graph_helpers import assert_same_model, small_model

from metaprune.cli import main
from metaprune.graph import Graph
from metaprune.io import load_model


def test_convert_bare_state_dict_and_back(tmp_path, capsys):
    model = small_model("cifar_resnet20").eval()
    pt = tmp_path / "resnet20.pt"
    torch.save(model.state_dict(), pt)
    g = tmp_path / "g.safetensors"
    assert main(["convert", str(pt), "-o", str(g), "-q"]) == 0
    out = capsys.readouterr().out
    assert "nodes" in out and "k9" in out and "to_graph_s" in out
    assert Graph.load(g).spec["arch"] == "cifar_resnet20"
    back = tmp_path / "back.safetensors"
    assert main(["convert", str(g), "--to-model", "-o", str(back), "-q"]) == 0
    assert_same_model(model, load_model(back)[0])


def test_convert_refuses_bad_requests(tmp_path, capsys):
    model = small_model("cifar_resnet20")
    pt = tmp_path / "m.pt"
    torch.save(model.state_dict(), pt)
    assert main(["convert", str(pt), "-o", str(pt), "-q"]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert main(["convert", str(pt), "--to-model", "-o", str(tmp_path / "x.safetensors"), "-q"]) == 2
    assert "not a metaprune graph" in capsys.readouterr().err
