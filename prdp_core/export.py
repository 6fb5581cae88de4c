"""The trained adapter as data (`LoraWeights`), and its export to files that ComfyUI, A1111/Forge and diffusers load.

kohya layout (the default; see shared/reference/lora-and-hosts.md section 1): for every wrapped module
`lora_unet_<diffusers path with . -> _>` holds `.lora_down.weight` (= PEFT lora_A), `.lora_up.weight` (= lora_B)
and `.alpha` (= the trained lora_alpha, so every host applies scale alpha / rank). No other tensors. Header
metadata: kohya's `ss_*`, SAI's `modelspec.*`, and our run config under `prdp_*`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save, save_file

from .errors import ExportError
from .files import atomic_path, atomic_write_bytes
from .models import ModelInfo

EXPORT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FORMATS = ("kohya", "diffusers")
_BASE_VERSION = {("sd1", "epsilon"): "sd_v1", ("sd2", "epsilon"): "sd_v2", ("sd2", "v_prediction"): "sd_v2_v"}
_ARCHITECTURE = {"sd_v1": "stable-diffusion-v1/lora", "sd_v2": "stable-diffusion-v2-512/lora",
                 "sd_v2_v": "stable-diffusion-v2-768-v/lora"}


@dataclass
class LoraWeights:
    """A UNet LoRA independent of any model object: PEFT-named fp32 tensors plus what is needed to export them."""

    state_dict: dict[str, torch.Tensor]  # "down_blocks.1...attn1.to_q.lora_A.weight" -> tensor
    rank: int
    alpha: float
    targets: list[str]
    model: ModelInfo
    training: dict[str, str] = field(default_factory=dict)  # prdp_* metadata (config, reward mix, steps, ...)

    @classmethod
    def from_unet(cls, unet, model: ModelInfo, training: dict[str, str] | None = None) -> "LoraWeights":
        from peft.utils import get_peft_model_state_dict

        config = unet.peft_config["default"]
        state = {k: v.detach().float().cpu().clone() for k, v in get_peft_model_state_dict(unet).items()}
        return cls(state, int(config.r), float(config.lora_alpha), sorted(config.target_modules), model,
                   dict(training or {}))

    def modules(self) -> list[str]:
        """Module paths in a stable order."""
        names = []
        for key in self.state_dict:
            module, _, suffix = key.rpartition(".lora_")
            if suffix not in ("A.weight", "B.weight"):
                raise ExportError(f"unexpected adapter tensor {key!r}; only plain LoRA (lora_A/lora_B) can be exported.")
            if suffix == "A.weight":
                names.append(module)
        return sorted(names)

    # -------------------------------------------------------------- the checkpoint file (lossless, fp32, PEFT names)
    def save(self, path: str | os.PathLike) -> None:
        meta = {"prdp_format": "peft-lora-v1", "prdp_rank": str(self.rank), "prdp_alpha": repr(self.alpha),
                "prdp_targets": json.dumps(self.targets), "prdp_model": json.dumps(self.model.__dict__), **self.training}
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in self.state_dict.items()}, str(tmp), metadata=meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "LoraWeights":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        except (OSError, SafetensorError) as exc:
            raise ExportError(f"{path} cannot be read ({exc}); it is missing or damaged.") from None
        if meta.get("prdp_format") != "peft-lora-v1":
            raise ExportError(f"{path} is not a prdp checkpoint adapter file.")
        training = {k: v for k, v in meta.items()
                    if k.startswith("prdp_") and k not in ("prdp_format", "prdp_rank", "prdp_alpha", "prdp_targets",
                                                           "prdp_model")}
        return cls(state, int(meta["prdp_rank"]), float(meta["prdp_alpha"]), json.loads(meta["prdp_targets"]),
                   ModelInfo(**json.loads(meta["prdp_model"])), training)


def export_lora(source, path: str | os.PathLike, format: str = "kohya", dtype: str = "fp16",
                name: str | None = None) -> Path:
    """Write `source` (LoraWeights, a run folder or a checkpoint adapter file) as a single .safetensors file.

    format "kohya" loads in ComfyUI, A1111/Forge and diffusers; "diffusers" is the PEFT layout with its LoRA
    config in the header (diffusers only). The write is atomic. Returns the path written."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; use kohya (ComfyUI/A1111/diffusers) or diffusers.")
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"unknown export dtype {dtype!r}; use fp16, bf16 or fp32.")
    weights = _as_weights(source)
    path = Path(path).expanduser()
    if path.suffix.lower() != ".safetensors":
        raise ExportError(f"export path {path} must end in .safetensors.")
    if not path.parent.is_dir():
        raise ExportError(f"cannot write {path}: folder {path.parent} does not exist; create it or choose another "
                          f"--out.")
    if not os.access(path.parent, os.W_OK):
        raise ExportError(f"cannot write {path}: folder {path.parent} is not writable; choose another --out.")
    name = name or path.stem
    torch_dtype = EXPORT_DTYPES[dtype]
    try:
        if format == "kohya":
            tensors = kohya_state_dict(weights, torch_dtype)
            atomic_write_bytes(path, save(tensors, metadata=kohya_metadata(weights, tensors, name)))
        else:
            _save_diffusers(weights, path, torch_dtype)
    except OSError as exc:
        raise ExportError(f"cannot write {path}: {exc.strerror or exc}; free space or choose another --out.") from None
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
def kohya_name(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def kohya_state_dict(weights: LoraWeights, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    tensors = {}
    for module in weights.modules():
        stem = kohya_name(module)
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
        "ss_v2": str(model.arch == "sd2"),
        "ss_output_name": name,
        "ss_sd_model_name": os.path.basename(model.name.rstrip("/\\")) or model.name,  # no local paths
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
        "modelspec.implementation": "diffusers",
        "modelspec.title": name,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)),
        "modelspec.resolution": f"{model.resolution}x{model.resolution}",
        "modelspec.prediction_type": "v" if model.prediction_type == "v_prediction" else "epsilon",
        "modelspec.description": meta["ss_training_comment"],
    })
    meta.update(weights.training)
    return {k: v for k, v in meta.items() if v != ""}


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
    """diffusers' own writer (keys `unet.<path>.lora_A.weight`, LoraConfig in `lora_adapter_metadata`), so the
    alpha survives a `load_lora_weights`."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    config = LoraConfig(r=weights.rank, lora_alpha=weights.alpha, target_modules=list(weights.targets)).to_dict()
    config["target_modules"] = sorted(config["target_modules"])
    layers = {k: v.to(dtype).contiguous() for k, v in weights.state_dict.items()}
    folder = tempfile.mkdtemp(prefix=".prdp-export-", dir=path.parent)
    try:
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers, weight_name=path.name,
                                                  unet_lora_adapter_metadata=config)
        os.replace(Path(folder) / path.name, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
