"""Which sampling steps' noise decides whether the toy model draws a caption right? Prints JSON per window.

    python bench/toy_noise_windows.py --windows 0-2 3-7 8-19 x_T

For each caption and "context" (one initial noise x_T and one noise draw for every step), it redraws only the noise
of the steps in a window (or only x_T), keeping everything else, and asks the shipped classifier whether colour and
shape are right. `within_share` is the success variance left when only the window's noise varies, as a share of the
caption's total (Bernoulli) variance. Were success a sum of independent effects of the noise sources, the shares
of disjoint windows would add up to at most 1; far larger sums mean it hangs on every source at once, a knife-edge
function of the noise, whose linear correlation with any one step's noise (all that a policy gradient sees) is
small.
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
from prdp_core.prompts import load_prompts  # noqa: E402
from prdp_core.sampling import Sampler, ddim_mean_std, to_pil  # noqa: E402
from prdp_core.toy.classifier import load_classifier, reads_as_prompted  # noqa: E402


@torch.no_grad()
def success(sampler: Sampler, classifier, prompt: str, varied: set, context: int, draws: int) -> float:
    """Fraction of `draws` images right when only the noise sources in `varied` (step indices, or -1 for x_T)
    differ between them."""
    pipe = sampler.pipe
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    shared_gen, own_gen = torch.Generator().manual_seed(1000 + context), torch.Generator().manual_seed(7919 * context)
    noise = []
    for source in range(-1, len(sampler.timesteps)):  # x_T, then every step
        shared = torch.randn(1, *shape, generator=shared_gen).expand(draws, *shape)
        own = torch.randn(draws, *shape, generator=own_gen)
        noise.append(own if source in varied else shared)
    cond, negative = sampler.encode_prompts([prompt])
    latents = noise[0] * pipe.scheduler.init_noise_sigma
    text = sampler.chunk_text(cond.expand(draws), negative)
    for k, timestep in enumerate(sampler.timesteps):
        output = sampler.guided_prediction(latents, timestep, text)
        mean, std = ddim_mean_std(pipe.scheduler, output, timestep, latents, sampler.eta)
        latents = mean + std * noise[k + 1]
    images = to_pil(sampler.decode(latents))
    return reads_as_prompted(classifier, images, [prompt] * draws)["both"].float().mean().item()


def parse_window(text: str) -> set:
    if text == "x_T":
        return {-1}
    first, _, last = text.partition("-")
    return set(range(int(first), int(last or first) + 1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", nargs="+", default=["0-2", "3-7", "8-19", "x_T"],
                        help="Step ranges, noisiest step = 0 (e.g. 0-2), or x_T.")
    parser.add_argument("--model", default="builtin:toy")
    parser.add_argument("--prompts", default="builtin:toy_train")
    parser.add_argument("--captions", type=int, default=12, help="Captions, a fixed random pick.")
    parser.add_argument("--contexts", type=int, default=4, help="Contexts per caption.")
    parser.add_argument("--draws", type=int, default=8, help="Images per context.")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    sampler = Sampler(load_pipeline(args.model), args.steps, 5.0, 1.0)
    classifier = load_classifier()
    pool = load_prompts(args.prompts)
    prompts = [pool[i] for i in np.random.default_rng(7).choice(len(pool), args.captions, replace=False)]
    for window in args.windows:
        grid = np.array([[success(sampler, classifier, p, parse_window(window), c, args.draws)
                          for c in range(args.contexts)] for p in prompts])  # [caption, context]
        per_caption = grid.mean(axis=1)
        total = float((per_caption * (1 - per_caption)).mean())
        within = float((grid * (1 - grid)).mean())
        print(json.dumps({"window": window, "success": round(float(grid.mean()), 3),
                          "within_share": round(within / total, 3) if total else None}), flush=True)


if __name__ == "__main__":
    main()
