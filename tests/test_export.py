"""Exported LoRAs against the in-memory adapter (alpha != rank, so scale bugs show), and kohya's naming."""

import dataclasses
import json
import pathlib
import re

import pytest
import torch
from safetensors import safe_open

from conftest import needs_diffusers_lora_loading
from prdp_core.config import KOHYA_UNET_TARGETS
from prdp_core.errors import ExportError
from prdp_core.export import A1111_JSON_KEYS, LoraWeights, export_lora, kohya_name
from prdp_core.models import add_lora, build_tiny_pipeline, lora_modules, lora_parameters, model_info

PROMPT = "a painting of a wolf"


def _adapted_pipeline(rank=4, alpha=8.0):
    pipe = build_tiny_pipeline()
    add_lora(pipe.unet, rank, alpha, KOHYA_UNET_TARGETS)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in lora_parameters(pipe.unet):  # as if trained: both factors non-zero, fp16-representable so
            param.copy_((0.2 * torch.randn(param.shape, generator=g)).half().float())  # the fp16 file is exact
    return pipe


def _images(pipe):
    return pipe(PROMPT, num_images_per_prompt=2, num_inference_steps=4, guidance_scale=5.0, eta=1.0,
                generator=torch.Generator().manual_seed(3), output_type="pt").images


@pytest.fixture(scope="module")
def adapted():
    pipe = _adapted_pipeline()
    weights = LoraWeights.from_unet(pipe.unet, model_info(pipe, "builtin:tiny"), {"prdp_reward_mix": "1*jpeg"})
    return pipe, weights, _images(pipe)


@needs_diffusers_lora_loading
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_exported_lora_reproduces_adapter_in_diffusers(adapted, tmp_path, fmt):
    _, weights, expected = adapted
    path = export_lora(weights, tmp_path / "wolf.safetensors", format=fmt)
    fresh = build_tiny_pipeline()
    base = _images(fresh)
    fresh.load_lora_weights(str(path.parent), weight_name=path.name)
    reloaded = _images(fresh)
    assert (base - expected).abs().max().item() > 0.05  # the adapter changes the images: the check can fail
    assert (reloaded - expected).abs().max().item() < 1e-3


def test_kohya_file_layout_and_metadata(adapted, tmp_path):
    pipe, weights, _ = adapted
    path = export_lora(weights, tmp_path / "wolf.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys, meta = sorted(f.keys()), f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    modules = lora_modules(pipe.unet)
    assert len(modules) == 72 and len(keys) == 3 * 72  # 6 transformer blocks x 12 modules
    pattern = re.compile(r"^lora_unet_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
    assert all(pattern.match(k) for k in keys)
    assert "lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight" in keys
    assert "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_0_proj.alpha" in keys
    # A1111 splits every key at its first dot; ComfyUI maps lora_unet_<diffusers path with _>: both must resolve.
    by_kohya_name = {kohya_name(name): module for name, module in pipe.unet.named_modules()}
    for key in keys:
        stem, _, kind = key.partition(".")
        module = by_kohya_name[stem].base_layer
        tensor = tensors[key]
        if kind == "alpha":
            assert tensor.ndim == 0 and tensor.item() == 8.0 and tensor.dtype == torch.float32
            continue
        if kind == "lora_down.weight":
            assert tensor.shape[:2] == (4, module.weight.shape[1])
        else:
            assert tensor.shape[:2] == (module.weight.shape[0], 4)
        assert tensor.dtype == torch.float16
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "8")
    assert (meta["ss_base_model_version"], meta["ss_v2"]) == ("sd_v1", "False")
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.prediction_type"] == "epsilon"
    assert meta["ss_output_name"] == "wolf" and meta["modelspec.title"] == "wolf"
    assert re.fullmatch(r"[0-9a-f]{64}", meta["sshs_model_hash"])
    assert "jpeg" in meta["ss_training_comment"]


def test_sd15_sized_unet_gets_kohya_module_set():
    """On the real SD1.5 UNet config (built on the meta device: no memory, no download) the default targets are
    kohya's 192 modules with its names."""
    from diffusers import UNet2DConditionModel

    config = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280,
                  1280), down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, layers_per_block=2)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
        add_lora(unet, 4, 8.0, KOHYA_UNET_TARGETS)
    names = {kohya_name(m) for m in lora_modules(unet)}
    assert len(names) == 192
    for stem in ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                 "lora_unet_mid_block_attentions_0_proj_in",
                 "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj",
                 "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_out_0"):
        assert stem in names


@pytest.mark.parametrize("dtype,torch_dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_export_dtypes(adapted, tmp_path, dtype, torch_dtype):
    _, weights, _ = adapted
    path = export_lora(weights, tmp_path / "x.safetensors", dtype=dtype)
    with safe_open(str(path), framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys() if not k.endswith(".alpha")} == {torch_dtype}
        assert {f.get_tensor(k).dtype for k in f.keys() if k.endswith(".alpha")} == {torch.float32}


def test_failed_export_keeps_existing_file(adapted, tmp_path, monkeypatch):
    _, weights, _ = adapted
    path = tmp_path / "keep.safetensors"
    path.write_bytes(b"precious")
    real_write = pathlib.Path.write_bytes

    def disk_full(self, data):  # half a file, then the disk is full
        real_write(self, data[: len(data) // 2])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(pathlib.Path, "write_bytes", disk_full)
    with pytest.raises(ExportError, match="No space left"):
        export_lora(weights, path)
    assert path.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.safetensors"]


def test_export_rejects_bad_destinations(adapted, tmp_path):
    _, weights, _ = adapted
    with pytest.raises(ExportError, match="does not exist"):
        export_lora(weights, tmp_path / "missing" / "x.safetensors")
    with pytest.raises(ExportError, match=".safetensors"):
        export_lora(weights, tmp_path / "x.pt")


# ------------------------------------------------------------------------------------------- A1111 sidecars
def _preview():
    from PIL import Image

    pixels = torch.arange(32 * 48 * 3, dtype=torch.int64).reshape(32, 48, 3) % 251
    return Image.fromarray(pixels.to(torch.uint8).numpy())


def _a1111_save(path, **edits):
    """What A1111's card editor does on Save: read the json, set the edited fields, dump it back."""
    data = json.loads(path.read_text(encoding="utf-8"))
    data.update(edits)
    with open(path, "w", encoding="utf8") as file:
        json.dump(data, file, indent=4, ensure_ascii=False)


def test_a1111_sidecars_and_their_refresh(adapted, tmp_path):
    import numpy as np
    from PIL import Image

    _, weights, _ = adapted
    lora = export_lora(weights, tmp_path / "wolf.safetensors", sidecar=True, preview=_preview())
    card, thumb = tmp_path / "wolf.json", tmp_path / "wolf.preview.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wolf.json", "wolf.preview.png", "wolf.safetensors"]
    text = card.read_text(encoding="utf-8")
    data = json.loads(text)
    assert text == json.dumps(data, indent=4, ensure_ascii=False)  # A1111's own writer's layout
    assert set(data) == set(A1111_JSON_KEYS) | {"prdp export"}
    assert data["sd version"] == "SD1" and data["preferred weight"] == 1.0
    assert all(isinstance(data[k], str) for k in A1111_JSON_KEYS if k != "preferred weight")
    assert "PRDP" in data["description"] and "1*jpeg" in data["description"]
    assert (data["activation text"], data["negative text"]) == ("", "")
    assert "rank 4, alpha 8" in data["notes"]
    with Image.open(thumb) as image:
        assert image.format == "PNG" and np.array_equal(np.asarray(image), np.asarray(_preview()))

    # the user edits the card in A1111; a later export refreshes only what is still ours
    _a1111_save(card, **{"activation text": "wolf, moonlight", "notes": "my favourite", "preferred weight": 0.7})
    retrained = dataclasses.replace(weights, training={"prdp_reward_mix": "0.5*aesthetic + 0.5*hps"})
    export_lora(retrained, lora, sidecar=True)
    data = json.loads(card.read_text(encoding="utf-8"))
    assert (data["activation text"], data["notes"], data["preferred weight"]) == ("wolf, moonlight", "my favourite",
                                                                                 0.7)
    assert "0.5*aesthetic + 0.5*hps" in data["description"] and "jpeg" not in data["description"]
    _a1111_save(card, description="my words")
    export_lora(weights, lora, sidecar=True)
    data = json.loads(card.read_text(encoding="utf-8"))
    assert data["description"] == "my words" and data["activation text"] == "wolf, moonlight"


def test_a1111_sidecars_leave_users_files_alone(adapted, tmp_path):
    _, weights, _ = adapted
    card = tmp_path / "wolf.json"
    card.write_text(json.dumps({"description": "hand written", "sd version": "SD2", "civitai": {"id": 7}}))
    (tmp_path / "wolf.png").write_bytes(b"user thumbnail")  # A1111's "Replace preview" writes <name>.png
    export_lora(weights, tmp_path / "wolf.safetensors", sidecar=True, preview=_preview())
    data = json.loads(card.read_text(encoding="utf-8"))
    assert (data["description"], data["sd version"], data["civitai"]) == ("hand written", "SD2", {"id": 7})
    assert data["preferred weight"] == 1.0  # missing fields are filled in
    assert not (tmp_path / "wolf.preview.png").exists()
    assert (tmp_path / "wolf.png").read_bytes() == b"user thumbnail"

    card.write_text("not json {")
    with pytest.warns(UserWarning, match="left it unchanged"):
        export_lora(weights, tmp_path / "wolf.safetensors", sidecar=True)
    assert card.read_text() == "not json {"


def test_bad_preview_is_rejected_before_writing(adapted, tmp_path):
    _, weights, _ = adapted
    with pytest.raises(ExportError, match="PIL image"):
        export_lora(weights, tmp_path / "wolf.safetensors", preview=torch.zeros(3, 8, 8))
    assert list(tmp_path.iterdir()) == []
