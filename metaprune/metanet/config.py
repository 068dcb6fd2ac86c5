"""Configuration dataclasses of the metanetwork and of meta-training (JSON round-trip)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from metaprune.errors import ConfigError


@dataclass
class MetanetConfig:
    """Shape of the metanetwork (:class:`metaprune.metanet.model.Metanet`).

    Attributes:
        hidden: width of node and edge states.
        layers: number of bidirectional message-passing layers.
        rho: scale of the edit: for ``edit="residual"`` in units of each layer's own spread
            (output = input + rho * decoder(h) * layer_scale; default 0.05); for ``edit="scale"``
            the bound of the log channel scale before its per-layer centring (default 1.0; after
            centring ``|log s| < 2 * rho``). ``None`` picks the default of the edit.
        edit: ``"residual"`` (the paper's: every node and edge feature gets a residual edit) or
            ``"scale"`` (function-preserving: every channel that feeds a BatchNorm gets its
            incoming weights multiplied by a positive factor ``s_c = exp(rho * tanh(d(h_c)))``,
            centred to geometric mean 1 within each layer;
            BatchNorm undoes it, so the network computes the same function after BN
            re-estimation, but the L2 magnitudes the pruner ranks channels by change -- the
            metanetwork learns which channels the pruner should keep).
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

    hidden: int = 64
    layers: int = 8
    rho: float | None = None
    edit: str = "residual"
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
        self.frozen_groups = tuple(self.frozen_groups)
        self.frozen_slots = tuple(self.frozen_slots)
        if self.hidden < 1 or self.layers < 0:
            raise ConfigError("metanetwork hidden must be >= 1 and layers >= 0")
        if self.rho is None:
            self.rho = 1.0 if self.edit == "scale" else 0.05
        if self.rho <= 0:
            raise ConfigError("metanetwork rho must be > 0")
        if self.edit not in ("residual", "scale"):
            raise ConfigError(f"unknown metanetwork edit {self.edit!r}: choose residual or scale")
        if self.edge_chunk is not None and self.edge_chunk < 1:
            raise ConfigError("edge_chunk must be >= 1 (or None for no chunking)")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MetanetConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class MetaTrainConfig:
    """Options of :func:`metaprune.metanet.meta_train.meta_train`.

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
        seed, device: reproducibility and placement (``auto``: CUDA when present).
        amp: bf16 autocast of the metanetwork and the edited network's forward pass on CUDA.
    """

    epochs: int = 10
    steps_per_member: int = 8
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 5e-4
    lam: float = 1.0
    alpha: float = 16.0
    sparsity: str = "depgraph"
    prune_aware: float = 0.0
    prune_temperature: float = 0.1
    prune_hard: bool = True
    val_members: int = 2
    holdout_members: int = 0
    score_every: int = 1
    score_max_speedup: float = 3.0
    score_steps: int = 4
    score_batches: int = 4
    bn_eval: bool = False
    seed: int = 0
    device: str = "cpu"
    amp: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.steps_per_member < 1 or self.batch_size < 1:
            raise ConfigError("epochs must be >= 0, steps_per_member and batch_size >= 1")
        if self.lam < 0 or self.alpha < 1:
            raise ConfigError("lam must be >= 0 and alpha >= 1")
        if self.prune_aware < 0 or self.prune_temperature <= 0:
            raise ConfigError("prune_aware must be >= 0 and prune_temperature > 0")
        if self.sparsity not in ("depgraph", "functional"):
            raise ConfigError(f"unknown sparsity {self.sparsity!r}: choose depgraph or functional")
        if self.score_max_speedup <= 1 or self.score_steps < 1 or self.score_batches < 1:
            raise ConfigError("score_max_speedup must be > 1, score_steps and score_batches >= 1")
        if self.val_members < 1:
            raise ConfigError("meta-training needs at least one validation member (val_members >= 1)")

    def to_dict(self) -> dict:
        return asdict(self)
