"""Tensor-parallel inference under torchrun: each process builds the same (tiny, random) Llama,
transforms it for its rank and runs it; rank 0 prints the plan and the check.

    .venv/bin/torchrun --nproc-per-node 2 examples/torchrun_llama.py

torchrun sets RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; init_process_group reads them (env://).
Use backend "nccl" and move the model to the rank's GPU for real runs.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

import fxtp
from fxtp.models import tiny_model


def main() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model = tiny_model("llama")                  # same seed, same weights on every rank
    tp = fxtp.transform(model, world_size)
    if rank == 0:
        print(tp.meta["fxtp"].plan)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = tp(input_ids=ids).logits
        reference = model(input_ids=ids).logits
    err = float((logits - reference).abs().max())
    errors = [None] * world_size
    dist.all_gather_object(errors, err)
    if rank == 0:
        print(f"world size {world_size}: max |tp - model| per rank = {errors}")
        print("OK" if max(errors) < 1e-4 else "MISMATCH")
    dist.barrier()  # let every rank finish its collectives before the group is torn down
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
