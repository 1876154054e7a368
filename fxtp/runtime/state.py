"""What a tensor-parallel graph keeps at run time and changes as it is used: one home for it,
`tp.meta["fxtp"].state` (what the rewrite did, the rest of `tp.meta["fxtp"]`, never changes).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class RuntimeState:
    """The mutable part of `TPInfo`: set by `fxtp.transform`, the mode switches (`for_training`,
    `fold_lora`, ...), `fxtp.load`, `tp.to` and `tp.generate`; read by the call guards.
    `tp.generate` itself (a `TPGenerate` holding the model's weightless skeleton and its
    decode step) is an attribute of `tp`, not kept here a second time."""

    # transform(check_inputs=): every call compares its inputs across the ranks
    check_inputs: bool = False
    # fxtp.for_training(tp, disable_dropout=True): training without the captured dropout
    dropout_disabled: bool = False
    # rewrite.lora_fold.FoldState while the LoRA adapters are folded into the weights, else None
    lora_fold: Any = None
    # the latest FoldState (folded or not): its two graphs serve later folds
    lora_last_fold: Any = None
    # sequence parallelism: the readers of an all-gathered sequence keep the rank's tokens and
    # gather again in backward (False, fxtp.for_training(tp, regather=False): they save the
    # whole sequence; backward then sends about what the all-reduce layout sends)
    regather: bool = True
    # parameters/buffers still on the meta device (a model built on meta, before fxtp.load)
    unloaded: tuple[str, ...] = ()
