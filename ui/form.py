"""The tab's form: TrainConfig fields <-> widget values, without importing Gradio (so it is tested on its own).

Widgets are generated from the config's own field metadata (help text, group, choices), like the CLI's flags; only
the reward mix (one weight per registered reward) and the prompt sources (built-in set, text, uploaded file) have
widgets of their own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prdp_core.config import BASIC_FIELDS, TrainConfig, config_fields, from_widget, to_widget
from prdp_core.errors import ConfigError
from prdp_core.prompts import save_typed_prompts

# Shown open; REWARD sits with the reward weights, EVALUATION in its own section (it can be most of a short run's
# time); everything else folds away under "advanced". The host decides output_dir and device; the reward mix has one
# weight widget per reward; prompts come from prompt_source.
BASIC = BASIC_FIELDS
REWARD = ("reward_options",)
EVALUATION = ("eval_max_prompts", "eval_images_per_prompt", "eval_every")
OWN_WIDGETS = ("prompts", "rewards", "output_dir", "device")
ADVANCED = tuple(f.name for f in config_fields() if f.name not in BASIC + REWARD + EVALUATION + OWN_WIDGETS)
FIELDS = BASIC + REWARD + EVALUATION + ADVANCED  # the order the tab passes widget values in
# A first run that shows the whole loop (sampling, updates, evaluation, export) in minutes instead of most of an hour
QUICK_TRY = {"epochs": 2, "prompts_per_epoch": 2, "images_per_prompt": 4, "num_steps": 10, "eval_max_prompts": 4,
             "eval_images_per_prompt": 2}


def form_to_config(values: dict[str, Any], rewards: dict[str, float | None], prompts: str,
                   host: dict[str, Any] | None = None) -> TrainConfig:
    """The config the form describes. `rewards` holds every offered reward's weight (0 or empty = not in the mix);
    `host` sets what the host decides (output_dir, device)."""
    mix = {name: float(weight) for name, weight in rewards.items() if weight}
    data = {name: from_widget(name, value) for name, value in values.items()}
    return TrainConfig.from_dict({**data, "rewards": mix, "prompts": prompts, **(host or {})}, source="the form")


def config_to_form(config: TrainConfig, names: tuple[str, ...], reward_names: list[str]) -> tuple[list, list]:
    """Widget values for `names` and one weight per offered reward (0 when not in the mix), to fill the form."""
    return ([to_widget(name, getattr(config, name)) for name in names],
            [config.rewards.get(name, 0.0) for name in reward_names])


def prompt_source(builtin: str, text: str, upload: str | None, folder: str | Path) -> str:
    """What the training prompts come from, in the order a user expects: an uploaded file, else prompts typed in
    the text box (saved as a file in `folder`, named by content, so the run's config points at them), else the
    chosen built-in set."""
    if upload:
        return str(upload)
    typed = save_typed_prompts(text, folder)
    if typed:
        return typed
    if not builtin:
        raise ConfigError("no training prompts; pick a built-in set, type prompts (one per line) or upload a file.")
    return builtin
