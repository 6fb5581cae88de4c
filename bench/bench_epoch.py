"""Per-epoch time and peak accelerator memory of each phase, and the share of wall time inside UNet calls, as JSON.

    python bench/bench_epoch.py                      # the default config (builtin:toy model) on this machine
    python bench/bench_epoch.py --epochs 3 --num-steps 20 --images-per-prompt 8
    # real architectures with random weights (no download), on a GPU:
    python bench/bench_epoch.py --model builtin:random-sd15 --precision fp16 --resolution 512 \
        --prompts-per-epoch 2 --images-per-prompt 8 --num-steps 50 --train-step-fraction 1 --batch-size 8
    python bench/bench_epoch.py --model builtin:random-sdxl --precision fp16 --resolution 1024 \
        --gradient-checkpointing --batch-size 2 ...

Any `prdp train` flag is accepted. Phases: sampling (UNet denoising loop), decode (VAE), reward, reference (log-probs
under the LoRA-free model), optimization (K updates: no-grad log-prob pass + chunked forward/backward). `unet_share`
= seconds inside UNet forward/backward calls / total epoch seconds; `outside_unet_s` = each phase's seconds outside
them (where the rest goes); `peak_memory_gib` = peak allocated memory per phase (CUDA only), the largest of them as
`peak_memory_gib_max`. Evaluation is cut to one image unless flags ask for more. Not a timed test: run it and quote
its output.

The limit to compare against: `bare_unet` times the epoch's UNet rows (images x steps, each a guided pair) in a plain
loop of UNet calls on the trained model, at the batch size that is fastest per image on this device: sampling's
N x B x T and the reference pass's N x B x trained steps without gradient, the K updates' N x B x trained steps with
forward and backward, and K - 1 more passes without gradient unless the trainer keeps their graphs.
`epoch_to_bare_unet` = median epoch seconds / those seconds: what the epoch costs beyond the UNet work it needs.
`ms_per_image_step_by_batch`: each batch size's milliseconds per image-step, [without gradient, with backward].
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

from prdp_core import TrainConfig, Trainer  # noqa: E402
from prdp_core.cli import build_parser, resolve_train_config  # noqa: E402
from prdp_core.sampling import synchronize  # noqa: E402
from prdp_core.trainer import EPOCH_PHASES  # noqa: E402

PHASES = ("sampling", "decode", "reward", "reference", "optimization", "total", "unet")
BARE_BATCHES = (1, 2, 4, 8, 16, 32, 64)  # images per call tried for the bare UNet limit
BARE_MIN_SECONDS = 0.5  # each batch size is timed over at least this long


def _seconds_per_image(trainer: Trainer, batch: int, backward: bool) -> float:
    """Seconds per image-step of plain guided UNet calls on `batch` images: no chunking, no noise, no log-probs."""
    sampler, unet = trainer.sampler, trainer.unet
    cond, negative = sampler.encode_prompts(["a photo"])
    text = sampler.chunk_text(cond.expand(batch), negative)
    side = sampler.side // trainer.pipe.vae_scale_factor
    latents = torch.randn(batch, unet.config.in_channels, side, side, device=trainer.device)
    model_input = (torch.cat([latents, latents]) if sampler.guided else latents).to(unet.dtype)
    extra = {"added_cond_kwargs": {"text_embeds": text.pooled, "time_ids": sampler.time_ids(len(text))}} \
        if sampler.sdxl else {}

    def call():
        with torch.set_grad_enabled(backward):
            output = unet(model_input, sampler.timesteps[0], encoder_hidden_states=text.embeds, return_dict=False,
                          **extra)[0]
            if backward:
                output.float().sum().backward()
    call()  # warm-up
    calls, started = 0, time.perf_counter()
    while calls < 3 or time.perf_counter() - started < BARE_MIN_SECONDS:
        call()
        calls += 1
    synchronize(trainer.device)
    trainer.optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - started) / calls / batch


def bare_unet(trainer: Trainer, reference_ran: bool) -> dict:
    """The epoch's UNet rows timed in a plain loop at the fastest batch size per image (see the module docstring)."""
    config = trainer.config
    images, trained, updates = config.prompts_per_epoch * config.images_per_prompt, trainer.trained_steps, \
        config.updates_per_epoch
    batches = [b for b in BARE_BATCHES if b <= images]
    per_image = {b: (_seconds_per_image(trainer, b, False), _seconds_per_image(trainer, b, True)) for b in batches}
    no_grad = min((seconds[0], b) for b, seconds in per_image.items())
    with_grad = min((seconds[1], b) for b, seconds in per_image.items())
    no_grad_rows = images * (config.num_steps + trained * reference_ran
                             + trained * (updates - 1) * (not trainer.retain_graphs))
    backward_rows = images * trained * updates
    seconds = no_grad_rows * no_grad[0] + backward_rows * with_grad[0]
    return {"seconds": round(seconds, 4), "image_steps_without_gradient": no_grad_rows,
            "image_steps_with_backward": backward_rows, "best_batch_without_gradient": no_grad[1],
            "best_batch_with_backward": with_grad[1],
            "ms_per_image_step_by_batch": {b: [round(1000 * t, 3) for t in seconds] for b, seconds in per_image.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=1, help="Epochs excluded from the medians (first-call costs).")
    args, train_flags = parser.parse_known_args(argv)
    defaults = ["--epochs", "4", "--eval-prompts", "", "--eval-max-prompts", "1", "--eval-images-per-prompt", "1"]
    train_args = build_parser().parse_args(["train", *defaults, *train_flags])
    config: TrainConfig = resolve_train_config(train_args)
    with tempfile.TemporaryDirectory() as tmp:
        config.output_dir = tmp
        epochs, peaks = [], []

        def on_event(event):
            if event.kind == "EpochEnd":
                epochs.append(event.metrics["timings"])
                peaks.append(event.metrics.get("peak_memory_gib", {}))
        started = time.perf_counter()
        trainer = Trainer(config, on_event)
        trainer.run()
        run_s = time.perf_counter() - started
        measured = epochs[args.warmup:] or epochs
        bare = bare_unet(trainer, reference_ran=any(e["unet_by_phase"]["reference"] > 0 for e in measured))
    median = {phase: statistics.median(e[phase] for e in measured) for phase in PHASES}
    outside_unet = {phase: statistics.median(e[phase] - e["unet_by_phase"][phase] for e in measured)
                    for phase in EPOCH_PHASES}
    peak = {phase: max(p[phase] for p in peaks) for phase in peaks[0]} if peaks and peaks[0] else {}
    device = trainer.device
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "model": config.model,
        "settings": {k: getattr(config, k) for k in ("prompts_per_epoch", "images_per_prompt", "num_steps",
                                                      "train_step_fraction", "updates_per_epoch", "batch_size",
                                                      "guidance_scale", "objective", "lora_rank", "lora_targets",
                                                      "precision", "gradient_checkpointing", "vae_tiling",
                                                      "offload_models", "retain_graphs")},
        "batch_size_used": trainer.batch_size,
        "resolution": trainer.sampler.side,
        "lora_modules": len(trainer.lora_modules),
        "run_s": round(run_s, 1),
        "epochs_measured": len(measured),
        "median_epoch_s": {k: round(v, 4) for k, v in median.items()},
        "unet_share": round(median["unet"] / median["total"], 4),
        "bare_unet": bare,
        "epoch_to_bare_unet": round(median["total"] / bare["seconds"], 3),
        "outside_unet_s": {k: round(v, 4) for k, v in outside_unet.items()},
        "peak_memory_gib": {k: round(v, 3) for k, v in peak.items()},
        "peak_memory_gib_max": round(max(peak.values()), 3) if peak else None,
        "per_epoch_s": [{k: round(e[k], 4) for k in PHASES} for e in epochs],
    }
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
