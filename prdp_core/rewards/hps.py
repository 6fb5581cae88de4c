"""`hps`: Human Preference Score v2 / v2.1 (Wu et al. 2023, github.com/tgxs002/HPSv2), a CLIP ViT-H-14 finetuned on
human choices between generated images.

The release checkpoints (hub repo xswu/HPSv2) are OpenCLIP state dicts; they are converted at load time into a
transformers `CLIPModel`, so neither hpsv2, open_clip nor torchvision is needed. The score is what `hpsv2.score`
reports: the cosine between the image and prompt embeddings, about 0.2-0.35 for Stable Diffusion images.

The checkpoint-reading helpers here are shared with the ImageReward reward."""

from __future__ import annotations

import html
import math
import os
import re
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import RewardError, library_reason
from .base import Reward, register_reward

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"v2": "HPS_v2_compressed.pt", "v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
CLIP_H_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # OpenCLIP's ViT-H-14 BPE vocabulary, as a HF tokenizer
# Head counts are not in the weights; OpenCLIP's ViT-H-14 config (model_configs/ViT-H-14.json) fixes the head widths.
VISION_HEAD_WIDTH = 80
TEXT_HEAD_WIDTH = 64
OPENAI_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])
OPENAI_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])


@register_reward("hps")
class HPS(Reward):
    """Options: `version` ("v2" or "v2.1"), `checkpoint` (a local .pt instead of the hub file), `tokenizer` (hub id
    or folder of the CLIP-H tokenizer)."""

    name = "hps"
    batch_size = 16

    def __init__(self, device="cpu", dtype="fp32", version: str = "v2.1", checkpoint: str = "",
                 tokenizer: str = CLIP_H_TOKENIZER):
        super().__init__(device, dtype)
        if version not in HPS_FILES:
            raise RewardError(f"hps version must be v2 or v2.1, got {version!r}.")
        self.version, self.checkpoint, self.tokenizer_spec = version, checkpoint, tokenizer

    def load(self) -> None:
        from transformers import CLIPModel, CLIPTokenizer

        path = weights_file(self.checkpoint, HPS_REPO, HPS_FILES[self.version], f"HPS {self.version}")
        self.tokenizer = load_tokenizer(CLIPTokenizer, self.tokenizer_spec, "hps")
        config, weights, origins = open_clip_to_transformers(read_state_dict(path, "HPS"), self.tokenizer, path)
        self.model = build_from_weights(lambda: CLIPModel(config), weights, origins, path)
        self.model.to(self.device, self.dtype).eval()
        self.image_size = config.vision_config.image_size
        self.context_length = config.text_config.max_position_embeddings

    @torch.no_grad()
    def score_batch(self, images, prompts):
        pixels = torch.stack([hps_pixels(image, self.image_size) for image in images]).to(self.device, self.dtype)
        # Padding to the longest prompt instead of OpenCLIP's 77 changes nothing: the text tower is causal and its
        # features are read at the end-of-text token, the first one, as OpenCLIP's argmax over the ids finds it.
        tokens = self.tokenizer([open_clip_clean(prompt) for prompt in prompts], padding=True, truncation=True,
                                max_length=self.context_length,
                                return_tensors="pt").input_ids.to(self.device)
        image_features = self.model.visual_projection(self.model.vision_model(pixel_values=pixels).pooler_output)
        text_features = self.model.text_projection(self.model.text_model(input_ids=tokens).pooler_output)
        return F.cosine_similarity(image_features.float(), text_features.float(), dim=-1).cpu()


def open_clip_clean(text: str) -> str:
    """OpenCLIP's tokenizer's cleaning before BPE: HTML entities unescaped twice (web captions are often escaped
    twice) and runs of whitespace made one space. (It also runs ftfy where installed, for broken unicode.)"""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


def hps_pixels(image, size: int) -> torch.Tensor:
    """HPSv2's eval transform (open_clip/transform.py `image_transform` with resize_longest_max=True, as
    `create_model_and_transforms(light_augmentation=True)` builds it): ToTensor, the longest side resized to `size`
    by torchvision's tensor resize (bicubic, antialiased), zero padding to a centred square, OpenAI mean/std."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255).permute(2, 0, 1)
    height, width = pixels.shape[1:]
    scale = size / max(height, width)
    if scale != 1.0:
        new_height, new_width = round(height * scale), round(width * scale)
        pixels = F.interpolate(pixels[None], size=(new_height, new_width), mode="bicubic", align_corners=False,
                               antialias=True)[0]
        pad_height, pad_width = size - new_height, size - new_width
        pixels = F.pad(pixels, (pad_width // 2, pad_width - pad_width // 2, pad_height // 2,
                                pad_height - pad_height // 2))  # 0 before normalising: black bars
    return (pixels - OPENAI_MEAN[:, None, None]) / OPENAI_STD[:, None, None]


def open_clip_to_transformers(state: dict[str, torch.Tensor], tokenizer, source: str):
    """(CLIPConfig, transformers weights, the OpenCLIP key each came from) for an OpenCLIP ViT CLIP state dict
    (open_clip/model.py `CLIP`, transformer.py `VisionTransformer`/`ResidualAttentionBlock`); sizes are read from
    the shapes. Key mapping as in transformers' convert_clip_original_pytorch_to_hf.py."""
    from transformers import CLIPConfig

    state = dict(state)  # keys are consumed as they are converted: any left over are not OpenCLIP's
    weights: dict[str, torch.Tensor] = {}
    origins: dict[str, str] = {}

    def take(key: str) -> torch.Tensor:
        if key not in state:
            raise RewardError(f"{source} is not an OpenCLIP ViT CLIP state dict: it has no {key!r}.")
        return state.pop(key)

    def put(target: str, key: str, tensor: torch.Tensor | None = None) -> None:
        weights[target], origins[target] = take(key) if tensor is None else tensor, key

    def put_linear(target: str, key: str) -> None:
        put(f"{target}.weight", f"{key}.weight")
        put(f"{target}.bias", f"{key}.bias")

    def put_blocks(prefix: str, target: str) -> int:
        layers = count_layers(state, prefix)
        for i in range(layers):
            src, dst = f"{prefix}{i}.", f"{target}{i}."
            for kind in ("weight", "bias"):  # OpenCLIP packs q, k, v into one in_proj (nn.MultiheadAttention)
                key = f"{src}attn.in_proj_{kind}"
                for name, part in zip(("q_proj", "k_proj", "v_proj"), take(key).chunk(3)):
                    put(f"{dst}self_attn.{name}.{kind}", key, part)
            for theirs, ours in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                                 ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                put_linear(dst + ours, src + theirs)
        return layers

    vision_layers = put_blocks("visual.transformer.resblocks.", "vision_model.encoder.layers.")
    text_layers = put_blocks("transformer.resblocks.", "text_model.encoder.layers.")
    if not vision_layers or not text_layers:
        raise RewardError(f"{source} is not an OpenCLIP ViT CLIP state dict: it has no "
                          f"{'visual.' if not vision_layers else ''}transformer.resblocks.")
    put("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight")
    put("vision_model.embeddings.class_embedding", "visual.class_embedding")
    put("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding")
    put_linear("vision_model.pre_layrnorm", "visual.ln_pre")  # sic: transformers' spelling
    put_linear("vision_model.post_layernorm", "visual.ln_post")
    put("visual_projection.weight", "visual.proj", take("visual.proj").T)  # OpenCLIP: x @ proj; Linear: x @ W.T
    put("text_model.embeddings.token_embedding.weight", "token_embedding.weight")
    put("text_model.embeddings.position_embedding.weight", "positional_embedding")
    put_linear("text_model.final_layer_norm", "ln_final")
    put("text_projection.weight", "text_projection", take("text_projection").T)
    put("logit_scale", "logit_scale")
    if state:
        raise RewardError(f"{source} has keys a plain OpenCLIP ViT CLIP does not, e.g. {sorted(state)[0]!r}; HPS "
                          f"checkpoints are OpenCLIP ViT-H-14 state dicts.")

    patch = weights["vision_model.embeddings.patch_embedding.weight"]
    if patch.ndim != 4:
        raise RewardError(f"{source}: visual.conv1.weight has shape {tuple(patch.shape)}, not a patch convolution's.")
    vision_width, text_width = patch.shape[0], weights["text_model.embeddings.token_embedding.weight"].shape[1]
    grid = math.isqrt(weights["vision_model.embeddings.position_embedding.weight"].shape[0] - 1)
    for what, width, head_width in (("vision", vision_width, VISION_HEAD_WIDTH), ("text", text_width, TEXT_HEAD_WIDTH)):
        if width % head_width:
            raise RewardError(f"{source}: {what} width {width} is not a multiple of OpenCLIP ViT-H-14's head width "
                              f"{head_width}; HPS checkpoints are ViT-H-14.")
    if len(tokenizer) > weights["text_model.embeddings.token_embedding.weight"].shape[0]:
        raise RewardError(f"the hps tokenizer has {len(tokenizer)} tokens but {source} embeds only "
                          f"{weights['text_model.embeddings.token_embedding.weight'].shape[0]}; use the CLIP-H "
                          f"tokenizer ({CLIP_H_TOKENIZER}).")
    config = CLIPConfig(
        projection_dim=weights["visual_projection.weight"].shape[0],
        vision_config=dict(
            hidden_size=vision_width, num_hidden_layers=vision_layers,
            num_attention_heads=vision_width // VISION_HEAD_WIDTH,
            intermediate_size=weights["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            patch_size=patch.shape[-1], image_size=grid * patch.shape[-1],
            projection_dim=weights["visual_projection.weight"].shape[0], hidden_act="gelu", layer_norm_eps=1e-5),
        text_config=dict(
            hidden_size=text_width, num_hidden_layers=text_layers, num_attention_heads=text_width // TEXT_HEAD_WIDTH,
            intermediate_size=weights["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            vocab_size=weights["text_model.embeddings.token_embedding.weight"].shape[0],
            max_position_embeddings=weights["text_model.embeddings.position_embedding.weight"].shape[0],
            projection_dim=weights["text_projection.weight"].shape[0], hidden_act="gelu", layer_norm_eps=1e-5,
            # the pooled output is read at the first eos: the tokenizer's end-of-text id
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id))
    return config, weights, origins


def count_layers(state: dict[str, torch.Tensor], prefix: str) -> int:
    indices = {key[len(prefix):].split(".", 1)[0] for key in state if key.startswith(prefix)}
    return len(indices)


# ---------------------------------------------------------------------------------------------- shared loading
def weights_file(checkpoint: str, repo: str, filename: str, what: str) -> str:
    """The local checkpoint path, or the hub file `repo`/`filename` (downloaded once, then cached)."""
    if checkpoint:
        path = os.path.expanduser(checkpoint)
        if not os.path.isfile(path):
            raise RewardError(f"{what} checkpoint {checkpoint} does not exist; pass the path of {filename} (from the "
                              f"hub repo {repo}) or leave checkpoint empty to download it.")
        return path
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename)
    except Exception as exc:  # offline and not cached, no network, proxy: all mean the same to the user
        raise RewardError(f"could not get the {what} weights {repo}/{filename} ({type(exc).__name__}); download the "
                          f"file on a machine with hub access and pass checkpoint=PATH.") from None


def read_state_dict(path: str, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a torch checkpoint, bare or under 'state_dict'; loaded without unpickling code."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated download, wrong format, pickled objects: the file is unusable either way
        reason = library_reason(exc)
        raise RewardError(f"could not read the {what} checkpoint {path}: {reason}; the file is damaged or not a torch "
                          f"checkpoint (download it again).") from None
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RewardError(f"{path} holds no state dict of tensors; pass the {what} checkpoint file itself.")
    return state


def load_tokenizer(tokenizer_class, spec: str, reward: str):
    try:
        return tokenizer_class.from_pretrained(os.path.expanduser(spec))
    except Exception as exc:  # not cached offline, bad folder: the user fixes both by pointing at a good one
        reason = library_reason(exc)
        raise RewardError(f"could not load the {reward} tokenizer {spec!r}: {reason}; pass tokenizer= a hub id or a "
                          f"local folder holding it.") from None


def build_from_weights(make_model: Callable[[], torch.nn.Module], weights: dict[str, torch.Tensor],
                       origins: dict[str, str], source: str) -> torch.nn.Module:
    """The model `make_model` builds, holding `weights` (its full state dict); built on the meta device so no
    random initialisation is computed and no second copy of the weights is allocated."""
    with torch.device("meta"):
        model = make_model()
    expected = model.state_dict()  # meta tensors: shapes only
    for key in expected.keys() - weights.keys():  # transformers before 4.31 keeps this arange in the state dict
        if key.endswith("embeddings.position_ids"):
            weights = {**weights, key: torch.arange(expected[key].shape[-1]).expand(expected[key].shape)}
    missing, unexpected = sorted(expected.keys() - weights.keys()), sorted(weights.keys() - expected.keys())
    if missing:
        raise RewardError(f"{source} lacks weights for {missing[0]} ({len(missing)} missing); it is not the "
                          f"architecture this reward expects.")
    if unexpected:
        raise RewardError(f"{source} has a weight the model does not, {origins[unexpected[0]]!r}; it is not the "
                          f"architecture this reward expects.")
    for key, tensor in weights.items():
        if tensor.shape != expected[key].shape:
            raise RewardError(f"{source}: {origins[key]} has shape {tuple(tensor.shape)} where the rest of the "
                              f"checkpoint implies {tuple(expected[key].shape)}; the file is damaged or mixes models.")
    model.load_state_dict(weights, strict=True, assign=True)
    # Position ids are non-persistent buffers, in no state dict: give them their values (0, 1, 2, ...) again.
    for name, buffer in list(model.named_buffers()):
        module_name, _, buffer_name = name.rpartition(".")
        if buffer.is_meta and buffer_name == "position_ids":
            setattr(model.get_submodule(module_name), buffer_name,
                    torch.arange(buffer.shape[-1]).expand(buffer.shape).clone())
    return model
