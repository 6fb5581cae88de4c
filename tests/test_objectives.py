"""The objectives against deliberately naive re-implementations (explicit loops, Python floats)."""

import itertools
import math
from collections import deque

import numpy as np
import pytest
import torch

from prdp_core.objectives import ddpo_loss, prdp_loss, prdp_stats


def naive_prdp_loss(lp, lp_old, lp_ref, rewards, beta, eps, reduction):
    """The App. G logic written out: per prompt, per unordered pair with distinct rewards, per step."""
    n_prompts, n_images, n_steps = len(lp), len(lp[0]), len(lp[0][0])
    prompt_losses = []
    for n in range(n_prompts):
        def implicit(i, clipped):
            total = 0.0
            for t in range(n_steps):
                z = lp[n][i][t] - lp_ref[n][i][t]
                z_old = lp_old[n][i][t] - lp_ref[n][i][t]
                if clipped:
                    z = min(max(z, z_old - eps), z_old + eps)
                total += z
            return total / n_steps if reduction == "mean" else total

        pair_losses = []
        for i, j in itertools.combinations(range(n_images), 2):
            if rewards[n][i] == rewards[n][j]:
                continue  # ties carry no preference
            win, lose = (i, j) if rewards[n][i] > rewards[n][j] else (j, i)
            target = rewards[n][win] / beta - rewards[n][lose] / beta
            plain = (implicit(win, False) - implicit(lose, False) - target) ** 2
            clip = (implicit(win, True) - implicit(lose, True) - target) ** 2
            pair_losses.append(max(plain, clip))
        if pair_losses:
            prompt_losses.append(sum(pair_losses) / len(pair_losses))
    return sum(prompt_losses) / len(prompt_losses)


def random_inputs(seed, n=3, b=5, t=6, eps=1e-3):
    g = torch.Generator().manual_seed(seed)
    lp_ref = torch.randn(n, b, t, generator=g, dtype=torch.float64)
    lp_old = lp_ref + 1e-3 * torch.randn(n, b, t, generator=g, dtype=torch.float64)
    # current = old + moves of a few eps: some steps inside the clip interval, some outside
    lp = lp_old + 2 * eps * torch.randn(n, b, t, generator=g, dtype=torch.float64)
    rewards = torch.randint(0, 4, (n, b), generator=g).double() * 0.25  # few values: ties are common
    rewards[1] = 0.5  # a prompt whose images all tie: skipped
    return lp, lp_old, lp_ref, rewards


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prdp_loss_matches_naive_loops(seed, reduction):
    eps, beta = 1e-3, 0.5
    lp, lp_old, lp_ref, rewards = random_inputs(seed, eps=eps)
    stats = prdp_stats(lp, lp_old, lp_ref, rewards, clip_range=eps, step_reduction=reduction)
    assert 0.1 < stats["clip_fraction"] < 0.9, "the inputs must exercise both sides of the clip"
    ties = sum(int(rewards[n, i] == rewards[n, j]) for n in range(3) for i, j in itertools.combinations(range(5), 2))
    assert ties > 10  # all of prompt 1, plus some in the others
    got = prdp_loss(lp, lp_old, lp_ref, rewards, beta=beta, clip_range=eps, step_reduction=reduction).item()
    want = naive_prdp_loss(lp.tolist(), lp_old.tolist(), lp_ref.tolist(), rewards.tolist(), beta, eps, reduction)
    assert got == pytest.approx(want, rel=1e-12)


def test_prdp_loss_max_branch_matters():
    """On inputs where clipping is active, the clipped branch raises the loss above the unclipped one."""
    eps = 1e-3
    lp, lp_old, lp_ref, rewards = random_inputs(0, eps=eps)
    clipped = prdp_loss(lp, lp_old, lp_ref, rewards, beta=0.5, clip_range=eps)
    unclipped = prdp_loss(lp, lp_old, lp_ref, rewards, beta=0.5, clip_range=1e9)
    assert clipped.item() > unclipped.item()


def test_prdp_loss_all_tied_is_zero_with_graph():
    lp = torch.zeros(2, 3, 4, requires_grad=True)
    loss = prdp_loss(lp, lp.detach(), lp.detach(), torch.ones(2, 3), beta=1.0, clip_range=1e-3)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(lp.grad) == 0


def test_prdp_loss_zero_at_optimum():
    """When implicit-reward differences equal reward differences / beta, the loss is exactly zero (Eq. 13)."""
    beta = 0.1
    rewards = torch.tensor([[0.3, 0.1, 0.7]], dtype=torch.float64)
    lp_ref = torch.zeros(1, 3, 4, dtype=torch.float64)
    lp = lp_ref + (rewards / beta)[:, :, None]  # every step's implicit reward = r / beta, so the mean is too
    loss = prdp_loss(lp, lp, lp_ref, rewards, beta=beta, clip_range=1e-3)
    assert loss.item() == pytest.approx(0.0, abs=1e-20)


def naive_ddpo_loss(lp, lp_old, adv, eps, adv_clip):
    terms = []
    for n in range(len(lp)):
        for i in range(len(lp[0])):
            a = min(max(adv[n][i], -adv_clip), adv_clip)
            for t in range(len(lp[0][0])):
                ratio = math.exp(lp[n][i][t] - lp_old[n][i][t])
                terms.append(max(-a * ratio, -a * min(max(ratio, 1 - eps), 1 + eps)))
    return sum(terms) / len(terms)


def test_ddpo_loss_matches_naive_loops():
    g = torch.Generator().manual_seed(3)
    lp_old = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    lp = lp_old + 2e-4 * torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    adv = 3 * torch.randn(2, 4, generator=g, dtype=torch.float64)  # some beyond the advantage clip
    got = ddpo_loss(lp, lp_old, adv, clip_range=1e-4, adv_clip=5.0).item()
    want = naive_ddpo_loss(lp.tolist(), lp_old.tolist(), adv.tolist(), 1e-4, 5.0)
    assert got == pytest.approx(want, rel=1e-12)


class _DdpoPytorchTracker:
    """kvablack/ddpo-pytorch's PerPromptStatTracker, as written there (flat prompts and rewards)."""

    def __init__(self, buffer_size, min_count):
        self.buffer_size, self.min_count, self.stats = buffer_size, min_count, {}

    def update(self, prompts, rewards):
        prompts, rewards = np.array(prompts), np.array(rewards)
        advantages = np.empty_like(rewards)
        for prompt in np.unique(prompts):
            prompt_rewards = rewards[prompts == prompt]
            self.stats.setdefault(prompt, deque(maxlen=self.buffer_size)).extend(prompt_rewards)
            if len(self.stats[prompt]) < self.min_count:
                mean, std = np.mean(rewards), np.std(rewards) + 1e-6
            else:
                mean, std = np.mean(self.stats[prompt]), np.std(self.stats[prompt]) + 1e-6
            advantages[prompts == prompt] = (prompt_rewards - mean) / std
        return advantages


def test_per_prompt_tracker_matches_ddpo_pytorch_and_keeps_a_bounded_number_of_prompts():
    from prdp_core.stat_tracking import PerPromptStatTracker

    rng = np.random.default_rng(0)
    ours, theirs = PerPromptStatTracker(buffer_size=6, min_count=4), _DdpoPytorchTracker(6, 4)
    for _ in range(5):
        prompts = list(rng.choice(["fox", "owl", "cat", "elk"], size=2, replace=False))
        rewards = rng.normal(size=(2, 3))
        np.testing.assert_allclose(ours.update(prompts, rewards),
                                   theirs.update(np.repeat(prompts, 3), rewards.flatten()).reshape(2, 3))
    bounded = PerPromptStatTracker(buffer_size=4, min_count=4, max_prompts=3)
    for epoch in range(10):  # a stream of prompts, each seen once
        bounded.update([f"prompt {2 * epoch}", f"prompt {2 * epoch + 1}"], rng.normal(size=(2, 4)))
    assert list(bounded.state_dict()) == ["prompt 17", "prompt 18", "prompt 19"]  # the last used
