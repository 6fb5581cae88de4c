"""CLIP-based rewards: `aesthetic` (LAION aesthetic predictor v2), `pickscore` (PickScore_v1) and `clip_score`.

All three embed images (and prompts) with a transformers `CLIPModel` and differ only in the head on top. Images
are preprocessed here with PIL/NumPy exactly as transformers' PIL `CLIPImageProcessor` does (the processor the
reference implementations ran with, transformers 4.x): shortest side resized to `size` with the configured
resampling (bicubic), centre crop, times `rescale_factor` (1/255), normalised with the processor's mean/std. Doing
it here keeps the numbers identical across transformers 4.40+ and 5.x, where `CLIPImageProcessor` became a
torchvision backend that resizes differently (and needs torchvision)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, TypeVar

import numpy as np
import torch
from torch import nn

from ..errors import RewardError, library_reason
from .base import Reward, register_reward

T = TypeVar("T")

CLIP_L14 = "openai/clip-vit-large-patch14"
CLIP_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
PICKSCORE = "yuvalkirstain/PickScore_v1"
# sac+logos+ava1-l14-linearMSE.pth (sha256 21dd590f...f0f1e0), renamed by TRL for its DDPO example.
AESTHETIC_HEAD = "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth"
MAX_TOKENS = 77  # CLIP's text context, as PickScore's and flow_grpo's scorers truncate


@dataclass(frozen=True)
class ClipPreprocess:
    """The CLIP image preprocessing of a `preprocessor_config.json` (PIL in, normalised pixel tensor out)."""

    shortest_edge: int
    crop_height: int
    crop_width: int
    resample: int
    rescale_factor: float
    mean: np.ndarray  # float32 [3]
    std: np.ndarray

    @classmethod
    def from_config(cls, config: dict) -> "ClipPreprocess":
        # Hub CLIP configs store sizes as plain ints (old format); newer ones as dicts.
        size, crop = config.get("size", 224), config.get("crop_size", 224)
        if not all(config.get(flag, True) for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize")) \
                or (isinstance(size, dict) and "shortest_edge" not in size):
            raise ValueError(f"unsupported image preprocessing (need resize to the shortest edge, centre crop, "
                             f"rescale and normalise): {config}")
        return cls(shortest_edge=size["shortest_edge"] if isinstance(size, dict) else size,
                   crop_height=crop["height"] if isinstance(crop, dict) else crop,
                   crop_width=crop["width"] if isinstance(crop, dict) else crop,
                   resample=config.get("resample", 3), rescale_factor=config.get("rescale_factor", 1 / 255),
                   mean=np.asarray(config["image_mean"], dtype=np.float32),
                   std=np.asarray(config["image_std"], dtype=np.float32))

    def __call__(self, images: list) -> torch.Tensor:
        return torch.from_numpy(np.stack([self._one(image) for image in images]))

    def _one(self, image) -> np.ndarray:
        from PIL import Image

        image = image.convert("RGB")
        width, height = image.size
        short, long = min(width, height), max(width, height)
        new_long = int(self.shortest_edge * long / short)  # truncates, as transformers does
        size = (self.shortest_edge, new_long) if width <= height else (new_long, self.shortest_edge)
        image = image.resize(size, resample=Image.Resampling(self.resample))
        left, top = (size[0] - self.crop_width) // 2, (size[1] - self.crop_height) // 2
        image = image.crop((left, top, left + self.crop_width, top + self.crop_height))
        # transformers rescales in float64, then casts to float32 and normalises in float32.
        pixels = (np.asarray(image, dtype=np.float64) * self.rescale_factor).astype(np.float32)
        return ((pixels - self.mean) / self.std).transpose(2, 0, 1)


class ClipEncoder:
    """A CLIP model with its processor's preprocessing and tokeniser: L2-normalised fp32 image/text embeddings."""

    def __init__(self, model: nn.Module, preprocess: ClipPreprocess, tokenizer, device: torch.device,
                 dtype: torch.dtype):
        # Read before the cast, in fp32: bf16 would round the temperature (100 to 98.9) and so scale every score.
        self.logit_scale = model.logit_scale.detach().float().exp().to(device)
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.preprocess, self.tokenizer, self.device, self.dtype = preprocess, tokenizer, device, dtype
        self.embedding_size: int = model.config.projection_dim

    @classmethod
    def load(cls, reward: str, model: tuple[str, str], processor: tuple[str, str], device: torch.device,
             dtype: torch.dtype, text: bool = True) -> "ClipEncoder":
        """`model` and `processor` are (option name, hub id or folder); the tokeniser comes from the processor."""
        from transformers import AutoTokenizer, CLIPModel
        from transformers.image_processing_utils import ImageProcessingMixin

        (model_option, model_spec), (processor_option, processor_spec) = model, processor
        model_spec, processor_spec = os.path.expanduser(model_spec), os.path.expanduser(processor_spec)
        # get_image_processor_dict reads preprocessor_config.json, or the processor_config.json transformers 5 saves.
        preprocess = _loading(reward, processor_option, processor_spec, lambda: ClipPreprocess.from_config(
            ImageProcessingMixin.get_image_processor_dict(processor_spec)[0]))
        tokenizer = (_loading(reward, processor_option, processor_spec,
                              lambda: AutoTokenizer.from_pretrained(processor_spec)) if text else None)
        # Load as stored, then cast: `torch_dtype=` / `dtype=` differ between transformers 4.x and 5.x.
        clip = _loading(reward, model_option, model_spec, lambda: CLIPModel.from_pretrained(model_spec))
        return cls(clip, preprocess, tokenizer, device, dtype)

    def images(self, images: list) -> torch.Tensor:
        pixels = self.preprocess(images).to(self.device, self.dtype)
        # = CLIPModel.get_image_features, whose return type changed in transformers 5.
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return _unit(self.model.visual_projection(pooled))

    def texts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                                return_tensors="pt").to(self.device)
        pooled = self.model.text_model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
        return _unit(self.model.text_projection(pooled))


def _unit(features: torch.Tensor) -> torch.Tensor:
    features = features.float()
    return features / torch.linalg.vector_norm(features, dim=-1, keepdim=True)


def _is_path(spec: str) -> bool:
    """A local file or folder, as opposed to a hub reference (owner/repo, or owner/repo/file for the head)."""
    return os.path.exists(spec) or spec.startswith((os.sep, "."))


def _loading(reward: str, option: str, spec: str, load: Callable[[], T]) -> T:
    """Run `load`; a missing path, unreachable hub or unreadable weights becomes one RewardError sentence that
    names the option to set (the original error stays chained for the log)."""
    try:
        return load()
    except (OSError, ValueError) as exc:
        reason = library_reason(exc, clause=True)
        fix = f"the {option} option of the {reward} reward"
        if os.path.exists(spec):
            message = f"could not load {option} {spec} ({reason}); pass files in the default's format with {fix}"
        elif _is_path(spec):
            message = f"{option} {spec} does not exist; pass an existing path with {fix}"
        else:
            message = (f"could not get {option} {spec!r} from the hub ({reason}); download it (`hf download` on a "
                       f"machine with access) and pass its path as {fix}")
        raise RewardError(f"reward {reward!r}: {message}.") from exc


def _head_file(spec: str) -> str:
    """A local file, or a hub file given as owner/repo/path/in/repo (downloaded once, then cached)."""
    if _is_path(spec):
        return spec
    if spec.count("/") < 2:
        raise ValueError("neither an existing file nor a hub file owner/repo/file")
    from huggingface_hub import hf_hub_download

    owner, repo, filename = spec.split("/", 2)
    return hf_hub_download(f"{owner}/{repo}", filename)


def load_aesthetic_head(path: str) -> nn.Sequential:
    """The LAION aesthetic MLP from a state dict with its layout (`layers.{0,2,4,6,7}.weight/bias`): Linear
    in->1024, Dropout 0.2, Linear 1024->128, Dropout 0.2, Linear 128->64, Dropout 0.1, Linear 64->16, Linear 16->1,
    no activations. Layer sizes come from the weights, so `in` follows the CLIP projection size."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    try:
        linear = [nn.Linear(*state[f"layers.{i}.weight"].shape[::-1]) for i in (0, 2, 4, 6, 7)]
    except (KeyError, TypeError, AttributeError):
        raise ValueError(f"{os.path.basename(path)} is not a state dict with keys layers.0/2/4/6/7.weight") from None
    layers = nn.Sequential(linear[0], nn.Dropout(0.2), linear[1], nn.Dropout(0.2), linear[2], nn.Dropout(0.1),
                           linear[3], linear[4])
    layers.load_state_dict({key.removeprefix("layers."): value for key, value in state.items()})
    return layers.eval()


@register_reward("aesthetic")
class Aesthetic(Reward):
    """LAION improved aesthetic predictor v2 (a 1-10 rating scale; SD 1.5 images score about 5-6). Prompts unused.

    Reference: christophschuhmann/improved-aesthetic-predictor `simple_inference.py`, as kvablack/ddpo-pytorch
    `ddpo_pytorch/aesthetic_scorer.py` runs it through transformers: CLIP ViT-L/14 image features (CLIPProcessor
    preprocessing), L2-normalised, into the MLP of `sac+logos+ava1-l14-linearMSE.pth`. Options: `clip`, a hub id or
    folder with the CLIP model and its preprocessor_config.json; `head`, a local .pth/.safetensors file or a hub file
    as owner/repo/file (the default is the TRL copy of sac+logos+ava1-l14-linearMSE.pth). The head runs in fp32
    whatever `dtype` (it is tiny, and its output is the reward)."""

    name = "aesthetic"
    batch_size = 32

    def __init__(self, device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32",
                 clip: str = CLIP_L14, head: str = AESTHETIC_HEAD):
        super().__init__(device, dtype)
        self.clip_spec, self.head_spec = clip, head

    def load(self) -> None:
        self.encoder = ClipEncoder.load(self.name, ("clip", self.clip_spec), ("clip", self.clip_spec), self.device,
                                        self.dtype, text=False)
        head_spec = os.path.expanduser(self.head_spec)
        self.head = _loading(self.name, "head", head_spec, lambda: load_aesthetic_head(_head_file(head_spec)))
        if self.head[0].in_features != self.encoder.embedding_size:
            raise RewardError(f"aesthetic head {self.head_spec!r} takes {self.head[0].in_features}-d embeddings but "
                              f"CLIP {self.clip_spec!r} gives {self.encoder.embedding_size}-d; pair the head with the "
                              f"CLIP model it was trained on (ViT-L/14 for the LAION head).")
        self.head.to(self.device)

    @torch.no_grad()
    def score_batch(self, images, prompts):
        return self.head(self.encoder.images(images)).squeeze(1).cpu()


@register_reward("pickscore")
class PickScore(Reward):
    """PickScore_v1: logit_scale.exp() * cos(image, prompt) (logit_scale.exp() is about 100, so raw scores are
    about 18-24 for SD images; flow_grpo divides by 26 to get roughly 0-1, this reward does not).

    Reference: yuvalkirstain/PickScore `README.md` (calc_probs) and yifan123/flow_grpo `flow_grpo/pickscore_scorer.py`:
    processor `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (CLIP image preprocessing; tokens truncated to 77, here padded
    to 77 rather than to the longest prompt, which the causal text tower ignores), model
    `yuvalkirstain/PickScore_v1`; image i is paired with prompt i. Options: `model` and `processor`, hub ids or
    folders."""

    name = "pickscore"
    batch_size = 16  # ViT-H/14

    def __init__(self, device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32",
                 model: str = PICKSCORE, processor: str = CLIP_H14):
        super().__init__(device, dtype)
        self.model_spec, self.processor_spec = model, processor

    def load(self) -> None:
        self.encoder = ClipEncoder.load(self.name, ("model", self.model_spec), ("processor", self.processor_spec),
                                        self.device, self.dtype)

    @torch.no_grad()
    def score_batch(self, images, prompts):
        cosine = (self.encoder.images(images) * self.encoder.texts(prompts)).sum(-1)
        return (self.encoder.logit_scale * cosine).cpu()


@register_reward("clip_score")
class ClipScore(Reward):
    """CLIP score, torchmetrics' scale: 100 * cos(image, prompt) (roughly 20-35 for an image matching its prompt).

    Reference: Lightning-AI/torchmetrics `functional/multimodal/clip_score.py` (default model
    openai/clip-vit-large-patch14, CLIPProcessor preprocessing, per-pair 100 * cosine). The 100x keeps numbers
    comparable with published CLIP scores, which use this convention. torchmetrics clamps only the batch
    *mean* at 0; a per-image clamp would flatten the ranking of off-prompt images, so none is applied here. Prompts
    are truncated to 77 tokens keeping the end token (torchmetrics cuts it off). Option: `model`, a hub id or folder
    with the CLIP model, its preprocessor_config.json and tokenizer."""

    name = "clip_score"
    batch_size = 32

    def __init__(self, device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32",
                 model: str = CLIP_L14):
        super().__init__(device, dtype)
        self.model_spec = model

    def load(self) -> None:
        self.encoder = ClipEncoder.load(self.name, ("model", self.model_spec), ("model", self.model_spec), self.device,
                                        self.dtype)

    @torch.no_grad()
    def score_batch(self, images, prompts):
        return (100 * (self.encoder.images(images) * self.encoder.texts(prompts)).sum(-1)).cpu()
