"""Compute (and cache) the ``gate`` scores of zoo members: the targets of the ranking metanetwork.

Resumable and safe to rerun: a member whose cache entry matches the current fingerprint (member file,
gate settings, gate.py source, data) is skipped; a stale entry is recomputed. Every member runs in a fresh
process, so the gate.py hash recorded is the code that ran. With --wait the tool polls for members that
are still being trained (a zoo.json that promises more members than exist) until all are done.

    nohup nice -n 5 env OMP_NUM_THREADS=1 .venv/bin/python tools/gate_targets.py --wait \\
        --zoos runs/zoo_train_r20 runs/zoo_train_r32 runs/zoo_train_r44 runs/zoo_val_r20 runs/zoo_val_r32 \\
        --speedups 3 > /tmp/team/rank_targets.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.heldout import refuse_held_out  # noqa: E402

LOCK_S = 1800  # a lock older than this is a crashed worker's


def _members(zoo: Path) -> tuple[list[Path], int]:
    try:
        count = int(json.loads((zoo / "zoo.json").read_text())["config"]["count"])
    except (OSError, ValueError, KeyError):
        count = 0
    done = sorted(p for p in zoo.glob("member_*") if (p / "model.safetensors").exists())
    return done, count


def one(member: str, speedup: float, cache: str, seed: int) -> None:
    import torch

    torch.set_num_threads(1)
    from metaprune.metanet.targets import compute_targets, load_cached

    m = Path(member)
    if load_cached(Path(cache), m, speedup, seed) is not None:
        print(f"{member} {speedup:g}x: cached", flush=True)
        return
    _, meta = compute_targets(m, speedup, seed, cache=Path(cache))
    print(f"{member} {speedup:g}x: {meta['cpu_seconds']:.0f} s, loss {meta['info']['loss_first']:.3f} -> "
          f"{meta['info']['loss_last']:.3f}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--zoos", nargs="+", required=True)
    p.add_argument("--speedups", type=float, nargs="+", default=[3.0])
    p.add_argument("--cache", default=str(ROOT / "runs" / "gate_targets"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait", action="store_true", help="poll for members still being trained")
    p.add_argument("--reverse", action="store_true", help="last zoo and member first (a second worker)")
    p.add_argument("--one", nargs=2, metavar=("MEMBER", "SPEEDUP"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        one(a.one[0], float(a.one[1]), a.cache, a.seed)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed worker still removes its lock
    refuse_held_out(zoos=a.zoos)
    while True:
        pending = False
        for s in a.speedups:  # every member at the first speed-up before any at the next
            for z in map(Path, a.zoos[::-1] if a.reverse else a.zoos):
                done, count = _members(z)
                done = done[::-1] if a.reverse else done
                pending |= len(done) < count or count == 0
                for m in done:
                    lock = Path(a.cache) / z.name / m.name / f".gate_s{s:g}.lock"
                    lock.parent.mkdir(parents=True, exist_ok=True)
                    if lock.exists() and time.time() - lock.stat().st_mtime < LOCK_S:
                        pending = True  # another worker computes it: look again later
                        continue
                    lock.write_text(str(os.getpid()))
                    t0 = time.time()
                    try:
                        r = subprocess.run([sys.executable, __file__, "--cache", a.cache, "--seed", str(a.seed),
                                            "--zoos", *a.zoos, "--one", str(m), str(s)])
                    finally:
                        lock.unlink(missing_ok=True)
                    if r.returncode:
                        print(f"{m} {s:g}x: failed (exit {r.returncode})", flush=True)
                    elif time.time() - t0 > 30:
                        pending = True  # something was computed: rescan (gate.py may have changed meanwhile)
        if not (a.wait and pending):
            break
        time.sleep(60)
    print("done", flush=True)


if __name__ == "__main__":
    main()
