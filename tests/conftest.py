import os

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers.utils import USE_PEFT_BACKEND as DIFFUSERS_LOADS_LORAS  # noqa: E402

from prdp_core import TrainConfig  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


# diffusers' load_lora_weights needs its PEFT backend, which needs transformers 4.34 or later; A1111 1.10 pins 4.30.2
# (the webui loads LoRAs with its own code), so the checks through diffusers' loader do not run in that environment
needs_diffusers_lora_loading = pytest.mark.skipif(
    not DIFFUSERS_LOADS_LORAS, reason="diffusers' LoRA loading needs transformers 4.34+ (A1111 1.10 pins 4.30.2)")


@pytest.fixture
def tiny_config(tmp_path):
    """A run small enough for a unit test on the random builtin:tiny model: 2 prompts x 3 images (3 chunks of 2, the
    middle one spanning both prompts), 4 steps."""
    return TrainConfig(output_dir=str(tmp_path / "runs"), model="builtin:tiny", prompts="builtin:animals",
                       eval_prompts="", rewards={"jpeg_compressibility": 1.0}, prompts_per_epoch=2, images_per_prompt=3, batch_size=2,
                       num_steps=4, epochs=1, updates_per_epoch=2, eval_images_per_prompt=2, eval_max_prompts=2,
                       lora_rank=4, lora_alpha=8.0)


@pytest.fixture
def set_up_trainer(tiny_config):
    """A Trainer whose model, LoRA and optimiser are built (what `run` does before its first epoch)."""
    from prdp_core import Trainer

    def make(**overrides):
        config = TrainConfig.from_dict({**tiny_config.to_dict(), **overrides})
        trainer = Trainer(config)
        trainer.setup()
        return trainer
    return make
