"""prdp_core: reward finetuning of Stable Diffusion LoRAs with PRDP (Deng et al., CVPR 2024).

The engine API used by every face (CLI, Gradio tab, ComfyUI nodes, A1111 extension):
`TrainConfig` (one typed config), `Trainer(config, on_event).run(stop_event)` (typed events, checkpoints,
resume), the reward registry, and `export_lora` (kohya files that ComfyUI, A1111 and diffusers load).
"""

from __future__ import annotations

import importlib

from .config import TrainConfig
from .errors import PrdpError

__version__ = "0.1.0"

# Imported on first use: torch and diffusers take seconds to import, and `prdp --help` or a host listing its
# extensions needs neither.
_LAZY = {"Trainer": "trainer", "LoraWeights": "lora_weights", "export_lora": "export", "Reward": "rewards",
         "RewardMix": "rewards", "create_reward": "rewards", "register_reward": "rewards", "reward_names": "rewards"}

__all__ = ["TrainConfig", "PrdpError", *_LAZY, "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
