"""How much of transformers' model zoo fxtp shards: every decoder (causal LM) and encoder
(masked LM) model type transformers ships, built tiny and random from its config registry, and
transformed at world 2 by real gloo ranks. Prints one row per model type and the totals:

- pass: outputs equal to the untouched model (1e-4) and the linear parameters near 1/N
  (local fraction <= 1/N + 0.05);
- opaque: exact, but every layer's linears are inside parts torch.export could not capture,
  called whole on every rank (exempt from 1/N; the first opaque part and why);
- under-sharded: exact, but more of the weights stay whole (the first "replicated:" reason);
- not exact: outputs differ (a bug: fxtp must never give a wrong answer);
- run-time error: transformed, but calling it raised (a size the capture fixed, met with
  another input);
- capture failed: `CaptureError` (torch.export could not capture the model);
- error: another exception while transforming (its type and first line);
- could not build: the shrunk config or the model could not be made, or the untouched model
  fails on 2 x 8 tokens (not fxtp's doing);
- timeout: the ranks did not finish within --timeout seconds.

Default configs are full size, so one generic rule shrinks them by their field names (layers,
widths, heads, kv heads, experts, vocab, positions), in nested sub-configs too. Each model runs
in its own pair of ranks (forked from a preloaded forkserver), so a hang or a crash costs that
model only. A bench script, not part of the test suite:

    OMP_NUM_THREADS=1 .venv/bin/python bench/sweep.py [--world-size 2] [--only llama,gpt2]
        [--kinds causal encoder] [--timeout 120] [--examples 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# field name -> the tiny value (a generic rule over config field names, never a model's code)
SHRINK = {
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_decoder_layers",
                     "num_encoder_layers", "decoder_layers", "encoder_layers"), 2),
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "embed_dim", "dim"), 64),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "d_ff", "n_inner", "ffn_hidden_size",
                     "encoder_ffn_dim", "decoder_ffn_dim", "moe_intermediate_size",
                     "shared_expert_intermediate_size", "expert_intermediate_size"), 128),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_heads", "n_heads",
                     "encoder_attention_heads", "decoder_attention_heads"), 4),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "num_experts_per_token"), 2),
    **dict.fromkeys(("vocab_size",), 256),
    **dict.fromkeys(("state_size", "ssm_state_size", "mamba_d_state", "d_state"), 16),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx"), 512),
}
LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
KV_HEADS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num")
HEAD_DIMS = ("head_dim", "kv_channels", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
ROTARY_DIMS = ("rotary_dim",)        # rotated features per head: at most the head dim
TOL = 1e-4


def shrunk_overrides(cfg) -> dict:
    """The overrides that make `cfg` tiny: SHRINK's fields, kv heads 2 (1 where they were 1),
    head dims 16, rotary dims 8, special token ids inside the vocab, per-layer lists cut to
    the layers kept; applied to nested configs (text_config, ...) as dicts."""
    from transformers import PretrainedConfig

    out = {}
    layers = next((v for k, v in vars(cfg).items() if k in LAYER_COUNTS and isinstance(v, int)),
                  None)
    vocab = min(getattr(cfg, "vocab_size", None) or SHRINK["vocab_size"], SHRINK["vocab_size"])
    keep = _layers_kept(cfg, layers)
    if isinstance(getattr(cfg, "use_cache", None), bool):
        out["use_cache"] = False    # the forward is measured; an all-SSM cache cannot answer it
    for key, value in vars(cfg).items():
        if key.endswith("token_id") and isinstance(value, int) and value >= vocab:
            out[key] = vocab - 1            # special tokens inside the smaller vocab
            continue
        if (isinstance(value, list) and layers and len(value) == layers
                and key not in SHRINK and layers > SHRINK["num_hidden_layers"]):
            out[key] = [value[i] for i in keep]     # one entry per layer
            continue
        if (key.endswith(("layer_period", "layer_offset")) and isinstance(value, int)
                and layers and layers > SHRINK["num_hidden_layers"]):
            # hybrids place attention every `period` layers from `offset`: keep one in the cut
            kept = SHRINK["num_hidden_layers"]
            out[key] = min(value, kept) if key.endswith("period") else min(value, kept - 1)
            continue
        if key in SHRINK and isinstance(value, int) and not isinstance(value, bool):
            out[key] = min(value, SHRINK[key])
        elif key in KV_HEADS and isinstance(value, int) and value > 0:
            out[key] = 1 if value == 1 else 2
        elif key in HEAD_DIMS and isinstance(value, int) and value > 0:
            out[key] = 16
        elif key in ROTARY_DIMS and isinstance(value, int) and value > 0:
            out[key] = 8
        elif isinstance(value, PretrainedConfig):
            out[key] = {**value.to_dict(), **shrunk_overrides(value)}
    return out


def _layers_kept(cfg, layers) -> list[int]:
    """Which layers the cut keeps: the first few, or, when a per-layer list names layer kinds
    (a hybrid's "linear_attention" and "full_attention"), the first layer of each kind."""
    kept = SHRINK["num_hidden_layers"]
    first = list(range(kept))
    for value in vars(cfg).values():
        if (isinstance(value, list) and layers and len(value) == layers
                and all(isinstance(v, str) for v in value) and len(set(value)) > 1):
            kinds = sorted({value.index(v) for v in value})[:kept]
            return sorted(kinds + [i for i in first if i not in kinds][:kept - len(kinds)])
    return first


def build(model_type: str, kind: str):
    """The tiny random model of `model_type` (seed 0, eval mode)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    default = AutoConfig.for_model(model_type)
    cfg = AutoConfig.for_model(model_type, **shrunk_overrides(default))
    torch.manual_seed(0)
    cls = AutoModelForCausalLM if kind == "causal" else AutoModelForMaskedLM
    return cls.from_config(cfg).eval()


def one_model(rank: int, world_size: int, model_type: str, kind: str, examples: int) -> dict:
    """In each rank: build, transform, compare; returns the row's fields."""
    import torch

    import fxtp
    from fxtp.capture.export import hf_example_inputs
    from fxtp.testing.checks import check_equivalence
    from fxtp.testing.strategies import hf_inputs_for

    warnings.filterwarnings("ignore")
    try:
        model = build(model_type, kind)
        with torch.no_grad():      # the untouched model runs (a shrunk config may not)
            model(**hf_example_inputs(model, 2, 8))
    except Exception as e:  # noqa: BLE001 - a config or model transformers cannot make tiny
        return {"status": "could not build", "why": _first(e)}
    try:
        tp = fxtp.transform(model, world_size)
    except fxtp.CaptureError as e:
        return {"status": "capture failed", "why": _first(e)}
    except Exception as e:  # noqa: BLE001
        return {"status": "error", "why": f"{type(e).__name__}: {_first(e)}"}
    try:
        rep = check_equivalence(model, tp, hf_inputs_for(model, max_seq=16),
                                max_examples=examples)
    except Exception as e:  # noqa: BLE001 - e.g. a size the capture fixed, on a new input
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        return {"status": "run-time error", "why": f"{type(e).__name__}: "
                + (lines[0] if lines else "")[:140]}
    plan = tp.meta["fxtp"].plan
    layers = {k: v for k, v in plan.all_reduces.items() if "." in k}
    reasons = [f"{m}: {why}" for m, why in plan.replicated.items() if m != "lm_head"]
    fraction = plan.param_fraction()
    from fxtp.planning.plan import layer_of

    in_layers = [e for e in plan.entries if layer_of(e.module)]
    if plan.opaque and not reasons:
        reasons = [f"opaque: {', '.join(list(plan.opaque)[:2])}: {next(iter(plan.opaque.values()))}"]
    if rep.examples == 0 or rep.worst > TOL:
        status = "not exact"
    elif plan.opaque and not in_layers:
        status = "opaque"          # exact; every layer's linears are inside opaque parts
    elif fraction > 1 / world_size + 0.05:
        status = "under-sharded"
    else:
        status = "pass"
    return {"status": status, "error": rep.worst, "fraction": fraction,
            "ar_per_layer": sorted(set(layers.values())), "why": reasons[0] if reasons else ""}


def _first(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:160]


def model_types(kinds: list[str]) -> list[tuple[str, str]]:
    from transformers.models.auto import modeling_auto as auto

    out = [(t, "causal") for t in sorted(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)] \
        if "causal" in kinds else []
    if "encoder" in kinds:
        causal = set(auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
        out += [(t, "encoder") for t in sorted(auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES)
                if t not in causal]
    return out


def main() -> None:
    from fxtp.testing.ranks import RankFailure, run_ranks

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated model types")
    ap.add_argument("--kinds", nargs="+", default=["causal", "encoder"])
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per model")
    ap.add_argument("--examples", type=int, default=3)
    args = ap.parse_args()
    todo = model_types(args.kinds)
    if args.only:
        wanted = set(args.only.split(","))
        todo = [(t, k) for t, k in todo if t in wanted]
    counts: dict[str, int] = {}
    start = time.perf_counter()
    print(f"{'model type':<28} {'kind':<8} {'status':<15} {'max err':>8} {'local':>6} "
          f"{'AR/layer':>9}  first replicated reason / why", flush=True)
    for model_type, kind in todo:
        t0 = time.perf_counter()
        try:
            ranks = run_ranks(one_model, args.world_size, model_type, kind, args.examples,
                              timeout=args.timeout)
            row = ranks[0]
            if any(r["status"] != row["status"] for r in ranks):
                row = {"status": "error", "why": "the ranks disagree: "
                       + ", ".join(r["status"] for r in ranks)}
            elif row["status"] in ("pass", "opaque", "under-sharded", "not exact"):
                row["error"] = max(r["error"] for r in ranks)
        except RankFailure as e:
            timed_out = "did not finish" in str(e)
            last = [ln for ln in str(e).strip().splitlines() if ln.strip()]
            row = {"status": "timeout" if timed_out else "error",
                   "why": (last[-1] if last and not timed_out else _first(e))[:160]}
        except Exception:  # noqa: BLE001 - the sweep goes on
            row = {"status": "error", "why": traceback.format_exc().strip().splitlines()[-1]}
        counts[row["status"]] = counts.get(row["status"], 0) + 1
        numbers = (f"{row['error']:>8.1e} {row['fraction']:>6.3f} {str(row['ar_per_layer']):>9}"
                   if "fraction" in row else f"{'':>8} {'':>6} {'':>9}")
        print(f"{model_type:<28} {kind:<8} {row['status']:<15} {numbers}  {row['why'][:110]}"
              f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    order = ["pass", "opaque", "under-sharded", "not exact", "run-time error", "capture failed", "error",
             "could not build", "timeout"]
    total = sum(counts.values())
    print(f"\n{total} model types at world {args.world_size} in "
          f"{time.perf_counter() - start:.0f} s: "
          + ", ".join(f"{counts.get(k, 0)} {k}" for k in order))


if __name__ == "__main__":
    main()
