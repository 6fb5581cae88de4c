"""prdp_core: reward finetuning of Stable Diffusion LoRAs with PRDP (Deng et al., CVPR 2024).

The engine API used by every face (CLI, Gradio tab, ComfyUI nodes, A1111 extension):
`TrainConfig` (one typed config), `Trainer(config, on_event).run(stop_event)` (typed events, checkpoints,
resume), the reward registry, and `export_lora` (kohya files that ComfyUI, A1111 and diffusers load).
"""

from .config import TrainConfig
from .errors import PrdpError
from .export import LoraWeights, export_lora
from .rewards import Reward, RewardMix, create_reward, register_reward, reward_names
from .trainer import Trainer

__version__ = "0.1.0"

__all__ = ["TrainConfig", "Trainer", "PrdpError", "LoraWeights", "export_lora", "Reward", "RewardMix",
           "create_reward", "register_reward", "reward_names", "__version__"]
