"""Tensor-parallel generation with a sharded static KV cache: `fxtp.generator(model, ws)`.

One decoding step of the causal LM is captured with a static cache (`step.py`: Hugging
Face's `StaticCache`, `[max_batch, kv_heads, max_len, head_dim]` per layer for k and v). The
same graph serves the prefill (S = prompt length) and every decode step (S = 1) of every batch
size up to `max_batch` (both dims dynamic; a batch of b runs on the cache's first b rows). The
cache tensors are constants of the graph, written in place by `index_copy_`: the solver's
`index_copy` rule aligns them with the (head-sharded) k/v written into them, so the rewrite
slices each cache once, in place, to this rank's kv heads: cache memory per rank is 1/N (kv
heads replicated per rank group when there are fewer kv heads than ranks, as vLLM does; MQA's
single kv head stays whole on every rank). Decode steps run from static buffers, as CUDA graphs
on a GPU (`replay.py`).

Decoding follows `model.generate`: the generation config, special tokens, attention mask,
max/min length, logits processors (temperature, top-k, top-p, repetition penalty, ...) and
stopping criteria are prepared by the model's own generation helpers, so every argument means
what it means to Hugging Face; position ids come from the attention mask's cumsum (left
padding), as in Hugging Face. Greedy and sampling only (no beams). Every tensor is made on the
device of the step's parameters at call time (`fxtp.load`/`.to()` may move them).
"""
from __future__ import annotations

import copy
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import fx, nn

from .._transform import transform
from ..capture.export import Captured, is_hf_model, model_device
from ..capture.linear import split_biases
from ..errors import (
    CacheOverflowError,
    GenerationError,
    LoraStateError,
    MetaTensorError,
    PromptMismatchError,
)
from ..graph.nodes import get_tensor_attr
from ..graph.tensors import tensor_attrs
from ..modes import for_generation, is_folded, unfold_lora
from ..planning.describe import build_plan
from ..planning.planner import model_name
from ..rewrite.record import META_KEY
from ..runtime.agreement import differing, guarded_gather, rank_groups, tensor_digest
from ..runtime.group import collective_device, resolve_group
from .replay import Replay
from .step import CacheRows, cache_attrs, capture_step

CudaGraph = Union[None, bool, str]
# torch.compile modes that add inductor's own CUDA graphs, which skip this step (its cache is
# written in place: "mutated inputs"); the generator replays its decode step as a CUDA graph
# itself, so these become their modes without CUDA graphs
_WITHOUT_CUDAGRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


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


# ---------------------------------------------------------------------------------------------
# the generator

def generator(model: nn.Module, world_size: int, *, max_len: int = 256, max_batch: int = 1,
              group: Optional[dist.ProcessGroup] = None, overrides: Optional[dict] = None,
              vocab_parallel: bool = False, compile: bool | dict = False,
              cuda_graph: CudaGraph = None) -> "Generator":
    """This rank's tensor-parallel generator of the causal LM `model`.

    Call it on every rank with the same weights (like `fxtp.transform`), or on a model built
    under `fxtp.init_empty()` and then `fxtp.load(gen, ckpt_dir, device=...)`. `max_len` is
    the cache length: prompt plus new tokens, minus one, must fit (else `CacheOverflowError`);
    `max_batch` the most prompts per call (a smaller batch costs only its rows). LoRA adapters
    (a PEFT model) are folded into the local weights (`fxtp.for_generation`). `compile=True`
    (or a dict of `torch.compile` options) compiles the step with `fullgraph=True`.
    `cuda_graph`: decode steps replayed as CUDA graphs; None: when the step's parameters are
    on a CUDA device, True: always (a CUDA device is then required), False: never,
    "emulate": the same static-buffer path without a CUDA graph (CPU tests).
    """
    hf = _generation_model(model)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (max_len, max_batch)):
        raise GenerationError(f"fxtp.generator: max_len and max_batch must be ints, got "
                              f"max_len={max_len!r}, max_batch={max_batch!r}")
    if max_len < 1 or max_batch < 1:
        raise GenerationError(f"fxtp.generator: max_len and max_batch must be >= 1, got "
                              f"max_len={max_len}, max_batch={max_batch}")
    _check_cuda_graph(cuda_graph)
    resolve_group(world_size, group)       # the process-group errors before the capture
    captured = capture_step(model, hf, max_batch, max_len)
    split_biases(captured.gm)
    plan = build_plan(captured, world_size, model_name(model), overrides, vocab_parallel)
    tp = transform(model, world_size, plan=plan, group=group)
    for_generation(tp)
    gen = Generator(tp, hf, captured, max_len, max_batch, group, cuda_graph)
    if compile:
        gen.compile(**(compile if isinstance(compile, dict) else {}))
    return gen


def _check_cuda_graph(cuda_graph: CudaGraph) -> None:
    if cuda_graph not in (None, True, False, "emulate"):
        raise GenerationError(f"fxtp.generator: cuda_graph must be None, True, False or "
                              f"'emulate', got {cuda_graph!r}")


class Generator:
    """`generate(input_ids, attention_mask=None, **generation_kwargs)`: Hugging Face's greedy or
    sampling decode on this rank's tensor-parallel step graph (`self.tp`), same tokens on every
    rank. `cache_bytes()` is this rank's KV cache, `full_cache_bytes` the unsharded one."""
    def __init__(self, tp: fx.GraphModule, hf_model: nn.Module, captured: Captured,
                 max_len: int, max_batch: int, group: Optional[dist.ProcessGroup],
                 cuda_graph: CudaGraph = None):
        self.tp = tp
        self.info = tp.meta[META_KEY]
        self.model = hf_model
        self.max_len, self.max_batch = max_len, max_batch
        self.world_size, self.rank = self.info.world_size, self.info.rank
        self.group = group if group is not None or self.world_size == 1 else dist.group.WORLD
        self.cache_names = cache_attrs(tp)
        self.full_cache_bytes = sum(get_tensor_attr(captured.gm, n).nbytes
                                    for n in cache_attrs(captured.gm))
        self.cuda_graph = cuda_graph
        self._get = get_tensor_attr
        self._rows = CacheRows(tp, self.cache_names)
        self._step = tp
        self._replay = Replay("eager", max_batch, max_len)

    # -- inspection ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the step's parameters are now: every tensor of a `generate` call is made here."""
        return model_device(self.tp)

    def cache(self) -> dict[str, torch.Tensor]:
        """This rank's cache tensors by attribute name."""
        return {n: self._get(self.tp, n) for n in self.cache_names}

    def cache_bytes(self) -> int:
        return sum(t.nbytes for t in self.cache().values())

    @property
    def decode_mode(self) -> str:
        """How decode steps run on the current device: "graph" (CUDA graph replay), "emulate"
        or "eager" (the step called on static buffers)."""
        dev = self.device
        if self.cuda_graph is True and dev.type != "cuda":
            raise GenerationError(f"fxtp generate: cuda_graph=True needs the step on a CUDA "
                                  f"device, its parameters are on {dev}; move it "
                                  "(fxtp.load(gen, path, device='cuda:N')) or pass cuda_graph=None")
        if self.cuda_graph == "emulate":
            return "emulate"
        if self.cuda_graph is None:
            return "graph" if dev.type == "cuda" else "eager"
        return "graph" if self.cuda_graph else "eager"

    def load_weights(self, tp: fx.GraphModule) -> "Generator":
        """Copies the local shards of a training graph (`fxtp.transform` of the same model at
        the same world size) into this generator: the hybrid engine's train -> generate
        switch after optimizer steps, without capturing anything again. LoRA adapters are
        refolded with the new base and adapter weights. The training graph must not be folded
        (its base shards would already hold B @ A)."""
        if META_KEY not in getattr(tp, "meta", {}):
            raise GenerationError("load_weights takes the graph of fxtp.transform(model, ws)")
        if is_folded(tp):
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
            # the step graph was exported from the model itself: the same parameter names
            mine = dict(self.tp.named_parameters(remove_duplicate=False))
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
            self._replay.reset()     # refolding may have swapped tensors a CUDA graph holds
        return self

    def compile(self, **options) -> "Generator":
        """Runs the step through `torch.compile(fullgraph=True, **options)`. Decode steps of
        the compiled step are then captured as CUDA graphs by the generator (`cuda_graph`), not
        by inductor: `mode="reduce-overhead"` runs as the default mode and `"max-autotune"` as
        `"max-autotune-no-cudagraphs"` (inductor skips CUDA graphs for a step that writes its
        cache in place), and `triton.cudagraphs` is turned off."""
        options.setdefault("fullgraph", True)
        mode = options.get("mode")
        if mode in _WITHOUT_CUDAGRAPHS:
            options["mode"] = _WITHOUT_CUDAGRAPHS[mode]
        if isinstance(options.get("options"), dict):
            options["options"] = {**options["options"], "triton.cudagraphs": False}
        self._step = torch.compile(self.tp, **options)
        self._replay.reset()
        return self

    def _call(self, input_ids, position_ids, attention_mask, start) -> torch.Tensor:
        """The step on `b = input_ids.shape[0]` rows: the cache attributes are its first b rows."""
        with self._rows.rows(input_ids.shape[0]):
            return self._step(input_ids, position_ids, attention_mask, start)

    # -- decoding -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                 generation_config: Any = None, logits_processor: Any = None,
                 stopping_criteria: Any = None, **kwargs) -> torch.Tensor:
        """Like `model.generate(input_ids, attention_mask=..., **kwargs)` (greedy or sampling,
        `return_dict_in_generate=False`): returns prompt + new tokens, `[batch, length]`, on
        the step's device (the prompt is moved there)."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        m = self.model
        dev = self.device
        if dev.type == "meta":
            raise MetaTensorError("fxtp generate: the generator's weights and KV cache are on the "
                                  "meta device (built under fxtp.init_empty()); fill them first: "
                                  "fxtp.load(gen, checkpoint_dir, device=...)")
        for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask)):
            if not isinstance(t, torch.Tensor) and (t is not None or name == "input_ids"):
                raise GenerationError(f"fxtp generate: {name} must be a tensor [batch, length], "
                                      f"got {type(t).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise GenerationError(f"fxtp generate: input_ids is {input_ids.dtype}; pass token "
                                  "ids as torch.long (or torch.int32)")
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
        input_ids = input_ids.to(dev)
        attention_mask = attention_mask.to(dev) if attention_mask is not None else None
        gc = generation_lengths(m, input_ids, generation_config, kwargs)
        # batch_size (transformers >= 5.1x) only decides whether padding warnings are shown
        extra = {"batch_size": b} if _takes(m._prepare_special_tokens, "batch_size") else {}
        m._prepare_special_tokens(gc, attention_mask is not None, device=dev, **extra)
        if attention_mask is None:
            attention_mask = m._prepare_attention_mask_for_generation(input_ids, gc, {})
        elif tuple(attention_mask.shape) != (b, p):
            raise GenerationError(f"fxtp generate: attention_mask shape {tuple(attention_mask.shape)}"
                                  f" differs from input_ids {(b, p)}")
        if gc.max_length - 1 > self.max_len:
            raise CacheOverflowError(
                f"fxtp generate: a prompt of {p} tokens plus {gc.max_length - p} new tokens needs "
                f"{gc.max_length - 1} cache slots, but the KV cache holds max_len={self.max_len}; "
                f"build the generator with fxtp.generator(model, ws, max_len={gc.max_length - 1}) "
                "or ask for fewer tokens (the cache does not grow)")
        replay = self._replay
        mode = self.decode_mode
        if mode != replay.mode:
            replay.mode = mode
            replay.reset()
        self._check_same_inputs(input_ids, attention_mask, gc)
        try:
            processors = m._get_logits_processor(
                generation_config=gc, input_ids_seq_length=p, encoder_input_ids=input_ids,
                prefix_allowed_tokens_fn=None,
                logits_processor=logits_processor if logits_processor is not None else LogitsProcessorList(),
                device=dev, model_kwargs={"attention_mask": attention_mask})
            stopping = m._get_stopping_criteria(
                generation_config=gc,
                stopping_criteria=stopping_criteria if stopping_criteria is not None else StoppingCriteriaList())
        except (TypeError, ValueError) as e:     # e.g. temperature <= 0, top_p outside (0, 1]
            raise GenerationError(f"fxtp generate: {_first(e)}; fix that generation argument "
                                  "(it means what it means to model.generate)") from e
        pad = gc._pad_token_tensor
        has_eos = any(hasattr(c, "eos_token_id") for c in stopping)
        do_sample = gc.do_sample

        if mode != "eager":     # graphs hold addresses: recapture if anything moved
            state = tensor_attrs(self.tp)     # constants lifted from the forward too
            if mode == "graph":
                _check_one_device(state, dev)
            replay.check(list(state.values()) + self._rows.tensors())
        # the prefill: the b prompts on the cache's first b rows (rows up to the decode bucket
        # cleared: dummy rows read them)
        am = attention_mask.to(torch.long)
        for t in self._rows.tensors():
            t[:replay.bucket_of(b)].zero_()
        mask = torch.ones(b, self.max_len, dtype=torch.long, device=dev)
        mask[:, :p] = am
        pos = (am.cumsum(-1) - 1).masked_fill(am == 0, 0)
        start = torch.zeros((), dtype=torch.long, device=dev)
        last = self._call(input_ids, pos, mask, start)[:, -1]
        bucket = None
        unfinished = torch.ones(b, dtype=torch.long, device=dev)
        while True:
            scores = processors(input_ids, last.to(torch.float32))
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
            if bucket is None:
                bucket = replay.begin(b, mask, pos[:, -1], p, dev)
            last = replay.step(bucket, b, nxt, self._call)

    def _check_same_inputs(self, input_ids, attention_mask, gc) -> None:
        """One guarded gather (`agreement.guarded_gather`: a lost rank raises `RankLostError`,
        never hangs) of a fingerprint of the prompt and the decoding options: ranks given
        different prompts raise PromptMismatchError together instead of decoding different
        tokens (and hanging or desynchronising later collectives). The fingerprint is computed
        where the prompt is and gathered on the device the group's collectives take (NCCL:
        the current CUDA device; gloo: the CPU)."""
        if self.world_size == 1:
            return
        table = guarded_gather(_fingerprint(input_ids, attention_mask, gc,
                                            collective_device(self.group)),
                               self.group, "the prompt check of fxtp generate")
        cols = differing(table)
        if cols:
            what = ["batch size", "prompt length", "input_ids", "attention_mask", "max_length",
                    "do_sample", "temperature", "top_k", "top_p"]
            diff = [f"{what[c]} ({rank_groups(table[:, c].tolist())})" for c in cols]
            raise PromptMismatchError(
                f"fxtp generate: the ranks were given different inputs ({', '.join(diff)} differ; "
                f"this is rank {self.rank}). Every rank must call generate with the same prompts "
                "and options (broadcast them from rank 0 first); for sampling also seed every "
                "rank's generator the same (torch.manual_seed).")


def generation_lengths(m: nn.Module, input_ids: torch.Tensor, generation_config: Any,
                       kwargs: dict) -> Any:
    """The generation config of a call, prepared by the model's own helpers as
    `model.generate` prepares it (`max_length` = prompt + new tokens, `min_length`), with
    unsupported arguments and beam search refused. `tp.generate` sizes its cache from it."""
    default_max = (kwargs.get("max_length") is None and (generation_config is None or
                   generation_config.max_length is None) and m.generation_config.max_length is None)
    default_min = (kwargs.get("min_length") is None and (generation_config is None or
                   generation_config.min_length is None) and m.generation_config.min_length is None)
    try:
        gc, unused = m._prepare_generation_config(copy.deepcopy(generation_config), **kwargs)
    except (TypeError, ValueError) as e:     # Hugging Face's own argument checks
        raise GenerationError(f"fxtp generate: {_first(e)}; fix that generation argument "
                              "(it means what it means to model.generate)") from e
    unused = {k: v for k, v in unused.items() if v is not None and k != "use_cache"}
    if unused:
        raise GenerationError(f"fxtp generate: unsupported arguments {sorted(unused)}; it "
                              "takes input_ids, attention_mask and generation options")
    if gc.num_beams != 1 or gc.num_return_sequences != 1:
        raise GenerationError("fxtp generate: only greedy decoding and sampling are supported "
                              f"(num_beams={gc.num_beams}, num_return_sequences="
                              f"{gc.num_return_sequences}); set them to 1")
    try:
        return m._prepare_generated_length(
            generation_config=gc, has_default_max_length=default_max,
            has_default_min_length=default_min, model_input_name="input_ids",
            inputs_tensor=input_ids, input_ids_length=input_ids.shape[1])
    except (TypeError, ValueError) as e:     # e.g. max_new_tokens <= 0
        raise GenerationError(f"fxtp generate: {_first(e)}; fix that generation argument "
                              "(it means what it means to model.generate)") from e


def _check_one_device(state: dict[str, torch.Tensor], dev: torch.device) -> None:
    """A CUDA graph cannot copy a host tensor into the step (an index constant, a rotary
    buffer): everything the step reads must be on its device before the capture."""
    away = [f"{n} ({t.device})" for n, t in state.items() if t.device != dev]
    if away:
        raise GenerationError(
            f"fxtp generate: the step's parameters are on {dev} but {len(away)} tensor(s) it "
            f"reads are not: {', '.join(away[:5])}; a CUDA graph cannot copy them in. Move the "
            f"whole step (gen.tp.to({str(dev)!r}), or fxtp.load(gen, path, device=...)) or "
            "pass cuda_graph=False")


def _first(e: Exception) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def _takes(fn: Any, name: str) -> bool:
    import inspect

    return name in inspect.signature(fn).parameters


def _fingerprint(input_ids: torch.Tensor, attention_mask: torch.Tensor, gc,
                 device: torch.device) -> torch.Tensor:
    """`[batch, length, digest(ids), digest(mask), max_length, do_sample, temperature, top_k,
    top_p]` as int64 on `device`."""
    def num(x) -> int:
        return -1 if x is None else int(round(float(x) * 1e6))

    digests = torch.stack([tensor_digest(input_ids), tensor_digest(attention_mask)]).to(device)
    opts = torch.tensor([input_ids.shape[0], input_ids.shape[1], gc.max_length,
                         int(bool(gc.do_sample)), num(gc.temperature), num(gc.top_k),
                         num(gc.top_p)], dtype=torch.int64, device=device)
    return torch.cat([opts[:2], digests, opts[2:]])
