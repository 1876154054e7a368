"""Unit tests of the generator's decode machinery without a model or ranks: batch buckets, the
static-buffer replay path (emulated CUDA graphs) on a toy step, cache row views, compile
options, the cache keyword, the prompt fingerprint. The model-level tests (tokens equal to
model.generate through the same paths) run in the spawn of tests/test_generate.py."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import fxtp
from fxtp.generation.generator import Generator, _fingerprint
from fxtp.generation.replay import Replay, buckets
from fxtp.generation.step import CacheRows, cache_kwarg

L = 8


def test_buckets_are_powers_of_two_up_to_max_batch():
    assert buckets(1) == [1]
    assert buckets(3) == [1, 2, 3]
    assert buckets(8) == [1, 2, 4, 8]
    assert buckets(6) == [1, 2, 4, 6]
    r = Replay("emulate", 6, L)
    assert [r.bucket_of(b) for b in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    assert Replay("eager", 6, L).bucket_of(3) == 3


class ToyStep:
    """Writes `ids * 100 + pos` into a cache at slot `start` of each row and returns logits
    `[n, 1, 3]` made of (ids, pos, start, sum of the row's unmasked cache): a stand-in for
    the step graph, reading every static input."""

    def __init__(self, rows: int):
        self.cache = torch.zeros(rows, L, dtype=torch.long)
        self.calls = 0

    def __call__(self, ids, pos, mask, start):
        self.calls += 1
        n = ids.shape[0]
        self.cache[:n].index_copy_(1, start.reshape(1), ids * 100 + pos)
        seen = (self.cache[:n] * mask).sum(-1, keepdim=True)
        return torch.stack([ids, pos, start.expand_as(ids), seen], -1).float()


@pytest.mark.parametrize("mode", ["eager", "emulate"])
def test_replay_feeds_the_step_static_inputs_token_after_token(mode):
    step = ToyStep(4)
    r = Replay(mode, 4, L)
    b, p = 3, 2
    mask = torch.ones(b, L, dtype=torch.long)
    mask[0, 0] = 0                                    # a left-padded row
    bk = r.begin(b, mask, torch.tensor([0, 1, 1]), p, torch.device("cpu"))
    for t in range(3):
        tokens = torch.tensor([5, 6, 7]) + t
        out = r.step(bk, b, tokens, step)
        assert out.shape == (b, 4)
        assert out[:, 0].tolist() == tokens.tolist()                  # the new ids
        assert out[:, 1].tolist() == [1 + t, 2 + t, 2 + t]            # positions advanced
        assert out[:, 2].tolist() == [p + t] * 3                      # the cache slot
        assert step.cache[:b, p + t].tolist() == (tokens * 100 + out[:, 1].long()).tolist()
    assert bk.start.item() == p + 3
    assert bk.mask[:b].equal(mask) and bk.mask[b:].eq(1).all()         # dummy rows: ones
    if mode == "emulate":
        assert bk.ids.shape[0] == 4 and r.captures == 1 and bk.warmups == 2
        assert step.calls == 2 + 3                  # warm-up, then one run per token
    else:
        assert bk.ids.shape[0] == b and r.captures == 0 and step.calls == 3


def test_replay_captures_once_per_bucket_and_again_after_a_move():
    step = ToyStep(4)
    r = Replay("emulate", 4, L)
    weights = [torch.zeros(3)]
    for b in (1, 2, 1, 3, 4):
        r.check(weights)
        bk = r.begin(b, torch.ones(b, L, dtype=torch.long), torch.zeros(b, dtype=torch.long), 1,
                      torch.device("cpu"))
        r.step(bk, b, torch.ones(b, dtype=torch.long), step)
        r.step(bk, b, torch.ones(b, dtype=torch.long), step)
    assert sorted(r._buckets) == [1, 2, 4] and r.captures == 3
    r.check(weights)                                 # same tensors: nothing dropped
    assert r.captures == 3
    r.check([torch.zeros(3)])                        # a new tensor: graphs dropped
    assert r.captures == 0 and not r._buckets


def test_cache_rows_point_at_the_first_rows_and_back():
    m = nn.Module()
    m.register_buffer("k", torch.arange(24.0).reshape(4, 6))
    m.sub = nn.Module()
    m.sub.v = torch.zeros(4, 6)                       # a plain tensor attribute
    rows = CacheRows(m, ["k", "sub.v"])
    whole = [t for t in rows.tensors()]
    with rows.rows(2):
        assert m.k.shape == (2, 6) and m.sub.v.shape == (2, 6)
        assert m.k.data_ptr() == whole[0].data_ptr()  # same storage: CUDA graphs see one cache
        m.k.add_(1)
    assert m.k is whole[0] and m.sub.v is whole[1]
    assert m.k[:2].sub(1).equal(torch.arange(12.0).reshape(2, 6)) and m.k[2:].equal(
        torch.arange(12.0, 24.0).reshape(2, 6))


def test_compile_leaves_cuda_graphs_to_the_generator(monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda mod, **kw: seen.append(kw) or mod)
    fake = SimpleNamespace(tp=nn.Linear(1, 1), _replay=Replay("emulate", 2, L))
    Generator.compile(fake, mode="reduce-overhead")
    Generator.compile(fake, mode="max-autotune", dynamic=True)
    Generator.compile(fake, options={"triton.cudagraphs": True, "max_autotune": True})
    assert seen[0] == {"mode": "default", "fullgraph": True}
    assert seen[1] == {"mode": "max-autotune-no-cudagraphs", "dynamic": True, "fullgraph": True}
    assert seen[2]["options"] == {"triton.cudagraphs": False, "max_autotune": True}


def test_cache_keyword_found_from_the_signature():
    class New(nn.Module):
        def forward(self, input_ids=None, cache=None, **kwargs):
            pass

    class Old(nn.Module):
        def forward(self, input_ids=None, past_key_values=None, **kwargs):
            pass

    class Neither(nn.Module):
        def forward(self, input_ids=None, **kwargs):
            pass

    assert cache_kwarg(New()) == "cache" and cache_kwarg(Old()) == "past_key_values"
    with pytest.raises(fxtp.GenerationError, match="cache"):
        cache_kwarg(Neither())


def test_fingerprint_tells_prompts_apart_on_the_given_device():
    gc = SimpleNamespace(max_length=9, do_sample=False, temperature=None, top_k=50, top_p=None)
    ids = torch.tensor([[3, 4, 5], [0, 6, 7]])
    mask = (ids != 0).long()
    v = _fingerprint(ids, mask, gc, torch.device("cpu"))
    assert v.dtype == torch.int64 and v.device.type == "cpu" and v.numel() == 9
    assert v.equal(_fingerprint(ids.clone(), mask.clone(), gc, torch.device("cpu")))
    swapped = ids.flip(1)                             # same values, other order
    assert not v[2] == _fingerprint(swapped, mask, gc, torch.device("cpu"))[2]
    assert not v[3] == _fingerprint(ids, torch.ones_like(mask), gc, torch.device("cpu"))[3]
