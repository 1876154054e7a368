"""The last pass: bias adds fused back into their linears and no-ops dropped.
"""
from __future__ import annotations

from torch import fx

from ..capture.linear import fuse_biases


def cleanup(gm: fx.GraphModule) -> None:
    fuse_biases(gm)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
