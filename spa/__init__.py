"""Structured Pruning Adapters: one frozen source model, many pruned task-specific derivatives.

A task's derivative is a *bundle* (masks + masked adapter factors + kept biases, norms and the
head) that :func:`merge` fuses with the source into a plain dense pruned model.
"""

from spa.adapt import adapt_model, fuse_model, learned_parameters
from spa.api import AdaptConfig, AdaptResult, adapt_task, adapt_tasks
from spa.bundle import load_bundle, merge, read_bundle, save_bundle
from spa.methods import METHODS, get_method

__all__ = ["METHODS", "AdaptConfig", "AdaptResult", "adapt_model", "adapt_task", "adapt_tasks", "fuse_model",
           "get_method", "learned_parameters", "load_bundle", "merge", "read_bundle", "save_bundle"]
