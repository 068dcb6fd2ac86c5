"""The best block-padded MAC speed-up a stage-wise width choice of CIFAR ResNet-56 can give at 2.5x fewer MACs.

onnxruntime's MLAS NCHWc convolutions (block 16 on AVX-512) pad an output width up to a multiple of the
block and read an input of at least one block padded the same way (narrower inputs unpadded). This counts
MACs on those padded widths for every combination of a residual width per stage and up to two different
block-internal widths per stage, keeps those within 2 % of 2.5x fewer real MACs, and prints the best padded
speed-ups: the ceiling of onnxruntime's latency/MAC ratio that widths alone can reach
(results/round_to_auto.md). Pure arithmetic:

    python tools/ort_width_ceiling.py
"""

from __future__ import annotations

import itertools
import math

BLOCK = 16
HW = (1024, 256, 64)  # output pixels per stage (32x32, 16x16, 8x8)
BASE = ((16, 32, 64), ((16,) * 9, (32,) * 9, (64,) * 9))
RESIDUAL = ((8, 16), (16, 24, 32), (16, 32, 48, 64))
INTERNAL = ((4, 8, 16), (8, 16, 24, 32), (16, 32, 48, 64))


def conv(cin: int, cout: int, k: int, hw: int, pad: bool) -> int:
    if pad:
        cin = cin if cin < BLOCK else math.ceil(cin / BLOCK) * BLOCK
        cout = math.ceil(cout / BLOCK) * BLOCK
    return cin * cout * k * k * hw


def macs(residual, internal, pad: bool) -> int:
    """Conv MACs of ResNet-56 (stem, 3 stages of 9 basic blocks, 1x1 shortcut convs at the stage changes)."""
    total = conv(3, residual[0], 3, HW[0], pad)
    for s in range(3):
        for b in range(9):
            cin = residual[s - 1] if (b == 0 and s > 0) else residual[s]
            total += conv(cin, internal[s][b], 3, HW[s], pad) + conv(internal[s][b], residual[s], 3, HW[s], pad)
            if b == 0 and s > 0:
                total += conv(residual[s - 1], residual[s], 1, HW[s], pad)
    return total


def main(target: float = 2.5, tol: float = 0.02) -> None:
    real0, pad0 = macs(*BASE, False), macs(*BASE, True)
    found = []
    for residual in itertools.product(*RESIDUAL):
        mixes = [[(a,) * n + (b,) * (9 - n) for a, b in itertools.combinations_with_replacement(opts, 2)
                  for n in range(10)] for opts in INTERNAL]
        for internal in itertools.product(*mixes):
            real = real0 / macs(residual, internal, False)
            if abs(real / target - 1) <= tol:
                found.append((pad0 / macs(residual, internal, True), real, residual,
                              [sorted(set(x)) for x in internal]))
    found.sort(key=lambda t: -t[0])
    best: dict = {}
    for f in found:
        best.setdefault(f[2], f)
    print(f"{len(found)} width choices within {tol:.0%} of {target}x fewer MACs; best per residual widths:")
    for padded, real, residual, internal in sorted(best.values(), key=lambda f: -f[0])[:15]:
        print(f"padded {padded:.3f}x  real {real:.3f}x  padded/real {padded / real:.3f}  residual {residual}  "
              f"internal {internal}")


if __name__ == "__main__":
    main()
