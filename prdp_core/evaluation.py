"""Evaluations on fixed seeds: the noise key that keeps them apart from training, and the statistics reported
(means with standard errors, and paired changes between two evaluations of the same seeds)."""

from __future__ import annotations

import math

import torch

EVAL_NOISE_KEY = 1_000_003  # in the noise key of every evaluation image: apart from every training epoch's noise


def score_evaluation(total: torch.Tensor, components: dict[str, torch.Tensor]) -> dict:
    """One eval set's report from its raw scores: mean, standard error, count, every score, and each component's
    mean and standard error."""
    return {"mean": total.mean().item(), "se": standard_error(total), "n": total.numel(), "scores": total.tolist(),
            "components": {name: {"mean": scores.mean().item(), "se": standard_error(scores)}
                           for name, scores in components.items()}}


def standard_error(values: torch.Tensor) -> float:
    return values.std().item() / math.sqrt(values.numel()) if values.numel() > 1 else 0.0


def paired_delta(before: list[float], after: list[float]) -> dict[str, float]:
    """After minus before on the same seeds and prompts: its mean and standard error (seed noise cancels)."""
    diff = torch.tensor(after) - torch.tensor(before)
    return {"mean": diff.mean().item(), "se": standard_error(diff)}
