"""Unit tests of fxtp/solve/placements.py: DimShard, Sharded and group_dims."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.export import Dim

from fxtp.solve.placements import (
    REPLICATE,
    DimShard,
    Origin,
    Partial,
    Sharded,
    group_dims,
)
from fxtp.solve.splits import split_in_heads

# ---------------------------------------------------------------------------------------------
# DimShard


def test_piece_plain_split_gives_each_rank_its_own_piece():
    ds = DimShard(4, 1, (64,))
    assert [ds.piece(r) for r in range(4)] == [0, 1, 2, 3]


def test_piece_with_stride_shares_pieces_between_neighbouring_ranks():
    # GQA: 2 kv pieces over 4 ranks, ranks (0, 1) hold piece 0 and (2, 3) piece 1
    ds = DimShard(2, 2, (64,))
    assert [ds.piece(r) for r in range(4)] == [0, 0, 1, 1]


def test_piece_without_stride_wraps_around():
    ds = DimShard(2, 1, (64,))
    assert [ds.piece(r) for r in range(4)] == [0, 1, 0, 1]


def test_piece_stride_and_wrap_combined():
    ds = DimShard(2, 2, (8,))
    assert [ds.piece(r) for r in range(8)] == [0, 0, 1, 1, 0, 0, 1, 1]


def test_size_and_local_size_single_chunk():
    ds = DimShard(4, 1, (64,))
    assert ds.size == 64
    assert ds.local_size == 16


def test_size_and_local_size_fused_chunks():
    ds = DimShard(2, 1, (64, 64, 64))
    assert ds.size == 192
    assert ds.local_size == 96
    # uneven fused chunks (GQA qkv: 64 q features, 16 k, 16 v)
    gqa = DimShard(2, 1, (64, 16, 16))
    assert gqa.size == 96
    assert gqa.local_size == 32 + 8 + 8


def test_local_size_with_stride_depends_only_on_parts():
    assert DimShard(2, 2, (64,)).local_size == 32
    assert DimShard(1, 4, (64,)).local_size == 64


@pytest.mark.parametrize(
    "parts, chunks, expected",
    [
        (4, (64,), True),
        (3, (64,), True),        # uneven: 22, 21, 21
        (3, (6, 6), True),
        (3, (6, 2), False),      # the second chunk has fewer elements than pieces
        (2, (64, 64, 64), True),
        (4, (64, 16, 16), True),
        (4, (64, 2, 2), False),
        (1, (7, 5), True),
    ],
)
def test_valid(parts, chunks, expected):
    assert DimShard(parts, 1, chunks).valid() is expected


@pytest.mark.parametrize("parts, chunks, even", [(4, (64,), True), (3, (64,), False),
                                                  (2, (64, 6), True), (4, (64, 6), False)])
def test_even(parts, chunks, even):
    assert DimShard(parts, 1, chunks).even() is even


def test_uneven_split_gives_the_first_ranks_one_unit_more():
    heads3 = DimShard(2, 1, (48,), unit=16)          # 3 heads of 16 on 2 ranks
    assert heads3.local_ranges(0) == [(0, 32)]
    assert heads3.local_ranges(1) == [(32, 16)]
    assert heads3.local_sizes(2) == (32, 16)
    assert heads3.local_size == 32
    assert not heads3.even() and heads3.valid()
    # whole units only: 5 units of 4 on 3 ranks -> 2, 2, 1 units
    assert DimShard(3, 1, (20,), unit=4).local_sizes(3) == (8, 8, 4)


def test_uneven_split_of_fused_chunks_splits_each_chunk():
    ds = DimShard(2, 1, (48, 48, 48), unit=16)
    assert ds.index(0).tolist() == list(range(0, 32)) + list(range(48, 80)) + list(range(96, 128))
    assert ds.index(1).tolist() == list(range(32, 48)) + list(range(80, 96)) + list(range(128, 144))


def test_per_chunk_splits_keep_a_chunk_whole():
    from fxtp.solve.placements import ChunkSplit
    # fused multi-query qkv: 4 q heads split over 4 ranks, the k and v heads whole everywhere
    ds = DimShard(splits=(ChunkSplit(64, 4), ChunkSplit(16, 1, 4), ChunkSplit(16, 1, 4)))
    assert not ds.uniform()
    assert ds.index(2).tolist() == list(range(32, 48)) + list(range(64, 96))
    assert ds.local_sizes(4) == (48, 48, 48, 48)
    assert not ds.disjoint(4)
    assert "whole" in ds.describe()


def test_uneven_describe_names_each_rank_size():
    assert "uneven: rank sizes [32, 16]" in DimShard(2, 1, (48,), unit=16).describe()


def test_scaled_checks_piece_boundaries():
    # 3 heads of 16 split at head boundaries survive the view into heads
    assert DimShard(2, 1, (48,), unit=16).scaled(1, 16) == DimShard(2, 1, (3,))
    # split at element 24 (unit 1) would cut a head in half
    assert DimShard(2, 1, (48,)).scaled(1, 16) is None


def test_outer_dims_compare_and_describe():
    a = DimShard(2, 1, (4,), outer=True)
    assert a != DimShard(2, 1, (4,)) and a == DimShard(2, 1, (4,), outer=True)
    assert "outer" in a.describe()


def test_local_ranges_single_chunk():
    ds = DimShard(4, 1, (64,))
    assert [ds.local_ranges(r) for r in range(4)] == [
        [(0, 16)], [(16, 16)], [(32, 16)], [(48, 16)],
    ]


def test_local_ranges_fused_chunks_take_a_slice_of_every_chunk():
    ds = DimShard(2, 1, (64, 64, 64))
    assert ds.local_ranges(0) == [(0, 32), (64, 32), (128, 32)]
    assert ds.local_ranges(1) == [(32, 32), (96, 32), (160, 32)]


def test_local_ranges_uneven_fused_chunks():
    ds = DimShard(2, 1, (64, 16, 16))
    assert ds.local_ranges(0) == [(0, 32), (64, 8), (80, 8)]
    assert ds.local_ranges(1) == [(32, 32), (72, 8), (88, 8)]


def test_local_ranges_with_stride():
    ds = DimShard(2, 2, (32, 32))
    assert ds.local_ranges(0) == ds.local_ranges(1) == [(0, 16), (32, 16)]
    assert ds.local_ranges(2) == ds.local_ranges(3) == [(16, 16), (48, 16)]


def test_index_fused_chunks():
    ds = DimShard(2, 1, (64, 64, 64))
    idx0 = ds.index(0)
    idx1 = ds.index(1)
    assert idx0.dtype == torch.int64
    assert idx0.tolist() == list(range(0, 32)) + list(range(64, 96)) + list(range(128, 160))
    assert idx1.tolist() == list(range(32, 64)) + list(range(96, 128)) + list(range(160, 192))


def test_index_small_exact_values():
    ds = DimShard(2, 1, (4, 2))
    assert ds.index(0).tolist() == [0, 1, 4]
    assert ds.index(1).tolist() == [2, 3, 5]


@pytest.mark.parametrize("chunks", [(64,), (64, 64, 64), (64, 16, 16), (8, 24)])
@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_index_of_all_ranks_partitions_the_dim(chunks, world):
    ds = DimShard(world, 1, chunks)
    assert ds.valid()
    idx = torch.cat([ds.index(r) for r in range(world)])
    assert len(idx) == ds.size
    assert sorted(idx.tolist()) == list(range(ds.size))
    for r in range(world):
        assert len(ds.index(r)) == ds.local_size


def test_index_selects_each_ranks_heads_from_every_fused_chunk():
    torch.manual_seed(0)
    # a fused q|k|v weight of 3 x 4 heads of dim 2: rank r must hold heads 2r, 2r+1 of each
    heads, hd, world = 4, 2, 2
    w = torch.randn(3 * heads * hd, 5)
    q, k, v = w.split(heads * hd)
    ds = DimShard(world, 1, (heads * hd,) * 3)
    for r in range(world):
        local = w[ds.index(r)]
        per = heads * hd // world
        expected = torch.cat([q[r * per:(r + 1) * per], k[r * per:(r + 1) * per],
                              v[r * per:(r + 1) * per]])
        assert torch.equal(local, expected)


def test_index_stride_replicates_pieces():
    ds = DimShard(2, 2, (8,))
    assert ds.index(0).tolist() == ds.index(1).tolist() == [0, 1, 2, 3]
    assert ds.index(2).tolist() == ds.index(3).tolist() == [4, 5, 6, 7]


def test_scaled_up_and_down():
    ds = DimShard(2, 2, (6, 2))
    up = ds.scaled(4)
    assert up == DimShard(2, 2, (24, 8), unit=4)
    down = up.scaled(1, 2)
    assert down == DimShard(2, 2, (12, 4), unit=2)
    assert DimShard(2, 2, (8, 4), unit=2).scaled(3, 2) == DimShard(2, 2, (12, 6), unit=3)


def test_scaled_keeps_parts_and_stride():
    s = DimShard(2, 2, (64,)).scaled(1, 16)
    assert (s.parts, s.stride, s.chunks) == (2, 2, (4,))


def test_scaled_returns_none_when_not_integral():
    assert DimShard(2, 1, (6,)).scaled(1, 4) is None
    # one chunk divides, the other does not
    assert DimShard(2, 1, (8, 6)).scaled(1, 4) is None
    assert DimShard(2, 1, (8, 12)).scaled(1, 4) is None       # 12 -> 6 + 6: not whole units of 4
    assert DimShard(2, 1, (8, 16)).scaled(1, 4) == DimShard(2, 1, (2, 4))


def test_scaled_identity():
    ds = DimShard(4, 1, (64, 16))
    assert ds.scaled(1) == ds
    assert ds.scaled(5, 5) == ds


def test_covers_gqa_kv_shard_covers_q_shard():
    # world size 4, 64 features: q split 4 ways, kv heads split 2 ways (each kv piece on 2 ranks)
    kv = DimShard(2, 2, (64,))
    q = DimShard(4, 1, (64,))
    assert kv.covers(q, 4) is True
    # the reverse is false: rank 0 holds [0, 16) of q but needs [0, 32)
    assert q.covers(kv, 4) is False


def test_covers_needs_the_right_stride():
    # parts=2 with stride 1 puts piece 1 on rank 1 = [32, 64), which does not contain [16, 32)
    wrapped = DimShard(2, 1, (64,))
    q = DimShard(4, 1, (64,))
    assert wrapped.covers(q, 4) is False


def test_covers_itself():
    for ds in (DimShard(4, 1, (64,)), DimShard(2, 2, (64,)), DimShard(2, 1, (64, 64, 64))):
        assert ds.covers(ds, 4) is True


def test_covers_whole_dim_covers_everything():
    full = DimShard(1, 4, (64,))
    assert full.covers(DimShard(4, 1, (64,)), 4) is True
    assert full.covers(DimShard(2, 2, (64,)), 4) is True
    assert DimShard(4, 1, (64,)).covers(full, 4) is False


def test_covers_fused_chunks_by_the_elements_each_rank_holds():
    a = DimShard(2, 1, (64, 64, 64))
    assert a.covers(DimShard(2, 1, (64, 64, 64)), 2) is True
    assert a.covers(DimShard(4, 1, (64, 64, 64)), 4) is False
    # a dim whole on every rank holds whatever any split wants
    assert DimShard(1, 2, (64, 64, 64)).covers(DimShard(2, 1, (64, 64, 64)), 2) is True
    assert DimShard(2, 1, (64, 64, 64)).covers(DimShard(1, 2, (64, 64, 64)), 2) is False


def test_covers_different_chunks_is_false():
    assert DimShard(2, 1, (128,)).covers(DimShard(2, 1, (64, 64)), 2) is False
    assert DimShard(2, 1, (64,)).covers(DimShard(2, 1, (32,)), 2) is False


def test_dimshard_is_hashable_and_compares_by_value():
    a, b = DimShard(2, 1, (64, 64)), DimShard(2, 1, (64, 64))
    assert a == b and hash(a) == hash(b)
    assert a != DimShard(2, 2, (64, 64))
    assert len({a, b, DimShard(2, 1, (128,))}) == 2


def test_describe_strings():
    assert DimShard(4, 1, (64,)).describe() == "4 parts"
    assert DimShard(2, 2, (64,)).describe() == "2 parts, each held by 2 ranks"
    assert DimShard(2, 1, (64, 64, 64)).describe() == "2 parts, 3 fused chunks [64, 64, 64]"


# ---------------------------------------------------------------------------------------------
# Sharded


def test_sharded_of_sorts_dims_and_get():
    a, b = DimShard(4, 1, (64,)), DimShard(2, 2, (8,))
    sp = Sharded.of({2: a, 0: b})
    assert sp.dims == ((0, b), (2, a))
    assert sp.get(0) is b
    assert sp.get(2) is a
    assert sp.get(1) is None
    assert sp.get(-1) is None
    assert sp.as_dict() == {0: b, 2: a}


def test_sharded_origin_of():
    a = DimShard(4, 1, (64,))
    sp = Sharded.of({1: a, 3: a}, {3: ("linear_1", 16), 1: ("linear", 1)})
    assert sp.origin == ((1, Origin("linear", 1)), (3, Origin("linear_1", 16)))
    assert sp.origin_of(1) == ("linear", 1, 0)
    assert sp.origin_of(3) == ("linear_1", 16, 0) and sp.origin_of(3).unit == 16
    assert sp.origin_of(0) is None
    assert sp.origin_dict() == {1: ("linear", 1, 0), 3: ("linear_1", 16, 0)}


def test_a_piece_records_where_it_starts_in_its_source():
    """A split or slice of a source's dim keeps the origin with the piece's offset (in the
    source's features), so that a refine asked for the piece re-cuts just that part."""
    a = DimShard(2, 1, (64, 32))
    sp = Sharded.of({2: a}, {2: ("in_proj", 4)})
    assert sp.piece_origin(2, 8)[2] == Origin("in_proj", 4, 32)
    assert sp.piece_origin(1, 8) == sp.origin_dict()       # another dim: unchanged


def test_sharded_of_drops_origin_of_unsharded_dims():
    a = DimShard(4, 1, (64,))
    sp = Sharded.of({1: a}, {1: ("linear", 1), 2: ("other", 4)})
    assert sp.origin == ((1, Origin("linear", 1)),)
    assert sp.origin_of(2) is None


def test_sharded_equality_ignores_origin():
    a = DimShard(4, 1, (64,))
    with_origin = Sharded.of({1: a}, {1: ("linear", 1)})
    without = Sharded.of({1: a})
    assert with_origin == without
    assert hash(with_origin) == hash(without)
    assert with_origin != Sharded.of({2: a})
    assert with_origin != Sharded.of({1: DimShard(2, 1, (64,))})


def test_sharded_of_empty():
    sp = Sharded.of({})
    assert sp.dims == () and sp.origin == ()
    assert sp.get(0) is None and sp.origin_of(0) is None


def test_placement_describe():
    sp = Sharded.of({1: DimShard(4, 1, (64,)), 0: DimShard(2, 2, (8,))})
    assert sp.describe() == "Shard(dim 0: 2 parts, each held by 2 ranks, dim 1: 4 parts)"
    assert Partial().describe() == "Partial(sum)"
    assert REPLICATE.describe() == "Replicate()"
    assert repr(REPLICATE) == "Replicate()"


# ---------------------------------------------------------------------------------------------
# group_dims with int sizes


@pytest.mark.parametrize(
    "src, dst, expected",
    [
        ([2, 3, 64], [6, 64], [([0, 1], [0]), ([2], [1])]),
        ([6, 64], [2, 3, 64], [([0], [0, 1]), ([1], [2])]),
        ([2, 3, 64], [2, 3, 4, 16], [([0], [0]), ([1], [1]), ([2], [2, 3])]),
        ([2, 3, 4, 16], [2, 3, 64], [([0], [0]), ([1], [1]), ([2, 3], [2])]),
        ([2, 3, 64], [2, 192], [([0], [0]), ([1, 2], [1])]),
        ([4, 6], [2, 12], [([0, 1], [0, 1])]),
        ([24], [2, 3, 4], [([0], [0, 1, 2])]),
        ([2, 3, 4], [24], [([0, 1, 2], [0])]),
        ([5], [5], [([0], [0])]),
        ([], [], []),
        # size-1 dims are their own groups
        ([1, 4], [4], [([0], []), ([1], [0])]),
        ([4], [4, 1], [([0], [0]), ([], [1])]),
        ([2, 1, 8], [2, 8], [([0], [0]), ([1], []), ([2], [1])]),
        ([2, 8], [2, 1, 2, 4], [([0], [0]), ([], [1]), ([1], [2, 3])]),
        ([1], [1], [([0], [0])]),
        ([1, 1], [1], [([0], [0]), ([1], [])]),
    ],
)
def test_group_dims_int(src, dst, expected):
    assert group_dims(src, dst) == expected


@pytest.mark.parametrize(
    "src, dst",
    [
        ([2, 3], [5]),            # different number of elements
        ([4], [2]),
        ([2, 3], [2, 4]),
        ([2, 3, 64], [6, 32]),
        ([6], [6, 2]),            # a dim left over in dst
        ([6, 2], [6]),            # a dim left over in src
        ([4], []),
    ],
)
def test_group_dims_int_mismatch_returns_none(src, dst):
    assert group_dims(src, dst) is None


def test_group_dims_accepts_torch_size():
    assert group_dims(torch.Size([2, 3, 64]), torch.Size([6, 64])) == [([0, 1], [0]), ([2], [1])]


# ---------------------------------------------------------------------------------------------
# group_dims with symbolic sizes from torch.export


class _Views(nn.Module):
    def forward(self, x):
        b, s, _ = x.shape
        return (
            x.view(b * s, 64) + 1,
            x.view(b, s, 4, 16) + 1,
            x.reshape(b, s * 64) + 1,
            x.reshape(b, s, 2, 32).reshape(b * s * 2, 32) + 1,
        )


@pytest.fixture(scope="module")
def sym_shapes():
    x = torch.randn(3, 5, 64)
    ep = torch.export.export(_Views(), (x,), dynamic_shapes=({0: Dim.AUTO, 1: Dim.AUTO},),
                             strict=False)
    views = {torch.ops.aten.view.default, torch.ops.aten.reshape.default}
    src = None
    outs = []
    for n in ep.graph.nodes:
        if n.op == "placeholder" and src is None:
            src = list(n.meta["val"].shape)
        elif n.op == "call_function" and n.target in views:
            outs.append(list(n.meta["val"].shape))
    assert src is not None and len(outs) == 5
    return src, outs


def test_sym_shapes_are_really_symbolic(sym_shapes):
    src, outs = sym_shapes
    assert isinstance(src[0], torch.SymInt) and isinstance(src[1], torch.SymInt)
    assert src[2] == 64 and isinstance(src[2], int)
    assert isinstance(outs[0][0], torch.SymInt)     # b*s


def test_group_dims_sym_merge_batch_and_seq(sym_shapes):
    src, outs = sym_shapes
    assert group_dims(src, outs[0]) == [([0, 1], [0]), ([2], [1])]
    assert group_dims(outs[0], src) == [([0], [0, 1]), ([1], [2])]


def test_group_dims_sym_split_into_heads(sym_shapes):
    src, outs = sym_shapes
    assert group_dims(src, outs[1]) == [([0], [0]), ([1], [1]), ([2], [2, 3])]
    assert group_dims(outs[1], src) == [([0], [0]), ([1], [1]), ([2, 3], [2])]


def test_group_dims_sym_merge_seq_and_features(sym_shapes):
    src, outs = sym_shapes
    assert group_dims(src, outs[2]) == [([0], [0]), ([1, 2], [1])]
    assert group_dims(outs[2], src) == [([0], [0]), ([1], [1, 2])]


def test_group_dims_sym_chained_reshape(sym_shapes):
    src, outs = sym_shapes
    heads2, flat = outs[3], outs[4]          # [b, s, 2, 32] -> [b*s*2, 32]
    assert group_dims(heads2, flat) == [([0, 1, 2], [0]), ([3], [1])]
    assert group_dims(src, flat) == [([0, 1, 2], [0, 1])]
    # the SymInt sizes mix with plain ints
    b, s = src[0], src[1]
    assert group_dims([b, s, 2, 32], flat) == [([0, 1, 2], [0]), ([3], [1])]
    assert group_dims([b, s, 1, 64], [b, s, 64]) == [([0], [0]), ([1], [1]), ([2], []), ([3], [2])]


def test_group_dims_sym_mismatch_returns_none(sym_shapes):
    src, outs = sym_shapes
    b, s = src[0], src[1]
    # [b, s, 64] -> [b, s, 4, 8]: 64 features do not equal 32
    assert group_dims(src, [b, s, 4, 8]) is None
    # [b, s] -> [b, 2*s]: the element counts differ
    assert group_dims([b, s], [b, 2 * s]) is None
    # [b, s, 64] -> [b*s]: 64 left over
    assert group_dims(src, outs[0][:1]) is None
    # [b*s, 64] -> [b, 64]: s left over
    assert group_dims(outs[0], [b, 64]) is None
    # [b, s, 64] -> [b, 128]: s * 64 vs 128 is not symbolically equal
    assert group_dims(src, [b, 128]) is None


def test_group_dims_widens_a_group_when_neither_product_divides():
    assert group_dims([2, 3], [3, 2]) == [([0, 1], [0, 1])]
    assert group_dims([2, 3, 4], [3, 8]) == [([0, 1, 2], [0, 1])]
    assert group_dims([2, 3], [5]) is None


# ---------------------------------------------------------------------------------------------
# solve/splits.py


def test_split_in_heads_holds_a_single_head_chunk_beside_others_whole():
    """q|k|v of a fused multi-query qkv, cut at its chunks before the view into heads: the 4 q
    heads are split, the one k and one v head held whole on every rank; a lone single-head
    source is left to the solver (kept replicated)."""
    fused = DimShard(2, 1, (64, 16, 16))
    heads = split_in_heads(fused, 16, alone=True)
    assert [(c.size, c.parts, c.unit) for c in heads.splits] == [(64, 2, 16), (16, 1, 16),
                                                                  (16, 1, 16)]
    assert heads.local_sizes(2) == (64, 64)
    assert split_in_heads(DimShard(2, 1, (16,)), 16, alone=True) is None
