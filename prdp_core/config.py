"""The one typed configuration shared by the CLI, the Gradio tab and the ComfyUI nodes.

Every field carries its help text, its group and (where it has one) its list of choices in the
dataclass metadata; the faces generate their flags and widgets from `config_fields()` instead of
re-declaring them. Defaults are tuned for the embedded model (`prdp train` with no arguments runs on a CPU in
minutes); for a real SD model start from examples/sd15_jpeg.toml (the paper's small-scale settings).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .files import atomic_write_text

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

TOY_MODEL = "builtin:toy"
TOY_PROMPT_SETS = ("builtin:toy_train", "builtin:toy_unseen")  # its training and held-out captions
AUTO_EVAL_PROMPTS = "auto"  # eval_prompts that follow the model: the toy's held-out captions, else none

# kohya-ss/sd-scripts' default UNet targets: every Linear / 1x1 conv inside the transformer blocks.
KOHYA_UNET_TARGETS = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def _field(default, help: str, group: str, choices: tuple | None = None, minimum: float | None = None,
           maximum: float | None = None, positive: bool = False, **kwargs):
    """A config field and what faces generate from it: help text, group, choices, bounds (`minimum` and
    `maximum` inclusive; `positive` means greater than 0)."""
    metadata = {"help": help, "group": group, "positive": positive}
    if choices is not None:
        metadata["choices"] = choices
    if minimum is not None:
        metadata["minimum"] = minimum
    if maximum is not None:
        metadata["maximum"] = maximum
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class TrainConfig:
    # --- what to train on
    model: str = _field("builtin:toy", "The SD1.x, SD2.x or SDXL model to finetune: a checkpoint file, a diffusers "
                        "folder or hub id, or builtin:toy, the small model that ships for trying things out.", "model")
    vae: str = _field("", "A separate VAE file (.safetensors, e.g. from A1111's models/VAE) used instead of the "
                      "model's own; empty: the model's.", "model")
    prediction_type: str = _field("auto", "What the model's UNet predicts; auto reads it from the model (an SD2 "
                                  "checkpoint's A1111 .yaml beside it, else its weights).", "model",
                                  choices=("auto", "epsilon", "v_prediction"))
    prompts: str = _field("builtin:toy_train", "Training prompts: a .txt file (one per line; read as drawn, so "
                          "millions of lines are fine), a .json list, a Hugging Face dataset column as "
                          "hf:NAME[:split[:column]] (needs the datasets library), or a built-in set such as "
                          "builtin:animals.", "model")
    eval_prompts: str = _field("auto", "Prompts kept out of training, evaluated as 'unseen' beside the training "
                               "('seen') ones; auto: the toy's own with builtin:toy, none with other models; empty: "
                               "none.", "model")
    rewards: dict = _field({"toy_match": 1.0}, "The reward mix: each reward's name and weight (a registered reward "
                           "or module:function).", "reward")
    reward_options: dict = _field({}, "Settings of the rewards in the mix, e.g. a weight file or a server address, "
                                  "as {name: {option: value}}.", "reward")
    reward_dtype: str = _field("fp32", "Weight dtype of model-based rewards (fp16/bf16 halve their memory on a "
                               "GPU).", "reward", choices=("fp32", "fp16", "bf16"))
    reward_normalization: str = _field(
        "none", "none: train on the weighted sum of raw scores; batch_zscore: standardise each reward within the "
        "epoch first, so rewards of different scales mix evenly (retune beta when switching).", "reward",
        choices=("none", "batch_zscore"))
    # --- the objective
    objective: str = _field("prdp", "Objective: prdp (this project) or ddpo (PPO-clip baseline).", "objective",
                            choices=("prdp", "ddpo"))
    beta: float = _field(1.0, "How strongly PRDP keeps the LoRA near the base model: smaller moves further.",
                         "objective", positive=True)
    clip_range: float = _field(1e-4, "How far each update may move the model from the one that sampled the "
                               "epoch (PRDP's proximal clip).", "objective", positive=True)
    step_reduction: str = _field("mean", "How per-step implicit rewards combine over the trajectory: mean (the "
                                 "paper's code) or sum (the paper's equations; divide beta by the step count).",
                                 "objective", choices=("mean", "sum"))
    train_step_fraction: float = _field(
        0.15, "Share of the sampling steps, noisiest first, that are trained on (1.0: all, as in the paper); fewer "
        "steps train faster and on composition rather than fine detail.", "objective", positive=True, maximum=1.0)
    ddpo_clip_range: float = _field(1e-4, "DDPO only: PPO clip range on the per-step probability ratio.",
                                    "objective", positive=True)
    ddpo_adv_clip: float = _field(5.0, "DDPO only: advantages (per-prompt normalised rewards) are clipped to "
                                  "+-this value.", "objective", positive=True)
    # --- the online loop
    epochs: int = _field(16, "Training epochs (each samples fresh images, then updates the LoRA).", "loop", minimum=1)
    prompts_per_epoch: int = _field(2, "Prompts drawn per epoch (N).", "loop", minimum=1)
    images_per_prompt: int = _field(16, "Images sampled per prompt (B); pairs are formed among them.", "loop",
                                    minimum=2)
    updates_per_epoch: int = _field(4, "Gradient updates per epoch on the same samples (K).", "loop", minimum=1)
    batch_size: int = _field(0, "Images per UNet call, in sampling and training alike; 0 picks it for the device "
                             "(a GPU: what fits its free memory). Results change only by float rounding; a resumed "
                             "run may change it.", "loop", minimum=0)
    # --- the sampler
    num_steps: int = _field(20, "DDIM sampling steps (T).", "sampler", minimum=1, maximum=1000)
    guidance_scale: float = _field(5.0, "Classifier-free guidance scale, applied inside every step.", "sampler",
                                   minimum=0)
    eta: float = _field(1.0, "DDIM eta; must be > 0 so every step has a log-probability.", "sampler", positive=True,
                        maximum=1.0)
    negative_prompt: str = _field("", "Negative prompt used for the unconditional branch of guidance.", "sampler")
    resolution: int = _field(0, "Image side in pixels; 0 uses the model's native size.", "sampler", minimum=0)
    # --- the LoRA
    lora_rank: int = _field(8, "LoRA rank.", "lora", minimum=1)
    lora_alpha: float = _field(8.0, "LoRA alpha; the adapter is scaled by alpha / rank (kohya convention).",
                               "lora", positive=True)
    lora_targets: list = _field(list(KOHYA_UNET_TARGETS), "UNet module names the LoRA wraps (suffix match); the "
                                "default is kohya's set.", "lora")
    # --- the optimiser
    learning_rate: float = _field(1e-3, "AdamW learning rate of the LoRA parameters.", "optimizer", positive=True)
    weight_decay: float = _field(1e-4, "AdamW weight decay.", "optimizer", minimum=0)
    adam_beta1: float = _field(0.9, "AdamW beta1.", "optimizer")
    adam_beta2: float = _field(0.999, "AdamW beta2.", "optimizer")
    adam_eps: float = _field(1e-8, "AdamW epsilon.", "optimizer", positive=True)
    max_grad_norm: float = _field(1.0, "Gradient-norm clip; 0 disables it.", "optimizer", minimum=0)
    # --- evaluation and outputs
    eval_images_per_prompt: int = _field(8, "Images per evaluation prompt, on fixed seeds.", "eval", minimum=1)
    eval_max_prompts: int = _field(16, "At most this many evaluation prompts, evenly spaced through each set; 0 "
                                   "means all.", "eval", minimum=0)
    eval_every: int = _field(0, "Evaluate every this many epochs (always before and after); 0 means only "
                             "before and after.", "eval", minimum=0)
    seed: int = _field(0, "Seed for prompt draws, sampling noise and evaluation.", "run", minimum=0)
    precision: str = _field("fp32", "Base-model weight dtype; the LoRA stays fp32. On a GPU use fp16, which halves "
                            "the memory; bf16 is too coarse for the training signal.", "run",
                            choices=("fp32", "fp16", "bf16"))
    gradient_checkpointing: bool = _field(False, "Much less GPU memory while training, for about a third more "
                                          "training time; results are unchanged.", "memory")
    vae_tiling: bool = _field(False, "Decode images one at a time and in tiles, so decoding at large resolutions "
                              "fits small GPUs (tile seams may differ slightly from a whole-image decode).",
                              "memory")
    offload_models: bool = _field(False, "Keep the text encoders and reward models on the CPU between their uses, "
                                  "leaving the GPU to the UNet and the VAE.", "memory")
    retain_graphs: str = _field(
        "auto", "Trade memory for speed in updates 2..K: keep the graphs instead of recomputing them (auto: on for "
        "small models on the CPU); results are identical.", "memory", choices=("auto", "on", "off"))
    device: str = _field("auto", "Device: auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps.", "run")
    output_dir: str = _field("runs", "Folder that receives one sub-folder per run.", "run")
    run_name: str = _field("", "Run folder name; empty means a timestamp.", "run")
    lora_name: str = _field("", "File name of the exported LoRA (no folders); empty means prdp_<run name>.", "run")
    keep_checkpoints: int = _field(2, "How many epoch checkpoints to keep (the latest ones).", "run", minimum=1)

    def trained_steps(self) -> int:
        """How many sampling steps, noisiest first, the objective trains on (train_step_fraction of num_steps)."""
        return max(1, math.ceil(self.train_step_fraction * self.num_steps - 1e-9))

    # ------------------------------------------------------------------ validation
    def validate(self) -> "TrainConfig":
        """Raise ConfigError naming the first bad field and the fix; return self when all is well."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            expected = _FIELD_TYPES[f.name]
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise ConfigError(f"{f.name} must be {_TYPE_NAMES[expected]}, got {value!r}; fix it in the "
                                  f"config file or flag.")
            if expected is float and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number, got {value!r}.")
            choices = f.metadata.get("choices")
            if choices and value not in choices:
                raise ConfigError(f"{f.name} must be one of {', '.join(choices)}, got {value!r}.")
            if f.metadata["positive"] and value <= 0:
                raise ConfigError(f"{f.name} must be greater than 0, got {value}.")
            low, high = f.metadata.get("minimum"), f.metadata.get("maximum")
            if low is not None and value < low:
                raise ConfigError(f"{f.name} must not be negative, got {value}." if low == 0 else
                                  f"{f.name} must be at least {low}, got {value}" + _WHY_AT_LEAST.get(f.name, "."))
            if high is not None and value > high:
                raise ConfigError(f"{f.name} must be at most {high:g}, got {value}" + _WHY_AT_MOST.get(f.name, "."))
        if self.retain_graphs == "on" and self.precision == "fp16":
            raise ConfigError("retain_graphs on needs precision fp32 or bf16 (fp16 gradients are scaled and may be "
                              "retried); set retain_graphs to auto or off.")
        if self.resolution and self.resolution % 8:
            raise ConfigError(f"resolution must be a multiple of 8 (the VAE downsamples by 8), got {self.resolution}.")
        if not self.rewards:
            raise ConfigError("rewards is empty; add at least one reward to the mix, e.g. jpeg_compressibility.")
        for name, weight in self.rewards.items():
            if not isinstance(name, str) or isinstance(weight, bool) or not isinstance(weight, (int, float)) \
                    or not math.isfinite(weight):
                raise ConfigError(f"rewards must map reward names to finite weights, got {name!r}: {weight!r}.")
        self.rewards = {name: float(weight) for name, weight in self.rewards.items()}
        for name, options in self.reward_options.items():
            if name not in self.rewards:
                raise ConfigError(f"reward_options names {name!r}, which is not in the reward mix "
                                  f"({', '.join(self.rewards)}); add {name} to the reward mix or drop its options.")
            if not isinstance(options, dict) or not all(isinstance(k, str) and _is_option_value(v)
                                                        for k, v in options.items()):
                raise ConfigError(f"reward_options.{name} must map option names to strings, numbers, booleans or "
                                  f"lists of them, got {options!r}.")
        if not self.lora_targets or not all(isinstance(t, str) and t for t in self.lora_targets):
            raise ConfigError("lora_targets must be a non-empty list of module names, e.g. to_q,to_k,to_v,to_out.0.")
        for name in ("run_name", "lora_name"):
            check_file_name(getattr(self, name), name, allow_empty=True)
        if not self.model.startswith("builtin:"):  # the builtin models with random weights take any prompts
            for name in ("prompts", "eval_prompts"):
                if getattr(self, name) in TOY_PROMPT_SETS:
                    raise ConfigError(f"{name.replace('_', ' ')} {getattr(self, name)} are the toy world's captions, "
                                      f"which only fit builtin:toy; for {self.model} use a prompt file, typed "
                                      f"prompts or a built-in set such as builtin:animals.")
        return self

    def evaluation_prompts(self) -> str:
        """The held-out prompt source to evaluate: eval_prompts, with auto resolved for the model."""
        if self.eval_prompts == AUTO_EVAL_PROMPTS:
            return TOY_PROMPT_SETS[1] if self.model == TOY_MODEL else ""
        return self.eval_prompts

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "TrainConfig":
        """The validated config; a ConfigError names every setting that is wrong, not only the first."""
        known = {f.name for f in dataclasses.fields(cls)}
        problems = []
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                problems.append(f"unknown setting {key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        settings = {key: value for key, value in data.items() if key in known}
        wrong = {key: cls._problem({key: value}) for key, value in settings.items()}  # each on its own, so that one
        wrong = {key: problem for key, problem in wrong.items() if problem}  # mistake does not hide the next
        for key in list(wrong):  # one that only needs the rest of the file (reward_options names its rewards)
            if not cls._problem({k: v for k, v in settings.items() if k not in wrong or k == key}):
                del wrong[key]
        if len(problems) + len(wrong) == 1:
            raise ConfigError(f"{source}: {problems[0]}." if problems else f"{next(iter(wrong.values()))}.")
        problems += wrong.values()
        if problems:
            raise ConfigError(f"{source} has {len(problems)} problems: " + "; ".join(problems) + ".")
        return cls(**data).validate()  # what only the settings together can break

    @classmethod
    def _problem(cls, settings: dict[str, Any]) -> str:
        try:
            cls(**settings).validate()
        except ConfigError as exc:
            return str(exc).rstrip(".")
        return ""

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TrainConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass the path of a .toml or .json file.")
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid {path.suffix.lstrip('.').upper() or 'TOML'}: "
                              f"{exc}.") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a table of settings, got {type(data).__name__}.")
        return cls.from_dict(data, source=str(path))

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        text = json.dumps(self.to_dict(), indent=2) if path.suffix.lower() == ".json" else to_toml(self.to_dict())
        atomic_write_text(path, text)


_FIELD_TYPES = {"str": str, "int": int, "float": float, "bool": bool, "dict": dict, "list": list}
_FIELD_TYPES = {f.name: _FIELD_TYPES[f.type] for f in dataclasses.fields(TrainConfig)}
_WHY_AT_LEAST = {"images_per_prompt": " (pairs are compared within a prompt)."}
_WHY_AT_MOST = {"num_steps": " (the models' training timesteps)."}
_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "a table",
               list: "a list"}

# `--low-vram` (CLI) and the tab's low-VRAM switch: what a user with an 8 GB GPU needs, applied under explicit settings.
LOW_VRAM = {"precision": "fp16", "batch_size": 1, "gradient_checkpointing": True, "vae_tiling": True,
            "offload_models": True, "retain_graphs": "off"}


def _is_option_value(value: Any) -> bool:
    """What a reward option may hold: what TOML and JSON both write (no nested tables, no null)."""
    if isinstance(value, list):
        return all(_is_option_value(v) for v in value)
    return isinstance(value, (str, int, float, bool))


def config_fields() -> list[dataclasses.Field]:
    """The fields in declaration order, for faces that generate flags or widgets."""
    return list(dataclasses.fields(TrainConfig))


def field_type(name: str) -> type:
    return _FIELD_TYPES[name]


# What the tab shows open and the ComfyUI train node shows as widgets; the rest is "advanced" in both.
BASIC_FIELDS = ("model", "eval_prompts", "lora_rank", "lora_alpha", "epochs", "prompts_per_epoch",
                "images_per_prompt", "num_steps", "guidance_scale", "beta", "clip_range", "learning_rate", "seed")


@dataclass(frozen=True)
class FieldSpec:
    """One config field as a face presents it (a Gradio widget, a ComfyUI input)."""

    name: str
    kind: str  # checkbox | dropdown | int | float | text | list | json
    label: str
    help: str
    group: str
    default: Any
    choices: tuple = ()
    minimum: float | None = None  # inclusive
    maximum: float | None = None  # inclusive
    positive: bool = False  # greater than 0 (minimum is then 0)


def field_specs(names: tuple[str, ...] | None = None) -> list[FieldSpec]:
    """The named fields (all, in declaration order, without names) as faces present them."""
    fields = {f.name: f for f in config_fields()}
    names = tuple(fields) if names is None else names
    specs = []
    for name in names:
        f = fields[name]
        meta, kind = f.metadata, field_type(name)
        if "choices" in meta:
            widget = "dropdown"
        else:
            widget = {bool: "checkbox", int: "int", float: "float", list: "list", dict: "json"}.get(kind, "text")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        minimum = 0 if meta["positive"] else meta.get("minimum")
        specs.append(FieldSpec(name, widget, name.replace("_", " "), meta["help"], meta["group"], default,
                               tuple(meta.get("choices", ())), minimum, meta.get("maximum"), meta["positive"]))
    return specs


def to_widget(name: str, value: Any) -> Any:
    """A field's value as a form widget holds it: lists as comma-separated text, tables as JSON."""
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


def check_file_name(name: str, what: str, allow_empty: bool = False) -> str:
    """Refuse names that would escape their folder (path separators, '..')."""
    if not name and allow_empty:
        return name
    if not name.strip():
        raise ConfigError(f"{what} is empty; give it a name.")
    if "/" in name or "\\" in name or name in (".", "..") or ".." in name or "\0" in name:
        raise ConfigError(f"{what} {name!r} must be a plain file name without path separators or '..'.")
    return name


def to_toml(data: dict[str, Any]) -> str:
    """Serialise the flat config (scalars, lists of scalars, tables whose values may be inline tables) as TOML."""
    scalars, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            body = "\n".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items())
            tables.append(f"[{key}]\n{body}\n")
        else:
            scalars.append(f"{key} = {_toml_value(value)}")
    return "\n".join(scalars) + "\n\n" + "\n".join(tables)


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # e.g. one reward's options inside [reward_options]
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")
