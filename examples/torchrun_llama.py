"""Tensor-parallel inference under torchrun: every process builds the same Llama (tiny, random
weights), transforms it for its rank and runs it; rank 0 prints the plan and the check against
the untouched model.

    torchrun --nproc-per-node 2 examples/torchrun_llama.py                  # NCCL on 2 GPUs
    torchrun --nproc-per-node 2 examples/torchrun_llama.py --dtype bf16
    torchrun --nproc-per-node 2 examples/torchrun_llama.py --meta           # meta build + fxtp.load
    torchrun --nproc-per-node 2 examples/torchrun_llama.py --sequence-parallel   # Megatron-SP
    .venv/bin/torchrun --nproc-per-node 2 examples/torchrun_llama.py --backend gloo   # CPU

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; init_process_group reads them
(env://), so several nodes need nothing more than torchrun's own `--nnodes`/`--rdzv-*` options.
The backend defaults to NCCL when CUDA is available (each process on GPU `LOCAL_RANK`), gloo on
the CPU otherwise.

`--meta` is the path for a model too large for one device: the model is built under
`fxtp.init_empty()` (no weight memory), transformed, and every rank reads only its slices of a
checkpoint with `fxtp.load(tp, dir, device=..., dtype=...)`. Here rank 0 first writes that
checkpoint (`save_pretrained` of a model with the same seed) into a temporary directory, or into
`--ckpt DIR` (which must be on a filesystem every node sees when running on several nodes).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

# run from a checkout without installing: the repository root beside this file wins
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxtp  # noqa: E402
from fxtp.testing.models import TINY  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# max |tp - model| over the logits, relative to max(1, max |model|): fp32 is the test suite's
# 1e-4; in 16-bit the row-parallel partial sums are rounded before the all-reduce adds them, so
# the result differs from the unsharded one by a few units in the last place of each layer
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=("nccl", "gloo"),
                    default="nccl" if torch.cuda.is_available() else "gloo",
                    help="process-group backend (default: nccl when CUDA is available, else gloo)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where the model lives: auto = cuda:LOCAL_RANK for nccl, cpu for gloo")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--meta", action="store_true",
                    help="build on meta under fxtp.init_empty(), then fxtp.load a checkpoint")
    ap.add_argument("--ckpt", default=None,
                    help="--meta: checkpoint directory (written by rank 0 if it holds none; "
                         "default: a temporary directory, single node only)")
    ap.add_argument("--sequence-parallel", action="store_true",
                    help="norms and residual adds hold each rank's tokens (Megatron-SP)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def setup(backend: str, device_kind: str) -> tuple[int, int, torch.device]:
    """Initialises the process group and returns (rank, world size, this rank's device).

    For NCCL, the rank's GPU is made current before anything touches CUDA and is passed as
    `device_id`: NCCL then binds the communicator to it eagerly, instead of guessing the device
    on the first collective (and warning, or hanging, when two ranks guess the same GPU)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "auto":
        device_kind = "cuda" if backend == "nccl" else "cpu"
    if backend == "nccl" and device_kind != "cuda":
        raise SystemExit("--backend nccl needs the model on CUDA (--device cuda or auto)")
    if device_kind == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--backend {backend} --device cuda: CUDA is not available on this "
                             "machine; use --backend gloo (CPU)")
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} "
                             "GPU(s) here: start at most that many processes per node")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if backend == "nccl":
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def llama_config():
    """The tiny Llama's config (fxtp/models.py): 4 heads, 2 kv heads, 2 layers."""
    from transformers import AutoConfig

    kwargs = dict(TINY["llama"])
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def build(device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """The same random Llama on every rank: built on the CPU from a seed (identical values
    everywhere), then moved to the rank's device and dtype."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(llama_config()).eval()
    return model.to(device=device, dtype=dtype)


def build_from_checkpoint(rank: int, world_size: int, device: torch.device, dtype: torch.dtype,
                          seed: int, ckpt: Optional[str], sequence_parallel: bool = False
                          ) -> tuple[nn.Module, str, bool]:
    """Meta build -> transform -> fxtp.load: no rank ever holds the full weights (except rank 0
    here, which writes the checkpoint first). Returns (tp, checkpoint dir, dir is temporary)."""
    from transformers import AutoModelForCausalLM

    temporary = ckpt is None
    if rank == 0:
        path = ckpt or tempfile.mkdtemp(prefix="fxtp_example_")
        if not os.path.exists(os.path.join(path, "config.json")):
            build(torch.device("cpu"), dtype, seed).save_pretrained(path)
    else:
        path = ""
    box = [path]
    dist.broadcast_object_list(box, src=0)   # the directory rank 0 chose
    path = box[0]
    dist.barrier()                           # the checkpoint is complete before anyone reads it
    with fxtp.init_empty():                  # parameters on meta, buffers (inv_freq) real
        meta_model = AutoModelForCausalLM.from_config(llama_config(), dtype=dtype).eval()
    tp = fxtp.transform(meta_model, world_size, sequence_parallel=sequence_parallel)
    fxtp.load(tp, path, device=str(device), dtype=dtype)     # e.g. "cuda:3", torch.bfloat16
    return tp, path, temporary


def main(argv: Optional[list[str]] = None) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    rank, world_size, device = setup(args.backend, args.device)
    model = build(device, dtype, args.seed)          # same seed: same weights on every rank
    path, temporary = None, False
    if args.meta:
        tp, path, temporary = build_from_checkpoint(rank, world_size, device, dtype, args.seed,
                                                    args.ckpt, args.sequence_parallel)
    else:
        tp = fxtp.transform(model, world_size, sequence_parallel=args.sequence_parallel)
    if rank == 0:
        print(tp.meta["fxtp"].plan)
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=g).to(device)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0                                  # a left-padded row
    with torch.no_grad():
        logits = tp(input_ids=ids, attention_mask=mask).logits.float()
        reference = model(input_ids=ids, attention_mask=mask).logits.float()
    err = float((logits - reference).abs().max()) / max(1.0, float(reference.abs().max()))
    errors: list = [None] * world_size
    dist.all_gather_object(errors, err)
    if rank == 0:
        where = f"{args.backend}, {device.type}, {args.dtype}"
        where += ", meta + fxtp.load" if args.meta else ""
        where += ", sequence parallel" if args.sequence_parallel else ""
        print(f"world size {world_size} ({where}): max |tp - model| / max(1, |model|) per rank = "
              f"{[f'{e:.2e}' for e in errors]}")
        tol = TOLERANCE[dtype]
        print("OK" if max(errors) <= tol else f"MISMATCH (tolerance {tol:g})")
    dist.barrier()  # let every rank finish its collectives before the group is torn down
    if rank == 0 and temporary and path:
        shutil.rmtree(path, ignore_errors=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
