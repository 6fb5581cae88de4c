"""Rewards: the registry, weighted mixes, and the built-in scorers (importing a module registers its rewards)."""

from . import clip, hps, http, imagereward, jpeg, toy  # noqa: F401  (importing registers their rewards)
from .base import Reward, register_reward, reward_names
from .mix import RewardMix, create_reward

__all__ = ["Reward", "RewardMix", "create_reward", "register_reward", "reward_names"]
