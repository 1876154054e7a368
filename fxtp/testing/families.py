"""Tiny random-weight configs of many transformer families (examples of structures, never
special-cased by fxtp): used by the tests and the breadth benchmark. Nothing is downloaded."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

_COMMON = dict(vocab_size=128)

FAMILIES: dict[str, dict[str, Any]] = {
    "llama_mha": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256),
    "llama_bias": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                       mlp_bias=True, max_position_embeddings=256),
    "llama_tied": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                       max_position_embeddings=256),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    sliding_window=None),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    "gemma": dict(model_type="gemma", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=256),
    "phi3": dict(model_type="phi3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                 pad_token_id=0),
    # fused qkv with GQA: on 4 ranks the 2 kv heads of each chunk are held by pairs of ranks
    "phi3_gqa": dict(model_type="phi3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                     pad_token_id=0),
    "phi": dict(model_type="phi", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=256),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=256),
    "opt": dict(model_type="opt", hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64),
    # ALiBi slopes per head, heads merged into the batch dim around baddbmm
    "bloom": dict(model_type="bloom", hidden_size=64, n_layer=2, n_head=4),
    # Falcon-40B/180B layout: kv groups fused with their q heads in one linear, parallel block
    "falcon": dict(model_type="falcon", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   parallel_attn=True, new_decoder_architecture=True, num_kv_heads=2),
    # Falcon-7B layout: multi-query, the single k and v heads fused after the q heads
    "falcon_mqa": dict(model_type="falcon", hidden_size=64, num_hidden_layers=2,
                       num_attention_heads=4, parallel_attn=True, new_decoder_architecture=False,
                       multi_query=True),
    "mixtral": dict(model_type="mixtral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                    num_experts_per_tok=2, max_position_embeddings=256),
    "qwen2_moe": dict(model_type="qwen2_moe", hidden_size=64, intermediate_size=128,
                      moe_intermediate_size=64, shared_expert_intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      num_experts=4, num_experts_per_tok=2, max_position_embeddings=256),
    # uneven shards: 6 q heads / 3 kv heads and an MLP of 102 features on 4 ranks (2+2+1+1
    # heads; kv heads kept whole), GPT-2's fused qkv with 3 heads (2+1 heads per chunk on 2)
    "llama_uneven": dict(model_type="llama", hidden_size=96, intermediate_size=102,
                         num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=3,
                         max_position_embeddings=256),
    "gpt2_3heads": dict(model_type="gpt2", n_embd=48, n_layer=2, n_head=3, n_positions=256),
    # interleaved rotary on part of each head (stack of the rotated pairs, then flatten),
    # parallel attention + MLP block
    "gptj": dict(model_type="gptj", n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                 n_positions=256, bos_token_id=127, eos_token_id=127),
    # q/k RMSNorm over all heads together: a partial statistic all-reduced per norm
    "olmo2": dict(model_type="olmo2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=127, pad_token_id=127),
    # rotary with complex numbers (view_as_complex), MoE experts with a shared expert
    "llama4_text": dict(model_type="llama4_text", hidden_size=64, intermediate_size=128,
                        intermediate_size_mlp=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                        num_local_experts=4, num_experts_per_tok=1, moe_layers=[0, 1],
                        no_rope_layers=[1, 1], layer_types=["chunked_attention"] * 2,
                        pad_token_id=127, eos_token_id=127, bos_token_id=127),
    # an encoder: fused qkv viewed as [b, s, 3, heads, d] and unbound into q, k, v; its MLM
    # head untied (dense -> LayerNorm over dense's split features -> decoder): a LayerNorm
    # statistic, the head sharded
    "modernbert": dict(model_type="modernbert", hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256,
                       layer_types=["full_attention", "sliding_attention"], pad_token_id=127,
                       eos_token_id=127, bos_token_id=127, cls_token_id=127, sep_token_id=127,
                       tie_word_embeddings=False, norm_bias=True),
    # attention sinks (a max over the keys with per-head sink logits), experts stored as 3-D
    # parameters with gate and up interleaved (`h[..., ::2]`, `h[..., 1::2]`), a topk router
    "gpt_oss": dict(model_type="gpt_oss", hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                    max_position_embeddings=4096, layer_types=["sliding_attention",
                                                              "full_attention"],
                    pad_token_id=127, eos_token_id=127, bos_token_id=127),
    # a loop over the sequence positions in each mixer (its slow path): every mixer is an
    # opaque call, replicated, and the rest of the model is captured around it
    "mamba": dict(model_type="mamba", hidden_size=32, num_hidden_layers=2, state_size=4,
                  expand=2, pad_token_id=127, eos_token_id=127, bos_token_id=127),
    # multi-query attention in one fused linear: q heads, then the single k and v heads, split
    # after an unsqueeze and given to SDPA as one kv head (held whole by every rank)
    "gpt_bigcode": dict(model_type="gpt_bigcode", n_embd=64, n_layer=2, n_head=4,
                        multi_query=True, n_positions=256, bos_token_id=127, eos_token_id=127),
    # a Mamba-2 mixer (layer 0) beside attention (layer 1): one in_proj for gate | x B C | dt,
    # a depthwise conv1d along time over x B C, a chunked scan of einsums, one group of B and
    # C (whole on every rank), a gated norm over the whole inner width (a partial statistic).
    # Chunks of 32 positions: the scan branches on whether the length fills its chunks, so the
    # graph holds for lengths that are not a multiple of 32 (the tests draw at most 16)
    "bamba": dict(model_type="bamba", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[1],
                  mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8,
                  mamba_chunk_size=32, max_position_embeddings=256, pad_token_id=127,
                  eos_token_id=127, bos_token_id=127),
    "t5": dict(model_type="t5", d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2,
               num_heads=4, decoder_start_token_id=0),
}


def family_model(name: str, seed: int = 0) -> nn.Module:
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForMaskedLM,
        AutoModelForSeq2SeqLM,
    )

    kwargs = {**_COMMON, **FAMILIES[name]}
    model_type = kwargs.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    cls = {"t5": AutoModelForSeq2SeqLM, "modernbert": AutoModelForMaskedLM}.get(
        model_type, AutoModelForCausalLM)
    return cls.from_config(cfg).eval()
