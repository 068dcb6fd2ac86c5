"""Experiment: a score metanetwork trained directly on the loss after pruning (an "amortised gate").

The `gate` criterion learns one free score per channel of ONE network on its training batches (hard top-k
gates in the forward pass at a removal ratio drawn from gate_ratio_range, straight-through sigmoid
gradient, KL divergence to the unpruned network's predictions; metaprune/pruning/gate.py). Here the scores
come from a score metanetwork's forward pass on the member's graph (`group_scores`, as the `metanet`
criterion ranks), and the same loss, summed over the training members in turn, trains the metanetwork's
weights. `--free` is the control: free per-node scores per member in the same pipeline (no metanetwork),
which is the gate itself up to the node -> group mapping; it shows how low the loss gets when the scores can
fit each member.

Writes the checkpoint folder (usable as `--criterion metanet --metanet OUT`) and OUT/amortized.json
(settings, members, loss every 25 steps). Evaluate with tools/rank_eval.py (validation members only).

    OMP_NUM_THREADS=1 .venv/bin/python tools/amortized_gate.py -o runs/rank_amort --steps 600 --lr 3e-3 \\
        --hidden 32 --layers 4 --members runs/zoo_train_r20/member_00{0,1,2,3} runs/zoo_train_r32/member_00{0,1,2}
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.heldout import refuse_held_out  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--members", nargs="+", required=True, help="training member folders")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--speedup", type=float, default=3.0)
    p.add_argument("--free", action="store_true", help="control: free per-node scores per member, no metanetwork")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True)
    a = p.parse_args()
    refuse_held_out(members=a.members)
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    from metaprune.data.loader import BatchLoader
    from metaprune.engine.report import input_shape
    from metaprune.graph import to_graph
    from metaprune.io import write_json
    from metaprune.metanet.checkpoint import save_metanet
    from metaprune.metanet.config import MetanetConfig
    from metaprune.metanet.model import Metanet
    from metaprune.metanet.rank import group_nodes, group_scores
    from metaprune.metanet.zoo import load_member, load_zoo_data
    from metaprune.pruning import PruneConfig
    from metaprune.pruning.gate import GatedForward, _cycle, _hard_keep, gate_groups, gate_ratio_range

    cfg = PruneConfig(speedup=a.speedup)
    lo, hi = gate_ratio_range(cfg)
    members = []
    for path in map(Path, a.members):
        model, _ = load_member(path)
        data = load_zoo_data(path.parent)
        graph = to_graph(model)
        by_key = {g.key: g for g in group_nodes(model, graph)}
        gg = [g for g in gate_groups(model, cfg, torch.randn(1, *input_shape(model, data)))
              if g.fixed is None and not g.is_heads and g.key in by_key and by_key[g.key].fallback is None]
        members.append({"model": model.eval(), "graph": graph, "rg": [by_key[g.key] for g in gg], "gg": gg,
                        "stream": _cycle(BatchLoader(data.train, 128, shuffle=True, augment=False, seed=a.seed)),
                        "free": (1e-3 * torch.randn(graph.x.shape[0])).requires_grad_(True)})
    torch.manual_seed(a.seed)
    net = Metanet.for_graph(members[0]["graph"], MetanetConfig(hidden=a.hidden, layers=a.layers, output="score"))
    opt = (torch.optim.Adam([m["free"] for m in members], lr=a.lr) if a.free
           else torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=5e-4))
    gen = torch.Generator().manual_seed(a.seed)
    losses, history, order, t0 = [], [], [], time.perf_counter()
    for step in range(a.steps):
        for pg in opt.param_groups:
            pg["lr"] = a.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / a.steps)))
        if not order:
            order = torch.randperm(len(members), generator=gen).tolist()
        m = members[order.pop()]
        net.train()
        scores = (group_scores(m["free"], m["rg"]) if a.free
                  else group_scores(net(m["graph"]), m["rg"], net.score_prior[-1]))
        u = lo + (hi - lo) * float(torch.rand((), generator=gen))
        hard = _hard_keep(m["gg"], [s.detach() for s in scores], u, False, cfg.max_layer_ratio, 0.0)
        gates = [h + torch.sigmoid(s) - torch.sigmoid(s).detach() for s, h in zip(scores, hard)]
        x, _ = next(m["stream"])
        with GatedForward(m["model"], m["gg"]) as gf:  # backward inside: BN state is restored on exit
            gf.set([torch.ones(g.units) for g in m["gg"]])
            with torch.no_grad():
                teacher = F.log_softmax(m["model"](x), 1)
            gf.set(gates)
            loss = F.kl_div(F.log_softmax(m["model"](x), 1), teacher, log_target=True, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
        if not a.free:
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 25 == 0:
            rec = {"step": step + 1, "loss": round(sum(losses[-25:]) / 25, 4),
                   "seconds": round(time.perf_counter() - t0, 1)}
            history.append(rec)
            print(json.dumps(rec), flush=True)
    out = Path(a.output)
    if not a.free:
        save_metanet(net, out, extra={"amortized_gate": vars(a)})
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "amortized.json", {"settings": vars(a), "history": history,
                                        "command": "tools/amortized_gate.py " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
