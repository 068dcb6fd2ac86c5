"""Training, evaluation, measurement and the runtime (devices, seeds, progress, DDP)."""

from metaprune.engine.evaluate import evaluate
from metaprune.engine.measure import count_macs, count_params, measure_latency, profile_model, state_bytes
from metaprune.engine.runtime import is_main, progress, resolve_device, seed_everything, set_quiet
from metaprune.engine.train import Regularizer, TrainConfig, TrainResult, make_optimizer, train

__all__ = [
    "Regularizer",
    "TrainConfig",
    "TrainResult",
    "count_macs",
    "count_params",
    "evaluate",
    "is_main",
    "make_optimizer",
    "measure_latency",
    "profile_model",
    "progress",
    "resolve_device",
    "seed_everything",
    "set_quiet",
    "state_bytes",
    "train",
]
