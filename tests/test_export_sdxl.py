"""Per-architecture export: SDXL files use kohya's SGM block names and reload exactly in diffusers; SD2 and SDXL get
the version metadata A1111 filters its LoRA list by.

The SGM names are checked against two independent public sources: kohya-ss/sd-scripts
library/sdxl_model_util.py `make_unet_conversion_map` (transcribed below as the reference) and diffusers' own loader
(`_maybe_map_sgm_blocks_to_diffusers` + `_convert_non_diffusers_lora_to_diffusers`, run from the venv).
"""

import re

import diffusers
import numpy as np
import pytest
import torch
from packaging import version
from safetensors import safe_open

from conftest import needs_diffusers_lora_loading
from prdp_core.config import KOHYA_UNET_TARGETS
from prdp_core.errors import ExportError
from prdp_core.export import (LoraWeights, a1111_user_metadata, export_lora, kohya_name, kohya_state_dict,
                              sgm_module_path)
from model_builders import build_tiny_sd2_pipeline
from prdp_core.models import (ModelInfo, add_lora, build_tiny_xl_pipeline, load_pipeline,
                              lora_modules, lora_parameters, model_info)
from prdp_core.trainer import Trainer

PROMPT = "a painting of a wolf"
RANK, ALPHA = 4, 6.0  # alpha != rank: a lost or misread alpha changes the output

# The real SDXL base UNet (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json), built on the meta device.
SDXL_UNET_CONFIG = dict(
    block_out_channels=[320, 640, 1280], layers_per_block=2, transformer_layers_per_block=[1, 2, 10],
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], attention_head_dim=[5, 10, 20],
    use_linear_projection=True, cross_attention_dim=2048, addition_embed_type="text_time",
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, sample_size=128)


def kohya_sdxl_conversion_map() -> dict[str, str]:
    """diffusers prefix -> SGM prefix, transcribed from kohya's make_unet_conversion_map (3 blocks, 2 layers)."""
    layer = []
    for i in range(3):
        for j in range(2):
            layer.append((f"input_blocks.{3 * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            layer.append((f"input_blocks.{3 * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(3):
            layer.append((f"output_blocks.{3 * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            layer.append((f"output_blocks.{3 * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        layer.append((f"input_blocks.{3 * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
        layer.append((f"output_blocks.{3 * i + 2}.2.", f"up_blocks.{i}.upsamplers.0."))
    layer.append(("middle_block.1.", "mid_block.attentions.0."))
    layer += [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]
    resnet = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("out_layers.0.", "norm2."),
              ("out_layers.3.", "conv2."), ("emb_layers.1.", "time_emb_proj."), ("skip_connection.", "conv_shortcut.")]
    pairs = []
    for sgm, hf in layer:
        pairs += [(sgm + a, hf + b) for a, b in resnet] if "resnets" in hf else [(sgm, hf)]
    for j in range(2):
        pairs.append((f"time_embed.{j * 2}.", f"time_embedding.linear_{j + 1}."))
        pairs.append((f"label_emb.0.{j * 2}.", f"add_embedding.linear_{j + 1}."))
    pairs += [("input_blocks.0.0.", "conv_in."), ("out.0.", "conv_norm_out."), ("out.2.", "conv_out.")]
    return {hf: sgm for sgm, hf in pairs}


def kohya_convert(key: str, conversion: dict[str, str]) -> str | None:
    """kohya's convert_unet_state_dict for one key: the longest listed prefix of `key` is renamed."""
    fragments = key.split(".")[:-1]
    while fragments:
        prefix = ".".join(fragments) + "."
        if prefix in conversion:
            return conversion[prefix] + key[len(prefix):]
        fragments.pop()
    return None


# ------------------------------------------------------------------------------------------- tiny SDXL round trip
def _unet_inputs():
    g = torch.Generator().manual_seed(5)
    return dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([500, 20]),
                encoder_hidden_states=torch.randn(2, 77, 96, generator=g),  # tiny-xl: 32 + 64 wide text encoders
                added_cond_kwargs={"text_embeds": torch.randn(2, 64, generator=g),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64], [64, 64, 8, 0, 64, 64]])})


def _eps(pipe):
    with torch.no_grad():
        return pipe.unet(**_unet_inputs()).sample


def _images(pipe):
    return pipe(PROMPT, num_inference_steps=3, guidance_scale=5.0, height=64, width=64,
                generator=torch.Generator().manual_seed(3), output_type="np").images


@pytest.fixture(scope="module")
def adapted_xl():
    pipe = build_tiny_xl_pipeline()
    add_lora(pipe.unet, RANK, ALPHA, KOHYA_UNET_TARGETS)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in lora_parameters(pipe.unet):  # as if trained: lora_B (zero at init) and lora_A both non-zero
            param.copy_(0.2 * torch.randn(param.shape, generator=g))
    weights = LoraWeights.from_unet(pipe.unet, model_info(pipe, "stabilityai/stable-diffusion-xl-base-1.0"),
                                    {"prdp_reward_mix": "1*jpeg_compressibility"})
    return pipe, weights, _eps(pipe), _images(pipe)


@needs_diffusers_lora_loading
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_sdxl_export_reloads_exactly_in_diffusers(adapted_xl, tmp_path, fmt):
    _, weights, eps, images = adapted_xl
    assert weights.model.arch == "sdxl" and weights.model.layers_per_block == 2
    path = export_lora(weights, tmp_path / "wolf_xl.safetensors", format=fmt, dtype="fp32")
    fresh = build_tiny_xl_pipeline()
    base_eps = _eps(fresh)
    base_images = _images(fresh) if fmt == "kohya" else None  # the whole pipeline once: a CPU-minute matters
    fresh.load_lora_weights(str(path.parent), weight_name=path.name)
    assert (base_eps - eps).abs().max().item() > 1e-2  # the adapter matters: the comparison can fail
    # the diffusers format carries alpha / rank folded into lora_B: the same product, rounded in another order
    assert (_eps(fresh) - eps).abs().max().item() < (1e-5 if fmt == "kohya" else 1e-4)
    if base_images is not None:
        assert abs(base_images - images).max() > 1e-2
        assert abs(_images(fresh) - images).max() < 1e-3


def test_sdxl_kohya_keys_are_kohya_sgm_names(adapted_xl, tmp_path):
    pipe, weights, _, _ = adapted_xl
    path = export_lora(weights, tmp_path / "wolf_xl.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    modules = lora_modules(pipe.unet)
    # down block 1: 2 transformers x (2 layers x 10 + proj_in/out) = 44; mid: 1 x 22; up block 0: 3 x 22 = 66
    assert len(modules) == 132 and len(keys) == 3 * 132
    stems = {key.partition(".")[0] for key in keys}
    assert all(re.fullmatch(r"lora_unet_(input_blocks|middle_block|output_blocks)_[a-z0-9_]+", s) for s in stems)
    for stem in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k",
                 "lora_unet_input_blocks_5_1_transformer_blocks_1_ff_net_0_proj",
                 "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_out_0",
                 "lora_unet_middle_block_1_proj_in",
                 "lora_unet_output_blocks_0_1_proj_out",
                 "lora_unet_output_blocks_2_1_transformer_blocks_1_ff_net_2"):
        assert stem in stems
    # every name is what kohya's own diffusers -> SDXL conversion gives (the tiny UNet fits its 3x2 numbering)
    conversion = kohya_sdxl_conversion_map()
    assert stems == {"lora_unet_" + kohya_convert(m + ".weight", conversion)[:-len(".weight")].replace(".", "_")
                     for m in modules}
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sdxl_base_v1-0", "False")
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.resolution"] == "64x64" and meta["ss_resolution"] == "(64, 64)"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert meta["ss_sd_model_name"] == "stable-diffusion-xl-base-1.0"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "6")


# ------------------------------------------------------------------------------------------- real SDXL layout
@pytest.fixture(scope="module")
def sdxl_unet():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**SDXL_UNET_CONFIG)


def test_real_sdxl_layout_default_targets_give_kohya_module_set():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET_CONFIG)
        add_lora(unet, RANK, ALPHA, KOHYA_UNET_TARGETS)
    info = ModelInfo("sdxl", "sdxl", "epsilon", 1024, unet.config.layers_per_block)
    modules = lora_modules(unet)
    names = {kohya_name(m, info) for m in modules}
    assert len(modules) == len(names) == 722  # kohya: 70 transformer layers x 10 + 11 x (proj_in, proj_out)
    conversion = kohya_sdxl_conversion_map()
    for module in modules:
        assert sgm_module_path(module, 2) == kohya_convert(module + ".weight", conversion)[:-len(".weight")]
    for stem in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_k",
                 "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2",
                 "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_out_0",
                 "lora_unet_output_blocks_0_1_proj_out",
                 "lora_unet_output_blocks_5_1_transformer_blocks_1_attn2_to_v"):
        assert stem in names


def test_every_sdxl_unet_weight_maps_like_kohya(sdxl_unet):
    """Resnets, samplers, embeddings and conv_in/out too (LoCon-style targets): all 1680 weights of the real UNet."""
    conversion = kohya_sdxl_conversion_map()
    keys = list(sdxl_unet.state_dict())
    assert len(keys) == 1680
    for key in keys:
        module, _, param = key.rpartition(".")
        assert f"{sgm_module_path(module, 2)}.{param}" == kohya_convert(key, conversion), key


@pytest.mark.skipif(version.parse(diffusers.__version__) < version.parse("0.33"),
                    reason="diffusers 0.31 and 0.32 map SGM names inside the transformer blocks only (the default "
                           "targets, reloaded exactly by the tests above), not the resnets this test also names")
def test_diffusers_loader_maps_our_sgm_names_back(sdxl_unet):
    """diffusers' kohya/SGM loader turns every exported name back into the module it came from (all Linear and
    Conv2d modules of the real SDXL UNet), alphas included."""
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)
    from diffusers.utils import convert_unet_state_dict_to_peft

    info = ModelInfo("sdxl", "sdxl", "epsilon", 1024, 2)
    modules = {n for n, m in sdxl_unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    state = {}
    for module in modules:
        stem = kohya_name(module, info)
        state.update({f"{stem}.lora_down.weight": torch.zeros(1), f"{stem}.lora_up.weight": torch.zeros(1),
                      f"{stem}.alpha": torch.tensor(ALPHA)})
    state = _maybe_map_sgm_blocks_to_diffusers(state, sdxl_unet.config)
    state, alphas = _convert_non_diffusers_lora_to_diffusers(state)
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
    assert {k.removesuffix(".lora_A.weight") for k in peft if k.endswith(".lora_A.weight")} == modules
    assert len(alphas) == len(modules) and set(alphas.values()) == {ALPHA}


def test_sgm_mapping_depends_on_layers_per_block():
    # SD1-style 2 resnets per down block vs a 1-layer model: the block numbers shift, the layout rule does not
    assert sgm_module_path("down_blocks.1.attentions.1.proj_in", 2) == "input_blocks.5.1.proj_in"
    assert sgm_module_path("down_blocks.1.attentions.0.proj_in", 1) == "input_blocks.3.1.proj_in"
    assert sgm_module_path("down_blocks.0.downsamplers.0.conv", 1) == "input_blocks.2.0.op"
    assert sgm_module_path("up_blocks.1.attentions.1.proj_out", 1) == "output_blocks.3.1.proj_out"
    assert sgm_module_path("up_blocks.0.upsamplers.0.conv", 1) == "output_blocks.1.2.conv"
    assert sgm_module_path("up_blocks.0.resnets.1.conv_shortcut", 1) == "output_blocks.1.0.skip_connection"
    with pytest.raises(ExportError, match="layers per block"):
        sgm_module_path("down_blocks.0.resnets.2.conv1", 2)  # would collide with the downsampler's number
    with pytest.raises(ExportError, match="no SGM"):
        sgm_module_path("encoder_hid_proj", 2)


# ------------------------------------------------------------------------------------------- version metadata
def _detect_version(meta: dict[str, str]) -> str:
    """A1111 NetworkOnDisk.detect_version (extensions-builtin/Lora/network.py), mirrored."""
    if str(meta.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(meta.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if meta else "Unknown"


@pytest.mark.parametrize("prediction,version,architecture,resolution", [
    ("v_prediction", "sd_v2_v", "stable-diffusion-v2-768-v/lora", 768),
    ("epsilon", "sd_v2", "stable-diffusion-v2-512/lora", 512)])
def test_sd2_metadata_and_diffusers_names(adapted_xl, tmp_path, prediction, version, architecture, resolution):
    _, xl, _, _ = adapted_xl
    info = ModelInfo("stabilityai/stable-diffusion-2-1", "sd2", prediction, resolution, 2)
    weights = LoraWeights(xl.state_dict, RANK, ALPHA, xl.targets, info, {"prdp_reward_mix": "1*aesthetic"})
    path = export_lora(weights, tmp_path / "sd2.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert all(k.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_")) for k in keys)
    assert (meta["ss_v2"], meta["ss_base_model_version"]) == ("True", version)
    assert meta["modelspec.architecture"] == architecture and meta["modelspec.implementation"] == "diffusers"
    assert meta["modelspec.prediction_type"] == ("v" if prediction == "v_prediction" else "epsilon")
    assert meta["modelspec.resolution"] == f"{resolution}x{resolution}"
    assert _detect_version(meta) == "SD2" and a1111_user_metadata(weights)["sd version"] == "SD2"


def test_a1111_detects_each_architecture(adapted_xl):
    _, xl, _, _ = adapted_xl
    from prdp_core.export import kohya_metadata

    for arch, expected in (("sd1", "SD1"), ("sd2", "SD2"), ("sdxl", "SDXL")):
        weights = LoraWeights(xl.state_dict, RANK, ALPHA, xl.targets, ModelInfo("m", arch, "epsilon", 512, 2))
        meta = kohya_metadata(weights, kohya_state_dict(weights), "x")
        assert _detect_version(meta) == expected == a1111_user_metadata(weights)["sd version"]


# ------------------------------------------------------------------------------------ train -> export -> diffusers
@needs_diffusers_lora_loading
@pytest.mark.parametrize("build,version,prediction", [(build_tiny_sd2_pipeline, "SD2", "v"),
                                                      (build_tiny_xl_pipeline, "SDXL", "epsilon")])
def test_trained_lora_reloads_in_diffusers_as_the_run_left_it(tmp_path, tiny_config, build, version, prediction):
    """The user's whole path for SD2 (v-prediction) and SDXL: a diffusers folder -> prdp training -> the exported
    kohya file -> a fresh pipeline's load_lora_weights draws what the run's in-memory adapter draws."""
    folder = tmp_path / "model"
    build().save_pretrained(folder)
    trainer = Trainer(type(tiny_config).from_dict({**tiny_config.to_dict(), "model": str(folder), "lora_alpha": 6.0,
                                                   "learning_rate": 3e-2}))
    lora = trainer.run()
    with safe_open(str(lora), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert _detect_version(meta) == version and meta["modelspec.prediction_type"] == prediction
    if version == "SDXL":
        assert all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
                   for k in keys)
    trained = _images(trainer.pipe)
    fresh = load_pipeline(str(folder))
    base = _images(fresh)
    fresh.load_lora_weights(str(lora.parent), weight_name=lora.name)
    assert np.abs(_images(fresh) - trained).max() < 1e-3
    assert np.abs(trained - base).max() > 1e-2  # the run moved the model, so the comparison can fail
