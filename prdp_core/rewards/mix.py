"""Rewards by name (registered, or a custom `module:function` scorer) and their weighted mixes."""

from __future__ import annotations

import difflib
import inspect
import math
from typing import Any, Sequence

import torch

from ..errors import RewardError
from .base import _REGISTRY, Reward, reward_names
from .custom import CallableReward


def create_reward(name: str, device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32",
                  options: dict[str, Any] | None = None) -> Reward:
    """A reward by registered name, or a custom scorer given as `module:function` or `path/to/file.py:function`.
    `options` are the reward's own keyword settings (e.g. where its weights are)."""
    options = dict(options or {})
    if name in _REGISTRY:
        factory = _REGISTRY[name]
        accepted = set(inspect.signature(factory).parameters) - {"self", "device", "dtype"}
        unknown = sorted(set(options) - accepted)
        if unknown:
            allowed = ", ".join(sorted(accepted)) or "none"
            raise RewardError(f"reward {name!r} has no option {unknown[0]!r}; its options: {allowed}.")
        return factory(device=device, dtype=dtype, **options)
    if ":" in name:
        if options:
            raise RewardError(f"custom reward {name!r} takes no options; read settings inside your function.")
        return CallableReward.from_spec(name, device=device)
    close = difflib.get_close_matches(name, reward_names(), n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise RewardError(f"unknown reward {name!r}; {hint}choose from {', '.join(reward_names())}, or give a custom "
                      f"scorer as module:function.")


NORMALIZATIONS = ("none", "batch_zscore")


class RewardMix:
    """A weighted sum of rewards; keeps every component's raw scores for logging.

    With normalization="batch_zscore" each component is z-scored within the scored batch before weighting, so
    the weights (and PRDP's beta) act on standard deviations instead of each reward's raw scale."""

    def __init__(self, weights: dict[str, float], device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = "fp32", options: dict[str, dict[str, Any]] | None = None,
                 normalization: str = "none"):
        if not weights:
            raise RewardError("the reward mix is empty; name at least one reward.")
        if normalization not in NORMALIZATIONS:
            raise RewardError(f"reward normalization must be one of {', '.join(NORMALIZATIONS)}, got "
                              f"{normalization!r}.")
        self.normalization = normalization
        options = options or {}
        stray = sorted(set(options) - set(weights))
        if stray:
            raise RewardError(f"reward options given for {stray[0]!r}, which is not in the reward mix "
                              f"({', '.join(weights)}).")
        self.weights = dict(weights)
        self.rewards = {name: create_reward(name, device=device, dtype=dtype, options=options.get(name))
                        for name in weights}

    def score(self, images: list, prompts: Sequence[str], normalize: bool = True
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total, raw component scores). `normalize=False` gives the raw weighted sum whatever the mix's
        normalization: evaluations use it, since z-scores of different batches are not comparable."""
        components = self.components(images, prompts)
        return self.combine(components, normalize), components

    def components(self, images: list, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Each reward's raw scores (combine them with `combine`, e.g. after gathering several processes')."""
        return {name: reward.score(images, prompts) for name, reward in self.rewards.items()}

    def check(self) -> None:
        """Each reward's quick check (see Reward.check)."""
        for reward in self.rewards.values():
            reward.check()

    def offload(self) -> None:
        """Every loaded reward model to the CPU until it scores again."""
        for reward in self.rewards.values():
            reward.offload()

    def combine(self, components: dict[str, torch.Tensor], normalize: bool = True) -> torch.Tensor:
        """The weighted sum of raw component scores, each z-scored first if the mix normalizes."""
        zscore = normalize and self.normalization == "batch_zscore"
        return sum(self.weights[name] * (batch_zscore(scores) if zscore else scores)
                   for name, scores in components.items())

    def describe(self) -> str:
        return " + ".join(f"{_fmt(w)}*{name}" for name, w in self.weights.items())


def batch_zscore(scores: torch.Tensor) -> torch.Tensor:
    """(scores - mean) / std within the batch; zeros when there is nothing to compare (one score, or all equal up
    to float rounding, whose std would otherwise blow rounding noise up to unit scale)."""
    exact = scores.double()  # float32 would leave a mean of ~1e-5 when the spread is small beside the values
    std = exact.std() if exact.numel() > 1 else exact.new_zeros(())
    if std <= 1e-6 * exact.abs().max():
        return torch.zeros_like(scores)
    return ((exact - exact.mean()) / std).to(scores.dtype)


def _fmt(weight: float) -> str:
    return f"{weight:g}" if math.isfinite(weight) else str(weight)
