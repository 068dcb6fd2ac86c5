"""Training targets of the ranking metanetwork: the ``gate`` scores of zoo members, cached.

For every member the ``gate`` criterion (:func:`metaprune.pruning.gate.learn_gate_scores`) is run at a MAC
speed-up target exactly as ``prune(model, PruneConfig(speedup=S, criterion="gate", seed=SEED, round_to=1),
calibration=BatchLoader(data.train, 128, shuffle=True, augment=False, seed=SEED))`` runs it (so the targets
are the ranking the ``gate`` baseline prunes with). Each result is cached as one safetensors file (one
tensor per torch-pruning group, keyed ``"<root module>:<out|in>"``) with a JSON sidecar holding its
fingerprint: the member file's SHA-256, the gate settings, the SHA-256 of ``gate.py``'s source, the
torch-pruning version and the data identity. A cache entry whose fingerprint does not match the current
one is recomputed, never reused.
"""

from __future__ import annotations

import functools
import hashlib
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from metaprune.errors import ModelFileError
from metaprune.fingerprint import fingerprint
from metaprune.io import atomic_path, file_sha256, read_json, write_json

GATE_BATCH = 128


@functools.lru_cache(maxsize=1)
def gate_source_sha256() -> str:
    """SHA-256 of the ``gate`` criterion's source file (a change of the algorithm invalidates the cache).

    Read once per process, right after the module is imported, so it names the code this process runs
    (a long-running loop should compute every member in a fresh process: ``tools/gate_targets.py``)."""
    import metaprune.pruning.gate as gate

    return hashlib.sha256(Path(gate.__file__).read_bytes()).hexdigest()


def gate_settings(speedup: float, seed: int = 0) -> dict:
    """The gate settings of a target: the :class:`PruneConfig` defaults for steps / lr (the shipped criterion)."""
    from metaprune.pruning import PruneConfig

    cfg = PruneConfig(speedup=speedup, criterion="gate", seed=seed, round_to=1)
    return {"speedup": float(speedup), "seed": int(seed), "gate_steps": int(cfg.gate_steps),
            "gate_lr": float(cfg.gate_lr), "global": bool(cfg.global_pruning),
            "max_layer_ratio": float(cfg.max_layer_ratio), "batch": GATE_BATCH, "round_to": 1}


def target_fingerprint(member: Path, speedup: float, seed: int = 0) -> dict:
    """What a cached target depends on (see the module docstring)."""
    import torch_pruning as tp

    zoo = read_json(member.parent / "zoo.json")["config"]
    data = {k: zoo.get(k) for k in ("data", "val_fraction", "data_seed", "train_subset")}
    return {"member_sha256": file_sha256(member / "model.safetensors"), "gate": gate_settings(speedup, seed),
            "gate_py_sha256": gate_source_sha256(), "torch_pruning": getattr(tp, "__version__", "?"), "data": data}


def cache_paths(cache: Path, member: Path, speedup: float, seed: int = 0) -> tuple[Path, Path]:
    stem = cache / member.parent.name / member.name / (f"gate_s{speedup:g}" + (f"_seed{seed}" if seed else ""))
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def load_cached(cache: Path, member: Path, speedup: float, seed: int = 0,
                accept_gate_sha: tuple[str, ...] = ()) -> dict[str, torch.Tensor] | None:
    """The cached gate scores of ``member`` if their fingerprint matches the current one, else None.

    ``accept_gate_sha``: explicitly named earlier ``gate.py`` hashes (full or a prefix of >= 8 hex digits)
    whose entries are accepted when everything else matches (e.g. a refactor that leaves the scores
    unchanged); the caller records which one it used (:func:`cached_identity`).
    """
    st, js = cache_paths(cache, member, speedup, seed)
    if not (st.exists() and js.exists()):
        return None
    try:
        meta = read_json(js)
    except ModelFileError:
        return None
    now = target_fingerprint(member, speedup, seed)
    if meta.get("fingerprint") != fingerprint(now):
        old = meta.get("identity")
        sha = old.get("gate_py_sha256", "") if isinstance(old, dict) else ""
        ok = [a for a in accept_gate_sha if len(a) >= 8 and sha.startswith(a)]
        if not ok or meta.get("fingerprint") != fingerprint({**now, "gate_py_sha256": sha}):
            return None
    return load_file(str(st))


def cached_identity(cache: Path, member: Path, speedup: float, seed: int = 0) -> dict:
    """The stored identity (fingerprint inputs) of a cache entry."""
    return read_json(cache_paths(cache, member, speedup, seed)[1]).get("identity", {})


def compute_targets(member: Path, speedup: float, seed: int = 0, cache: Path | None = None,
                    data=None) -> tuple[dict[str, torch.Tensor], dict]:
    """Learn the gate scores of ``member`` (a zoo member folder) at ``speedup`` and cache them.

    Returns ``(scores by group key, info)``; a matching cache entry is returned without recomputation.
    """
    from metaprune.data import BatchLoader
    from metaprune.engine.report import input_shape
    from metaprune.metanet.zoo import load_member, load_zoo_data
    from metaprune.pruning import PruneConfig
    from metaprune.pruning.criteria import SCORES_ATTR
    from metaprune.pruning.gate import learn_gate_scores

    member = Path(member)
    if cache is not None:
        hit = load_cached(cache, member, speedup, seed)
        if hit is not None:
            return hit, read_json(cache_paths(cache, member, speedup, seed)[1])
    fp = target_fingerprint(member, speedup, seed)
    model, _ = load_member(member)
    data = data if data is not None else load_zoo_data(member.parent)
    cfg = PruneConfig(speedup=speedup, criterion="gate", seed=seed, round_to=1)
    x = torch.randn(1, *input_shape(model, data), generator=torch.Generator().manual_seed(seed))
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    info = learn_gate_scores(model, cfg, x, BatchLoader(data.train, GATE_BATCH, shuffle=True, augment=False,
                                                        seed=seed), desc=f"gate {member.name}")
    scores = {k: v.detach().float().cpu().contiguous() for k, v in getattr(model, SCORES_ATTR)["scores"].items()}
    meta = {"fingerprint": fingerprint(fp), "identity": fp, "member": str(member), "info": info,
            "cpu_seconds": round(time.perf_counter() - t0, 2)}
    if cache is not None:
        st, js = cache_paths(cache, member, speedup, seed)
        with atomic_path(st, track=False) as tmp:
            save_file(scores, str(tmp))
        write_json(js, meta)
    return scores, meta
