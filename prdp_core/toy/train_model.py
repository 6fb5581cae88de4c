"""Train the toy base model: a Stable-Diffusion-shaped pipeline (VAE, CLIP text encoder with its own small
tokenizer, conditional UNet, DDIM scheduler) on the toy world's training split, from scratch, on a CPU.

    python -m prdp_core.toy.train_model --out prdp_core/toy/weights/model

writes a diffusers folder that `StableDiffusionPipeline.from_pretrained` loads, and prints how often the model
draws the prompted colour and shape (judged by the shipped attribute classifier) on seen and unseen prompts.
The shipped weights were made by this command with its defaults; its wall time is in docs/toy-world.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from .classifier import to_tensor
from .world import all_scenes, dataset, scenes

MODEL_DIR = Path(__file__).parent / "weights" / "model"
MAX_TOKENS = 32  # toy captions are 12 tokens; room for a user's longer prompt


# ---------------------------------------------------------------------------------------------- tokenizer
def learn_merges(words: dict[str, int], max_merges: int = 400) -> list[tuple[str, str]]:
    """Byte-pair merges learned from word counts (the classic BPE loop), until every word is one token."""
    pieces = {word: list(word[:-1]) + [word[-1] + "</w>"] for word in words}
    merges = []
    while len(merges) < max_merges:
        pairs: dict[tuple[str, str], int] = {}
        for word, split in pieces.items():
            for pair in zip(split, split[1:]):
                pairs[pair] = pairs.get(pair, 0) + words[word]
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))  # ties broken by the pair itself: deterministic
        merges.append(best)
        for word, split in pieces.items():
            merged, i = [], 0
            while i < len(split):
                if i + 1 < len(split) and (split[i], split[i + 1]) == best:
                    merged.append(split[i] + split[i + 1])
                    i += 2
                else:
                    merged.append(split[i])
                    i += 1
            pieces[word] = merged
    return merges


def toy_merges() -> list[str]:
    """The BPE merges ("a b") that make every word of the toy captions one token."""
    counts: dict[str, int] = {}
    for scene in all_scenes():
        for word in scene.caption.replace(",", " ,").split():
            counts[word] = counts.get(word, 0) + 1
    return [f"{a} {b}" for a, b in learn_merges(counts)]


def build_toy_tokenizer():
    """A CLIP tokenizer whose merges make every word of the toy world one token; any other text still
    tokenises, character by character (byte-level base vocabulary)."""
    from ..clip_tokenizer import build_tokenizer

    return build_tokenizer(toy_merges(), model_max_length=MAX_TOKENS)


# ---------------------------------------------------------------------------------------------- the models
def build_components(tokenizer, seed: int):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    # 64x64 pixels -> 16x16x4 latents: at SD's factor 8 a VAE this small blurs the small shapes past recognition
    # (measured: 54 % shape accuracy on reconstructions, against 90 % at factor 4 for the same training time).
    # No mid-block attention: the VAE is fully convolutional, so it can train on crops.
    vae = AutoencoderKL(
        block_out_channels=(16, 32, 64), in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
        sample_size=64, mid_block_add_attention=False)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, projection_dim=64,
        vocab_size=len(tokenizer), max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    # Cross-attention at 8x8 and 4x4 only (SD leaves its lowest resolution without it too; here the 16x16 level
    # would cost 60 % more time for no gain in following the prompt).
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=16)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    return vae, text_encoder, unet, scheduler


def cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(vae, pixels: torch.Tensor, steps: int, batch: int, crop: int, seed: int, log) -> None:
    """Reconstruction (L1 + L2) of random crops through the sampled posterior, with a small KL term."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    vae.train()
    side = pixels.shape[-1]
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 2e-3 * cosine_lr(step, steps, 50)
        index = torch.randint(0, len(pixels), (batch,), generator=generator)
        y, x = (int(v) * 8 for v in torch.randint(0, (side - crop) // 8 + 1, (2,), generator=generator))
        target = pixels[index, :, y:y + crop, x:x + crop]
        posterior = vae.encode(target).latent_dist
        recon = vae.decode(posterior.sample(generator)).sample
        loss = (recon - target).abs().mean() + (recon - target).pow(2).mean() + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    vae.eval()


@torch.no_grad()
def encode(vae, pixels: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(pixels), batch):
        dist = vae.encode(pixels[i:i + batch]).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def train_unet(unet, text_encoder, tokenizer, scheduler, latents, captions, scaling_factor: float, steps: int,
               batch: int, seed: int, log, drop_caption: float = 0.1):
    """Epsilon-prediction diffusion loss with min-SNR-5 weighting, text encoder trained jointly; returns the
    EMA copies (what gets shipped)."""
    from diffusers import DDPMScheduler

    generator = torch.Generator().manual_seed(seed)
    noise_scheduler = DDPMScheduler.from_config(scheduler.config)
    alphas = noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    ids = tokenizer(list(captions) + [""], padding="max_length", max_length=MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    empty = ids[-1]
    ids = ids[:-1]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
    ema_unet, ema_text = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    ema_params = list(ema_unet.parameters()) + list(ema_text.parameters())
    unet.train()
    text_encoder.train()
    start = time.perf_counter()
    running = 0.0
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * cosine_lr(step, steps, 100)
        index = torch.randint(0, len(latents[0]), (batch,), generator=generator)
        mean, std = latents[0][index], latents[1][index]
        x0 = (mean + std * torch.randn(mean.shape, generator=generator)) * scaling_factor
        tokens = ids[index].clone()
        tokens[torch.rand(batch, generator=generator) < drop_caption] = empty
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        prediction = unet(noisy, t, text_encoder(tokens)[0]).sample
        weight = torch.clamp(snr[t], max=5.0) / snr[t]  # min-SNR-5 for epsilon prediction
        loss = (weight * (prediction - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, p in zip(ema_params, params):
                ema.lerp_(p, 1 - decay)
        running += loss.item()
        if (step + 1) % 100 == 0 or step == steps - 1:
            log(f"unet step {step + 1}/{steps}: loss {running / ((step % 100) + 1):.4f} "
                f"({time.perf_counter() - start:.0f} s)")
            running = 0.0
    return ema_unet, ema_text


# ---------------------------------------------------------------------------------------------- measuring it
@torch.no_grad()
def alignment_accuracy(pipe, prompts: list[str], images_per_prompt: int, num_steps: int, guidance_scale: float,
                       eta: float = 1.0, seed: int = 0, batch: int = 32) -> dict[str, float]:
    """Fraction of samples whose colour, shape, and both, the attribute classifier reads as prompted."""
    from .classifier import load_classifier, reads_as_prompted

    classifier = load_classifier()
    hits = {"colour": 0, "shape": 0, "both": 0}
    jobs = [p for p in prompts for _ in range(images_per_prompt)]
    for i in range(0, len(jobs), batch):
        chunk = jobs[i:i + batch]
        generator = [torch.Generator().manual_seed(seed * 1_000_003 + i + k) for k in range(len(chunk))]
        images = pipe(chunk, num_inference_steps=num_steps, guidance_scale=guidance_scale, eta=eta,
                      generator=generator, output_type="pil").images
        for key, right in reads_as_prompted(classifier, images, chunk).items():
            hits[key] += int(right.sum())
    return {k: round(v / len(jobs), 4) for k, v in hits.items()}


def evaluation_prompts(split: str, count: int, seed: int) -> list[str]:
    pool = scenes(split)
    picks = np.random.default_rng(seed).choice(len(pool), size=min(count, len(pool)), replace=False)
    return [pool[i].caption for i in sorted(picks)]


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the toy world's base model (see the module docstring).")
    parser.add_argument("--out", default=str(MODEL_DIR), help="Output diffusers folder.")
    parser.add_argument("--images", type=int, default=20000, help="Rendered training scenes.")
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--unet-steps", type=int, default=2500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from diffusers import StableDiffusionPipeline

    from ..clip_tokenizer import write_vocab_files
    from ..models import make_text_encoder_portable

    torch.manual_seed(args.seed)
    log = lambda message: print(message, flush=True)  # noqa: E731
    timings = {}
    start = time.perf_counter()
    data = dataset("train", args.images, seed=args.seed)
    pixels = to_tensor([d[0] for d in data]) * 2 - 1  # the VAE's [-1, 1]
    captions = [d[1] for d in data]
    timings["render_s"] = time.perf_counter() - start

    tokenizer = build_toy_tokenizer()
    vae, text_encoder, unet, scheduler = build_components(tokenizer, args.seed)
    mark = time.perf_counter()
    train_vae(vae, pixels, args.vae_steps, args.vae_batch, crop=32, seed=args.seed, log=log)
    timings["vae_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    latents = encode(vae, pixels)
    vae.register_to_config(scaling_factor=round(float(1 / latents[0].std()), 5))
    timings["encode_s"] = time.perf_counter() - mark

    mark = time.perf_counter()
    unet, text_encoder = train_unet(unet, text_encoder, tokenizer, scheduler, latents, captions,
                                    vae.config.scaling_factor, args.unet_steps, args.batch, args.seed, log)
    timings["unet_s"] = time.perf_counter() - mark
    timings["total_s"] = time.perf_counter() - start

    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(args.out)
    write_vocab_files(Path(args.out, "tokenizer"), toy_merges())  # for transformers 4.x hosts as well
    make_text_encoder_portable(Path(args.out, "text_encoder"))  # likewise
    report = {"timings": {k: round(v, 1) for k, v in timings.items()}, "args": {**vars(args), "out": None}}
    for split in ("train", "unseen"):
        prompts = evaluation_prompts(split, 64, seed=7)
        for steps in (10, 50):
            report[f"{split}_T{steps}"] = alignment_accuracy(pipe, prompts, 4, steps, guidance_scale=5.0)
    Path(args.out, "training_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
