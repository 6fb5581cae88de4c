"""Loading the base model, building tiny SD-shaped models for tests, and attaching the LoRA."""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from .clip_tokenizer import build_tokenizer
from .errors import ModelLoadError, library_reason

# builtin:toy (the default) is the toy-world model trained by prdp_core.toy.train_model and shipped in the package;
# builtin:tiny and builtin:tiny-xl have random weights in SD1 and SDXL shapes (fast tests of the machinery);
# builtin:random-* are the real architectures with random weights (memory and speed benchmarks, no download).
RANDOM_MODELS = {"builtin:random-sd15": "sd15", "builtin:random-sd21": "sd21", "builtin:random-sdxl": "sdxl_base"}
BUILTIN_MODELS = ("builtin:toy", "builtin:tiny", "builtin:tiny-xl", *RANDOM_MODELS)
MODEL_CONFIGS_DIR = Path(__file__).parent / "model_configs"
TOY_MODEL_DIR = Path(__file__).parent / "toy" / "weights" / "model"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


@dataclass(frozen=True)
class ModelInfo:
    """What the exporter and the hosts need to know about the base model."""

    name: str  # as the user gave it
    arch: str  # "sd1" | "sd2" | "sdxl"
    prediction_type: str  # "epsilon" | "v_prediction"
    resolution: int  # native image side in pixels
    layers_per_block: int = 2  # UNet resnets per down block: SGM block numbers (SDXL export) depend on it


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ModelLoadError(f"device {device!r} is not a device name; use auto, cpu, cuda, cuda:N or mps.") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was requested but this torch has no CUDA; set the device to cpu "
                             f"or install a CUDA build of torch.")
    return resolved


def load_pipeline(spec: str, dtype: str = "fp32", device: str | torch.device = "cpu", vae: str = "",
                  prediction_type: str = "auto"):
    """A StableDiffusionPipeline or StableDiffusionXLPipeline with a DDIM scheduler, from a builtin name, a local
    diffusers folder, a single-file checkpoint (offline: configs and tokenizers ship with us) or a hub id. `vae` is
    an optional separate VAE file replacing the model's own; `prediction_type` overrides the model's ("auto" keeps
    it). Raises ModelLoadError with the fix when that is impossible."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from .single_file import load_single_file

    torch_dtype = DTYPES[dtype]
    if spec.startswith("builtin:"):
        if spec not in BUILTIN_MODELS:
            raise ModelLoadError(f"unknown builtin model {spec!r}; choose one of {', '.join(BUILTIN_MODELS)}.")
        if spec == "builtin:tiny":
            pipe = build_tiny_pipeline()
        elif spec == "builtin:tiny-xl":
            pipe = build_tiny_xl_pipeline()
        elif spec in RANDOM_MODELS:
            pipe = build_random_pipeline(MODEL_CONFIGS_DIR / RANDOM_MODELS[spec], torch_dtype, device)
        elif not (TOY_MODEL_DIR / "model_index.json").is_file():
            raise ModelLoadError(f"the toy model's weights are missing from this installation ({TOY_MODEL_DIR}); "
                                 f"reinstall prdp-lora, or rebuild them with python -m prdp_core.toy.train_model.")
        else:
            with _no_progress_bars():  # a 10 MB local folder: loading bars would only clutter the output
                pipe = _wrap_load(spec, lambda: StableDiffusionPipeline.from_pretrained(
                    str(TOY_MODEL_DIR), torch_dtype=torch_dtype, local_files_only=True))
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise ModelLoadError(f"{spec} is a folder but not a diffusers model (no model_index.json); pass a "
                                     f"diffusers folder or a .safetensors checkpoint file.")
            pipeline_class = _pipeline_class(_folder_class_name(path, spec), spec)
            pipe = _wrap_load(spec, lambda: pipeline_class.from_pretrained(
                str(path), torch_dtype=torch_dtype, **_load_kwargs(pipeline_class)))
        elif path.is_file():
            if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
                raise ModelLoadError(f"{spec} is not a model checkpoint; pass a .safetensors/.ckpt file or a "
                                     f"diffusers folder.")
            pipe = load_single_file(path, torch_dtype, None if prediction_type == "auto" else prediction_type,
                                    vae or None)
            vae = ""  # already in place
        elif _looks_like_path(spec):
            raise ModelLoadError(f"model path {spec} does not exist; check the path, or pass a hub id such as "
                                 f"stable-diffusion-v1-5/stable-diffusion-v1-5.")
        else:
            def from_hub():
                from diffusers import DiffusionPipeline

                pipeline_class = _pipeline_class(DiffusionPipeline.load_config(spec).get("_class_name", ""), spec)
                return pipeline_class.from_pretrained(spec, torch_dtype=torch_dtype, **_load_kwargs(pipeline_class))
            pipe = _wrap_load(spec, from_hub)
    _check_architecture(pipe, spec)
    if vae:
        from .single_file import CONFIG_FOLDERS, load_vae

        pipe.vae = load_vae(vae, CONFIG_FOLDERS["sdxl_base" if is_sdxl(pipe) else "sd15"], torch_dtype)
    if prediction_type != "auto":
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, prediction_type=prediction_type)
    # DDIM with eta > 0 is the policy whose per-step log-probs we train; x0-clipping would make its mean
    # non-smooth, so it is off whatever the checkpoint's own scheduler said.
    # set_alpha_to_one=False keeps the last step's sigma > 0 (DDPO's clamp); with True its log-prob is undefined.
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, thresholding=False,
                                               set_alpha_to_one=False)
    if pipe.unet.dtype != torch_dtype:  # builtin models are built in fp32; hub/folder loads already are torch_dtype
        pipe.to(dtype=torch_dtype)
    if torch_dtype == torch.float16 and pipe.vae.config.get("force_upcast", False):
        pipe.vae.to(torch.float32)  # SDXL's VAE overflows in fp16 (the stock pipeline upcasts it the same way)
    pipe.to(device)
    for module in _frozen_modules(pipe):
        module.requires_grad_(False)
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def apply_memory_options(pipe, gradient_checkpointing: bool = False, vae_tiling: bool = False,
                         offload_text_encoders: bool = False) -> None:
    """The memory-lean settings of TrainConfig. None changes a result except vae_tiling (tile blending)."""
    if vae_tiling or pipe.vae.device.type != "cpu":
        pipe.vae.enable_slicing()  # one image per VAE decode: same images, a fraction of the peak memory
    if vae_tiling:
        pipe.vae.enable_tiling()
    if gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        # diffusers 0.31 (Forge's pin) checkpoints in training mode only; the UNet's outputs do not depend on the mode
        # (dropout 0, group norm)
        pipe.unet.train()
    if offload_text_encoders:
        # Prompts are encoded once per run (Sampler's text cache), so the encoders can wait on the CPU.
        for name in ("text_encoder", "text_encoder_2"):
            encoder = getattr(pipe, name, None)
            if encoder is not None:
                encoder.to("cpu", torch.float32 if encoder.dtype == torch.float16 else encoder.dtype)


def _frozen_modules(pipe) -> list[torch.nn.Module]:
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    return [m for m in (getattr(pipe, name, None) for name in names) if m is not None]


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    restore = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in restore:
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, enabled in restore:
            if enabled:
                lib.enable_progress_bar()


def _looks_like_path(spec: str) -> bool:
    return (spec.startswith((".", "~", os.sep)) or spec.lower().endswith(SINGLE_FILE_SUFFIXES)
            or spec.count("/") > 1 or "\\" in spec)


def _wrap_load(spec: str, load):
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:
        with warnings.catch_warnings():  # newer diffusers rename torch_dtype; older ones (host pins) know no other
            warnings.filterwarnings("ignore", message=".*torch_dtype.* is deprecated", category=FutureWarning)
            return load()
    except (OSError, ValueError, EnvironmentError) as exc:
        reason = library_reason(exc)
        if offline or "offline" in reason.lower() or "connect" in reason.lower():
            raise ModelLoadError(f"model {spec!r} is not on this machine and the hub cannot be reached (offline); "
                                 f"download it first or pass a local diffusers folder or .safetensors file.") from None
        raise ModelLoadError(f"could not load model {spec!r}: {reason}; pass a Stable Diffusion diffusers folder, "
                             f"hub id or single-file checkpoint.") from None


SUPPORTED = "Stable Diffusion 1.x, 2.x and SDXL base models"
_PIPELINES = {"StableDiffusionPipeline": "sd", "StableDiffusionImg2ImgPipeline": "sd",
              "StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLImg2ImgPipeline": "sdxl"}


def _folder_class_name(folder: Path, spec: str) -> str:
    try:
        return json.loads((folder / "model_index.json").read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError):
        raise ModelLoadError(f"{spec}/model_index.json is unreadable; the model folder is damaged.") from None


def _pipeline_class(class_name: str, spec: str):
    """The pipeline class we load a model with, from the pipeline class its model_index.json names."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    family = _PIPELINES.get(class_name, "sd" if not class_name else None)
    if family is None:
        raise ModelLoadError(f"{spec} is a {class_name}; prdp trains {SUPPORTED}.")
    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def _load_kwargs(pipeline_class) -> dict:
    if pipeline_class.__name__ == "StableDiffusionPipeline":
        return {"safety_checker": None, "requires_safety_checker": False}
    return {}


def _check_architecture(pipe, spec: str) -> None:
    config = pipe.unet.config
    if getattr(pipe, "text_encoder_2", None) is not None and getattr(pipe, "text_encoder", None) is None:
        raise ModelLoadError(f"{spec} is an SDXL refiner (one text encoder); prdp trains {SUPPORTED}.")
    embed_type = getattr(config, "addition_embed_type", None)
    if embed_type not in (None, "text_time"):
        raise ModelLoadError(f"{spec} has a UNet conditioned on {embed_type!r}; prdp trains {SUPPORTED}.")
    if config.in_channels != 4:
        raise ModelLoadError(f"{spec} has a UNet with {config.in_channels} input channels (an inpainting or "
                             f"depth model); prdp trains text-to-image {SUPPORTED}.")


def model_info(pipe, name: str, resolution: int = 0) -> ModelInfo:
    """`resolution` is the training resolution when it differs from the model's native one."""
    config = pipe.unet.config
    if is_sdxl(pipe):
        arch = "sdxl"
    else:
        # SD2 swapped SD1's convolutional transformer projections for linear ones (and 768 for 1024-wide text)
        arch = "sd2" if config.cross_attention_dim == 1024 or config.use_linear_projection else "sd1"
    native = config.sample_size * pipe.vae_scale_factor
    layers = config.layers_per_block
    return ModelInfo(name=name, arch=arch, prediction_type=pipe.scheduler.config.prediction_type,
                     resolution=int(resolution or native),
                     layers_per_block=int(layers if isinstance(layers, int) else layers[0]))


def is_sdxl(pipe) -> bool:
    """Two text encoders and pooled text + size conditioning (the UNet's `text_time` embedding)."""
    return getattr(pipe.unet.config, "addition_embed_type", None) == "text_time"


# ---------------------------------------------------------------------------------------------- tiny models
def build_tiny_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """A Stable-Diffusion-shaped pipeline small enough for CPU tests (64x64 images, 8x8 latents), with random
    weights fixed by `seed`. Built entirely from configs: no download."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tokenizer()
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    vae = tiny_vae()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32,
        vocab_size=len(tokenizer), max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_vae(**config):
    """The tiny models' VAE: 64x64 images to 8x8x4 latents."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(32, 32, 32, 32), in_channels=3, out_channels=3, latent_channels=4,
                         layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=64, **config)


def build_random_pipeline(folder: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A real-size pipeline with random weights, from a shipped config folder (model_configs/<name>), built directly
    in `dtype` on `device`. Its tokenizers are the byte-level ones: ids stay inside the real vocabulary, and
    benchmarks need shapes, not words."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.schedulers import DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))
            encoders = {}
            for name in ("text_encoder", "text_encoder_2"):
                if name in index:
                    config = CLIPTextConfig.from_json_file(folder / name / "config.json")
                    with_projection = index[name][1] == "CLIPTextModelWithProjection"
                    encoders[name] = (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)
    finally:
        torch.set_default_dtype(default_dtype)
    scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(folder / "scheduler"))
    tokenizers = {name.replace("text_encoder", "tokenizer"): build_tokenizer() for name in encoders}
    if index["_class_name"] == "StableDiffusionXLPipeline":
        return StableDiffusionXLPipeline(unet=unet, vae=vae, scheduler=scheduler, **encoders, **tokenizers,
                                         force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True))
    return StableDiffusionPipeline(unet=unet, vae=vae, scheduler=scheduler, **encoders, **tokenizers,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def make_text_encoder_portable(folder: str | Path) -> None:
    """Rewrite a saved CLIPTextModel's model.safetensors with the `text_model.` key prefix. Transformers 5 saves
    without it (its CLIPTextModel has no text_model wrapper) and reads both layouts; transformers 4.x, which A1111 and
    Forge run, reads only the prefixed one and would silently start from random weights."""
    from safetensors.torch import load_file, save_file

    path = Path(folder) / "model.safetensors"
    state = load_file(path)
    save_file({key if key.startswith("text_model.") else f"text_model.{key}": tensor for key, tensor in state.items()},
              path, metadata={"format": "pt"})


def build_tiny_xl_pipeline(seed: int = 0, prediction_type: str = "epsilon"):
    """An SDXL-shaped pipeline (two text encoders, pooled text embedding and size conditioning, SGM-style block
    layout: a plain first down block, then cross-attention blocks with more transformer layers) small enough for
    CPU tests: 64x64 images, random weights fixed by `seed`, built from configs."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tokenizer()
    tokenizer_2 = build_tokenizer()
    tokenizer_2.pad_token = "!"  # as SDXL's OpenCLIP tokenizer pads
    torch.manual_seed(seed)
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        cross_attention_dim=96, addition_embed_type="text_time", addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + 64, norm_num_groups=32)
    vae = tiny_vae(scaling_factor=0.13025)
    common = dict(num_hidden_layers=2, num_attention_heads=4, vocab_size=len(tokenizer),
                  max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    # Unequal widths, as SDXL's 768 and 1280: single-file loading tells the two CLIPs apart by width.
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, **common))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=64, intermediate_size=128,
                                                                projection_dim=64, hidden_act="gelu", **common))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading", prediction_type=prediction_type)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------- LoRA
def add_lora(unet, rank: int, alpha: float, targets: Sequence[str]) -> int:
    """Wrap the target modules of `unet` in a trainable PEFT LoRA (kohya init: kaiming A, zero B, so the model
    starts exactly at the base). LoRA parameters are fp32 whatever the base dtype; they compute in the base dtype.
    Returns the module count."""
    from peft import LoraConfig

    from .errors import ConfigError

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=True)
    try:
        unet.add_adapter(config)
    except ValueError as exc:
        raise ConfigError(f"lora_targets {list(targets)} match no module of this UNet ({exc}); use names such as "
                          f"to_q, to_k, to_v, to_out.0.") from None
    for param in lora_parameters(unet):
        param.data = param.data.float()
    if unet.dtype != torch.float32:
        _compute_lora_in(unet, unet.dtype)
    return len(lora_modules(unet))


def _compute_lora_in(unet, dtype: torch.dtype) -> None:
    """Run every LoRA matmul in the base weights' `dtype` from the fp32 parameters, as autocast would (kohya's mixed
    precision): PEFT would otherwise cast each wrapped layer's input to fp32, keep that copy for the backward pass
    and add fp32 outputs, about 2.5 GiB more at SD1.5's 512 px micro-batch of 8 (bench/memory_estimate.py).
    The gradients still reach the fp32 parameters, through the casts."""
    import types

    from peft.tuners.lora import LoraLayer

    def linear(self, x):
        return torch.nn.functional.linear(x.to(dtype), self.weight.to(dtype))

    def conv(self, x):
        return self._conv_forward(x.to(dtype), self.weight.to(dtype), None)

    for module in unet.modules():
        if not isinstance(module, LoraLayer):
            continue
        factors = [*module.lora_A.values(), *module.lora_B.values()]
        if all(f.bias is None and type(f) in (torch.nn.Linear, torch.nn.Conv2d) for f in factors):  # else PEFT's way
            module.cast_input_dtype_enabled = False  # PEFT >= 0.15; older ones cast to fp32 and back (transiently)
            for factor in factors:
                factor.forward = types.MethodType(linear if type(factor) is torch.nn.Linear else conv, factor)


def lora_parameters(unet) -> list[torch.nn.Parameter]:
    return [p for n, p in unet.named_parameters() if "lora_" in n and p.requires_grad]


def lora_modules(unet) -> list[str]:
    from peft.tuners.lora import LoraLayer

    return [name for name, module in unet.named_modules() if isinstance(module, LoraLayer)]


def lora_is_zero(unet) -> bool:
    """Whether every adapter adds exactly nothing (all lora_B weights zero, as PEFT initialises them): the UNet then
    computes what it computes with its adapters disabled, to the bit."""
    weights = [p for n, p in unet.named_parameters() if "lora_B" in n]
    return bool(weights) and not torch.stack([w.detach().abs().max() for w in weights]).any().item()


@contextlib.contextmanager
def lora_disabled(unet) -> Iterator[None]:
    """The frozen reference model: the same UNet with every adapter switched off."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()
