"""Real-size check of the offline single-file loader, as JSON: random weights in the shipped configs' shapes
(SD 1.5, SD 2.1-base, SD 2.1-768, SDXL base) are written as an original-layout checkpoint (LDM/SGM keys, fp16,
the layout of the files in A1111's models/Stable-diffusion), then loaded with prdp_core.single_file.load_single_file
with no config folder given: detection, the shipped configs and the rebuilt CLIP tokenizers do all the work.

    python bench/single_file_real_size.py sd15 [--format ckpt] [--folder /tmp]

Reports the file's size, tensor and parameter counts, the load time, which config folder detection chose, the
scheduler, and per component the largest difference between the written and the loaded weights (0.0 expected).
Needs about 2.2x the fp16 file size in RAM (SDXL: ~15 GB) and the same on disk; the file is deleted afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the diffusers -> LDM converter of the tests

import torch  # noqa: E402

import ldm_layout  # noqa: E402
from prdp_core.clip_tokenizer import CONFIGS_DIR  # noqa: E402
from prdp_core.single_file import load_single_file  # noqa: E402

FOLDERS = ("sd15", "sd21_base", "sd21", "sdxl_base")


def random_fp16(make) -> torch.nn.Module:
    """A model built on the meta device, then given random fp16 weights: no fp32 copy ever exists."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = make()
    model = model.to(dtype=torch.float16).to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, dtype=torch.float16) * 0.02)
        for name, buffer in model.named_buffers():
            if name.endswith("position_ids"):
                buffer.copy_(torch.arange(buffer.shape[-1]).expand_as(buffer))
    return model.eval()


def random_components(folder: Path) -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    parts = {"unet": random_fp16(lambda: UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(
                 folder / "unet"))),
             "vae": random_fp16(lambda: AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae"))),
             "text_encoder": random_fp16(lambda: CLIPTextModel(CLIPTextConfig.from_pretrained(
                 folder / "text_encoder")))}
    if (folder / "text_encoder_2").is_dir():
        parts["text_encoder_2"] = random_fp16(lambda: CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(
            folder / "text_encoder_2")))
    return parts


def original_layout(name: str, parts: dict) -> dict[str, torch.Tensor]:
    # The converter's helpers directly (no defensive copies): these state dicts are gigabytes.
    state = {ldm_layout.UNET_PREFIX + k: v for k, v in ldm_layout.unet_to_ldm(parts["unet"]).items()}
    state.update({ldm_layout.VAE_PREFIX + k: v for k, v in ldm_layout.vae_to_ldm(parts["vae"]).items()})
    if name == "sdxl_base":
        first, second = ldm_layout.SDXL_TEXT_PREFIXES
        state.update(ldm_layout._prefixed(first, ldm_layout.clip_to_hf_layout(parts["text_encoder"])))
        state.update(ldm_layout._prefixed(second, ldm_layout.clip_to_openclip(parts["text_encoder_2"])))
    elif name.startswith("sd21"):
        state.update(ldm_layout._prefixed(ldm_layout.SD2_TEXT_PREFIX,
                                          ldm_layout.clip_to_openclip(parts["text_encoder"], extra_layer=True)))
    else:
        state.update(ldm_layout._prefixed(ldm_layout.SD1_TEXT_PREFIX,
                                          ldm_layout.clip_to_hf_layout(parts["text_encoder"])))
    return {k: v.to(torch.float16).contiguous() for k, v in state.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=FOLDERS)
    parser.add_argument("--format", choices=("safetensors", "ckpt"), default="safetensors")
    parser.add_argument("--folder", default="/tmp")
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    torch.manual_seed(0)
    parts = random_components(CONFIGS_DIR / args.model)
    state = original_layout(args.model, parts)
    path = Path(args.folder) / f"prdp-real-size-{args.model}.{args.format}"
    report = {"model": args.model, "format": args.format, "tensors": len(state),
              "parameters": sum(v.numel() for v in state.values())}
    try:
        if args.format == "safetensors":
            save_file(state, path)
        else:
            torch.save({"state_dict": state}, path)
        report["file_bytes"] = path.stat().st_size
        del state
        # SD2's 512-px base model is told apart from the 768-px v-prediction one only by what the user says
        prediction_type = "epsilon" if args.model == "sd21_base" else None
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = load_single_file(path, torch_dtype=torch.float16, prediction_type=prediction_type)
        report["load_seconds"] = round(time.perf_counter() - start, 2)
    finally:
        path.unlink(missing_ok=True)
    report.update(pipeline=type(loaded).__name__, scheduler=type(loaded.scheduler).__name__,
                  prediction_type=loaded.scheduler.config.prediction_type,
                  native_resolution=loaded.unet.config.sample_size * loaded.vae_scale_factor,
                  token_ids=loaded.tokenizer("a photo of a cat").input_ids)
    for component, model in parts.items():
        expected, actual = model.state_dict(), getattr(loaded, component).state_dict()
        report[f"{component}_max_abs_diff"] = max((expected[k].float() - actual[k].float()).abs().max().item()
                                                  for k in expected if not k.endswith("position_ids"))
    report["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
