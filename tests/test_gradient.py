"""The memory-lean gradient (coefficients, then chunked backward) against autograd through the whole loss."""

import math

import torch

from prdp_core.models import lora_disabled
from prdp_core.objectives import EpochBatch


def _epoch(trainer, rewards):
    traj, _ = trainer.sample(trainer.train_prompts[:2], 3, (0, 0), 0, "sampling", keep_trajectory=True)
    with lora_disabled(trainer.unet):
        log_probs_ref = trainer.sampler.all_log_probs(traj)
    return traj, EpochBatch(traj.log_probs, rewards, log_probs_ref)


def _grads(trainer):
    return torch.cat([p.grad.flatten() for p in trainer.params])


def _full_graph_log_probs(trainer, traj):
    """Every transition's log-prob with gradient, in one graph (what the lean scheme avoids)."""
    rows = [torch.stack([trainer.sampler.chunk_log_probs(traj, images, step) for step in range(traj.shape[2])], 1)
            for images in traj.chunks()]
    return torch.cat(rows).view(traj.shape)


def test_lean_gradient_equals_autograd_with_clipping_active(set_up_trainer):
    trainer = set_up_trainer(learning_rate=3e-3)
    rewards = torch.tensor([[0.3, -0.2, 0.9], [0.1, 0.4, -0.5]])
    traj, batch = _epoch(trainer, rewards)
    trainer.update(traj, batch, traj.log_probs)  # update 1 of K: theta moves away from theta_old
    current = trainer.sampler.all_log_probs(traj)
    moved = ((current - batch.log_probs_ref) - (batch.log_probs_old - batch.log_probs_ref)).abs()
    trainer.objective.clip_range = moved.median().item()  # about half of the steps outside their clip interval
    stats = trainer.objective.stats(current, batch)
    assert 0.2 < stats["clip_fraction"] < 0.8

    trainer.optimizer.zero_grad(set_to_none=True)
    loss_lean, _ = trainer.accumulate_gradient(traj, batch, current)
    lean = _grads(trainer)

    trainer.optimizer.zero_grad(set_to_none=True)
    loss = trainer.objective.loss(_full_graph_log_probs(trainer, traj), batch)
    loss.backward()
    reference = _grads(trainer)

    assert loss.item() == loss_lean
    assert reference.norm() > 0
    assert ((lean - reference).norm() / reference.norm()).item() < 1e-4


def test_gradient_at_init_is_reinforce_with_mean_centred_rewards(set_up_trainer):
    """prdp-method.md 10.9: at theta = theta_old = ref, grad L = -(2B / C(B,2)) / N * sum_i (r_i - mean r) / beta
    * grad mean_t log pi(x_i)  (no std normalisation, no importance weight)."""
    beta = 0.5
    trainer = set_up_trainer(beta=beta)
    rewards = torch.tensor([[0.3, -0.2, 0.9], [0.1, 0.4, -0.5]])
    traj, batch = _epoch(trainer, rewards)
    assert torch.equal(batch.log_probs_ref, batch.log_probs_old)  # a fresh LoRA is the reference model exactly

    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.accumulate_gradient(traj, batch, traj.log_probs)
    lean = _grads(trainer)

    trainer.optimizer.zero_grad(set_to_none=True)
    n_prompts, n_images, _ = traj.shape
    centred = (rewards - rewards.mean(dim=1, keepdim=True)) / beta
    scale = 2 * n_images / math.comb(n_images, 2) / n_prompts
    surrogate = -(scale * centred * _full_graph_log_probs(trainer, traj).mean(dim=-1)).sum()
    surrogate.backward()
    reference = _grads(trainer)

    assert reference.norm() > 0
    assert ((lean - reference).norm() / reference.norm()).item() < 1e-4


def test_lean_gradient_over_the_noisiest_steps_only(set_up_trainer):
    """train_step_fraction 0.5 of 4 steps: the objective sees the first 2 steps' log-probs, and the lean gradient
    equals autograd through the loss on exactly those (and differs from the all-steps gradient)."""
    trainer = set_up_trainer(train_step_fraction=0.5)
    assert trainer.trained_steps == 2
    rewards = torch.tensor([[0.3, -0.2, 0.9], [0.1, 0.4, -0.5]])
    traj, full = _epoch(trainer, rewards)
    with lora_disabled(trainer.unet):
        assert torch.equal(trainer.sampler.all_log_probs(traj, steps=2), full.log_probs_ref[:, :, :2])
    batch = EpochBatch(full.log_probs_old[:, :, :2], rewards, full.log_probs_ref[:, :, :2])

    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.accumulate_gradient(traj, batch, batch.log_probs_old)
    lean = _grads(trainer)

    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.objective.loss(_full_graph_log_probs(trainer, traj)[:, :, :2], batch).backward()
    reference = _grads(trainer)

    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.accumulate_gradient(traj, full, full.log_probs_old)
    all_steps = _grads(trainer)

    assert ((lean - reference).norm() / reference.norm()).item() < 1e-4
    assert ((all_steps - reference).norm() / reference.norm()).item() > 0.1


def test_retained_graphs_give_the_lean_gradient_bit_for_bit(set_up_trainer):
    """Updates 2..K on the CPU back-propagate the graphs of the log-prob pass instead of running the UNet again:
    same log-probs, same coefficients, so the same gradient to the last bit (same chunks, same kernels)."""
    trainer = set_up_trainer(learning_rate=3e-3, retain_graphs="off")
    assert not trainer.retain_graphs
    # auto on the CPU: kept for a small UNet while an update has at most 16 micro-batch-steps (here 3 chunks x steps)
    assert set_up_trainer(retain_graphs="auto", num_steps=5, train_step_fraction=1.0).retain_graphs
    assert not set_up_trainer(retain_graphs="auto", num_steps=6, train_step_fraction=1.0).retain_graphs
    rewards = torch.tensor([[0.3, -0.2, 0.9], [0.1, 0.4, -0.5]])
    traj, batch = _epoch(trainer, rewards)
    trainer.update(traj, batch, traj.log_probs)  # theta moves away from theta_old
    current = trainer.sampler.all_log_probs(traj)
    moved = (current - batch.log_probs_old).abs()
    trainer.objective.clip_range = moved.median().item()  # about half the steps clipped: their graphs go unused
    assert 0.2 < trainer.objective.stats(current, batch)["clip_fraction"] < 0.8

    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.accumulate_gradient(traj, batch, current)
    lean = _grads(trainer)

    trainer.optimizer.zero_grad(set_to_none=True)
    retained, graphs = trainer.sampler.log_probs_with_graphs(traj)
    assert len(graphs) == 3 * traj.shape[2]  # 6 images in 3 chunks of 2 (the middle one spans both prompts) x steps
    trainer.accumulate_gradient(traj, batch, retained, graphs)
    assert torch.equal(retained, current) and not graphs  # every graph consumed or dropped
    assert lean.norm() > 0 and torch.equal(_grads(trainer), lean)


def test_chunks_spanning_prompts_give_the_per_prompt_gradient(set_up_trainer):
    """batch_size 3 chunks 2 prompts x 3 images one prompt per chunk; 2 and 4 make chunks that span prompts, each image
    keeping its own prompt's conditioning and noise: the same samples and the same gradient, up to float rounding
    from the batch composition."""
    rewards = torch.tensor([[0.3, -0.2, 0.9], [0.1, 0.4, -0.5]])
    results = {}
    for batch_size in (3, 2, 4):
        trainer = set_up_trainer(batch_size=batch_size, learning_rate=3e-3, clip_range=10.0)  # nothing clipped
        traj, batch = _epoch(trainer, rewards)
        assert [(c.start, c.stop) for c in traj.chunks()] == [(s, min(s + batch_size, 6)) for s in range(0, 6,
                                                                                                         batch_size)]
        trainer.update(traj, batch, traj.log_probs)  # away from theta_old, so lora_A's gradient is nonzero too
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.accumulate_gradient(traj, batch, trainer.sampler.all_log_probs(traj))
        results[batch_size] = traj, _grads(trainer)
    per_prompt_traj, per_prompt = results[3]
    assert per_prompt.norm() > 0
    for batch_size in (2, 4):
        traj, gradient = results[batch_size]
        assert (traj.latents - per_prompt_traj.latents).abs().max().item() < 1e-4
        assert ((gradient - per_prompt).norm() / per_prompt.norm()).item() < 1e-4


def test_first_epoch_skips_the_reference_pass_for_the_same_lora(set_up_trainer, monkeypatch):
    """A fresh LoRA (lora_B = 0) adds nothing, so the first epoch's reference log-probs are the samples' own: no
    reference UNet pass, and after two epochs the LoRA equals, to the bit, a run's that ran the pass. Once the LoRA
    has moved, the pass runs."""
    from prdp_core import trainer as trainer_module

    skipping = set_up_trainer()
    assert skipping.train_epoch(0)["timings"]["unet_by_phase"]["reference"] == 0
    assert skipping.train_epoch(1)["timings"]["unet_by_phase"]["reference"] > 0

    monkeypatch.setattr(trainer_module, "lora_is_zero", lambda unet: False)
    passing = set_up_trainer()
    assert passing.train_epoch(0)["timings"]["unet_by_phase"]["reference"] > 0
    passing.train_epoch(1)
    assert all(torch.equal(a, b) for a, b in zip(skipping.params, passing.params))
    assert any(p.abs().max() > 0 for p in skipping.params if p.shape[0] > p.shape[1])  # trained: lora_B moved
