"""DDIM (eta > 0) sampling with per-step log-probabilities, and their recomputation under other weights.

One DDIM step with eta > 0 is a Gaussian policy  x_{t-1} ~ N(mu_theta(x_t, c), sigma_t^2 I)  (DDPO's
`ddim_step_with_logprob`, here with diffusers' exact arithmetic so that the samples equal the stock pipeline's).
Classifier-free guidance is applied inside every step, for sampling and for every recomputation alike.

Exactness of recomputed log-probs depends on computing them the same way they were sampled: the same UNet batch
composition (uncond and cond halves of the same images), the same dtype, fp32 for the Gaussian. So every UNet call,
in sampling and in training, goes through `Sampler.guided_prediction` on one *chunk*: up to `batch_size` images of
one prompt at one timestep.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from diffusers.utils.torch_utils import randn_tensor

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


# ---------------------------------------------------------------------------------------------- the step
def ddim_mean_std(scheduler, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, eta: float):
    """Mean and std of p(x_{t-1} | x_t) for one DDIM step, in diffusers' `DDIMScheduler.step` arithmetic."""
    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_prod_t = scheduler.alphas_cumprod[timestep]
    alpha_prod_t_prev = scheduler.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else scheduler.final_alpha_cumprod
    beta_prod_t = 1 - alpha_prod_t
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        pred_epsilon = model_output
    elif prediction_type == "v_prediction":
        pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
        pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
    elif prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance ** (0.5)
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * pred_epsilon
    mean = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
    return mean, std_dev_t


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2 I) averaged over all but the batch dimension (DDPO's per-dimension convention), fp32."""
    x, mean, std = x.float(), mean.float(), torch.as_tensor(std, dtype=torch.float32, device=x.device)
    log_prob = -((x.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


# ---------------------------------------------------------------------------------------------- trajectories
@dataclass
class Trajectories:
    """One epoch's samples. Index order everywhere: prompt n, image i, step t (t = 0 is the first, noisiest step)."""

    prompts: list[str]  # N
    prompt_embeds: torch.Tensor  # [N, L, D]
    negative_embeds: torch.Tensor  # [1, L, D]
    timesteps: torch.Tensor  # [T] scheduler timesteps, descending
    latents: torch.Tensor  # [N, B, T + 1, C, h, w] fp32: x_T .. x_0
    log_probs: torch.Tensor  # [N, B, T] fp32 log pi_old(x_{t-1} | x_t, c)
    batch_size: int  # images per UNet call, fixed for the epoch

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.log_probs.shape)

    def chunks(self) -> Iterator[tuple[int, slice]]:
        """(prompt index, image slice) of every UNet call, in a fixed order shared by all passes."""
        n_prompts, n_images, _ = self.shape
        for n in range(n_prompts):
            for start in range(0, n_images, self.batch_size):
                yield n, slice(start, min(start + self.batch_size, n_images))


@dataclass
class UNetClock:
    """Seconds spent inside UNet forward and backward calls, for the benchmark's UNet share."""

    seconds: float = 0.0
    calls: int = 0

    def add(self, seconds: float) -> None:
        self.seconds += seconds
        self.calls += 1


@dataclass
class Sampler:
    """The pipeline plus the sampler settings: draws trajectories and recomputes their log-probs."""

    pipe: object
    num_steps: int
    guidance_scale: float
    eta: float
    negative_prompt: str = ""
    resolution: int = 0
    clock: UNetClock = field(default_factory=UNetClock)

    def __post_init__(self):
        self.pipe.scheduler.set_timesteps(self.num_steps, device=self.device)

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def timesteps(self) -> torch.Tensor:
        return self.pipe.scheduler.timesteps

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0  # as in the stock pipeline: no uncond branch at scale <= 1

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings [N, L, D] and the negative prompt's [1, L, D], computed once per epoch."""
        embeds, _ = self.pipe.encode_prompt(prompts, self.device, 1, False)
        negative, _ = self.pipe.encode_prompt([self.negative_prompt], self.device, 1, False)
        return embeds, negative

    def guided_prediction(self, latents: torch.Tensor, timestep, embeds: torch.Tensor,
                          negative: torch.Tensor) -> torch.Tensor:
        """The guided model output (fp32) for a chunk of latents [m, C, h, w] and prompt embeddings [m or 1, L, D]."""
        unet = self.pipe.unet
        m = latents.shape[0]
        cond = embeds.expand(m, -1, -1)
        if self.guided:
            model_input = torch.cat([latents, latents]).to(unet.dtype)
            hidden = torch.cat([negative.expand(m, -1, -1), cond])
        else:
            model_input, hidden = latents.to(unet.dtype), cond
        start = time.perf_counter()
        output = unet(model_input, timestep, encoder_hidden_states=hidden, return_dict=False)[0].float()
        self.clock.add(time.perf_counter() - start)
        if not self.guided:
            return output
        uncond, text = output.chunk(2)
        return uncond + self.guidance_scale * (text - uncond)

    @torch.no_grad()
    def sample_chunk(self, embeds: torch.Tensor, negative: torch.Tensor, count: int,
                     generator: torch.Generator | list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample `count` trajectories of one prompt (`embeds` [1, L, D]) or of one prompt each ([count, L, D]).
        Returns latents [count, T+1, C, h, w] (x_T .. x_0) and log-probs [count, T]. Consumes `generator` (one, or
        one per image) exactly as `StableDiffusionPipeline.__call__` does."""
        pipe = self.pipe
        side = (self.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor) // pipe.vae_scale_factor
        shape = (count, pipe.unet.config.in_channels, side, side)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)
        latents = latents * pipe.scheduler.init_noise_sigma
        trajectory, log_probs = [latents], []
        for timestep in self.timesteps:
            output = self.guided_prediction(latents, timestep, embeds, negative)
            mean, std = ddim_mean_std(pipe.scheduler, output, timestep, latents, self.eta)
            noise = randn_tensor(output.shape, generator=generator, device=output.device, dtype=output.dtype)
            latents = mean + std * noise
            log_probs.append(gaussian_log_prob(latents, mean, std))
            trajectory.append(latents)
        return torch.stack(trajectory, dim=1), torch.stack(log_probs, dim=1)

    def chunk_log_probs(self, traj: Trajectories, n: int, images: slice, step: int) -> torch.Tensor:
        """log pi(x_{t-1} | x_t, c) under the UNet's current weights for one chunk at one step, shape [m]. Carries
        gradient when called with grad enabled."""
        x_t = traj.latents[n, images, step]
        x_prev = traj.latents[n, images, step + 1]
        timestep = traj.timesteps[step]
        output = self.guided_prediction(x_t, timestep, traj.prompt_embeds[n:n + 1], traj.negative_embeds)
        mean, std = ddim_mean_std(self.pipe.scheduler, output, timestep, x_t, self.eta)
        return gaussian_log_prob(x_prev, mean, std)

    @torch.no_grad()
    def all_log_probs(self, traj: Trajectories, on_chunk=None, steps: int | None = None) -> torch.Tensor:
        """Recompute log-probs [N, B, steps] of the stored transitions of the first `steps` steps (all: None)
        under the current weights."""
        steps = traj.shape[2] if steps is None else steps
        out = torch.empty_like(traj.log_probs[:, :, :steps])
        for n, images in traj.chunks():
            for step in range(steps):
                out[n, images, step] = self.chunk_log_probs(traj, n, images, step)
            if on_chunk is not None:
                on_chunk()
        return out

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents [m, C, h, w] to images [m, 3, H, W] in [0, 1] (fp32), as the stock pipeline does."""
        vae = self.pipe.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)


def to_pil(images: torch.Tensor) -> list:
    """[m, 3, H, W] in [0, 1] to PIL images, with the stock pipeline's rounding."""
    from PIL import Image

    array = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype("uint8")
    return [Image.fromarray(a) for a in array]


def chunk_generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of ints, so noise depends only on (seed, epoch, prompt, image) and is
    identical on every device, for every batch size and after a resume."""
    seed = 0
    for k in key:
        seed = (seed * 1_000_003 + int(k)) % (2**63 - 1)
    return torch.Generator("cpu").manual_seed(seed)
