"""Per-epoch time of each phase and the share of wall time inside UNet calls, as JSON.

    python bench/bench_epoch.py                      # the default config (builtin:toy model) on this machine
    python bench/bench_epoch.py --epochs 3 --num-steps 20 --images-per-prompt 8

Phases: sampling (UNet denoising loop), decode (VAE), reward, reference (log-probs under the LoRA-free model),
optimization (K updates: no-grad log-prob pass + chunked forward/backward). `unet_share` = seconds inside UNet
forward/backward calls / total epoch seconds. Not a timed test: run it and quote its output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

from prdp_core import TrainConfig, Trainer  # noqa: E402
from prdp_core.cli import build_parser, resolve_train_config  # noqa: E402

PHASES = ("sampling", "decode", "reward", "reference", "optimization", "total", "unet")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warmup", type=int, default=1, help="Epochs excluded from the medians (first-call costs).")
    args, train_flags = parser.parse_known_args(argv)
    defaults = ["--epochs", "4"]
    train_args = build_parser().parse_args(["train", *defaults, *train_flags])
    config: TrainConfig = resolve_train_config(train_args)
    with tempfile.TemporaryDirectory() as tmp:
        config.output_dir = tmp
        epochs = []
        trainer = Trainer(config, lambda e: epochs.append(e.metrics["timings"]) if e.kind == "EpochEnd" else None)
        trainer.run()
    measured = epochs[args.warmup:] or epochs
    median = {phase: statistics.median(e[phase] for e in measured) for phase in PHASES}
    result = {
        "device": str(trainer.device),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "model": config.model,
        "settings": {k: getattr(config, k) for k in ("prompts_per_epoch", "images_per_prompt", "num_steps",
                                                      "updates_per_epoch", "batch_size", "guidance_scale", "objective",
                                                      "lora_rank")},
        "epochs_measured": len(measured),
        "median_epoch_s": {k: round(v, 4) for k, v in median.items()},
        "unet_share": round(median["unet"] / median["total"], 4),
        "per_epoch_s": [{k: round(e[k], 4) for k in PHASES} for e in epochs],
    }
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
