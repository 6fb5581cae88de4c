"""How close the LoRA gradient computed with fp16 / bf16 base weights is to the fp32 one, as JSON.

    python bench/precision_gradient.py --model builtin:random-sd15 --resolution 512 --device cuda

One trajectory chunk is sampled in fp32; the exact PRDP gradient (the trainer's chunked backward) is then computed
on it with the base weights in fp32, fp16 (with the trainer's power-of-two gradient scaling), fp16 without scaling,
and bf16, from the same LoRA weights and the same loss coefficients, so only the backward's precision differs.
Reports each gradient's cosine similarity and relative error to the fp32 one (fp32-repeat: the noise floor of
nondeterministic kernels), and fp16 with vs without scaling, whose forward passes are the same, so their difference
is what underflow in the backward costs (per-element log-prob gradients are ~1/(sigma * D), D = latent size, below
fp16's normal range). Use a trained checkpoint: with random weights the UNet is so sensitive that any precision
change decorrelates the gradient.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import torch  # noqa: E402

from prdp_core import TrainConfig, Trainer  # noqa: E402
from prdp_core.objectives import EpochBatch  # noqa: E402

MODES = ("fp32", "fp32-repeat", "fp16", "fp16-unscaled", "bf16")


def _plain_backward(trainer: Trainer):
    def backward(traj, images, step, coef, text=None):
        (coef * trainer.sampler.chunk_log_probs(traj, images, step, text)).sum().backward()
    return backward


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:tiny")
    parser.add_argument("--resolution", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args(argv)
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    with tempfile.TemporaryDirectory() as tmp:
        def trainer_for(precision: str) -> Trainer:
            config = TrainConfig(model=args.model, resolution=args.resolution, device=args.device, precision=precision,
                                 prompts="builtin:animals", eval_prompts="", rewards={"jpeg_compressibility": 1.0},
                                 images_per_prompt=args.images, batch_size=args.images, num_steps=args.steps,
                                 train_step_fraction=1.0, output_dir=tmp)
            trainer = Trainer(config)
            trainer.setup()
            return trainer

        reference = trainer_for("fp32")
        torch.manual_seed(1)
        for name, param in reference.unet.named_parameters():
            if "lora_B" in name:  # a trained-looking adapter, so lora_A gets gradient too
                param.data.normal_(0.0, 0.01)
        lora = {k: v.clone() for k, v in get_peft_model_state_dict(reference.unet).items()}
        traj, _ = reference.sample(reference.train_prompts[:1], args.images, (0, 0), 0, "sampling",
                                    keep_trajectory=True)
        current = reference.sampler.all_log_probs(traj)
        rewards = torch.linspace(-1.0, 1.0, args.images, device=current.device).view(1, -1)
        batch = EpochBatch(current, rewards, current - 1e-3)
        del reference
        grads = {}
        for mode in MODES:
            trainer = trainer_for(mode.split("-")[0])
            set_peft_model_state_dict(trainer.unet, lora)
            if mode == "fp16-unscaled":
                trainer.chunk_backward = _plain_backward(trainer)
            trainer.optimizer.zero_grad(set_to_none=True)
            trainer.accumulate_gradient(traj, batch, current)
            grads[mode] = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten().double()
                                     for p in trainer.params])
            del trainer
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    exact = grads["fp32"]

    def compare(g, ref):
        return {"cosine": (g @ ref / (g.norm() * ref.norm())).item(),
                "relative_error": ((g - ref).norm() / ref.norm()).item(), "finite": bool(torch.isfinite(g).all())}
    result = {
        "model": args.model, "device": args.device, "images": args.images, "steps": args.steps,
        "gradient_norm_fp32": exact.norm().item(),
        "vs_fp32": {mode: compare(g, exact) for mode, g in grads.items() if mode != "fp32"},
        "fp16_unscaled_vs_scaled": compare(grads["fp16-unscaled"], grads["fp16"]),
    }
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
