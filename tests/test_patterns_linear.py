"""Tests of fxtp/capture/linear.py (find_linears, split_biases, fuse_biases)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from fxtp.capture.export import capture
from fxtp.capture.linear import (
    BIAS_META,
    LinearMatch,
    find_linears,
    fuse_biases,
    split_biases,
)

aten = torch.ops.aten


def _calls(gm: fx.GraphModule, target) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target == target]


def _only(gm: fx.GraphModule, target) -> fx.Node:
    nodes = _calls(gm, target)
    assert len(nodes) == 1, f"expected one {target}, got {[n.name for n in nodes]}"
    return nodes[0]


def _out(res):
    return res[0] if isinstance(res, (tuple, list)) else res


# ---------------------------------------------------------------------------------------------
# modules


class OneLinear(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.fc = nn.Linear(8, 6, bias=bias)

    def forward(self, x):
        return self.fc(x)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class MatmulParam(nn.Module):
    """x @ w with w stored [in, out]."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6))

    def forward(self, x):
        return x @ self.w


class MmParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6))

    def forward(self, x):
        return torch.mm(x, self.w)


class Conv1D(nn.Module):
    """GPT-2's Conv1D: addmm(b, x2d, w) with w stored [in, out]."""

    def __init__(self, nx=8, nf=6):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class TwoConv1D(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = Conv1D(8, 16)
        self.c_proj = Conv1D(16, 8)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x)))


class TransposedWeight(nn.Module):
    """A weight stored [out, in] used through a transpose."""

    def __init__(self, how):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 8))
        self.how = how

    def forward(self, x):
        if self.how == "t":
            return x @ self.w.t()
        if self.how == "T":
            return x @ self.w.T
        if self.how == "transpose":
            return x @ self.w.transpose(0, 1)
        if self.how == "permute":
            return x @ self.w.permute(1, 0)
        if self.how == "ttt":
            return x @ self.w.t().t().t()
        if self.how == "mm_t":
            return torch.mm(x.reshape(-1, 8), self.w.t())
        if self.how == "functional":
            return F.linear(x, self.w)
        raise AssertionError(self.how)


class TwiceTransposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6))

    def forward(self, x):
        return x @ self.w.t().t()


class TiedLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8, bias=False)
        self.b = nn.Linear(8, 8, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class UntiedLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8, bias=False)
        self.b = nn.Linear(8, 8, bias=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


class TiedEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(self.emb(ids))


class UntiedEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)

    def forward(self, ids):
        return self.head(self.emb(ids))


class SameParamTwoMatmuls(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 8))

    def forward(self, x):
        return (x @ self.w) @ self.w.t()


class SharedTranspose(nn.Module):
    """The same transposed view feeds two matmuls."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 8))

    def forward(self, x, y):
        wt = self.w.t()
        return x @ wt + y @ wt


class ParamAlsoReduced(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6))

    def forward(self, x):
        return x @ self.w + self.w.sum()


class Attention(nn.Module):
    """q @ k^T and p @ v are matmuls of two activations."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.k = nn.Linear(8, 8)
        self.v = nn.Linear(8, 8)

    def forward(self, x):
        s = self.q(x) @ self.k(x).transpose(-1, -2)
        return torch.softmax(s, -1) @ self.v(x)


class ActivationMatmul(nn.Module):
    def forward(self, x, y):
        return x @ y.transpose(-1, -2) + torch.mm(x[0], y[0].t()).sum()


class ParamOnTheLeft(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 8))

    def forward(self, x):
        return self.w @ x


class NonMatrixParams(nn.Module):
    def __init__(self):
        super().__init__()
        self.vec = nn.Parameter(torch.randn(8))
        self.cube = nn.Parameter(torch.randn(2, 8, 6))

    def forward(self, x):
        return (x @ self.vec).sum() + (x @ self.cube).sum()


class Addmm2dBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 6))
        self.b = nn.Parameter(torch.randn(4, 6))

    def forward(self, x):
        return torch.addmm(self.b, x, self.w)


def _cap(module, *inputs):
    torch.manual_seed(0)
    return capture(module, example_inputs=tuple(inputs))


# ---------------------------------------------------------------------------------------------
# find_linears


def test_find_nn_linear():
    torch.manual_seed(0)
    c = _cap(OneLinear(), torch.randn(2, 3, 8))
    found = find_linears(c.gm)
    lin = _only(c.gm, aten.linear.default)
    assert list(found) == [lin.name]
    m = found[lin.name]
    assert isinstance(m, LinearMatch)
    assert m == LinearMatch(node=lin.name, input="x", weight="fc.weight", out_dim=0, in_dim=1,
                            exclusive=True, out_features=6, in_features=8, module="fc",
                            numel=48)


def test_find_nested_module_paths():
    torch.manual_seed(0)
    c = _cap(Nested(), torch.randn(2, 3, 8))
    found = find_linears(c.gm)
    assert len(found) == 4
    by_weight = {m.weight: m for m in found.values()}
    assert set(by_weight) == {"layers.0.up.weight", "layers.0.down.weight",
                              "layers.1.up.weight", "layers.1.down.weight"}
    for i in (0, 1):
        up, down = by_weight[f"layers.{i}.up.weight"], by_weight[f"layers.{i}.down.weight"]
        assert (up.module, up.out_features, up.in_features) == (f"layers.{i}.up", 16, 8)
        assert (down.module, down.out_features, down.in_features) == (f"layers.{i}.down", 8, 16)
        assert (up.out_dim, up.in_dim, up.exclusive) == (0, 1, True)
    # down's input is the relu of up's output
    nodes = {n.name: n for n in c.gm.graph.nodes}
    down0 = by_weight["layers.0.down.weight"]
    assert nodes[down0.input].target == aten.relu.default
    assert nodes[down0.input].args[0].name == by_weight["layers.0.up.weight"].node


def test_find_matmul_with_in_out_parameter():
    torch.manual_seed(0)
    c = _cap(MatmulParam(), torch.randn(2, 3, 8))
    found = find_linears(c.gm)
    mm = _only(c.gm, aten.matmul.default)
    assert found == {mm.name: LinearMatch(node=mm.name, input="x", weight="w", out_dim=1,
                                          in_dim=0, exclusive=True, out_features=6,
                                          in_features=8, module="", numel=48)}


def test_find_mm_with_in_out_parameter():
    torch.manual_seed(0)
    c = _cap(MmParam(), torch.randn(4, 8))
    found = find_linears(c.gm)
    mm = _only(c.gm, aten.mm.default)
    assert list(found) == [mm.name]
    m = found[mm.name]
    assert (m.weight, m.out_dim, m.in_dim, m.out_features, m.in_features, m.exclusive) == \
        ("w", 1, 0, 6, 8, True)


def test_find_addmm_conv1d_after_split_biases():
    # the pipeline splits biases before finding linears: addmm(b, x, W) -> mm(x, W) + b
    torch.manual_seed(0)
    c = _cap(TwoConv1D(), torch.randn(2, 3, 8))
    split_biases(c.gm)
    found = find_linears(c.gm)
    mms = _calls(c.gm, aten.mm.default)
    assert len(mms) == 2
    assert set(found) == {n.name for n in mms}
    by_weight = {m.weight: m for m in found.values()}
    fc, proj = by_weight["c_fc.weight"], by_weight["c_proj.weight"]
    assert (fc.out_dim, fc.in_dim, fc.out_features, fc.in_features) == (1, 0, 16, 8)
    assert (proj.out_dim, proj.in_dim, proj.out_features, proj.in_features) == (1, 0, 8, 16)
    assert fc.module == "c_fc" and proj.module == "c_proj"
    assert fc.exclusive and proj.exclusive
    nodes = {n.name: n for n in c.gm.graph.nodes}
    assert nodes[fc.input].target in (aten.view.default, aten.reshape.default)


@pytest.mark.parametrize("how", ["t", "T", "transpose", "permute", "ttt", "mm_t", "functional"])
def test_find_weight_used_through_transpose(how):
    torch.manual_seed(0)
    c = _cap(TransposedWeight(how), torch.randn(2, 3, 8))
    found = find_linears(c.gm)
    assert len(found) == 1
    (name, m), = found.items()
    target = aten.mm.default if how == "mm_t" else (
        aten.linear.default if how == "functional" else aten.matmul.default)
    assert name == _only(c.gm, target).name
    # stored [out, in] = [6, 8]
    assert (m.weight, m.out_dim, m.in_dim, m.out_features, m.in_features, m.exclusive) == \
        ("w", 0, 1, 6, 8, True)


def test_find_double_transpose_cancels():
    torch.manual_seed(0)
    c = _cap(TwiceTransposed(), torch.randn(2, 3, 8))
    (m,) = find_linears(c.gm).values()
    assert (m.out_dim, m.in_dim, m.out_features, m.in_features, m.exclusive) == (1, 0, 6, 8, True)


def test_tied_linears_are_not_exclusive():
    torch.manual_seed(0)
    c = _cap(TiedLinears(), torch.randn(2, 3, 8))
    found = find_linears(c.gm)
    lins = _calls(c.gm, aten.linear.default)
    assert len(lins) == 2 and set(found) == {n.name for n in lins}
    assert [found[n.name].exclusive for n in lins] == [False, False]
    assert found[lins[0].name].weight == found[lins[1].name].weight


def test_untied_linears_are_exclusive():
    torch.manual_seed(0)
    c = _cap(UntiedLinears(), torch.randn(2, 3, 8))
    found = find_linears(c.gm)
    assert len(found) == 2
    assert all(m.exclusive for m in found.values())
    assert {m.weight for m in found.values()} == {"a.weight", "b.weight"}


def test_embedding_tied_head_is_not_exclusive():
    torch.manual_seed(0)
    c = _cap(TiedEmbedding(), torch.randint(0, 10, (2, 3)))
    found = find_linears(c.gm)
    lin = _only(c.gm, aten.linear.default)
    assert list(found) == [lin.name]
    m = found[lin.name]
    assert m.exclusive is False
    assert (m.out_dim, m.in_dim, m.out_features, m.in_features) == (0, 1, 10, 8)
    emb = _only(c.gm, aten.embedding.default)
    assert emb.args[0].target == m.weight


def test_embedding_untied_head_is_exclusive():
    torch.manual_seed(0)
    c = _cap(UntiedEmbedding(), torch.randint(0, 10, (2, 3)))
    (m,) = find_linears(c.gm).values()
    assert m.exclusive is True and m.weight == "head.weight"
    # the embedding table is not a linear
    assert all(mm.weight != "emb.weight" for mm in find_linears(c.gm).values())


def test_same_param_in_two_matmuls_is_not_exclusive():
    torch.manual_seed(0)
    c = _cap(SameParamTwoMatmuls(), torch.randn(2, 3, 8))
    found = find_linears(c.gm)
    mms = _calls(c.gm, aten.matmul.default)
    assert len(found) == 2 and set(found) == {n.name for n in mms}
    first, second = found[mms[0].name], found[mms[1].name]
    assert (first.out_dim, first.in_dim, first.exclusive) == (1, 0, False)
    assert (second.out_dim, second.in_dim, second.exclusive) == (0, 1, False)


def test_shared_transpose_is_not_exclusive():
    torch.manual_seed(0)
    c = _cap(SharedTranspose(), torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    found = find_linears(c.gm)
    assert len(found) == 2
    assert [m.exclusive for m in found.values()] == [False, False]
    assert {m.input for m in found.values()} == {"x", "y"}


def test_param_with_another_use_is_not_exclusive():
    torch.manual_seed(0)
    c = _cap(ParamAlsoReduced(), torch.randn(2, 3, 8))
    (m,) = find_linears(c.gm).values()
    assert m.exclusive is False
    assert (m.out_dim, m.out_features, m.in_features) == (1, 6, 8)


def test_activation_matmuls_are_ignored():
    torch.manual_seed(0)
    c = _cap(Attention(), torch.randn(2, 3, 8))
    found = find_linears(c.gm)
    lins = _calls(c.gm, aten.linear.default)
    mms = _calls(c.gm, aten.matmul.default)
    assert len(lins) == 3 and len(mms) == 2
    assert set(found) == {n.name for n in lins}
    assert not set(found) & {n.name for n in mms}
    assert {m.weight for m in found.values()} == {"q.weight", "k.weight", "v.weight"}


def test_matmuls_of_inputs_only_find_nothing():
    torch.manual_seed(0)
    c = _cap(ActivationMatmul(), torch.randn(2, 3, 8), torch.randn(2, 3, 8))
    assert _calls(c.gm, aten.matmul.default) and _calls(c.gm, aten.mm.default)
    assert find_linears(c.gm) == {}


def test_param_as_left_operand_is_ignored():
    torch.manual_seed(0)
    c = _cap(ParamOnTheLeft(), torch.randn(8, 4))
    assert _calls(c.gm, aten.matmul.default)
    assert find_linears(c.gm) == {}


def test_non_matrix_params_are_ignored():
    torch.manual_seed(0)
    c = _cap(NonMatrixParams(), torch.randn(2, 3, 8))
    assert len(_calls(c.gm, aten.matmul.default)) == 2
    assert find_linears(c.gm) == {}


# ---------------------------------------------------------------------------------------------
# split_biases / fuse_biases


def _reference(module, *inputs):
    with torch.no_grad():
        return module(*inputs)


def test_split_linear_bias_structure():
    torch.manual_seed(0)
    c = _cap(OneLinear(), torch.randn(2, 3, 8))
    (orig,) = _calls(c.gm, aten.linear.default)
    orig_name, orig_shape = orig.name, tuple(orig.meta["val"].shape)
    split_biases(c.gm)
    lin = _only(c.gm, aten.linear.default)
    add = _only(c.gm, aten.add.Tensor)
    assert len(lin.args) == 2
    assert lin.args[0].name == "x" and lin.args[1].target == "fc.weight"
    assert add.args[0] is lin
    assert add.args[1].op == "get_attr" and add.args[1].target == "fc.bias"
    assert add.meta[BIAS_META] == lin.name
    assert BIAS_META not in lin.meta
    assert lin.name == orig_name + "_nobias" and add.name == orig_name + "_bias"
    assert tuple(lin.meta["val"].shape) == orig_shape == tuple(add.meta["val"].shape)
    out = [n for n in c.gm.graph.nodes if n.op == "output"][0]
    assert add in out.all_input_nodes
    assert orig_name not in {n.name for n in c.gm.graph.nodes}
    # find_linears sees the bias-free linear
    (m,) = find_linears(c.gm).values()
    assert (m.node, m.weight, m.exclusive) == (lin.name, "fc.weight", True)


def test_split_linear_without_bias_is_a_no_op():
    torch.manual_seed(0)
    c = _cap(OneLinear(bias=False), torch.randn(2, 3, 8))
    before = [(n.name, n.target, n.args) for n in c.gm.graph.nodes]
    split_biases(c.gm)
    after = [(n.name, n.target, n.args) for n in c.gm.graph.nodes]
    assert after == before
    assert not _calls(c.gm, aten.add.Tensor)


def test_split_addmm_structure():
    torch.manual_seed(0)
    c = _cap(Conv1D(), torch.randn(2, 3, 8))
    split_biases(c.gm)
    assert not _calls(c.gm, aten.addmm.default)
    mm = _only(c.gm, aten.mm.default)
    add = _only(c.gm, aten.add.Tensor)
    assert mm.args[1].target == "weight"
    assert mm.args[0].target in (aten.view.default, aten.reshape.default)
    assert add.args == (mm, add.args[1]) and add.args[1].target == "bias"
    assert add.meta[BIAS_META] == mm.name
    for n in (mm, add):
        shape = n.meta["val"].shape
        assert len(shape) == 2 and shape[1] == 6


def test_split_addmm_with_2d_bias_is_left_alone():
    torch.manual_seed(0)
    c = _cap(Addmm2dBias(), torch.randn(4, 8))
    split_biases(c.gm)
    assert len(_calls(c.gm, aten.addmm.default)) == 1
    assert not _calls(c.gm, aten.mm.default) and not _calls(c.gm, aten.add.Tensor)


@pytest.mark.parametrize(
    "make, inputs",
    [
        (lambda: OneLinear(), lambda: (torch.randn(2, 3, 8),)),
        (lambda: Nested(), lambda: (torch.randn(2, 5, 8),)),
        (lambda: Conv1D(), lambda: (torch.randn(2, 3, 8),)),
        (lambda: TwoConv1D(), lambda: (torch.randn(3, 4, 8),)),
        (lambda: Attention(), lambda: (torch.randn(2, 3, 8),)),
    ],
    ids=["linear", "nested", "conv1d", "two_conv1d", "attention"],
)
def test_split_then_fuse_keeps_outputs(make, inputs):
    torch.manual_seed(0)
    module = make()
    x = inputs()
    ref = _reference(module, *x)
    c = capture(module, example_inputs=x)
    n_linear = len(_calls(c.gm, aten.linear.default))
    n_addmm = len(_calls(c.gm, aten.addmm.default))
    n_biased = n_linear + n_addmm
    assert n_biased > 0
    adds_before = len(_calls(c.gm, aten.add.Tensor))

    split_biases(c.gm)
    c.gm.recompile()
    bias_adds = [n for n in c.gm.graph.nodes if BIAS_META in n.meta]
    assert len(bias_adds) == n_biased
    assert len(_calls(c.gm, aten.add.Tensor)) == adds_before + n_biased
    assert not _calls(c.gm, aten.addmm.default)
    assert all(len(n.args) == 2 for n in _calls(c.gm, aten.linear.default))
    with torch.no_grad():
        split_out = _out(c.gm(*x))
    torch.testing.assert_close(split_out, ref, rtol=1e-6, atol=1e-6)

    fuse_biases(c.gm)
    c.gm.graph.lint()
    c.gm.recompile()
    assert not [n for n in c.gm.graph.nodes if BIAS_META in n.meta]
    assert len(_calls(c.gm, aten.add.Tensor)) == adds_before
    assert len(_calls(c.gm, aten.linear.default)) == n_linear
    assert len(_calls(c.gm, aten.addmm.default)) == n_addmm
    assert not _calls(c.gm, aten.mm.default)
    assert all(len(n.args) == 3 and n.args[2] is not None
               for n in _calls(c.gm, aten.linear.default))
    with torch.no_grad():
        fused_out = _out(c.gm(*x))
    torch.testing.assert_close(fused_out, ref, rtol=1e-6, atol=1e-6)
    # a fresh input of another batch/sequence size still works after the round trip
    x2 = tuple(torch.randn(4, 7, 8) for _ in x)
    with torch.no_grad():
        torch.testing.assert_close(_out(c.gm(*x2)), _reference(module, *x2), rtol=1e-5, atol=1e-5)


def test_fuse_restores_linear_args():
    torch.manual_seed(0)
    c = _cap(OneLinear(), torch.randn(2, 3, 8))
    split_biases(c.gm)
    fuse_biases(c.gm)
    c.gm.recompile()
    lin = _only(c.gm, aten.linear.default)
    assert [a.name if isinstance(a, fx.Node) else a for a in lin.args] == \
        ["x", lin.args[1].name, lin.args[2].name]
    assert lin.args[1].target == "fc.weight" and lin.args[2].target == "fc.bias"
    assert not _calls(c.gm, aten.add.Tensor)
    assert "aten.add" not in c.gm.code and "aten.linear.default(x, " in c.gm.code


def test_fuse_restores_addmm_args():
    torch.manual_seed(0)
    m = Conv1D()
    x = torch.randn(2, 3, 8)
    c = capture(m, example_inputs=(x,))
    split_biases(c.gm)
    fuse_biases(c.gm)
    c.gm.recompile()
    addmm = _only(c.gm, aten.addmm.default)
    assert addmm.args[0].target == "bias" and addmm.args[2].target == "weight"
    assert addmm.args[1].target in (aten.view.default, aten.reshape.default)
    assert not _calls(c.gm, aten.add.Tensor) and not _calls(c.gm, aten.mm.default)
    with torch.no_grad():
        torch.testing.assert_close(_out(c.gm(x)), m(x), rtol=1e-6, atol=1e-6)


def test_fuse_keeps_pair_when_matmul_has_other_users():
    torch.manual_seed(0)
    m = OneLinear()
    x = torch.randn(2, 3, 8)
    c = capture(m, example_inputs=(x,))
    split_biases(c.gm)
    lin = _only(c.gm, aten.linear.default)
    add = _only(c.gm, aten.add.Tensor)
    # a second user of the bias-free result: the linear cannot absorb the bias any more
    with c.gm.graph.inserting_after(lin):
        c.gm.graph.call_function(aten.relu.default, (lin,))
    assert len(lin.users) == 2
    fuse_biases(c.gm)
    assert _only(c.gm, aten.add.Tensor) is add
    assert len(lin.args) == 2


def test_split_is_idempotent():
    torch.manual_seed(0)
    m = Block()
    x = torch.randn(2, 3, 8)
    c = capture(m, example_inputs=(x,))
    split_biases(c.gm)
    once = [(n.name, n.target) for n in c.gm.graph.nodes]
    split_biases(c.gm)
    assert [(n.name, n.target) for n in c.gm.graph.nodes] == once
    c.gm.recompile()
    with torch.no_grad():
        torch.testing.assert_close(_out(c.gm(x)), m(x), rtol=1e-6, atol=1e-6)


class NoOpTranspose(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 8))    # stored [out, in]
        self.dims = dims

    def forward(self, x):
        # transpose(d, d) (or (-1, 1) on a 2-D tensor) is the identity; .t() then flips once
        return x @ self.w.transpose(*self.dims).t()


@pytest.mark.parametrize("dims", [(1, 1), (-1, 1), (0, -2)])
def test_noop_transpose_is_not_a_flip(dims):
    torch.manual_seed(0)
    c = capture(NoOpTranspose(dims), example_inputs=(torch.randn(2, 3, 8),))
    (m,) = find_linears(c.gm).values()
    assert (m.out_dim, m.in_dim, m.out_features, m.in_features) == (0, 1, 6, 8)
