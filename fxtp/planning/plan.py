"""The sharding plan: what fxtp decided for every linear, why, and which collectives it costs.

A Plan is computed from the captured graph without any process group, prints as a table, turns
into a dict/JSON, and can be overridden per module before `fxtp.transform(..., plan=plan)`.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from torch import fx, nn

from ..capture.export import Captured
from ..errors import PlanOverrideError
from ..graph.tensors import deepcopy_graph, tensor_attrs
from ..runtime.group import check_world_size
from ..solve.records import Reason, Solution
from .overrides import check_overrides

_LAYER = re.compile(r"^(.*?\.\d+)(\.|$)")
OUTSIDE_LAYERS = "(outside the layers)"   # e.g. a vocab-parallel embedding's all-reduce
SHOWN_CONDITIONS = 3     # size conditions printed in the plan (all are in Plan.conditions)


def layer_of(path: str) -> str:
    """The repeated block a module belongs to ('model.layers.3.mlp.up' -> 'model.layers.3')."""
    m = _LAYER.match(path)
    return m.group(1) if m else ""


@dataclass(frozen=True)
class PlanEntry:
    module: str
    parameter: str
    placement: str          # column | row | replicate
    shard: str              # e.g. "Shard(0): 2 parts"
    why: str
    collectives: str
    full_numel: int
    local_numel: int                      # rank 0's (the largest when shards are uneven)
    local_numels: tuple[int, ...] = ()    # every rank's, in rank order
    itemsize: int = 4                     # bytes per element of the parameter

    def local_bytes(self, rank: int = 0) -> int:
        numels = self.local_numels or (self.local_numel,)
        return numels[rank] * self.itemsize

    @property
    def full_bytes(self) -> int:
        return self.full_numel * self.itemsize


@dataclass(frozen=True)
class PlanSource:
    """What a plan was made from, kept apart from its decisions and never serialised: the
    captured graph and its solution (what the rewrite applies) and how to plan them again."""

    captured: Captured
    solution: Solution
    # replanner(plan, world_size, overrides, vocab_parallel, sequence_parallel) -> Plan:
    # `override`/`replan`; a module-level function, so it holds nothing beyond these fields
    replanner: Callable[..., "Plan"]
    # a probe plan (fxtp.planning.repeats): the repeated lists, the model (transform captures
    # it whole; override/replan plan it again) and its example inputs
    probe: tuple = ()
    model: Optional[nn.Module] = None
    example_inputs: Any = None

    def with_graph(self, gm: fx.GraphModule) -> "PlanSource":
        return dataclasses.replace(self, captured=dataclasses.replace(self.captured, gm=gm))


@dataclass
class Plan:
    """Decisions for one model at one world size: data (entries, reasons, overrides, sizes)
    that prints as a table and round-trips through JSON, plus `live`, what it was made from."""

    model_name: str
    world_size: int
    entries: list[PlanEntry]
    all_reduces: dict[str, int]                 # layer -> all-reduces in the forward pass
    all_reduce_sites: list[tuple[str, str]] = field(compare=False)   # (after module, value node)
    replicated: dict[str, str]                  # module -> reason
    not_divisible: list[Reason]
    overrides: dict[str, str] = field(default_factory=dict)
    vocab_parallel: bool = False
    sequence_parallel: bool = False
    # bytes of all model parameters (a tied tensor counted once): full, and held by each rank
    full_param_bytes: int = 0
    local_param_bytes: tuple[int, ...] = ()
    # submodules torch.export could not capture, called whole on every rank: name -> why
    opaque: dict[str, str] = field(default_factory=dict)
    # conditions on input sizes the graph holds for (the model's code took one path for them)
    conditions: list[str] = field(default_factory=list)
    # norms/means over sharded features computed from partial statistics (module paths)
    statistics: list[str] = field(default_factory=list)
    # bytes the forward's all-reduces move per token (batch x sequence element)
    all_reduced_bytes_per_token: int = 0
    # when partial statistics were possible: "with"/"without" -> [all-reduced bytes per token,
    # the largest rank's parameter bytes], and "chosen" (the fewer parameter bytes)
    statistics_costs: Optional[dict] = None
    # sequence parallelism: its collectives (module, value, "reduce_scatter" | "all_gather" |
    # "scatter") in graph order, the layers' all-reduces it kept (module, why), the ops that
    # hold 1/N of the tokens, and the forward's bytes per token by collective
    sequence_sites: list[tuple[str, str, str]] = field(default_factory=list, compare=False)
    sequence_kept: list[tuple[str, str]] = field(default_factory=list)
    sequence_ops: dict[str, int] = field(default_factory=dict)     # layer -> ops
    sequence_bytes_per_token: dict[str, int] = field(default_factory=dict)
    # all-reduced value -> its bytes per token (not serialised: the total above is)
    site_bytes: dict = field(default_factory=dict, repr=False, compare=False)
    # the plan not chosen between partial statistics and whole regions (not serialised)
    alternative: Optional["Plan"] = field(default=None, repr=False, compare=False)
    # parameter name -> elements each rank keeps, for the split ones (not serialised)
    param_shares: dict = field(default_factory=dict, repr=False, compare=False)
    # the live side (graph, solution, how to plan again); None for a plan loaded from JSON
    live: Optional[PlanSource] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.site_bytes:
            self.all_reduced_bytes_per_token = sum(
                self.site_bytes.get(v, 0) for _, v in self.all_reduce_sites)
            moved: dict[str, int] = {}
            for _, v, op in self.sequence_sites:
                if op != "scatter":
                    moved[op] = moved.get(op, 0) + self.site_bytes.get(v, 0)
            self.sequence_bytes_per_token = moved

    # -- the live side -----------------------------------------------------------------------
    @property
    def captured(self) -> Optional[Captured]:
        return self.live.captured if self.live else None

    @property
    def solution(self) -> Optional[Solution]:
        return self.live.solution if self.live else None

    @property
    def probe(self) -> tuple:
        """The repeated lists a probe plan was solved from (empty: captured whole)."""
        return self.live.probe if self.live else ()

    # -- queries ---------------------------------------------------------------------------
    @property
    def total_all_reduces(self) -> int:
        return sum(self.all_reduces.values())

    @property
    def sequence_collectives(self) -> dict[str, dict[str, int]]:
        """layer -> {"reduce_scatter": n, "all_gather": n} of sequence parallelism (forward);
        scatters move nothing and are not counted."""
        out: dict[str, dict[str, int]] = {}
        for module, _, op in self.sequence_sites:
            if op != "scatter":
                per = out.setdefault(layer_of(module) or OUTSIDE_LAYERS, {})
                per[op] = per.get(op, 0) + 1
        return out

    @property
    def communicated_bytes_per_token(self) -> float:
        """Bytes each rank sends per token in the forward's collectives, with ring
        algorithms: an all-reduce of B bytes sends 2 (N - 1) / N x B, a reduce-scatter or an
        all-gather (N - 1) / N x B. The measure to compare layouts by (bench/activations.py
        measures it)."""
        n = self.world_size
        if n == 1:
            return 0.0
        rest = sum(self.sequence_bytes_per_token.values())
        return (n - 1) / n * (2 * self.all_reduced_bytes_per_token + rest)

    def placement_of(self, module: str) -> str:
        for e in self.entries:
            if e.module == module:
                return e.placement
        raise KeyError(module)

    def param_fraction(self, layers_only: bool = True) -> float:
        """Local / full parameter count of the linears (in repeated layers, by default)."""
        full = local = 0
        for e in self.entries:
            if layers_only and not layer_of(e.module):
                continue
            full += e.full_numel
            local += e.local_numel
        return local / full if full else 1.0

    def memory_fraction(self, rank: int = 0) -> float:
        """Parameter bytes `rank` holds / the whole model's (replicated parameters included)."""
        if not self.full_param_bytes:
            return 1.0
        return self.local_param_bytes[rank] / self.full_param_bytes

    # -- overrides -------------------------------------------------------------------------
    def override(self, decisions: dict[str, str]) -> "Plan":
        """A new plan with some modules forced, e.g. {"model.layers.0.mlp": "replicate"}."""
        if self.live is None:
            raise PlanOverrideError("this plan was loaded without its captured graph; rebuild it "
                                    "with fxtp.plan(model, world_size) to override it")
        merged = {**self.overrides, **check_overrides(decisions)}
        return self.live.replanner(self, self.world_size, merged, self.vocab_parallel,
                                   self.sequence_parallel)

    def replan(self, world_size: Optional[int] = None, *,
               vocab_parallel: Optional[bool] = None,
               sequence_parallel: Optional[bool] = None) -> "Plan":
        """The same captured model planned again at another world size or with another
        vocab_parallel / sequence_parallel choice, overrides kept: no second capture (the
        slow step)."""
        if self.live is None:
            raise PlanOverrideError("this plan was loaded without its captured graph; rebuild it "
                                    "with fxtp.plan(model, world_size)")
        ws = check_world_size(self.world_size if world_size is None else world_size,
                              "Plan.replan")
        vp = self.vocab_parallel if vocab_parallel is None else vocab_parallel
        sp = self.sequence_parallel if sequence_parallel is None else sequence_parallel
        return self.live.replanner(self, ws, self.overrides, vp, sp)

    # -- output ----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "world_size": self.world_size,
            "entries": [{**e.__dict__, "local_numels": list(e.local_numels)} for e in self.entries],
            "all_reduces_per_layer": dict(self.all_reduces),
            "all_reduce_sites": [list(s) for s in self.all_reduce_sites],
            "replicated": dict(self.replicated),
            "not_divisible": [r.__dict__ for r in self.not_divisible],
            "overrides": dict(self.overrides),
            "vocab_parallel": self.vocab_parallel,
            "sequence_parallel": self.sequence_parallel,
            "sequence_sites": [list(x) for x in self.sequence_sites],
            "sequence_kept": [list(x) for x in self.sequence_kept],
            "sequence_ops": dict(self.sequence_ops),
            "sequence_bytes_per_token": dict(self.sequence_bytes_per_token),
            "param_fraction_layers": self.param_fraction(),
            "full_param_bytes": self.full_param_bytes,
            "local_param_bytes": list(self.local_param_bytes),
            "opaque": dict(self.opaque),
            "conditions": list(self.conditions),
            "statistics": list(self.statistics),
            "all_reduced_bytes_per_token": self.all_reduced_bytes_per_token,
            "statistics_costs": self.statistics_costs,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        """A plan saved with `to_dict`. It has no captured graph: `fxtp.transform(model, ws,
        plan=loaded)` re-derives the plan from the model with the saved overrides and checks
        that every decision matches (to change one, edit `overrides`, not the entries)."""
        try:
            entries = [PlanEntry(**{**e, "local_numels": tuple(e.get("local_numels", ()))})
                       for e in data["entries"]]
            return cls(model_name=data["model"], world_size=int(data["world_size"]),
                       entries=entries, all_reduces=dict(data["all_reduces_per_layer"]),
                       all_reduce_sites=[tuple(s) for s in data["all_reduce_sites"]],
                       replicated=dict(data["replicated"]),
                       not_divisible=[Reason(**r) for r in data["not_divisible"]],
                       overrides=dict(data.get("overrides", {})),
                       vocab_parallel=bool(data.get("vocab_parallel", False)),
                       sequence_parallel=bool(data.get("sequence_parallel", False)),
                       sequence_sites=[tuple(x) for x in data.get("sequence_sites", ())],
                       sequence_kept=[tuple(x) for x in data.get("sequence_kept", ())],
                       sequence_ops=dict(data.get("sequence_ops", {})),
                       sequence_bytes_per_token=dict(data.get("sequence_bytes_per_token", {})),
                       full_param_bytes=int(data.get("full_param_bytes", 0)),
                       local_param_bytes=tuple(data.get("local_param_bytes", ())),
                       opaque=dict(data.get("opaque", {})),
                       conditions=list(data.get("conditions", ())),
                       statistics=list(data.get("statistics", ())),
                       all_reduced_bytes_per_token=int(data.get("all_reduced_bytes_per_token", 0)),
                       statistics_costs=data.get("statistics_costs"))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise PlanOverrideError(f"not an fxtp plan ({type(e).__name__}: {e}); save one with "
                                    "plan.to_json()") from e

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanOverrideError(f"the plan is not valid JSON: {e}") from e
        except TypeError as e:
            raise PlanOverrideError(f"Plan.from_json takes the text of plan.to_json(), got "
                                    f"{type(text).__name__}") from e
        return cls.from_dict(data)

    def mismatches(self, other: "Plan") -> list[str]:
        """Decisions that differ between two plans of one model, one line each."""
        out = []
        mine_opts = (self.world_size, self.vocab_parallel, self.sequence_parallel)
        their_opts = (other.world_size, other.vocab_parallel, other.sequence_parallel)
        if mine_opts != their_opts:
            out.append("world_size/vocab_parallel/sequence_parallel "
                       f"{'/'.join(map(str, mine_opts))} vs {'/'.join(map(str, their_opts))}")
        mine = {e.parameter: (e.placement, e.shard) for e in self.entries}
        theirs = {e.parameter: (e.placement, e.shard) for e in other.entries}
        for name in sorted(set(mine) | set(theirs)):
            if mine.get(name) != theirs.get(name):
                out.append(f"{name}: {mine.get(name, 'absent')} vs {theirs.get(name, 'absent')}")
        if self.all_reduces != other.all_reduces:
            out.append(f"all-reduces per layer: {self.all_reduces} vs {other.all_reduces}")
        if self.sequence_collectives != other.sequence_collectives:
            out.append(f"sequence collectives per layer: {self.sequence_collectives} vs "
                       f"{other.sequence_collectives}")
        return out

    def table(self):
        from rich.table import Table

        t = Table(title=f"fxtp plan: {self.model_name}, world_size={self.world_size}",
                  show_lines=False)
        t.add_column("module", no_wrap=True)      # names stay whole and searchable
        for col in ("parameter", "placement", "why", "collectives", "bytes/rank"):
            t.add_column(col, overflow="fold", ratio=3 if col == "why" else 1)
        for e in self.entries:
            t.add_row(e.module, e.parameter.rsplit(".", 1)[-1] + f" {e.shard}", e.placement, e.why,
                      e.collectives, _entry_bytes(e))
        return t

    def summary_lines(self) -> list[str]:
        lines = []
        counts = sorted(set(self.all_reduces.values()))
        if self.all_reduces:
            lines.append(f"all-reduces per layer (forward): {counts if len(counts) > 1 else counts[0]}"
                         f" over {len(self.all_reduces)} layers; total {self.total_all_reduces}")
        else:
            lines.append("all-reduces: none")
        lines.append(f"local parameters of the layers' linears: {self.param_fraction():.3f} of full "
                     f"(1/{self.world_size} = {1 / self.world_size:.3f})")
        if self.local_param_bytes:
            per_rank = sorted(set(self.local_param_bytes))
            held = (_human(per_rank[0]) if len(per_rank) == 1 else
                    ", ".join(f"rank {r} {_human(b)}" for r, b in enumerate(self.local_param_bytes)))
            lines.append(f"parameter bytes per rank (every parameter, replicated ones included): "
                         f"{held} of {_human(self.full_param_bytes)} "
                         f"({self.memory_fraction():.3f})")
        if self.all_reduces:
            lines.append(f"all-reduced per token (forward): {_human(self.all_reduced_bytes_per_token)}")
        if self.sequence_parallel:
            lines += self._sequence_lines()
        if self.statistics:
            lines.append(f"partial statistics: {len(self.statistics)} norm(s) over sharded features "
                         f"all-reduce a per-token statistic instead of keeping their layers' "
                         f"weights whole ({', '.join(self.statistics[:3])}"
                         f"{', ...' if len(self.statistics) > 3 else ''})")
        if self.statistics_costs:
            c = self.statistics_costs
            lines.append("costs with partial statistics vs their regions kept whole: "
                         + "; ".join(f"{k} {_human(c[k][0])}/token all-reduced, "
                                     f"{_human(c[k][1])} parameters per rank"
                                     for k in ("with", "without"))
                         + f"; chosen: {c['chosen']} (fewer parameter bytes per rank)")
        for module, why in self.opaque.items():
            lines.append(f"opaque (not captured, called whole on every rank): {module}: {why}")
        if self.conditions:
            shown = "; ".join(self.conditions[:SHOWN_CONDITIONS])
            more = len(self.conditions) - SHOWN_CONDITIONS
            lines.append("input sizes the capture holds for (a call of other sizes gets a graph "
                         f"of its own, built then: tp.size_graphs): {shown}"
                         + (f"; and {more} more (Plan.conditions)" if more > 0 else ""))
        for module, why in self.replicated.items():
            lines.append(f"replicated: {module}: {why}")
        return lines

    def _sequence_lines(self) -> list[str]:
        if self.world_size == 1:
            return ["sequence parallel: nothing to split at world size 1"]
        per_layer = self.sequence_collectives
        kinds = sorted({tuple(sorted(c.items())) for k, c in per_layer.items()
                        if k != OUTSIDE_LAYERS})
        shown = "; ".join(", ".join(f"{n} {op}" for op, n in k) for k in kinds) or "none"
        lines = [f"sequence parallel: {sum(self.sequence_ops.values())} ops hold 1/{self.world_size} of the "
                 f"tokens per rank; per layer (forward): {shown}"
                 + ("; outside the layers: " + ", ".join(
                     f"{n} {op}" for op, n in sorted(per_layer[OUTSIDE_LAYERS].items()))
                    if OUTSIDE_LAYERS in per_layer else "")]
        moved = self.sequence_bytes_per_token
        if moved:
            lines.append("reduce-scattered / all-gathered per token (forward): "
                         f"{_human(moved.get('reduce_scatter', 0))} / "
                         f"{_human(moved.get('all_gather', 0))}; sent per token and rank (ring): "
                         f"{_human(int(self.communicated_bytes_per_token))}")
        for module, why in self.sequence_kept:
            lines.append(f"sequence parallel kept the all-reduce of {module}: {why}")
        return lines

    def __str__(self) -> str:
        from rich.console import Console

        console = Console(width=160, record=True, file=_Null(), color_system=None)
        console.print(self.table())
        for line in self.summary_lines():
            console.print(line, markup=False, highlight=False)
        return console.export_text()

    def __rich__(self):
        return self.table()


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _entry_bytes(e: PlanEntry) -> str:
    numels = e.local_numels or (e.local_numel,)
    if len(set(numels)) > 1:
        local = "/".join(_human(n * e.itemsize) for n in numels)
    else:
        local = _human(e.local_bytes())
    return f"{local} of {_human(e.full_bytes)}"


class _Null:
    def write(self, *_):
        return 0

    def flush(self):
        pass


def shapes_only(plan: Plan) -> Plan:
    """The plan as kept in `tp.meta`: its captured graph holds meta tensors of the full shapes,
    so the tensor-parallel result keeps no reference to the full weights (the captured graph
    aliases the user's parameters). Planning again (`override`, `replan`) and checking a
    checkpoint's shapes need only the shapes."""
    if plan.live is None:
        return plan
    memo: dict = {}
    for t in tensor_attrs(plan.captured.gm).values():
        if id(t) not in memo:
            meta = t.detach().to("meta")
            memo[id(t)] = (nn.Parameter(meta, requires_grad=t.requires_grad)
                           if isinstance(t, nn.Parameter) else meta)
    gm = deepcopy_graph(plan.captured.gm, memo)
    return dataclasses.replace(plan, live=plan.live.with_graph(gm))
