"""diffusers pipeline -> original single-file layout (LDM keys for SD1/SD2, SGM keys for SDXL), for the tests of
prdp_core.single_file: they save tiny pipelines as the files A1111 and ComfyUI users have, then load them back.

Written from the public key maps (diffusers' scripts/convert_diffusers_to_original_stable_diffusion.py and
convert_diffusers_to_original_sdxl.py, the inverse of what diffusers' single-file loader reads), generalised to
any number of blocks and layers so tiny models convert too.
"""

from __future__ import annotations

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_TEXT_PREFIX = "cond_stage_model.transformer."
SD2_TEXT_PREFIX = "cond_stage_model.model."
SDXL_TEXT_PREFIXES = ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")

UNET_TOP = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
            "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
            "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2."}
UNET_RESNET = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "norm2.": "out_layers.0.",
               "conv2.": "out_layers.3.", "time_emb_proj.": "emb_layers.1.", "conv_shortcut.": "skip_connection."}
VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


def pipeline_to_original(pipe, text_layout: str = "clip") -> dict[str, torch.Tensor]:
    """The single-file state dict of `pipe`. SD pipelines: text_layout "clip" (SD1, HF CLIP keys) or "openclip"
    (SD2, OpenCLIP keys with one extra final layer the loader must ignore, as in real SD2 files)."""
    state = {UNET_PREFIX + k: v for k, v in unet_to_ldm(pipe.unet).items()}
    state.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(pipe.vae).items()})
    if getattr(pipe, "text_encoder_2", None) is not None:
        state.update(_prefixed(SDXL_TEXT_PREFIXES[0], clip_to_hf_layout(pipe.text_encoder)))
        state.update(_prefixed(SDXL_TEXT_PREFIXES[1], clip_to_openclip(pipe.text_encoder_2)))
    elif text_layout == "openclip":
        state.update(_prefixed(SD2_TEXT_PREFIX, clip_to_openclip(pipe.text_encoder, extra_layer=True)))
    else:
        state.update(_prefixed(SD1_TEXT_PREFIX, clip_to_hf_layout(pipe.text_encoder)))
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def unet_to_ldm(unet) -> dict[str, torch.Tensor]:
    config = unet.config
    per_block = config.layers_per_block + 1  # LDM counts the downsampler (input) or upsampler slot (output) too
    prefixes = dict(UNET_TOP)
    for i, up_type in enumerate(config.up_block_types):
        for j in range(config.layers_per_block):
            prefixes[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{per_block * i + j + 1}.0."
            prefixes[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{per_block * i + j + 1}.1."
        prefixes[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{per_block * (i + 1)}.0.op."
        for j in range(per_block):
            prefixes[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{per_block * i + j}.0."
            prefixes[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{per_block * i + j}.1."
        # the upsampler follows the last resnet, and its attention when the block has one
        prefixes[f"up_blocks.{i}.upsamplers.0."] = (f"output_blocks.{per_block * i + per_block - 1}."
                                                    f"{2 if 'CrossAttn' in up_type else 1}.")
    prefixes.update({"mid_block.resnets.0.": "middle_block.0.", "mid_block.attentions.0.": "middle_block.1.",
                     "mid_block.resnets.1.": "middle_block.2."})
    converted = {}
    for key, value in unet.state_dict().items():
        prefix = _matching_prefix(key, prefixes)
        rest = key[len(prefix):]
        if ".resnets." in prefix:
            rest = _replace_start(rest, UNET_RESNET)
        converted[prefixes[prefix] + rest] = value
    return converted


def vae_to_ldm(vae) -> dict[str, torch.Tensor]:
    config = vae.config
    last = len(config.block_out_channels) - 1
    prefixes = {}
    for i in range(last + 1):  # LDM numbers the decoder's up blocks from the bottom (reverse of diffusers)
        for j in range(config.layers_per_block):
            prefixes[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        prefixes[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
        for j in range(config.layers_per_block + 1):
            prefixes[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{last - i}.block.{j}."
        prefixes[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{last - i}.upsample."
    for part in ("encoder", "decoder"):
        prefixes.update({f"{part}.mid_block.resnets.0.": f"{part}.mid.block_1.",
                         f"{part}.mid_block.resnets.1.": f"{part}.mid.block_2.",
                         f"{part}.mid_block.attentions.0.": f"{part}.mid.attn_1.",
                         f"{part}.conv_norm_out.": f"{part}.norm_out."})
    converted = {}
    for key, value in vae.state_dict().items():
        prefix = _matching_prefix(key, prefixes, default="")
        rest = key[len(prefix):]
        if ".resnets." in prefix:
            rest = _replace_start(rest, {"conv_shortcut.": "nin_shortcut."})
        if ".attentions." in prefix:
            rest = _replace_start(rest, VAE_ATTENTION)
            if value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        converted[prefixes.get(prefix, "") + rest] = value
    return converted


def clip_to_hf_layout(text_encoder) -> dict[str, torch.Tensor]:
    """SD1 and SDXL's first encoder are stored as transformers' CLIPTextModel of 2022: keys under text_model."""
    return {("" if k.startswith("text_model.") else "text_model.") + k: v
            for k, v in text_encoder.state_dict().items() if not k.endswith("position_ids")}


def clip_to_openclip(text_encoder, extra_layer: bool = False) -> dict[str, torch.Tensor]:
    """OpenCLIP's text tower keys: fused q/k/v in_proj, resblocks, ln_final, text_projection as (width, dim).
    `extra_layer` appends one more resblock, as SD2 files hold OpenCLIP's last layer that SD2 does not use."""
    state = {k.removeprefix("text_model."): v for k, v in text_encoder.state_dict().items()}
    layers = text_encoder.config.num_hidden_layers
    width = text_encoder.config.hidden_size
    out = {"token_embedding.weight": state["embeddings.token_embedding.weight"],
           "positional_embedding": state["embeddings.position_embedding.weight"],
           "ln_final.weight": state["final_layer_norm.weight"], "ln_final.bias": state["final_layer_norm.bias"]}
    for i in range(layers):
        out.update(_openclip_layer(state, f"encoder.layers.{i}.", f"transformer.resblocks.{i}."))
    if extra_layer:
        unused = _openclip_layer(state, f"encoder.layers.{layers - 1}.", f"transformer.resblocks.{layers}.")
        out.update({k: v + 1.0 for k, v in unused.items()})  # different weights: using them would show
    if "text_projection.weight" in state:
        out["text_projection"] = state["text_projection.weight"].T
    else:  # SD2 files keep OpenCLIP's projection although SD2 conditions on hidden states
        out["text_projection"] = torch.randn(width, width)
    return out


def _openclip_layer(state: dict, hf: str, oc: str) -> dict[str, torch.Tensor]:
    attention = hf + "self_attn."
    return {
        oc + "attn.in_proj_weight": torch.cat([state[f"{attention}{p}_proj.weight"] for p in "qkv"]),
        oc + "attn.in_proj_bias": torch.cat([state[f"{attention}{p}_proj.bias"] for p in "qkv"]),
        oc + "attn.out_proj.weight": state[attention + "out_proj.weight"],
        oc + "attn.out_proj.bias": state[attention + "out_proj.bias"],
        oc + "ln_1.weight": state[hf + "layer_norm1.weight"], oc + "ln_1.bias": state[hf + "layer_norm1.bias"],
        oc + "ln_2.weight": state[hf + "layer_norm2.weight"], oc + "ln_2.bias": state[hf + "layer_norm2.bias"],
        oc + "mlp.c_fc.weight": state[hf + "mlp.fc1.weight"], oc + "mlp.c_fc.bias": state[hf + "mlp.fc1.bias"],
        oc + "mlp.c_proj.weight": state[hf + "mlp.fc2.weight"], oc + "mlp.c_proj.bias": state[hf + "mlp.fc2.bias"],
    }


def _prefixed(prefix: str, state: dict) -> dict:
    return {prefix + k: v for k, v in state.items()}


def _matching_prefix(key: str, prefixes: dict, default: str | None = None) -> str:
    matches = [p for p in prefixes if key.startswith(p)]
    if not matches:
        if default is not None:
            return default
        raise KeyError(f"no LDM name for diffusers key {key}")
    return max(matches, key=len)


def _replace_start(rest: str, renames: dict) -> str:
    for old, new in renames.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest
