"""Offline loading of single-file Stable Diffusion checkpoints (A1111 models/Stable-diffusion, ComfyUI
models/checkpoints): SD1.x, SD2.x (epsilon and v-prediction) and SDXL base, as .safetensors or .ckpt.

A single file holds only weights, in the original LDM (SD1/SD2) or SGM (SDXL) key layout. diffusers'
`from_single_file` converts them but fetches configs and tokenizers from the hub; we hand it the standard base
models' configs shipped in prdp_core/model_configs and CLIP tokenizers built from the shipped BPE file, so loading
never leaves the machine. Before converting anything we read the file's key names and shapes (the safetensors
header, no tensor data) to say what the file is: a supported base model, or one sentence on why not.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import struct
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, Mapping, Sequence

import torch

from .clip_tokenizer import CONFIGS_DIR, tokenizers_for
from .errors import ConfigError, ModelLoadError, library_reason

CONFIG_FOLDERS = {name: CONFIGS_DIR / name for name in ("sd15", "sd21_base", "sd21", "sdxl_base")}
SUPPORTED = "prdp trains SD1.x, SD2.x and SDXL base checkpoints"
PREDICTION_TYPES = ("epsilon", "v_prediction")
WHERE = "a file from A1111's models/Stable-diffusion or ComfyUI's models/checkpoints"

# The keys the parts of a checkpoint are recognised by (the same ones diffusers' single-file code uses).
UNET_PREFIX = "model.diffusion_model."
UNET_IN = UNET_PREFIX + "input_blocks.0.0.weight"
UNET_CROSS_ATTENTION = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
VAE_KEY = "first_stage_model.decoder.conv_in.weight"
TEXT_ENCODER_KEYS = {
    "sd1": ("cond_stage_model.transformer.text_model.embeddings.position_embedding.weight",),
    "sd2": ("cond_stage_model.model.token_embedding.weight",),
    "sdxl": ("conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight",
             "conditioner.embedders.1.model.positional_embedding"),
}
CROSS_ATTENTION_DIM = {"sd1": 768, "sd2": 1024, "sdxl": 2048}
FAMILY_OF_KIND = {"v1": "sd1", "v2": "sd2", "xl_base": "sdxl"}  # diffusers' model types we train
FAMILY_OF_FOLDER = {"sd15": "sd1", "sd21_base": "sd2", "sd21": "sd2", "sdxl_base": "sdxl"}
FAMILY_LABEL = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL base"}

# How an error names the other model types diffusers recognises (first matching prefix wins).
KIND_NAMES = (
    ("xl_refiner", "an SDXL refiner"), ("xl_inpaint", "an SDXL inpainting"), ("inpainting_v2", "an SD2 inpainting"),
    ("inpainting", "an SD1 inpainting"), ("instruct-pix2pix", "an InstructPix2Pix"), ("upscale", "an SD x4 upscaler"),
    ("controlnet", "a ControlNet"), ("playground", "a Playground v2.5"), ("sd35", "an SD3.5"), ("sd3", "an SD3"),
    ("flux", "a FLUX"), ("chroma", "a Chroma (FLUX-based)"), ("stable_cascade", "a Stable Cascade"),
    ("animatediff", "an AnimateDiff motion-module"), ("auraflow", "an AuraFlow"), ("lumina", "a Lumina"),
    ("hunyuan", "a HunyuanVideo"), ("ltx", "an LTX-Video"), ("wan", "a Wan"), ("sana", "a Sana"),
    ("hidream", "a HiDream"), ("cosmos", "a Cosmos"), ("mochi", "a Mochi"), ("z-image", "a Z-Image"),
)
# Key fragments that identify families diffusers may not classify (its fallback answer is "v1" for anything).
FAMILY_MARKERS = (("joint_blocks.", "an SD3"), ("double_blocks.", "a FLUX"), ("single_blocks.", "a FLUX"))

# Lightning-era .ckpt files pickle training state next to the weights: the checkpoint callback and numpy step
# counters. torch's weights-only unpickler refuses these names; we map them to an inert stand-in (nothing of
# theirs is imported or run, and only the tensors are kept). Any other global makes the file unsafe to read.
INERT_PICKLE_GLOBALS = (
    "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
    "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint",
    "numpy.dtype", "numpy.ndarray",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
)
MAX_SAFETENSORS_HEADER = 100 * 2 ** 20  # real headers are a few MB at most; more means the file is not safetensors

Shapes = Mapping[str, Sequence[int]]


# ---------------------------------------------------------------------------------------------- public API
def detect_checkpoint(shapes: Shapes, prediction_type: str | None = None, name: str = "this checkpoint") -> str:
    """Which shipped config folder fits a checkpoint, from its key names and shapes ({key: shape}; a state dict of
    tensors works too): "sd15", "sd21_base", "sd21" or "sdxl_base". SD2 epsilon (512 px) and v-prediction (768 px)
    models have the same weights' shapes, so SD2 follows `prediction_type` (or a "v_pred" marker key) and defaults
    to v-prediction 768 px, as diffusers does. Anything else raises ModelLoadError saying what the file is."""
    _check_prediction_type(prediction_type)
    shapes = _as_shapes(shapes)
    kind = checkpoint_kind(shapes, name)
    family = FAMILY_OF_KIND.get(kind)
    if kind == "unknown":
        raise ModelLoadError(f"{name} is not a Stable Diffusion checkpoint (its keys match no known layout); "
                             f"{SUPPORTED}.")
    if family is None:
        raise ModelLoadError(f"{name} is {_describe_kind(kind)} checkpoint; {SUPPORTED}.")
    _check_unet(shapes, family, name)
    if family == "sd1":
        return "sd15"
    if family == "sdxl":
        return "sdxl_base"
    prediction = prediction_type or _marked_prediction(shapes) or "v_prediction"
    return "sd21" if prediction == "v_prediction" else "sd21_base"


def load_single_file(path: str | os.PathLike, torch_dtype: torch.dtype = torch.float32,
                     prediction_type: str | None = None, vae: str | os.PathLike | None = None,
                     config_folder: str | os.PathLike | None = None):
    """A StableDiffusionPipeline or StableDiffusionXLPipeline from a single-file checkpoint, without network access.

    `prediction_type` ("epsilon" | "v_prediction") overrides what the file implies (an A1111 `<name>.yaml` beside
    it, a "v_pred" marker key, for SD2 its weights as ComfyUI reads them, else SD2's v-prediction default); `vae` is
    a separate VAE file (A1111 models/VAE) replacing the checkpoint's own; `config_folder` is a diffusers config
    folder to use instead of the shipped ones (it then defines the architecture). Raises ModelLoadError with the fix when the file cannot be used."""
    _check_prediction_type(prediction_type)
    path = Path(path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {path} does not exist; pass {WHERE}.")
    shapes, metadata = read_checkpoint_shapes(path)
    _reject_non_checkpoints(shapes, path.name, metadata)
    explicit = prediction_type or _prediction_from_yaml(path)
    if config_folder is None:
        folder = CONFIG_FOLDERS[detect_checkpoint(shapes, explicit, path.name)]
        family = FAMILY_OF_FOLDER[folder.name]
        _check_parts(shapes, family, path.name, separate_vae=vae is not None)
        if family == "sd2" and explicit is None and _marked_prediction(shapes) is None:
            explicit = sd2_prediction_from_weights(path)
            if explicit is None:
                warnings.warn(f"{path.name} is an SD2.x checkpoint; assuming v-prediction at 768 px (SD 2.x-768): "
                              f"for a 512-px epsilon model such as SD 2.1-base pass prediction_type='epsilon' or put "
                              f"A1111's {path.stem}.yaml beside it.", stacklevel=2)
            folder = CONFIG_FOLDERS[detect_checkpoint(shapes, explicit, path.name)]
    else:  # the folder defines the architecture (tests use tiny models whose shapes match no real family)
        folder = Path(config_folder)
        family = _family_of_folder(folder)
    vae_model = load_vae(vae, folder, torch_dtype) if vae is not None else None
    pipe = _from_single_file(path, folder, family, torch_dtype, vae_model)
    _check_all_weights_loaded(pipe, path.name)
    _set_prediction(pipe, explicit or _marked_prediction(shapes), zero_terminal_snr="ztsnr" in shapes)
    return pipe


def checkpoint_kind(shapes: Shapes, name: str = "this checkpoint") -> str:
    """diffusers' name for the model type of a checkpoint ("v1", "v2", "xl_base", "xl_refiner", "sd3", ...), after
    rejecting files that are no base checkpoint at all (LoRAs, embeddings, VAEs, lone UNets, diffusers parts)."""
    shapes = _as_shapes(shapes)
    _reject_non_checkpoints(shapes, name)
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    try:  # diffusers reads only `.shape` of the few tensors its rules look at
        kind = infer_diffusers_model_type({key: SimpleNamespace(shape=tuple(shape)) for key, shape in shapes.items()})
    except Exception:  # noqa: BLE001 - a rule that needs real values or met an odd shape: fall back to our markers
        kind = "unknown"
    if kind in ("v1", "unknown") and UNET_IN not in shapes:  # diffusers answers "v1" for anything it does not know
        kind = next((label for marker, label in FAMILY_MARKERS if any(marker in key for key in shapes)), "unknown")
    return kind


def read_checkpoint_shapes(path: str | os.PathLike) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """{key: shape} of the tensors in a checkpoint file and its safetensors metadata, reading as little as possible:
    the safetensors header, or a weights-only (no code) unpickling of a .ckpt. Damaged, truncated and unsafe files
    raise ModelLoadError."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise ModelLoadError(f"{path.name} is empty (0 bytes); download or copy it again.")
    if path.suffix.lower() == ".safetensors":
        return _safetensors_shapes(path)
    state_dict = load_pickled_state_dict(path)
    return {key: tuple(value.shape) for key, value in state_dict.items()}, {}


def load_pickled_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .ckpt/.pt file, read with torch's weights-only unpickler (no code from the file runs)."""
    mmap = zipfile.is_zipfile(path)  # torch can map only its zip format lazily
    try:
        with inert_pickle_globals():
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if re.search(r"Unsupported (global|class)|allowlisted|safe_globals", str(exc)):  # a refused object
            names = _unsafe_globals(path)
            raise ModelLoadError(f"{path.name} contains Python objects ({names}) that cannot be loaded without running "
                                 f"code from the file; use the .safetensors version of this model.") from None
        raise ModelLoadError(f"{path.name} is not a readable checkpoint (damaged, or not a PyTorch file); download "
                             f"it again, preferably as .safetensors.") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, struct.error):
        raise ModelLoadError(f"{path.name} is damaged or incomplete (it could not be read to the end); download or "
                             f"copy it again.") from None
    while isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):  # Lightning nests the weights
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict):
        raise ModelLoadError(f"{path.name} holds a {type(loaded).__name__}, not a dictionary of weights; pass {WHERE}.")
    return {key: value for key, value in loaded.items() if isinstance(key, str) and isinstance(value, torch.Tensor)}


@contextlib.contextmanager
def inert_pickle_globals() -> Iterator[None]:
    """Inside: torch's weights-only unpickler accepts INERT_PICKLE_GLOBALS as inert stand-ins. Needs torch >= 2.6
    (safe globals given as (object, name) pairs); older torch refuses such files and the error says to use
    .safetensors."""
    from packaging.version import Version

    if Version(torch.__version__.split("+")[0]) < Version("2.6"):
        yield
        return
    with torch.serialization.safe_globals([(_InertPickled, name) for name in INERT_PICKLE_GLOBALS]):
        yield


class _InertPickled:
    """Stands in for a training-state object of a .ckpt: takes any arguments and state, keeps none."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


# ---------------------------------------------------------------------------------------------- reading files
def _safetensors_shapes(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    # Layout: 8-byte little-endian header length, JSON header {key: {dtype, shape, data_offsets}}, then the data.
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(9)
        header_length = struct.unpack("<Q", prefix[:8])[0] if len(prefix) >= 8 else 0
        if len(prefix) < 9 or prefix[8:9] != b"{" or header_length > MAX_SAFETENSORS_HEADER:
            raise ModelLoadError(f"{path.name} is not a valid .safetensors file (damaged, or another format renamed); "
                                 f"download it again.")
        if 8 + header_length > size:
            raise _truncated(path, size, 8 + header_length)
        f.seek(8)
        try:
            header = json.loads(f.read(header_length))
            metadata = header.pop("__metadata__", None) or {}
            shapes = {key: tuple(int(n) for n in entry["shape"]) for key, entry in header.items()}
            data_end = max((int(entry["data_offsets"][1]) for entry in header.values()), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise ModelLoadError(f"{path.name} has a damaged .safetensors header; download it again.") from None
    if 8 + header_length + data_end > size:
        raise _truncated(path, size, 8 + header_length + data_end)
    return shapes, metadata


def _truncated(path: Path, size: int, needed: int) -> ModelLoadError:
    return ModelLoadError(f"{path.name} is incomplete ({size:,} of {needed:,} bytes; the download or copy was cut "
                          f"short); download or copy it again.")


def _unsafe_globals(path: Path) -> str:
    finder = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
    try:
        names = [n for n in finder(path) if n not in INERT_PICKLE_GLOBALS] if finder else []
    except Exception:  # noqa: BLE001 - only used to word the message
        names = []
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "") if names else "non-tensor objects"


def _prediction_from_yaml(path: Path) -> str | None:
    """A1111 reads `<checkpoint>.yaml` beside a checkpoint as its model config: LDM configs (SD1/SD2) say
    `parameterization: v` for v-prediction (their default is eps), SGM configs (SDXL) name VScaling or EpsScaling
    as the denoiser's scaling."""
    yaml_path = path.with_suffix(".yaml")
    if not yaml_path.is_file():
        return None
    import yaml

    try:
        params = yaml.safe_load(yaml_path.read_text(encoding="utf-8"))["model"]["params"]
        scaling = str(params.get("denoiser_config", {}).get("params", {}).get("scaling_config", {}).get("target", ""))
        is_v = params.get("parameterization", "eps") == "v" or scaling.endswith(".VScaling")
    except (OSError, ValueError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        raise ModelLoadError(f"{yaml_path.name} beside the checkpoint is not a readable LDM/SGM config; fix or remove "
                             f"it.") from None
    return "v_prediction" if is_v else "epsilon"


def sd2_prediction_from_weights(path: Path) -> str | None:
    """ComfyUI's test (supported_models.SD20.model_type): SD2 v-prediction models have a wider spread in the bias of
    the last transformer's first norm (std > 0.09) than epsilon ones. None when the file lacks that tensor."""
    key = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as file:
            bias = file.get_tensor(key) if key in file.keys() else None
    else:
        bias = load_pickled_state_dict(path).get(key)
    if bias is None:
        return None
    return "v_prediction" if bias.float().std(unbiased=False).item() > 0.09 else "epsilon"


def _marked_prediction(shapes: Shapes) -> str | None:
    # ComfyUI's convention: v-prediction finetunes (e.g. of SDXL) carry an empty "v_pred" tensor as a marker.
    return "v_prediction" if "v_pred" in shapes else None


def _as_shapes(shapes: Mapping) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape if hasattr(value, "shape") else value) for key, value in shapes.items()}


# ---------------------------------------------------------------------------------------------- checks
def _reject_non_checkpoints(shapes: Shapes, name: str, metadata: Mapping[str, str] | None = None) -> None:
    """Files people put in the wrong place: LoRAs, embeddings, VAEs, lone UNets and diffusers components."""
    keys = list(shapes)
    if not keys:
        raise ModelLoadError(f"{name} holds no weights; pass {WHERE}.")
    if _is_lora(keys, metadata or {}):
        raise ModelLoadError(f"{name} is a LoRA, not a base checkpoint; pass the checkpoint it was trained on (from "
                             f"models/Stable-diffusion or models/checkpoints) and load the LoRA in your host instead.")
    if {"emb_params", "clip_l", "clip_g"} & set(keys) or any(k.startswith("string_to_param") for k in keys):
        raise ModelLoadError(f"{name} is a textual-inversion embedding, not a base checkpoint; pass {WHERE}.")
    has_unet = any(k.startswith(UNET_PREFIX) for k in keys)
    if not has_unet and "decoder.conv_in.weight" in shapes:
        raise ModelLoadError(f"{name} is a VAE, not a base checkpoint; pass it as the separate VAE (vae) next to "
                             f"{WHERE}.")
    if not has_unet and "input_blocks.0.0.weight" in shapes:
        raise ModelLoadError(f"{name} holds only a UNet (a models/unet file); pass a full checkpoint with its VAE and "
                             f"text encoder, {WHERE}.")
    if not has_unet and any(k.startswith(("down_blocks.", "text_model.", "encoder.down_blocks.")) for k in keys):
        raise ModelLoadError(f"{name} is one part of a diffusers model; pass the diffusers folder that holds "
                             f"model_index.json instead.")


def _is_lora(keys: Sequence[str], metadata: Mapping[str, str]) -> bool:
    markers = ("lora_down", "lora_up", "lora_A.", "lora_B.", ".lora.down.", ".lora.up.", "hada_w1", "lokr_w1",
               "oft_blocks", "lora_magnitude_vector")
    if any(k.startswith(("lora_unet_", "lora_te")) or any(m in k for m in markers) for k in keys):
        return True
    return "ss_network_module" in metadata or str(metadata.get("modelspec.architecture", "")).endswith("/lora")


def _describe_kind(kind: str) -> str:
    if kind.startswith(("a ", "an ")):
        return kind
    for prefix, label in KIND_NAMES:
        if kind.startswith(prefix):
            return label
    return f"a {kind}"


def _check_unet(shapes: Shapes, family: str, name: str) -> None:
    """The UNet of a supported family: 4 latent input channels and the family's text width in cross-attention."""
    in_shape = shapes.get(UNET_IN)
    if in_shape is None or len(in_shape) != 4:
        raise ModelLoadError(f"{name} has no UNet weights under {UNET_PREFIX}; {SUPPORTED}.")
    if in_shape[1] == 8:  # diffusers before 0.33 does not tell InstructPix2Pix from SD1
        raise ModelLoadError(f"{name} is an InstructPix2Pix checkpoint (a UNet with 8 input channels); {SUPPORTED}.")
    if in_shape[1] != 4:
        raise ModelLoadError(f"{name} is a UNet with {in_shape[1]} input channels (inpainting or another "
                             f"image-conditioned variant); {SUPPORTED}.")
    attention_key = (UNET_PREFIX + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight" if family == "sdxl"
                     else UNET_CROSS_ATTENTION)
    if len(shapes.get(attention_key, ())) != 2:
        raise ModelLoadError(f"{name} looks like {FAMILY_LABEL[family]} but lacks its cross-attention layers (a "
                             f"modified architecture); {SUPPORTED}.")
    width = shapes[attention_key][-1]
    if width != CROSS_ATTENTION_DIM[family]:
        raise ModelLoadError(f"{name} looks like {FAMILY_LABEL[family]} but its cross-attention takes {width}-wide "
                             f"text (expected {CROSS_ATTENTION_DIM[family]}), a modified architecture; {SUPPORTED}.")


def _check_parts(shapes: Shapes, family: str, name: str, separate_vae: bool) -> None:
    missing = [key for key in TEXT_ENCODER_KEYS[family] if key not in shapes]
    if missing:
        old_layout = family == "sd1" and any(k.startswith("cond_stage_model.transformer.embeddings") for k in shapes)
        if old_layout:
            raise ModelLoadError(f"{name} stores its text encoder in an old layout (no text_model. level); re-save it "
                                 f"as .safetensors with a current tool (A1111 checkpoint merger, ComfyUI save node).")
        raise ModelLoadError(f"{name} has no text encoder weights ({missing[0]} is missing); pass a full "
                             f"{FAMILY_LABEL[family]} checkpoint.")
    if VAE_KEY not in shapes and not separate_vae:
        raise ModelLoadError(f"{name} has no VAE weights; pass a VAE file too (vae=..., from models/VAE).")


def _check_vae_shapes(shapes: Shapes, name: str) -> None:
    for prefix in ("", "first_stage_model.", "vae."):
        shape = shapes.get(prefix + "decoder.conv_in.weight")
        if shape is not None:
            if len(shape) != 4 or shape[1] != 4:
                raise ModelLoadError(f"{name} is a VAE with {shape[1] if len(shape) > 1 else '?'} latent channels "
                                     f"(SD3/FLUX-style); SD1.x, SD2.x and SDXL need a 4-channel VAE.")
            return
    raise ModelLoadError(f"{name} is not a VAE (no decoder weights); pass a VAE file from models/VAE.")


def _check_prediction_type(prediction_type: str | None) -> None:
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"prediction_type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}; leave it "
                          f"empty to use the checkpoint's own.")


def _check_all_weights_loaded(pipe, name: str) -> None:
    # diffusers leaves parameters it found no weights for on the meta device instead of failing.
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, component, None)
        if module is not None and any(p.is_meta for p in module.parameters()):
            raise ModelLoadError(f"{name} lacks weights for some {component} layers (incomplete, or a modified "
                                 f"architecture); {SUPPORTED}.")


# ---------------------------------------------------------------------------------------------- building
def _family_of_folder(folder: Path) -> str:
    try:
        class_name = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))["_class_name"]
    except (OSError, ValueError, KeyError):
        raise ModelLoadError(f"config folder {folder} has no readable model_index.json; pass a diffusers config "
                             f"folder.") from None
    return "sdxl" if "XL" in class_name else "sd1"


def load_vae(vae: str | os.PathLike, config_folder: str | os.PathLike, torch_dtype: torch.dtype = torch.float32):
    """An AutoencoderKL from a separate VAE file (A1111 models/VAE, ComfyUI models/vae: bare LDM keys, .safetensors
    or .pt), configured from `config_folder`'s vae/ (CONFIG_FOLDERS["sdxl_base"] for SDXL VAEs, another shipped
    folder for SD1/SD2 ones), offline."""
    from diffusers import AutoencoderKL

    path = Path(vae).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"VAE file {path} does not exist; pass a .safetensors file from models/VAE, or no VAE "
                             f"to use the checkpoint's own.")
    shapes, _ = read_checkpoint_shapes(path)
    _check_vae_shapes(shapes, path.name)
    model = _diffusers_call(path.name, lambda: AutoencoderKL.from_single_file(
        str(path), config=str(config_folder), subfolder="vae", torch_dtype=torch_dtype, local_files_only=True))
    if any(p.is_meta for p in model.parameters()):
        raise ModelLoadError(f"{path.name} lacks some VAE weights; pass a complete VAE file from models/VAE.")
    return model




def _from_single_file(path: Path, folder: Path, family: str, torch_dtype: torch.dtype, vae_model):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    # What keeps diffusers offline: `config` is a local folder (no config download), local_files_only, the
    # tokenizers passed in (single files hold none), and no safety checker/feature extractor to fetch.
    components = dict(tokenizers_for(folder))
    if vae_model is not None:
        components["vae"] = vae_model
    if family == "sdxl":
        pipeline_class = StableDiffusionXLPipeline
        components["add_watermarker"] = False  # an invisible watermark would change the images rewards score
    else:
        pipeline_class = StableDiffusionPipeline
        components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return _diffusers_call(path.name, lambda: pipeline_class.from_single_file(
        str(path), config=str(folder), local_files_only=True, torch_dtype=torch_dtype, **components))


def _diffusers_call(name: str, load):
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    try:
        with inert_pickle_globals(), warnings.catch_warnings():
            # newer diffusers rename torch_dtype; older ones (host pins) know no other
            warnings.filterwarnings("ignore", message=".*torch_dtype.* is deprecated", category=FutureWarning)
            return load()
    except SingleFileComponentError as exc:
        raise ModelLoadError(f"{name} could not be converted ({library_reason(exc.message or exc, clause=True)}); "
                             f"{SUPPORTED}.") from None
    except (OSError, ValueError, RuntimeError, KeyError, pickle.UnpicklingError) as exc:
        if "meta tensor" in str(exc):  # diffusers found no weights for some layers and left them empty
            raise ModelLoadError(f"{name} lacks weights for some layers (incomplete, or a modified architecture); "
                                 f"{SUPPORTED}.") from None
        raise ModelLoadError(f"{name} could not be loaded ({library_reason(exc, clause=True)}); it may be damaged or a "
                             f"modified architecture, and {SUPPORTED}.") from None


def _set_prediction(pipe, prediction_type: str | None, zero_terminal_snr: bool) -> None:
    overrides = {}
    if prediction_type and pipe.scheduler.config.prediction_type != prediction_type:
        overrides["prediction_type"] = prediction_type
    if zero_terminal_snr:  # ComfyUI's "ztsnr" marker: trained with zero terminal SNR (rescaled betas)
        overrides["rescale_betas_zero_snr"] = True
    if overrides:
        pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, **overrides)
