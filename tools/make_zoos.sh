#!/usr/bin/env bash
# The zoos behind results/methods_*.json (issue 14): training members of three depths, validation
# members for checkpoint selection, held-out ResNet-20 and ResNet-56 members, held-out converged ResNet-20s. Resumable: rerun to
# continue. Recipe of runs/zoo_h7 (Fashion-MNIST, 10k-image subset, 4 epochs, onecycle): cheap on
# 2 CPU cores, ~83 % test (below the 88 % the issue asks for where the budget allows).
set -euo pipefail
cd "$(dirname "$0")/.."
MP=${MP:-.venv/bin/metaprune}
R="--data fashion-mnist --train-subset 10000 --epochs 4 -q"
zoo() { echo "== $*"; $MP zoo $R "$@"; }
# order = priority on 2 shared cores: training and validation members first (small), then the
# held-out members the evaluation needs, then the remaining training depth
zoo --model cifar_resnet20 --count 6 --seed 100 -o runs/zoo_h7        # held-out ResNet-20, members 0-5
zoo --model cifar_resnet20 --count 4 --seed 300 -o runs/zoo_train_r20  # training members (the metanetwork sees only these)
zoo --model cifar_resnet32 --count 2 --seed 310 -o runs/zoo_train_r32
zoo --model cifar_resnet20 --count 6 --seed 106 -o runs/zoo_h7b       # held-out ResNet-20, six more
zoo --model cifar_resnet20 --count 3 --seed 400 -o runs/zoo_val_r20    # validation members (selection only)
zoo --model cifar_resnet56 --count 6 --seed 500 -o runs/zoo_h56       # held-out ResNet-56
zoo --model cifar_resnet32 --count 3 --seed 310 -o runs/zoo_train_r32
zoo --model cifar_resnet32 --count 3 --seed 410 -o runs/zoo_val_r32    # validation members of a 2nd depth
# small ViTs (vit_tiny_p4 at 28 px, AdamW; ~16 min per member on a shared core, ~63 % test after 4 epochs):
# 2 training members for the ViT ranking metanetwork (member_002: its first held-out member) + 4 more held out
V="--optimizer adamw --lr 1e-3 --weight-decay 0.05"
zoo --model vit_tiny_p4 --count 3 --seed 600 $V -o runs/zoo_vit_train
zoo --model vit_tiny_p4 --count 3 --seed 700 $V -o runs/zoo_vit_h
zoo --model vit_tiny_p4 --count 1 --seed 710 $V -o runs/zoo_vit_h2
zoo --model cifar_resnet44 --count 3 --seed 320 -o runs/zoo_train_r44
# held-out ResNet-20s trained to convergence (all 54k training images, 5 epochs: 91-92 % test, ~6-8 min each on a
# shared core; results/methods_c20.md)
echo "== converged: --model cifar_resnet20 --count 8 --seed 900 --epochs 5 -o runs/zoo_c20"
$MP zoo --data fashion-mnist --epochs 5 -q --model cifar_resnet20 --count 8 --seed 900 -o runs/zoo_c20
# converged training members (91.8-92.3 %) for a ranking metanetwork trained at that level (results/methods_c20_convmeta.md)
$MP zoo --data fashion-mnist --epochs 5 -q --model cifar_resnet20 --count 2 --seed 950 -o runs/zoo_ctrain_a
$MP zoo --data fashion-mnist --epochs 5 -q --model cifar_resnet20 --count 2 --seed 960 -o runs/zoo_ctrain_b
# converged validation members (selection among converged-trained metanetworks) and four more held-out ones
$MP zoo --data fashion-mnist --epochs 5 -q --model cifar_resnet20 --count 6 --seed 980 -o runs/zoo_cval
$MP zoo --data fashion-mnist --epochs 5 -q --model cifar_resnet20 --count 4 --seed 908 -o runs/zoo_c20b
echo done
