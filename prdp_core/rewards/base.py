"""The black-box reward interface, its registry, and weighted mixes.

A reward is anything that maps images and their prompts to one finite number per image; no gradient is needed.
Model-based rewards load their weights on first use (`load`), so naming a reward costs nothing until it scores.
"""

from __future__ import annotations

import difflib
import inspect
import math
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import RewardError
from ..models import DTYPES

_REGISTRY: dict[str, Callable[..., "Reward"]] = {}


class Reward:
    """Base class: subclasses set `name` and implement `score_batch`; heavy ones also override `load`."""

    name: str = "reward"
    batch_size: int = 32

    def __init__(self, device: str | torch.device = "cpu", dtype: str | torch.dtype = "fp32"):
        self.device = torch.device(device)
        self.dtype = reward_dtype(dtype)
        self._loaded = False
        self._offloaded = False

    def load(self) -> None:
        """Load weights; called once, before the first batch."""

    def check(self) -> None:
        """Raise RewardError if the reward cannot work at all; called before a run loads anything, so it must be
        quick (a server that is not there, not weights that are slow to load)."""

    def score_batch(self, images: list, prompts: list[str]) -> Sequence[float] | torch.Tensor | np.ndarray:
        raise NotImplementedError

    def ensure_loaded(self) -> None:
        """Load the weights now unless already loaded (a server loads before its first request)."""
        if self._loaded:
            return
        try:
            self.load()
        except RewardError:
            raise
        except Exception as exc:  # a scorer's own failure: name the reward, keep the cause
            raise RewardError(f"reward {self.name!r} failed to load: {type(exc).__name__}: {exc}.") from exc
        self._loaded = True

    def offload(self) -> None:
        """Move the loaded weights to the CPU until the next `score`, which brings them back to `device`: frees
        accelerator memory for the UNet between scoring phases."""
        if self._loaded and self.device.type != "cpu":
            for module in _modules_of(self):
                module.to("cpu")
            self._offloaded = True

    def score(self, images: list, prompts: Sequence[str]) -> torch.Tensor:
        """Scores [n] (fp32, CPU) for PIL images and their prompts, batched; raises RewardError when the scorer
        fails or returns the wrong count or non-finite values."""
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        self.ensure_loaded()
        if self._offloaded:
            for module in _modules_of(self):
                module.to(self.device)
            self._offloaded = False
        scores = []
        for start in range(0, len(images), self.batch_size):
            end = start + self.batch_size
            batch_images, batch_prompts = images[start:end], list(prompts[start:end])
            try:
                out = self.score_batch(batch_images, batch_prompts)
            except RewardError:
                raise
            except Exception as exc:
                raise RewardError(f"reward {self.name!r} failed while scoring: {type(exc).__name__}: {exc}.") from exc
            scores.append(_as_scores(out, len(batch_images), self.name))
        return torch.cat(scores)


def _modules_of(obj, depth: int = 2) -> list[torch.nn.Module]:
    """The torch modules a reward holds, directly or inside its own helper objects (e.g. a CLIP encoder)."""
    found = []
    for value in vars(obj).values():
        if isinstance(value, torch.nn.Module):
            found.append(value)
        elif depth > 1 and hasattr(value, "__dict__") and type(value).__module__.startswith("prdp_core"):
            found += _modules_of(value, depth - 1)
    return found


def _as_scores(out, expected: int, name: str) -> torch.Tensor:
    try:
        values = torch.as_tensor(np.asarray(out.detach().cpu() if isinstance(out, torch.Tensor) else out,
                                            dtype=np.float64)).float().flatten()
    except (TypeError, ValueError):
        raise RewardError(f"reward {name!r} returned {type(out).__name__}, not numbers; it must return one float per "
                          f"image.") from None
    if values.numel() != expected:
        raise RewardError(f"reward {name!r} returned {values.numel()} scores for {expected} images; it must return "
                          f"exactly one per image.")
    if not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).sum())
        raise RewardError(f"reward {name!r} returned {bad} non-finite score(s) (NaN or inf); fix the scorer or drop it "
                          f"from the mix.")
    return values


def reward_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The weight dtype of a model reward from its config name (fp32, fp16, bf16) or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise RewardError(f"reward dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    return DTYPES[dtype]


def register_reward(name: str):
    """Decorator: make a Reward subclass (or factory) available under `name`."""
    def wrap(factory):
        _REGISTRY[name] = factory
        return factory
    return wrap


def reward_names() -> list[str]:
    return sorted(_REGISTRY)


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
        from .custom import CallableReward
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
        components = {name: reward.score(images, prompts) for name, reward in self.rewards.items()}
        return self.combine(components, normalize), components

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
