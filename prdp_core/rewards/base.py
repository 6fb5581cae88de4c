"""The black-box reward interface and its registry (mix.py builds rewards by name and mixes them).

A reward is anything that maps images and their prompts to one finite number per image; no gradient is needed.
Model-based rewards load their weights on first use (`load`), so naming a reward costs nothing until it scores.
"""

from __future__ import annotations

from typing import Callable, Sequence

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
