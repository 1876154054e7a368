"""What the solver hands to the other stages: why a value stayed replicated (`Reason`), the
rank-independent rewrite instructions (`Actions`, made of small named records) and the whole
result (`Solution`).

Kept apart from the propagation so that planning/ and rewrite/ depend on these plain records,
not on the machinery that fills them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple, Optional

from ..capture.linear import LinearMatch
from .placements import DimShard, Placement


class ReasonKind(str, Enum):
    """Why a source stayed replicated (or, for REFINE, asked to be split differently).

    A `str` Enum: a kind compares equal to its value ("not_divisible"), prints as it and is
    written to JSON as it, so saved plans read the same.
    """

    UNSUPPORTED = "unsupported"       # an op with no rule for the placement it receives
    NOT_DIVISIBLE = "not_divisible"   # heads/features cannot be shared out over the ranks
    OVERRIDE = "override"             # the user kept the module replicated
    OUTPUT = "output"                 # a sharded value reaches the model output
    SHARED = "shared"                 # a weight used by another op too (tied)
    TOO_SMALL = "too_small"           # fewer output features than ranks
    SINGLE_HEAD = "single_head"       # a single head (MQA's kv projection) kept whole
    BOTTLENECK = "bottleneck"         # a low-rank branch better kept whole
    REFINE = "refine"                 # not a failure: the source's split is to be refined

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    def __hash__(self) -> int:   # as its string, since it compares equal to it
        return hash(self.value)


@dataclass(frozen=True)
class Reason:
    """Why something stayed replicated."""
    text: str
    node: str = ""
    module: str = ""
    kind: ReasonKind = ReasonKind.UNSUPPORTED

    def __post_init__(self) -> None:
        # a plan read back from JSON gives the kind as its string
        object.__setattr__(self, "kind", ReasonKind(self.kind))

    def __str__(self) -> str:
        where = f" at {self.node}" + (f" ({self.module})" if self.module else "") if self.node else ""
        return f"{self.text}{where}"


class Failure(NamedTuple):
    """A node that could not take its placement during a pass: the sources feeding it (its
    region), and why."""
    region: frozenset
    reason: Reason


# -- action records (tuples with names: the passes unpack them positionally) ------------------

class IntArg(NamedTuple):
    """An int argument of `node` at `path` replaced by `value`: one int, or a tuple of one int
    per rank when the split is uneven."""
    node: str
    path: tuple
    value: Any


class SymSize(NamedTuple):
    """A size of `node` at `path` computed at run time as outer x `block` (BLOOM's batch *
    heads): it becomes outer x `local` (one int, or one per rank)."""
    node: str
    path: tuple
    block: int
    local: Any


class Narrow(NamedTuple):
    """The operand of `user` at `path` is sliced on `dim` from the split it has (`have`, None
    when replicated) to the split the op needs (`want`)."""
    user: str
    path: tuple
    dim: int
    have: Optional[DimShard]
    want: DimShard


class Rank0Add(NamedTuple):
    """`add` adds a constant to the partial sum `partial`: only rank 0 keeps the add."""
    add: str
    partial: str


class Rescale(NamedTuple):
    """The mean `node` over a sharded dim is multiplied by `factor` (one float, or one per rank):
    this rank's share of the elements, so that the partial means sum to the full one."""
    node: str
    factor: Any


class Gather(NamedTuple):
    """The vocab-sharded `value` is all-gathered on `dim` for `users` (the model output)."""
    value: str
    dim: int
    users: list[str]


class SequenceGather(NamedTuple):
    """The sequence-sharded `value` is all-gathered on `dim` for `users` that need every token:
    `sharded_users` compute sharded or partial results (their gradient is summed over the
    ranks), the others are replicated (the model output, a replicated linear)."""
    value: str
    dim: int
    users: tuple
    sharded_users: tuple


@dataclass
class SequenceActions:
    """Sequence parallelism's instructions (solve/sequence.py): where each sequence-sharded
    value's sequence dim is and what enters and leaves the region."""
    input: str                     # the placeholder whose dim `input_dim` is the sequence
    input_dim: int
    symbol: str                    # the sequence's size symbol in the captured graph ("s53")
    dims: dict[str, int] = field(default_factory=dict)              # node -> its sequence dim
    # partial value -> (dim, users): reduce-scattered instead of all-reduced
    reduce_scatters: dict[str, tuple] = field(default_factory=dict)
    # replicated value (or an all-reduced partial sum) -> (dim, users): each rank's tokens
    scatters: dict[str, tuple] = field(default_factory=dict)
    gathers: list[SequenceGather] = field(default_factory=list)
    # (node, path) of size arguments that are the sequence length: this rank's length instead
    local_sizes: list[tuple] = field(default_factory=list)
    # reduce sites kept as all-reduces: partial value -> why
    kept: dict[str, "Reason"] = field(default_factory=dict)


@dataclass
class Actions:
    """Rank-independent rewrite instructions, keyed by node name."""
    columns: dict[str, DimShard] = field(default_factory=dict)     # linear -> out-dim split
    rows: dict[str, DimShard] = field(default_factory=dict)        # linear -> in-dim split
    int_args: list[IntArg] = field(default_factory=list)
    sym_sizes: list[SymSize] = field(default_factory=list)
    narrows: list[Narrow] = field(default_factory=list)
    reduces: dict[str, list[str]] = field(default_factory=dict)    # partial value -> users
    rank0_adds: list[Rank0Add] = field(default_factory=list)
    vocab_embeddings: dict[str, DimShard] = field(default_factory=dict)  # embedding -> row split
    gathers: list[Gather] = field(default_factory=list)
    rescales: list[Rescale] = field(default_factory=list)
    statistics: list[str] = field(default_factory=list)   # reductions over a sharded dim
    # LayerNorm/RMSNorm over sharded features -> the full count of the features it normalises
    norm_statistics: dict[str, int] = field(default_factory=dict)
    placements: dict[str, Placement] = field(default_factory=dict)
    regions: dict[str, frozenset] = field(default_factory=dict)    # node -> sources feeding it
    sequence: Optional[SequenceActions] = None     # sequence_parallel=True (solve/sequence.py)


@dataclass
class Solution:
    world_size: int
    linears: dict[str, LinearMatch]
    actions: Actions
    replicated: dict[str, Reason]          # linear node -> reason it stayed replicated
    components: list[frozenset]            # groups of sources sharded together
    iterations: int
    embedding_reasons: dict[str, Reason] = field(default_factory=dict)  # replicated lookups
