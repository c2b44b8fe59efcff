"""Run under torchrun by test_training_distributed.py: one step of the tiny model (config file
argv[1]), recording the gradient bytes each rank holds when micro-batch 2's forward starts, i.e.
after micro-batch 1's backward; rank 0 writes them to argv[2] as JSON."""

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from janus_fast.training import TrainConfig, Trainer


def held_gradient_bytes(model) -> tuple[int, int]:
    """(bytes of this rank's gradient shards, bytes of unsharded gradients FSDP2 keeps), read
    from FSDP2's parameter groups (private attributes: a test's view)."""
    sharded = unsharded = 0
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        for group in module._get_fsdp_state()._fsdp_param_groups:
            for param in group.fsdp_params:
                if param.sharded_param.grad is not None:
                    sharded += param.sharded_param.grad.to_local().nbytes
                full = getattr(param, "_unsharded_param", None)
                for grad in (param.unsharded_accumulated_grad, full.grad if full is not None else None):
                    if grad is not None:
                        unsharded += grad.nbytes
    return sharded, unsharded


def main(config_file: str, result: str) -> None:
    trainer = Trainer(TrainConfig.from_file(config_file))
    seen = []
    trainer.model.register_forward_pre_hook(lambda module, args: seen.append(held_gradient_bytes(module)))
    trainer.train_step()
    mine = {"sharded": seen[1][0], "unsharded": seen[1][1]}
    everyone = [None] * trainer.topology.world
    dist.all_gather_object(everyone, mine)
    if trainer.topology.main:
        trained = sum(p.numel() * p.element_size() for p in trainer.params)
        Path(result).write_text(json.dumps({"trained_bytes": trained, "ranks": everyone}))
    trainer.close()
    trainer.topology.close()
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:3])
