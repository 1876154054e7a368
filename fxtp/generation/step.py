"""The captured decoding step of `fxtp.generator`: one forward of a causal LM over a static KV
cache, exported once with a dynamic batch (1..max_batch) and sequence length (1..max_len).

The cache is Hugging Face's `StaticCache`, `[max_batch, kv_heads, max_len, head_dim]` per layer
for k and v. Its tensors are constants of the captured graph, written in place by
`index_copy_`, so the rewrite slices them once, in place, to this rank's kv heads. A batch of
`b < max_batch` prompts runs on the first `b` rows of the cache: while the step runs,
`CacheRows` points each cache attribute at the view `cache[:b]` (same storage, same data
pointer), so a small batch costs what its rows cost, with no dummy rows and one graph.
"""
from __future__ import annotations

import contextlib
import inspect
import warnings
from typing import Iterator

import torch
from torch import fx, nn

from ..capture.export import Captured, _first_line, _user_code, model_device
from ..capture.no_ops import drop_no_ops
from ..errors import CaptureError, GenerationError

aten = torch.ops.aten


def cache_kwarg(model: nn.Module) -> str:
    """The name under which the model's forward takes a cache: `cache` (transformers >= 5.2x,
    which still maps the old name with a deprecation warning) or `past_key_values` (older 5.x,
    which silently drops an unknown `cache=` into **kwargs and never fills the cache)."""
    fn = model.forward
    params = inspect.signature(fn).parameters
    if "cache" in params:
        return "cache"
    if "past_key_values" in params:
        return "past_key_values"
    raise GenerationError(f"fxtp.generator: {type(model).__name__}.forward takes neither `cache` "
                          "nor `past_key_values`; it cannot decode with a KV cache")


class DecodeStep:
    """`(input_ids [B, S], position_ids [B, S], attention_mask [B, max_len], start []) ->
    logits [B, S, vocab]`, B in 1..max_batch: the model's forward over a static cache.

    `start` is the cache slot of the first of the S tokens; `attention_mask` covers every
    cache slot (0 for left padding; slots not written yet are hidden by causality).
    `exporting()` makes this step the model's forward while torch.export traces the model
    itself, so the graph's parameters keep the model's own names (what `fxtp.load`,
    `fxtp.save` and `load_weights` match against checkpoints and training graphs)."""

    def __init__(self, model: nn.Module, hf_model: nn.Module, max_batch: int, max_len: int):
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        self.lm = model
        self.forward = model.forward            # bound, or a wrapper someone installed
        self.cache_kw = cache_kwarg(hf_model)
        cfg = hf_model.config
        cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.cache = StaticCache(config=cfg, max_cache_len=max_len)
        bad = [type(layer).__name__ for layer in self.cache.layers
               if type(layer) is not StaticLayer]
        if bad:
            raise GenerationError(
                f"fxtp.generator: {type(hf_model).__name__} needs cache layers of kind {bad[0]} "
                "(sliding window / hybrid attention), which fxtp cannot capture yet; only models "
                "whose layers all use full attention are supported")
        # One eager step at max_batch allocates the cache (transformers allocates it lazily at
        # the first write), so its shapes are the ones the attention really writes (kv heads,
        # head dims) with no config reading. On a meta-built model everything here is meta.
        dev = model_device(model)
        ids = torch.zeros(max_batch, 1, dtype=torch.long, device=dev)
        mask = torch.ones(max_batch, max_len, dtype=torch.long, device=dev)
        self.full: list = []
        with torch.no_grad():
            self(ids, torch.zeros_like(ids), mask, torch.zeros((), dtype=torch.long, device=dev))
        self.full = [(layer.keys, layer.values) for layer in self.cache.layers]
        if any(k is None or v is None for k, v in self.full):
            raise GenerationError(
                f"fxtp.generator: {type(hf_model).__name__} did not write its KV cache when given "
                f"`{self.cache_kw}=StaticCache(...)`; this transformers version passes the cache "
                "under another name. Use a transformers version fxtp supports (see pyproject.toml)")
        for k, v in self.full:
            k.zero_()
            v.zero_()

    def __call__(self, input_ids, position_ids, attention_mask, start):
        b = input_ids.shape[0]
        for i, layer in enumerate(self.cache.layers):
            if self.full:                # after the allocating step: views of the first b rows
                k, v = self.full[i]
                layer.keys, layer.values = k[:b], v[:b]
            # a fresh tensor per step (in the graph: clone(start)), not cache state: the graph
            # then holds no state besides the cache itself, and nothing on another device
            layer.cumulative_length = start.clone()
        out = self.forward(input_ids=input_ids, position_ids=position_ids,
                           attention_mask=attention_mask, use_cache=True,
                           **{self.cache_kw: self.cache})
        return out.logits if hasattr(out, "logits") else out[0]

    @contextlib.contextmanager
    def exporting(self) -> Iterator[nn.Module]:
        """The model, with this step as its forward (an instance attribute) until exit."""
        m = self.lm
        had = "forward" in m.__dict__
        saved = m.__dict__.get("forward")

        def step(input_ids, position_ids, attention_mask, start):
            return self(input_ids, position_ids, attention_mask, start)

        m.forward = step
        try:
            yield m
        finally:
            if had:
                m.forward = saved
            else:
                del m.forward


def capture_step(model: nn.Module, hf_model: nn.Module, max_batch: int, max_len: int) -> Captured:
    """Exports one decoding step of `model` with a static cache, the batch (1..max_batch) and
    sequence length (1..max_len) dynamic: one graph serves the prefill and every decode step
    of every batch size. Works on a meta-built model (the graph and cache are then meta)."""
    from torch.export import Dim

    was_training = model.training
    model.eval()
    try:
        step = DecodeStep(model, hf_model, max_batch, max_len)
        dev = model_device(model)
        b, s = min(2, max_batch), min(2, max_len)
        ids = torch.zeros(b, s, dtype=torch.long, device=dev)
        pos = torch.arange(s, device=dev).expand(b, s).contiguous()
        mask = torch.ones(b, max_len, dtype=torch.long, device=dev)
        seq = Dim("seq", min=1, max=max_len)
        batch = {0: Dim("batch", min=1, max=max_batch)} if max_batch > 1 else {}
        dynamic = ({**batch, 1: seq}, {**batch, 1: seq}, batch or None, None)
        with torch.no_grad(), warnings.catch_warnings(), step.exporting() as traced:
            warnings.simplefilter("ignore")
            ep = torch.export.export(traced, (ids, pos, mask, torch.zeros((), dtype=torch.long,
                                                                           device=dev)),
                                     dynamic_shapes=dynamic, strict=False)
            gm = ep.module()
            drop_no_ops(gm)
            _write_whole_cache(gm)
    except GenerationError:
        raise
    except Exception as e:
        raise CaptureError(
            f"fxtp could not capture a decoding step of {type(hf_model).__name__} with a static KV "
            f"cache: {type(e).__name__}: {_first_line(e)}{_user_code(e)}. The model must support "
            "transformers' StaticCache (cache_implementation='static').") from e
    finally:
        model.train(was_training)
    return Captured(gm=gm, arg_count=4, kwarg_names=(), defaults={}, hf=False)


def _write_whole_cache(gm: fx.GraphModule) -> None:
    """`index_copy_(cache[:B], ...)` -> `index_copy_(cache, ...)`: the graph writes into the
    cache attribute itself, which `CacheRows` points at its first B rows while the step runs.
    The graph then has the shape the sharding rules know (the attribute written in place, used
    nowhere else), and its meta value takes the slice's batch-symbolic shape."""
    for n in list(gm.graph.nodes):
        if not (n.op == "call_function" and n.target == aten.index_copy_.default):
            continue
        s = n.args[0]
        if not (isinstance(s, fx.Node) and s.op == "call_function"
                and s.target == aten.slice.Tensor and len(s.users) == 1):
            continue
        src, dim = s.args[0], s.args[1] if len(s.args) > 1 else 0
        begin = s.args[2] if len(s.args) > 2 else None
        if not (isinstance(src, fx.Node) and src.op == "get_attr" and dim == 0
                and begin in (None, 0) and len(src.users) == 1):
            continue
        if "val" in s.meta:
            src.meta["val"] = s.meta["val"]
        s.replace_all_uses_with(src)
        gm.graph.erase_node(s)
    gm.graph.lint()
    gm.recompile()


def cache_attrs(gm: fx.GraphModule) -> list[str]:
    """The tensor attributes the graph writes in place with `index_copy_`: the KV cache."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target == aten.index_copy_.default:
            a = n.args[0]
            if isinstance(a, fx.Node) and a.op == "get_attr" and a.target not in out:
                out.append(a.target)
    return out


class CacheRows:
    """Points the step graph's cache attributes at their first `b` rows while the step runs,
    and back at the whole tensors afterwards (so `fxtp.load`, `.to()` and `gen.cache()` always
    see the whole cache). A row view shares the cache's storage and data pointer: CUDA graphs
    captured for any batch write the same tensors."""

    def __init__(self, gm: fx.GraphModule, names: list[str]):
        self.slots = []
        for name in names:
            owner_name, _, leaf = name.rpartition(".")
            owner = gm.get_submodule(owner_name) if owner_name else gm
            table = owner._buffers if leaf in owner._buffers else owner.__dict__
            self.slots.append((table, leaf))

    def tensors(self) -> list[torch.Tensor]:
        return [table[leaf] for table, leaf in self.slots]

    @contextlib.contextmanager
    def rows(self, b: int) -> Iterator[None]:
        full = self.tensors()
        if all(t.shape[0] == b for t in full):
            yield
            return
        try:
            for (table, leaf), t in zip(self.slots, full):
                table[leaf] = t[:b]
            yield
        finally:
            for (table, leaf), t in zip(self.slots, full):
                table[leaf] = t
