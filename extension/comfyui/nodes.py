"""The ComfyUI nodes: build a reward mix, train a PRDP LoRA, score images, export a run's LoRA.

Thin adapters (V1 node classes) over the engine: the training inputs are generated from TrainConfig's field
metadata, as the tab's form and the CLI's flags are; runs go through RunSession, as in the tab. Everything that
touches ComfyUI itself is in comfy_io."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from prdp_core.config import (AUTO_EVAL_PROMPTS, BASIC_FIELDS, LOW_VRAM, FieldSpec, TrainConfig, check_file_name,
                              config_fields, field_specs, from_widget, to_widget)
from prdp_core.errors import ConfigError, PrdpError
from prdp_core.export import EXPORT_DTYPES, FORMATS, export_lora, run_thumbnail
from prdp_core.models import BUILTIN_MODELS
from prdp_core.plots import image_grid
from prdp_core.prompts import BUILTIN_PREFIX, builtin_prompt_sets, save_typed_prompts
from prdp_core.rewards import RewardMix, create_reward, reward_names
from prdp_core.session import RunFolder, RunSession, Snapshot, list_runs, matching_runs
from prdp_core.trainer import RESUMABLE

from . import comfy_io

CATEGORY = "PRDP"
REWARD_MIX = "PRDP_REWARD_MIX"  # {"rewards": {name: weight}, "reward_options": {name: {option: value}}}
SETTINGS = "PRDP_SETTINGS"  # {config field: value}, the advanced settings that differ from the defaults
LORA_MODEL = "LORA_MODEL"  # ComfyUI's trained-LoRA type: a {key: tensor} state dict (comfy_extras/nodes_train.py)
LATEST_RUN = "latest"
INT_MAX = 2**31 - 1
FLOAT_MAX = 1e9
log = logging.getLogger("prdp")

# The train node decides these itself (prompts and the mix have inputs of their own, the host decides the folders
# and the device, the node names the run and the LoRA); every other field is a widget of the train node (BASIC_FIELDS)
# or of the advanced-settings node.
NODE_DECIDES = ("prompts", "rewards", "reward_options", "output_dir", "device", "run_name", "lora_name")
ADVANCED_FIELDS = tuple(f.name for f in config_fields() if f.name not in BASIC_FIELDS + NODE_DECIDES)


def comfy_input(spec: FieldSpec, **options) -> tuple:
    """A ComfyUI input for one config field: its type, default, bounds and tooltip from the field's metadata."""
    default = options.pop("default", spec.default)
    common = {"default": to_widget(spec.name, default), "tooltip": spec.help, **options}
    if spec.kind == "dropdown":
        return list(spec.choices), common
    if spec.kind == "checkbox":
        return "BOOLEAN", common
    if spec.kind == "int":
        # a training seed stays fixed: without this ComfyUI adds "randomize after queue" to any input named seed
        extra = {"control_after_generate": False} if spec.name == "seed" else {}
        maximum = INT_MAX if spec.maximum is None else spec.maximum
        return "INT", {"min": spec.minimum if spec.minimum is not None else -INT_MAX, "max": maximum, "step": 1,
                       **extra, **common}
    if spec.kind == "float":
        # ComfyUI rounds a float widget to its step's decimals, so the step sits two decades below the default
        step = 10.0 ** (math.floor(math.log10(abs(default))) - 2) if default else 0.01
        minimum = step if spec.positive else spec.minimum  # greater than 0: the smallest value the widget holds
        return "FLOAT", {"min": minimum if minimum is not None else -FLOAT_MAX,
                         "max": FLOAT_MAX if spec.maximum is None else spec.maximum, "step": step, **common}
    return "STRING", {"multiline": spec.kind == "json", "dynamicPrompts": False, **common}


def _text(default: str, tooltip: str, multiline: bool = False) -> tuple:
    return "STRING", {"default": default, "multiline": multiline, "dynamicPrompts": False, "tooltip": tooltip}


# ---------------------------------------------------------------------------------------------- the reward mix
class PRDPReward:
    DESCRIPTION = ("One reward and its weight. Chain several through 'mix' to train on (or score with) their "
                   "weighted sum.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (REWARD_MIX,)
    RETURN_NAMES = ("reward_mix",)
    FUNCTION = "add"

    @classmethod
    def INPUT_TYPES(cls):
        names = reward_names()
        return {
            "required": {
                "reward": (names, {"default": next(iter(TrainConfig().rewards)),
                                   "tooltip": "A built-in reward (toy_match and toy_alignment go with builtin:toy; "
                                              "aesthetic, pickscore, hps, imagereward and clip_score with real "
                                              "models)."}),
                "weight": ("FLOAT", {"default": 1.0, "min": -1000.0, "max": 1000.0, "step": 0.01,
                                     "tooltip": "Its weight in the mix; negative to push the reward down."}),
                "options": _text("{}", "Its settings as JSON, e.g. {\"url\": \"http://127.0.0.1:8765\"} for http "
                                 "or a local weight file; {} for none."),
                "custom": _text("", "Your own scorer instead of the list: module:function or path/to/file.py:function, "
                                "taking (list of PIL images, list of prompts) and returning one number per image."),
            },
            "optional": {"mix": (REWARD_MIX, {"tooltip": "Rewards from other PRDP Reward nodes to add this one to."})},
        }

    def add(self, reward, weight, options, custom, mix=None):
        name = custom.strip() or reward
        try:
            parsed = json.loads(options or "{}")
        except json.JSONDecodeError:
            raise ConfigError(f"the options of reward {name!r} must be JSON such as {{\"url\": "
                              f"\"http://127.0.0.1:8765\"}}, got {options!r}.") from None
        if not isinstance(parsed, dict):
            raise ConfigError(f"the options of reward {name!r} must be a JSON object such as {{}}, got {options!r}.")
        if weight == 0:
            raise ConfigError(f"reward {name!r} has weight 0; give it a weight, or bypass the node.")
        mix = mix or {"rewards": {}, "reward_options": {}}
        if name in mix["rewards"]:
            raise ConfigError(f"reward {name!r} is in the mix twice; chain it once and set its weight there.")
        create_reward(name, options=parsed)  # an unknown name or option fails here, with the node that has it
        return ({"rewards": {**mix["rewards"], name: float(weight)},
                 "reward_options": {**mix["reward_options"], **({name: parsed} if parsed else {})}},)


# ---------------------------------------------------------------------------------------------- settings
class PRDPAdvancedSettings:
    DESCRIPTION = "The training settings the PRDP Train LoRA node does not show (memory, sampler, optimiser...)."
    CATEGORY = CATEGORY
    RETURN_TYPES = (SETTINGS,)
    RETURN_NAMES = ("advanced",)
    FUNCTION = "settings"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {spec.name: comfy_input(spec) for spec in field_specs(ADVANCED_FIELDS)}}

    def settings(self, **values):
        changed = {}
        for spec in field_specs(ADVANCED_FIELDS):
            value = from_widget(spec.name, values[spec.name])
            if value != spec.default:  # only what differs, so that the low-VRAM switch still applies beneath it
                changed[spec.name] = value
        return (changed,)


# ---------------------------------------------------------------------------------------------- training
class PRDPTrainLoRA:
    DESCRIPTION = ("Reward-finetunes a LoRA with PRDP: each epoch samples images, scores them with the reward mix "
                   "and trains the LoRA to raise the reward. The LoRA is saved to models/loras; the run folder "
                   "(checkpoints, previews, metrics) to output/prdp.")
    CATEGORY = CATEGORY
    RETURN_TYPES = (LORA_MODEL, "STRING", "IMAGE", "IMAGE")
    RETURN_NAMES = ("lora", "lora_name", "before_after", "reward_curve")
    OUTPUT_TOOLTIPS = ("The trained LoRA, for the built-in Load LoRA Model and Save LoRA nodes.",
                       "Its file name in models/loras, as LoraLoader lists it.",
                       "The held-out images on fixed seeds before and after training.",
                       "The reward per epoch.")
    FUNCTION = "train"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        specs = {spec.name: spec for spec in field_specs(BASIC_FIELDS)}
        defaults = TrainConfig()
        required = {
            "model": ([*BUILTIN_MODELS, *comfy_io.checkpoint_names()],
                      {"default": defaults.model, "tooltip": "The base model: a checkpoint from models/checkpoints "
                       "(SD1.x, SD2.x, SDXL), or builtin:toy, which trains in minutes on a CPU (the other builtins "
                       "have random weights, for trying the plumbing)."}),
            "reward_mix": (REWARD_MIX, {"tooltip": "What to raise: PRDP Reward nodes, chained."}),
            "prompts": _text("", "Training prompts, one per line; empty: the prompt set below.", multiline=True),
            "prompt_set": ([BUILTIN_PREFIX + name for name in builtin_prompt_sets()],
                           {"default": defaults.prompts, "tooltip": "The built-in prompts used when the text above "
                            "is empty."}),
            "eval_prompts": _text(defaults.eval_prompts, "Held-out prompts, evaluated before and after beside the "
                                  "training ones: one per line, or one line naming a set (builtin:NAME) or a file; "
                                  "auto: the toy's own with builtin:toy, none with other models; empty: none.",
                                  multiline=True),
        }
        required.update({name: comfy_input(spec) for name, spec in specs.items() if name not in required})
        required.update({
            "low_vram": ("BOOLEAN", {"default": False, "tooltip": "For 8 GB GPUs: " + ", ".join(
                f"{k} {v}" for k, v in LOW_VRAM.items()) + " (an advanced setting changed on purpose wins)."}),
            "lora_name": _text("prdp_lora", "File name in models/loras (no folders); a file of that name is "
                               "replaced, the run folder keeps every run's own copy."),
            "resume": ("BOOLEAN", {"default": True, "tooltip": "On: a run with these settings continues where it "
                                   "stopped, and a finished one is reused (or extended when epochs is raised). Off: "
                                   "a new run."}),
        })
        return {"required": required, "optional": {"advanced": (SETTINGS, {"tooltip": "PRDP Advanced Settings."})}}

    def train(self, model, reward_mix, prompts, prompt_set, eval_prompts, low_vram, lora_name, resume,
              advanced=None, **basic):
        stem = _lora_stem(lora_name)
        config = self.config(model, reward_mix, prompts, prompt_set, eval_prompts, low_vram, advanced or {}, basic)
        done, unfinished = _runs_to_continue(config) if resume else (None, None)
        if done is not None:
            log.info(f"[PRDP] reusing the finished run {done.path} (same settings; turn resume off to train again)")
            run_dir = done.path
        else:
            run_dir = _run(config, unfinished.path if unfinished else None)
        lora_path = _export_to_loras(run_dir, stem, "kohya", "fp16")
        log.info(f"[PRDP] LoRA saved as {lora_path} (LoraLoader lists it as {lora_path.name} after a refresh)")
        from safetensors.torch import load_file

        grid, curve = run_dir / "previews" / "before_after.png", run_dir / "reward_curve.png"
        return {"ui": {"images": [_ui_image(grid)]},
                "result": (load_file(lora_path), lora_path.name, _image_tensor(grid), _image_tensor(curve))}

    @staticmethod
    def config(model, reward_mix, prompts, prompt_set, eval_prompts, low_vram, advanced, basic) -> TrainConfig:
        runs = comfy_io.runs_folder()
        data = {**(LOW_VRAM if low_vram else {}), **advanced, **basic, **reward_mix}
        data["model"] = model if model.startswith(BUILTIN_PREFIX) else comfy_io.checkpoint_path(model)
        data["prompts"] = save_typed_prompts(prompts, runs) or prompt_set
        data["eval_prompts"] = _prompt_source(eval_prompts, runs)
        data.update(output_dir=str(runs), device=comfy_io.torch_device())
        return TrainConfig.from_dict(data, source="the node")


def _runs_to_continue(config: TrainConfig) -> tuple[RunFolder | None, RunFolder | None]:
    """Among the runs trained with these settings: a finished one of exactly these epochs (reused), else the one
    furthest along that has not passed them (continued). A run past them cannot give this LoRA; a new run does."""
    runs = [run for run in matching_runs(comfy_io.runs_folder(), config, ignore=("lora_name",))
            if run.epochs_done <= config.epochs]
    done = next((run for run in runs if run.finished and run.epochs_done == config.epochs), None)
    return done, max(runs, key=lambda run: run.epochs_done, default=None)  # newest first: max keeps the newest


def _prompt_source(text: str, folder: Path) -> str:
    """One line naming a built-in set or a file is that source; other text is prompts, one per line."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if lines == [AUTO_EVAL_PROMPTS] or len(lines) == 1 and (lines[0].startswith(BUILTIN_PREFIX) or
                                                             Path(lines[0]).expanduser().is_file()):
        return lines[0]
    return save_typed_prompts(text, folder) or ""


def _run(config: TrainConfig, resume_dir: Path | None) -> Path:
    """Train (or continue `resume_dir`) in a RunSession while the node's thread shows progress, previews and log
    lines, and turns ComfyUI's Interrupt into a clean stop; returns the run folder of a finished run."""
    comfy_io.free_host_memory()
    session = RunSession()
    # ComfyUI runs nodes under inference_mode; the trainer (its own thread) builds its state from here
    with torch.inference_mode(False):
        if resume_dir is not None:
            log.info(f"[PRDP] continuing {resume_dir}")
            session.resume(resume_dir, **{name: getattr(config, name) for name in RESUMABLE})
        else:
            session.start(config)
    bar, shown_lines, shown_samples, fraction, interrupted = comfy_io.ProgressBar(), 0, 0, 0.0, False
    while True:
        finished = session.wait(0.25)
        state = session.snapshot()
        for line in state.log[len(state.log) - min(state.logged - shown_lines, len(state.log)):]:
            log.info(f"[PRDP] {line}")
        shown_lines = state.logged
        preview = _samples_preview(state) if state.sampled != shown_samples else None
        shown_samples = state.sampled
        fraction = max(fraction, state.fraction())  # a resumed run recomputes its "before" images at the end
        if not interrupted and (comfy_io.interrupted() or not bar.update(fraction, preview)):
            interrupted = True
            session.stop()
        if finished:
            break
    comfy_io.release_memory()
    if interrupted or state.status == "stopped":
        log.info(f"[PRDP] stopped after epoch {state.epoch} of {state.epochs}; queue the prompt again with resume "
                 f"on to continue from there")
        comfy_io.raise_interrupted()
    if state.status != "finished":
        raise PrdpError(state.error or "the run ended without finishing; see the log in its run folder.")
    return state.run_dir


def _samples_preview(state: Snapshot) -> Image.Image | None:
    """The latest epoch's samples in a row, for the node's live preview."""
    images = [image for image, _ in state.samples[:8]]
    return image_grid([images], cell=images[0].width) if images else None


# ---------------------------------------------------------------------------------------------- scoring
class PRDPScoreImages:
    DESCRIPTION = ("Scores any images with a reward mix (for example images made with and without the LoRA): one "
                   "number per image and a table.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FLOAT", "STRING")
    RETURN_NAMES = ("scores", "table")
    OUTPUT_IS_LIST = (True, False)
    FUNCTION = "score"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "images": ("IMAGE", {"tooltip": "The images to score, one by one (e.g. from VAE Decode; not the "
                                 "before/after grid, which is many images in one)."}),
            "reward_mix": (REWARD_MIX, {"tooltip": "PRDP Reward nodes, chained."}),
            "prompts": _text("", "The prompt of every image, or one per line, one line per image (prompt-aware "
                             "rewards such as pickscore and clip need it).", multiline=True),
        }}

    def score(self, images, reward_mix, prompts):
        pictures = [_pil_image(image) for image in images]
        lines = [line.strip() for line in prompts.splitlines() if line.strip()] or [""]
        if len(lines) not in (1, len(pictures)):
            raise ConfigError(f"{len(lines)} prompt lines for {len(pictures)} images; give one prompt for all of "
                              f"them or one line per image.")
        per_image = lines * len(pictures) if len(lines) == 1 else lines
        mix = RewardMix(reward_mix["rewards"], device=comfy_io.torch_device(), options=reward_mix["reward_options"])
        described = mix.describe()
        try:
            total, components = mix.score(pictures, per_image)
        finally:
            del mix  # its reward models: loaded for this call, released for ComfyUI's next models
            comfy_io.release_memory()
        table = _score_table(total, components)
        log.info("[PRDP] scores (%s)\n%s", described, table)
        return {"ui": {"text": [table]}, "result": (total.tolist(), table)}


def _score_table(total: torch.Tensor, components: dict[str, torch.Tensor]) -> str:
    names = list(components) if len(components) > 1 else []  # one component is the total itself
    rows = [["image", "total", *names]]
    rows += [[str(i + 1), f"{total[i].item():.6g}", *(f"{components[n][i].item():.6g}" for n in names)]
             for i in range(total.numel())]
    rows.append(["mean", f"{total.mean().item():.6g}", *(f"{components[n].mean().item():.6g}" for n in names)])
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)


# ---------------------------------------------------------------------------------------------- export
class PRDPExportLoRA:
    DESCRIPTION = ("Writes the LoRA of a finished or stopped run (from output/prdp) to models/loras, in the format "
                   "and precision you choose, with A1111's card files beside it.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("lora_name",)
    FUNCTION = "export"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        runs = [run.path.name for run in _trained_runs()]
        return {"required": {
            "run": ([LATEST_RUN, *runs], {"default": LATEST_RUN, "tooltip": "A run folder in output/prdp that has "
                                          "trained at least one epoch; latest: the newest of them."}),
            "lora_name": _text("prdp_lora", "File name in models/loras (no folders); a file of that name is "
                               "replaced."),
            "format": (list(FORMATS), {"default": "kohya", "tooltip": "kohya loads in ComfyUI, A1111/Forge and "
                                       "diffusers; diffusers loads only in diffusers."}),
            "dtype": (list(EXPORT_DTYPES), {"default": "fp16", "tooltip": "Tensor precision of the file."}),
        }}

    def export(self, run, lora_name, format, dtype):
        stem = _lora_stem(lora_name)
        runs = _trained_runs()
        if run == LATEST_RUN:
            if not runs:
                raise ConfigError("no PRDP run in output/prdp has trained an epoch yet; queue a PRDP Train LoRA node "
                                  "first.")
            chosen = runs[0]
        else:
            chosen = next((r for r in runs if r.path.name == run), None)
            if chosen is None:
                raise ConfigError(f"run {run!r} has no trained epoch in output/prdp; refresh the page and pick "
                                  f"another.")
        path = _export_to_loras(chosen.path, stem, format, dtype)
        done = f"{path.name} from run {chosen.path.name} ({chosen.epochs_done} of {chosen.config.epochs} epochs)"
        log.info(f"[PRDP] exported {done} to {path.parent}")
        return {"ui": {"text": [done]}, "result": (path.name,)}


# ---------------------------------------------------------------------------------------------- helpers
def _trained_runs() -> list[RunFolder]:
    """The runs of output/prdp with at least one trained epoch (a LoRA worth exporting), newest first."""
    return [run for run in list_runs(comfy_io.runs_folder()) if run.epochs_done > 0]


def _lora_stem(name: str) -> str:
    stem = name.strip()
    if stem.lower().endswith(".safetensors"):
        stem = stem[:-len(".safetensors")]
    return check_file_name(stem, "LoRA name")


def _export_to_loras(run_dir: Path, stem: str, format: str, dtype: str) -> Path:
    """The run's latest checkpoint as models/loras/<stem>.safetensors (atomic), with A1111's card files, whose
    thumbnail is the run's own (its latest training sample)."""
    return export_lora(run_dir, comfy_io.loras_folder() / f"{stem}.safetensors", format, dtype, sidecar=True,
                       preview=run_thumbnail(run_dir))


def _pil_image(image: torch.Tensor) -> Image.Image:
    """One [H, W, C] IMAGE in [0, 1] as an 8-bit PIL image (rounded, so that a loaded PNG comes back exactly)."""
    array = (image[..., :3].float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return Image.fromarray(array)


def _image_tensor(path: Path) -> torch.Tensor:
    """An image file as a [1, H, W, 3] IMAGE batch."""
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)[None]


def _ui_image(path: Path) -> dict:
    """How an output node shows a file of ComfyUI's output folder on itself."""
    relative = path.relative_to(comfy_io.output_folder())
    return {"filename": relative.name, "subfolder": str(relative.parent), "type": "output"}


NODE_CLASS_MAPPINGS = {"PRDPReward": PRDPReward, "PRDPTrainLoRA": PRDPTrainLoRA,
                       "PRDPAdvancedSettings": PRDPAdvancedSettings, "PRDPScoreImages": PRDPScoreImages,
                       "PRDPExportLoRA": PRDPExportLoRA}
NODE_DISPLAY_NAME_MAPPINGS = {"PRDPReward": "PRDP Reward", "PRDPTrainLoRA": "PRDP Train LoRA",
                              "PRDPAdvancedSettings": "PRDP Advanced Settings",
                              "PRDPScoreImages": "PRDP Score Images", "PRDPExportLoRA": "PRDP Export LoRA"}
