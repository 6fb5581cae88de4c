"""The tab's form: TrainConfig fields <-> widget values, without importing Gradio (so it is tested on its own).

Widgets are generated from the config's own field metadata (help text, group, choices), like the CLI's flags; only
the reward mix (one weight per registered reward) and the prompt sources (built-in set, text, uploaded file) have
widgets of their own."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prdp_core.config import TrainConfig, config_fields, field_type
from prdp_core.errors import ConfigError

# Shown open; REWARD sits with the reward weights; everything else folds away under "advanced". The host decides
# output_dir and device; the reward mix has one weight widget per reward; prompts come from prompt_source.
BASIC = ("model", "eval_prompts", "lora_rank", "lora_alpha", "epochs", "prompts_per_epoch", "images_per_prompt",
         "num_steps", "guidance_scale", "beta", "clip_range", "learning_rate", "seed")
REWARD = ("reward_options",)
OWN_WIDGETS = ("prompts", "rewards", "output_dir", "device")
ADVANCED = tuple(f.name for f in config_fields() if f.name not in BASIC + REWARD + OWN_WIDGETS)
FIELDS = BASIC + REWARD + ADVANCED  # the order the tab passes widget values in


@dataclass(frozen=True)
class FieldSpec:
    name: str
    kind: str  # checkbox | dropdown | int | float | text | list | json
    label: str
    help: str
    choices: tuple = ()


def field_specs(names: tuple[str, ...]) -> list[FieldSpec]:
    fields = {f.name: f for f in config_fields()}
    specs = []
    for name in names:
        meta, kind = fields[name].metadata, field_type(name)
        if "choices" in meta:
            widget = "dropdown"
        else:
            widget = {bool: "checkbox", int: "int", float: "float", list: "list", dict: "json"}.get(kind, "text")
        specs.append(FieldSpec(name, widget, name.replace("_", " "), meta["help"], tuple(meta.get("choices", ()))))
    return specs


def to_widget(name: str, value: Any) -> Any:
    kind = field_type(name)
    if kind is list:
        return ", ".join(value)
    if kind is dict:
        return json.dumps(value)
    return value


def from_widget(name: str, value: Any) -> Any:
    """A widget's value as the config field's type; a value that cannot be one raises ConfigError naming it."""
    kind = field_type(name)
    if kind in (int, float):
        if value is None or value == "":
            raise ConfigError(f"{name.replace('_', ' ')} is empty; enter a number.")
        number = float(value)
        if kind is int:
            if not number.is_integer():
                raise ConfigError(f"{name.replace('_', ' ')} must be a whole number, got {value!r}.")
            return int(number)
        return number
    if kind is list:
        return [part.strip() for part in str(value).split(",") if part.strip()]
    if kind is dict:
        try:
            return json.loads(value or "{}")
        except json.JSONDecodeError:
            raise ConfigError(f"{name.replace('_', ' ')} must be JSON such as {{\"http\": {{\"url\": "
                              f"\"http://127.0.0.1:8000\"}}}}, got {value!r}.") from None
    if kind is bool:
        return bool(value)
    return "" if value is None else str(value)


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
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if lines:
        body = "\n".join(lines) + "\n"
        path = Path(folder) / "prompts" / f"prompts-{hashlib.sha256(body.encode()).hexdigest()[:12]}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body, encoding="utf-8")
        return str(path)
    if not builtin:
        raise ConfigError("no training prompts; pick a built-in set, type prompts (one per line) or upload a file.")
    return builtin
