"""Export of the trained adapter (`LoraWeights`) to files that ComfyUI, A1111/Forge and diffusers load.

kohya layout (the default, as kohya-ss/sd-scripts writes it): for every wrapped module
`lora_unet_<module path with . -> _>` holds `.lora_down.weight` (= PEFT lora_A), `.lora_up.weight` (= lora_B)
and `.alpha` (= the trained lora_alpha, so every host applies scale alpha / rank). No other tensors. The module
path is the diffusers one for SD1/SD2 (kohya trains those on a diffusers-shaped UNet) and the SGM/LDM one for SDXL
(`input_blocks_4_1_...`, as kohya's SDXL UNet names it; `sgm_module_path`). Header metadata: kohya's `ss_*`,
SAI's `modelspec.*`, and our run config under `prdp_*`. Optional A1111 sidecars beside the file: `<name>.json`
(the card editor's user metadata) and `<name>.preview.png` (the card thumbnail).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import save

from .errors import ExportError
from .files import atomic_write_bytes, atomic_write_text
from .lora_weights import LoraWeights
from .models import ModelInfo

EXPORT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FORMATS = ("kohya", "diffusers")
# kohya's ss_base_model_version and SAI ModelSpec architecture (kohya library/sai_model_spec.py: SD2 v-prediction is
# "768-v", SDXL is one architecture whatever its prediction type).
_BASE_VERSION = {("sd1", "epsilon"): "sd_v1", ("sd2", "epsilon"): "sd_v2", ("sd2", "v_prediction"): "sd_v2_v",
                 ("sdxl", "epsilon"): "sdxl_base_v1-0", ("sdxl", "v_prediction"): "sdxl_base_v1-0"}
_ARCHITECTURE = {"sd_v1": "stable-diffusion-v1/lora", "sd_v2": "stable-diffusion-v2-512/lora",
                 "sd_v2_v": "stable-diffusion-v2-768-v/lora", "sdxl_base_v1-0": "stable-diffusion-xl-v1-base/lora"}
# kohya names SD1/SD2 LoRAs by diffusers paths, SDXL LoRAs by the Stability (SGM) UNet's paths.
_IMPLEMENTATION = {"sd1": "diffusers", "sd2": "diffusers", "sdxl": "https://github.com/Stability-AI/generative-models"}
A1111_SD_VERSION = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}  # the card editor's "sd version" choices


def run_thumbnail(run_dir: str | os.PathLike):
    """The run's own card thumbnail (its latest training sample, `<run>/*.preview.png`) as a PIL image, or None."""
    from PIL import Image

    thumbnail = next(iter(sorted(Path(run_dir).glob("*.preview.png"))), None)
    return Image.open(thumbnail) if thumbnail else None


def export_lora(source, path: str | os.PathLike, format: str = "kohya", dtype: str = "fp16",
                name: str | None = None, *, sidecar: bool = False, preview=None) -> Path:
    """Write `source` (LoraWeights, a run folder or a checkpoint adapter file) as a single .safetensors file.

    format "kohya" loads in ComfyUI, A1111/Forge and diffusers (SDXL with SGM block names, as kohya writes it);
    "diffusers" is the PEFT layout with its LoRA config in the header (diffusers only). `name` is the LoRA's
    display name (`ss_output_name`, `modelspec.title`); default the file's stem.

    `sidecar=True` also writes A1111's card metadata `<stem>.json` beside the file, and a PIL image `preview`
    becomes the card thumbnail `<stem>.preview.png`; see `write_a1111_sidecars` for what is kept of files already
    there. Every write is atomic. Returns the path of the LoRA."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; use kohya (ComfyUI/A1111/diffusers) or diffusers.")
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"unknown export dtype {dtype!r}; use fp16, bf16 or fp32.")
    _check_preview(preview)
    weights = _as_weights(source)
    path = Path(path).expanduser()
    if path.suffix.lower() != ".safetensors":
        raise ExportError(f"export path {path} must end in .safetensors.")
    if not path.parent.is_dir():
        raise ExportError(f"cannot write {path}: folder {path.parent} does not exist; create it or choose another "
                          f"folder.")
    if not os.access(path.parent, os.W_OK):
        raise ExportError(f"cannot write {path}: folder {path.parent} is not writable; choose another folder.")
    name = name or path.stem
    torch_dtype = EXPORT_DTYPES[dtype]
    try:
        if format == "kohya":
            tensors = kohya_state_dict(weights, torch_dtype)
            atomic_write_bytes(path, save(tensors, metadata=kohya_metadata(weights, tensors, name)))
        else:
            _save_diffusers(weights, path, torch_dtype)
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc.strerror or exc}; free space or choose another folder.") from None
    if sidecar or preview is not None:
        try:
            write_a1111_sidecars(weights, path, json_file=sidecar, preview=preview)
        except OSError as exc:
            raise ExportError(f"{path} was written but its A1111 card files were not ({exc.strerror or exc}); free "
                              f"space and export again.") from None
    return path


def _as_weights(source) -> LoraWeights:
    if isinstance(source, LoraWeights):
        return source
    from .checkpoints import latest_checkpoint

    source = Path(source)
    if source.is_dir():
        checkpoint = latest_checkpoint(source)
        if checkpoint is None:
            raise ExportError(f"{source} holds no checkpoint; pass a run folder written by `prdp train`.")
        return LoraWeights.load(checkpoint / "adapter.safetensors")
    if source.is_file():
        return LoraWeights.load(source)
    raise ExportError(f"{source} does not exist; pass a run folder written by `prdp train`.")


# -------------------------------------------------------------------------------------------------- kohya
def kohya_name(module: str, model: ModelInfo | None = None) -> str:
    """kohya's module name: `lora_unet_` + the module path with every `.` as `_`; the path is the SGM one for an
    SDXL `model`, the diffusers one otherwise."""
    if model is not None and model.arch == "sdxl":
        module = sgm_module_path(module, model.layers_per_block)
    return "lora_unet_" + module.replace(".", "_")


# diffusers -> SGM names inside a ResnetBlock2D, and of the modules outside the down/mid/up blocks (kohya
# library/sdxl_model_util.py make_unet_conversion_map; ComfyUI comfy/utils.py UNET_MAP_RESNET, UNET_MAP_BASIC).
_SGM_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_SGM_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_BLOCK_PART = re.compile(r"(down_blocks|up_blocks|mid_block)\.(?:(\d+)\.)?(resnets|attentions|downsamplers|upsamplers)"
                         r"\.(\d+)(?:\.(.+))?")


def sgm_module_path(module: str, layers_per_block: int) -> str:
    """The SGM/LDM (Stability generative-models, ComfyUI, A1111) path of a diffusers UNet module path.

    With L = layers_per_block, SGM numbers the UNet's sequential blocks: input_blocks.0 is conv_in; down block i
    fills input_blocks 1 + i(L+1) ... with its layers j (resnet at .0, transformer at .1) and ends with its
    downsampler at input_blocks.(i+1)(L+1).0.op; the middle block is resnet, transformer, resnet at .0 .1 .2;
    up block i has L+1 layers, output_blocks i(L+1)+j (resnet .0, transformer .1), its upsampler after the
    transformer at .2 (SDXL's upsampling up blocks all have transformers). Inside a transformer the names are the
    same in both UNets; inside a resnet they differ (_SGM_RESNET). Checked against kohya's
    make_unet_conversion_map and diffusers' _maybe_map_sgm_blocks_to_diffusers in tests/test_export_sdxl.py."""
    L = layers_per_block
    for prefix, target in _SGM_TOP.items():
        if module == prefix or module.startswith(prefix + "."):
            return target + module[len(prefix):]
    match = _BLOCK_PART.fullmatch(module)
    if match is None:
        raise ExportError(f"UNet module {module!r} has no SGM (SDXL) name; drop it from lora_targets.")
    where, block, kind, layer, rest = match.groups()
    block, layer = int(block or 0), int(layer)
    if kind == "resnets":
        first, _, inner = (rest or "").partition(".")
        if first not in _SGM_RESNET:
            raise ExportError(f"UNet module {module!r} has no SGM (SDXL) name; drop it from lora_targets.")
        rest = _SGM_RESNET[first] + ("." + inner if inner else "")
    if where == "mid_block":
        if kind == "resnets" and layer < 2:
            sgm = f"middle_block.{2 * layer}"
        elif kind == "attentions" and layer == 0:
            sgm = "middle_block.1"
        else:
            raise ExportError(f"UNet module {module!r} does not fit the SDXL middle block (resnet, transformer, "
                              f"resnet); export with format diffusers instead.")
    elif where == "down_blocks":
        if kind == "downsamplers":  # SGM's Downsample keeps its conv as `op`
            first, _, inner = (rest or "").partition(".")
            if first != "conv" or layer != 0:
                raise ExportError(f"UNet module {module!r} has no SGM (SDXL) name; drop it from lora_targets.")
            sgm, rest = f"input_blocks.{(block + 1) * (L + 1)}.0.op", inner or None
        else:
            _check_layer(module, layer, L, L)
            sgm = f"input_blocks.{1 + block * (L + 1) + layer}.{0 if kind == 'resnets' else 1}"
    else:
        if kind == "upsamplers":
            if layer != 0:
                raise ExportError(f"UNet module {module!r} has no SGM (SDXL) name; drop it from lora_targets.")
            sgm = f"output_blocks.{block * (L + 1) + L}.2"
        else:
            _check_layer(module, layer, L + 1, L)
            sgm = f"output_blocks.{block * (L + 1) + layer}.{0 if kind == 'resnets' else 1}"
    return sgm + ("." + rest if rest else "")


def _check_layer(module: str, layer: int, limit: int, layers_per_block: int) -> None:
    if layer >= limit:  # its SGM number would collide with the next block's
        raise ExportError(f"UNet module {module!r} does not fit SGM block numbering for {layers_per_block} layers per "
                          f"block (the model's blocks differ in depth); export with format diffusers instead.")


def kohya_state_dict(weights: LoraWeights, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    tensors = {}
    for module in weights.modules():
        stem = kohya_name(module, weights.model)
        if f"{stem}.alpha" in tensors:  # two modules, one name: the file would silently lose one
            raise ExportError(f"two UNet modules map to the kohya name {stem}; export with format diffusers instead.")
        tensors[f"{stem}.lora_down.weight"] = weights.state_dict[f"{module}.lora_A.weight"].to(dtype).contiguous()
        tensors[f"{stem}.lora_up.weight"] = weights.state_dict[f"{module}.lora_B.weight"].to(dtype).contiguous()
        tensors[f"{stem}.alpha"] = torch.tensor(weights.alpha, dtype=torch.float32)  # exact in any weight dtype
    return tensors


def kohya_metadata(weights: LoraWeights, tensors: dict[str, torch.Tensor], name: str) -> dict[str, str]:
    model = weights.model
    base_version = _BASE_VERSION.get((model.arch, model.prediction_type), "sd_v1")
    now = time.time()
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(weights.rank),
        "ss_network_alpha": f"{weights.alpha:g}",
        "ss_network_args": "{}",
        "ss_base_model_version": base_version,
        "ss_v2": str(model.arch == "sd2"),  # "True" only for SD2: A1111 reads "sdxl_" first, then ss_v2
        "ss_output_name": name,
        "ss_sd_model_name": _model_name(model),
        "ss_resolution": f"({model.resolution}, {model.resolution})",
        "ss_training_started_at": weights.training.get("prdp_started_at", str(now)),
        "ss_training_finished_at": weights.training.get("prdp_finished_at", str(now)),
        "ss_steps": weights.training.get("prdp_steps", "0"),
        "ss_epoch": weights.training.get("prdp_epoch", "0"),
        "ss_num_epochs": weights.training.get("prdp_epochs", "0"),
        "ss_learning_rate": weights.training.get("prdp_learning_rate", ""),
        "ss_seed": weights.training.get("prdp_seed", ""),
        "ss_optimizer": "torch.optim.adamw.AdamW",
        "ss_training_comment": f"PRDP reward finetuning; reward: {weights.training.get('prdp_reward_mix', '?')}",
    }
    model_hash, legacy_hash = kohya_hashes(tensors, meta)
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = model_hash, legacy_hash
    meta.update({
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": _ARCHITECTURE[base_version],
        "modelspec.implementation": _IMPLEMENTATION.get(model.arch, "diffusers"),
        "modelspec.title": name,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)),
        "modelspec.resolution": f"{model.resolution}x{model.resolution}",
        "modelspec.prediction_type": "v" if model.prediction_type == "v_prediction" else "epsilon",
        "modelspec.description": meta["ss_training_comment"],
    })
    meta.update(weights.training)
    return {k: v for k, v in meta.items() if v != ""}


def _model_name(model: ModelInfo) -> str:
    return os.path.basename(model.name.rstrip("/\\")) or model.name  # no local paths in shared files


def kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """kohya's `precalculate_safetensors_hashes`: sha256 of the tensor bytes of the file written with only the
    `ss_*` metadata, and the 8-character legacy hash; A1111 shows these as the LoRA's hash."""
    data = save(tensors, metadata={k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_len:]).hexdigest()
    legacy = io.BytesIO(data)
    legacy.seek(0x100000)
    legacy_hash = hashlib.sha256(legacy.read(0x10000)).hexdigest()[:8]
    return model_hash, legacy_hash


# -------------------------------------------------------------------------------------------------- diffusers
def _save_diffusers(weights: LoraWeights, path: Path, dtype: torch.dtype) -> None:
    """diffusers' own writer (keys `unet.<path>.lora_A.weight`), with the LoRA scale alpha / rank folded into lora_B.

    Such a file carries no alpha: diffusers before 0.34 cannot store or read one and loads it as alpha = rank (scale
    1), as later releases do for a file without adapter metadata. Folded, every release loads the trained strength."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    scale = weights.alpha / weights.rank
    layers = {k: (v * scale if ".lora_B." in k else v).to(dtype).contiguous() for k, v in weights.state_dict.items()}
    folder = tempfile.mkdtemp(prefix=".prdp-export-", dir=path.parent)
    try:
        pipeline = StableDiffusionXLPipeline if weights.model.arch == "sdxl" else StableDiffusionPipeline
        pipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name=path.name)
        os.replace(Path(folder) / path.name, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -------------------------------------------------------------------------------------------------- A1111 sidecars
A1111_JSON_KEYS = ("description", "sd version", "activation text", "preferred weight", "negative text", "notes")
_WRITTEN = "prdp export"  # our last values of A1111_JSON_KEYS, kept in the file to tell them from a user's edits
_OBJECTIVES = {"prdp": "PRDP (Proximal Reward Difference Prediction)", "ddpo": "DDPO (the PPO-clip baseline, not PRDP)"}
_PREVIEW_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".avif")  # what A1111/Forge look for as a thumbnail


def a1111_user_metadata(weights: LoraWeights) -> dict:
    """The card fields of AUTOMATIC1111's extra-networks editor (extensions-builtin/Lora/ui_edit_user_metadata.py),
    with its value types: all strings but "preferred weight", a float (0 = use the global default multiplier)."""
    training, model = weights.training, weights.model
    reward = training.get("prdp_reward_mix", "an unrecorded reward")
    objective = _OBJECTIVES.get(training.get("prdp_objective", "prdp"), training.get("prdp_objective", ""))
    notes = [f"Base model: {_model_name(model)} ({model.arch}, {model.resolution}px, {model.prediction_type}).",
             f"LoRA rank {weights.rank}, alpha {weights.alpha:g}, {len(weights.modules())} UNet modules."]
    if training.get("prdp_steps"):
        notes.append(f"Trained {training.get('prdp_epoch', '?')}/{training.get('prdp_epochs', '?')} epochs, "
                     f"{training['prdp_steps']} optimiser steps, learning rate "
                     f"{training.get('prdp_learning_rate', '?')}, seed {training.get('prdp_seed', '?')}.")
    notes.append("Made with prdp-lora. Strength 1 is the trained strength.")
    return {
        "description": f"Reward finetune with {objective} for reward {reward}.",
        "sd version": A1111_SD_VERSION.get(model.arch, "Unknown"),
        "activation text": "",  # reward finetunes have no trigger word
        "preferred weight": 1.0,
        "negative text": "",
        "notes": "\n".join(notes),
    }


def write_a1111_sidecars(weights: LoraWeights, lora_path: str | os.PathLike, *, json_file: bool = True,
                         preview=None) -> list[Path]:
    """Write A1111's card files beside `lora_path`: `<stem>.json` (when `json_file`) and, for a PIL `preview`,
    `<stem>.preview.png`. Returns the paths written.

    What is kept of files already there (a user's edits are never lost, our own stale values are refreshed):
    - `<stem>.json`: each card field is replaced only when it is missing or still holds the value our previous
      export wrote (recorded under the "prdp export" key, which A1111's editor preserves); a field the user
      edited, and every other key, stay as they are. An existing file that is not a JSON object is left untouched
      (with a warning).
    - `<stem>.preview.png` is ours and is replaced; it is not written when the folder already holds another
      thumbnail for this LoRA (`<stem>.png`/`.jpg`/..., where A1111's "Replace preview" saves, or
      `<stem>.preview.jpg`/...), so a user's chosen picture keeps showing."""
    _check_preview(preview)
    lora_path = Path(lora_path)
    stem = lora_path.with_suffix("")
    written = []
    if json_file:
        target = stem.with_name(stem.name + ".json")
        ours = a1111_user_metadata(weights)
        data = {}
        if target.exists():
            try:
                data = json.loads(target.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                data = None
            if not isinstance(data, dict):
                warnings.warn(f"{target} exists and is not A1111 card metadata (a JSON object); left it unchanged.",
                              stacklevel=2)
                data = None
        if data is not None:
            previous = data.get(_WRITTEN) if isinstance(data.get(_WRITTEN), dict) else {}
            for key, value in ours.items():
                if key not in data or (key in previous and data[key] == previous[key]):
                    data[key] = value
            data[_WRITTEN] = ours
            # A1111's own writer: json.dump(indent=4, ensure_ascii=False), UTF-8
            atomic_write_text(target, json.dumps(data, indent=4, ensure_ascii=False))
            written.append(target)
    if preview is not None:
        target = stem.with_name(stem.name + ".preview.png")
        others = [stem.with_name(stem.name + middle + suffix) for suffix in _PREVIEW_SUFFIXES
                  for middle in ("", ".preview")]
        if not any(p.exists() for p in others if p != target):
            if preview.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
                preview = preview.convert("RGB")  # e.g. CMYK has no PNG form
            buffer = io.BytesIO()
            preview.save(buffer, format="PNG")
            atomic_write_bytes(target, buffer.getvalue())
            written.append(target)
    return written


def _check_preview(preview) -> None:
    if preview is None:
        return
    from PIL import Image

    if not isinstance(preview, Image.Image):
        raise ExportError(f"preview must be a PIL image, not {type(preview).__name__}; convert it with "
                          f"PIL.Image.fromarray.")


def training_metadata(config, epoch: int, started_at: float, finished_at: float, reward_mix: str) -> dict[str, str]:
    """The prdp_* header entries of a LoRA: how it was trained, with the config made shareable."""
    return {
        "prdp_started_at": str(started_at),
        "prdp_finished_at": str(finished_at),
        "prdp_epoch": str(epoch),
        "prdp_epochs": str(config.epochs),
        "prdp_steps": str(epoch * config.updates_per_epoch),
        "prdp_learning_rate": repr(config.learning_rate),
        "prdp_seed": str(config.seed),
        "prdp_objective": config.objective,
        "prdp_reward_mix": reward_mix,
        "prdp_config": json.dumps(shareable_config(config.to_dict())),
    }


def shareable_config(config: dict) -> dict:
    """The config as written into a LoRA that may be shared: file paths reduced to their names."""
    shared = dict(config)
    for key in ("model", "vae", "prompts", "eval_prompts", "output_dir"):
        if shared[key] and not shared[key].startswith("builtin:"):
            shared[key] = Path(shared[key]).name
    shared["rewards"] = {Path(name).name if "/" in name or "\\" in name else name: weight
                         for name, weight in shared["rewards"].items()}
    shared["reward_options"] = {name: {key: shareable_option(value) for key, value in options.items()}
                                for name, options in shared["reward_options"].items()}
    return shared


def shareable_option(value):
    if isinstance(value, str) and "://" in value:
        return "<url>"  # a reward server's address may name a private host or carry an access token
    if isinstance(value, str) and ("/" in value or "\\" in value):
        return Path(value).name
    return value
