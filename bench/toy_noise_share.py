"""How much of the toy model's success is decided by the initial noise x_T, which no policy step controls?

For captions x initial noises x step-noise draws it samples the builtin toy model (DDIM eta 1, guidance 5) and
asks the shipped classifier whether colour and shape are right. Per caption, the success variance splits into a
part between initial noises and a part within (the step noise that PRDP's per-step log-probs can credit). Prints
JSON per step count.

    python bench/toy_noise_share.py --steps 6 20
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prdp_core.models import load_pipeline  # noqa: E402
from prdp_core.toy.classifier import load_classifier, reads_as_prompted  # noqa: E402
from prdp_core.toy.train_model import evaluation_prompts  # noqa: E402


@torch.no_grad()
def success_grid(pipe, classifier, prompts, steps: int, initial_noises: int, draws: int) -> np.ndarray:
    """[prompt, initial noise] -> fraction of step-noise draws with the prompted colour and shape."""
    channels, side = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    grid = np.zeros((len(prompts), initial_noises))
    for i, prompt in enumerate(prompts):
        for x in range(initial_noises):
            x_t = torch.randn(1, channels, side, side, generator=torch.Generator().manual_seed(100 + x))
            generators = [torch.Generator().manual_seed(1000 * x + k) for k in range(draws)]
            images = pipe([prompt] * draws, latents=x_t.repeat(draws, 1, 1, 1), num_inference_steps=steps,
                          guidance_scale=5.0, eta=1.0, generator=generators).images
            grid[i, x] = reads_as_prompted(classifier, images, [prompt] * draws)["both"].float().mean().item()
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[6, 20])
    parser.add_argument("--prompts", type=int, default=12, help="Training captions (a fixed random pick).")
    parser.add_argument("--initial-noises", type=int, default=4)
    parser.add_argument("--draws", type=int, default=8, help="Step-noise draws per initial noise.")
    args = parser.parse_args()
    pipe, classifier = load_pipeline("builtin:toy"), load_classifier()
    prompts = evaluation_prompts("train", args.prompts, seed=3)
    for steps in args.steps:
        grid = success_grid(pipe, classifier, prompts, steps, args.initial_noises, args.draws)
        per_prompt = grid.mean(axis=1)
        total = float((per_prompt * (1 - per_prompt)).mean())  # Bernoulli variance of success, per caption
        between = float(grid.var(axis=1).mean())  # of which: between initial noises
        print(json.dumps({"steps": steps, "success": round(float(grid.mean()), 3),
                          "captions_never_right": int((per_prompt == 0).sum()), "captions": len(prompts),
                          "x_T_share_of_variance": round(between / total, 3) if total else None}))


if __name__ == "__main__":
    main()
