"""How much of one epoch's PRDP gradient is signal: the gradient noise scale of a run's first update, as JSON.

    python bench/gradient_noise.py                        # the default config (builtin:toy, toy_match)
    python bench/gradient_noise.py --num-prompts 3 --repeats 8 --images-per-prompt 16

For each of a few training prompts, the exact first-update gradient of the LoRA (at the base model, where
theta = theta_old) is computed from `--repeats` independent batches of B images of that prompt (fresh noise each).
Reported per prompt: the mean cosine between two batches' gradients (about |G|^2 / E|g|^2, so 1 = noise-free, 0 =
pure noise), and the gradient noise scale B_noise = tr(Sigma) / |G|^2 in images (McCandlish et al. 2018, "An
Empirical Model of Large-Batch Training": about the batch at which a step's signal matches its noise), null where
the signal is not measurable at this many repeats; the same pooled over the prompts (sums of their unbiased |G|^2
and of their traces), and the mean cosine between batches of different prompts. Any
`prdp train` flag is accepted. Not a timed test: run it and quote its output.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from prdp_core import TrainConfig, Trainer  # noqa: E402
from prdp_core.cli import build_parser, resolve_train_config  # noqa: E402
from prdp_core.models import lora_disabled  # noqa: E402
from prdp_core.objectives import EpochBatch  # noqa: E402
from prdp_core.prompts import draw_prompts  # noqa: E402


def first_update_gradient(trainer: Trainer, prompt: str, key: tuple) -> torch.Tensor:
    """The flattened LoRA gradient of the first update of an epoch that drew only `prompt`, with noise `key`."""
    config = trainer.config
    traj, images = trainer.sample([prompt], config.images_per_prompt, key, 0, "gradient noise",
                                   keep_trajectory=True)
    signal, _ = trainer.reward_mix.score(images, [prompt] * len(images))
    old = traj.log_probs[:, :, :trainer.trained_steps]
    reference = None
    if trainer.objective.needs_reference:
        with lora_disabled(trainer.unet):
            reference = trainer.sampler.all_log_probs(traj, None, trainer.trained_steps)
    advantages = None
    if trainer.objective.needs_advantages:  # DDPO: the batch's own normalised rewards
        advantages = ((signal - signal.mean()) / (signal.std() + 1e-8)).view(1, -1)
    for param in trainer.params:
        param.grad = None
    trainer.accumulate_gradient(traj, EpochBatch(old, signal.view(1, -1), reference, advantages), old)
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in trainer.params])


def signal_and_trace(grads: list[torch.Tensor]) -> tuple[float, float]:
    """Unbiased |G|^2 and tr(Sigma) of one B-image batch, from R independent batch gradients of one prompt."""
    stacked = torch.stack(grads).double()
    mean = stacked.mean(0)
    trace_batch = ((stacked - mean) ** 2).sum(1).sum().item() / (len(grads) - 1)
    return mean.pow(2).sum().item() - trace_batch / len(grads), trace_batch


def noise_scale(signal: float, trace_batch: float, batch: int) -> float | None:
    """McCandlish's B_simple = tr(Sigma) / |G|^2 in images; None where the signal is not measurable."""
    return batch * trace_batch / signal if signal > 0 else None


def per_prompt(grads: list[torch.Tensor], batch: int) -> dict:
    cosines = [torch.nn.functional.cosine_similarity(a, b, dim=0).item() for a, b in itertools.combinations(grads, 2)]
    spread = statistics.stdev(cosines) / len(cosines) ** 0.5 if len(cosines) > 1 else None
    return {"mean_cosine": statistics.fmean(cosines), "cosine_se": spread,
            "noise_scale_images": noise_scale(*signal_and_trace(grads), batch)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=3, help="Training prompts measured (drawn as epochs 1..n).")
    parser.add_argument("--repeats", type=int, default=8, help="Independent batches per prompt (at least 2).")
    args, train_flags = parser.parse_known_args(argv)
    if args.repeats < 2:
        parser.error("--repeats must be at least 2")
    config: TrainConfig = resolve_train_config(build_parser().parse_args(["train", *train_flags]))
    with tempfile.TemporaryDirectory() as tmp:
        config.output_dir = tmp
        trainer = Trainer(config)
        trainer.setup()
        prompts = [draw_prompts(trainer.train_prompts, 1, config.seed, epoch)[0] for epoch in range(args.num_prompts)]
        grads = {prompt: [first_update_gradient(trainer, prompt, (config.seed, 10_000 + index, repeat))
                          for repeat in range(args.repeats)] for index, prompt in enumerate(prompts)}
    pooled = [signal_and_trace(g) for g in grads.values()]  # steadier than any one prompt's estimate
    across = [torch.nn.functional.cosine_similarity(grads[a][r], grads[b][r], dim=0).item()
              for a, b in itertools.combinations(prompts, 2) for r in range(args.repeats)]
    print(json.dumps({
        "model": config.model, "objective": config.objective, "rewards": config.rewards,
        "images_per_batch": config.images_per_prompt, "repeats": args.repeats,
        "lora_parameters": sum(p.numel() for p in trainer.params),
        "per_prompt": {prompt: per_prompt(g, config.images_per_prompt) for prompt, g in grads.items()},
        "pooled_noise_scale_images": noise_scale(sum(s for s, _ in pooled), sum(t for _, t in pooled),
                                                 config.images_per_prompt),
        "across_prompts_mean_cosine": statistics.fmean(across) if across else None,
    }, indent=2))


if __name__ == "__main__":
    main()
