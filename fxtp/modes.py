"""The hybrid-engine switch: one call to train the tensor-parallel graph, one to generate with it.

Why here and not in `train()`/`eval()`: switching also decides what happens to dropout (baked
off by the eval-mode capture) and, with LoRA adapters, whether they are folded into the weights.
"""
from __future__ import annotations

from typing import Optional

from torch import fx

from .capture.lora import find_lora_branches
from .errors import LoraStateError, NotTransformedError
from .rewrite import lora_fold
from .rewrite.record import META_KEY


def fold_lora(tp: fx.GraphModule) -> fx.GraphModule:
    """Adds scale * B_local @ A_local into each local base weight shard and removes the LoRA
    branches from the graph (generation then costs what a plain model does). Raises
    `NoLoraError` when the graph has no LoRA branch, `LoraStateError` when already folded."""
    info = _info(tp, "fold_lora")
    state = info.state
    if state.lora_fold is not None:
        raise LoraStateError("fxtp.fold_lora: the LoRA adapters are already folded into the "
                             "weights; call fxtp.unfold_lora(tp) first (fxtp.for_generation(tp) "
                             "is a no-op when folded)")
    state.lora_fold = state.lora_last_fold = lora_fold.fold(tp, info.plan.solution.linears,
                                                            _label(tp), state.lora_last_fold)
    return tp


def unfold_lora(tp: fx.GraphModule) -> fx.GraphModule:
    """Restores the LoRA branches and the base weights as they were before `fold_lora`
    (bit for bit: the saved local shards are copied back). `LoraStateError` if not folded."""
    state = _info(tp, "unfold_lora").state
    if state.lora_fold is None:
        raise LoraStateError("fxtp.unfold_lora: the LoRA adapters are not folded (call "
                             "fxtp.fold_lora(tp) first; fxtp.for_training(tp) is a no-op then)")
    lora_fold.unfold(tp, state.lora_fold)
    state.lora_fold = None
    return tp


def _info(tp: object, fn: str):
    """fxtp's record of a graph made by fxtp.transform, else NotTransformedError."""
    info = getattr(tp, "meta", {}).get(META_KEY) if isinstance(tp, fx.GraphModule) else None
    if info is None:
        hint = (" (a Generator's LoRA is folded when it is built; after training, copy the "
                "weights with gen.load_weights(tp))" if hasattr(tp, "load_weights") else "")
        raise NotTransformedError(f"fxtp.{fn} takes the graph returned by fxtp.transform(model, "
                                  f"ws), not {type(tp).__name__}{hint}")
    return info


def is_folded(tp: fx.GraphModule) -> bool:
    return tp.meta[META_KEY].state.lora_fold is not None


def _label(tp: fx.GraphModule) -> str:
    return f"the tensor-parallel graph of {tp.meta[META_KEY].plan.model_name}"


def for_training(tp: fx.GraphModule, *, disable_dropout: bool = False,
                 regather: Optional[bool] = None) -> fx.GraphModule:
    """Puts `tp` in training mode (gradients flow through the Megatron f/g collectives).

    A model with dropout raises `DropoutError` (the captured graph has dropout off) unless
    `disable_dropout=True` says training without dropout is intended. With sequence
    parallelism, `regather=False` has the readers of an all-gathered sequence save it whole
    instead of gathering it again in backward (the default, `True`): backward then sends
    about the all-reduce layout's bytes, and the region's memory falls by less than N."""
    _info(tp, "for_training")
    if is_folded(tp):
        unfold_lora(tp)
    if disable_dropout:
        tp.meta[META_KEY].state.dropout_disabled = True
    if regather is not None:
        tp.meta[META_KEY].state.regather = bool(regather)
    tp.train()
    return tp


def for_generation(tp: fx.GraphModule) -> fx.GraphModule:
    """Puts `tp` in eval mode and folds its LoRA adapters (if it has any and they are not
    folded yet) so that generation runs a plain model's graph."""
    _info(tp, "for_generation")
    tp.eval()
    if not is_folded(tp) and find_lora_branches(tp, tp.meta[META_KEY].plan.solution.linears):
        fold_lora(tp)
    return tp
