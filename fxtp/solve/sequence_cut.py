"""The cheapest sequence-sharded region, as a minimum cut, for a region whose whole would move
more bytes than the all-reduces it replaces.

Holding a value's tokens is free where it is made from a partial sum (a reduce-scatter sends
half of what an all-reduce sends) or from a replicated value (each rank takes its tokens); it
costs one all-gather of the value where something outside the region reads it whole. A
transformer with parallel attention and MLP (GPT-NeoX, Falcon, GPT-J) norms the residual
twice, so holding the norms' tokens as well would gather twice per layer. Choosing the region
is then a minimum cut of a flow network:

    source -> site P           capacity 2 b(P)   (P not reduce-scattered: an all-reduce)
    site P -> sink             capacity b(P)     (P reduce-scattered)
    site P -> each user u      unbounded         (a reduce-scattered P's users hold tokens)
    v.in -> v.out              capacity b(v)     (v holds tokens, a reader does not: a gather)
    v.out -> reader r.in       unbounded
    v.out -> sink              unbounded         (readers that must see the whole sequence)

with b the bytes per token. A cut's source side is a region and the cut's capacity what it
sends; the all-reduce layout is the cut around the source, so the minimum never sends more.
Of the minimum cuts the one with the largest region is taken (every node that cannot reach
the sink in the residual network): the same bytes, the most activations held as tokens.
For GPT-NeoX that is the residual stream with one all-gather per layer before both norms.
"""
from __future__ import annotations

from typing import Callable, Iterable

import networkx as nx

SOURCE, SINK = "<source>", "<sink>"


def cheapest_region(region: set[str], sites: dict[str, set[str]],
                    readers: Callable[[str], Iterable[str]],
                    bytes_of: Callable[[str], int]) -> set[str]:
    """The nodes of `region` to keep (a subset), and so the sites to reduce-scatter: those
    whose users are all kept. `sites`: partial sum -> its users (all in `region`);
    `readers(v)`: the nodes that read v and need no sizes only."""
    g = nx.DiGraph()
    for p, users in sites.items():
        g.add_edge(SOURCE, ("site", p), capacity=2 * bytes_of(p))
        g.add_edge(("site", p), SINK, capacity=bytes_of(p))
        for u in users:
            g.add_edge(("site", p), ("in", u))            # unbounded: no capacity attribute
    for v in region:
        g.add_edge(("in", v), ("out", v), capacity=bytes_of(v))
        for r in readers(v):
            g.add_edge(("out", v), ("in", r) if r in region else SINK)
    residual = nx.algorithms.flow.preflow_push(g, SOURCE, SINK)
    # nodes that can still reach the sink in the residual network are on its side of every
    # minimum cut; the rest form the largest source side
    reverse = residual.reverse(copy=False)
    to_sink = {SINK}
    frontier = [SINK]
    while frontier:
        n = frontier.pop()
        for m in reverse.successors(n):
            edge = residual[m][n]
            if m not in to_sink and edge["capacity"] - edge["flow"] > 0:
                to_sink.add(m)
                frontier.append(m)
    return {v for v in region if ("in", v) not in to_sink}
