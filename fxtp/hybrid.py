"""The hybrid-engine switch: one call to train the tensor-parallel graph, one to generate with it.

Why here and not in `train()`/`eval()`: switching also decides what happens to dropout (baked
off by the eval-mode capture) and, with LoRA adapters, whether they are folded into the weights.
"""
from __future__ import annotations

from torch import fx

from .transform import META_KEY


def for_training(tp: fx.GraphModule, *, disable_dropout: bool = False) -> fx.GraphModule:
    """Puts `tp` in training mode (gradients flow through the Megatron f/g collectives).

    A model with dropout raises `DropoutError` (the captured graph has dropout off) unless
    `disable_dropout=True` says training without dropout is intended."""
    if disable_dropout:
        tp.meta[META_KEY].dropout_disabled = True
    tp.train()
    return tp


def for_generation(tp: fx.GraphModule) -> fx.GraphModule:
    """Puts `tp` in eval mode for generation."""
    tp.eval()
    return tp
