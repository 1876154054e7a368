"""Generation cases run inside spawned gloo ranks (tests/test_generate.py): one spawn per world
size runs them all and returns plain data; the test process asserts. Nothing here raises on a
mismatch (a rank that stops early would leave the others waiting in a collective)."""
from __future__ import annotations

import time
import warnings
from typing import Any

import torch

import fxtp
from fxtp.generation.tp_generate import TPGenerate
from fxtp.graph.tensors import tensor_attrs
from fxtp.testing.families import FAMILIES, family_model
from fxtp.testing.models import tiny_model

from .rank_workers import _run_timed

# name -> (builder, structure it stands for)
GREEDY_CASES = ("llama", "gpt2", "phi3", "falcon_mqa")
EXAMPLES = 2          # hypothesis-drawn prompts per model (plus the eos-stopped one)
NEW_TOKENS = 5
MAX_LEN = 24
MAX_BATCH = 3


def model_for(name: str):
    return family_model(name) if name in FAMILIES else tiny_model(name)


def _prompt(vocab: int, b: int, p: int, pads: list[int], seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, p), generator=g)
    mask = torch.ones(b, p, dtype=torch.long)
    for i in range(b):
        k = min(pads[i], p - 1)        # left padding, at least one real token
        ids[i, :k] = 0
        mask[i, :k] = 0
    return ids, mask


def greedy_case(name: str, ws: int) -> dict[str, Any]:
    """Greedy tokens of the generator vs model.generate on hypothesis-drawn prompts (batch,
    length, left padding), the cache per rank, and an eos-stopped generation."""
    from hypothesis import Phase, given, settings
    from hypothesis import strategies as st

    model = model_for(name)
    vocab = model.config.vocab_size
    t0 = time.perf_counter()
    gen = fxtp.generator(model, ws, max_len=MAX_LEN, max_batch=MAX_BATCH)
    build_s = time.perf_counter() - t0
    results: list[dict] = []

    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.generate])
    @given(st.integers(1, MAX_BATCH), st.integers(1, 10),
           st.lists(st.integers(0, 6), min_size=MAX_BATCH, max_size=MAX_BATCH),
           st.integers(0, 2 ** 16))
    def run(b, p, pads, seed):
        ids, mask = _prompt(vocab, b, p, pads, seed)
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=0)
        out = gen.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                           pad_token_id=0)
        results.append({"shape": (b, p), "pads": [min(x, p - 1) for x in pads[:b]],
                        "equal": torch.equal(ref, out), "ref": ref.tolist(), "out": out.tolist()})

    run()
    # eos / pad: stop a row at a token greedy decoding is known to produce
    ids, mask = _prompt(vocab, 2, 4, [0, 2], 7)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    eos = int(free[0, 6])
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                         eos_token_id=eos, pad_token_id=0)
    out = gen.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                       eos_token_id=eos, pad_token_id=0)
    cache = gen.cache()
    return {"build_s": build_s, "examples": results,
            "eos": {"equal": torch.equal(ref, out), "ref": ref.tolist(), "out": out.tolist()},
            "cache_shapes": {k: tuple(v.shape) for k, v in cache.items()},
            "cache_bytes": gen.cache_bytes(), "full_cache_bytes": gen.full_cache_bytes,
            "all_reduces": len(gen.info.all_reduce_nodes)}


_LLAMA: dict[int, Any] = {}


def llama_generator(ws: int):
    """One Llama generator (max_batch 2) shared by the sampling, error and compile cases."""
    if ws not in _LLAMA:
        model = model_for("llama")
        _LLAMA[ws] = (model, fxtp.generator(model, ws, max_len=MAX_LEN, max_batch=2))
    return _LLAMA[ws]


def sampling_case(ws: int) -> dict[str, Any]:
    """Sampling with the same seed on every rank: temperature, top-k, top-p (HF's warpers)."""
    model, gen = llama_generator(ws)
    ids, mask = _prompt(model.config.vocab_size, 2, 5, [0, 2], 3)
    kw = dict(max_new_tokens=8, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, pad_token_id=0)
    torch.manual_seed(1234)
    out = gen.generate(ids, attention_mask=mask, **kw)
    torch.manual_seed(1234)
    ref = model.generate(ids, attention_mask=mask, **kw)
    torch.manual_seed(99)
    other = gen.generate(ids, attention_mask=mask, **kw)
    return {"tokens": out.tolist(), "hf_tokens": ref.tolist(), "other_seed": other.tolist()}


def _error(fn) -> str:
    try:
        fn()
    except fxtp.FxtpError as e:
        return f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - reported, the test decides
        return f"unexpected {type(e).__name__}: {e}"
    return "no error"


def error_case(rank: int, ws: int) -> dict[str, Any]:
    model, gen = llama_generator(ws)
    ids, mask = _prompt(model.config.vocab_size, 2, 6, [0, 0], 5)
    out = {
        "overflow": _error(lambda: gen.generate(ids, max_new_tokens=MAX_LEN - 4)),
        "batch": _error(lambda: gen.generate(torch.ones(3, 4, dtype=torch.long), max_new_tokens=2)),
        "no_head": _error(lambda: fxtp.generator(fxtp.testing.models.tiny_model("bert"), ws)),
        "beams": _error(lambda: gen.generate(ids, max_new_tokens=2, num_beams=2)),
    }
    # rank 1 gets another prompt: every rank must report it (one all-reduce), none may hang
    other = ids.clone()
    if rank == 1:
        other[0, 0] += 1
    out["mismatch"] = _error(lambda: gen.generate(other, max_new_tokens=2))
    out["step_tp_generate"] = _error(lambda: gen.tp.generate(ids, max_new_tokens=2))
    # the ranks are still in step afterwards
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    out["after"] = torch.equal(ref, gen.generate(ids, attention_mask=mask, max_new_tokens=4,
                                                 pad_token_id=0))
    return out


def compile_case(ws: int) -> dict[str, Any]:
    """The step under torch.compile(fullgraph=True): frames compiled for the first prefill,
    the decode steps and a prompt of a new length; none added by further decode steps."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model, gen = llama_generator(ws)
    counter = CompileCounterWithBackend("eager")
    gen.compile(backend=counter)
    counts, equal = [], []
    for p, n in ((5, 2), (5, 6), (7, 2), (3, 4)):
        ids, mask = _prompt(model.config.vocab_size, 2, p, [0, 1], p)
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
        out = gen.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
        equal.append(torch.equal(ref, out))
        counts.append(counter.frame_count)
    # the compiled step under the replay path (static buffers, "capture" after warm-up): a
    # batch of one compiles its shapes once, later calls and tokens compile nothing
    gen.cuda_graph = "emulate"
    replay_counts = []
    for b in (2, 1, 1, 2):
        ids, mask = _prompt(model.config.vocab_size, b, 5, [0, 1], 9)
        kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        equal.append(torch.equal(model.generate(ids, **kw), gen.generate(ids, **kw)))
        replay_counts.append(counter.frame_count)
    gen.cuda_graph = None
    return {"frame_counts": counts, "equal": equal, "replay_frame_counts": replay_counts}


def replay_case(ws: int) -> dict[str, Any]:
    """The decode path CUDA graphs use, emulated on CPU: static buffers per batch bucket, a
    capture after warm-up at the first decode step of a bucket, replays after it; dropped and
    made again when a weight moves. Also: a batch of one on a max_batch generator runs one row
    (the cache view the step writes)."""
    model, gen = llama_generator(ws)
    vocab = model.config.vocab_size
    out: dict[str, Any] = {"equal": [], "captures": []}
    gen.cuda_graph = "emulate"
    try:
        for b, p, seed in ((1, 4, 1), (2, 6, 2), (1, 3, 3), (2, 5, 4)):
            ids, mask = _prompt(vocab, b, p, [0, 2], seed)
            kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
            out["equal"].append(torch.equal(model.generate(ids, **kw), gen.generate(ids, **kw)))
            out["captures"].append(gen._replay.captures)
        out["buckets"] = sorted(gen._replay._buckets)
        out["warmups"] = [bk.warmups for _, bk in sorted(gen._replay._buckets.items())]
        # a weight replaced by a new tensor (as a load or .to() does): graphs captured again
        name, p = next(iter(gen.tp.named_parameters()))
        owner, _, leaf = name.rpartition(".")
        setattr(gen.tp.get_submodule(owner), leaf, torch.nn.Parameter(p.detach().clone(),
                                                                      requires_grad=False))
        ids, mask = _prompt(vocab, 1, 4, [0], 1)
        kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
        out["equal_after_move"] = torch.equal(model.generate(ids, **kw), gen.generate(ids, **kw))
        out["captures_after_move"] = gen._replay.captures
        # sampling through the replay path: HF's samples with the same seed
        ids, mask = _prompt(vocab, 2, 5, [0, 2], 3)
        kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=20, pad_token_id=0)
        torch.manual_seed(7)
        sampled = gen.generate(ids, **kw)
        torch.manual_seed(7)
        out["sampling_equal"] = torch.equal(sampled, model.generate(ids, **kw))
        # no tensor made on a default device: under a meta default device a leak would fail
        with torch.device("meta"):
            leak = gen.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0)
        out["device_under_meta_default"] = str(leak.device)
        gen.cuda_graph = True
        out["graph_on_cpu"] = _error(lambda: gen.generate(ids, max_new_tokens=2, pad_token_id=0))
        out["bad_mode"] = _error(lambda: fxtp.generator(model, ws, cuda_graph="yes"))
    finally:
        gen.cuda_graph = None
    # eager: a batch of one on this max_batch 2 generator runs on one cache row
    seen = []
    hook = gen.tp.register_forward_pre_hook(lambda mod, args: seen.append(
        (tuple(args[0].shape), tuple(next(iter(gen._rows.tensors())).shape))))
    try:
        ids, mask = _prompt(vocab, 1, 4, [0], 5)
        gen.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0)
    finally:
        hook.remove()
    out["eager_rows"] = seen
    out["cache_after"] = [tuple(t.shape) for t in gen._rows.tensors()]
    return out


def meta_case(ws: int, ckpt: str) -> dict[str, Any]:
    """A generator of a Llama built under fxtp.init_empty(): the capture runs on meta (graph
    and cache meta, no CPU/CUDA device baked in), generate refuses until loaded; then
    fxtp.load(gen, ckpt) fills it and it decodes what the model that wrote the checkpoint
    decodes."""
    with fxtp.init_empty():
        empty = model_for("llama")
    gen = fxtp.generator(empty, ws, max_len=MAX_LEN, max_batch=2)
    baked = sorted({str(a) for n in gen.tp.graph.nodes
                    for a in list(n.args) + list(n.kwargs.values()) if isinstance(a, torch.device)})
    out: dict[str, Any] = {
        "param_devices": sorted({str(p.device) for p in gen.tp.parameters()}),
        "cache_devices": sorted({str(t.device) for t in gen.cache().values()}),
        "baked_devices": baked,
        "before_load": _error(lambda: gen.generate(torch.ones(1, 3, dtype=torch.long),
                                                   max_new_tokens=2)),
    }
    try:
        fxtp.load(gen, ckpt)
    except Exception as e:  # noqa: BLE001 - reported, the test decides
        out["load_error"] = f"{type(e).__name__}: {e}"
        return out
    model = model_for("llama")
    ids, mask = _prompt(model.config.vocab_size, 2, 5, [0, 2], 13)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref, got = model.generate(ids, **kw), gen.generate(ids, **kw)
    out.update(equal=torch.equal(ref, got), ref=ref.tolist(), out=got.tolist(),
               loaded_cache_devices=sorted({str(t.device) for t in gen.cache().values()}))
    return out


def lora_case(ws: int) -> dict[str, Any]:
    """A PEFT LoRA model: the generator folds the adapters into the local shards."""
    from .train_workers import lora_model

    model = lora_model("llama")
    gen = fxtp.generator(model, ws, max_len=MAX_LEN, max_batch=2)
    ids, mask = _prompt(model.config.vocab_size, 2, 5, [0, 2], 11)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                             pad_token_id=0)
    out = gen.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    result = {"equal": torch.equal(ref, out), "ref": ref.tolist(), "out": out.tolist(),
              "folded": gen.info.state.lora_fold is not None}
    result.update(_hybrid_round(model, gen, ws, ids, mask))
    return result


_LORA: dict[int, Any] = {}


def _hybrid_round(model, gen, ws: int, ids, mask) -> dict[str, Any]:
    """The RLHF loop: an optimizer step on the adapters of the training graph, the same step on
    the PEFT model, then gen.load_weights(tp): the generator decodes what the stepped model
    decodes (a large step, so the tokens change)."""
    tp = fxtp.for_training(fxtp.transform(model, ws))
    batch = torch.randint(1, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(5))
    for m in (model, tp):
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=3.0)
        logits = m(input_ids=batch).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.flatten()).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    stale = gen.generate(ids, **kw)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, **kw)
    fresh = gen.load_weights(tp).generate(ids, **kw)
    folded_error = _error(lambda: gen.load_weights(fxtp.for_generation(tp)))
    _LORA[ws] = (model, tp)         # tp.generate's LoRA case continues with both
    return {"hybrid_equal": torch.equal(ref, fresh), "hybrid_changed": not torch.equal(stale, fresh),
            "hybrid_ref": ref.tolist(), "hybrid_out": fresh.tolist(),
            "hybrid_folded_error": folded_error}


def write_checkpoint(root: str) -> str:
    """In the test process: the Llama of model_for("llama") (fixed seed) as save_pretrained
    writes it, read by every rank's meta case."""
    import os

    path = os.path.join(root, "llama")
    model_for("llama").save_pretrained(path, safe_serialization=True)
    return path


def run_all(rank: int, ws: int, ckpt: str) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    cases = {f"greedy_{n}": (lambda n=n: greedy_case(n, ws)) for n in GREEDY_CASES}
    cases.update(sampling=lambda: sampling_case(ws), errors=lambda: error_case(rank, ws),
                 replay=lambda: replay_case(ws), compile=lambda: compile_case(ws),
                 meta=lambda: meta_case(ws, ckpt), lora=lambda: lora_case(ws))
    cases.update(tp_cases(rank, ws, ckpt))
    return _run_timed(cases)


# ---------------------------------------------------------------------------------------------
# tp.generate: generation on the result of fxtp.transform (fxtp/generation/tp_generate.py). Run in the
# world-2 spawn (run_all), world 1 on one-rank groups inside it (tp_cases).

def _train_both(model, tp, lr: float) -> None:
    """One SGD step on the same batch, on the model and on tp (in training mode): what the
    next tp.generate decodes with. Only parameters that train (LoRA: the adapters)."""
    fxtp.for_training(tp)
    batch = torch.randint(1, model.config.vocab_size, (2, 7),
                          generator=torch.Generator().manual_seed(5))
    for m in (model, tp):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=lr)
        logits = m(input_ids=batch).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.flatten()).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _tokens(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(input_ids=ids, **kw)


def caches_of(tp) -> list[torch.Tensor]:
    return list(tp.generate.generator.cache().values())


def _step_facts(tp) -> dict[str, Any]:
    """How the decode step holds its tensors: every parameter is tp's own object (same data
    pointer), and no weight storage of the step is outside tp's (the KV cache aside)."""
    step = tp.generate.generator.tp
    mine = dict(tp.named_parameters(remove_duplicate=False))
    steps = dict(step.named_parameters(remove_duplicate=False))
    storages = {t.untyped_storage().data_ptr() for t in [*tp.parameters(), *tp.buffers()]}
    caches = {id(t) for t in caches_of(tp)}
    extra = sum(t.nbytes for t in {id(t): t for t in tensor_attrs(step).values()}.values()
                if id(t) not in caches and t.untyped_storage().data_ptr() not in storages)
    same = sorted(steps) == sorted(mine) and all(p is mine[n] for n, p in steps.items())
    return {"same_objects": same,
            "same_ptrs": all(p.data_ptr() == mine[n].data_ptr() for n, p in steps.items()),
            "extra_bytes": extra,
            "cache_devices": sorted({str(t.device) for t in caches_of(tp)})}


def tp_generate_case(ws: int, ckpt: str, group=None, rebuild: bool = True) -> dict[str, Any]:
    """A Llama built under fxtp.init_empty(), tp = fxtp.transform(it, ws), then
    fxtp.load(tp, ckpt, device=): tp.generate refuses before the load; after it, its tokens are
    model.generate's (the model that wrote the checkpoint). The step: built at the first call
    and sized from it, following a second load (new tensors) without building again, reused
    by smaller calls and another cuda_graph mode, rebuilt larger for a larger call, explicit
    sizes; its tensors are tp's; an optimizer step on tp is decoded at once; a step whose
    plan slices a tensor differently is refused (world size > 1: at 1 nothing is sliced).
    (A model with weights goes through the LoRA case and tests/test_device_dtype.py.)
    `rebuild=False` skips the larger call that builds a second step (rank-independent logic:
    world 1 leaves it to world 2, a capture less)."""
    from transformers import AutoModelForCausalLM

    model = model_for("llama")
    vocab = model.config.vocab_size
    with fxtp.init_empty():
        empty = AutoModelForCausalLM.from_config(model.config)
    tp = fxtp.transform(empty, ws, group=group)
    out: dict[str, Any] = {"equal": [], "sizes": [], "before": (tp.generate.generator is None,
                                                                tp.generate.builds)}

    def check(b, p, new, seed, **extra):
        ids, mask = _prompt(vocab, b, p, [0, 2, 1], seed)
        kw = dict(attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0)
        t = time.perf_counter()
        got = tp.generate(ids, **kw, **extra)
        out.setdefault("call_s", []).append(round(time.perf_counter() - t, 3))
        out["equal"].append(torch.equal(got, _tokens(model, ids, **kw)))
        out["sizes"].append((tp.generate.max_len, tp.generate.max_batch, tp.generate.builds))
        return ids, kw, got

    out["before_load"] = _error(lambda: tp.generate(torch.ones(1, 3, dtype=torch.long),
                                                    max_new_tokens=2))
    fxtp.load(tp, ckpt, device="cpu")
    ids, kw, first = check(2, 5, 6, 1)                 # built: (64, 2)
    out["facts"] = _step_facts(tp)
    old = dict(tp.named_parameters())
    fxtp.load(tp, ckpt, device="cpu")                  # new tensors: the step follows them
    out["replaced"] = all(p is not old[n] for n, p in tp.named_parameters())
    check(1, 3, 4, 2)                                  # fits: reused, rebound
    out["facts_after_reload"] = _step_facts(tp)
    check(2, 4, 5, 3, cuda_graph="emulate")            # the same step, replayed
    out["emulate_captures"] = tp.generate.generator._replay.captures
    check(1, 4, 3, 4)                                  # back to eager
    out["mode_after"] = tp.generate.generator.decode_mode
    out["overflow"] = _error(lambda: tp.generate(ids, max_new_tokens=20, max_len=16))
    out["explicit_batch"] = _error(lambda: tp.generate(ids, max_new_tokens=2, max_batch=1))
    out["bad_size"] = _error(lambda: tp.generate(ids, max_new_tokens=2, max_len=0))
    if ws > 1:      # rank 1 asks for a longer prompt: both ranks refuse, none builds or hangs
        import torch.distributed as dist

        longer = _prompt(vocab, 1, 4 if dist.get_rank() == 1 else 3, [0], 7)[0]
        out["mismatch"] = _error(lambda: tp.generate(longer, max_new_tokens=2))
    if rebuild:
        check(3, 60, 6, 5)                             # needs 65 x 3: rebuilt as (128, 4)
    check(2, 6, 8, 6, max_len=64, max_batch=2)         # explicit, not larger: reused
    out["facts_after_rebuild"] = _step_facts(tp)
    # training: an optimizer step on tp (and the same on the model) is decoded at once
    _train_both(model, tp, lr=1.0)
    got = tp.generate(ids, **kw)
    out["trained_equal"] = torch.equal(got, _tokens(model, ids, **kw))
    out["trained_changed"] = not torch.equal(got, first)
    out["still_training"] = tp.training
    # a decode step whose plan slices a tensor differently from tp: refused, nothing copied
    # (the check a build makes, run on the built step against a tampered record of tp's)
    info = tp.meta["fxtp"]
    name = next(iter(info.param_slices), None)
    if name is not None:
        saved = info.param_slices[name]
        info.param_slices[name] = (saved[0], ((0, 1),))
        try:
            probe = TPGenerate(tp, None, None)
            out["sliced_differently"] = _error(lambda: probe._match(tp, tp.generate.generator.tp))
        finally:
            info.param_slices[name] = saved
    return out


def tp_generate_lora_case(ws: int, group=None) -> dict[str, Any]:
    """A PEFT LoRA model: tp.generate folds the adapters into tp's (shared) base shards for the
    call and unfolds them after it: tp's weights bit for bit as before, its forward the same,
    not folded, no saved copy kept. A tp the user folded is decoded as it is and stays folded.
    An optimizer step on the adapters is decoded at once. At world 2 the model and graph of
    the generator's hybrid round (lora_case, run before) are reused: no second capture."""
    from .train_workers import lora_model

    model, tp = _LORA.pop(ws, (None, None)) if group is None else (None, None)
    if tp is None:
        model = lora_model("llama")
        tp = fxtp.transform(model, ws, group=group)
    if tp.meta["fxtp"].state.lora_fold is not None:      # the hybrid round leaves it folded
        fxtp.unfold_lora(tp)
    tp.eval()
    ids, mask = _prompt(model.config.vocab_size, 2, 5, [0, 2], 11)
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    weights = {n: p.detach().clone() for n, p in tp.named_parameters()}
    with torch.no_grad():
        forward = tp(input_ids=ids, attention_mask=mask).logits
    ref = _tokens(model, ids, **kw)
    got = tp.generate(ids, **kw)
    info = tp.meta["fxtp"]
    out: dict[str, Any] = {
        "equal": torch.equal(got, ref), "ref": ref.tolist(), "out": got.tolist(),
        "bitwise": all(torch.equal(weights[n], p) for n, p in tp.named_parameters()),
        "folded_after": info.state.lora_fold is not None,
        "saved_copies": (len(info.state.lora_last_fold.originals) if info.state.lora_last_fold
                         else 0),
        "facts": _step_facts(tp),
    }
    with torch.no_grad():
        out["forward_same"] = torch.equal(tp(input_ids=ids, attention_mask=mask).logits, forward)
    fxtp.fold_lora(tp)
    out["user_folded_equal"] = torch.equal(tp.generate(ids, **kw), ref)
    out["user_folded_kept"] = info.state.lora_fold is not None
    fxtp.unfold_lora(tp)
    out["bitwise_after_user_fold"] = all(torch.equal(weights[n], p)
                                         for n, p in tp.named_parameters())
    # training the adapters (RLHF): the next call decodes the stepped adapters
    _train_both(model, tp, lr=3.0)
    got = tp.generate(ids, **kw)
    out["trained_equal"] = torch.equal(got, _tokens(model, ids, **kw))
    out["trained_changed"] = not torch.equal(got, ref)
    out["builds"] = tp.generate.builds
    return out


def tp_cases(rank: int, ws: int, ckpt: str) -> dict[str, Any]:
    """tp.generate's cases: at world `ws`, and at world 1 on a group of one rank each, in
    parallel: rank 0 runs the LoRA case, rank 1 the Llama case (world 1 without a group:
    test_device_dtype). Makes the one-rank groups (a collective) when called."""
    import torch.distributed as dist

    cases = {"tp_generate": lambda: tp_generate_case(ws, ckpt),
             "tp_generate_lora": lambda: tp_generate_lora_case(ws)}
    one, _ = dist.new_subgroups(group_size=1)
    if rank == 0:
        cases["tp_generate_lora_1"] = lambda: tp_generate_lora_case(1, one)
    if rank == 1:
        cases["tp_generate_1"] = lambda: tp_generate_case(1, ckpt, one, rebuild=False)
    return cases
