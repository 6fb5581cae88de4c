"""Training objectives as functions of per-step log-probabilities.

Both objectives take log-probs of the stored transitions under the current weights, shaped [N prompts, B images,
T steps], and return a scalar. The trainer never builds a graph through all N*B*T UNet calls: it evaluates the
objective on detached log-probs to get dL/dlog_pi (the coefficients), then back-propagates sum(coef * log_pi)
chunk by chunk; the chain rule makes that the exact gradient (see trainer.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def prdp_loss(log_probs: torch.Tensor, log_probs_old: torch.Tensor, log_probs_ref: torch.Tensor,
              rewards: torch.Tensor, *, beta: float, clip_range: float, step_reduction: str = "mean") -> torch.Tensor:
    """The clipped reward-difference-prediction loss of PRDP (Deng et al. 2024, Eqs. 14-21 and App. G).

    Per step the implicit reward is z = log pi_theta - log pi_ref; its clipped copy stays within +-clip_range of
    the sampling model's value z_old. For every pair of images of the same prompt with r_i > r_j (ties dropped) the
    loss is max((dz - dr/beta)^2, (dz_clip - dr/beta)^2), with z reduced over steps by `step_reduction`. Mean over
    a prompt's valid pairs, then over prompts that have any.
    """
    z = log_probs - log_probs_ref
    z_old = log_probs_old - log_probs_ref
    z_clip = torch.minimum(torch.maximum(z, z_old - clip_range), z_old + clip_range)
    if step_reduction == "mean":
        s, s_clip = z.mean(dim=-1), z_clip.mean(dim=-1)
    elif step_reduction == "sum":
        s, s_clip = z.sum(dim=-1), z_clip.sum(dim=-1)
    else:
        raise ValueError(f"step_reduction must be 'mean' or 'sum', got {step_reduction!r}")
    target = rewards / beta
    valid = rewards[:, :, None] > rewards[:, None, :]  # [N, winner, loser]
    target_diff = target[:, :, None] - target[:, None, :]
    err = (s[:, :, None] - s[:, None, :] - target_diff) ** 2
    err_clip = (s_clip[:, :, None] - s_clip[:, None, :] - target_diff) ** 2
    pair_loss = torch.where(valid, torch.maximum(err, err_clip), torch.zeros_like(err))
    pairs = valid.sum(dim=(1, 2))
    has_pairs = pairs > 0
    if not has_pairs.any():
        return (s * 0).sum()  # every prompt tied: no signal, but keep the graph for callers
    per_prompt = pair_loss.sum(dim=(1, 2))[has_pairs] / pairs[has_pairs]
    return per_prompt.mean()


@torch.no_grad()
def prdp_stats(log_probs, log_probs_old, log_probs_ref, rewards, *, clip_range: float,
               step_reduction: str = "mean") -> dict[str, float]:
    """Diagnostics for metrics.jsonl: how much of the trajectory is clipped, and the implicit reward's scale."""
    z = log_probs - log_probs_ref
    z_old = log_probs_old - log_probs_ref
    clipped = (z < z_old - clip_range) | (z > z_old + clip_range)
    s = z.mean(dim=-1) if step_reduction == "mean" else z.sum(dim=-1)
    valid = rewards[:, :, None] > rewards[:, None, :]
    return {
        "clip_fraction": clipped.float().mean().item(),
        "implicit_reward_mean": s.mean().item(),
        "implicit_reward_std": s.std().item() if s.numel() > 1 else 0.0,
        "implicit_reward_abs_max": s.abs().max().item(),
        "kl_old": (log_probs_old - log_probs).mean().item(),  # per-step, per-dim estimate of KL(old || current)
        "valid_pairs": int(valid.sum().item()),
    }


def ddpo_loss(log_probs: torch.Tensor, log_probs_old: torch.Tensor, advantages: torch.Tensor, *,
              clip_range: float, adv_clip: float) -> torch.Tensor:
    """DDPO's importance-sampled PPO objective (Black et al. 2024): per step, the clipped probability ratio
    pi_theta / pi_old times the sample's advantage (its per-prompt normalised reward, clipped to +-adv_clip)."""
    advantages = advantages.clamp(-adv_clip, adv_clip)[:, :, None]
    ratio = torch.exp(log_probs - log_probs_old)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean()


@torch.no_grad()
def ddpo_stats(log_probs, log_probs_old, *, clip_range: float) -> dict[str, float]:
    ratio = torch.exp(log_probs - log_probs_old)
    return {
        "clip_fraction": ((ratio - 1.0).abs() > clip_range).float().mean().item(),
        "kl_old": (log_probs_old - log_probs).mean().item(),
    }


@dataclass
class EpochBatch:
    """What the objective needs besides the current log-probs: the epoch's constants."""

    log_probs_old: torch.Tensor  # [N, B, T]
    rewards: torch.Tensor  # [N, B]
    log_probs_ref: torch.Tensor | None = None  # [N, B, T], PRDP only
    advantages: torch.Tensor | None = None  # [N, B], DDPO only


class PRDPObjective:
    needs_reference = True
    needs_advantages = False

    def __init__(self, beta: float, clip_range: float, step_reduction: str = "mean"):
        self.beta, self.clip_range, self.step_reduction = beta, clip_range, step_reduction

    def loss(self, log_probs: torch.Tensor, batch: EpochBatch) -> torch.Tensor:
        return prdp_loss(log_probs, batch.log_probs_old, batch.log_probs_ref, batch.rewards, beta=self.beta,
                         clip_range=self.clip_range, step_reduction=self.step_reduction)

    def stats(self, log_probs: torch.Tensor, batch: EpochBatch) -> dict[str, float]:
        return prdp_stats(log_probs, batch.log_probs_old, batch.log_probs_ref, batch.rewards,
                          clip_range=self.clip_range, step_reduction=self.step_reduction)


class DDPOObjective:
    needs_reference = False
    needs_advantages = True

    def __init__(self, clip_range: float, adv_clip: float):
        self.clip_range, self.adv_clip = clip_range, adv_clip

    def loss(self, log_probs: torch.Tensor, batch: EpochBatch) -> torch.Tensor:
        return ddpo_loss(log_probs, batch.log_probs_old, batch.advantages, clip_range=self.clip_range,
                         adv_clip=self.adv_clip)

    def stats(self, log_probs: torch.Tensor, batch: EpochBatch) -> dict[str, float]:
        return ddpo_stats(log_probs, batch.log_probs_old, clip_range=self.clip_range)


def make_objective(config) -> PRDPObjective | DDPOObjective:
    if config.objective == "prdp":
        return PRDPObjective(config.beta, config.clip_range, config.step_reduction)
    return DDPOObjective(config.ddpo_clip_range, config.ddpo_adv_clip)
