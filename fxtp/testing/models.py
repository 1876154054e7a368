"""Tiny random-weight models of real architectures, built from configs (never downloaded).

Used by the demo, the CLI and the tests.
"""
from __future__ import annotations

import torch
from torch import nn

TINY = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                  max_position_embeddings=256),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=256,
                 bos_token_id=0, eos_token_id=0),
    "bert": dict(model_type="bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=128, vocab_size=128, max_position_embeddings=256),
}


def tiny_model(name: str, seed: int = 0, **overrides) -> nn.Module:
    """A tiny Hugging Face model with random weights; causal LMs get their LM head."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    if name not in TINY:
        raise KeyError(f"unknown tiny model {name!r}; choose from {sorted(TINY)}")
    kwargs = dict(TINY[name])
    kwargs.update(overrides)
    model_type = kwargs.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    cls = AutoModel if name == "bert" else AutoModelForCausalLM
    return cls.from_config(cfg).eval()
