"""The aten op families that every stage names (views, dropout, attention, ...): one catalogue,
so that a matcher, a rule and a pass agree on what an op is.
"""
from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten

# ---------------------------------------------------------------------------------------------
# op families

VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
IDENTITY = {
    aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
    aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default,
    aten.lift_fresh_copy.default, aten.type_as.default,
}
DROPOUT = {aten.dropout.default}
SOFTMAX = {aten.softmax.int, aten._softmax.default, aten.log_softmax.int, aten._log_softmax.default}
REDUCTIONS = {
    aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default,
    aten.var.correction, aten.std.correction, aten.var.dim, aten.std.dim,
}
NORMS = {aten.layer_norm.default, aten.native_layer_norm.default, aten.rms_norm.default}
# reductions over a sharded dim that a partial sum computes: each rank reduces its part
PARTIAL_STATISTICS = {aten.mean.dim, aten.sum.dim_IntList}
# norms over a sharded dim that an all-reduced statistic computes (rewrite/norm_statistics)
STATISTIC_NORMS = {aten.layer_norm.default, aten.rms_norm.default}   # (and an L2 vector norm)
# (x, dim, keepdim) selections and reductions that return values (and indices) along one dim
SELECT_ALONG = {aten.max.dim, aten.min.dim, aten.argmax.default, aten.argmin.default,
                aten.logsumexp.default}
# (x, ..., dim) ops that keep the shape and run along one dim
RUN_ALONG = {aten.topk.default: 2, aten.sort.default: 1, aten.cumsum.default: 1,
             aten.cumprod.default: 1}
# ops that keep (or zero) a triangle of the last two dims (causal masks in chunked scans)
TRIANGLES = {aten.tril.default, aten.triu.default}
# a new tensor with the shape (and so the placement) of the first operand
LIKE = {aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default,
        aten.full_like.default}
# identity ops reading a second tensor for its dtype only
DTYPE_OF = {aten.type_as.default}
# convolutions along time over [batch, channels, length] (a Mamba mixer's depthwise conv)
CONVOLUTIONS = {aten.conv1d.default}
SDPA = {
    aten.scaled_dot_product_attention.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
}
TRANSPOSES = {aten.transpose.int, aten.permute.default, aten.t.default, aten.numpy_T.default}
SPLITS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default}
PARTIAL_SHAPE_OPS = VIEWS | {
    aten.transpose.int, aten.permute.default, aten.t.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims,
} | IDENTITY
NO_OUTPUT = {aten._assert_tensor_metadata.default}
PARTIAL_LINEAR_IN_FIRST = {
    aten.index.Tensor, aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.select.int,
    aten.slice.Tensor, aten.expand.default,
}


def is_pointwise(target) -> bool:
    tags = getattr(target, "tags", ())
    return torch.Tag.pointwise in tags


def functional_twin(target):
    """aten.add_.Tensor -> aten.add.Tensor: in-place ops follow their functional twin's rule
    (export keeps a model's `x += y`; the data flow is the same)."""
    schema = getattr(target, "_schema", None)
    if schema is None or not schema.name.startswith("aten::") or not schema.name.endswith("_"):
        return target
    packet = getattr(aten, schema.name[len("aten::"):-1], None)
    if packet is None:
        return target
    return getattr(packet, target._overloadname, target)


def dropout_active(n: fx.Node) -> bool:
    train = n.args[2] if len(n.args) > 2 else n.kwargs.get("train", False)
    p = n.args[1] if len(n.args) > 1 else n.kwargs.get("p", 0.0)
    return bool(train) and p > 0


def dropout_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """Dropout ops with p > 0 in the graph (captured in eval mode, so they do nothing)."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in DROPOUT:
            p = n.args[1] if len(n.args) > 1 else n.kwargs.get("p", 0.0)
            if p > 0:
                out.append(n)
    return out
