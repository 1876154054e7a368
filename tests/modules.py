"""Hand-written (non Hugging Face) modules used by the tests, with explicit shape constants."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .modules_mixers import (
    GatedHeadRows,
    LatentAttention,
    StateSpaceBlock,
    TensorSplitGateUp,
    TorchNormsBlock,
    WindowedAttention,
)


class TinyAttention(nn.Module):
    """Multi-head self-attention written by hand: view with a literal head count, eager softmax."""

    def __init__(self, dim: int = 32, heads: int = 4, bias: bool = True):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=bias)
        self.k = nn.Linear(dim, dim, bias=bias)
        self.v = nn.Linear(dim, dim, bias=bias)
        self.o = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q = self.q(x).view(b, s, self.heads, self.hd).transpose(1, 2)
        k = self.k(x).view(b, s, self.heads, self.hd).transpose(1, 2)
        v = self.v(x).view(b, s, self.heads, self.hd).transpose(1, 2)
        att = (q @ k.transpose(-1, -2)) * self.hd ** -0.5
        att = att.softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, s, d)
        return self.o(y)


class TinyBlock(nn.Module):
    """Pre-norm transformer block: attention + gated MLP, residuals."""

    def __init__(self, dim: int = 32, heads: int = 4, hidden: int = 64):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = TinyAttention(dim, heads)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        h = self.norm2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class TinyNet(nn.Module):
    """Two blocks and a head: a model fxtp has never seen, captured from example inputs."""

    def __init__(self, dim: int = 32, heads: int = 4, hidden: int = 64, layers: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(TinyBlock(dim, heads, hidden) for _ in range(layers))
        self.head = nn.Linear(dim, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.head(x)


class PlainMLP(nn.Module):
    def __init__(self, dim: int = 16, hidden: int = 32):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class MixesTokensAfterRow(nn.Module):
    """A row-parallel output read at once by an op that mixes tokens (a cumsum along the
    sequence): sequence parallelism keeps that all-reduce."""

    def __init__(self, dim: int = 16, hidden: int = 32):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.cumsum(self.fc2(torch.relu(self.fc1(x))), dim=1)


class WidensBeforeMixing(nn.Module):
    """A row-parallel output whose first user doubles its width (a cat with the input) before
    an op that mixes tokens: holding that user's tokens would gather twice the bytes the
    reduce-scatter saves, so the all-reduce stays."""

    def __init__(self, dim: int = 16, hidden: int = 32):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(torch.cat([self.fc2(torch.relu(self.fc1(x))), x], dim=-1), dim=1)


class ParallelBlocks(nn.Module):
    """Blocks with two branches beside each other on one residual stream, each behind its own
    norm (GPT-NeoX, Falcon): x + (down1(up1(ln1(x))) + down2(up2(ln2(x)))), one all-reduce of
    the branches' sum per block."""

    def __init__(self, dim: int = 16, hidden: int = 32, layers: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            ln1=nn.LayerNorm(dim), ln2=nn.LayerNorm(dim), up1=nn.Linear(dim, hidden),
            down1=nn.Linear(hidden, dim), up2=nn.Linear(dim, hidden),
            down2=nn.Linear(hidden, dim))) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + (b["down1"](torch.relu(b["up1"](b["ln1"](x))))
                     + b["down2"](torch.relu(b["up2"](b["ln2"](x)))))
        return x


class ReducesFeatures(nn.Module):
    """A linear whose features are maximised over: a max is no partial sum, sharding it would
    need a gather, so it stays replicated."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).amax(-1, keepdim=True) * x


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return self.fc(x)
        return x


class TwoHeadSizes(nn.Module):
    """One projection read as 3 heads of 8 and as 2 heads of 12: no split into whole heads fits
    both on 2 or 4 ranks (a genuinely indivisible structure)."""

    def __init__(self, dim: int = 24):
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h = self.proj(x)
        a = h.view(b, s, 3, 8).softmax(-1).reshape(b, s, d)
        c = h.view(b, s, 2, 12).softmax(-1).reshape(b, s, d)
        return self.out(a + c)


def tiny_net(seed: int = 0, **kw) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**kw).eval()


class FusedThirds(nn.Module):
    """One linear makes q|k|v (contiguous thirds, split by size) and one makes gate|up (chunk)."""

    def __init__(self, dim: int = 32, heads: int = 4, hidden: int = 64):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.o = nn.Linear(dim, dim)
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.heads, self.hd).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(y.transpose(1, 2).reshape(b, s, d))
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return x + self.down(F.gelu(gate) * up)


class InterleavedHeads(nn.Module):
    """Fused qkv laid out per head ([heads, 3, head_dim], GPT-NeoX/BLOOM style) with a learned
    per-head bias added to the scores (ALiBi / relative-position style)."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.o = nn.Linear(dim, dim)
        self.head_bias = nn.Parameter(torch.randn(heads, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        qkv = self.qkv(x).view(b, s, self.heads, 3, self.hd)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
        scores = q @ k.transpose(-1, -2) * self.hd ** -0.5 + self.head_bias
        y = scores.softmax(-1) @ v
        return x + self.o(y.transpose(1, 2).reshape(b, s, d))


class GroupedQuery(nn.Module):
    """GQA written with repeat_interleave-free expand/reshape, 4 q heads over 2 kv heads."""

    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int = 2):
        super().__init__()
        self.heads, self.kv, self.hd = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.hd, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q = self.q(x).view(b, s, self.heads, self.hd).transpose(1, 2)
        k = self.k(x).view(b, s, self.kv, self.hd).transpose(1, 2)
        v = self.v(x).view(b, s, self.kv, self.hd).transpose(1, 2)
        rep = self.heads // self.kv
        k = k[:, :, None].expand(b, self.kv, rep, s, self.hd).reshape(b, self.heads, s, self.hd)
        v = v[:, :, None].expand(b, self.kv, rep, s, self.hd).reshape(b, self.heads, s, self.hd)
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.o(y.transpose(1, 2).reshape(b, s, d))


class ParallelBlock(nn.Module):
    """Attention and MLP read the same normed input; their outputs are summed, then the residual
    (GPT-J / Falcon order; `(x + attn) + mlp` is not reassociated and costs two all-reduces)."""

    def __init__(self, dim: int = 32, heads: int = 4, hidden: int = 64):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = TinyAttention(dim, heads)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return self.attn(h) + self.fc2(F.gelu(self.fc1(h))) + x


class CrossAttention(nn.Module):
    """Decoder queries attend to an encoder memory: k/v come from the second input."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        m = memory.shape[1]
        q = self.q(x).view(b, s, self.heads, self.hd).transpose(1, 2)
        k = self.k(memory).view(b, m, self.heads, self.hd).transpose(1, 2)
        v = self.v(memory).view(b, m, self.heads, self.hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.o(y.transpose(1, 2).reshape(b, s, d))


class HeadsInBatch(nn.Module):
    """BLOOM-style: heads merged into the batch dim ([b * heads, s, d]) around baddbmm with a
    per-head linear position bias (ALiBi-like slopes), interleaved fused qkv."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.o = nn.Linear(dim, dim)
        self.register_buffer("slopes", torch.linspace(-1.0, -0.1, heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        h, hd = self.heads, self.hd
        qkv = self.qkv(x).view(b, s, h, 3, hd)
        q, k, v = (qkv[..., i, :].transpose(1, 2).reshape(b * h, s, hd) for i in range(3))
        pos = torch.arange(s, dtype=x.dtype, device=x.device)
        bias = (self.slopes.view(1, h, 1) * pos.view(1, 1, s)).expand(b, h, s).reshape(b * h, 1, s)
        att = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=hd ** -0.5).softmax(-1)
        y = torch.bmm(att, v).view(b, h, s, hd).permute(0, 2, 1, 3).reshape(b, s, d)
        return self.o(y)


class FusedMultiQuery(nn.Module):
    """Falcon-7B-style: q heads, then one k and one v head, in one linear; k and v picked with
    index lists and broadcast over the q heads."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.qkv = nn.Linear(dim, dim + 2 * self.hd, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        qkv = self.qkv(x).view(b, s, self.heads + 2, self.hd)
        q = qkv[:, :, :-2].transpose(1, 2)
        k = qkv[:, :, [-2]].transpose(1, 2)
        v = qkv[:, :, [-1]].transpose(1, 2)
        att = ((q @ k.transpose(-1, -2)) * self.hd ** -0.5).softmax(-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, s, d))


class HeadSplitMultiQuery(FusedMultiQuery):
    """Falcon-7B as transformers 5.25 writes it: the fused q|k|v output viewed as heads + 2
    heads first, then split [heads, 1, 1] along the head dim; the one k and v head expanded
    over the q heads for SDPA. The output is cut along the sequence with `tensor_split` at a
    length known at run time and joined back (Bamba's scan keeps its last tokens apart so)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, -1, self.hd).split([self.heads, 1, 1], dim=-2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        k, v = (t.expand(b, self.heads, s, self.hd) for t in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        first, last = torch.tensor_split(y, [s - 1], dim=2)
        y = torch.cat([first, last], dim=2)
        return x + self.o(y.transpose(1, 2).reshape(b, s, d))


def _rms(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class NormedRotaryAttention(nn.Module):
    """q and k RMS-normed over all heads together (one statistic over heads x head_dim, OLMo-2
    style), rotated by interleaved pairs on part of each head (the rotated halves stacked, then
    flattened: GPT-J style), and the attention output normed over the whole width before o (a
    sub-norm): each norm is a partial statistic, all-reduced, instead of replicated attention."""

    def __init__(self, dim: int = 32, heads: int = 4, rot: int = 4):
        super().__init__()
        self.heads, self.hd, self.rot = heads, dim // heads, rot
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.q_w, self.k_w, self.sub_w = (nn.Parameter(torch.rand(dim) + 0.5) for _ in range(3))
        self.register_buffer("inv_freq", 1.0 / 100 ** (torch.arange(0, rot, 2) / rot))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q = _rms(self.q(x)) * self.q_w
        k = _rms(self.k(x)) * self.k_w
        q, k, v = (t.view(b, s, self.heads, self.hd).transpose(1, 2) for t in (q, k, self.v(x)))
        freqs = torch.arange(s, dtype=x.dtype, device=x.device)[:, None] * self.inv_freq
        cos, sin = freqs.cos().repeat_interleave(2, -1), freqs.sin().repeat_interleave(2, -1)

        def rotate(t: torch.Tensor) -> torch.Tensor:
            r, rest = t[..., :self.rot], t[..., self.rot:]
            turned = torch.stack((-r[..., 1::2], r[..., ::2]), dim=-1).flatten(-2)
            return torch.cat([r * cos + turned * sin, rest], dim=-1)

        y = F.scaled_dot_product_attention(rotate(q), rotate(k), v, is_causal=True)
        return x + self.o(_rms(y.transpose(1, 2).reshape(b, s, d)) * self.sub_w)


class ComplexRotaryAttention(nn.Module):
    """Rotary written with complex numbers (view_as_complex, then view_as_real viewed back as
    the heads: Llama-4 style), a causal mask broadcast with expand_as, a zeros_like bias and
    the result cast back with type_as."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.register_buffer("inv_freq", 1.0 / 100 ** (torch.arange(0, self.hd, 2) / self.hd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        pos = torch.arange(s, dtype=torch.float32, device=x.device)[:, None] * self.inv_freq
        turn = torch.polar(torch.ones_like(pos), pos)[None, :, None, :]      # [1, s, 1, hd/2]

        def rotate(t: torch.Tensor) -> torch.Tensor:
            pairs = torch.view_as_complex(t.float().reshape(b, s, self.heads, -1, 2))
            return torch.view_as_real(pairs * turn).view_as(t).type_as(t)

        q = rotate(self.q(x).view(b, s, self.heads, self.hd)).transpose(1, 2)
        k = rotate(self.k(x).view(b, s, self.heads, self.hd)).transpose(1, 2)
        v = self.v(x).view(b, s, self.heads, self.hd).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) * self.hd ** -0.5
        scores = scores + torch.zeros_like(scores)
        future = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(future.expand_as(scores), float("-inf"))
        return x + self.o((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, d))


class SinkTopkAttention(nn.Module):
    """Per-head attention-sink logits joined to the scores, their max over the keys subtracted
    (GPT-OSS style), and each query keeping only its top-2 keys (topk along the keys): the
    selections run along whole dims while the heads stay sharded."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.sinks = nn.Parameter(torch.randn(heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = (lin(x).view(b, s, self.heads, self.hd).transpose(1, 2)
                   for lin in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2) * self.hd ** -0.5
        scores = scores.masked_fill(
            torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
        second = scores.topk(min(2, s), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < second, float("-inf"))
        sinks = self.sinks.view(1, -1, 1, 1).expand(b, -1, s, 1)
        joined = torch.cat([scores, sinks], dim=-1)
        joined = joined - joined.max(dim=-1, keepdim=True).values
        probs = joined.softmax(-1)[..., :-1]
        return x + self.o((probs @ v).transpose(1, 2).reshape(b, s, d))


class FusedQkvUnbind(nn.Module):
    """One linear makes q|k|v, viewed as [b, s, 3, heads, d] and unbound (ModernBERT style);
    the head dim padded for the attention kernel and cut back after it."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, self.hd).transpose(1, 3).unbind(dim=2)
        q, k, v = (F.pad(t, (0, 8)) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, scale=self.hd ** -0.5)[..., :self.hd]
        return x + self.o(y.transpose(1, 2).reshape(b, s, d))


class InterleavedGateUp(nn.Module):
    """One linear makes gate and up interleaved feature by feature, read back with strided
    slices (`h[..., ::2]`, `h[..., 1::2]`, as GPT-OSS's experts do)."""

    def __init__(self, dim: int = 32, hidden: int = 64):
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden)
        self.down = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up(x)
        return x + self.down(F.silu(h[..., ::2]) * h[..., 1::2])


class StraySource(nn.Module):
    """A linear added straight to the residual stream, then a norm over the stream: sharding
    the linear would cut the residual stream to its features (a partial statistic over an
    activation met by a stray source), so it stays whole. The norm is written by hand (a
    mean) or is torch's LayerNorm."""

    def __init__(self, dim: int = 32, layer_norm: bool = False):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim) if layer_norm else _rms

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.shape[0], x.shape[1], 32)      # a static feature size
        h = x + self.proj(x)
        return self.out(self.norm(h))


class LoopedExperts(nn.Module):
    """A mixture of experts that loops, in Python, over the experts its tokens hit: a
    data-dependent loop torch.export cannot capture."""

    def __init__(self, dim: int = 32, experts: int = 4, hidden: int = 32):
        super().__init__()
        self.router = nn.Linear(dim, experts, bias=False)
        self.experts = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
            for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        choice = self.router(flat).argmax(-1)
        out = torch.zeros_like(flat)
        for e in choice.unique().tolist():
            rows = (choice == e).nonzero().squeeze(-1)
            out[rows] = self.experts[e](flat[rows])
        return out.view_as(x)


class AttentionThenLoopedExperts(nn.Module):
    """Attention fxtp shards, then experts it cannot capture: the experts become an opaque
    call, replicated, and the attention is still sharded."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = TinyAttention(dim, heads)
        self.moe = LoopedExperts(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x))
        return x + self.moe(x)


STRUCTURES = {
    "fused_thirds": (FusedThirds, [(2, 5, 32)]),
    "interleaved_heads": (InterleavedHeads, [(2, 5, 32)]),
    "grouped_query": (GroupedQuery, [(2, 5, 32)]),
    "parallel_block": (ParallelBlock, [(2, 5, 32)]),
    "cross_attention": (CrossAttention, [(2, 5, 32), (2, 7, 32)]),
    "heads_in_batch": (HeadsInBatch, [(2, 5, 32)]),
    "fused_multi_query": (FusedMultiQuery, [(2, 5, 32)]),
    "normed_rotary": (NormedRotaryAttention, [(2, 5, 32)]),
    "complex_rotary": (ComplexRotaryAttention, [(2, 5, 32)]),
    "sink_topk": (SinkTopkAttention, [(2, 5, 32)]),
    "fused_qkv_unbind": (FusedQkvUnbind, [(2, 5, 32)]),
    "interleaved_gate_up": (InterleavedGateUp, [(2, 5, 32)]),
    "looped_experts": (AttentionThenLoopedExperts, [(2, 5, 32)]),
    "ssm_one_group": (StateSpaceBlock, [(2, 5, 32)]),
    "ssm_groups": (lambda: StateSpaceBlock(groups=4), [(2, 5, 32)]),
    "torch_norms": (TorchNormsBlock, [(2, 5, 32)]),
    "gated_head_rows": (GatedHeadRows, [(2, 5, 32)]),
    "latent_attention": (LatentAttention, [(2, 5, 32)]),
    "windowed_attention": (WindowedAttention, [(2, 5, 32)]),
    "head_split_multi_query": (HeadSplitMultiQuery, [(2, 5, 32)]),
    "tensor_split_gate_up": (TensorSplitGateUp, [(2, 5, 32)]),
}


def structure(name: str, seed: int = 0) -> tuple[nn.Module, tuple]:
    cls, shapes = STRUCTURES[name]
    torch.manual_seed(seed)
    return cls().eval(), tuple(torch.randn(*s) for s in shapes)
