"""Memory decisions made from the config and the model: whether to keep autograd graphs between passes, and what
to change after running out of memory."""

from __future__ import annotations

import math

import torch

from .config import TrainConfig

# retain_graphs auto: the graphs of one update, kept at once, must stay small beside a CPU machine's memory
CHEAP_GRAPHS_MAX_UNET_PARAMETERS = 100_000_000  # toy- and test-sized UNets; SD1.5's has 860 M
CHEAP_GRAPHS_MAX_COUNT = 16  # micro-batch-steps per update; the toy default keeps 6 (0.7 GB)


def graphs_are_cheap(config: TrainConfig, device: torch.device, unet, trained_steps: int) -> bool:
    """Whether retain_graphs auto keeps the graphs: on the CPU (no fp16), for a small UNet and few graphs."""
    chunks = math.ceil(config.prompts_per_epoch * config.images_per_prompt / config.batch_size)
    return (device.type == "cpu" and config.precision != "fp16" and chunks * trained_steps <= CHEAP_GRAPHS_MAX_COUNT
            and sum(p.numel() for p in unet.parameters()) < CHEAP_GRAPHS_MAX_UNET_PARAMETERS)


def memory_advice(config: TrainConfig, phase: str | None = None) -> str:
    """What to change after running out of memory in `phase`: the memory options still off, those for that phase
    first. Decoding runs one image at a time, so only tiling lowers its peak; elsewhere checkpointing saves most (at
    SD1.5 512 px it takes micro-batch 8 from 16 to 6 GiB, bench/memory_estimate.py)."""
    fixes = ["turn on vae_tiling"] if phase == "decode" and not config.vae_tiling else []
    if config.retain_graphs == "on":
        fixes.append("set retain_graphs off")
    if not config.gradient_checkpointing:
        fixes.append("turn on gradient_checkpointing")
    if config.batch_size > 1:
        fixes.append(f"lower batch_size (now {config.batch_size})")
    if config.precision == "fp32":
        fixes.append("train in fp16")
    if not fixes:
        rest = [name for name in ("vae_tiling", "offload_models") if not getattr(config, name)]
        return f"turn on {' and '.join(rest)} or lower the resolution" if rest else "lower the resolution"
    return ", ".join(fixes[:-1]) + (" or " if len(fixes) > 1 else "") + fixes[-1] + " (the low-VRAM preset does all)"
