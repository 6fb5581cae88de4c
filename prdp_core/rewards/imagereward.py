"""`imagereward`: ImageReward v1.0 (Xu et al. 2023, github.com/THUDM/ImageReward), BLIP's ViT-L image encoder and
cross-attending BERT text encoder with an MLP head, trained on human rankings of generated images.

The release checkpoint (hub repo THUDM/ImageReward, ImageReward.pt) is converted at load time into transformers'
`BlipVisionModel` and `BlipTextModel` (ports of BLIP's vit.py and med.py), so neither the image-reward package nor
torchvision is needed. The score is ImageReward's `score`: the head's output standardised with the mean and std of
its training benchmark, so roughly -2 (poor) to +2 (good)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from ..errors import RewardError
from .base import Reward, register_reward
from .hps import (OPENAI_MEAN, OPENAI_STD, build_from_weights, count_layers, load_tokenizer, read_state_dict,
                  weights_file)

IMAGEREWARD_REPO = "THUDM/ImageReward"
IMAGEREWARD_FILE = "ImageReward.pt"
BERT_TOKENIZER = "bert-base-uncased"  # BLIP's init_tokenizer; its two added tokens ([DEC], [ENC]) are unused here
# ImageReward.py: prompts are cut to 35 tokens; raw scores are standardised with these.
MAX_PROMPT_TOKENS = 35
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
HEAD_WIDTH = 64  # BLIP's ViT-L (16 heads of 1024) and BERT-base (12 of 768): head counts are not in the weights
VISION, TEXT, HEAD = "blip.visual_encoder.", "blip.text_encoder.", "mlp.layers."


class ImageRewardModel(torch.nn.Module):
    """ImageReward.py `score`: BLIP ViT -> BERT cross-attending to all image tokens -> MLP on the [CLS] output."""

    def __init__(self, vision_config, text_config, head_sizes: list[int]):
        from transformers import BlipTextModel, BlipVisionModel

        super().__init__()
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        # The original MLP has dropouts but no activations between its Linears (its ReLUs are commented out).
        self.head = torch.nn.Sequential(*[torch.nn.Linear(a, b) for a, b in zip(head_sizes, head_sizes[1:])])

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_tokens = self.vision(pixel_values=pixels).last_hidden_state
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_tokens,
                         is_decoder=False).last_hidden_state
        return self.head(text[:, 0].float()).squeeze(-1)  # the head in fp32 whatever the towers' dtype


@register_reward("imagereward")
class ImageReward(Reward):
    """Options: `checkpoint` (a local ImageReward.pt instead of the hub file), `tokenizer` (hub id or folder of the
    bert-base-uncased tokenizer)."""

    name = "imagereward"
    batch_size = 16

    def __init__(self, device="cpu", dtype="fp32", checkpoint: str = "", tokenizer: str = BERT_TOKENIZER):
        super().__init__(device, dtype)
        self.checkpoint, self.tokenizer_spec = checkpoint, tokenizer

    def load(self) -> None:
        from transformers import BertTokenizer

        path = weights_file(self.checkpoint, IMAGEREWARD_REPO, IMAGEREWARD_FILE, "ImageReward")
        self.tokenizer = load_tokenizer(BertTokenizer, self.tokenizer_spec, "imagereward")
        vision_config, text_config, head_sizes, weights, origins = blip_to_transformers(
            read_state_dict(path, "ImageReward"), path)
        self.model = build_from_weights(lambda: ImageRewardModel(vision_config, text_config, head_sizes), weights,
                                        origins, path)
        self.model.to(self.device, self.dtype).eval()
        self.model.head.float()  # one score from 768 features: bf16 would move it by ~0.05
        self.image_size = vision_config.image_size

    @torch.no_grad()
    def score_batch(self, images, prompts):
        pixels = torch.stack([imagereward_pixels(image, self.image_size) for image in images])
        pixels = pixels.to(self.device, self.dtype)
        text = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS,
                              return_tensors="pt").to(self.device)
        raw = self.model(pixels, text.input_ids, text.attention_mask).float()
        return ((raw - REWARD_MEAN) / REWARD_STD).cpu()


def imagereward_pixels(image, size: int) -> torch.Tensor:
    """ImageReward.py `_transform`: torchvision Resize(size, BICUBIC) on the PIL image (shorter side to `size`, the
    longer one truncated to int), CenterCrop(size), RGB, ToTensor, OpenAI CLIP mean/std."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(size * long / short)
    new_width, new_height = (size, new_long) if width <= height else (new_long, size)
    image = image.resize((new_width, new_height), Image.BICUBIC)
    left, top = int(round((new_width - size) / 2.0)), int(round((new_height - size) / 2.0))
    image = image.crop((left, top, left + size, top + size)).convert("RGB")
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    return (pixels - OPENAI_MEAN[:, None, None]) / OPENAI_STD[:, None, None]


def blip_to_transformers(state: dict[str, torch.Tensor], source: str):
    """(vision config, text config, head sizes, weights, the original key of each) for ImageReward's state dict:
    BLIP vit.py keys renamed to BlipVisionModel's (as transformers' convert_blip_original_pytorch_to_hf.py does),
    med.py keys kept (BlipTextModel uses them as they are), the MLP's Linears renumbered. Keys ImageReward itself
    ignores (BLIP's vision_proj/text_proj, the saved position ids) are dropped."""
    from transformers import BlipTextConfig, BlipVisionConfig

    def need(key: str) -> torch.Tensor:
        if key not in state:
            raise RewardError(f"{source} is not an ImageReward checkpoint: it has no {key!r}.")
        return state[key]

    weights: dict[str, torch.Tensor] = {}
    origins: dict[str, str] = {}
    head_indices = sorted({int(key[len(HEAD):].split(".")[0]) for key in state if key.startswith(HEAD)})
    for key, tensor in state.items():
        if key.startswith(VISION):
            target = "vision." + _vision_key(key[len(VISION):])
        elif key.startswith(TEXT) and not key.endswith("position_ids"):
            target = "text." + key[len(TEXT):]
        elif key.startswith(HEAD):
            index, kind = key[len(HEAD):].split(".", 1)
            target = f"head.{head_indices.index(int(index))}.{kind}"
        else:
            continue
        weights[target], origins[target] = tensor, key

    width, patch = need(VISION + "cls_token").shape[-1], need(VISION + "patch_embed.proj.weight").shape[-1]
    text_width = need(TEXT + "embeddings.word_embeddings.weight").shape[1]
    for what, size in (("vision", width), ("text", text_width)):
        if size % HEAD_WIDTH:
            raise RewardError(f"{source}: {what} width {size} is not a multiple of BLIP's head width {HEAD_WIDTH}; "
                              f"ImageReward is BLIP ViT-L with BERT-base.")
    vision_config = BlipVisionConfig(
        hidden_size=width, num_attention_heads=width // HEAD_WIDTH, patch_size=patch,
        num_hidden_layers=count_layers(state, VISION + "blocks."),
        intermediate_size=need(VISION + "blocks.0.mlp.fc1.weight").shape[0],
        image_size=math.isqrt(need(VISION + "pos_embed").shape[1] - 1) * patch,
        hidden_act="gelu", layer_norm_eps=1e-6)  # vit.py: LayerNorm(eps=1e-6), nn.GELU
    text_config = BlipTextConfig(
        vocab_size=need(TEXT + "embeddings.word_embeddings.weight").shape[0], hidden_size=text_width,
        num_attention_heads=text_width // HEAD_WIDTH, num_hidden_layers=count_layers(state, TEXT + "encoder.layer."),
        intermediate_size=need(TEXT + "encoder.layer.0.intermediate.dense.weight").shape[0],
        encoder_hidden_size=need(TEXT + "encoder.layer.0.crossattention.self.key.weight").shape[1],
        max_position_embeddings=need(TEXT + "embeddings.position_embeddings.weight").shape[0],
        hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0,  # med_config.json (BERT-base)
        bos_token_id=None, eos_token_id=None, sep_token_id=None,  # for generation only; the defaults need BERT's vocab
        is_decoder=True)  # transformers gives layers cross-attention only in decoder configs; run as an encoder
    head_sizes = [need(f"{HEAD}{head_indices[0]}.weight").shape[1] if head_indices else 0]
    head_sizes += [need(f"{HEAD}{i}.weight").shape[0] for i in head_indices]
    if len(head_sizes) < 2:
        raise RewardError(f"{source} is not an ImageReward checkpoint: it has no {HEAD}* (the MLP head).")
    return vision_config, text_config, head_sizes, weights, origins


def _vision_key(key: str) -> str:
    """A BLIP/timm ViT key as transformers' BlipVisionModel names it; unknown keys pass through (and are then
    reported as weights the model lacks)."""
    renames = {"cls_token": "embeddings.class_embedding", "pos_embed": "embeddings.position_embedding",
               "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
               "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
               "norm.weight": "post_layernorm.weight", "norm.bias": "post_layernorm.bias"}
    if key in renames:
        return renames[key]
    if key.startswith("blocks."):
        _, index, rest = key.split(".", 2)
        module, _, kind = rest.rpartition(".")
        module = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                  "attn.proj": "self_attn.projection"}.get(module, module)  # mlp.fc1 / mlp.fc2 keep their names
        return f"encoder.layers.{index}.{module}.{kind}"
    return key
