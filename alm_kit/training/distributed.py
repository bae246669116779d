"""One engine on one device or under ``torchrun``: process group, DDP / FSDP2 wrapping, the few collectives.

``torchrun --nproc_per_node N -m alm_kit train R.yaml`` sets ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK``; the engine then joins a process group (NCCL on CUDA, gloo on the CPU), each rank
reads its own slice of the batches, and gradients are averaged across ranks: by
``DistributedDataParallel`` (``training.strategy: ddp``) or by sharding parameters, gradients and
optimizer state with PyTorch's ``fully_shard`` (``training.strategy: fsdp``). Only rank 0 writes
files.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from alm_kit.parallel import Ranks
from alm_kit.runtime import resolve_device


@dataclass(frozen=True)
class World(Ranks):
    """This rank's place in a training run: :class:`~alm_kit.parallel.Ranks` plus the strategy."""

    strategy: str = "ddp"
    #: whether the engine started the process group (and so ends it)
    owns_group: bool = False

    @property
    def sharded(self) -> bool:
        return self.enabled and self.strategy == "fsdp"


def setup(device_name: str, strategy: str) -> tuple[World, torch.device]:
    """Join the torchrun process group when there is one; the device of this rank."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(strategy=strategy), resolve_device(device_name)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), local_rank, strategy, owns), device


def teardown(world: World) -> None:
    if world.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, world: World) -> nn.Module:
    """The module to call for the training forward pass (``model`` itself on one process).

    FSDP shards each transformer block of the decoder (the classes transformers lists in
    ``_no_split_modules``) as its own unit and everything else as the root unit; the root's
    parameters are gathered when ``model(batch)`` runs, which covers the encoders, projector and
    the decoder's embeddings that the model calls directly.
    """
    if not world.enabled:
        return model
    if world.strategy == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            raise RuntimeError("training.strategy: fsdp needs torch >= 2.6 (torch.distributed.fsdp.fully_shard)") \
                from None
        # frozen encoders (and fusion) stay whole on every rank: nothing to synchronise, no gathering
        ignored = {p for path, (module, spec) in model.components().items()
                   if spec.train == "frozen" and path != "decoder" for p in module.parameters()
                   if not p.requires_grad}  # `trainable` parameters of a frozen component are sharded
        for param in model.parameters():
            if param not in ignored and not param.is_contiguous():
                param.data = param.data.contiguous()  # fully_shard refuses strided parameters
        blocks = set(getattr(model.decoder.language_model, "_no_split_modules", None) or ())
        for module in list(model.modules()):
            if type(module).__name__ in blocks:
                fully_shard(module)
        fully_shard(model, ignored_params=ignored)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)


def gradient_sync(wrapped: nn.Module, world: World, sync: bool):
    """Skip the gradient all-reduce on micro-batches that only accumulate."""
    if not world.enabled:
        return nullcontext()
    if world.sharded:
        wrapped.set_requires_gradient_sync(sync)
        return nullcontext()
    return nullcontext() if sync else wrapped.no_sync()


def all_sum(values: list[float] | torch.Tensor, world: World, device: torch.device) -> list[float]:
    tensor = torch.as_tensor(values, dtype=torch.float64, device=device) if not torch.is_tensor(values) \
        else values.to(torch.float64)
    if world.enabled:
        dist.all_reduce(tensor)
    return tensor.tolist()


def gather(obj: Any, world: World) -> list[Any]:
    if not world.enabled:
        return [obj]
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def model_state(model: nn.Module, keys: set[str], world: World) -> dict[str, torch.Tensor]:
    """The checkpoint tensors on rank 0 (a collective under FSDP; other ranks get {})."""
    if world.sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v for k, v in full.items() if k in keys}
    state = model.state_dict()
    return {k: v for k, v in state.items() if k in keys}


def _options(world: World):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=world.sharded, cpu_offload=world.sharded)


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> dict[str, Any]:
    """Optimizer state keyed by parameter name, so it loads under any strategy (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(world))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                         world: World) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_options(world))
