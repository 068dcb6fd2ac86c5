"""The error hierarchy. Every message says what was wrong and what to do about it.

The command line prints ``error: <message>`` for any :class:`MetapruneError` and exits
with status 2, without a traceback.
"""


class MetapruneError(Exception):
    """Base class of every error metaprune raises on purpose."""


class ConfigError(MetapruneError, ValueError):
    """An option or a config value is invalid (out of range, unknown name, wrong type)."""


class UnknownNameError(ConfigError, KeyError):
    """A registry lookup (model, dataset, task, method, criterion) failed."""

    def __str__(self) -> str:  # KeyError quotes its message; we don't want that
        return str(self.args[0]) if self.args else ""


class ModelFileError(MetapruneError):
    """A model, graph, checkpoint or bundle file is missing, truncated, corrupt or does not match."""


class DataError(MetapruneError):
    """A dataset is missing or its files are unreadable."""


class OutputError(MetapruneError):
    """An output path cannot be written (or would overwrite an input)."""


class GraphError(MetapruneError):
    """A network cannot be converted to or from a graph."""


class PruningError(MetapruneError):
    """A pruning target cannot be reached or a pruning option is invalid."""


class BundleError(ModelFileError):
    """A Structured Pruning Adapter bundle is invalid or belongs to another source model."""


class TrainingError(MetapruneError):
    """A training run cannot go on (e.g. its loss or its weights became NaN or infinite)."""
