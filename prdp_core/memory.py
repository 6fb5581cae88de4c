"""Memory decisions made from the config and the model: how many images go through the UNet at once, whether to keep
autograd graphs between passes, and what to change after running out of memory."""

from __future__ import annotations

import math
from typing import Callable

import torch

from .config import TrainConfig

# retain_graphs auto: the graphs of one update, kept at once, must stay small beside a CPU machine's memory
CHEAP_GRAPHS_MAX_UNET_PARAMETERS = 100_000_000  # toy- and test-sized UNets; SD1.5's has 860 M
CHEAP_GRAPHS_MAX_COUNT = 16  # micro-batch-steps per update; the toy default keeps 3 (0.7 GB)
# batch_size auto: on the CPU a small UNet's cost per image still falls up to 64 images a call (docs/benchmarks.md);
# a real-size one gains little past a few, while its activations grow
AUTO_BATCH_SMALL_CPU, AUTO_BATCH_LARGE_CPU = 64, 4
GPU_MEMORY_SHARE = 0.75  # of the memory free once the model is loaded; the rest: reward models, trajectories, slack


def is_small(unet) -> bool:
    return sum(p.numel() for p in unet.parameters()) < CHEAP_GRAPHS_MAX_UNET_PARAMETERS


def auto_batch_size(images: int, device: torch.device, unet, training_peak: Callable[[int], int]) -> int:
    """batch_size 0: images per UNet call for an epoch of `images`. On a GPU, the most whose training chunk fits in
    GPU_MEMORY_SHARE of the free memory, from the measured peaks of chunks of 1 and 2 images (`training_peak`,
    bytes); elsewhere by the UNet's size. Chunks are then evened out: 32 images that fit 20 at a time go as 2 x 16."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = torch.cuda.memory_allocated(device) + GPU_MEMORY_SHARE * free
        most = fitting_batch(training_peak(1), training_peak(2), budget)
    else:
        most = AUTO_BATCH_SMALL_CPU if is_small(unet) else AUTO_BATCH_LARGE_CPU
    chunks = math.ceil(images / max(1, min(most, images)))
    return math.ceil(images / chunks)


def fitting_batch(peak_one: float, peak_two: float, budget: float) -> int:
    """The most images whose peak, growing linearly through the peaks of 1 and 2 images, stays within `budget`
    (at least 1: if even that does not fit, running out of memory says what to change)."""
    per_image = peak_two - peak_one
    if per_image <= 0:
        return 2**31 - 1
    return max(1, int((budget - peak_one) // per_image) + 1)


def graphs_are_cheap(config: TrainConfig, device: torch.device, unet, trained_steps: int, images: int,
                     batch_size: int) -> bool:
    """Whether retain_graphs auto keeps the graphs of `images` per epoch: on the CPU (no fp16), for a small UNet and
    few graphs."""
    chunks = math.ceil(images / batch_size)
    return (device.type == "cpu" and config.precision != "fp16" and chunks * trained_steps <= CHEAP_GRAPHS_MAX_COUNT
            and is_small(unet))


def memory_advice(config: TrainConfig, phase: str | None = None, batch_size: int | None = None) -> str:
    """What to change after running out of memory in `phase`: the memory options still off, those for that phase
    first. Decoding runs one image at a time, so only tiling lowers its peak; elsewhere checkpointing saves most (at
    SD1.5 512 px it takes micro-batch 8 from 16 to 6 GiB, bench/memory_estimate.py)."""
    fixes = ["turn on vae_tiling"] if phase == "decode" and not config.vae_tiling else []
    if config.retain_graphs == "on":
        fixes.append("set retain_graphs off")
    if not config.gradient_checkpointing:
        fixes.append("turn on gradient_checkpointing")
    batch_size = batch_size or config.batch_size
    if batch_size != 1:
        fixes.append(f"lower batch_size (now {batch_size or 'auto'})")
    if config.precision == "fp32":
        fixes.append("train in fp16")
    if not fixes:
        rest = [name for name in ("vae_tiling", "offload_models") if not getattr(config, name)]
        return f"turn on {' and '.join(rest)} or lower the resolution" if rest else "lower the resolution"
    return ", ".join(fixes[:-1]) + (" or " if len(fixes) > 1 else "") + fixes[-1] + " (the low-VRAM preset does all)"
