"""fxtp.draw: the rewritten graph as Graphviz, with what fxtp changed highlighted.

Sliced parameters are green, collectives red, slices of replicated inputs (narrows) yellow,
ops whose size constants were rewritten blue and, with sequence parallelism, the ops that hold
this rank's tokens only lilac. One layer by default (a whole model is too big to
read), every layer with `layer="all"`. A `.dot` path is written directly (no dependency); other
formats (`.svg`, `.png`, `.pdf`) are rendered by Graphviz's `dot` program.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Optional

from torch import fx

from ..capture.linear import module_path
from ..errors import RenderError, UnknownLayerError
from ..graph.nodes import get_tensor_attr
from ..planning.plan import OUTSIDE_LAYERS
from ..rewrite.collectives import COLLECTIVE_META
from ..rewrite.local_slices import NARROW_META
from .explain import _info, _layer, graph_layers

_COLOURS = {"sharded": "#b7e4b0", "collective": "#f4a6a6", "narrow": "#fbe7a1",
            "constant": "#a9c8f0", "sequence": "#d9c6f0", "plain": "#ffffff"}


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tensor(gm: fx.GraphModule, n: fx.Node):
    try:
        return get_tensor_attr(gm, n.target)
    except AttributeError:
        return None


def _label(text: str) -> str:
    """A quoted label whose `\\n` are Graphviz line breaks (other backslashes escaped)."""
    return _quote(text).replace("\\\\n", "\\n")


def to_dot(tp: fx.GraphModule, layer: Optional[str] = None) -> str:
    """Graphviz source for `layer` of `tp` (default: the first layer; "all": every node)."""
    info = _info(tp)
    layers = graph_layers(tp)
    if layer is None:
        layer = layers[0] if layers else "all"
    if layer != "all" and layer not in layers + [OUTSIDE_LAYERS]:
        raise UnknownLayerError(f"fxtp.draw: no layer {layer!r}; layers: {layers} or 'all'")
    sharded = set(info.sharded_params) | set(info.sliced_attrs)
    rewritten = {name for name, _, _ in info.rewritten_constants}
    act = info.plan.solution.actions if info.plan.solution else None
    tokens = set(act.sequence.dims) if act is not None and act.sequence is not None else set()
    keep = [n for n in tp.graph.nodes
            if layer == "all" or (n.op == "call_function" and _layer(module_path(n)) == layer)]
    kept = set(keep)
    lines = [f"digraph {_quote('fxtp ' + layer)} {{", "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
             f"  label={_quote(f'{info.plan.model_name}: {layer}, rank {info.rank} of {info.world_size} (parameters: local shapes; activations: shapes as captured)')};"]
    boundary: set[fx.Node] = set()
    for n in keep:
        for a in n.all_input_nodes:
            if a not in kept:
                boundary.add(a)
    for n in list(boundary) + keep:
        kind = "plain"
        if n.op == "get_attr" and n.target in sharded:
            kind = "sharded"
        elif COLLECTIVE_META in n.meta:
            kind = "collective"
        elif NARROW_META in n.meta:
            kind = "narrow"
        elif n.name in rewritten:
            kind = "constant"
        elif n.name in tokens:
            kind = "sequence"
        target = n.target if n.op == "get_attr" else getattr(n.target, "__name__", str(n.target))
        label = f"{n.name}\\n{target}"
        val = _tensor(tp, n) if n.op == "get_attr" else n.meta.get("val")
        if hasattr(val, "shape"):
            label += "\\n" + str(list(val.shape))
        style = ', style="rounded,filled,dashed"' if n in boundary else ""
        lines.append(f"  {_quote(n.name)} [label={_label(label)}, "
                     f"fillcolor={_quote(_COLOURS[kind])}{style}];")
    for n in keep:
        for a in n.all_input_nodes:
            lines.append(f"  {_quote(a.name)} -> {_quote(n.name)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def renderer(path: str) -> Optional[str]:
    """The `dot` program needed to write `path`, None for a .dot file; a named error when
    Graphviz is missing (checked before any work, e.g. by the CLI before spawning ranks)."""
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "dot"
    if fmt in ("dot", "gv"):
        return None
    dot = shutil.which("dot")
    if dot is None:
        raise RenderError(f"fxtp.draw: rendering .{fmt} needs Graphviz's `dot` program: install "
                        "the graphviz package (apt-get install graphviz, brew install graphviz, "
                        "conda install graphviz), or draw to a .dot file")
    return dot


def draw(tp: fx.GraphModule, path: str, layer: Optional[str] = None) -> str:
    """Writes the drawing of `layer` of `tp` to `path` (format from its extension); returns
    the path."""
    dot = renderer(path)
    source = to_dot(tp, layer)
    if dot is None:
        with open(path, "w") as f:
            f.write(source)
        return path
    fmt = os.path.splitext(path)[1].lstrip(".").lower()
    done = subprocess.run([dot, f"-T{fmt}", "-o", path], input=source.encode(),
                          capture_output=True, timeout=120)
    if done.returncode != 0:
        raise RenderError(f"fxtp.draw: dot could not render .{fmt}: "
                        f"{done.stderr.decode(errors='replace').strip()[:300]}")
    return path
