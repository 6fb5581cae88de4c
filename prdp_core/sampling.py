"""DDIM (eta > 0) sampling with per-step log-probabilities, and their recomputation under other weights.

One DDIM step with eta > 0 is a Gaussian policy  x_{t-1} ~ N(mu_theta(x_t, c), sigma_t^2 I)  (DDPO's
`ddim_step_with_logprob`, here with diffusers' exact arithmetic so that the samples equal the stock pipeline's).
Classifier-free guidance is applied inside every step, for sampling and for every recomputation alike.

Exactness of recomputed log-probs depends on computing them the same way they were sampled: the same UNet batch
composition (uncond and cond halves of the same images), the same dtype, fp32 for the Gaussian. So every UNet call,
in sampling and in training, goes through `Sampler.guided_prediction` on one *chunk* at one timestep: up to
`batch_size` consecutive images of the epoch (prompt-major, so a chunk may span prompts), the same chunks in every
pass (`image_chunks`).

SDXL differs only in its conditioning: a pooled text embedding and the size/crop "time ids" join the token
embeddings (`TextConditioning`), exactly as `StableDiffusionXLPipeline` passes them.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
_NEGATIVE = "\0negative"  # the negative prompt's key in the text cache (no real prompt contains NUL)


# ---------------------------------------------------------------------------------------------- the step
def ddim_alphas(scheduler, timestep) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_bar of a DDIM step's timestep and of the one it steps to (0-d fp32 tensors), as `DDIMScheduler.step`
    looks them up."""
    prev_timestep = timestep - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alpha_prod_t = scheduler.alphas_cumprod[timestep]
    alpha_prod_t_prev = scheduler.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else scheduler.final_alpha_cumprod
    return alpha_prod_t, alpha_prod_t_prev


def ddim_mean_std(scheduler, model_output: torch.Tensor, timestep: int, sample: torch.Tensor, eta: float,
                  alphas: tuple[torch.Tensor, torch.Tensor] | None = None):
    """Mean and std of p(x_{t-1} | x_t) for one DDIM step, in diffusers' `DDIMScheduler.step` arithmetic. `alphas`:
    `ddim_alphas(scheduler, timestep)` looked up beforehand (the lookup waits for an accelerator's timestep)."""
    alpha_prod_t, alpha_prod_t_prev = alphas if alphas is not None else ddim_alphas(scheduler, timestep)
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


# ---------------------------------------------------------------------------------------------- conditioning
@dataclass
class TextConditioning:
    """Text conditioning of a batch: token embeddings [n, L, D] and, for SDXL, pooled embeddings [n, P]."""

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embeds.shape[0]

    def __getitem__(self, index) -> "TextConditioning":
        return TextConditioning(self.embeds[index], None if self.pooled is None else self.pooled[index])

    def expand(self, count: int) -> "TextConditioning":
        """`count` rows: one row repeated, or the rows themselves when there are already `count`."""
        return TextConditioning(self.embeds.expand(count, -1, -1),
                                None if self.pooled is None else self.pooled.expand(count, -1))

    def to(self, device, dtype) -> "TextConditioning":
        return TextConditioning(self.embeds.to(device, dtype),
                                None if self.pooled is None else self.pooled.to(device, dtype))

    @staticmethod
    def cat(parts: list["TextConditioning"]) -> "TextConditioning":
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        return TextConditioning(torch.cat([p.embeds for p in parts]), pooled)


# ---------------------------------------------------------------------------------------------- trajectories
def image_chunks(count: int, batch_size: int) -> list[slice]:
    """The UNet calls over `count` images (prompt-major): consecutive runs of up to `batch_size`, spanning prompts, so
    that few images per prompt still fill the UNet's batch. Sampling and every later pass use these same chunks."""
    return [slice(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


@dataclass
class Trajectories:
    """One epoch's samples. Index order everywhere: prompt n, image i, step t (t = 0 is the first, noisiest step).
    Chunks index the images flattened prompt-major (image n * B + i), as `flat_latents` holds them."""

    prompts: list[str]  # N
    cond: TextConditioning  # N rows
    negative: TextConditioning  # 1 row
    timesteps: torch.Tensor  # [T] scheduler timesteps, descending
    latents: torch.Tensor  # [N, B, T + 1, C, h, w] fp32: x_T .. x_0
    log_probs: torch.Tensor  # [N, B, T] fp32 log pi_old(x_{t-1} | x_t, c)
    batch_size: int  # images per UNet call, fixed for the epoch

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.log_probs.shape)

    def chunks(self) -> list[slice]:
        """The flat image slice of every UNet call, in the order and composition they were sampled in."""
        n_prompts, n_images, _ = self.shape
        return image_chunks(n_prompts * n_images, self.batch_size)

    @property
    def flat_latents(self) -> torch.Tensor:
        """latents as [N * B, T + 1, C, h, w] (a view)."""
        return self.latents.flatten(0, 1)

    def chunk_cond(self, images: slice) -> TextConditioning:
        """The conditioning of each image of a chunk (one row per image)."""
        rows = torch.arange(images.start, images.stop, device=self.cond.embeds.device) // self.shape[1]
        return self.cond[rows]


def synchronize(device: torch.device) -> None:
    """Wait for queued accelerator work, so wall-clock timers measure it (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class UNetClock:
    """Seconds spent inside UNet forward and backward calls, for the benchmark's UNet share. On CUDA each call is
    timed by a pair of events, read only when `seconds` is asked for, so timing never makes the host wait for the
    accelerator inside the step loop."""

    device: torch.device = torch.device("cpu")
    calls: int = 0
    _seconds: float = 0.0
    _events: list = field(default_factory=list)

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        self.calls += 1
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self._events.append((start, end))
        else:
            start = time.perf_counter()
            yield
            self._seconds += time.perf_counter() - start

    @property
    def seconds(self) -> float:
        if self._events:
            self._events[-1][1].synchronize()
            self._seconds += sum(start.elapsed_time(end) for start, end in self._events) / 1000
            self._events.clear()
        return self._seconds


class PhaseMeter:
    """Wall seconds, those of them inside UNet calls (`clock`) and, on CUDA, peak allocated memory of each phase of
    an epoch. Phases may nest (decoding inside sampling); each is metered exclusively: an outer phase's numbers leave
    out its inner phases'."""

    def __init__(self, device: torch.device, clock: UNetClock | None = None):
        self.device = device
        self.cuda = device.type == "cuda"
        self.clock = clock or UNetClock(device)
        self.reset()

    def reset(self) -> None:
        self.seconds: dict[str, float] = {}
        self.unet_seconds: dict[str, float] = {}  # of each phase's seconds, those inside UNet calls
        self.peak_gib: dict[str, float] = {}
        self.out_of_memory_in: str | None = None  # the innermost phase that ran out of accelerator memory
        self._open: list[str] = []

    def _close_peak(self, name: str) -> None:
        """Fold the peak since the last reset into `name`'s, then restart peak tracking."""
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.peak_gib[name] = max(self.peak_gib.get(name, 0.0), peak)
        torch.cuda.reset_peak_memory_stats(self.device)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        synchronize(self.device)
        if self.cuda:
            if self._open:
                self._close_peak(self._open[-1])
            else:
                torch.cuda.reset_peak_memory_stats(self.device)
        self._open.append(name)
        start, unet_start = time.perf_counter(), self.clock.seconds
        try:
            yield
        except torch.cuda.OutOfMemoryError:
            self.out_of_memory_in = self.out_of_memory_in or name
            raise
        finally:
            synchronize(self.device)
            self._open.pop()
            for meter, elapsed in ((self.seconds, time.perf_counter() - start),
                                   (self.unet_seconds, self.clock.seconds - unet_start)):
                meter[name] = meter.get(name, 0.0) + elapsed
                if self._open:  # the outer phase's time leaves this one out
                    meter[self._open[-1]] = meter.get(self._open[-1], 0.0) - elapsed
            if self.cuda:
                self._close_peak(name)


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
        # the UNet stays where it is for the run; diffusers' .dtype/.device walk every module (ms with a LoRA attached)
        self.device, self.unet_dtype = self.pipe.unet.device, self.pipe.unet.dtype
        scheduler = self.pipe.scheduler
        scheduler.set_timesteps(self.num_steps)  # on the CPU first, for the lookups below (even on the meta device)
        # each step's alpha_bar pair, looked up once rather than at every call of every step
        self._alphas = [ddim_alphas(scheduler, timestep) for timestep in scheduler.timesteps]
        scheduler.set_timesteps(self.num_steps, device=self.device)
        self.clock.device = self.device
        self.sdxl = getattr(self.pipe.unet.config, "addition_embed_type", None) == "text_time"
        self._text_cache: dict[str, TextConditioning] = {}  # prompt -> its conditioning, on the UNet's device
        self._time_ids: torch.Tensor | None = None

    @property
    def timesteps(self) -> torch.Tensor:
        return self.pipe.scheduler.timesteps

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0  # as in the stock pipeline: no uncond branch at scale <= 1

    @property
    def side(self) -> int:
        """Image side in pixels."""
        pipe = self.pipe
        return self.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> tuple[TextConditioning, TextConditioning]:
        """Conditioning of `prompts` (N rows) and of the negative prompt (1 row). Each prompt is encoded once per
        run: the text encoders run only for prompts not seen before (and may live on the CPU)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            for prompt, row in zip(missing, self._encode(missing)):
                self._text_cache[prompt] = row
        if _NEGATIVE not in self._text_cache:
            self._text_cache[_NEGATIVE] = self._encode_negative()
        return TextConditioning.cat([self._text_cache[p] for p in prompts]), self._text_cache[_NEGATIVE]

    def _encode(self, prompts: list[str]) -> list[TextConditioning]:
        pipe = self.pipe
        # keywords: the SD and SDXL pipelines order these parameters differently
        out = pipe.encode_prompt(prompt=prompts, device=pipe.text_encoder.device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)
        encoded = TextConditioning(out[0], out[2] if self.sdxl else None).to(self.device, self.unet_dtype)
        return [encoded[i:i + 1] for i in range(len(prompts))]

    def _encode_negative(self) -> TextConditioning:
        if self.sdxl and not self.negative_prompt and self.pipe.config.get("force_zeros_for_empty_prompt", False):
            # SDXL base's unconditional branch for an empty negative prompt is all zeros, not the empty text
            reference = self._encode([""])[0]
            return TextConditioning(torch.zeros_like(reference.embeds), torch.zeros_like(reference.pooled))
        return self._encode([self.negative_prompt])[0]

    def time_ids(self, count: int) -> torch.Tensor:
        """SDXL's size conditioning [count, 6]: original size, crop top-left (0, 0), target size. Built once: it is
        needed on every UNet call."""
        if self._time_ids is None:
            side = self.side
            self._time_ids = torch.tensor([[side, side, 0, 0, side, side]], dtype=self.unet_dtype, device=self.device)
        return self._time_ids.expand(count, -1)

    def chunk_text(self, cond: TextConditioning, negative: TextConditioning) -> TextConditioning:
        """The UNet's text input for a chunk whose images have conditioning `cond` (one row per image): the negative
        rows, then `cond`, under guidance. Built once per chunk and pass, then used at every step."""
        text = TextConditioning.cat([negative.expand(len(cond)), cond]) if self.guided else cond
        return text.to(self.device, self.unet_dtype)  # no copy when it already is

    def guided_prediction(self, latents: torch.Tensor, timestep, text: TextConditioning) -> torch.Tensor:
        """The guided model output (fp32) for a chunk of latents [m, C, h, w] and its `chunk_text`."""
        unet = self.pipe.unet
        model_input = (torch.cat([latents, latents]) if self.guided else latents).to(self.unet_dtype)
        extra = {}
        if self.sdxl:
            extra["added_cond_kwargs"] = {"text_embeds": text.pooled, "time_ids": self.time_ids(len(text))}
        with self.clock.timed():
            output = unet(model_input, timestep, encoder_hidden_states=text.embeds, return_dict=False, **extra)[0]
        output = output.float()
        if not self.guided:
            return output
        uncond, text_output = output.chunk(2)
        return uncond + self.guidance_scale * (text_output - uncond)

    def trajectory_noise(self, generator: torch.Generator | list[torch.Generator], count: int) -> torch.Tensor:
        """The noise `count` trajectories consume, [T + 1, count, C, h, w] fp32 on the UNet's device: x_T, then each
        step's. Drawn as `StableDiffusionPipeline.__call__` draws it from `generator` (one, or one per image), in one
        call per generator where that gives the same numbers: torch's CPU normal sampler fills blocks of 16 values,
        so one draw of a multiple of 16 values per step equals the steps' consecutive draws."""
        pipe = self.pipe
        side = self.side // pipe.vae_scale_factor
        image = (pipe.unet.config.in_channels, side, side)
        draws = len(self.timesteps) + 1
        generators = generator if isinstance(generator, list) else [generator]
        rows = count // len(generators)  # images per generator: one each, or all of them

        def draw(gen, shape):
            return torch.randn(shape, generator=gen, device=gen.device, dtype=torch.float32)
        if all(gen.device.type == "cpu" for gen in generators) and rows * math.prod(image) % 16 == 0:
            parts = [draw(gen, (draws, rows, *image)) for gen in generators]
        else:
            parts = [torch.stack([draw(gen, (rows, *image)) for _ in range(draws)]) for gen in generators]
        return torch.cat(parts, dim=1).to(self.device)

    @torch.no_grad()
    def sample_chunk(self, cond: TextConditioning, negative: TextConditioning, count: int,
                     generator: torch.Generator | list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample `count` trajectories of one prompt (`cond` of 1 row) or of one prompt each (`count` rows).
        Returns latents [count, T+1, C, h, w] (x_T .. x_0) and log-probs [count, T]. Consumes `generator` (one, or
        one per image) exactly as `StableDiffusionPipeline.__call__` does."""
        scheduler = self.pipe.scheduler
        text = self.chunk_text(cond.expand(count), negative)
        noise = self.trajectory_noise(generator, count)
        latents = noise[0] * scheduler.init_noise_sigma
        trajectory, log_probs = [latents], []
        for step, timestep in enumerate(self.timesteps):
            output = self.guided_prediction(latents, timestep, text)
            mean, std = ddim_mean_std(scheduler, output, timestep, latents, self.eta, self._alphas[step])
            latents = mean + std * noise[step + 1]
            log_probs.append(gaussian_log_prob(latents, mean, std))
            trajectory.append(latents)
        return torch.stack(trajectory, dim=1), torch.stack(log_probs, dim=1)

    def chunk_log_probs(self, traj: Trajectories, images: slice, step: int,
                        text: TextConditioning | None = None) -> torch.Tensor:
        """log pi(x_{t-1} | x_t, c) under the UNet's current weights for one chunk at one step, shape [m]. Carries
        gradient when called with grad enabled. `text`: the chunk's `chunk_text`, when already built."""
        latents = traj.flat_latents
        x_t, x_prev = latents[images, step], latents[images, step + 1]
        timestep = traj.timesteps[step]
        text = text if text is not None else self.chunk_text(traj.chunk_cond(images), traj.negative)
        output = self.guided_prediction(x_t, timestep, text)
        mean, std = ddim_mean_std(self.pipe.scheduler, output, timestep, x_t, self.eta, self._alphas[step])
        return gaussian_log_prob(x_prev, mean, std)

    @torch.no_grad()
    def all_log_probs(self, traj: Trajectories, on_chunk=None, steps: int | None = None) -> torch.Tensor:
        """Recompute log-probs [N, B, steps] of the stored transitions of the first `steps` steps (all: None)
        under the current weights."""
        return self.log_probs_with_graphs(traj, on_chunk, steps, keep_graphs=False)[0]

    def log_probs_with_graphs(self, traj: Trajectories, on_chunk=None, steps: int | None = None,
                              keep_graphs: bool = True) -> tuple[torch.Tensor, dict[tuple, torch.Tensor]]:
        """As `all_log_probs`, but each chunk's log-probs also come back with their autograd graph, keyed by
        (first image, step), so that a backward pass can follow without a second forward pass."""
        n_prompts, n_images, n_steps = traj.shape
        steps = n_steps if steps is None else steps
        out = torch.empty(n_prompts * n_images, steps, dtype=traj.log_probs.dtype, device=traj.log_probs.device)
        graphs = {}
        for images in traj.chunks():
            text = self.chunk_text(traj.chunk_cond(images), traj.negative)
            for step in range(steps):
                log_probs = self.chunk_log_probs(traj, images, step, text)
                out[images, step] = log_probs.detach()
                if keep_graphs:
                    graphs[images.start, step] = log_probs
            if on_chunk is not None:
                on_chunk()
        return out.view(n_prompts, n_images, steps), graphs

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
