"""One training over several processes, started by `accelerate launch` or `torchrun` (they set RANK, WORLD_SIZE,
LOCAL_RANK and the rendezvous address; process management stays theirs).

What is split: each epoch's N prompts, in contiguous shares (a prompt's images stay together, since PRDP pairs them),
and likewise every evaluation set. What is gathered: the rewards, the log-probs of every transition under the old,
reference and current weights ([N, B, T] floats: small), and the evaluation scores. Every process then computes the
whole epoch's objective, statistics and metrics itself, identically; each back-propagates the coefficients of its own
images, and the LoRA gradients are summed across processes, which gives exactly the one-process gradient. So the
weights, the optimiser and the loop state stay identical everywhere, and the process count changes nothing beyond
float rounding (noise stays keyed per image). Process 0 alone writes the run folder.

Not DDP: its hooks all-reduce at every backward, and an update here runs one backward per chunk and step; the
gradient is summed once per update instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    count: int = 1
    local_rank: int = 0

    @classmethod
    def from_environment(cls) -> "Processes":
        """This process's place among those a launcher started (one process without a launcher), the process group
        joined when there are several: NCCL for CUDA tensors, Gloo for CPU ones."""
        count = int(os.environ.get("WORLD_SIZE", "1"))
        if count == 1:
            return cls()
        processes = cls(int(os.environ["RANK"]), count, int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(processes.local_rank)
            dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
        return processes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """This process's device: with several processes, `cuda` means its own GPU (LOCAL_RANK)."""
        if self.count == 1 or device.type == "cpu":
            return device
        if device.type != "cuda":
            raise ConfigError(f"several processes train on CUDA GPUs or on the CPU, not on {device.type}; set device "
                              f"to cuda or cpu.")
        if device.index is not None:
            raise ConfigError(f"device {device} would put all {self.count} processes on one GPU; set device to cuda "
                              f"(or auto), and each process takes its own.")
        if self.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"process {self.rank} was given GPU {self.local_rank} but sees "
                              f"{torch.cuda.device_count()}; launch at most one process per visible GPU.")
        return torch.device("cuda", self.local_rank)

    def check_prompts_per_epoch(self, prompts_per_epoch: int) -> None:
        if prompts_per_epoch < self.count:
            raise ConfigError(f"prompts_per_epoch {prompts_per_epoch} is fewer than the {self.count} processes, each "
                              f"of which samples whole prompts; launch at most {prompts_per_epoch}, or (for a new "
                              f"run) set it to at least {self.count}, best a multiple.")

    def share(self, count: int, rank: int | None = None) -> slice:
        """The contiguous part of `count` items that process `rank` (default: this one) works on; the first
        count % processes processes take one more."""
        rank = self.rank if rank is None else rank
        base, extra = divmod(count, self.count)
        start = rank * base + min(rank, extra)
        return slice(start, start + base + (rank < extra))

    def sizes(self, count: int) -> list[int]:
        """How many of `count` items each process works on, in rank order."""
        return [len(range(count)[self.share(count, rank)]) for rank in range(self.count)]

    def describe(self, prompts_per_epoch: int) -> str:
        sizes = sorted(set(self.sizes(prompts_per_epoch)), reverse=True)
        each = " or ".join(str(s) for s in sizes)
        wait = "" if len(sizes) == 1 else f" (uneven: those with {sizes[-1]} wait for the others; a multiple of " \
                                          f"{self.count} keeps all busy)"
        return f"{self.count} processes, each sampling {each} of the {prompts_per_epoch} prompts per epoch{wait}"

    def gather(self, local: torch.Tensor, count: int) -> torch.Tensor:
        """The whole first dimension (`count` rows) from every process's share of it, in order, on `local`'s device.
        Gathered on the CPU (Gloo): a few floats per image, and a process with an empty share holds no GPU tensor."""
        if self.count == 1:
            return local
        sizes = self.sizes(count)
        padded = torch.zeros((max(sizes), *local.shape[1:]), dtype=local.dtype)
        padded[:len(local)] = local.cpu()
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)]).to(local.device)

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """Every process's gradients summed in place (each holds its images' share of the one-process gradient)."""
        if self.count == 1:
            return
        flat = torch.cat([p.grad.flatten() for p in params])
        dist.all_reduce(flat)
        offset = 0
        for param in params:
            param.grad.copy_(flat[offset:offset + param.numel()].view_as(param.grad))
            offset += param.numel()

    def broadcast(self, value):
        """Process 0's `value` on every process (any picklable object)."""
        if self.count == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_to_main(self, value) -> list | None:
        """Every process's `value`, in rank order, on process 0 (None elsewhere)."""
        if self.count == 1:
            return [value]
        out = [None] * self.count if self.is_main else None
        dist.gather_object(value, out, dst=0)
        return out

    def any(self, flag: bool) -> bool:
        """Whether `flag` is set on any process (a stop asked for in one stops them all at the same point)."""
        if self.count == 1:
            return flag
        value = torch.tensor([int(flag)])
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def close(self) -> None:
        if self.count > 1 and dist.is_initialized():
            dist.destroy_process_group()
