"""Hand-written mixers and norm blocks used by the tests (tests/modules.py lists them in
STRUCTURES): a Mamba-2 style mixer, torch's norms over split features, rows of heads, latent
attention, attention that branches on the sequence length, a fused gate|up cut with
tensor_split."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class StateSpaceMixer(nn.Module):
    """A Mamba-2 style mixer written by hand: one in_proj makes gate | x B C | dt, a depthwise
    causal conv1d runs along time over x B C, B and C (`groups` groups of `state` features)
    are repeated for the heads of their group, a quadratic (SSD) scan mixes the positions
    with einsums under a causal `tril`, and a gated RMSNorm over each group's width feeds
    out_proj. With one group B and C are the same on every rank and the norm runs over the
    whole sharded width (a partial statistic)."""

    def __init__(self, dim: int = 32, heads: int = 8, head_dim: int = 8, groups: int = 1,
                 state: int = 4, kernel: int = 4):
        super().__init__()
        self.heads, self.head_dim, self.groups, self.state = heads, head_dim, groups, state
        self.inner = heads * head_dim
        self.conv_dim = self.inner + 2 * groups * state
        self.in_proj = nn.Linear(dim, self.inner + self.conv_dim + heads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, kernel, groups=self.conv_dim,
                                padding=kernel - 1)
        self.dt_bias = nn.Parameter(torch.rand(heads))
        self.A_log = nn.Parameter(torch.rand(heads))
        self.D = nn.Parameter(torch.ones(heads))
        self.norm_weight = nn.Parameter(1 + 0.1 * torch.randn(self.inner))
        self.out_proj = nn.Linear(self.inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        gate, xbc, dt = self.in_proj(x).split([self.inner, self.conv_dim, self.heads], dim=-1)
        xbc = F.silu(self.conv1d(xbc.transpose(1, 2))[..., :length].transpose(1, 2))
        h, B, C = xbc.split([self.inner, self.groups * self.state, self.groups * self.state],
                            dim=-1)
        h = h.view(b, length, self.heads, self.head_dim)
        per_group = self.heads // self.groups
        B = B.view(b, length, self.groups, self.state).repeat_interleave(per_group, dim=2)
        C = C.view(b, length, self.groups, self.state).repeat_interleave(per_group, dim=2)
        dt = F.softplus(dt + self.dt_bias)                                  # [b, l, h]
        decay = torch.cumsum(-torch.exp(self.A_log) * dt, dim=1).transpose(1, 2)   # [b, h, l]
        gaps = decay[..., :, None] - decay[..., None, :]                   # [b, h, l, s]
        causal = torch.tril(torch.ones_like(gaps)).bool()
        weights = torch.exp(gaps.masked_fill(~causal, float("-inf")))
        scores = torch.einsum("blhn,bshn->blsh", C, B) * weights.permute(0, 2, 3, 1)
        y = torch.einsum("blsh,bshp->blhp", scores, h * dt[..., None])
        y = (y + self.D[:, None] * h).reshape(b, length, self.inner)
        y = (y * F.silu(gate)).view(b, length, self.groups, self.inner // self.groups)
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.out_proj(self.norm_weight * y.reshape(b, length, self.inner))


class StateSpaceBlock(nn.Module):
    """A pre-norm residual block around `StateSpaceMixer`."""

    def __init__(self, groups: int = 1):
        super().__init__()
        self.norm = nn.LayerNorm(32)
        self.mixer = StateSpaceMixer(groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.norm(x))


class TorchNormsBlock(nn.Module):
    """Norms over features a column-parallel linear splits, written with torch's norm modules
    (`aten.layer_norm`, `aten.rms_norm`), not by hand: q and k LayerNormed over all heads
    together (OLMo-1's qk norm; q's with a bias), v L2-normalised over all heads
    (`F.normalize`), an RMSNorm over the attention output before o, and a sub-LayerNorm over
    the MLP's intermediate width before down (NormFormer's). Each is an fp32 statistic of the
    local features, all-reduced: attention and MLP stay sharded, the norms' weights and biases
    cut with their features."""

    def __init__(self, dim: int = 32, heads: int = 4, inter: int = 64):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.q_norm, self.k_norm = nn.LayerNorm(dim), nn.LayerNorm(dim, bias=False)
        self.sub = nn.RMSNorm(dim)
        self.up, self.down = nn.Linear(dim, inter), nn.Linear(inter, dim, bias=False)
        self.mid = nn.LayerNorm(inter)
        with torch.no_grad():      # weights and biases that tell the features apart
            for p in (*self.q_norm.parameters(), *self.k_norm.parameters(), self.sub.weight,
                      *self.mid.parameters()):
                p.copy_(1 + 0.5 * torch.randn_like(p))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2)
                   for t in (self.q_norm(self.q(x)), self.k_norm(self.k(x)),
                             4 * F.normalize(self.v(x), dim=-1)))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(self.sub(y.transpose(1, 2).reshape(b, s, d)))
        return x + self.down(self.mid(F.gelu(self.up(x))))


class GatedHeadRows(nn.Module):
    """A gated delta net's output path (Qwen3.5, OLMo-hybrid): the attention output
    `[b, s, heads, d]` and its gate are flattened to one row per head, `[b * s * heads, d]`,
    RMS-normed per row and gated, then put back as `[b, s, heads * d]` for o: the heads are a
    sharded block inside the rows, and each rank's rows are its own heads."""

    def __init__(self, dim: int = 32, heads: int = 4):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.q, self.k, self.v, self.z, self.o = (nn.Linear(dim, dim, bias=False)
                                                  for _ in range(5))
        self.norm_w = nn.Parameter(1 + 0.5 * torch.randn(self.hd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = (t.view(b, s, self.heads, self.hd).transpose(1, 2)
                   for t in (self.q(x), self.k(x), self.v(x)))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
        rows, gate = y.reshape(-1, self.hd), self.z(x).reshape(-1, self.hd)
        rows = rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + 1e-6)
        rows = rows * self.norm_w * F.silu(gate)
        return x + self.o(rows.reshape(b, s, -1))


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3, HY-V4) written as transformers writes it:
    kv_a makes a latent | one rope key shared by every head; the latent is RMS-normed and
    kv_b expands it to each head's k_nope | v; the key is filled in place,
    `key = kv.new_empty(...)`, `key[..., :nope].copy_(k_nope)`,
    `key[..., nope:].copy_(k_rot.expand(...))`. The shared rope key must reach every rank
    whole: a plan that splits kv_a's rope piece writes this rank's half into a temporary slice
    and leaves the key's tail uninitialised (a silent wrong answer fxtp once gave)."""

    def __init__(self, dim: int = 32, heads: int = 4, nope: int = 8, rope: int = 4,
                 v: int = 8, latent: int = 16):
        super().__init__()
        self.heads, self.nope, self.rope, self.v_dim, self.latent = heads, nope, rope, v, latent
        self.q = nn.Linear(dim, heads * (nope + rope), bias=False)
        self.kv_a = nn.Linear(dim, latent + rope, bias=False)
        self.kv_norm = nn.Parameter(1 + 0.5 * torch.randn(latent))
        self.kv_b = nn.Linear(latent, heads * (nope + v), bias=False)
        self.o = nn.Linear(heads * v, dim, bias=False)
        self.register_buffer("inv_freq", 1.0 / 100 ** (torch.arange(0, rope, 2) / rope))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        freqs = torch.arange(s, dtype=x.dtype, device=x.device)[:, None] * self.inv_freq
        cos, sin = torch.cat((freqs, freqs), -1).cos(), torch.cat((freqs, freqs), -1).sin()

        def rotate(t: torch.Tensor) -> torch.Tensor:
            t1, t2 = t[..., :self.rope // 2], t[..., self.rope // 2:]
            return t * cos + torch.cat((-t2, t1), dim=-1) * sin

        q = self.q(x).view(b, s, self.heads, -1).transpose(1, 2)
        q_nope, q_rot = q.split([self.nope, self.rope], dim=-1)
        kv_pass, k_rot = self.kv_a(x).split([self.latent, self.rope], dim=-1)
        kv_pass = kv_pass * torch.rsqrt(kv_pass.pow(2).mean(-1, keepdim=True) + 1e-6)
        kv = self.kv_b(kv_pass * self.kv_norm).view(b, s, self.heads, -1).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k_rot = rotate(k_rot.view(b, 1, s, self.rope)).expand(-1, self.heads, -1, -1)
        key = kv.new_empty(b, self.heads, s, self.nope + self.rope)
        key[..., :self.nope].copy_(k_nope)
        key[..., self.nope:].copy_(k_rot)
        query = torch.cat((q_nope, rotate(q_rot)), dim=-1)
        y = F.scaled_dot_product_attention(query, key, v, is_causal=True)
        return x + self.o(y.transpose(1, 2).reshape(b, s, -1))


class WindowedAttention(nn.Module):
    """Attention whose code branches on the sequence length, as sliding-window models do: a
    banded causal mask for inputs longer than the window, plain causal attention for shorter
    ones. Captured with a long input, the graph holds for lengths past the window; a shorter
    input gets a graph of its own (`tp.size_graphs`), sharded the same way and running on the
    same weight shards. `extra` / `extra_out` only shard on the short path (the long one runs
    a cumsum along their features, as DeepSeek-V4's compressor differs by length): the short
    graph must keep them whole, as tp does."""

    def __init__(self, dim: int = 32, heads: int = 4, window: int = 3, inter: int = 64):
        super().__init__()
        self.heads, self.window = heads, window
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim, bias=False) for _ in range(4))
        self.up, self.down = nn.Linear(dim, inter), nn.Linear(inter, dim)
        self.extra, self.extra_out = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = (t(x).view(b, s, self.heads, -1).transpose(1, 2)
                   for t in (self.q, self.k, self.v))
        if s > self.window:
            i = torch.arange(s, device=x.device)
            band = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < self.window)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=band)
            x = x + self.extra_out(torch.cumsum(self.extra(x), -1) / d)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.extra_out(F.gelu(self.extra(x)))
        x = x + self.o(y.transpose(1, 2).reshape(b, s, d))
        return x + self.down(F.gelu(self.up(x)))


class TensorSplitGateUp(nn.Module):
    """One linear makes gate | up, cut apart with `tensor_split` at a constant index: each
    rank's cut moves to where its gate shard ends."""

    def __init__(self, dim: int = 32, inner: int = 48):
        super().__init__()
        self.inner = inner
        self.gate_up = nn.Linear(dim, 2 * inner, bias=False)
        self.down = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).tensor_split([self.inner], dim=-1)
        return x + self.down(F.silu(gate) * up)
