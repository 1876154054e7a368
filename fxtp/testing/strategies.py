"""Hypothesis strategies for model inputs.
"""
from __future__ import annotations

import torch
from torch import nn

from ..capture.export import config_vocab


def hf_inputs(vocab: int, max_batch: int = 3, max_seq: int = 24, encoder_decoder: bool = False):
    """Hypothesis strategy of HF kwargs: batch, sequence length(s) and token ids drawn."""
    from hypothesis import strategies as st

    def ids(d, b: int, s: int) -> torch.Tensor:
        flat = d(st.lists(st.integers(0, vocab - 1), min_size=b * s, max_size=b * s))
        return torch.tensor(flat, dtype=torch.long, device="cpu").view(b, s)

    @st.composite
    def draw(d):
        b = d(st.integers(1, max_batch))
        t = ids(d, b, d(st.integers(1, max_seq)))
        out = {"input_ids": t, "attention_mask": torch.ones_like(t)}
        if encoder_decoder:
            out["decoder_input_ids"] = ids(d, b, d(st.integers(1, max_seq)))
        return out

    return draw()


def hf_inputs_for(model: nn.Module, **kw):
    """`hf_inputs` matching a Hugging Face model's config (vocab, encoder-decoder)."""
    cfg = model.config
    return hf_inputs(int(config_vocab(cfg) or 32), encoder_decoder=bool(getattr(cfg, "is_encoder_decoder", False)),
                     **kw)


def tensor_inputs(shapes: list[tuple], dynamic_dims: tuple = (0,), max_size: int = 6):
    """Hypothesis strategy of float tensors: the dims in `dynamic_dims` and the values drawn."""
    import numpy as np
    from hypothesis import strategies as st
    from hypothesis.extra.numpy import arrays

    @st.composite
    def draw(d):
        sizes = {dim: d(st.integers(1, max_size)) for dim in dynamic_dims}
        out = []
        for shape in shapes:
            shp = tuple(sizes.get(i, n) for i, n in enumerate(shape))
            arr = d(arrays(np.float32, shp, elements=st.floats(-3, 3, width=32)))
            out.append(torch.from_numpy(np.ascontiguousarray(arr)))
        return tuple(out)

    return draw()
