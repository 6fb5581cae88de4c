"""Single-file checkpoints (A1111 models/Stable-diffusion, ComfyUI models/checkpoints) load offline.

Tiny SD1-, SD2- and SDXL-shaped pipelines are saved in the original LDM/SGM key layout (tests/ldm_layout.py) and
loaded back through prdp_core.single_file with the network blocked; the loaded models must compute what the
originals compute. Detection is checked on key sets with the real models' shapes, the shipped configs against the
real models' parameter counts, and the tokenizer against CLIP's published token ids.
"""

import gzip
import hashlib
import json
import re
import socket
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ldm_layout import pipeline_to_original
from prdp_core import single_file
from prdp_core.clip_tokenizer import (BPE_FILE, CONFIGS_DIR, build_clip_tokenizer, clip_vocab, tokenizers_for,
                                      write_clip_vocab_files)
from prdp_core.errors import ModelLoadError
from model_builders import build_tiny_sd2_pipeline
from prdp_core.models import build_tiny_pipeline, build_tiny_xl_pipeline
from prdp_core.single_file import detect_checkpoint, load_single_file

TOLERANCE = 1e-5


# ---------------------------------------------------------------------------------------------- checkpoint files
def save_as_single_file(pipe, folder: Path, name: str, text_layout: str = "clip"):
    """The checkpoint in original layout, plus a diffusers config folder without any weights."""
    state = pipeline_to_original(pipe, text_layout)
    path = folder / name
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": state, "global_step": 1}, path)
    config = folder / "config"
    pipe.save_pretrained(config)
    for weights in config.rglob("*.safetensors"):
        weights.unlink()
    return path, config


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt, or diffusers' fetch of hub configs, fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the single-file loader tried to reach the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr("diffusers.loaders.single_file._download_diffusers_model_config_from_hub", refuse)


def assert_same_models(original, loaded):
    """UNet output, text embeddings (with SDXL's pooled one) and VAE decoding agree to fp32 round-off."""
    torch.manual_seed(1)
    latents = torch.randn(1, 4, 8, 8)
    text = torch.randn(1, 77, original.unet.config.cross_attention_dim)
    extra = {}
    if original.unet.config.addition_embed_type == "text_time":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 64), "time_ids": torch.tensor([[64., 64, 0, 0,
                                                                                                    64, 64]])}
    ids = original.tokenizer("a photo of a cat", padding="max_length", max_length=77, return_tensors="pt").input_ids

    def outputs(pipe) -> list:
        with torch.no_grad():
            result = [pipe.unet(latents, 500, text, **extra).sample, pipe.vae.decode(latents).sample,
                      pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2],  # SD's "clip skip"
                      pipe.text_encoder(ids).last_hidden_state]
            if getattr(pipe, "text_encoder_2", None) is not None:
                second = pipe.text_encoder_2(ids, output_hidden_states=True)
                result += [second.text_embeds, second.hidden_states[-2]]  # SDXL's pooled and token embeddings
        return result

    for name in ("tokenizer", "tokenizer_2"):  # a config folder's own complete tokenizer is used as it is
        if getattr(original, name, None) is not None:
            expected, actual = getattr(original, name), getattr(loaded, name)
            assert (actual.get_vocab(), actual.pad_token) == (expected.get_vocab(), expected.pad_token)
    for expected, actual in zip(outputs(original), outputs(loaded), strict=True):
        assert expected.shape == actual.shape
        assert (expected - actual).abs().max().item() < TOLERANCE


# ---------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sd1_checkpoint_loads_offline_and_computes_the_same(tmp_path, no_network, prediction_type):
    original = build_tiny_pipeline(prediction_type=prediction_type)
    path, config = save_as_single_file(original, tmp_path, "tiny-sd1.safetensors")
    loaded = load_single_file(path, config_folder=config)
    assert type(loaded).__name__ == "StableDiffusionPipeline"
    assert loaded.safety_checker is None
    assert loaded.scheduler.config.prediction_type == prediction_type
    assert_same_models(original, loaded)


def test_sd2_checkpoint_in_openclip_layout_loads_and_computes_the_same(tmp_path, no_network):
    original = build_tiny_sd2_pipeline()
    path, config = save_as_single_file(original, tmp_path, "tiny-sd2.safetensors", text_layout="openclip")
    assert "cond_stage_model.model.transformer.resblocks.2.attn.in_proj_weight" in _keys(path)  # OpenCLIP's last
    loaded = load_single_file(path, config_folder=config)
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert loaded.tokenizer.pad_token == "!"
    assert_same_models(original, loaded)


def test_sdxl_checkpoint_in_sgm_layout_loads_and_computes_the_same(tmp_path, no_network):
    original = build_tiny_xl_pipeline()
    path, config = save_as_single_file(original, tmp_path, "tiny-xl.safetensors")
    assert any(k.startswith("conditioner.embedders.1.model.") for k in _keys(path))
    loaded = load_single_file(path, config_folder=config)
    assert type(loaded).__name__ == "StableDiffusionXLPipeline"
    assert loaded.watermark is None  # an invisible watermark would alter the images the rewards score
    assert_same_models(original, loaded)


def test_lightning_ckpt_loads_without_running_its_pickled_code(tmp_path, no_network, monkeypatch):
    """Old .ckpt files pickle Lightning's checkpoint callback and numpy counters beside the weights; they load
    with those replaced by inert stand-ins (pytorch_lightning is not even installed here)."""
    import numpy as np

    original = build_tiny_pipeline()
    state = pipeline_to_original(original)
    callback = _fake_class(monkeypatch, "pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint")
    path = tmp_path / "tiny-sd1.ckpt"
    torch.save({"state_dict": state, "callbacks": {callback: {"best_model_score": torch.tensor(1.0)}},
                "global_step": np.int64(470000), "epoch": 3}, path)
    for module in ("pytorch_lightning.callbacks.model_checkpoint", "pytorch_lightning.callbacks",
                   "pytorch_lightning"):
        monkeypatch.delitem(sys.modules, module)
    _, config = save_as_single_file(original, tmp_path, "unused.safetensors")
    loaded = load_single_file(path, config_folder=config)
    assert_same_models(original, loaded)


def test_separate_vae_file_replaces_the_checkpoints_own(tmp_path, no_network):
    original = build_tiny_pipeline(seed=0)
    other_vae = build_tiny_pipeline(seed=1).vae  # A1111's models/VAE files hold bare LDM VAE keys
    path, config = save_as_single_file(original, tmp_path, "tiny-sd1.safetensors")
    vae_path = tmp_path / "tiny.vae.safetensors"
    from ldm_layout import vae_to_ldm
    save_file({k: v.contiguous() for k, v in vae_to_ldm(other_vae).items()}, vae_path)
    loaded = load_single_file(path, config_folder=config, vae=vae_path)
    latents = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        decoded = loaded.vae.decode(latents).sample
        assert torch.allclose(decoded, other_vae.decode(latents).sample, atol=TOLERANCE)
        assert not torch.allclose(decoded, original.vae.decode(latents).sample, atol=1e-3)


def test_real_size_vae_file_loads_with_the_shipped_config(tmp_path, no_network):
    """A full-size SD VAE (84M parameters, fp16) in A1111's models/VAE layout, through the shipped sd15 config."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from ldm_layout import vae_to_ldm

    with init_empty_weights():
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS_DIR / "sd15" / "vae"))
    vae = vae.to(torch.float16).to_empty(device="cpu")
    with torch.no_grad():
        for param in vae.parameters():
            param.copy_(torch.randn(param.shape, dtype=torch.float16))
    save_file({k: v.contiguous() for k, v in vae_to_ldm(vae).items()}, tmp_path / "vae-ft-mse.safetensors")
    loaded = single_file.load_vae(tmp_path / "vae-ft-mse.safetensors", single_file.CONFIG_FOLDERS["sd15"],
                                  torch.float16)
    expected, actual = vae.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)


def test_checkpoint_missing_some_weights_is_refused(tmp_path):
    original = build_tiny_pipeline()
    state = pipeline_to_original(original)
    del state["model.diffusion_model.middle_block.1.proj_in.weight"]  # diffusers would leave it uninitialised
    save_file(state, tmp_path / "partial.safetensors")
    _, config = save_as_single_file(original, tmp_path, "unused.safetensors")
    assert "lacks weights for some" in load_error(tmp_path / "partial.safetensors", config_folder=config)


def test_prediction_type_from_argument_and_from_a1111_yaml(tmp_path, no_network):
    original = build_tiny_pipeline()
    path, config = save_as_single_file(original, tmp_path, "tiny-sd1.safetensors")
    loaded = load_single_file(path, config_folder=config, prediction_type="v_prediction")
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    path.with_suffix(".yaml").write_text('model:\n  params:\n    parameterization: "v"\n', encoding="utf-8")
    assert load_single_file(path, config_folder=config).scheduler.config.prediction_type == "v_prediction"
    assert load_single_file(path, config_folder=config, prediction_type="epsilon").scheduler.config.prediction_type \
        == "epsilon"
    # SGM (SDXL) configs name the denoiser's scaling instead
    path.with_suffix(".yaml").write_text("model:\n  params:\n    denoiser_config:\n      params:\n        "
                                         "scaling_config:\n          target: sgm.modules.diffusionmodules."
                                         "denoiser_scaling.VScaling\n", encoding="utf-8")
    assert load_single_file(path, config_folder=config).scheduler.config.prediction_type == "v_prediction"


def test_fp16_loading(tmp_path, no_network):
    path, config = save_as_single_file(build_tiny_pipeline(), tmp_path, "tiny-sd1.safetensors")
    loaded = load_single_file(path, torch_dtype=torch.float16, config_folder=config)
    assert {loaded.unet.dtype, loaded.vae.dtype, loaded.text_encoder.dtype} == {torch.float16}


# ---------------------------------------------------------------------------------------------- bad files
def one_sentence(message: str) -> bool:
    return message.endswith(".") and not re.search(r"[.!?]\s+[A-Z]", message[:-1])


def load_error(path, **kwargs) -> str:
    with pytest.raises(ModelLoadError) as info:
        load_single_file(path, **kwargs)
    message = str(info.value)
    assert one_sentence(message), message
    return message


def test_truncated_safetensors_is_reported(tmp_path):
    path, _ = save_as_single_file(build_tiny_pipeline(), tmp_path, "cut.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    assert "cut.safetensors is incomplete" in load_error(path)
    path.write_bytes(data[:200])  # cut inside the header
    assert "is incomplete" in load_error(path)


def test_random_bytes_and_damaged_ckpt_are_reported(tmp_path):
    noise = torch.Generator().manual_seed(0)
    random_bytes = bytes(torch.randint(0, 256, (4096,), generator=noise, dtype=torch.uint8).tolist())
    (tmp_path / "noise.safetensors").write_bytes(random_bytes)
    assert "is not a valid .safetensors file" in load_error(tmp_path / "noise.safetensors")
    (tmp_path / "noise.ckpt").write_bytes(random_bytes)
    assert "not a readable checkpoint" in load_error(tmp_path / "noise.ckpt")
    torch.save({"state_dict": {"a": torch.ones(1000)}}, tmp_path / "cut.ckpt")
    data = (tmp_path / "cut.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[:len(data) // 2])
    assert "damaged or incomplete" in load_error(tmp_path / "cut.ckpt")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    assert "is empty" in load_error(tmp_path / "empty.safetensors")


def test_ckpt_with_code_is_refused_without_running_it(tmp_path, capsys):
    class Payload:
        def __reduce__(self):
            return print, ("PAYLOAD RAN",)
    torch.save({"state_dict": {"w": torch.ones(2)}, "extra": Payload()}, tmp_path / "unsafe.ckpt")
    message = load_error(tmp_path / "unsafe.ckpt")
    assert "cannot be loaded without running code" in message and "builtins.print" in message
    assert "PAYLOAD RAN" not in capsys.readouterr().out


@pytest.mark.parametrize("keys, expected", [
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 320),
      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": (320, 4),
      "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": ()}, "is a LoRA, not a base checkpoint"),
    ({"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": (4, 320)}, "is a LoRA, not a base checkpoint"),
    ({"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,),
      "model.diffusion_model.pos_embed": (1, 36864, 1536)}, "is an SD3 checkpoint"),
    ({"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale": (128,),
      "model.diffusion_model.img_in.weight": (3072, 64)}, "is a FLUX checkpoint"),
    ({"emb_params": (8, 768)}, "is a textual-inversion embedding"),
    ({"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_in.weight": (512, 4, 3, 3)}, "is a VAE"),
    ({"some.other.weight": (3, 3)}, "is not a Stable Diffusion checkpoint"),
])
def test_files_that_are_no_base_checkpoint_get_one_sentence(tmp_path, keys, expected):
    path = tmp_path / "model.safetensors"
    save_file({k: torch.zeros(shape) for k, shape in keys.items()}, path)
    message = load_error(path)
    assert message.startswith("model.safetensors ") and expected in message, message
    if "LoRA" in expected:
        assert "pass the checkpoint it was trained on" in message


def test_lora_metadata_alone_marks_a_lora(tmp_path):
    path = tmp_path / "style.safetensors"
    save_file({"lora_weird_key.weight": torch.zeros(2)}, path, metadata={"ss_network_module": "networks.lora"})
    assert "is a LoRA" in load_error(path)


def test_unsupported_checkpoint_families_get_one_sentence(tmp_path):
    # the real SDXL refiner's keys and shapes, as many as diffusers and we read
    path = tmp_path / "sd_xl_refiner_1.0.safetensors"
    save_file({k: torch.zeros(shape) for k, shape in REFINER.items()}, path)
    message = load_error(path)
    assert message == ("sd_xl_refiner_1.0.safetensors is an SDXL refiner checkpoint; prdp trains SD1.x, SD2.x and "
                       "SDXL base checkpoints.")


def test_bad_arguments_are_named(tmp_path):
    from prdp_core.errors import ConfigError

    with pytest.raises(ConfigError, match="prediction_type 'v'"):
        load_single_file(tmp_path / "x.safetensors", prediction_type="v")
    assert "does not exist" in load_error(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------------------------------------- detection
def unet_keys(in_channels: int, first_attention_width: int, xl: bool = False) -> dict:
    keys = {"model.diffusion_model.input_blocks.0.0.weight": (320, in_channels, 3, 3),
            "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1)}
    if xl:  # SDXL's first level has no attention; its second (640 channels) starts at input block 4
        keys["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight"] = (640, 2048)
    else:
        for block in (1, 2):
            keys[f"model.diffusion_model.input_blocks.{block}.1.transformer_blocks.0.attn2.to_k.weight"] = (
                320, first_attention_width)
    return keys


VAE = {"first_stage_model.decoder.conv_in.weight": (512, 4, 3, 3)}
SD15 = {**unet_keys(4, 768), **VAE,
        "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": (77, 768)}
SD2 = {**unet_keys(4, 1024), **VAE, "cond_stage_model.model.token_embedding.weight": (49408, 1024),
       "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024)}
SDXL = {**unet_keys(4, 0, xl=True), **VAE,
        "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
        "conditioner.embedders.1.model.positional_embedding": (77, 1280),
        "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,)}
REFINER = {"model.diffusion_model.input_blocks.0.0.weight": (384, 4, 3, 3), **VAE,
           "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
           "conditioner.embedders.0.model.text_projection": (1280, 1280)}


@pytest.mark.parametrize("keys, kwargs, folder", [
    (SD15, {}, "sd15"),
    (SD2, {}, "sd21"),  # v-prediction 768 px unless told otherwise, as diffusers assumes
    (SD2, {"prediction_type": "epsilon"}, "sd21_base"),
    (SD2, {"prediction_type": "v_prediction"}, "sd21"),
    ({**SD2, "v_pred": ()}, {}, "sd21"),
    (SDXL, {}, "sdxl_base"),
    ({**SDXL, "v_pred": ()}, {}, "sdxl_base"),
])
def test_detection_maps_real_key_sets_to_config_folders(keys, kwargs, folder):
    assert detect_checkpoint(keys, **kwargs) == folder
    # a loaded state dict works as well as {key: shape}
    assert detect_checkpoint({k: torch.empty(s, device="meta") for k, s in keys.items()}, **kwargs) == folder


BIAS_KEY = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_sd2_prediction_is_read_from_the_weights_as_comfyui_does(tmp_path, suffix):
    """ComfyUI's rule: std of that norm bias above 0.09 means v-prediction (SD 2.x-768), below means epsilon."""
    torch.manual_seed(0)
    for spread, expected in ((0.2, "v_prediction"), (0.02, "epsilon")):
        path = tmp_path / f"sd2-{spread}{suffix}"
        state = {BIAS_KEY: spread * torch.randn(320), "other": torch.zeros(2)}
        if suffix == ".safetensors":
            save_file(state, path)
        else:
            torch.save({"state_dict": state, "global_step": 1}, path)  # Lightning's nesting
        assert single_file.sd2_prediction_from_weights(path) == expected
    save_file({"other": torch.zeros(2)}, tmp_path / "none.safetensors")
    assert single_file.sd2_prediction_from_weights(tmp_path / "none.safetensors") is None


@pytest.mark.parametrize("spread, folder", [(0.2, "sd21"), (0.02, "sd21_base")])
def test_sd2_checkpoint_loads_with_the_config_its_weights_imply(tmp_path, monkeypatch, recwarn, spread, folder):
    path = tmp_path / "sd2.safetensors"
    save_file({BIAS_KEY: spread * torch.randn(320, generator=torch.Generator().manual_seed(0))}, path)
    monkeypatch.setattr(single_file, "read_checkpoint_shapes", lambda _: (SD2, {}))  # the real file is GBs

    def capture(path, config_folder, *args):
        raise LookupError(config_folder.name)
    monkeypatch.setattr(single_file, "_from_single_file", capture)
    with pytest.raises(LookupError, match=f"^{folder}$"):
        load_single_file(path)
    assert not [w for w in recwarn if "assuming v-prediction" in str(w.message)]  # decided, so no guess to flag


@pytest.mark.parametrize("keys, expected", [
    (REFINER, "is an SDXL refiner checkpoint"),
    ({**SD15, "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, "is an SD1 inpainting checkpoint"),
    ({**SD2, "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, "is an SD2 inpainting checkpoint"),
    ({**SDXL, "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, "is an SDXL inpainting checkpoint"),
    ({**SD15, "model.diffusion_model.input_blocks.0.0.weight": (320, 8, 3, 3)}, "is an InstructPix2Pix checkpoint"),
    ({**SDXL, "edm_mean": (1, 4, 1, 1), "edm_std": (1, 4, 1, 1)}, "is a Playground v2.5 checkpoint"),
    ({"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,),
      "model.diffusion_model.pos_embed": (1, 36864, 1536)}, "is an SD3 checkpoint"),
    ({"model.diffusion_model.joint_blocks.37.x_block.mlp.fc1.weight": (9728, 2432)}, "is an SD3.5 checkpoint"),
    ({"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "img_in.weight": (3072, 64)}, "is a FLUX checkpoint"),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
      "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 512)},
     "cross-attention takes 512-wide text"),
    ({k: v for k, v in SD15.items() if ".attn2." not in k}, "lacks its cross-attention layers"),
    ({"input_blocks.0.0.weight": (320, 4, 3, 3)}, "holds only a UNet"),
    ({"down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)}, "is one part of a diffusers model"),
])
def test_detection_names_what_other_files_are(keys, expected):
    with pytest.raises(ModelLoadError) as info:
        detect_checkpoint(keys, name="x.safetensors")
    assert expected in str(info.value) and one_sentence(str(info.value)), str(info.value)


def test_missing_parts_are_named(tmp_path):
    path = tmp_path / "novae.safetensors"
    save_file({k: torch.zeros(s) for k, s in SD15.items() if not k.startswith("first_stage_model.")}, path)
    assert "has no VAE weights" in load_error(path)
    path = tmp_path / "notext.safetensors"
    save_file({k: torch.zeros(s) for k, s in SD15.items() if not k.startswith("cond_stage_model.")}, path)
    assert "has no text encoder weights" in load_error(path)


def test_sd2_without_a_hint_warns_that_it_assumes_v_prediction(tmp_path, monkeypatch):
    path = tmp_path / "sd2.safetensors"
    save_file({k: torch.zeros(s) for k, s in SD2.items()}, path)
    class Stop(Exception):
        pass

    def stop(*args):
        raise Stop  # the zero weights are only for detection
    monkeypatch.setattr(single_file, "_from_single_file", stop)
    with pytest.warns(UserWarning, match="assuming v-prediction at 768 px"), pytest.raises(Stop):
        load_single_file(path)


# ---------------------------------------------------------------------------------------------- shipped configs
PARAMETERS = {  # the released models' counts (diffusers docs, model cards, several public re-counts)
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd21_base": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sd21": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl_base": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                  "text_encoder_2": 694_659_840},
}
NATIVE = {"sd15": (64, "epsilon", "PNDMScheduler"), "sd21_base": (64, "epsilon", "PNDMScheduler"),
          "sd21": (96, "v_prediction", "DDIMScheduler"), "sdxl_base": (128, "epsilon", "EulerDiscreteScheduler")}


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_shipped_config_folders_build_the_real_architectures(name):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = CONFIGS_DIR / name
    classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}
    counts = {}
    with init_empty_weights():  # meta tensors: shapes without memory
        for component, cls in classes.items():
            counts[component] = sum(p.numel() for p in cls.from_config(cls.load_config(folder / component))
                                    .parameters())
        for component, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            if (folder / component).is_dir():
                model = cls(CLIPTextConfig.from_pretrained(folder / component))
                counts[component] = sum(p.numel() for p in model.parameters())
    assert counts == PARAMETERS[name]
    sample_size, prediction_type, scheduler = NATIVE[name]
    assert json.loads((folder / "unet" / "config.json").read_text())["sample_size"] == sample_size
    scheduler_config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler_config.get("prediction_type", "epsilon"), scheduler_config["_class_name"]) == (
        prediction_type, scheduler)


def test_shipped_data_is_configs_only():
    files = [p for p in CONFIGS_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert {p.suffix for p in files} <= {".json", ".gz", ".md"}
    assert all(p.stat().st_size < 10_000 for p in files if p.suffix == ".json")
    assert BPE_FILE.stat().st_size < 2_000_000


# ---------------------------------------------------------------------------------------------- tokenizer
def test_clip_vocabulary_is_rebuilt_exactly(tmp_path):
    write_clip_vocab_files(tmp_path)
    # checksums of the hub's tokenizer/merges.txt and of its tokenizer/vocab.json (canonical JSON), identical in
    # openai/clip-vit-large-patch14, SD 1.5, SD 2.1 and SDXL base
    assert hashlib.sha256((tmp_path / "merges.txt").read_bytes()).hexdigest() == (
        "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a")
    vocab = clip_vocab()
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert hashlib.sha256(json.dumps(vocab, sort_keys=True, ensure_ascii=False).encode()).hexdigest() == (
        "f3494b2b345fa180ca51ec80ab47d1bbb0218d60089264d5ee9bb0619af4a4b7")
    assert gzip.open(BPE_FILE).readline().startswith(b'"bpe_simple_vocab_16e6.txt#version: 0.2')


def test_clip_tokenizer_gives_clips_token_ids():
    tokenizer = build_clip_tokenizer()
    # ids published by several CLIP ports' tests (openai/clip-vit-large-patch14 tokenizer)
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    assert tokenizer("Hello, world!").input_ids == [49406, 3306, 267, 1002, 256, 49407]
    assert tokenizer("A PHOTO of  a Cat!").input_ids == [49406, 320, 1125, 539, 320, 2368, 256, 49407]


@pytest.mark.parametrize("name, pads", [("sd15", {"tokenizer": 49407}), ("sd21_base", {"tokenizer": 0}),
                                        ("sd21", {"tokenizer": 0}),
                                        ("sdxl_base", {"tokenizer": 49407, "tokenizer_2": 0})])
def test_tokenizers_pad_as_each_model_was_trained(name, pads):
    tokenizers = tokenizers_for(CONFIGS_DIR / name)
    assert {key: t.pad_token_id for key, t in tokenizers.items()} == pads
    ids = tokenizers["tokenizer"]("a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[:4] == [49406, 320, 2368, 49407] and ids[-1] == pads["tokenizer"]


# ---------------------------------------------------------------------------------------------- helpers
def _keys(path: Path) -> set:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return set(f.keys())


def _fake_class(monkeypatch, module_name: str, class_name: str):
    """A class importable under `module_name` while the test saves, so the pickle names it as the real one would."""
    parts = module_name.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    cls = type(class_name, (), {"__module__": module_name})
    setattr(sys.modules[module_name], class_name, cls)
    return cls
