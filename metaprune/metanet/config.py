"""Configuration dataclasses of the metanetwork and of meta-training (JSON round-trip)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from metaprune.errors import ConfigError
from metaprune.fingerprint import check_bool, check_float, check_int


@dataclass
class MetanetConfig:
    """Shape of the metanetwork (:class:`metaprune.metanet.model.Metanet`).

    The defaults are ``metaprune meta-train``'s (the CLI takes them from here): the shipped recipe's hidden 32,
    4 layers, scale edit.

    Attributes:
        hidden: width of node and edge states.
        layers: number of bidirectional message-passing layers.
        rho: scale of the edit: for ``edit="residual"`` in units of each layer's own spread
            (output = input + rho * decoder(h) * layer_scale; default 0.05); for ``edit="scale"``
            the bound of the log channel scale before its per-layer centring (default 1.0; after
            centring ``|log s| < 2 * rho``). ``None`` picks the default of the edit.
        edit: ``"scale"`` (default, the shipped recipe; function-preserving: every channel that feeds a BatchNorm gets its
            incoming weights multiplied by a positive factor ``s_c = exp(rho * tanh(d(h_c)))``,
            centred to geometric mean 1 within each layer;
            BatchNorm undoes it, so the network computes the same function after BN
            re-estimation, but the L2 magnitudes the pruner ranks channels by change -- the
            metanetwork learns which channels the pruner should keep) or ``"residual"`` (the paper's:
            every node and edge feature gets a residual edit). Ignored with ``output="score"`` (recorded there as
            ``"residual"``, rho 0.05, as score networks always were).
        output: ``"edit"`` (default: the metanetwork returns edited node and edge features, see ``edit``)
            or ``"score"`` (one importance score per node, a pruning criterion: trained to rank channels as
            the per-network ``gate`` criterion does, see :mod:`metaprune.metanet.rank`). A score metanetwork
            also reads hand-made per-channel magnitudes (:func:`metaprune.metanet.model.score_features`).
        node_dim: node feature size of the graphs it reads (set from the first graph).
        edge_dims: feature size of every edge group, by group name (set from the first graph).
        frozen_groups: edge groups that are never edited (identity shortcuts carry no weight).
        frozen_slots: node slots that are read but never edited. BatchNorm running statistics are
            re-estimated after an edit (train-mode statistics in meta-training, recalibration in
            ``transform``), so editing them would have no effect.
        node_roles, edge_roles: sizes of the role-embedding tables.
        depth_freqs: number of sinusoidal frequencies encoding the relative depth (0..1) of a node.
        edge_chunk: process edges in chunks of this size (contiguous slices of the target-sorted
            edges; partial aggregates are combined exactly). With gradients on, every chunk is
            recomputed in the backward pass, so per layer only the edge states themselves are kept.
            ``None`` processes all edges at once.
        checkpoint: recompute each layer in the backward pass (only its input is kept); with
            ``edge_chunk`` the recomputation is itself chunked (nested). With either option the
            C allocator's free pages are returned to the OS between layers
            (:mod:`metaprune.metanet.memory`).
        fused: compute messages and their aggregates in one autograd function that recomputes
            messages in backward instead of storing them
            (:func:`metaprune.metanet.fused.message_aggregate`); False uses PyG's ``propagate``
            (reference path). Same weights either way.
    """

    hidden: int = 32
    layers: int = 4
    rho: float | None = None
    edit: str = "scale"
    output: str = "edit"
    node_dim: int = 0
    edge_dims: dict[str, int] = field(default_factory=dict)
    frozen_groups: tuple[str, ...] = ("id",)
    frozen_slots: tuple[str, ...] = ("bn_mean", "bn_var")
    node_roles: int = 16
    edge_roles: int = 16
    depth_freqs: int = 4
    edge_chunk: int | None = None
    checkpoint: bool = False
    fused: bool = True

    def __post_init__(self) -> None:
        for name in ("frozen_groups", "frozen_slots"):
            v = getattr(self, name)
            if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
                raise ConfigError(f"metanetwork {name} must be a list of names, got {v!r}")
            setattr(self, name, tuple(v))
        check_int("metanetwork hidden", self.hidden, 1)
        check_int("metanetwork layers", self.layers, 0)
        for name in ("node_dim", "node_roles", "edge_roles", "depth_freqs"):
            check_int(f"metanetwork {name}", getattr(self, name), 0)
        if not isinstance(self.edge_dims, dict) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
                for k, v in self.edge_dims.items()):
            raise ConfigError(f"metanetwork edge_dims must map edge group names to sizes, got {self.edge_dims!r}")
        if self.edit not in ("residual", "scale"):
            raise ConfigError(f"unknown metanetwork edit {self.edit!r}: choose residual or scale")
        if self.output not in ("edit", "score"):
            raise ConfigError(f"unknown metanetwork output {self.output!r}: choose edit (weight edits) or score "
                              "(per-channel importance scores)")
        if self.output == "score":  # edit and rho do nothing there: one canonical record, the one score networks
            self.edit, self.rho = "residual", 0.05  # have always carried (checkpoints, resume fingerprints)
        if self.rho is None:
            self.rho = 1.0 if self.edit == "scale" else 0.05
        check_float("metanetwork rho", self.rho, above=0)
        check_int("edge_chunk", self.edge_chunk, 1, optional=True)
        check_bool("metanetwork checkpoint", self.checkpoint)
        check_bool("metanetwork fused", self.fused)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MetanetConfig:
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw.setdefault("edit", "residual")  # written before the edit option existed: the residual edit
        return cls(**kw)


@dataclass
class MetaTrainConfig:
    """Options of :func:`metaprune.metanet.meta_train.meta_train`.

    The defaults are the shipped recipe and ``metaprune meta-train``'s (the CLI takes them from here): CE +
    0.5 x group sparsity + 1.0 x the pruning-aware CE, train-mode BatchNorm, with ``MetanetConfig()``'s scale
    edit. The paper's loss: ``prune_aware=0, bn_eval=True`` with ``MetanetConfig(edit="residual")``.

    Attributes:
        epochs: passes over the meta-training members.
        steps_per_member: gradient steps per member and epoch (each on one data batch).
        batch_size: images per step.
        lr, weight_decay: AdamW settings.
        lam: weight of the group-sparsity term. CE is the mean over the batch; the sparsity term is
            divided by its value on the unedited member, so it starts at 1 and lam does not
            depend on dataset size or network width.
        alpha: DepGraph's polarisation: the least important channel of a group is pulled
            ``alpha`` times harder than the most important one.
        sparsity: ``"depgraph"`` (DepGraph's group sparsity on every coupled slice, as in the
            paper) or ``"functional"`` (BatchNorm-aware and scale-invariant: only slices a
            channel's function depends on, each relative to its own mean; see
            :mod:`metaprune.metanet.loss`).
        prune_aware: weight ``mu`` of a third, pruning-aware term: the cross-entropy of the edited
            network with a random fraction ``r`` of every group's channels softly removed, chosen as
            uniform L2 pruning would choose them (:func:`metaprune.metanet.loss.soft_prune`);
            ``r`` is drawn per step from ``[0, 1 - score_max_speedup ** -0.5]``, the range the
            prunability score covers. 0 turns it off (the paper's loss).
        prune_temperature: softness of those gates, relative to the median channel norm.
        prune_hard: straight-through gates: the forward pass is exactly the pruned network, the
            gradient comes from the soft gates.
        val_members: zoo members held out for checkpoint selection (the last ones by index).
        holdout_members: the last K members by index are used neither for training nor for
            selection (kept for a final comparison).
        score_every: compute the prunability score on the validation members every N epochs.
        score_max_speedup, score_steps: range and number of points of the prunability curve.
        score_batches: validation batches per point of the curve (and BN recalibration batches).
        bn_eval: run the member's BatchNorm in eval mode during meta-training (the original
            running statistics, as in the paper) instead of train mode (batch statistics). In train
            mode a conv followed by BN is scale-invariant, so the sparsity term can shrink every
            conv uniformly at no CE cost; eval mode makes that shrinkage visible to CE.
        seed, device: reproducibility and placement (``auto``: CUDA when present; under torchrun
            ``auto`` / ``cuda`` put process i on ``cuda:LOCAL_RANK``).
        amp: bf16 autocast of the metanetwork and the edited network's forward pass on CUDA.
    """

    epochs: int = 12
    steps_per_member: int = 4
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 5e-4
    lam: float = 0.5
    alpha: float = 16.0
    sparsity: str = "depgraph"
    prune_aware: float = 1.0
    prune_temperature: float = 0.1
    prune_hard: bool = True
    val_members: int = 3
    holdout_members: int = 0
    score_every: int = 1
    score_max_speedup: float = 3.0
    score_steps: int = 4
    score_batches: int = 8
    bn_eval: bool = False
    seed: int = 0
    device: str = "auto"
    amp: bool = True

    def __post_init__(self) -> None:
        check_int("epochs", self.epochs, 1)  # 0 epochs would write no metanetwork
        for name in ("steps_per_member", "batch_size", "score_every", "score_steps", "score_batches"):
            check_int(name, getattr(self, name), 1)
        check_int("holdout_members", self.holdout_members, 0)
        check_int("seed", self.seed)
        if isinstance(self.val_members, int) and not isinstance(self.val_members, bool) and self.val_members < 1:
            raise ConfigError("meta-training needs at least one validation member (val_members >= 1)")
        check_int("val_members", self.val_members, 1)
        check_float("lr", self.lr, above=0)
        check_float("weight_decay", self.weight_decay, minimum=0)
        check_float("lam", self.lam, minimum=0)
        check_float("alpha", self.alpha, minimum=1)
        check_float("prune_aware", self.prune_aware, minimum=0)
        check_float("prune_temperature", self.prune_temperature, above=0)
        check_float("score_max_speedup", self.score_max_speedup, above=1)
        for name in ("prune_hard", "bn_eval", "amp"):
            check_bool(name, getattr(self, name))
        if self.sparsity not in ("depgraph", "functional"):
            raise ConfigError(f"unknown sparsity {self.sparsity!r}: choose depgraph or functional")
        if not isinstance(self.device, str):
            raise ConfigError(f"device must be a string such as cpu or cuda, got {self.device!r}")

    def to_dict(self) -> dict:
        return asdict(self)
