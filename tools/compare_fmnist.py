"""Equal-budget comparison on Fashion-MNIST, and prunability of original vs. edited networks.

For every held-out zoo member (never used in meta-training or checkpoint selection) and every
target MAC speed-up, three arms get the same number of training epochs ``E``:

  (a) magnitude:  prune (group L2) -> finetune E epochs
  (b) depgraph:   sparse learning 1 epoch (GroupNorm regulariser) -> prune -> finetune E-1 epochs
  (c) metanet:    metanetwork edit (+BN recalibration) -> finetune R epochs -> prune -> finetune E-R epochs
                  (R = --recovery-epochs: 1 is the paper's order, 0 suits the function-preserving scale edit)

Every finetune selects its epoch on the validation split; the reported accuracy is on the test
split. Also writes each member's prunability curves (no finetuning, validation split) for the
original and the edited network, and a PNG of both.

    .venv/bin/python tools/compare_fmnist.py --zoo runs/zoo_r20 --members member_004 member_005 member_006 \
        --metanet checkpoints/metanet_cifar_resnet_fmnist -o results/compare_fmnist.json
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS = ("magnitude", "depgraph", "metanet")


def _finetune(model, data, epochs: int, steps: int, seed: int, lr: float, reg=None):
    from metaprune.engine import TrainConfig, train

    if epochs <= 0:
        return model
    cfg = TrainConfig(epochs=epochs, lr=lr, schedule="cosine", max_steps_per_epoch=steps, device="cpu", seed=seed,
                      amp=False)
    return train(model.train(), data, cfg, regularizer=reg, desc="ft").model


def _table(res: dict) -> str:
    lines = [f"# Equal-budget comparison, {res['setup']['arch']} on Fashion-MNIST",
             "",
             f"Budget per arm: {res['setup']['epochs']} epochs of {res['setup']['steps_per_epoch']} steps "
             f"(batch 128) on the {res['setup']['train_subset']}-image training subset; targets: held-out zoo members "
             f"{', '.join(res['setup']['members'])}; test accuracy (%) mean ± std over members (n = {len(res['members'])}).",
             "", "| speed-up | (a) magnitude + FT | (b) DepGraph SL + prune + FT | (c) metanet + prune + FT |",
             "|---|---|---|---|"]
    for s in res["setup"]["speedups"]:
        row = [f"{s:g}x"]
        for arm in ARMS:
            v = [m["arms"][arm][str(s)]["test_acc"] for m in res["members"] if str(s) in m["arms"].get(arm, {})]
            sp = [m["arms"][arm][str(s)]["speedup"] for m in res["members"] if str(s) in m["arms"].get(arm, {})]
            if v:
                sd = statistics.stdev(v) if len(v) > 1 else 0.0
                row.append(f"{statistics.mean(v):.2f} ± {sd:.2f} (achieved {statistics.mean(sp):.2f}x)")
            else:
                row.append("-")
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Prunability (AUC of validation accuracy over 1..3x, no finetuning, BN recalibrated):", "",
              "| member | original (L2) | metanet-edited (L2) | original, BN-scale criterion (reference) |",
              "|---|---|---|---|"]
    for m in res["members"]:
        pr = m["prunability"]
        ref = f"{pr['original_bn']['auc']:.2f}" if "original_bn" in pr else "-"
        lines.append(f"| {m['member']} | {pr['original']['auc']:.2f} | {pr['edited']['auc']:.2f} | {ref} |")
    return "\n".join(lines) + "\n"


def _merge(files: list[str], out: Path) -> None:
    from metaprune.io import atomic_path, read_json, write_json

    parts = [read_json(f) for f in files]
    setups = [{k: v for k, v in p["setup"].items() if k != "members"} for p in parts]
    if any(s != setups[0] for s in setups[1:]):
        raise SystemExit("the files to merge hold results of different setups")
    res = {"setup": dict(parts[0]["setup"]), "members": []}
    for part in parts:
        for m in part["members"]:
            if m["member"] not in {x["member"] for x in res["members"]}:
                res["members"].append(m)
    res["setup"]["members"] = [m["member"] for m in res["members"]]
    write_json(out, res)
    with atomic_path(out.with_suffix(".md")) as tmp:
        tmp.write_text(_table(res))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoo", help="zoo folder (required unless --merge)")
    p.add_argument("--members", nargs="+", help="held-out member folders (names inside --zoo)")
    p.add_argument("--metanet", default=str(ROOT / "checkpoints" / "metanet_cifar_resnet_fmnist"))
    p.add_argument("--speedups", type=float, nargs="+", default=[2.0, 3.0])
    p.add_argument("--epochs", type=int, default=2, help="total training epochs of every arm")
    p.add_argument("--steps-per-epoch", type=int, default=40)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--sl-lam", type=float, default=5e-4, help="DepGraph sparse-learning strength (reference value)")
    p.add_argument("--recovery-epochs", type=int, default=1,
                   help="arm (c): finetune epochs between the metanetwork edit and pruning (the paper's recipe: 1 "
                   "here); the rest of the budget follows pruning")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    p.add_argument("--on-validation", action="store_true",
                   help="run on the metanetwork's validation members (to choose a recipe; never for reporting)")
    p.add_argument("--curve-batches", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("-o", "--output", default=str(ROOT / "results" / "compare_fmnist.json"))
    p.add_argument("--merge", nargs="+", help="only merge these result JSONs (same setup) into -o and its table")
    a = p.parse_args()
    if a.merge:
        _merge(a.merge, Path(a.output))
        return
    if not a.zoo or not a.members:
        p.error("--zoo and --members are required (unless --merge)")
    if not 0 <= a.recovery_epochs <= a.epochs:
        p.error("--recovery-epochs must be between 0 and --epochs")

    import torch

    torch.set_num_threads(a.threads)
    from metaprune.engine import evaluate
    from metaprune.io import read_json, write_json
    from metaprune.metanet.checkpoint import load_metanet
    from metaprune.metanet.transform import transform_model
    from metaprune.metanet.zoo import load_member, load_zoo_data
    from metaprune.pruning import PruneConfig, SparseRegularizer, plot_curves, prunability_curve, prune

    zcfg = read_json(Path(a.zoo) / "zoo.json")["config"]
    data = load_zoo_data(a.zoo)
    shape = (data.in_chans, data.image_size, data.image_size)
    net, meta = load_metanet(a.metanet)
    used = set(meta.get("train_members", [])) | set(meta.get("val_members", []))
    same_zoo = Path(meta.get("zoo", "")).resolve() == Path(a.zoo).resolve()
    if a.on_validation:
        if not same_zoo or not set(a.members) <= set(meta.get("val_members", [])):
            raise SystemExit(f"--on-validation takes validation members only: {meta.get('val_members')}")
    elif same_zoo and (clash := used & set(a.members)):
        raise SystemExit(f"members {sorted(clash)} were used in meta-training/selection; pick held-out ones")
    out = Path(a.output)
    res = {"setup": {"arch": zcfg["arch"], "members": a.members, "speedups": a.speedups, "epochs": a.epochs,
                     "steps_per_epoch": a.steps_per_epoch, "lr": a.lr, "sl_lam": a.sl_lam,
                     "metanet_recovery_epochs": a.recovery_epochs, "arms": a.arms,
                     "split": "validation members" if a.on_validation else "held-out members",
                     "train_subset": zcfg["train_subset"], "metanet": a.metanet,
                     "metanet_selected_epoch": meta.get("selected_epoch"),
                     # identifies the checkpoint, so results of another metanetwork are never merged in
                     "metanet_val_score": meta.get("val_score"), "metanet_train_members": meta.get("train_members")},
           "members": []}
    if out.exists():
        old = read_json(out)
        same = {k: v for k, v in old.get("setup", {}).items() if k != "members"} == \
            {k: v for k, v in res["setup"].items() if k != "members"}
        if not same:
            raise SystemExit(f"{out} holds results of another setup; choose another -o (or delete it)")
        old["setup"]["members"] = sorted(set(old["setup"]["members"]) | set(a.members))
        res = old
    done = {m["member"] for m in res["members"]}
    for name in a.members:
        if name in done:
            continue
        t0 = time.time()
        path = Path(a.zoo) / name
        base, metrics = load_member(path)
        seed = int(metrics["seed"])
        rec = {"member": name, "seed": seed, "base_test_acc": metrics["test_acc"], "arms": {a_: {} for a_ in ARMS}}
        edited = transform_model(net, base, data.train, 8)
        cb = a.curve_batches
        c0 = prunability_curve(base, data, 3.0, 5, val_batches=cb, calib_batches=cb)
        c1 = prunability_curve(edited, data, 3.0, 5, val_batches=cb, calib_batches=cb)
        # reference only (never used for selection): the same pruner ranking by BN scale instead of L2
        c0bn = prunability_curve(base, data, 3.0, 5, criterion="bn", val_batches=cb, calib_batches=cb)
        rec["prunability"] = {"original": c0, "edited": c1, "original_bn": c0bn}
        plot_curves({"original": c0, "metanet-edited": c1}, out.parent / f"metanet_prunability_{name}.png",
                    f"{zcfg['arch']} {name} (held out): prunability")
        print(f"{name}: prunability original {c0['auc']:.2f} edited {c1['auc']:.2f} "
              f"(original with BN-scale ranking {c0bn['auc']:.2f})", flush=True)
        rec["edited_test_acc_no_ft"] = evaluate(edited, data.test)["acc"]
        starts = {"magnitude": (base, a.epochs)}
        if "depgraph" in a.arms:
            sl = copy.deepcopy(base).train()
            sl = _finetune(sl, data, 1, a.steps_per_epoch, seed, a.lr, SparseRegularizer(sl, shape, a.sl_lam))
            starts["depgraph"] = (sl, a.epochs - 1)
        if "metanet" in a.arms:
            starts["metanet"] = (_finetune(copy.deepcopy(edited), data, a.recovery_epochs, a.steps_per_epoch, seed,
                                           a.lr), a.epochs - a.recovery_epochs)
        for arm in a.arms:
            start, left = starts[arm]
            for s in a.speedups:
                pr = prune(start, PruneConfig(speedup=s, criterion="l2"), input_shape=shape)  # the magnitude arms
                ft = _finetune(pr.model, data, left, a.steps_per_epoch, seed, a.lr)
                acc = evaluate(ft, data.test)["acc"]
                rec["arms"][arm][str(s)] = {"test_acc": acc, "speedup": pr.speedup, "macs": pr.macs_after,
                                            "params": pr.params_after}
                print(f"{name} {arm} {s}x: test {acc:.2f} (achieved {pr.speedup:.2f}x)", flush=True)
        rec["seconds"] = time.time() - t0
        res["members"].append(rec)
        write_json(out, res)
        md = out.with_suffix(".md")
        with open(md.with_suffix(".md.tmp"), "w") as f:
            f.write(_table(res))
        Path(md.with_suffix(".md.tmp")).replace(md)


if __name__ == "__main__":
    main()
