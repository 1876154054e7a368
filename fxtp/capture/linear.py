"""Finds the linear layers of a captured graph: matmul-like ops with a parameter as one operand.

Found by structure, not by name: `aten.linear`, `aten.mm` and `aten.matmul` whose right operand
is a 2-D parameter, possibly reached through `t`/`transpose`/`permute`, and grouped (per-expert)
matmuls of MoE layers whose weight is a 3-D [experts, in, out] parameter. `aten.addmm` (GPT-2's
Conv1D, weight stored [in, out]) is found after `split_biases` has turned it into `mm` + `add`
(an addmm with a 2-D bias or alpha/beta is left alone and stays replicated). Biases are split into a separate `add` so that a row-parallel
linear can add its bias once, after the all-reduce; `cleanup.fuse_biases` joins the pairs that
stayed local again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import fx

from ..graph.ops import TRANSPOSES

aten = torch.ops.aten


LINEAR_OPS = {aten.linear.default, aten.mm.default, aten.matmul.default}
BIAS_META = "fxtp_bias_of"


@dataclass(frozen=True)
class LinearMatch:
    """A matmul of an activation with a parameter weight."""

    node: str          # the matmul node
    input: str         # the activation operand
    weight: str        # qualified parameter name
    out_dim: int       # dim of the parameter that holds the output features
    in_dim: int        # dim of the parameter that is contracted with the activation
    exclusive: bool    # the parameter is used by this matmul only (safe to slice)
    out_features: int
    in_features: int
    module: str        # owning module path, e.g. "model.layers.0.self_attn.q_proj"
    numel: int = 0     # elements of the whole parameter (experts included)


def _trace_weight(node: fx.Node) -> Optional[tuple[fx.Node, list[int]]]:
    """Follows transposes back to a get_attr; returns (get_attr, perm) where operand dim k of
    the matmul's weight operand is parameter dim perm[k]."""
    steps = []
    while node.op == "call_function" and node.target in TRANSPOSES:
        steps.append(node)
        node = node.args[0]
    if node.op != "get_attr" or not isinstance(node.meta.get("val"), torch.Tensor):
        return None
    perm = list(range(node.meta["val"].dim()))
    for step in reversed(steps):  # from the parameter towards the matmul
        r = len(perm)
        if step.target == aten.permute.default:
            perm = [perm[d % r] for d in step.args[1]]
        elif step.target == aten.transpose.int:
            a, b = step.args[1] % r, step.args[2] % r
            perm[a], perm[b] = perm[b], perm[a]
        else:  # t / numpy_T reverse the dims
            perm = perm[::-1]
    return node, perm


def _is_grouped_mm(target) -> bool:
    """Grouped (per-expert) matmuls: x[T, in] @ W[e][in, out] for token groups given by offsets."""
    return target == aten._grouped_mm.default or "grouped_mm" in str(getattr(target, "name", lambda: "")())


def _chain_users_ok(attr: fx.Node, use: fx.Node) -> bool:
    """True if every use of the parameter flows into `use` only (through transposes)."""
    stack = list(attr.users)
    while stack:
        u = stack.pop()
        if u is use:
            continue
        if u.op == "call_function" and u.target in TRANSPOSES and len(u.users) >= 1:
            stack.extend(u.users)
            continue
        return False
    return True


def module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _normalise_path(path)


def _normalise_path(path: str) -> str:
    # export writes ModuleList entries as "layers.0" or "layers[0]" and may prefix "L['self']."
    path = path.replace("L['self'].", "").replace("L__self__.", "")
    out = []
    for part in path.replace("[", ".").replace("]", "").split("."):
        if part:
            out.append(part.strip("'\""))
    return ".".join(out)


def tensor_key(gm: fx.GraphModule, qualname: str) -> int:
    """Identity of the tensor behind a get_attr target (the same for all names of a tied weight)."""
    obj = gm
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return id(obj)


def find_linears(gm: fx.GraphModule) -> dict[str, LinearMatch]:
    """Every matmul-like node whose weight is a parameter (2-D, or 3-D [experts, ...] for
    grouped matmuls), keyed by node name."""
    # a tensor may sit under several names (tied weights): count get_attr nodes per tensor
    uses: dict[int, int] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            key = tensor_key(gm, n.target)
            uses[key] = uses.get(key, 0) + 1
    found: dict[str, LinearMatch] = {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target == aten.linear.default:
            x, w = n.args[0], n.args[1]
            operand_out, operand_in, rank = 0, 1, 2      # weight operand [out, in]
        elif n.target in (aten.mm.default, aten.matmul.default):
            x, w = n.args[0], n.args[1]
            operand_out, operand_in, rank = 1, 0, 2      # weight operand [in, out]
        elif _is_grouped_mm(n.target):
            x, w = n.args[0], n.args[1]
            operand_out, operand_in, rank = 2, 1, 3      # weight operand [experts, in, out]
        else:
            continue
        if not isinstance(w, fx.Node):
            continue
        traced = _trace_weight(w)
        if traced is None:
            continue
        attr, perm = traced
        val = attr.meta["val"]
        if val.dim() != rank:
            continue
        param_out, param_in = perm[operand_out], perm[operand_in]
        exclusive = uses.get(tensor_key(gm, attr.target), 0) == 1 and _chain_users_ok(attr, n)
        owner = attr.target.rsplit(".", 1)[0] if "." in attr.target else module_path(n)
        found[n.name] = LinearMatch(
            node=n.name, input=x.name, weight=attr.target, out_dim=param_out, in_dim=param_in,
            exclusive=exclusive, out_features=int(val.shape[param_out]),
            in_features=int(val.shape[param_in]), module=owner, numel=int(val.numel()),
        )
    return found


def split_biases(gm: fx.GraphModule) -> None:
    """Rewrites linear(x, W, b) -> linear(x, W) + b and addmm(b, x, W) -> mm(x, W) + b."""
    g = gm.graph
    for n in list(g.nodes):
        if n.op != "call_function":
            continue
        if n.target == aten.linear.default and len(n.args) > 2 and n.args[2] is not None:
            x, w, b = n.args[:3]
            with g.inserting_before(n):
                mm = g.create_node("call_function", aten.linear.default, (x, w), name=n.name + "_nobias")
        elif n.target == aten.addmm.default and not n.kwargs and isinstance(n.args[0], fx.Node):
            b, x, w = n.args[:3]
            if b.meta.get("val") is None or b.meta["val"].dim() != 1:
                continue
            with g.inserting_before(n):
                mm = g.create_node("call_function", aten.mm.default, (x, w), name=n.name + "_mm")
        else:
            continue
        with g.inserting_after(mm):
            add = g.create_node("call_function", aten.add.Tensor, (mm, b), name=n.name + "_bias")
        for new in (mm, add):
            new.meta.update({k: v for k, v in n.meta.items() if k in ("val", "nn_module_stack", "stack_trace", "source_fn_stack")})
        add.meta[BIAS_META] = mm.name
        n.replace_all_uses_with(add)
        g.erase_node(n)
    g.lint()

aten = torch.ops.aten


def fuse_biases(gm: fx.GraphModule) -> None:
    """add(linear(x, W), b) -> linear(x, W, b); add(mm(x, W), b) -> addmm(b, x, W)."""
    g = gm.graph
    for add in list(g.nodes):
        if add.op != "call_function" or BIAS_META not in add.meta:
            continue
        mm, bias = add.args
        if not isinstance(mm, fx.Node) or mm.name != add.meta[BIAS_META] or len(mm.users) != 1:
            continue
        x, w = mm.args[:2]
        if mm.target == aten.linear.default:
            mm.args = (x, w, bias)
        elif mm.target == aten.mm.default:
            mm.target, mm.args = aten.addmm.default, (bias, x, w)
        else:
            continue
        add.replace_all_uses_with(mm)
        g.erase_node(add)
