"""Options of :func:`metaprune.pruning.prune` (and of ``metaprune prune``)."""

from __future__ import annotations

from dataclasses import dataclass

from metaprune.errors import ConfigError

CRITERIA = ("l2", "l1", "bn", "taylor", "random", "functional", "gate", "metanet")


@dataclass
class PruneConfig:
    """What to remove and how to rank it.

    Exactly one target is given:

    Args:
        ratio: share of the prunable channels (and attention heads) removed from every group, in (0, 1).
        speedup: target MAC reduction ``base MACs / pruned MACs`` (> 1); the channel ratio is
            searched until the achieved value is within ``tolerance`` of it.
        params_ratio: target parameter reduction ``base params / pruned params`` (> 1), searched likewise.
        criterion: channel importance: ``functional`` (default; ||(gamma, beta)|| x ||next layer's input
            columns||, free: on 12 held-out ResNet-20 at 3x MACs +1.00 +- 0.30 points over ``l2`` after the
            80-step finetune, +14.5 without, results/methods_r20_n12.md), ``l2`` / ``l1`` group magnitude
            (torch-pruning's default), ``bn`` (BatchNorm scale), ``taylor`` (|w * dL/dw|, needs calibration
            batches), ``random`` or ``gate`` (one score per channel
            optimised on training batches with hard top-k gates to match the unpruned network's predictions;
            see :mod:`metaprune.pruning.gate`).
        global_pruning: rank all groups against one threshold (non-uniform widths) instead of
            removing the same share from each group.
        round_to: ``"auto"`` (default): keep widths that suit the device and dtype the model is on (a multiple
            from :data:`metaprune.pruning.rounding.TABLE`, smaller for narrow layers; heads stay whole); an
            int N > 1: torch-pruning's ``round_to=N``; 1 (or None): exact, unrounded widths.
        ignore: module names (as in ``model.named_modules()``) that must keep their output width;
            the classifier is always protected (unless ``keep_output``).
        keep_output: keep the width of every layer whose output channels reach a model output (traced
            back from the outputs through norms, activations, additions, concatenation), instead of
            protecting the one guessed classifier: for feature extractors, segmentation / detection
            backbones and models with several outputs. Without it a pruned model whose output shapes
            change is refused.
        max_layer_ratio: no layer loses more than this share of its channels (global pruning), and
            the upper end of the target search.
        prune_heads: in attention layers remove whole heads (else attention widths are kept).
        tolerance: relative tolerance of a speed-up / params target.
        search_iters: bisection steps of the target search (it stops early once within tolerance).
        global_steps: pruning steps of global pruning (small steps enforce ``max_layer_ratio``).
        taylor_batches: batches used to accumulate gradients for the ``taylor`` criterion.
        seed: seed of the ``random`` criterion and of ``gate`` training.
        gate_steps: Adam steps of the ``gate`` criterion (one training batch each).
        gate_lr: peak Adam learning rate of the ``gate`` scores (it decays to 0 on a cosine over ``gate_steps``).
        reconstruct: after pruning, refit each pruned group's consumer layer by ridge least squares so its
            outputs match the unpruned network's on calibration batches, then recalibrate BatchNorm
            (:mod:`metaprune.pruning.reconstruct`). ``"auto"`` (default): on whenever :func:`prune` gets
            calibration batches (the CLI: ``--data``) and the model's dependency graph allows it (not
            torchvision's Swin / MaxViT, where it is skipped and ``info["reconstruct"]`` says so), off
            without them; ``True``: always (calibration batches required); ``False``: never. It is the
            default because it was the best method measured: at 3x MACs on held-out ResNet-20s +1.38 +- 0.20
            points after the 80-step finetune (12 converged members, results/methods_c20.md), +2.5 to +3.8
            on 6 four-epoch ResNet-20s and +2.7 on 6 ResNet-56s (results/reconstruct_r*.md), +4.3 on 5 small
            ViTs (results/methods_vit.md); without finetuning 89.7 % where the ranking alone keeps 48-50 %.
        reconstruct_batches: calibration batches used by ``reconstruct``.
        metanet: folder of a score metanetwork (``criterion="metanet"``: one forward pass of it on the model's
            graph gives every channel's score; see :mod:`metaprune.metanet.rank`).
    """

    ratio: float | None = None
    speedup: float | None = None
    params_ratio: float | None = None
    criterion: str = "functional"
    global_pruning: bool = False
    round_to: int | str | None = "auto"
    ignore: tuple[str, ...] = ()
    keep_output: bool = False
    max_layer_ratio: float = 0.9
    prune_heads: bool = True
    tolerance: float = 0.02
    search_iters: int = 16
    global_steps: int = 5
    taylor_batches: int = 4
    seed: int = 0
    gate_steps: int = 250
    gate_lr: float = 0.05
    reconstruct: bool | str = "auto"
    reconstruct_batches: int = 8
    metanet: str | None = None

    def __post_init__(self) -> None:
        self.ignore = tuple(self.ignore)
        given = [n for n in ("ratio", "speedup", "params_ratio") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ConfigError("give exactly one pruning target: --ratio R (share of channels removed, 0<R<1), "
                              f"--speedup S (MAC reduction, S>1) or --params-ratio P (parameter reduction, P>1); got {given or 'none'}")
        if self.ratio is not None and not 0.0 < self.ratio < 1.0:
            raise ConfigError(f"--ratio {self.ratio} is outside (0, 1); it is the share of channels removed, e.g. 0.5")
        if self.speedup is not None and not self.speedup > 1.0:
            raise ConfigError(f"--speedup {self.speedup} must be > 1 (base MACs / pruned MACs, e.g. 2.5)")
        if self.params_ratio is not None and not self.params_ratio > 1.0:
            raise ConfigError(f"--params-ratio {self.params_ratio} must be > 1 (base params / pruned params, e.g. 2 "
                              "halves the parameters)")
        if self.criterion not in CRITERIA:
            raise ConfigError(f"unknown criterion {self.criterion!r}; valid: {', '.join(CRITERIA)}")
        from metaprune.pruning.rounding import parse_round_to

        checked = parse_round_to(self.round_to)  # "auto" or an int >= 1, else ConfigError
        if isinstance(self.round_to, str):  # "8" from the CLI -> 8
            self.round_to = checked
        if not 0.0 < self.max_layer_ratio < 1.0:
            raise ConfigError(f"max_layer_ratio {self.max_layer_ratio} must be in (0, 1)")
        if not 0.0 < self.tolerance < 0.5:
            raise ConfigError(f"tolerance {self.tolerance} must be in (0, 0.5)")
        if self.search_iters < 1 or self.global_steps < 1 or self.taylor_batches < 1:
            raise ConfigError("search_iters, global_steps and taylor_batches must be >= 1")
        if self.gate_steps < 1 or not self.gate_lr > 0:
            raise ConfigError(f"--gate-steps {self.gate_steps} must be >= 1 and the gate learning rate > 0")
        if (self.criterion == "metanet") != (self.metanet is not None):
            raise ConfigError("criterion 'metanet' needs a score metanetwork (--metanet FOLDER, e.g. "
                              "checkpoints/metanet_rank_fmnist), and --metanet is used only with --criterion metanet")
        if self.metanet is not None:
            self.metanet = str(self.metanet)
        if self.reconstruct not in (True, False, "auto"):
            raise ConfigError(f"reconstruct {self.reconstruct!r} must be True, False or 'auto' (on when calibration "
                              "batches / --data are given)")
        if self.reconstruct != "auto":
            self.reconstruct = bool(self.reconstruct)
        if self.reconstruct_batches < 1:
            raise ConfigError(f"--reconstruct-batches {self.reconstruct_batches} must be >= 1")

    @property
    def target(self) -> tuple[str, float]:
        """``(kind, value)`` of the target: ``ratio``, ``speedup`` or ``params_ratio``."""
        for name in ("ratio", "speedup", "params_ratio"):
            value = getattr(self, name)
            if value is not None:
                return name, float(value)
        raise AssertionError("unreachable: validated in __post_init__")
