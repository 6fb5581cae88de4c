"""Peak accelerator memory of sampling, decoding and training at real size, estimated without an accelerator, as JSON.

    python bench/memory_estimate.py --model builtin:random-sd15 --resolution 512 --precision fp16 --batch-size 8 \
        --gradient-checkpointing
    python bench/memory_estimate.py --model builtin:random-sdxl --resolution 1024 --precision fp16 --low-vram

Any `prdp train` flag is accepted; what matters is the model, resolution, precision, batch size (images per UNet
call), gradient checkpointing, VAE tiling, text-encoder offloading, the LoRA, and N x B x T (the stored trajectories).
The pipeline is built on the meta device (shapes without data: seconds, no download for builtin:random-*), attention
runs as CUDA's flash attention does (it keeps the output and log-sum-exp, never the score matrix), and every tensor
alive at once is counted, as CUDA's peak allocated memory counts them. Phases: sampling (one guided UNet call),
decode (one VAE decode, sliced per image as on a GPU), optimization (one micro-batch's log-prob forward and
backward, the trainer's exact-gradient chunk). Resident throughout: the model on the device, the LoRA with its
gradient and AdamW state, the epoch's trajectories. Not counted: reward models, CUDA/cuDNN workspaces, allocator
rounding.

Checked against bench_epoch.py's measurements on an H100 (docs/benchmarks.md "Real sizes on a GPU", made before the LoRA computed
in fp16): with that code the estimates were at most 0.15 GiB low for optimization (SD1.5 512 px micro-batch 8 with
checkpointing 8.29 vs 8.4 measured, micro-batch 4 without 12.80 vs 12.9, micro-batch 8 without 23.41 vs 23.5; SDXL
1024 px micro-batch 2 with checkpointing 10.16 vs 10.3), at most 0.25 GiB low for sampling (4.25 vs 4.3, 3.23 vs
3.3, 4.28 vs 4.4, 8.07 vs 8.3), but 0.5 GiB (SD1.5) and 1.9 GiB (SDXL) low for decoding: the VAE's full-resolution
convolutions and its single 512-wide attention head run through kernels whose workspaces this does not see.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
import weakref

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

from prdp_core import TrainConfig  # noqa: E402
from prdp_core.cli import build_parser, resolve_train_config  # noqa: E402
from prdp_core.models import add_lora, apply_memory_options, lora_parameters, load_pipeline  # noqa: E402
from prdp_core.sampling import Sampler, TextConditioning, Trajectories  # noqa: E402

GIB = 2**30
META = torch.device("meta")


class LiveTensorBytes(TorchDispatchMode):
    """Bytes of all tensor storages alive at once, and their peak, counting every storage an op creates until it is
    freed (a view shares its base's storage and is counted once)."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._sizes: dict[int, int] = {}
        self._refs: dict[int, weakref.ref] = {}

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._sizes:
            return
        self._sizes[key] = storage.nbytes()
        self.current += self._sizes[key]
        self.peak = max(self.peak, self.current)

        def freed(_, key=key):
            self.current -= self._sizes.pop(key)
            self._refs.pop(key, None)
        self._refs[key] = weakref.ref(storage, freed)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self.add(value)
        return out


@contextlib.contextmanager
def flash_attention():
    """F.scaled_dot_product_attention as CUDA's fused kernels allocate: meta tensors would take the math path, which
    materialises the score matrix (4 GiB per SD1.5 attention layer at micro-batch 8)."""
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention

    def flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is not None:
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
        return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                                  scale=scale)[0]
    functional.scaled_dot_product_attention = flash
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original


def _conditioning(pipe, sdxl: bool) -> TextConditioning:
    """One prompt's conditioning, shaped as the text encoders make it."""
    length, width = pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim
    pooled = torch.empty(1, pipe.text_encoder_2.config.projection_dim, device=META) if sdxl else None
    return TextConditioning(torch.empty(1, length, width, device=META), pooled).to(META, pipe.unet.dtype)


def estimate(config: TrainConfig) -> dict:
    started = time.perf_counter()
    pipe = load_pipeline(config.model, config.precision, META, config.vae, config.prediction_type)
    # sliced VAE decoding as on any accelerator; offloading: by leaving the text encoders out below
    apply_memory_options(pipe, config.gradient_checkpointing, config.vae_tiling)
    add_lora(pipe.unet, config.lora_rank, config.lora_alpha, config.lora_targets)
    params = lora_parameters(pipe.unet)
    sampler = Sampler(pipe, config.num_steps, config.guidance_scale, config.eta, config.negative_prompt,
                      config.resolution)
    resident = [pipe.unet, pipe.vae]
    if not config.offload_models:
        resident += [m for m in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]
    meter = LiveTensorBytes()
    for module in resident:
        for tensor in (*module.parameters(), *module.buffers()):
            meter.add(tensor)
    weights = meter.current
    lora_bytes = sum(p.numel() * p.element_size() for p in params)
    meter.current += 3 * lora_bytes  # gradient and AdamW's two moments
    side = sampler.side // pipe.vae_scale_factor
    latent = (pipe.unet.config.in_channels, side, side)
    images = config.prompts_per_epoch * config.images_per_prompt
    trajectories = 4 * images * ((config.num_steps + 1) * latent[0] * side * side + config.num_steps)
    meter.current += trajectories
    m = config.batch_size
    peaks = {}
    with flash_attention(), meter:
        meter.reset_peak()
        cond, negative = _conditioning(pipe, sampler.sdxl), _conditioning(pipe, sampler.sdxl)
        with torch.no_grad():
            sampler.guided_prediction(torch.empty(m, *latent, device=META), sampler.timesteps[0],
                                      sampler.chunk_text(cond.expand(m), negative))
        peaks["sampling"] = meter.peak
        meter.reset_peak()
        sampler.decode(torch.empty(m, *latent, device=META))
        peaks["decode"] = meter.peak
        meter.reset_peak()
        traj = Trajectories(prompts=["-"], cond=cond, negative=negative, timesteps=sampler.timesteps,
                            latents=torch.empty(1, m, 2, *latent, device=META),
                            log_probs=torch.empty(1, m, 1, device=META), batch_size=m)
        log_probs = sampler.chunk_log_probs(traj, slice(0, m), 0)
        torch.autograd.grad(log_probs.sum(), params, materialize_grads=True)
        peaks["optimization"] = meter.peak
    return {
        "model": config.model,
        "resolution": sampler.side,
        "settings": {k: getattr(config, k) for k in ("precision", "batch_size", "guidance_scale",
                                                      "gradient_checkpointing", "vae_tiling", "offload_models",
                                                      "lora_rank", "lora_targets", "prompts_per_epoch",
                                                      "images_per_prompt", "num_steps")},
        # weights include the LoRA parameters; their gradient and AdamW's two moments come on top
        "resident_bytes": {"weights": weights, "lora_gradient_and_adam": 3 * lora_bytes, "trajectories": trajectories},
        "peak_bytes": peaks,
        "estimate_s": round(time.perf_counter() - started, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _, train_flags = parser.parse_known_args(argv)
    config = resolve_train_config(build_parser().parse_args(["train", *train_flags]))
    if not config.batch_size:
        parser.error("pass --batch-size N: memory is estimated for a given number of images per UNet call")
    result = estimate(config)
    gib = {name: round(value / GIB, 3) for name, value in result.pop("peak_bytes").items()}
    result["resident_gib"] = {name: round(value / GIB, 3) for name, value in result.pop("resident_bytes").items()}
    result.update(peak_memory_gib=gib, peak_memory_gib_max=max(gib.values()))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
