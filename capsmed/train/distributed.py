"""Data-parallel training under ``torchrun``: the process group, rank 0's decisions, the DDP wrapper.

``capsmed train`` runs unchanged under ``torchrun --nproc_per_node N`` (one node) and under
``torchrun --nnodes M --rdzv_backend c10d`` (several). torchrun's environment (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) starts the process group
(:func:`init_distributed`): gloo on the CPU, NCCL on CUDA, each process on GPU ``LOCAL_RANK``.
Without torchrun (``WORLD_SIZE`` unset or 1) nothing changes and no process group is made.

What the training loop does with it (:mod:`capsmed.train.loop`):

- The training forward runs through :class:`TrainStep` wrapped in
  ``DistributedDataParallel``, so gradients are averaged over the processes. ``TrainStep``
  returns the loss, not the model's outputs, so that DDP's search for parameters that the loss
  leaves unused (a decoder whose reconstruction weight is 0) starts from the loss;
  :func:`unused_parameters` finds them once, by a backward pass on a zero batch, and DDP then
  runs with ``find_unused_parameters`` exactly when there are some.
- ``train.batch_size`` is the global batch: each process takes ``batch_size / N`` cases of a
  ``DistributedSampler`` shard (``set_epoch`` every epoch). With equal shards the averaged
  gradient is the gradient of the union batch, for models without batch statistics.
- BatchNorm keeps per-process batch statistics (no SyncBatchNorm: it runs on CUDA only, and the
  same code must run on gloo); DDP broadcasts rank 0's running statistics before every forward,
  so the checkpointed statistics are rank 0's.
- Rank 0 reads the clock and decides: the elapsed fraction of training (which sets the learning
  rate) every step, the validation, the epoch's seconds and the stop, all broadcast
  (:meth:`Distributed.from_main`); no other rank reads a clock, so every rank stops at the same
  epoch.
- Validation is sharded: rank ``r`` scores the validation cases ``r, r + N, ...`` and every
  rank gathers every case's score, so the metric is that of one process (to float rounding).
- Only rank 0 writes checkpoints, ``history.csv``, ``train.json``, ``inference.json`` and the
  log file; every rank reads ``last.pt`` to resume.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn

__all__ = ["Distributed", "TrainStep", "init_distributed", "unused_parameters", "world_from_env"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


def world_from_env() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment; ``(0, 1, 0)`` without it."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = int(os.environ.get("RANK", "0") or 0)
    local = int(os.environ.get("LOCAL_RANK", str(rank)) or 0)
    return rank, world, local


@dataclass(frozen=True)
class Distributed:
    """This process's place among the training processes, and rank 0's decisions shared with all.

    Attributes:
        rank: This process's rank (0 is the one that reads the clock and writes files).
        world_size: Number of processes; 1 without torchrun.
        local_rank: Rank on this node (the GPU index on CUDA).
        device: Where collective tensors live (the process's GPU with NCCL, else the CPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def active(self) -> bool:
        """Whether several processes train together."""
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Whether this is rank 0."""
        return self.rank == 0

    def from_main(self, compute: Callable[[], T]) -> T:
        """``compute()`` on rank 0, its value broadcast to every rank (any picklable value).

        Other ranks never call ``compute``, so a clock read inside it is rank 0's alone.
        """
        if not self.active:
            return compute()
        box = [compute() if self.main else None]
        torch.distributed.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def float_from_main(self, compute: Callable[[], float]) -> float:
        """:meth:`from_main` for one float, as a float64 tensor broadcast (cheap: every step)."""
        if not self.active:
            return float(compute())
        value = torch.tensor([compute() if self.main else 0.0], dtype=torch.float64,
                             device=self.device)
        torch.distributed.broadcast(value, src=0)
        return float(value.item())

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the processes (float64)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait for every process (no-op for one)."""
        if self.active:
            torch.distributed.barrier()

    def shard(self, items: list[T]) -> list[T]:
        """This rank's share of ``items``: indices ``rank, rank + N, ...``."""
        return items[self.rank::self.world_size] if self.active else list(items)


def init_distributed(device: torch.device) -> tuple[Distributed, torch.device]:
    """Join torchrun's process group (a no-op without torchrun).

    Args:
        device: The device chosen from the config (``select_device``). CUDA means NCCL and the
            process's own GPU (``cuda:LOCAL_RANK``); the CPU means gloo.

    Returns:
        ``(dist, device)``: the process's :class:`Distributed` and the device it trains on.

    Raises:
        ValueError: When ``LOCAL_RANK`` names a GPU this node does not have.
    """
    rank, world, local = world_from_env()
    if world <= 1:
        return Distributed(device=device if device.type == "cuda" else torch.device("cpu")), device
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local} needs GPU {local}, but this node has "
                             f"{torch.cuda.device_count()}: one process per GPU")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend=backend, rank=rank, world_size=world)
    logger.info("process %d of %d (local rank %d), backend %s, device %s", rank, world, local,
                backend, device)
    return Distributed(rank=rank, world_size=world, local_rank=local,
                       device=device if backend == "nccl" else torch.device("cpu")), device


def close_distributed() -> None:
    """Leave the process group if this process made one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


class TrainStep(nn.Module):
    """The model's training forward and its loss, as one module for DDP to wrap.

    The loop used to call ``model.forward_train`` directly; under DDP that bypasses the wrapper
    and no gradient is averaged. Wrapped in ``DistributedDataParallel`` this module's forward
    is the wrapper's, and it returns the loss alone, the root DDP searches for unused
    parameters from.

    Args:
        model: A capsmed model (``forward_train(image, target) -> dict``).
        loss_fn: ``loss_fn(outputs, target, image) -> scalar``.
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Loss of one batch.

        Args:
            image: ``(B, C, *spatial)``.
            target: ``(B,)`` class indices or ``(B, 1, *spatial)`` labels.

        Returns:
            The scalar loss.
        """
        return self.loss_fn(self.model.forward_train(image, target), target, image)


def unused_parameters(step: TrainStep, image_shape: tuple[int, ...], task: str,
                      device: torch.device) -> list[str]:
    """Names of the parameters the loss does not reach, by one backward pass on a zero batch.

    Which parameters the loss reaches depends on the model and the loss weights, not on the
    data (a decoder is unused when the reconstruction weight is 0). Weights and buffers
    (batch-norm statistics) are left as they were; the random state is not (every epoch re-seeds
    it).

    Args:
        step: The model and loss.
        image_shape: ``(B, C, *spatial)`` of a training batch.
        task: ``"segmentation"`` or ``"classification"``.
        device: Where the model is.

    Returns:
        Parameter names (of ``step.model``) that get no gradient.
    """
    named = [(n, p) for n, p in step.model.named_parameters() if p.requires_grad]
    image = torch.zeros(image_shape, device=device, dtype=named[0][1].dtype if named else None)
    if task == "segmentation":
        target = torch.zeros((image_shape[0], 1, *image_shape[2:]), dtype=torch.long,
                             device=device)
    else:
        target = torch.zeros(image_shape[0], dtype=torch.long, device=device)
    was_training = step.training
    buffers = {n: b.detach().clone() for n, b in step.model.named_buffers()}
    step.train()
    try:
        loss = step(image, target)
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    finally:
        with torch.no_grad():  # batch-norm statistics as they were
            for n, b in step.model.named_buffers():
                b.copy_(buffers[n])
        step.train(was_training)
    return [n for (n, _), g in zip(named, grads, strict=True) if g is None]
