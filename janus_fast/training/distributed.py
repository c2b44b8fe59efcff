"""Process setup under torchrun, FSDP2 sharding and per-layer activation checkpointing.

FSDP2 (`torch.distributed.fsdp.fully_shard`): one unit per LLM decoder layer (and per SigLIP
block), the rest of the model in the root unit; parameters stay fp32 (sharded master weights) and are all-gathered in the
compute dtype of the MixedPrecisionPolicy, gradients reduced in fp32. Without torchrun
(WORLD_SIZE unset or 1) nothing is distributed.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint


@dataclass
class Topology:
    rank: int
    world: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group, all ranks together: a rank that exits while the gloo threads
        still talk to a peer dies in std::terminate (SIGABRT) after training finished."""
        if self.distributed and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def init_distributed(device: str | None = None) -> Topology:
    """The process group from torchrun's environment (nccl on CUDA, gloo on the CPU) and this
    rank's device; a single process when WORLD_SIZE is unset or 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if world == 1:
        return Topology(0, 1, torch.device(device or ("cuda" if use_cuda else "cpu")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank()
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return Topology(rank, world, torch.device("cuda", local))
    return Topology(rank, world, torch.device("cpu"))


ACTIVATION_CHECKPOINTING = ("selective", "full", "none")


def checkpoint_layers(layers, mode: str = "full") -> None:
    """Activation checkpointing of the LLM's decoder layers (memory per mode: models/packed_layer.py).
    "selective": each layer keeps its GEMM and attention outputs and recomputes only the cheap
    elementwise work (its two norms' outputs and SiLU·mul) in the backward. "full": each layer
    keeps only its inputs and recomputes everything in the backward; its forward is wrapped in
    place, so parameter names (and checkpoints) do not change, and FSDP's hooks stay outside the
    recomputed region. "none": every activation is kept."""
    if mode not in ACTIVATION_CHECKPOINTING:
        raise ValueError(f"activation_checkpointing must be one of {ACTIVATION_CHECKPOINTING}, got {mode!r}")
    for layer in layers:
        layer.recompute_elementwise = mode == "selective"
        if mode == "full":
            layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def shard_model(model, topology: Topology, compute_dtype: torch.dtype):
    """FSDP2 over all ranks: each LLM decoder layer and each SigLIP block a unit, the VQ model a
    unit of its own (training never calls it, so it is never gathered), the rest the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(topology.device.type, (topology.world,))
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    units = [*model.language_model.model.layers, *model.vision_model.vision_tower.blocks, model.gen_vision_model]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def all_reduce_sum(t: torch.Tensor, topology: Topology) -> torch.Tensor:
    if topology.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t
