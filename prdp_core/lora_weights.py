"""The trained adapter as data, independent of any model object: what checkpoints hold and what export writes."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import ExportError
from .files import atomic_path
from .models import ModelInfo


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
