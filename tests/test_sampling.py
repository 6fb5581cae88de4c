"""The sampler: stock-pipeline equality, exact log-prob recomputation, and the DDIM step's Gaussian by hand."""

import math

import numpy as np
import pytest
import torch

from prdp_core.models import build_tiny_pipeline, build_tiny_xl_pipeline
from prdp_core.objectives import EpochBatch
from prdp_core.sampling import Sampler, ddim_mean_std, gaussian_log_prob


def _tiny_xl_with_ddim():
    from diffusers import DDIMScheduler

    pipe = build_tiny_xl_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False, set_alpha_to_one=False)
    return pipe


@pytest.mark.parametrize("build", [build_tiny_pipeline, _tiny_xl_with_ddim], ids=["sd", "sdxl"])
def test_sampled_images_equal_stock_pipeline(build):
    pipe = build()
    sampler = Sampler(pipe, num_steps=5, guidance_scale=5.0, eta=1.0)
    cond, negative = sampler.encode_prompts(["a painting of a fox"])
    latents, log_probs = sampler.sample_chunk(cond, negative, 3, torch.Generator().manual_seed(7))
    ours = sampler.decode(latents[:, -1])
    stock = pipe("a painting of a fox", num_images_per_prompt=3, num_inference_steps=5, guidance_scale=5.0, eta=1.0,
                 generator=torch.Generator().manual_seed(7), output_type="pt").images
    assert latents.shape == (3, 6, 4, 8, 8) and log_probs.shape == (3, 5)
    assert (ours - stock).abs().max().item() < 1e-6
    assert log_probs.dtype == torch.float32


@pytest.mark.parametrize("resolution", [64, 56], ids=["one-draw-per-image", "a-draw-per-step"])
def test_per_image_generators_draw_the_stock_pipelines_noise(resolution):
    """The trainer's generator per image: each image's noise for all steps is drawn in one call where that equals the
    stock pipeline's draw per step (a multiple of 16 values: 4 x 8 x 8), and per step otherwise (4 x 7 x 7)."""
    pipe = build_tiny_pipeline()
    sampler = Sampler(pipe, num_steps=5, guidance_scale=5.0, eta=1.0, resolution=resolution)
    cond, negative = sampler.encode_prompts(["a painting of a fox"])
    latents, _ = sampler.sample_chunk(cond, negative, 3, [torch.Generator().manual_seed(7 + i) for i in range(3)])
    stock = pipe("a painting of a fox", num_images_per_prompt=3, num_inference_steps=5, guidance_scale=5.0, eta=1.0,
                 height=resolution, width=resolution, output_type="pt",
                 generator=[torch.Generator().manual_seed(7 + i) for i in range(3)]).images
    assert (sampler.decode(latents[:, -1]) - stock).abs().max().item() < 1e-6


def test_recorded_step_matches_diffusers_ddim_step():
    pipe = build_tiny_pipeline()
    sampler = Sampler(pipe, num_steps=5, guidance_scale=3.0, eta=1.0)
    cond, negative = sampler.encode_prompts(["a cat"])
    latents, _ = sampler.sample_chunk(cond, negative, 2, torch.Generator().manual_seed(0))
    step = 2
    x_t, x_prev = latents[:, step], latents[:, step + 1]
    timestep = sampler.timesteps[step]
    output = sampler.guided_prediction(x_t, timestep, sampler.chunk_text(cond.expand(2), negative))
    mean, std = ddim_mean_std(pipe.scheduler, output, timestep, x_t, 1.0)
    implied_noise = (x_prev - mean) / std
    stock = pipe.scheduler.step(output, timestep, x_t, eta=1.0, variance_noise=implied_noise).prev_sample
    assert (stock - x_prev).abs().max().item() < 1e-5


@pytest.mark.parametrize("model", ["builtin:tiny", "builtin:tiny-xl"])
def test_recomputed_log_probs_equal_stored_until_an_update(set_up_trainer, model):
    trainer = set_up_trainer(learning_rate=1e-2, model=model)
    traj, _ = trainer.sample(trainer.train_prompts[:2], 3, (0, 0), 0, "sampling", keep_trajectory=True)
    recomputed = trainer.sampler.all_log_probs(traj)
    assert torch.equal(recomputed, traj.log_probs)  # same chunks, same arithmetic: bit-identical on CPU

    rewards = torch.tensor([[0.3, -0.2, 0.9], [0.1, 0.4, -0.5]])
    batch = EpochBatch(traj.log_probs, rewards, traj.log_probs.clone())
    trainer.update(traj, batch, traj.log_probs)
    trainer.update(traj, batch, trainer.sampler.all_log_probs(traj))  # lora_A gets gradient once lora_B != 0
    after = trainer.sampler.all_log_probs(traj)
    assert (after - traj.log_probs).abs().max().item() > 1e-4


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_log_prob_matches_hand_derivation(prediction_type):
    """DDIM (Song et al. Eq. 12/16) on fixed tensors, written from the formulas, not from diffusers."""
    pipe = build_tiny_pipeline(prediction_type=prediction_type)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(10)
    timestep = int(scheduler.timesteps[3])  # 701 with steps_offset 1
    prev = timestep - 100
    a_t = float(scheduler.alphas_cumprod[timestep])
    a_prev = float(scheduler.alphas_cumprod[prev])
    g = torch.Generator().manual_seed(0)
    x_t, output, x_prev = (torch.randn(1, 4, 2, 2, generator=g, dtype=torch.float64) for _ in range(3))
    eta = 0.7

    if prediction_type == "epsilon":
        eps = output
        x0 = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    else:  # v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho)
        x0 = math.sqrt(a_t) * x_t - math.sqrt(1 - a_t) * output
        eps = math.sqrt(a_t) * output + math.sqrt(1 - a_t) * x_t
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    mean = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps
    expected = (-((x_prev - mean) ** 2) / (2 * sigma**2) - math.log(sigma) - 0.5 * math.log(2 * math.pi)).mean()

    got_mean, got_std = ddim_mean_std(scheduler, output.float(), timestep, x_t.float(), eta)
    got = gaussian_log_prob(x_prev.float(), got_mean, got_std)
    assert float(got_std) == pytest.approx(sigma, rel=1e-5)
    assert got.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-4)


def test_noise_does_not_depend_on_batch_size(set_up_trainer):
    """Each image has its own generator, so a smaller batch_size (e.g. after running out of memory) draws the same
    trajectories, up to float rounding from the batch composition."""
    samples = []
    for batch_size in (3, 2):
        trainer = set_up_trainer(batch_size=batch_size)
        traj, _ = trainer.sample(trainer.train_prompts[:2], 3, (0, 0), 1, "sampling", keep_trajectory=True)
        samples.append(traj)
    assert (samples[0].latents - samples[1].latents).abs().max().item() < 1e-4
    assert (samples[0].log_probs - samples[1].log_probs).abs().max().item() < 1e-4


def test_evaluation_batches_across_prompts_with_the_same_images(set_up_trainer):
    """Without kept trajectories a chunk spans prompts (full batches for few images per prompt); each image still
    gets its own prompt and noise, so the images match prompt-by-prompt sampling and stay prompt-major."""
    images = {}
    for batch_size in (1, 4):  # 1: every chunk one prompt's image; 4: chunks of 3 prompts x 2 images that straddle
        trainer = set_up_trainer(batch_size=batch_size)
        _, images[batch_size] = trainer.sample(trainer.train_prompts[:3], 2, (0, 9), 0, "eval")
    assert len(images[4]) == 6
    for one, batched in zip(images[1], images[4]):
        diff = np.abs(np.asarray(one, dtype=np.int16) - np.asarray(batched, dtype=np.int16)).max()
        assert diff <= 1  # uint8 rounding of float noise from the batch composition
    assert np.asarray(images[4][0]).tolist() != np.asarray(images[4][2]).tolist()  # prompt 0 vs prompt 1
