"""Tensor-parallel generation with a sharded static KV cache: `fxtp.generator(model, ws)`.

One decoding step of the causal LM is captured with a static cache (Hugging Face's
`StaticCache`, `[max_batch, kv_heads, max_len, head_dim]` per layer and for k and v). The same
graph serves the prefill (S = prompt length) and every decode step (S = 1): the sequence
length is a dynamic dim, the batch is `max_batch` (smaller batches are padded with dummy rows).
The cache tensors are constants of the captured graph, written in place by `index_copy_`: the
solver's `index_copy` rule aligns them with the (head-sharded) k/v written into them, so the
rewrite slices each cache once, in place, to this rank's kv heads: cache memory per rank is
1/N (kv heads replicated per rank group when there are fewer kv heads than ranks, as vLLM
does; MQA's single kv head stays whole on every rank).

Decoding follows `model.generate`: the generation config, special tokens, attention mask,
max/min length, logits processors (temperature, top-k, top-p, repetition penalty, ...) and
stopping criteria are prepared by the model's own generation helpers, so every argument means
what it means to Hugging Face; position ids come from the attention mask's cumsum (left
padding), as in Hugging Face. Greedy and sampling only (no beams).
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import fx, nn

from .capture import Captured, is_hf_model
from .passes.cleanup import drop_no_ops
from .errors import (CacheOverflowError, CaptureError, GenerationError, PromptMismatchError)

aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------
# the captured decoding step

class DecodeStep(nn.Module):
    """One forward of a causal LM over a static KV cache:
    `(input_ids [B, S], position_ids [B, S], attention_mask [B, max_len], start []) -> logits`.

    `start` is the cache slot of the first of the S tokens; `attention_mask` covers every
    cache slot (0 for left padding; slots not written yet are hidden by causality)."""

    def __init__(self, model: nn.Module, max_batch: int, max_len: int):
        super().__init__()
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        self.lm = model
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.cache = StaticCache(config=cfg, max_cache_len=max_len)
        bad = [type(layer).__name__ for layer in self.cache.layers if type(layer) is not StaticLayer]
        if bad:
            raise GenerationError(
                f"fxtp.generator: {type(model).__name__} needs cache layers of kind {bad[0]} "
                "(sliding window / hybrid attention), which fxtp cannot capture yet; only models "
                "whose layers all use full attention are supported")
        # the cache is allocated by a first (eager) step, so its shapes are the ones the model's
        # attention really writes (kv heads, head dims), with no config reading
        ids = torch.zeros(max_batch, 1, dtype=torch.long, device=_device(model))
        with torch.no_grad():
            self._run(ids, torch.zeros_like(ids), torch.ones(max_batch, max_len, dtype=torch.long,
                                                              device=ids.device),
                      torch.tensor(0, device=ids.device))
        for layer in self.cache.layers:
            layer.keys.zero_()
            layer.values.zero_()

    def _run(self, input_ids, position_ids, attention_mask, start):
        for layer in self.cache.layers:
            layer.cumulative_length.copy_(start)
        out = self.lm(input_ids=input_ids, position_ids=position_ids,
                      attention_mask=attention_mask, cache=self.cache, use_cache=True)
        return out.logits if hasattr(out, "logits") else out[0]

    def forward(self, input_ids, position_ids, attention_mask, start):
        return self._run(input_ids, position_ids, attention_mask, start)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _generation_model(model: nn.Module) -> nn.Module:
    """The model whose Hugging Face generation helpers prepare the arguments (a PEFT model's
    base model); raises GenerationError for models that cannot generate."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(model).__name__
    if not is_hf_model(model):
        raise GenerationError(f"fxtp.generator: {name} is not a Hugging Face model; pass a "
                              "causal LM (AutoModelForCausalLM)")
    cfg = hf.config
    if getattr(cfg, "is_encoder_decoder", False):
        raise GenerationError(f"fxtp.generator: {name} is an encoder-decoder model; only "
                              "decoder-only causal LMs are supported")
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if head is None or not hasattr(hf, "_get_logits_processor"):
        raise GenerationError(f"fxtp.generator: {name} has no generation head (no lm_head, "
                              "not a GenerationMixin); load it with AutoModelForCausalLM")
    return hf


def capture_step(model: nn.Module, max_batch: int, max_len: int) -> Captured:
    """Exports one decoding step of `model` with a static cache (dynamic sequence length,
    1..max_len, so one graph serves the prefill and every decode step)."""
    from torch.export import Dim

    was_training = model.training
    model.eval()
    try:
        step = DecodeStep(model, max_batch, max_len).eval()
        dev = _device(model)
        s = min(2, max_len)
        ids = torch.zeros(max_batch, s, dtype=torch.long, device=dev)
        pos = torch.arange(s, device=dev).expand(max_batch, s).contiguous()
        mask = torch.ones(max_batch, max_len, dtype=torch.long, device=dev)
        seq = Dim("seq", min=1, max=max_len)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ep = torch.export.export(step, (ids, pos, mask, torch.tensor(0, device=dev)),
                                     dynamic_shapes=({1: seq}, {1: seq}, None, None), strict=False)
            gm = ep.module()
            drop_no_ops(gm)
    except GenerationError:
        raise
    except Exception as e:
        from .capture import _first_line, _user_code

        raise CaptureError(
            f"fxtp could not capture a decoding step of {type(model).__name__} with a static KV "
            f"cache: {type(e).__name__}: {_first_line(e)}{_user_code(e)}. The model must support "
            "transformers' StaticCache (cache_implementation='static').") from e
    finally:
        model.train(was_training)
    return Captured(gm=gm, arg_count=4, kwarg_names=(), defaults={}, hf=False)


def cache_attrs(gm: fx.GraphModule) -> list[str]:
    """The tensor attributes the graph writes in place with `index_copy_`: the KV cache."""
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target == aten.index_copy_.default:
            a = n.args[0]
            if isinstance(a, fx.Node) and a.op == "get_attr" and a.target not in out:
                out.append(a.target)
    return out


# ---------------------------------------------------------------------------------------------
# the generator

def generator(model: nn.Module, world_size: int, *, max_len: int = 256, max_batch: int = 1,
              group: Optional[dist.ProcessGroup] = None, overrides: Optional[dict] = None,
              vocab_parallel: bool = False, compile: bool | dict = False) -> "Generator":
    """This rank's tensor-parallel generator of the causal LM `model`.

    Call it on every rank with the same weights (like `fxtp.transform`). `max_len` is the
    cache length: prompt plus new tokens, minus one, must fit (else `CacheOverflowError`);
    `max_batch` the most prompts per call. LoRA adapters (a PEFT model) are folded into the
    local weights (`fxtp.for_generation`). `compile=True` (or a dict of `torch.compile`
    options) compiles the step with `fullgraph=True`.
    """
    from .hybrid import for_generation
    from .patterns.linear import split_biases
    from .plan import build_plan
    from .runtime import resolve_group
    from .transform import _model_name, transform

    hf = _generation_model(model)
    if max_len < 1 or max_batch < 1:
        raise GenerationError(f"fxtp.generator: max_len and max_batch must be >= 1, got "
                              f"max_len={max_len}, max_batch={max_batch}")
    resolve_group(world_size, group)       # the process-group errors before the capture
    captured = capture_step(model, max_batch, max_len)
    split_biases(captured.gm)
    plan = build_plan(captured, world_size, _model_name(model), overrides, vocab_parallel)
    tp = transform(model, world_size, plan=plan, group=group)
    for_generation(tp)
    gen = Generator(tp, hf, captured, max_len, max_batch, group)
    if compile:
        gen.compile(**(compile if isinstance(compile, dict) else {}))
    return gen


class Generator:
    """`generate(input_ids, attention_mask=None, **generation_kwargs)`: Hugging Face's greedy or
    sampling decode on this rank's tensor-parallel step graph (`self.tp`), same tokens on every
    rank. `cache_bytes()` is this rank's KV cache, `full_cache_bytes` the unsharded one."""

    def __init__(self, tp: fx.GraphModule, hf_model: nn.Module, captured: Captured,
                 max_len: int, max_batch: int, group: Optional[dist.ProcessGroup]):
        from .transform import META_KEY

        self.tp = tp
        self.info = tp.meta[META_KEY]
        self.model = hf_model
        self.max_len, self.max_batch = max_len, max_batch
        self.world_size, self.rank = self.info.world_size, self.info.rank
        self.group = group if group is not None or self.world_size == 1 else dist.group.WORLD
        self.cache_names = cache_attrs(tp)
        from .passes._util import get_tensor_attr

        self.full_cache_bytes = sum(get_tensor_attr(captured.gm, n).nbytes
                                    for n in cache_attrs(captured.gm))
        self._get = get_tensor_attr
        self._step = tp

    # -- inspection ---------------------------------------------------------------------------
    def cache(self) -> dict[str, torch.Tensor]:
        """This rank's cache tensors by attribute name."""
        return {n: self._get(self.tp, n) for n in self.cache_names}

    def cache_bytes(self) -> int:
        return sum(t.nbytes for t in self.cache().values())

    def load_weights(self, tp: fx.GraphModule) -> "Generator":
        """Copies the local shards of a training graph (`fxtp.transform` of the same model at
        the same world size) into this generator: the hybrid engine's train -> generate
        switch after optimizer steps, without capturing anything again. LoRA adapters are
        refolded with the new base and adapter weights. The training graph must not be folded
        (its base shards would already hold B @ A)."""
        from .hybrid import for_generation, is_folded, unfold_lora
        from .transform import META_KEY

        if META_KEY not in getattr(tp, "meta", {}):
            raise GenerationError("load_weights takes the graph of fxtp.transform(model, ws)")
        if is_folded(tp):
            from .errors import LoraStateError

            raise LoraStateError("load_weights: the training graph's LoRA adapters are folded "
                                 "into its base shards; call fxtp.for_training(tp) (or "
                                 "fxtp.unfold_lora(tp)) first")
        src_info = tp.meta[META_KEY]
        if (src_info.world_size, src_info.rank) != (self.world_size, self.rank):
            raise GenerationError(
                f"load_weights: the training graph is rank {src_info.rank} of "
                f"{src_info.world_size}, this generator rank {self.rank} of {self.world_size}")
        folded = is_folded(self.tp)
        if folded:
            unfold_lora(self.tp)
        try:
            source = dict(tp.named_parameters(remove_duplicate=False))
            # the step graph holds the model as DecodeStep.lm: its names are "lm." + the model's
            mine = {n[len("lm."):] if n.startswith("lm.") else n: p
                    for n, p in self.tp.named_parameters(remove_duplicate=False)}
            missing = sorted(set(mine) - set(source))
            shapes = [f"{n}: {tuple(source[n].shape)} vs {tuple(p.shape)}" for n, p in mine.items()
                      if n in source and source[n].shape != p.shape]
            if missing or shapes:
                raise GenerationError(
                    "load_weights: the training graph does not hold this generator's shards ("
                    + "; ".join((["missing " + ", ".join(missing[:5])] if missing else [])
                                + shapes[:5])
                    + "); both must come from the same model, world size and plan overrides")
            with torch.no_grad():
                for name, p in mine.items():
                    p.copy_(source[name])
        finally:
            if folded:
                for_generation(self.tp)
        return self

    def compile(self, **options) -> "Generator":
        """Runs the step through `torch.compile(fullgraph=True, **options)`."""
        options.setdefault("fullgraph", True)
        self._step = torch.compile(self.tp, **options)
        return self

    # -- decoding -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 generation_config: Any = None, logits_processor: Any = None,
                 stopping_criteria: Any = None, **kwargs) -> torch.Tensor:
        """Like `model.generate(input_ids, attention_mask=..., **kwargs)` (greedy or sampling,
        `return_dict_in_generate=False`): returns prompt + new tokens, `[batch, length]`."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        m = self.model
        if input_ids.dim() != 2:
            raise GenerationError(f"fxtp generate: input_ids must be [batch, length], got shape "
                                  f"{tuple(input_ids.shape)}")
        b, p = input_ids.shape
        if b > self.max_batch:
            raise GenerationError(f"fxtp generate: {b} prompts but the generator was built with "
                                  f"max_batch={self.max_batch}; build it with "
                                  f"fxtp.generator(model, ws, max_batch={b}) or split the batch")
        if p < 1:
            raise GenerationError("fxtp generate: empty prompt (input_ids has length 0)")
        default_max = (kwargs.get("max_length") is None and (generation_config is None or
                       generation_config.max_length is None) and m.generation_config.max_length is None)
        default_min = (kwargs.get("min_length") is None and (generation_config is None or
                       generation_config.min_length is None) and m.generation_config.min_length is None)
        gc, unused = m._prepare_generation_config(copy.deepcopy(generation_config), **kwargs)
        unused = {k: v for k, v in unused.items() if v is not None and k != "use_cache"}
        if unused:
            raise GenerationError(f"fxtp generate: unsupported arguments {sorted(unused)}; it "
                                  "takes input_ids, attention_mask and generation options")
        if gc.num_beams != 1 or gc.num_return_sequences != 1:
            raise GenerationError("fxtp generate: only greedy decoding and sampling are supported "
                                  f"(num_beams={gc.num_beams}, num_return_sequences="
                                  f"{gc.num_return_sequences}); set them to 1")
        dev = input_ids.device
        m._prepare_special_tokens(gc, attention_mask is not None, device=dev, batch_size=b)
        if attention_mask is None:
            attention_mask = m._prepare_attention_mask_for_generation(input_ids, gc, {})
        elif tuple(attention_mask.shape) != (b, p):
            raise GenerationError(f"fxtp generate: attention_mask shape {tuple(attention_mask.shape)}"
                                  f" differs from input_ids {(b, p)}")
        gc = m._prepare_generated_length(generation_config=gc, has_default_max_length=default_max,
                                         has_default_min_length=default_min,
                                         model_input_name="input_ids", inputs_tensor=input_ids,
                                         input_ids_length=p)
        if gc.max_length - 1 > self.max_len:
            raise CacheOverflowError(
                f"fxtp generate: a prompt of {p} tokens plus {gc.max_length - p} new tokens needs "
                f"{gc.max_length - 1} cache slots, but the KV cache holds max_len={self.max_len}; "
                f"build the generator with fxtp.generator(model, ws, max_len={gc.max_length - 1}) "
                "or ask for fewer tokens (the cache does not grow)")
        self._check_same_inputs(input_ids, attention_mask, gc)
        processors = m._get_logits_processor(
            generation_config=gc, input_ids_seq_length=p, encoder_input_ids=input_ids,
            prefix_allowed_tokens_fn=None,
            logits_processor=logits_processor if logits_processor is not None else LogitsProcessorList(),
            device=dev, model_kwargs={"attention_mask": attention_mask})
        stopping = m._get_stopping_criteria(
            generation_config=gc,
            stopping_criteria=stopping_criteria if stopping_criteria is not None else StoppingCriteriaList())
        pad = gc._pad_token_tensor
        has_eos = any(hasattr(c, "eos_token_id") for c in stopping)
        do_sample = gc.do_sample

        # batch padded to max_batch with dummy rows (all-ones mask, positions 0..p-1)
        B, L = self.max_batch, self.max_len
        am = attention_mask.to(dev, torch.long)
        ids = torch.zeros(B, p, dtype=torch.long, device=dev)
        ids[:b] = input_ids
        mask = torch.ones(B, L, dtype=torch.long, device=dev)
        mask[:b, :p] = am
        pos = torch.arange(p, device=dev).expand(B, p).clone()
        pos[:b] = (am.cumsum(-1) - 1).masked_fill(am == 0, 0)
        for t in self.cache().values():
            t.zero_()
        logits = self._step(ids, pos, mask, torch.tensor(0, device=dev))
        last = pos[:, -1]
        cur = p
        unfinished = torch.ones(b, dtype=torch.long, device=dev)
        while True:
            scores = processors(input_ids, logits[:b, -1].to(torch.float32))
            if do_sample:
                probs = nn.functional.softmax(scores, dim=-1)
                nxt = torch.multinomial(probs, num_samples=1).squeeze(1)
            else:
                nxt = torch.argmax(scores, dim=-1)
            if has_eos:
                nxt = nxt * unfinished + pad * (1 - unfinished)
            input_ids = torch.cat([input_ids, nxt[:, None]], dim=-1)
            unfinished = unfinished & ~stopping(input_ids, scores)
            if unfinished.max() == 0:
                return input_ids
            step_ids = torch.zeros(B, 1, dtype=torch.long, device=dev)
            step_ids[:b, 0] = nxt
            last = last + 1
            logits = self._step(step_ids, last[:, None], mask, torch.tensor(cur, device=dev))
            cur += 1

    def _check_same_inputs(self, input_ids, attention_mask, gc) -> None:
        """One all-reduce (max of [v, -v]) of a fingerprint of the prompt and the decoding
        options: ranks given different prompts raise PromptMismatchError together instead of
        decoding different tokens (and hanging or desynchronising later collectives)."""
        if self.world_size == 1:
            return
        v = _fingerprint(input_ids, attention_mask, gc)
        both = torch.cat([v, -v])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        n = v.numel()
        if not torch.equal(both[:n], -both[n:]):
            what = ["batch size", "prompt length", "input_ids", "attention_mask", "max_length",
                    "do_sample", "temperature", "top_k", "top_p"]
            diff = [w for w, hi, lo in zip(what, both[:n].tolist(), (-both[n:]).tolist()) if hi != lo]
            raise PromptMismatchError(
                f"fxtp generate: the ranks were given different inputs ({', '.join(diff)} differ; "
                f"this is rank {self.rank}). Every rank must call generate with the same prompts "
                "and options (broadcast them from rank 0 first); for sampling also seed every "
                "rank's generator the same (torch.manual_seed).")


def _fingerprint(input_ids: torch.Tensor, attention_mask: torch.Tensor, gc) -> torch.Tensor:
    def digest(t: torch.Tensor) -> int:
        flat = t.reshape(-1).to(torch.int64).cpu()
        w = (torch.arange(flat.numel(), dtype=torch.int64) * 2654435761) % 1000003 + 1
        return int(((flat + 1) * w).sum() % (2 ** 61 - 1))

    def num(x) -> int:
        return -1 if x is None else int(round(float(x) * 1e6))

    return torch.tensor([input_ids.shape[0], input_ids.shape[1], digest(input_ids),
                         digest(attention_mask), gc.max_length, int(bool(gc.do_sample)),
                         num(gc.temperature), num(gc.top_k), num(gc.top_p)], dtype=torch.int64)
