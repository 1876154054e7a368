"""The rewrite pass contract (fxtp/rewrite/context.py, pipeline.PASSES): the passes run in the
listed order, the sharded-only ones skipped at world size 1, and a pass that leaves the graph
malformed is named by a RewriteError. In process: the rewrite itself needs no process group."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import fx

import fxtp
from fxtp.rewrite import pipeline
from fxtp.rewrite.context import Pass, RewriteContext
from fxtp.runtime.group import GroupInfo
from fxtp.runtime.state import RuntimeState
from fxtp.testing.models import tiny_model

aten = torch.ops.aten
RANK0 = GroupInfo(rank=0, world_size=2, group_name="fake")   # a name only: nothing is sent


@pytest.fixture(scope="module")
def plan():
    return fxtp.plan(tiny_model("llama"), 2)


def _first_call(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.op == "call_function" and n.args
                and isinstance(n.args[0], fx.Node))


def _moves_a_node_first(ctx: RewriteContext) -> None:
    """A use before its definition: a call moved in front of the graph's inputs."""
    first = next(iter(ctx.gm.graph.nodes))
    first.prepend(_first_call(ctx.gm))


def _uses_an_erased_node(ctx: RewriteContext) -> None:
    """A stale reference: a node the pass made, erased, then wired in anyway."""
    g = ctx.gm.graph
    user = _first_call(ctx.gm)
    with g.inserting_before(user):
        tmp = g.call_function(aten.clone.default, (user.args[0],))
    g.erase_node(tmp)
    user.args = (tmp, *user.args[1:])


def _with(broken: Pass, after: str) -> tuple[Pass, ...]:
    at = [p.name for p in pipeline.PASSES].index(after) + 1
    return (*pipeline.PASSES[:at], broken, *pipeline.PASSES[at:])


@pytest.mark.parametrize("fn, says", [
    (_moves_a_node_first, "used before it has been defined"),
    (_uses_an_erased_node, "which was erased from the graph"),
])
def test_a_pass_that_breaks_the_graph_is_named(plan, monkeypatch, fn, says):
    monkeypatch.setattr(pipeline, "PASSES", _with(Pass("broken_pass", fn), "local_slices"))
    with pytest.raises(fxtp.RewriteError) as err:
        pipeline.rewrite(plan, RANK0)
    msg = str(err.value)
    assert isinstance(err.value, fxtp.FxtpError)
    assert "'broken_pass'" in msg and plan.model_name in msg and says in msg
    assert "rank 0 of 2" in msg and "\n" not in msg        # lint's own text ends with the graph
    assert isinstance(err.value.__cause__, RuntimeError)   # lint's error, chained


def test_passes_run_in_order_and_world_size_1_runs_only_the_unsharded_ones(plan, monkeypatch):
    ran: list[str] = []

    def traced(p: Pass) -> Pass:
        def fn(ctx):
            ran.append(p.name)
            return p.fn(ctx)
        return dataclasses.replace(p, fn=fn)

    monkeypatch.setattr(pipeline, "PASSES", tuple(traced(p) for p in pipeline.PASSES))
    tp = pipeline.rewrite(plan, RANK0)
    assert ran == [p.name for p in pipeline.PASSES]
    info = tp.meta[fxtp.META_KEY]
    assert info.all_reduce_nodes and info.param_slices and isinstance(info.state, RuntimeState)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.rank = 1                                       # the record is fixed; state is not

    ran.clear()
    one = fxtp.plan(tiny_model("llama"), 1)
    pipeline.rewrite(one, GroupInfo(rank=0, world_size=1, group_name=""))
    assert ran == ["cleanup", "own_tensors"]
